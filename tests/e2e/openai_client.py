"""Checks Switchyard's frontend with the official `openai` Python client.

Run by tests/e2e/main.rs against a live frontend:
    python openai_client.py http://127.0.0.1:PORT/v1
Exits non-zero (with the failing assertion) when anything is off.
"""

import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=30)
MESSAGES = [{"role": "user", "content": "Say something about rivers"}]

models = [m.id for m in client.models.list().data]
assert models == ["mock-model"], models

whole = client.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=7)
assert whole.choices[0].finish_reason == "length", whole
assert whole.choices[0].message.role == "assistant", whole
assert len(whole.choices[0].message.content.split()) == 7, whole
assert whole.usage.completion_tokens == 7, whole.usage

text, finish, usage = "", None, None
stream = client.chat.completions.create(
    model="mock-model",
    messages=MESSAGES,
    max_tokens=5,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert len(text.split()) == 5, text
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == 5, usage

completion = client.completions.create(model="mock-model", prompt="Once upon a time", max_tokens=3)
assert len(completion.choices[0].text.split()) == 3, completion
assert completion.usage.prompt_tokens == 4, completion.usage

pieces = list(client.completions.create(model="mock-model", prompt="Hello", max_tokens=2, stream=True))
assert "".join(p.choices[0].text for p in pieces if p.choices).split().__len__() == 2, pieces

try:
    client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as error:
    assert error.status_code == 404, error

try:
    client.chat.completions.create(model="mock-model", messages=MESSAGES, temperature=5)
    raise AssertionError("temperature 5 must fail")
except openai.BadRequestError as error:
    assert "temperature" in str(error), error

print("all openai client checks passed")

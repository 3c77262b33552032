"""Checks Switchyard's frontend with the official `openai` Python client.

Run by tests/e2e/main.rs against a live frontend:
    python openai_client.py http://127.0.0.1:PORT/v1 [API_KEY [CA_PEM]]
With an API key, also checks that a wrong key is refused; with a CA, the
URL is https:// and the server's certificate must verify against it.
Exits non-zero (with the failing assertion) when anything is off.
"""

import sys
import time

import openai

URL = sys.argv[1]
KEY = sys.argv[2] if len(sys.argv) > 2 else "unused"
CA = sys.argv[3] if len(sys.argv) > 3 else None


def make_client(key):
    # The client's own HTTP client (httpx in older releases, httpx2 now),
    # trusting the test CA.
    http_client = openai.DefaultHttpxClient(verify=CA) if CA else None
    return openai.OpenAI(base_url=URL, api_key=key, max_retries=0, timeout=30, http_client=http_client)


client = make_client(KEY)
MESSAGES = [{"role": "user", "content": "Say something about rivers"}]

deadline = time.monotonic() + 30
while True:
    models = [m.id for m in client.models.list().data]
    if models or time.monotonic() > deadline:
        break
    time.sleep(0.1)
assert models == ["mock-model"], models

if len(sys.argv) > 2:
    for wrong in ["sk-not-the-key-0000", "x"]:
        try:
            make_client(wrong).chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=1)
            raise AssertionError("a wrong API key must be refused")
        except openai.AuthenticationError as error:
            assert error.status_code == 401, error

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

#!/usr/bin/env python3
"""Traffic for the deploy test, through the frontend's published port, with
the official `openai` client:

    traffic.py http://127.0.0.1:PORT/v1 [REQUESTS]

Sends REQUESTS (default 20) chat completions, so both workers serve some,
then one streamed request that the client abandons after its first chunk, so
the frontend counts a client cancellation
(dynamo_frontend_model_cancellation_total, which has no series before its
first event). Exits non-zero on any failure.
"""

import sys
import time

import openai

URL = sys.argv[1]
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 20
client = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Tell me about containers"}]

for _ in range(COUNT):
    answer = client.chat.completions.create(model="mock-model", messages=messages, max_tokens=4)
    assert answer.choices[0].message.content, answer

stream = client.chat.completions.create(model="mock-model", messages=messages, max_tokens=500, stream=True)
for chunk in stream:
    break
stream.close()
# The frontend notices the closed connection when it next writes.
time.sleep(1)
print(f"traffic: {COUNT} completions and one abandoned stream")

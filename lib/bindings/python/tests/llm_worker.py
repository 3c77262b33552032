"""A Python engine behind `switchyard frontend`: model "py-model".

The engine counts: its answer to any prompt is "w0 w1 w2 …", one word per
token, `max_tokens` words (8 when not given). It continues an answer that
another worker began (a migrated request): the words already generated
arrive at the end of the completion prompt, or as the final assistant
message of a chat, and it carries on from the next number.

PIECE_DELAY=S waits S seconds before each piece (0.005 by default);
KV_EVENTS=1 registers the model with the mocker's tokenizer and a KV event
publisher, and publishes each prompt's full blocks as stored when it starts
answering (as an engine that cached them would);
LOAD_REPORTS=1 serves with load reports on. FAIL_AFTER=N makes it raise EngineShutdown after N words (the frontend
then migrates the request); OVERLOADED=1 makes it refuse every request.
Each failure appends a line to the file FAILURES names.
"""

import asyncio
import os
import re

from switchyard.errors import EngineShutdown, Overloaded
from switchyard.llm import kv_event_publisher, mocker_tokens, register_model
from switchyard.runtime import DistributedRuntime, switchyard_worker

WORD = re.compile(r"w(\d+)\s*$")
BLOCK_SIZE = 16
PUBLISHER = None


def already_generated(request: dict) -> tuple[int, int]:
    """(words generated so far, prompt tokens) for a request from the frontend."""
    if "chat" in request:
        messages = request["chat"]["messages"]
        prompt = " ".join(str(m.get("content") or "") for m in messages if m["role"] != "assistant")
        last = messages[-1]
        done = last["content"] if last["role"] == "assistant" else ""
    else:
        prompt = request["completion"]["prompt"]
        done = prompt
    match = WORD.search(done or "")
    return (int(match.group(1)) + 1 if match else 0), len(prompt.split())


def limit(request: dict) -> int:
    body = request.get("chat") or request.get("completion")
    return body.get("max_completion_tokens") or body.get("max_tokens") or 8


def note_failure() -> None:
    if os.environ.get("FAILURES"):
        with open(os.environ["FAILURES"], "a") as failures:
            failures.write("failed\n")


def publish_prompt_blocks(request: dict) -> None:
    """The prompt's full blocks, as stored, each hash standing for its whole prefix."""
    tokens = mocker_tokens(request)
    blocks = len(tokens) // BLOCK_SIZE
    if blocks == 0:
        return
    hashes = [hash(tuple(tokens[: BLOCK_SIZE * (i + 1)])) & (2**64 - 1) for i in range(blocks)]
    PUBLISHER.stored(hashes, tokens[: BLOCK_SIZE * blocks])


async def generate(request, context):
    if os.environ.get("OVERLOADED"):
        note_failure()
        raise Overloaded("this test engine is always full")
    if PUBLISHER is not None:
        publish_prompt_blocks(request)
    start, prompt_tokens = already_generated(request)
    left = limit(request)
    fail_after = int(os.environ.get("FAIL_AFTER", "0"))
    for n in range(left):
        if fail_after and n == fail_after:
            note_failure()
            raise EngineShutdown("this test engine leaves mid-answer")
        await asyncio.sleep(float(os.environ.get("PIECE_DELAY", "0.005")))
        piece = {"text": f"w{start + n} ", "tokens": 1}
        if n == left - 1:
            piece["finish_reason"] = "length"
            piece["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": left,
                "total_tokens": prompt_tokens + left,
            }
        yield piece


@switchyard_worker()
async def main(runtime: DistributedRuntime) -> None:
    endpoint = runtime.namespace("dynamo").component("backend").endpoint("generate")
    reports = bool(os.environ.get("LOAD_REPORTS"))
    serving = asyncio.ensure_future(endpoint.serve_endpoint(generate, load_reports=reports))
    if reports:
        endpoint.report_load(queued=0, kv_usage=0.25, capacity=4)
    if os.environ.get("KV_EVENTS"):
        global PUBLISHER
        PUBLISHER = await kv_event_publisher(endpoint, block_size=BLOCK_SIZE)
        await register_model(
            endpoint, "py-model", context_length=4096, tokenizer="mocker", kv_events=PUBLISHER
        )
    else:
        await register_model(endpoint, "py-model", context_length=4096)
    print("ready", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main())

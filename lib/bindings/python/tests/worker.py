"""A Python worker for the tests. Serves on demo/backend:

- `generate`: a string in, its characters out, one item each (the same
  contract as the Rust hello_world example, so either side can call it);
- `test`: a dict in, whose "mode" says what to do (see `test_handler`);
- `blocking`: a plain generator that sleeps (blocks) for `request` seconds;
- `abrupt`: `test`'s handler, served with graceful_shutdown=False.

Prints "ready <instance id>" once serving.
"""

import asyncio
import builtins
import os
import sys
import time

from switchyard import errors
from switchyard.runtime import DistributedRuntime, switchyard_worker


async def generate(request, context):
    for ch in request:
        yield ch


HANDLED = None  # a custom counter on the test endpoint, set in main


async def test_handler(request, context):
    HANDLED.inc()
    mode = request["mode"]
    if mode == "count":
        for i in range(request["n"]):
            yield i
    elif mode == "count_marked":
        for i in range(request["n"]):
            with open(request["marker"] + ".tmp", "w") as marker:
                marker.write(str(i + 1))
            os.replace(request["marker"] + ".tmp", request["marker"])  # never read half-written
            yield i
    elif mode == "raise":
        yield "first"
        exception = getattr(errors, request["class"], None) or getattr(builtins, request["class"])
        raise exception("raised on purpose")
    elif mode == "raise_before":
        raise errors.Overloaded("full")
    elif mode == "slow":
        yield "started"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            with open(request["marker"], "w") as marker:
                marker.write(repr(time.time()))
            raise
        yield "never"
    elif mode == "block_loop":
        time.sleep(request["seconds"])  # blocks the event loop on purpose
        yield "unblocked"
    elif mode == "wait_for_stop":
        yield "started"
        await asyncio.wait_for(context.async_killed_or_stopped(), timeout=10)
        yield {"stopped": context.is_stopped(), "killed": context.is_killed()}
    elif mode == "context":
        yield {"id": context.id(), "stopped": context.is_stopped(), "killed": context.is_killed()}
    elif mode == "slow_ok":
        await asyncio.sleep(request["seconds"])
        yield "finished"
    elif mode == "unserializable":
        yield object()
    else:
        raise errors.InvalidRequest(f"unknown mode {mode!r}")


def blocking(request, context):
    time.sleep(float(request))
    yield f"slept {request}"


@switchyard_worker()
async def main(runtime: DistributedRuntime) -> None:
    global HANDLED
    component = runtime.namespace("demo").component("backend")
    HANDLED = component.endpoint("test").metrics.create_counter("handled_total", "Requests the test handler took")
    served = [
        # Prometheus wants one set of label names per metric name, so every
        # endpoint of a process gives the same label names.
        component.endpoint("generate").serve_endpoint(generate, metrics_labels=[("model", "chars")]),
        component.endpoint("test").serve_endpoint(
            test_handler, metrics_labels=[("model", "test-model")], load_reports=True
        ),
        component.endpoint("blocking").serve_endpoint(blocking, metrics_labels=[("model", "sleepy")]),
        component.endpoint("abrupt").serve_endpoint(
            test_handler, graceful_shutdown=False, metrics_labels=[("model", "abrupt")]
        ),
    ]
    tasks = [asyncio.ensure_future(s) for s in served]
    client = await component.endpoint("test").client()
    await client.wait_for_instances(timeout=10)
    print(f"ready {runtime.instance_id()} {runtime.status_address()}", flush=True)
    await asyncio.gather(*tasks)
    print("drained", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

"""Measures what a blocking handler holds up (argv[1]: the worker's status
server address). Prints one JSON line of durations in seconds."""

import asyncio
import json
import sys
import time
import urllib.request

from switchyard.runtime import DistributedRuntime


async def timed(awaitable) -> float:
    start = time.monotonic()
    await awaitable
    return time.monotonic() - start


async def drain(client, request) -> list:
    return [item async for item in await client.round_robin(request)]


async def main() -> None:
    runtime = DistributedRuntime.detached()
    component = runtime.namespace("demo").component("backend")
    blocking = await component.endpoint("blocking").client()
    test = await component.endpoint("test").client()
    await blocking.wait_for_instances(timeout=20)
    await test.wait_for_instances(timeout=20)

    # A plain generator blocking for 1 s, and meanwhile a quick one.
    slow = asyncio.ensure_future(timed(drain(blocking, "1.0")))
    await asyncio.sleep(0.2)
    other = await timed(drain(blocking, "0"))
    blocked = await slow

    # An async handler blocking the loop for 1 s; meanwhile, /live.
    loop_blocked = asyncio.ensure_future(drain(test, {"mode": "block_loop", "seconds": 1.0}))
    await asyncio.sleep(0.2)
    start = time.monotonic()
    await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{sys.argv[1]}/live", timeout=5).read())
    live = time.monotonic() - start
    await loop_blocked

    print(json.dumps({"other_request_s": other, "blocked_request_s": blocked, "live_during_blocked_loop_s": live}))
    await runtime.shutdown()
    runtime.close()


asyncio.run(main())

"""Starts a slow request, lets go of it after the first item, and prints
when (time.time()) it let go."""

import asyncio
import sys
import time

from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    endpoint = runtime.namespace("demo").component("backend").endpoint("test")
    client = await endpoint.client()
    await client.wait_for_instances(timeout=20)
    stream = await client.round_robin({"mode": "slow", "marker": sys.argv[1]})
    first = await stream.__anext__()
    assert first == "started", first
    cancelled_at = time.time()
    await stream.aclose()
    await asyncio.sleep(0.5)
    print(f"cancelled-at {cancelled_at!r}", flush=True)
    await runtime.shutdown()
    runtime.close()


asyncio.run(main())

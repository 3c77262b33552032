"""Starts a request whose handler waits for its context to stop, stops it
gracefully after the first item, and prints every item as one JSON list."""

import asyncio
import json

from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    client = await runtime.namespace("demo").component("backend").endpoint("test").client()
    await client.wait_for_instances(timeout=20)
    stream = await client.round_robin({"mode": "wait_for_stop"})
    items = [await stream.__anext__()]
    stream.stop()
    items += [item async for item in stream]
    print(json.dumps(items), flush=True)
    await runtime.shutdown()
    runtime.close()


asyncio.run(main())

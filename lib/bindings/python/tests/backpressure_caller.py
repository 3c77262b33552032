"""Asks for 100,000 items, reads one, then reads nothing for a second, and
prints how many the handler had produced by then (argv[1]: its marker file)."""

import asyncio
import sys
from pathlib import Path

from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    client = await runtime.namespace("demo").component("backend").endpoint("test").client()
    await client.wait_for_instances(timeout=20)
    stream = await client.round_robin({"mode": "count_marked", "n": 100_000, "marker": sys.argv[1]})
    assert await stream.__anext__() == 0
    await asyncio.sleep(1.0)
    print(f"produced {Path(sys.argv[1]).read_text()}", flush=True)
    await stream.aclose()
    await runtime.shutdown()
    runtime.close()


asyncio.run(main())

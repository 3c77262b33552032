"""The Python echo worker of `make bench-python`: a string in, its
characters out, one item each (the Rust hello_world server's contract)."""

import asyncio

from switchyard.runtime import DistributedRuntime, switchyard_worker


async def echo(request, context):
    for ch in request:
        yield ch


@switchyard_worker()
async def main(runtime: DistributedRuntime) -> None:
    await runtime.namespace("bench").component("python").endpoint("echo").serve_endpoint(echo)


asyncio.run(main())

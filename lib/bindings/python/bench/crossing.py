"""What one thread crossing costs on this machine, two ways, in one process:

- through the bindings: a Python awaitable completed by tokio
  (`client.wait_for_instances()` when an instance is already known: a
  tokio task that returns at once, then a job back to the event loop);
- in pure Python: a thread completing a future with
  `loop.call_soon_threadsafe`.

    DYN_DISCOVERY_BACKEND=mem python bench/crossing.py
"""

import asyncio
import queue
import threading
import time

from switchyard.runtime import DistributedRuntime, switchyard_worker

N = 2000


async def echo(request, context):
    yield request


@switchyard_worker()
async def main(runtime: DistributedRuntime) -> None:
    endpoint = runtime.namespace("bench").component("crossing").endpoint("echo")
    serving = asyncio.ensure_future(endpoint.serve_endpoint(echo))
    client = await endpoint.client()
    await client.wait_for_instances(timeout=10)
    start = time.perf_counter()
    for _ in range(N):
        await client.wait_for_instances()
    print(f"bindings: Python -> tokio -> Python: {(time.perf_counter() - start) / N * 1e6:.0f} µs")

    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def completer() -> None:
        while (future := jobs.get()) is not None:
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=completer)
    thread.start()
    start = time.perf_counter()
    for _ in range(N):
        future = loop.create_future()
        jobs.put(future)
        await future
    print(f"pure Python: loop -> thread -> loop: {(time.perf_counter() - start) / N * 1e6:.0f} µs")
    jobs.put(None)
    thread.join()
    serving.cancel()


asyncio.run(main())

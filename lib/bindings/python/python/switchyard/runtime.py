"""The runtime and the worker decorator, shaped like Dynamo's.

.. code-block:: python

    from switchyard.runtime import DistributedRuntime, switchyard_worker

    @switchyard_worker()
    async def worker(runtime: DistributedRuntime):
        endpoint = runtime.namespace("demo").component("backend").endpoint("generate")
        await endpoint.serve_endpoint(generate)

    asyncio.run(worker())
"""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from switchyard._core import (
    Client,
    Component,
    Context,
    DistributedRuntime,
    Endpoint,
    Namespace,
    ResponseStream,
)

__all__ = [
    "Client",
    "Component",
    "Context",
    "DistributedRuntime",
    "Endpoint",
    "Namespace",
    "ResponseStream",
    "dynamo_worker",
    "switchyard_worker",
]

T = TypeVar("T")


def switchyard_worker(
    static: bool = False,
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Turns ``async def worker(runtime, *args)`` into ``async def worker(*args)``.

    The wrapper builds the runtime from the ``DYN_*`` settings on the running
    loop and passes it in. On SIGTERM or SIGINT it shuts the runtime down
    gracefully: endpoints leave discovery, requests in flight finish (up to
    ``DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT``), and ``serve_endpoint`` returns;
    a second signal cancels what is still running. When the worker function
    returns, the runtime is shut down the same way. ``static`` is accepted
    for Dynamo compatibility and ignored (discovery is always dynamic).
    """
    del static

    def decorator(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            runtime = DistributedRuntime.detached()
            loop = asyncio.get_running_loop()
            shutdowns: list[asyncio.Future[Any]] = []

            def on_signal() -> None:
                if shutdowns:
                    shutdowns.append(asyncio.ensure_future(runtime.stop()))
                else:
                    shutdowns.append(asyncio.ensure_future(runtime.shutdown()))

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
            try:
                return await func(runtime, *args, **kwargs)
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                await runtime.shutdown()
                for pending in shutdowns:
                    await pending
                runtime.close()

        return wrapper

    return decorator


#: Dynamo's name for :func:`switchyard_worker`, so ported workers keep working.
dynamo_worker = switchyard_worker

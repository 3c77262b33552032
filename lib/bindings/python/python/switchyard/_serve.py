"""The handler driver: runs one request's handler as an asyncio task.

``switchyard._core`` starts ``drive`` for each request. It pulls the
handler's generator one item at a time and hands each item to the sink;
when the sink says the queue towards the wire is full, it waits for room
before asking for the next item. A plain (synchronous) generator is
stepped in a worker thread, so a handler that blocks does not stop the
event loop and the other requests on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from switchyard.errors import classify

_END = object()


async def drive(handler: Any, request: Any, context: Any, sink: Any) -> None:
    try:
        stream = handler(request, context)
        if hasattr(stream, "__aiter__"):
            async for item in stream:
                room = sink.send(item)
                if room is not None:
                    await room
        elif hasattr(stream, "__next__") or hasattr(stream, "__iter__"):
            iterator = iter(stream)
            loop = asyncio.get_running_loop()
            while True:
                item = await loop.run_in_executor(None, next, iterator, _END)
                if item is _END:
                    break
                room = sink.send(item)
                if room is not None:
                    await room
        elif asyncio.iscoroutine(stream):
            stream.close()
            raise TypeError(
                "the handler is a coroutine function; it must be an async generator "
                "(use `yield`, not `return`, to send responses)"
            )
        else:
            raise TypeError(
                f"the handler returned a {type(stream).__name__}; it must be an async "
                "generator (or a generator) of responses"
            )
    except asyncio.CancelledError:
        sink.fail("cancelled", "the request was cancelled")
        raise
    except BaseException as error:  # noqa: BLE001 - every failure goes to the caller
        kind, message = classify(error)
        sink.fail(kind, message)
        if not isinstance(error, Exception):
            raise
    else:
        sink.finish()

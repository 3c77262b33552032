"""Errors by kind, the same kinds as the Rust runtime's ``ErrorKind``.

Raised in a handler, each class tells callers and routers what happened:
``EngineShutdown`` makes the frontend migrate the request to another
worker; ``Overloaded`` makes the frontend answer 503 and try elsewhere;
``InvalidRequest`` (or any ``ValueError``/``TypeError``) is a 400. Raised by
the runtime in a caller, the class says the same thing about the far side.
"""

from __future__ import annotations

import asyncio


class SwitchyardError(Exception):
    """Base of every runtime error. ``kind`` is the runtime's error kind."""

    kind: str = "engine"


class NotFound(SwitchyardError):
    """No such endpoint or instance."""

    kind = "not_found"


class Overloaded(SwitchyardError):
    """The worker is at capacity; another may take the request (503)."""

    kind = "overloaded"


class InvalidRequest(SwitchyardError, ValueError):
    """The request itself is bad (400)."""

    kind = "invalid"


class Cancelled(SwitchyardError):
    """The request was stopped or killed."""

    kind = "cancelled"


class EngineShutdown(SwitchyardError):
    """The worker is shutting down: the frontend migrates the request."""

    kind = "shutting_down"


class EngineError(SwitchyardError):
    """The engine (the handler's own logic) failed."""

    kind = "engine"


class Disconnected(SwitchyardError):
    """The connection to the worker broke before the answer ended."""

    kind = "disconnected"


class TooLarge(SwitchyardError):
    """A message exceeded the size limit (``DYN_TCP_MAX_MESSAGE_SIZE``)."""

    kind = "too_large"


class Unreachable(SwitchyardError):
    """The worker could not be reached."""

    kind = "unreachable"


class ProtocolError(SwitchyardError):
    """The peer broke the wire protocol."""

    kind = "protocol"


class TimedOut(SwitchyardError, TimeoutError):
    """Nothing arrived within a deadline."""

    kind = "timed_out"


class SetupError(SwitchyardError, RuntimeError):
    """The runtime could not do a set-up step (connect, serve, register)."""

    kind = "engine"


#: Every request error kind and its class (``SetupError`` is not one).
KINDS: dict[str, type[SwitchyardError]] = {
    cls.kind: cls
    for cls in (
        NotFound,
        Overloaded,
        InvalidRequest,
        Cancelled,
        EngineShutdown,
        EngineError,
        Disconnected,
        TooLarge,
        Unreachable,
        ProtocolError,
        TimedOut,
    )
}


def classify(error: BaseException) -> tuple[str, str]:
    """The error kind and message a handler's exception is sent with."""
    message = str(error) or type(error).__name__
    if isinstance(error, SwitchyardError):
        kind = error.kind
    elif isinstance(error, (ValueError, TypeError)):
        kind = "invalid"
    elif isinstance(error, asyncio.CancelledError):
        kind = "cancelled"
    elif isinstance(error, TimeoutError):
        kind = "timed_out"
    else:
        kind = "engine"
        message = f"{type(error).__name__}: {message}"
    return kind, message

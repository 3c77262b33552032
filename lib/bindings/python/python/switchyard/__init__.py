"""Switchyard for Python: workers and callers on the Switchyard runtime.

The native module (``switchyard._core``) wraps the Rust runtime; this package
adds the worker decorator (:mod:`switchyard.runtime`), the error classes
(:mod:`switchyard.errors`) and the LLM helpers (:mod:`switchyard.llm`).
See docs/python.md.
"""

from switchyard.errors import EngineShutdown, SwitchyardError
from switchyard.runtime import DistributedRuntime, dynamo_worker, switchyard_worker

__all__ = [
    "DistributedRuntime",
    "EngineShutdown",
    "SwitchyardError",
    "dynamo_worker",
    "switchyard_worker",
]

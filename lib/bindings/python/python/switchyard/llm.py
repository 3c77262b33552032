"""Serving a model behind the OpenAI frontend (``switchyard frontend``).

Serve an endpoint whose handler answers the frontend's requests, then
``await register_model(endpoint, "my-model")``. The handler receives
``{"chat": {...}}`` or ``{"completion": {...}}`` (the OpenAI request as the
frontend parsed it) and yields pieces ``{"text": "...", "tokens": 1}``; the
last one carries ``"finish_reason": "stop"`` (or ``"length"``).
"""

from switchyard._core import register_model

__all__ = ["register_model"]

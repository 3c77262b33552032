"""Serving a model behind the OpenAI frontend (``switchyard frontend``).

Serve an endpoint whose handler answers the frontend's requests, then
``await register_model(endpoint, "my-model")``. The handler receives
``{"chat": {...}}`` or ``{"completion": {...}}`` (the OpenAI request as the
frontend parsed it) and yields pieces ``{"text": "...", "tokens": 1}``; the
last one carries ``"finish_reason": "stop"`` (or ``"length"``).

For KV-aware routing (``switchyard frontend --router-mode kv``), name the
engine's tokenizer (``tokenizer="mocker"`` or a Hugging Face model
directory) and where it publishes its KV cache changes: an engine that has
a vLLM-style publisher of its own gives its address through the card; one
that has not gets one from ``await kv_event_publisher(endpoint,
block_size=16)`` and reports ``stored``/``removed``/``cleared`` blocks on it.
"""

from switchyard._core import KvEventPublisher, kv_event_publisher, mocker_tokens, register_model

__all__ = ["KvEventPublisher", "kv_event_publisher", "mocker_tokens", "register_model"]

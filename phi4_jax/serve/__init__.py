"""Serving: an OpenAI-compatible HTTP server on the continuous-batching engine (`python -m phi4_jax.serve`).

- `app`: `create_app(engine, tokenizer, model_name)`, the FastAPI app (routes, streaming, errors).
- `protocol`: request-body validation and OpenAI-style errors (`APIError`).
- `text`: generated tokens -> text (incremental UTF-8, stop strings) and completions `logprobs` entries.
- `metrics`: Prometheus metrics (`/metrics`).

Why FastAPI on uvicorn: the server is mostly waiting on the engine, with many long-lived streams at once, so it
wants an asyncio web stack; FastAPI/Starlette give routing, JSON and server-sent-event streaming responses that
notice a client going away, and uvicorn is the well-kept ASGI server that vLLM, SGLang and llama-cpp-python's
servers also run on. No HTTP parsing is written here.

May import: `phi4_jax.inference`, `phi4_jax.tokenizer`, `phi4_jax.checks`; the CLI is `phi4_jax.cli.serve`.
"""

from phi4_jax.serve.app import create_app

__all__ = ["create_app"]

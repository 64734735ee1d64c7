"""Errors of generation and serving."""

from __future__ import annotations


class GenerationError(ValueError):
    """Invalid arguments to generation (prompts, sampling settings, token ids)."""


class ContextLengthError(GenerationError):
    """A prompt that does not fit the model's context window."""


class QueueFullError(GenerationError):
    """The serving engine's queue of waiting requests is full (retry later)."""


class EngineError(RuntimeError):
    """The serving engine is shut down or failed; its requests cannot complete."""

"""Errors of generation and serving."""

from __future__ import annotations


class GenerationError(ValueError):
    """Invalid arguments to generation (prompts, sampling settings, token ids)."""


class ContextLengthError(GenerationError):
    """A prompt that does not fit the model's context window."""

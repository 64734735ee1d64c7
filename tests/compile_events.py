"""Test helper: count the programs JAX compiles while a block runs (JAX's own compile events, not timings)."""

import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"   # every XLA compile (also a persistent-cache load)


@contextlib.contextmanager
def recorded_compiles():
    """Yields a list that fills, while the block runs, with the name of each function XLA compiles (on any thread):
    e.g. "jit(engine_step)"."""
    names = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

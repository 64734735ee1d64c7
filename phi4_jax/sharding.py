"""Logical-axis sharding: one rules table from logical axis names to mesh axes.

Every parameter carries `logical_axes` (see `phi4_jax.model.param_specs`) and activations are annotated
with `constrain(x, logical_axes)`. Outside an `activation_sharding(mesh, rules)` context, `constrain` does
nothing, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding, PartitionSpec

_ACTIVE = contextvars.ContextVar("phi4_jax_sharding", default=None)


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names under `rules` ({logical: mesh axis or None})."""
    used, spec = set(), []
    for name in logical_axes:
        mesh_axes = rules.get(name)
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context, `constrain` applies `rules` on `mesh` to activations."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, logical_axes):
    """Constrains activation x to the sharding its logical axes map to (no-op without an active mesh)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))

"""The one place the model multiplies by a weight matrix or looks up embedding rows.

Every projection in the decoder (q/k/v/o, gate/up/down, lm_head) goes through `linear`, and the token embedding
through `embedding_lookup`. A weight is either a plain array, or an object that knows how to take part in the
product itself: anything with a ``linear_einsum(equation, x, compute_dtype, **einsum_kwargs)`` method (and, for an
embedding table, ``take_rows(ids, compute_dtype)``). Weight-only quantized weights (dequantized on the fly) and
LoRA-adapted weights (base plus a low-rank update) are such objects; they are pytrees whose leaves keep the
stacked ``layers`` axis first, so `jax.lax.scan` over the layers slices them like plain arrays.
"""

from __future__ import annotations

import jax.numpy as jnp


def linear(equation: str, x, w, compute_dtype, **einsum_kwargs):
    """``einsum(equation, x, w)`` with w in the compute dtype; weight objects compute their own product."""
    if hasattr(w, "linear_einsum"):
        return w.linear_einsum(equation, x, compute_dtype, **einsum_kwargs)
    return jnp.einsum(equation, x, w.astype(compute_dtype), **einsum_kwargs)


def embedding_lookup(table, ids, compute_dtype):
    """Rows ``table[ids]`` in the compute dtype; weight objects gather (and dequantize) their own rows."""
    if hasattr(table, "take_rows"):
        return table.take_rows(ids, compute_dtype)
    return jnp.take(table, ids, axis=0).astype(compute_dtype)

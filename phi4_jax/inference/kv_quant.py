"""The int8 KV cache's number format, and the one check of a KV cache dtype.

`quantize_kv(x)` turns keys or values x [..., head_dim] into int8 codes and a float32 scale per vector (one token
of one kv head): symmetric absmax, scale = max|x| / 127 over head_dim, code = round(x / scale) in [-127, 127]
(0 where the vector is all zeros), so x ~= code * scale with an error of at most scale / 2 per element.

Why one scale per (token, kv head):
- it is what can be written once, at append time: a token's key/value is quantized when it enters the cache and
  never touched again (a per-channel scale, shared by the tokens of a page or a sequence, would have to be known
  before those tokens exist, or the page re-quantized when it grows);
- it is constant along head_dim, the dimension both attention dots contract, so it factors out of them exactly
  (the k scale multiplies a score column, the v scale a probability column: `kernels.paged_attention`) and the
  kernels never build a dequantized copy of the cache;
- heads differ in scale, and one outlier token only coarsens its own vector;
- it costs 4 bytes per 128-byte head vector (3%), so an int8 cache holds 256 / 132 = 1.94x the tokens of a bf16
  one in the same bytes (3.9x float32).

`cache_dtype_name` validates the `cache_dtype` argument shared by `generate`, `ChatSession` and
`ContinuousBatchingEngine` (and the `--kv-cache-dtype` flag of the chat and serve CLIs).
"""

from __future__ import annotations

import jax.numpy as jnp

from phi4_jax.inference.errors import GenerationError
from phi4_jax.model.config import DTYPES

INT8 = "int8"
KV_CACHE_DTYPES = (*DTYPES, INT8)
SCALE_DTYPE = jnp.float32
INT8_MAX = 127


def cache_dtype_name(cache_dtype) -> str | None:
    """The canonical name of a KV cache dtype (None stays None: the model's compute dtype); raises
    GenerationError naming the choices for anything else (e.g. "int4")."""
    if cache_dtype is None:
        return None
    try:
        name = jnp.dtype(cache_dtype).name
    except TypeError:
        name = None
    if name not in KV_CACHE_DTYPES:
        raise GenerationError(f"cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {cache_dtype!r}")
    return name


def is_int8(cache_dtype) -> bool:
    return cache_dtype is not None and jnp.dtype(cache_dtype) == jnp.int8


def quantize_kv(x):
    """x [..., head_dim] (any float dtype) -> (int8 codes [..., head_dim], float32 scales [...]); see the module
    docstring."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return codes, scale.astype(SCALE_DTYPE)

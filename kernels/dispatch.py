"""Chooses and calls an attention / RoPE implementation, after checking the inputs.

Implementations of `flash_attention`:
- ``"xla"``: `kernels.attention_reference.attention_blockwise` (any backend; the CPU default).
- ``"pallas_tpu"``: `kernels.flash_attention_tpu` (Mosaic TPU; the TPU default).
- ``"pallas_gpu"``: `kernels.flash_attention_gpu` (Mosaic GPU, Hopper; the default on H100/H200).
- ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")`; it has no segment ids.

`flash_attention_rope` is RoPE on q and k followed by attention; with "pallas_tpu" and "pallas_gpu" the rotation
is fused into the kernel's tile loads. `interpret=True` runs a Pallas implementation in interpret mode, so it works
on a CPU.
Inputs are validated here so a bad shape or dtype gets an error naming the constraint, not a backend crash.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from kernels.attention_reference import attention_blockwise
from kernels.rope_reference import apply_rope_reference

ATTENTION_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu", "cudnn")
ROPE_IMPLEMENTATIONS = ("xla", "pallas")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class AttentionConfigError(ValueError):
    """Inputs or options that an attention / RoPE implementation cannot handle."""


def _is_hopper_gpu(device) -> bool:
    kind = getattr(device, "device_kind", "") or ""
    return device.platform == "gpu" and any(name in kind for name in ("H100", "H200", "H800", "GH200"))


def default_implementation(backend: str | None = None, *, device=None) -> str:
    """Best attention implementation for the backend: Pallas TPU on TPU, Pallas GPU on Hopper, else XLA.

    `device`: answer for this `jax.Device` instead of the backend's first one (e.g. a compile-only TPU device
    of a topology that this host compiles for).
    """
    if device is None:
        device = jax.devices(backend)[0] if backend else jax.devices()[0]
    if device.platform == "tpu":
        return "pallas_tpu"
    if _is_hopper_gpu(device):
        return "pallas_gpu"
    return "xla"


def _check_attention_inputs(q, k, v, segment_ids):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise AttentionConfigError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise AttentionConfigError(f"{name} dtype {x.dtype} is not supported; use float32 or bfloat16")
    if k.shape != v.shape:
        raise AttentionConfigError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, s, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise AttentionConfigError(
            f"q {q.shape} and k/v {k.shape} must agree in batch, sequence length and head_dim")
    if hq % k.shape[2]:
        raise AttentionConfigError(
            f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]}) for grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionConfigError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if segment_ids.shape != (b, s):
            raise AttentionConfigError(f"segment_ids must be [batch, seq] = {(b, s)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise AttentionConfigError(f"segment_ids must be integers, got {segment_ids.dtype}")


def _kernel_module(name: str):
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError as e:
        raise AttentionConfigError(f"attention kernel module kernels.{name} could not be imported: {e}") from e


def _cudnn_attention(q, k, v, *, causal, segment_ids, sm_scale):
    if segment_ids is not None:
        raise AttentionConfigError(
            "implementation='cudnn' does not support segment_ids (packed documents); "
            "use 'pallas_gpu' or 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionConfigError(f"implementation='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, implementation=None,
                    interpret=False):
    """Multi-head attention with GQA, causal masking and packed-document segment ids.

    q [B, S, Hq, D]; k, v [B, S, Hkv, D] with Hq % Hkv == 0; segment_ids [B, S] int (0 = padding).
    Returns [B, S, Hq, D] in q's dtype. Differentiable. See the module docstring for implementations.
    """
    _check_attention_inputs(q, k, v, segment_ids)
    if implementation is None:
        implementation = default_implementation()
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise AttentionConfigError(
            f"unknown attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "xla":
        return attention_blockwise(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
    if implementation == "pallas_tpu":
        module = _kernel_module("flash_attention_tpu")
        return module.flash_attention_tpu(q, k, v, causal=causal, segment_ids=segment_ids,
                                          sm_scale=sm_scale, interpret=interpret)
    module = _kernel_module("flash_attention_gpu")
    return module.flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids,
                                      sm_scale=sm_scale, interpret=interpret)


def flash_attention_rope(q, k, v, positions, *, theta, causal=True, segment_ids=None, sm_scale=None,
                         implementation=None, interpret=False):
    """Attention of RoPE-rotated q and k: the same result as `apply_rope` on q and k, then `flash_attention`.

    positions [B, S] int, theta the RoPE base; other arguments as in `flash_attention`. With "pallas_tpu" or
    "pallas_gpu" the rotation is fused into the kernel's q/k tile loads (forward and backward, so rotated q/k never go
    through HBM); the other implementations rotate with the XLA reference first, then attend.
    """
    _check_attention_inputs(q, k, v, segment_ids)
    if positions.shape != q.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise AttentionConfigError(
            f"positions must be integer [batch, seq] = {q.shape[:2]}, got {positions.dtype}{list(positions.shape)}")
    if implementation is None:
        implementation = default_implementation()
    if implementation == "pallas_tpu":
        module = _kernel_module("flash_attention_tpu")
        return module.flash_attention_tpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                          interpret=interpret, rope=(positions, theta))
    if implementation == "pallas_gpu":
        module = _kernel_module("flash_attention_gpu")
        return module.flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                          interpret=interpret, rope=(positions, theta))
    q = apply_rope_reference(q, positions, theta=theta)
    k = apply_rope_reference(k, positions, theta=theta)
    return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                           implementation=implementation, interpret=interpret)


def apply_rope(x, positions, *, theta, implementation=None, interpret=False):
    """Rotary embedding (NeoX rotate-half) of x [B, S, H, D] at integer positions [B, S]; fp32 angles."""
    if x.ndim != 4:
        raise AttentionConfigError(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if x.shape[-1] % 2:
        raise AttentionConfigError(f"head_dim must be even for rotate-half RoPE, got {x.shape[-1]}")
    if positions.shape != x.shape[:2]:
        raise AttentionConfigError(f"positions must be [batch, seq] = {x.shape[:2]}, got {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise AttentionConfigError(f"positions must be integers, got {positions.dtype}")
    if implementation is None:
        implementation = "pallas" if interpret else "xla"
    if implementation not in ROPE_IMPLEMENTATIONS:
        raise AttentionConfigError(
            f"unknown RoPE implementation {implementation!r}; choose one of {ROPE_IMPLEMENTATIONS}")
    if implementation == "xla":
        return apply_rope_reference(x, positions, theta=theta)
    module = _kernel_module("rope_pallas")
    return module.apply_rope_pallas(x, positions, theta=theta, interpret=interpret)

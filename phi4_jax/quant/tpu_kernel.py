"""Opt-in routing of decode-sized quantized matmuls to the Pallas TPU dequantize-matmul kernel.

`kernels.dequant_matmul` reads each int8 / packed int4 weight byte once and dequantizes in VMEM; the XLA path of
`QuantizedWeight.linear_einsum` is what the TPU compiler makes of "unpack, scale, einsum", which for int4 writes
the unpacked nibbles and a full-size scale (or dequantized weight) array first (bench/quant_tpu_matmul.py and
BENCHMARKS.md have the compiler's numbers). The kernel is not the default: in phi-4's whole decode step as it is
scanned today, the TPU compiler's plan moves more bytes with the kernel than without it (the layer slices are
copied, and its VMEM plan for the rest changes), and all of this is the compiler's plan, not a run on a TPU (the
README's rule: defaults follow hardware evidence).

Turn it on with `use_dequant_kernel(params, max_rows=...)`, which returns the parameter tree with every
unstacked `QuantizedWeight` (the lm_head; values [N, K]) marked (a static field, so jitted functions retrace).
Stacked layer weights ([layers, N, K]) are marked only with `layers=True`: the layer `lax.scan` hands each step a
slice, which XLA copies whole before it can pass it to a kernel; the copy is a VMEM prefetch when the slice fits
the compiler's VMEM plan and an HBM round trip when it does not (BENCHMARKS.md has both cases in phi-4's decode
step). The kernel's `layer` argument reads a layer's blocks in place, but using it needs the decode scan to pass
the stacked weights and the layer index instead of slices (not done here).

A marked weight's product goes to the kernel when
- the program is compiled for a TPU (`kernels.pallas_compat.on_tpu`: a TPU backend, or an abstract TPU mesh when
  lowering for compile-only TPU devices), and
- it has at most `max_rows` rows (batch x tokens: decode steps, not prefill), and
- the weight is symmetric (no offsets), the einsum a plain ``x[..., *in] . W[*in, *out]``, and the shape fits
  the kernel's blocks.
Everything else stays on the XLA path. A model: ``quantized_model(model.config, use_dequant_kernel(model.params,
max_rows=8))``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kernels.dequant_matmul import DequantMatmulError, choose_blocks, dequant_matmul
from kernels.pallas_compat import on_tpu


def use_dequant_kernel(tree, *, max_rows: int, layers: bool = False):
    """`tree` with each unstacked `QuantizedWeight` (2-D values), and with `layers` each stacked one too, set to
    use the kernel for products of at most `max_rows` rows (0: never, the default of every weight)."""
    from phi4_jax.quant.weights import QuantizationError, QuantizedWeight

    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
        raise QuantizationError(f"max_rows must be a non-negative integer, got {max_rows!r}")
    is_weight = lambda w: isinstance(w, QuantizedWeight)  # noqa: E731
    chosen = lambda w: is_weight(w) and (layers or w.values.ndim == 2)  # noqa: E731
    mark = lambda w: dataclasses.replace(w, kernel_rows=max_rows) if chosen(w) else w  # noqa: E731
    return jax.tree.map(mark, tree, is_leaf=is_weight)


def kernel_product(w, equation: str, x, compute_dtype, einsum_kwargs: dict):
    """``einsum(equation, x, W)`` through the kernel when `w` (a QuantizedWeight) is set to and the product
    qualifies (see the module docstring); None to take the XLA path."""
    if not w.kernel_rows or w.offsets is not None or w.values.ndim != 2 or not on_tpu():
        return None
    if set(einsum_kwargs) - {"preferred_element_type"}:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    n_in = len(w.in_shape)
    w_in, w_out = ws[:n_in], ws[n_in:]
    if not xs.endswith(w_in) or out != xs[:len(xs) - n_in] + w_out:
        return None
    batch_shape = x.shape[:x.ndim - n_in]
    rows = math.prod(batch_shape)
    n = math.prod(w.out_shape)
    if rows > w.kernel_rows or tuple(x.shape[x.ndim - n_in:]) != tuple(w.in_shape):
        return None
    try:
        choose_blocks(n, w.k, bits=w.bits, group_size=w.group_size)
    except DequantMatmulError:
        return None
    y = dequant_matmul(x.reshape(rows, w.k).astype(compute_dtype), w.values, w.scales, bits=w.bits,
                       group_size=w.group_size)
    out_dtype = einsum_kwargs.get("preferred_element_type") or y.dtype
    return y.astype(jnp.dtype(out_dtype)).reshape(*batch_shape, *w.out_shape)

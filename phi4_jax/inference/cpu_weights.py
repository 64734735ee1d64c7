"""The serving engine's CPU weight layout: every matrix as a 2-D array, the lm_head also stored transposed.

`MatrixWeight` plugs into the model through `model.linear`'s weight-object hook (``linear_einsum``), so the layer
math stays the model's own `decoder_block`; `cpu_layer` and `cpu_lm_head` make the engine's copy
(`paged_layers.per_layer_params`).

Why (XLA:CPU, jax 0.10.2; profiles and numbers in BENCHMARKS.md's Decode section):
- A weight with two contracted axes (o_proj [Hq, D, E]) made XLA:CPU permute it to [D, Hq, E] and copy it before
  every decode step's dot (a `copy_bitcast_fusion` per layer and step), and the attention output with it. As a
  [Hq * D, E] matrix, with x flattened to [M, Hq * D], the product is one dot with nothing copied.
- For a wide output (the lm_head: [E, vocab]) and more than one row, XLA:CPU's dot is faster with the weight
  stored [N, K] (PyTorch's [out, in]), computed as ``W_t [N, K] . x [M, K]`` contracting K on both (output
  [N, M], then the small result transposed); for one row the [K, N] layout is as fast or faster. So the lm_head
  keeps both: ``matrix`` (the model's own array, shared, not copied) for one-row products and ``rows`` (a copy)
  for more. The layer matrices were measured either way round in both layouts (shape- and row-count-dependent,
  within the noise for the 87M benchmark's), so they stay [K, N] only.
- 16-bit (bfloat16) products: XLA:CPU's bfloat16 dot of one row is about 2x slower than of 8 rows (and than its
  float32 dot), while at 8 rows it beats float32; so products of fewer than `MIN_ROWS_16BIT` rows are padded to
  that many, and every product accumulates in float32 (rounded once to the compute dtype). A 16-bit lm_head's
  one-row product, still slower padded than float32 over twice the bytes, runs in float32 on a float32 copy
  (`cpu_lm_head`).
- Native products (`kernels.cpu_native`, C++ through XLA's FFI, when it builds on this machine): every float32 or
  bfloat16 matrix is also packed into 64-column panels (`pack_matrix`; in bfloat16 when the model computes in
  bfloat16, `panel_dtype`) and products of few rows run in
  `packed_matmul`, which streams each panel once with the rows' sums in registers: XLA:CPU's dots of 1-8 rows
  reach a fraction of that, and its bfloat16 dots of few rows are slower than float32 (100K lm_head, 8 rows:
  bfloat16 ~25 ms in XLA, ~4 ms packed; BENCHMARKS.md). float32 weights are then kept as panels only (the packed
  product was as fast as XLA's dot up to 512 rows: prefill too), so neither the [K, N] copy nor the lm_head's
  transposed copy is made; with bfloat16 panels the [K, N] matrix is kept too (memory permitting:
  `paged_layers.per_layer_params`), for products of more than `NATIVE_MAX_ROWS_16BIT` rows (XLA:CPU's bfloat16
  dot is far faster for prefill), and a bfloat16 lm_head needs no float32 copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels import cpu_native

# Every matrix in a per-layer layer dict and how many leading axes of it are contracted (its "in" axes).
IN_AXES = {"qkv_proj": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
           "gate_up_proj": 1, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
_EINSUM_KWARGS = ("preferred_element_type", "precision")
# 16-bit float products of fewer rows are padded to this many: XLA:CPU's bfloat16 dot of 1 row is ~2x slower than
# of 8 (and than float32's), at 8 rows it is faster than float32's (BENCHMARKS.md's Decode section).
MIN_ROWS_16BIT = 8
# With packed panels, 16-bit products of more rows than this use XLA's dot of the [K, N] matrix (prefill).
NATIVE_MAX_ROWS_16BIT = 8
PANEL_DTYPES = ("float32", "bfloat16")


class MatrixWeightError(ValueError):
    """A product a `MatrixWeight` cannot compute (an einsum that is not x[..., in] times W[in, out])."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["matrix", "rows", "panels"],
                   meta_fields=["in_shape", "out_shape", "one_row_float32"])
@dataclasses.dataclass(frozen=True)
class MatrixWeight:
    """A matrix W of our [*in_shape, *out_shape] layout as `matrix` [K, N] (K = prod(in_shape), N =
    prod(out_shape)) and/or `rows` [N, K] (transposed; None when not kept). ``linear_einsum`` computes
    ``einsum(equation, x, W)``: from `rows` when x has more than one row (or there is no `matrix`), else from
    `matrix`. With `one_row_float32` (a 16-bit lm_head's float32 `matrix`, `cpu_lm_head`), one-row products are
    computed in float32 from `matrix`. With `panels` (W packed by `kernels.cpu_native.pack_matrix`: float32, or
    bfloat16 as uint16 bits) products run in the native `packed_matmul`: all of them for float32 panels, those of
    at most `NATIVE_MAX_ROWS_16BIT` rows for bfloat16 ones (more use `matrix`)."""
    matrix: Any
    rows: Any
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    one_row_float32: bool = False
    panels: Any = None

    @classmethod
    def of(cls, w, n_in: int, *, matrix: bool = True, rows: bool = False) -> "MatrixWeight":
        """W [*in, *out] (its first `n_in` axes contracted), kept as `matrix` (a reshape of w) and/or `rows`
        (a transposed copy)."""
        if not (matrix or rows):
            raise MatrixWeightError("a MatrixWeight needs the matrix, the rows, or both (or panels: `packed`)")
        in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
        m = w.reshape(math.prod(in_shape), math.prod(out_shape))
        return cls(m if matrix else None, jnp.transpose(m) if rows else None, in_shape, out_shape)

    @classmethod
    def packed(cls, w, n_in: int, *, dtype, matrix: bool) -> "MatrixWeight":
        """W [*in, *out] (float32 or bfloat16) as native `panels` packed in `dtype` (`panel_dtype`), with its
        [K, N] `matrix` too when asked (bfloat16 panels' products of more than `NATIVE_MAX_ROWS_16BIT` rows use
        it)."""
        in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
        m = w.reshape(math.prod(in_shape), math.prod(out_shape))
        return cls(m if matrix else None, None, in_shape, out_shape, panels=cpu_native.pack_matrix(m.astype(dtype)))

    def _native_rows(self, m: int, dtype) -> bool:
        """Whether a product of `m` rows in `dtype` runs on the panels."""
        if self.panels is None:
            return False
        if self.matrix is None and self.rows is None:
            return True
        if jnp.dtype(self.panels.dtype) == jnp.float32:   # (packed for a float32 compute dtype: `panel_dtype`)
            return jnp.dtype(dtype) == jnp.float32
        return m <= NATIVE_MAX_ROWS_16BIT

    def linear_einsum(self, equation: str, x, compute_dtype, **einsum_kwargs):
        """``einsum(equation, x, W)`` for an equation that contracts x's trailing axes with W's `in` axes and
        appends W's `out` axes to x's others (every product in `decoder`), as one 2-D dot of x [M, K]."""
        lhs, out = equation.replace(" ", "").split("->")
        xs, ws = lhs.split(",")
        n_in = len(self.in_shape)
        w_in, w_out = ws[:n_in], ws[n_in:]
        if (len(ws) != n_in + len(self.out_shape) or not xs.endswith(w_in)
                or out != xs[:len(xs) - n_in] + w_out):
            raise MatrixWeightError(f"einsum {equation!r} is not x[..., in] @ W[in, out] for a weight of input "
                                    f"shape {self.in_shape} and output shape {self.out_shape}")
        unknown = sorted(set(einsum_kwargs) - set(_EINSUM_KWARGS))
        if unknown:
            raise MatrixWeightError(f"einsum arguments {unknown} are not supported by MatrixWeight")
        if tuple(x.shape[x.ndim - n_in:]) != self.in_shape:
            raise MatrixWeightError(f"einsum {equation!r}: x's contracted axes {tuple(x.shape[x.ndim - n_in:])} "
                                    f"do not match the weight's input shape {self.in_shape}")
        lead = tuple(x.shape[:x.ndim - n_in])
        x2 = x.reshape(math.prod(lead), math.prod(self.in_shape))
        kw = {k: einsum_kwargs.get(k) for k in _EINSUM_KWARGS}
        out_dtype = kw["preferred_element_type"] or jnp.dtype(compute_dtype)
        kw["preferred_element_type"] = jnp.promote_types(out_dtype, jnp.float32)   # accumulate in float32 at least
        m = x2.shape[0]
        if self._native_rows(m, compute_dtype):
            # x rounded to the compute dtype as XLA's dot would read it; the weights widen exactly; float32 sums.
            xr = x2.astype(compute_dtype).astype(jnp.float32)
            y = cpu_native.packed_matmul(xr, self.panels, math.prod(self.out_shape))
            return y.astype(out_dtype).reshape(lead + self.out_shape)
        use_rows = self.rows is not None and (self.matrix is None or m > 1)
        dtype = jnp.dtype(compute_dtype)
        if self.one_row_float32 and m == 1:
            dtype = jnp.dtype(jnp.float32)
        x2 = x2.astype(dtype)
        if dtype.itemsize < 4 and m < MIN_ROWS_16BIT:
            x2 = jnp.pad(x2, ((0, MIN_ROWS_16BIT - m), (0, 0)))
        if use_rows:
            y = jnp.transpose(jax.lax.dot_general(self.rows.astype(dtype), x2, (((1,), (1,)), ((), ())),
                                                  **kw))                                         # [N, M] -> [M, N]
        else:
            y = jax.lax.dot_general(x2, self.matrix.astype(dtype), (((1,), (0,)), ((), ())), **kw)
        return y[:m].astype(out_dtype).reshape(lead + self.out_shape)


def native_matmul_available() -> bool:
    """Whether `kernels.cpu_native`'s packed matmul is built and loaded on this machine (see the module
    docstring); the engine's default for `paged_layers.per_layer_params`."""
    return cpu_native.available("phi4_cpu_packed_matmul")


def panel_dtype(weight_dtype, compute_dtype, native: bool = True):
    """The dtype a weight's native panels are packed in, or None when it gets none (`native` off, or a weight or
    compute dtype neither float32 nor bfloat16): bfloat16 when the products compute in bfloat16 (a float32 weight
    rounded once, as XLA's dot of it in that dtype would read it), else the weight's own dtype (bfloat16 weights
    widen exactly)."""
    if (not native or jnp.dtype(weight_dtype).name not in PANEL_DTYPES
            or jnp.dtype(compute_dtype).name not in PANEL_DTYPES):
        return None
    if jnp.dtype(compute_dtype) == jnp.bfloat16:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(weight_dtype)


def cpu_layer(layer, native: bool = False, compute_dtype=jnp.float32, keep_matrix: bool = True):
    """One unstacked layer dict (`paged_layers.per_layer_params`) with every plain matrix as a `MatrixWeight`:
    with `native`, panels in `panel_dtype` (float32 panels only; bfloat16 panels with the [K, N] matrix too when
    `keep_matrix`: XLA's bfloat16 dot runs the products of more rows, prefill), else the [K, N] matrix (a
    reshape, no transposed copy). Norms stay as they are; weight objects (quantized, LoRA) are left alone."""
    def weight(name, w):
        if name not in IN_AXES or not isinstance(w, jax.Array):
            return w
        dtype = panel_dtype(w.dtype, compute_dtype, native)
        if dtype is not None:
            return MatrixWeight.packed(w, IN_AXES[name], dtype=dtype, matrix=keep_matrix and dtype.itemsize < 4)
        return MatrixWeight.of(w, IN_AXES[name])
    return {name: weight(name, w) for name, w in layer.items()}


def cpu_lm_head_packed(lm_head, panels):
    """The lm_head [E, vocab] with native `panels` (`pack_matrix(lm_head)`, made by the caller under its jit) and
    lm_head itself as `matrix` (the model's array, not copied; a bfloat16 lm_head's prefill products use it)."""
    return MatrixWeight(lm_head, None, tuple(lm_head.shape[:1]), tuple(lm_head.shape[1:]), panels=panels)


def cpu_lm_head(lm_head, rows, one_row=None):
    """The lm_head [E, vocab] as a `MatrixWeight` with both layouts: `matrix` is lm_head itself (not copied) and
    `rows` its transpose [vocab, E] (``jnp.transpose(lm_head)``, made by the caller, under its jit). For a 16-bit
    lm_head the caller also passes `one_row`, its float32 copy, which becomes `matrix` (`one_row_float32`): one-row
    products then run in float32 (x and the 16-bit weights widened exactly, so the same products and float32 sums
    as a bfloat16 dot accumulating in float32), because XLA:CPU's one-row bfloat16 dot, even padded to 8 rows, is
    slower than its float32 one over twice the bytes (BENCHMARKS.md's Decode section)."""
    if one_row is None:
        return MatrixWeight(lm_head, rows, tuple(lm_head.shape[:1]), tuple(lm_head.shape[1:]))
    return MatrixWeight(one_row, rows, tuple(lm_head.shape[:1]), tuple(lm_head.shape[1:]), one_row_float32=True)


def widened_lm_head(lm_head) -> bool:
    """Whether `cpu_lm_head` keeps a float32 copy of this lm_head for one-row products (a 16-bit float array)."""
    return (isinstance(lm_head, jax.Array) and jnp.issubdtype(lm_head.dtype, jnp.floating)
            and lm_head.dtype.itemsize == 2)

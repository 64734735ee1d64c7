"""Dequantize-matmul for decode on TPU: `x @ W.T` with W stored as int8 or packed int4 plus scales (Pallas TPU).

Contract: `dequant_matmul(x, values, scales, *, bits, group_size, layer=None, block_n=None, block_k=None,
interpret=False)`

- x [M, K] float (the compute dtype: the product is taken in x's dtype with float32 accumulation);
- values: int8 [N, K] for bits=8, or int4 packed two per byte, uint8 (or int8) [N, K / 2] for bits=4 (input
  feature 2j in the low nibble of byte j, 2j + 1 in the high one, each a 4-bit two's complement value);
- scales [N, K / group_size] float: ``W[n, k] = q[n, k] * scales[n, k // group_size]`` (group_size == K: one
  scale per output row, "per channel");
- returns [M, N] in x's dtype: ``sum_k x[m, k] * W[n, k]``;
- `layer`: with an int32 scalar, values [L, N, ...] and scales [L, N, K / group_size] hold every layer's matrix
  and the kernel multiplies by layer `layer`'s, reading its blocks in place (the index is scalar-prefetched into
  SMEM and used by the BlockSpecs' index maps), as `paged_attention` reads a layer's pages.

Why it exists: the TPU compiler fuses an int8 convert into the matmul's operand, but not the int4 unpack of
`phi4_jax.quant` (masks, shifts, the sign fix, the group-scale broadcast): it writes the unpacked nibbles and a
full-size bf16 scale array (at batch 64 also the dequantized bf16 weight) first, into VMEM or HBM as its memory
plan decides, up to about 12x the ideal bytes (bench/quant_tpu_matmul.py, BENCHMARKS.md). This kernel reads each
packed byte once and dequantizes in VMEM. Inside a `lax.scan` over layers, pass the stacked weights and `layer`:
a layer's slice given to a kernel is first copied whole by XLA.

Blocking: grid (N / block_n, K / block_k), the K axis innermost ("arbitrary") with a float32 [M, block_n]
accumulator in VMEM. Each step DMAs one [block_n, block_k] block of int8 values (a [block_n, block_k / 2] block of
packed bytes for int4). x is one block (fetched once, sliced per K step in VMEM), and so are the block_n rows'
scales, passed transposed as [K / group_size, N] (lane-dense; the TPU's default layout of an [N, K / g] array
with K / g < 128 is column-major already, so the transpose costs nothing there), whose block index changes only
with N. In VMEM:
- per channel: the int8 block becomes the compute dtype (exact) and meets x on the MXU; the scales multiply the
  accumulated [M, block_n] result at the end (the scale factors out of the contraction);
- groups: each value's scale is selected by a one-hot matmul (the block's scales, transposed in VMEM to
  [block_n, K / g], times a [K / g, cols] 0/1 matrix picking the group of each column of this K step, exact at
  HIGHEST precision), the values are multiplied by it in float32, rounded to the compute dtype (as XLA's path
  rounds ``q * s``), and fed to the MXU;
- int4: the packed byte b (as int32, 0..255) holds the low nibble as ``(b << 28) >> 28`` and the high one as
  ``(b << 24) >> 28`` (arithmetic shifts sign-extend each 4-bit value). Rather than interleaving the unpacked
  nibbles along lanes, x is split outside the kernel into its even and odd input features ([M, K / 2] each, a
  few KB at decode sizes), and the low / high nibble blocks are contracted with them:
  ``x_even @ lo.T + x_odd @ hi.T``.

Shapes on TPU: block_n must divide N and be a multiple of 128; block_k must divide K, be a multiple of
group_size (groups) and of 128 (256 for int4, whose packed block is block_k / 2 lanes). M is any size up to
`MAX_X_BYTES` of x (the whole batch is one block: this is a decode kernel; prefill-sized M belongs to XLA).
`interpret=True` runs it in the TPU interpreter on a CPU, `interpret="hlo"` as XLA ops
(`kernels.pallas_compat.tpu_interpret_params`).

`dequant_matmul_reference` is the XLA statement of the same math (dequantize, then one matmul in x's dtype with
float32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.pallas_compat import tpu_interpret_params

BLOCK_N_TARGET = 512
BLOCK_K_TARGET = 2048
MAX_X_BYTES = 4 << 20        # x is loaded into VMEM once (double-buffered by the pipeline): decode-sized rows only


class DequantMatmulError(ValueError):
    """Shapes, dtypes or block sizes the dequantize-matmul kernel cannot take."""


def _as_int8(values):
    """Packed int4 bytes as int8 (uint8 reinterpreted bit for bit)."""
    return jax.lax.bitcast_convert_type(values, jnp.int8) if values.dtype == jnp.uint8 else values


def _unpack_int4_reference(packed):
    """[N, K/2] packed bytes -> int32 [N, K] in -8..7 (masks and the 4-bit two's complement, no shift tricks)."""
    u = jax.lax.bitcast_convert_type(_as_int8(packed), jnp.uint8).astype(jnp.int32)
    nibbles = jnp.stack([u & 0x0F, u >> 4], axis=-1)
    return jnp.where(nibbles >= 8, nibbles - 16, nibbles).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_matmul_reference(x, values, scales, *, bits: int, group_size: int):
    """XLA: dequantize W to x's dtype (``q * s`` rounded once), then ``x @ W.T`` with float32 accumulation."""
    q = _unpack_int4_reference(values) if bits == 4 else values.astype(jnp.int32)
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size).astype(jnp.float32) * scales.astype(jnp.float32)[..., None]
    w = w.reshape(n, k).astype(x.dtype)
    y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _largest_divisor(dim: int, target: int, multiple: int) -> int | None:
    """The largest multiple of `multiple` that divides `dim` and is at most `target` (None if there is none)."""
    for b in range(min(dim, target) // multiple * multiple, 0, -multiple):
        if dim % b == 0:
            return b
    return None


def choose_blocks(n: int, k: int, *, bits: int, group_size: int, block_n: int | None = None,
                  block_k: int | None = None) -> tuple[int, int]:
    """(block_n, block_k) for an [N, K] weight (the given ones checked, else the largest that fit the targets);
    raises DequantMatmulError when the shape has none the kernel can take."""
    k_multiple = 256 if bits == 4 else 128
    if group_size != k:
        k_multiple = k_multiple * group_size // _gcd(k_multiple, group_size)
    block_n = block_n or _largest_divisor(n, BLOCK_N_TARGET, 128)
    block_k = block_k or _largest_divisor(k, BLOCK_K_TARGET, k_multiple)
    if not block_n or n % block_n or block_n % 128:
        raise DequantMatmulError(f"N={n} needs a block_n that divides it and is a multiple of 128 (got {block_n})")
    if not block_k or k % block_k or block_k % k_multiple:
        raise DequantMatmulError(f"K={k} needs a block_k that divides it and is a multiple of {k_multiple} "
                                 f"({bits}-bit values, group size {group_size}); got {block_k}")
    return block_n, block_k


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _check(x, values, scales, bits: int, group_size: int) -> tuple[int, int, int]:
    if bits not in (4, 8):
        raise DequantMatmulError(f"bits must be 8 or 4, got {bits}")
    if x.ndim != 2 or values.ndim != 2 or scales.ndim != 2:
        raise DequantMatmulError(f"x, values and scales must be 2-D; got x {x.shape}, values {values.shape}, "
                                 f"scales {scales.shape}")
    m, k = x.shape
    n = values.shape[0]
    want_values = (n, k // 2 if bits == 4 else k)
    if tuple(values.shape) != want_values:
        raise DequantMatmulError(f"{bits}-bit values for x {x.shape} must be {want_values}, got {values.shape}")
    if bits == 8 and values.dtype != jnp.int8 or bits == 4 and values.dtype not in (jnp.uint8, jnp.int8):
        raise DequantMatmulError(f"{bits}-bit values must be {'int8' if bits == 8 else 'uint8/int8'}, "
                                 f"got {values.dtype}")
    if group_size <= 0 or k % group_size or tuple(scales.shape) != (n, k // group_size):
        raise DequantMatmulError(f"scales {scales.shape} do not fit groups of {group_size} over K={k} for N={n}")
    return m, n, k


def _int4_nibbles(packed):
    """Block of packed bytes (uint8, or int8) -> (low, high) nibbles as int32, each sign-extended by shifting
    its top bit into bit 31 and back (arithmetic shift)."""
    b = packed.astype(jnp.int32)
    return (b << 28) >> 28, (b << 24) >> 28


def _group_scales(s_ref, cols: int, per_col: int, kstep):
    """[block_n, cols] float32: the scale of each column of this K step (column c is in group
    kstep * cols / per_col + c // per_col), picked from the row block's scales ([K / g, block_n], lane-dense,
    transposed in VMEM) by a one-hot matmul (exact: a 0/1 matrix at HIGHEST precision)."""
    s = s_ref[...].astype(jnp.float32).T                                      # [block_n, K / g]
    groups = s.shape[1]
    g_idx = jax.lax.broadcasted_iota(jnp.int32, (groups, cols), 0)
    c_idx = jax.lax.broadcasted_iota(jnp.int32, (groups, cols), 1)
    onehot = (g_idx == kstep * (cols // per_col) + c_idx // per_col).astype(jnp.float32)
    return jnp.dot(s, onehot, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def _dot_t(x, w):
    """x [M, c] . w [block_n, c] over c -> [M, block_n] float32."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(layer_ref, *refs, bits: int, per_channel: bool, group_size: int, block_k: int):
    del layer_ref                                        # used by the index maps only
    if bits == 4:
        xe_ref, xo_ref, v_ref, s_ref, o_ref, acc_ref = refs
    else:
        x_ref, v_ref, s_ref, o_ref, acc_ref = refs
    kstep = pl.program_id(1)

    @pl.when(kstep == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    dtype = o_ref.dtype
    if bits == 8:
        x = x_ref[:, pl.ds(pl.multiple_of(kstep * block_k, block_k), block_k)]     # x stays in VMEM
        q = v_ref[...].astype(jnp.float32)
        if not per_channel:
            q = q * _group_scales(s_ref, q.shape[1], group_size, kstep)
        acc_ref[...] += _dot_t(x, q.astype(dtype))
    else:
        cols = block_k // 2
        at = pl.ds(pl.multiple_of(kstep * cols, cols), cols)
        lo, hi = _int4_nibbles(v_ref[...])
        lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
        if not per_channel:
            scale = _group_scales(s_ref, cols, group_size // 2, kstep)
            lo, hi = lo * scale, hi * scale
        acc_ref[...] += _dot_t(xe_ref[:, at], lo.astype(dtype)) + _dot_t(xo_ref[:, at], hi.astype(dtype))

    @pl.when(kstep == pl.num_programs(1) - 1)
    def _finish():
        acc = acc_ref[...]
        if per_channel:
            acc = acc * s_ref[...].astype(jnp.float32)          # [1, block_n]: the per-channel scales
        o_ref[...] = acc.astype(o_ref.dtype)


def dequant_matmul(x, values, scales, *, bits: int, group_size: int, layer=None, block_n: int | None = None,
                   block_k: int | None = None, interpret=False):
    """The Pallas TPU kernel (see the module docstring). With `layer` (an int32 scalar, traced or not), `values`
    and `scales` are every layer's, [L, N, ...], and the kernel reads layer `layer`'s blocks in place: inside a
    `lax.scan` over layers, a layer's slice handed to a kernel would first be copied whole by XLA."""
    if layer is None:
        values, scales = values[None], scales[None]
        layer = 0
    elif values.ndim != 3 or scales.ndim != 3 or values.shape[0] != scales.shape[0]:
        raise DequantMatmulError(f"with `layer`, values and scales must be [layers, N, ...]; got values "
                                 f"{values.shape}, scales {scales.shape}")
    m, n, k = _check(x, values[0], scales[0], bits, group_size)
    if m * k * x.dtype.itemsize > MAX_X_BYTES:
        raise DequantMatmulError(f"x [{m}, {k}] ({x.dtype}) is larger than the {MAX_X_BYTES >> 20} MiB this decode "
                                 "kernel keeps in VMEM: use the XLA path for prefill-sized inputs")
    block_n, block_k = choose_blocks(n, k, bits=bits, group_size=group_size, block_n=block_n, block_k=block_k)
    params = tpu_interpret_params(interpret)
    per_channel = group_size == k
    grid = (n // block_n, k // block_k)
    cols = block_k // 2 if bits == 4 else block_k
    xs = (x[:, 0::2], x[:, 1::2]) if bits == 4 else (x,)
    x_specs = [pl.BlockSpec((m, x.shape[1] // len(xs)), lambda i, j, layer: (0, 0))] * len(xs)
    v_spec = pl.BlockSpec((None, block_n, cols), lambda i, j, layer: (layer[0], i, j))
    # Scales go in as [L, K / g, N]: lane-dense (N along lanes), and the TPU's default layout of an [N, K / g] array
    # with K / g < 128 is column-major already, so the transpose costs nothing there.
    scales = jnp.swapaxes(scales, -1, -2)
    s_spec = pl.BlockSpec((None, k // group_size, block_n), lambda i, j, layer: (layer[0], 0, i))
    kernel = functools.partial(_kernel, bits=bits, per_channel=per_channel, group_size=group_size,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=[*x_specs, v_spec, s_spec],
            out_specs=pl.BlockSpec((m, block_n), lambda i, j, layer: (0, i)),
            scratch_shapes=[pltpu.VMEM((m, block_n), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=params,
        name=f"dequant_matmul_int{bits}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), *xs, values, scales)

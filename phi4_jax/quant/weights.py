"""Weight-only int8 / int4 quantization: the `QuantizedWeight` weight object and the quantizer.

Layout. A quantized matrix is stored output-major, as PyTorch and GGUF store a Linear weight: ``values``
``[*layers, N, K]`` (N = the output features, flattened; K = the input features, flattened; for the embedding
N is the vocabulary and K the embedding width), with one scale per group of ``group_size`` consecutive input
features: ``scales [*layers, N, K // group_size]``, and optionally an additive ``offsets`` of the same shape
(asymmetric groups, as llama.cpp's Q4_K has). A value is ``w[n, k] = values[n, k] * scales[n, k // g] (+
offsets[n, k // g])``. int8 values are ``int8``; int4 values (-8..7) are packed two per byte into ``uint8``
``[*layers, N, K // 2]`` (input feature 2j in the low nibble, 2j + 1 in the high one): XLA on CPU keeps
``jnp.int4`` at one byte per value, so packing by hand is what makes int4 weights half the size of int8 on every
backend. Per-channel int8 is the case ``group_size == K`` (one scale per output channel).

Our quantizer (`quantize_matrix`) is symmetric absmax: per group ``scale = max|w| / qmax`` (qmax 127 for int8,
7 for int4) and ``q = clip(round(w / scale), -qmax - 1, qmax)``, so ``|w - q * scale| <= scale / 2``.

Products. `QuantizedWeight.linear_einsum` is what `phi4_jax.model.linear.linear` calls: per-channel int8 runs
the einsum on the int8 values converted to the compute dtype and scales the output channels afterwards (the
scale factors out of the contraction); group-wise weights are dequantized to the compute dtype inside the jitted
step, one matrix (one layer's, under `lax.scan`) at a time, and fed to the einsum. The TPU compiler fuses the
int8 convert into the matmul (each byte read once) but not the int4 unpack and group-scale broadcast, which it
writes out first (bench/quant_tpu_matmul.py; the GPU compiler's choice is unmeasured). A matrix with more than
`MAX_DEQUANTIZED_VALUES` values (phi-4's 100352 x 5120 lm_head) is multiplied in slices of output rows under
`lax.map`, so its transient is a slice. On a TPU, decode-sized products can instead go to the Pallas
dequantize-matmul kernel (`kernels.dequant_matmul`), opt-in through `phi4_jax.quant.tpu_kernel.use_dequant_kernel`.
Only the int8/int4 values and their scales are held between steps: no full-precision copy of the weights exists
outside that bounded transient. `take_rows` gathers embedding rows and dequantizes only those. The leaves keep
the stacked ``layers`` axis first, so `lax.scan` slices a `QuantizedWeight` like an array.

Why not qwix: qwix's post-training quantization (``qwix.quantize_model`` with a ``PtqProvider``) quantizes an NNX
model that already holds its full-precision weights (it clones the module and runs it once), and it finds the
weights by intercepting ``dot_general``/``einsum`` calls whose operand is a parameter attribute of the module
being called. Our forward is a jitted pure function over a parameter dict, scanned over stacked layers, so the
operands it sees are scan slices that qwix cannot attribute to a parameter; and loading through it would need the
14B model in full precision first, which the streaming loader (`phi4_jax.checkpoint.quantized_load`) exists to
avoid. It also knows nothing of llama.cpp's block formats. The small amount needed is written here instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZE_MODES = {"int8": 8, "int4": 4}
DEFAULT_INT4_GROUP_SIZE = 128
EMBED = "embed"
# Our matrices used through `linear`: name -> how many of its (per-layer) axes are input (contraction) axes; they
# come first in our layout ([*in, *out]). The embedding is [vocab, embed]: quantized as rows of the vocabulary.
LINEAR_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                     "down_proj": 1, "lm_head": 1}
# A product whose dequantized matrix would exceed this many values runs in slices of output rows (`lax.map`), so
# the transient full-precision slice stays bounded: the lm_head (100352 x 5120 for phi-4) is 16 slices.
MAX_DEQUANTIZED_VALUES = 1 << 25


class QuantizationError(ValueError):
    """An unknown quantize mode, a group size that does not fit a dimension, or a malformed quantized tensor."""


# ----------------------------------------------------------------------------- what gets quantized, and how

@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How `load_model(..., quantize=...)` quantizes: `mode` ("int8" or "int4"), `group_size` (None: per output
    channel for int8, `DEFAULT_INT4_GROUP_SIZE` for int4), `embed` ("int8" rows with a scale per row, the default;
    "same": the chosen mode and group size; None: left in float), and `lm_head` (True: quantized like the
    layers, the default; False: left in float)."""
    mode: str
    group_size: int | None = None
    embed: str | None = "int8"
    lm_head: bool = True

    def __post_init__(self):
        if self.mode not in QUANTIZE_MODES:
            raise QuantizationError(f"unknown quantize value {self.mode!r}: use one of {', '.join(QUANTIZE_MODES)}"
                                    " (or None for full precision)")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2
                                            or self.group_size % 2):
            raise QuantizationError(f"group_size must be a positive even integer, got {self.group_size!r}")
        if self.embed not in ("int8", "same", None):
            raise QuantizationError(f"embed quantization must be 'int8', 'same' or None, got {self.embed!r}")

    def scheme(self, name: str) -> tuple[int, int | None] | None:
        """(bits, group size or None = the whole input dimension) for parameter `name`, or None to keep it float."""
        if name == EMBED:
            if self.embed is None:
                return None
            if self.embed == "int8":
                return 8, None
        elif name == "lm_head" and not self.lm_head:
            return None
        elif name not in LINEAR_INPUT_AXES:
            return None
        bits = QUANTIZE_MODES[self.mode]
        return bits, self.group_size or (DEFAULT_INT4_GROUP_SIZE if bits == 4 else None)


def matrix_dims(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(layer axes, input shape, output shape) of our parameter `name` with (stacked) shape `shape`."""
    stacked = name not in (EMBED, "lm_head")
    lead, per_layer = (tuple(shape[:1]), tuple(shape[1:])) if stacked else ((), tuple(shape))
    if name == EMBED:
        return lead, per_layer[1:], per_layer[:1]
    n_in = LINEAR_INPUT_AXES[name]
    return lead, per_layer[:n_in], per_layer[n_in:]


def to_rows(name: str, w: np.ndarray) -> np.ndarray:
    """One layer (or the unstacked tensor) of our parameter `name`, in our layout, as [N, K] rows (a view where
    NumPy can make one)."""
    if name == EMBED:
        return w
    n_in = LINEAR_INPUT_AXES[name]
    k = math.prod(w.shape[:n_in])
    return w.reshape(k, -1).T


# ----------------------------------------------------------------------------- int4 packing, quantizing (NumPy)

def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in -8..7 along the last axis (even length) -> uint8, two per byte (even index low nibble)."""
    q = np.asarray(q, np.int8).view(np.uint8)
    return ((q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)).astype(np.uint8)


def unpack_int4(packed):
    """uint8 [..., K/2] -> int8 [..., K] in -8..7 (NumPy or JAX arrays)."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    lo = (packed & 0x0F).astype(xp.int8)
    hi = (packed >> 4).astype(xp.int8)
    nibbles = xp.stack([lo, hi], axis=-1)
    signed = (nibbles ^ 8) - 8  # 4-bit two's complement
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def check_group_size(group_size: int, k: int, what: str) -> None:
    if group_size <= 0 or k % group_size:
        raise QuantizationError(f"group size {group_size} does not divide the input dimension {k} of {what}")


def quantize_matrix(w: np.ndarray, bits: int, group_size: int | None = None, *, what: str = "a matrix"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantization of float rows `w` [N, K] in groups of `group_size` input features (None: the
    whole row, i.e. per output channel): (values int8 [N, K], or packed uint8 [N, K/2] for 4 bits; float32 scales
    [N, K / group_size])."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    group_size = group_size or k
    check_group_size(group_size, k, what)
    if bits == 4 and group_size % 2:
        raise QuantizationError(f"int4 groups must have an even size, got {group_size} for {what}")
    qmax = 2 ** (bits - 1) - 1
    groups = w.reshape(n, k // group_size, group_size)
    scales = np.max(np.abs(groups), axis=-1) / np.float32(qmax)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.rint(groups / safe[..., None]), -qmax - 1, qmax).astype(np.int8).reshape(n, k)
    return (pack_int4(q) if bits == 4 else q), scales.astype(np.float32)


def part_shapes(name: str, shape: tuple[int, ...], bits: int, group: int, offsets: bool) -> dict:
    """{"values": shape, "scales": shape[, "offsets": shape]} of our parameter `name` stored quantized."""
    lead, in_shape, out_shape = matrix_dims(name, shape)
    n, k = math.prod(out_shape), math.prod(in_shape)
    check_group_size(group, k, name)
    if bits not in (4, 8):
        raise QuantizationError(f"{bits}-bit weights are not supported (int8 or int4)")
    shapes = {"values": lead + (n, k // 2 if bits == 4 else k), "scales": lead + (n, k // group)}
    if offsets:
        shapes["offsets"] = shapes["scales"]
    return shapes


# ----------------------------------------------------------------------------- the weight object

@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "offsets"],
                   meta_fields=["bits", "group_size", "in_shape", "out_shape", "kernel_rows"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight-only quantized matrix (see the module docstring for the layout). Leaves: `values`, `scales`,
    `offsets` (None when symmetric), each with the stacked layer axes first. Static: `bits` (8 or 4),
    `group_size`, the per-layer `in_shape` / `out_shape` of the matrix in our parameter layout, and
    `kernel_rows`: products of at most that many rows use the Pallas TPU dequantize-matmul kernel when compiled
    for a TPU (0, the default: never; set by `phi4_jax.quant.tpu_kernel.use_dequant_kernel`)."""
    values: Any
    scales: Any
    offsets: Any
    bits: int
    group_size: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_rows: int = 0

    @property
    def k(self) -> int:
        return math.prod(self.in_shape)

    @property
    def per_channel(self) -> bool:
        """One scale per output channel and no offset: the scale can be applied after the matmul."""
        return self.group_size == self.k and self.offsets is None

    def int_values(self):
        """The integer values as int8 [..., K] (int4 unpacked)."""
        return unpack_int4(self.values) if self.bits == 4 else self.values

    def dequantize_rows(self, dtype):
        """The matrix as [*layers, N, K] in `dtype` (or gathered rows [..., K] for `take_rows`)."""
        q = self.int_values()
        g = q.shape[-1] // self.group_size
        q = q.reshape(*q.shape[:-1], g, self.group_size)
        w = q.astype(dtype) * self.scales[..., None].astype(dtype)
        if self.offsets is not None:
            w = w + self.offsets[..., None].astype(dtype)
        return w.reshape(*w.shape[:-2], g * self.group_size)

    def linear_einsum(self, equation: str, x, compute_dtype, **einsum_kwargs):
        """``einsum(equation, x, W)`` for W in our [*in, *out] layout, computed from the quantized values."""
        lhs, out = equation.replace(" ", "").split("->")
        xs, ws = lhs.split(",")
        n_in = len(self.in_shape)
        if len(ws) != n_in + len(self.out_shape):
            raise QuantizationError(f"einsum {equation!r} does not fit a weight of input shape {self.in_shape} "
                                    f"and output shape {self.out_shape}")
        w_in, w_out = ws[:n_in], ws[n_in:]
        if self.kernel_rows:
            from phi4_jax.quant.tpu_kernel import kernel_product

            y = kernel_product(self, equation, x, compute_dtype, einsum_kwargs)
            if y is not None:
                return y
        n = math.prod(self.out_shape)
        slices = _row_slices(n, self.k) if len(self.out_shape) == 1 and out.endswith(w_out) else 1
        if slices > 1 and self.values.ndim == 2:
            return self._sliced_einsum(equation, x, compute_dtype, slices, **einsum_kwargs)
        rows_equation = f"{xs},{w_out}{w_in}->{out}"
        full = self.values.shape[:-2] + self.out_shape + self.in_shape
        if self.bits == 8 and self.per_channel and out.endswith(w_out):
            y = jnp.einsum(rows_equation, x, self.values.reshape(full).astype(compute_dtype), **einsum_kwargs)
            return y * self.scales.reshape(self.scales.shape[:-2] + self.out_shape).astype(y.dtype)
        w = self.dequantize_rows(compute_dtype).reshape(full)
        return jnp.einsum(rows_equation, x, w, **einsum_kwargs)

    def _sliced_einsum(self, equation, x, compute_dtype, slices: int, **einsum_kwargs):
        """`linear_einsum` over `slices` equal blocks of output rows, one dequantized block at a time."""
        n = self.out_shape[0]
        split = lambda a: None if a is None else a.reshape(slices, n // slices, a.shape[-1])  # noqa: E731

        def one(parts):
            values, scales, offsets = parts
            block = dataclasses.replace(self, values=values, scales=scales, offsets=offsets,
                                        out_shape=(n // slices,))
            return block.linear_einsum(equation, x, compute_dtype, **einsum_kwargs)

        ys = jax.lax.map(one, (split(self.values), split(self.scales), split(self.offsets)))  # [slices, ..., n/s]
        ys = jnp.moveaxis(ys, 0, -2)
        return ys.reshape(*ys.shape[:-2], n)

    def take_rows(self, ids, compute_dtype):
        """Embedding rows ``W[ids]`` [..., K] in the compute dtype, dequantizing only the rows gathered."""
        rows = dataclasses.replace(
            self, values=jnp.take(self.values, ids, axis=0), scales=jnp.take(self.scales, ids, axis=0),
            offsets=None if self.offsets is None else jnp.take(self.offsets, ids, axis=0))
        return rows.dequantize_rows(compute_dtype)

    def dequantize(self, dtype=jnp.float32, *, name: str | None = None):
        """The full matrix in our parameter layout (for checks and tests; the model never calls this).
        `name` = EMBED for the embedding's [vocab, embed] layout."""
        rows = self.dequantize_rows(dtype)
        lead = rows.shape[:-2]
        if name == EMBED:
            return rows
        return jnp.swapaxes(rows, -1, -2).reshape(lead + self.in_shape + self.out_shape)



def _row_slices(n: int, k: int) -> int:
    """The fewest equal slices of n output rows with at most MAX_DEQUANTIZED_VALUES values each (1: no slicing)."""
    need = -(-n * k // MAX_DEQUANTIZED_VALUES)
    for c in range(max(1, need), n + 1):
        if n % c == 0:
            return c
    return n


def quantized_weight(name: str, values, scales, offsets, *, bits: int, group_size: int,
                     shape: tuple[int, ...]) -> QuantizedWeight:
    """A `QuantizedWeight` for our parameter `name` of (stacked) shape `shape`, with its shapes checked."""
    lead, in_shape, out_shape = matrix_dims(name, shape)
    n, k = math.prod(out_shape), math.prod(in_shape)
    check_group_size(group_size, k, name)
    expect = {"values": lead + (n, k // 2 if bits == 4 else k), "scales": lead + (n, k // group_size)}
    if offsets is not None:
        expect["offsets"] = expect["scales"]
    for field, want in expect.items():
        got = tuple(np.shape({"values": values, "scales": scales, "offsets": offsets}[field]))
        if got != want:
            raise QuantizationError(f"quantized {name} {field} has shape {got}, expected {want}")
    return QuantizedWeight(values, scales, offsets, bits, group_size, in_shape, out_shape)


def quantized_model(config, params: dict):
    """A `Phi4ForCausalLM` around `params` (nested dict; matrices may be `QuantizedWeight`s). Nothing random is
    materialized; float leaves and quantized ones are checked against the config's shapes."""
    from phi4_jax.model.decoder import abstract_model, flat_param_specs

    specs = flat_param_specs(config)
    model = abstract_model(config)
    for path, (shape, _) in specs.items():
        value = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
        if isinstance(value, QuantizedWeight):
            lead, in_shape, out_shape = matrix_dims(path[-1], shape)
            if (value.values.shape[:-2], value.in_shape, value.out_shape) != (lead, in_shape, out_shape):
                raise QuantizationError(f"quantized {'/'.join(path)} does not fit the config's shape {shape}")
        elif tuple(value.shape) != tuple(shape):
            raise QuantizationError(f"parameter {'/'.join(path)} has shape {tuple(value.shape)}, the config "
                                    f"needs {shape}")
        holder = model.layers[path[1]] if path[0] == "layers" else getattr(model, path[0])
        holder.set_value(value)
    return model


def abstract_quantized_params(config, options: QuantizeOptions, dtype) -> dict:
    """The parameter tree `load_model(..., quantize=...)` would build, as `jax.ShapeDtypeStruct`s (nothing
    allocated): for `jax.eval_shape` / ahead-of-time compilation and memory planning."""
    from phi4_jax.model.decoder import flat_param_specs

    params: dict = {"layers": {}}
    for path, (shape, _) in flat_param_specs(config).items():
        scheme = options.scheme(path[-1])
        if scheme is None:
            leaf = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        else:
            bits, group = scheme
            _, in_shape, out_shape = matrix_dims(path[-1], shape)
            group = group or math.prod(in_shape)
            parts = part_shapes(path[-1], shape, bits, group, False)
            leaf = QuantizedWeight(jax.ShapeDtypeStruct(parts["values"], jnp.uint8 if bits == 4 else jnp.int8),
                                   jax.ShapeDtypeStruct(parts["scales"], jnp.dtype(dtype)), None, bits, group,
                                   in_shape, out_shape)
        (params["layers"] if path[0] == "layers" else params)[path[-1]] = leaf
    return params

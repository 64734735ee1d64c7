"""llama.cpp GGUF weights kept quantized: Q8_0, Q4_0 and Q4_K blocks re-blocked into `QuantizedWeight` layout.

Used by ``convert_weights.py SRC.gguf DST --keep-quantized`` (a checkpoint in the quantized format of
`phi4_jax.checkpoint.quantized_load`) and by ``load_model("x.gguf", ...)`` (straight into memory). GGUF stores a
matrix as HF does, [out, in] rows of blocks along the input dimension, which is our quantized layout, so each
block maps onto one of our groups of 32 input features:

- Q8_0 (32 int8 values times one f16 scale) -> int8 values, group 32, scale = d. Exact.
- Q4_0 (32 4-bit q in 0..15, value d * (q - 8)) -> int4 values q - 8, group 32, scale = d. Exact.
- Q4_K (super-blocks of 256 values: f16 d and dmin, eight 32-value sub-blocks with 6-bit scale sc and min m,
  value d * sc * q - dmin * m) -> int4 values q - 8, group 32, scale = d * sc and an additive offset
  8 * d * sc - dmin * m. Exact up to float32 rounding of that offset (one float32 ulp of the weight).

A parameter stays quantized when every layer's tensor has a kept type of one family (Q8_0; or Q4_0/Q4_K, whose
offsets are zero for Q4_0 layers); any other type (F32, F16, BF16, Q5_K, Q6_K, ..., and parameters whose
layers mix families, as Q4_K_M files do for attn_v and ffn_down) is dequantized with `gguf.quants.dequantize`
and, in `load_model`, quantized by our own scheme when ``quantize=`` asks for it. Norms are F32 in GGUF files
and stay float.

The other way (``--to-gguf`` of such a checkpoint), `gguf_blocks` turns int8 / int4 rows in groups of 32 without
offsets back into Q8_0 / Q4_0 blocks exactly (the scales are float16 values already); anything else is
dequantized and quantized by `gguf.quants`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phi4_jax.checkpoint.gguf_convert import _open_reader, read_gguf_tensors
from phi4_jax.checkpoint.hf_files import ConversionError
from phi4_jax.checkpoint.hf_mapping import hf_pieces, hf_tensor_shapes
from phi4_jax.checkpoint.quantized_load import Block, ParamSource, row_blocks
from phi4_jax.quant.weights import EMBED, pack_int4

GROUP = 32
FAMILIES = {"Q8_0": "int8", "Q4_0": "int4", "Q4_K": "int4"}  # kept types -> our family


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) as float16 -> float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def reblock(qtype: str, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of GGUF blocks `raw` [rows, bytes] of type `qtype` (rows of `k` values) -> (values, scales, offsets
    or None) in `QuantizedWeight` layout, groups of 32."""
    rows = raw.shape[0]
    if qtype == "Q8_0":
        blocks = raw.reshape(rows, k // 32, 34)
        return (np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, k), _f16(blocks[..., :2]), None)
    if qtype == "Q4_0":
        blocks = raw.reshape(rows, k // 32, 18)
        qs = blocks[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8  # first 16 low, last 16 high
        return pack_int4(q.reshape(rows, k)), _f16(blocks[..., :2]), None
    if qtype == "Q4_K":
        blocks = raw.reshape(rows, k // 256, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc = blocks[..., 4:16].astype(np.uint8)
        scale6 = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
        min6 = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
        qs = blocks[..., 16:144].reshape(rows, k // 256, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, k // 256, 8, 32)  # sub-blocks 2c, 2c + 1
        scale = d[..., None] * scale6.astype(np.float32)
        offset = np.float32(8) * scale - dmin[..., None] * min6.astype(np.float32)
        values = pack_int4((q.astype(np.int8) - 8).reshape(rows, k))
        return values, scale.reshape(rows, k // 32), offset.reshape(rows, k // 32)
    raise ConversionError(f"GGUF type {qtype} is not kept quantized")


def gguf_blocks(qtype: str, weight) -> np.ndarray | None:
    """The inverse of `reblock` for Q8_0 and Q4_0: rows of a `QuantizedWeight` (NumPy leaves [n, ...]) as GGUF
    blocks [n, bytes], exactly (the same values and scales, no re-quantization), or None where the rows do not fit
    the block format: groups other than 32, offsets, int8 values into Q4_0, or scales that float16 does not hold
    exactly. (int4 rows fit Q8_0 as well: values -8..7 with the same scale.)"""
    if weight.group_size != GROUP or weight.offsets is not None or (qtype == "Q4_0" and weight.bits != 4):
        return None
    if qtype not in ("Q8_0", "Q4_0"):
        return None
    scales = np.asarray(weight.scales, np.float32)
    d = scales.astype(np.float16)
    if not np.array_equal(d.astype(np.float32), scales):
        return None
    q = np.asarray(weight.int_values(), np.int8)
    n, k = q.shape
    head = d.view(np.uint8).reshape(n, k // GROUP, 2)
    q = q.reshape(n, k // GROUP, GROUP)
    if qtype == "Q8_0":
        body = q.view(np.uint8)
    else:
        u = (q + 8).astype(np.uint8)  # 0..15
        body = u[..., :16] | (u[..., 16:] << 4)  # value j in the low nibble of byte j, value j + 16 in the high one
    return np.concatenate([head, body], axis=-1).reshape(n, -1)


def gguf_sources(path, *, keep_quantized: bool = True, check_tokenizer: bool = True) -> tuple:
    """(config, [ParamSource] of our parameters, GGUF type names) of a phi3 GGUF file (validated first, by the
    same checks as the dequantizing converter; `check_tokenizer=False` accepts an embedded tokenizer that is not
    phi-4's)."""
    import gguf

    path = Path(path)
    _, reader = _open_reader(path)
    config, tensors, types = read_gguf_tensors(path, check_tokenizer=check_tokenizer, reader=reader)
    raw = {t.name: t for t in reader.tensors}

    def parts_of(hf_name: str) -> list:
        """[(first HF row, GGUF tensor)] that hold HF tensor `hf_name` (three for separate attn_q/k/v)."""
        from phi4_jax.checkpoint.gguf_convert import SPLIT_QKV, gguf_name_for_hf

        name = gguf_name_for_hf(hf_name)
        if name in raw:
            return [(0, raw[name])]
        base = name.removesuffix("attn_qkv.weight")
        parts, row = [], 0
        for short in SPLIT_QKV:
            t = raw[f"{base}{short}.weight"]
            parts.append((row, t))
            row += int(t.shape[-1]) if len(t.shape) > 1 else 1
        return parts

    def qtype_of(t) -> str:
        return gguf.GGMLQuantizationType(t.tensor_type).name

    def piece_source(piece):
        """(GGUF tensor, first row in it) holding the rows of `piece` (a piece never spans two tensors)."""
        for start, t in reversed(parts_of(piece.hf_name)):
            if piece.r0 >= start:
                return t, piece.r0 - start
        raise ConversionError(f"{path.name}: no tensor holds rows of {piece.hf_name}")

    pieces: dict[tuple[str, ...], list] = {}
    for hf_name in hf_tensor_shapes(config):
        for piece in hf_pieces(hf_name, config):
            pieces.setdefault(piece.path, []).append(piece)

    from phi4_jax.model.decoder import flat_param_specs

    sources = []
    for param_path, (shape, _) in flat_param_specs(config).items():
        ps = pieces[param_path]
        kinds = {qtype_of(piece_source(p)[0]) for p in ps}
        families = {FAMILIES.get(k) for k in kinds}
        stored = None
        if keep_quantized and len(shape) - (param_path[0] == "layers") >= 2 and len(families) == 1 \
                and None not in families:
            bits = 8 if families == {"int8"} else 4
            stored = (bits, GROUP, "Q4_K" in kinds)
        sources.append(ParamSource(param_path, shape, stored, _blocks(ps, stored, tensors, piece_source, qtype_of)))
    return config, sources, types


def _blocks(pieces, stored, tensors, piece_source, qtype_of):
    def blocks():
        for piece in pieces:
            t, first = piece_source(piece)
            k = int(np.prod(tensors[piece.hf_name].shape[1:]))
            unstacked_matrix = piece.layer is None and piece.path[-1] in (EMBED, "lm_head")
            bounds = row_blocks(piece.rows, k * 4) if unstacked_matrix else [(0, piece.rows)]
            for a, b in bounds:
                rows = (a, b) if unstacked_matrix else (None, None)
                if stored is not None:
                    data = np.asarray(t.data[first + a:first + b])
                    yield Block(piece.layer, *rows, quantized=reblock(qtype_of(t), data, k))
                else:
                    value = tensors[piece.hf_name].read((piece.r0 + a, piece.r0 + b))
                    yield Block(piece.layer, *rows, value=piece.to_ours(value))
    return blocks


def gguf_to_quantized_checkpoint(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                                 compression: str | None = "zstd", progress: bool = True,
                                 check_tokenizer: bool = True) -> Path:
    """``convert_weights.py SRC.gguf DST --keep-quantized``: a checkpoint holding the file's Q8_0/Q4_0/Q4_K
    tensors re-blocked (quantized format of `phi4_jax.checkpoint.quantized_load`), the other tensors in `dtype`
    (default float32)."""
    from phi4_jax.checkpoint.hf_convert import _check_distinct
    from phi4_jax.checkpoint.hf_files import parse_dtype
    from phi4_jax.checkpoint.quantized_load import write_sources_checkpoint
    from phi4_jax.checkpoint.store import CheckpointError

    param_dtype = parse_dtype(dtype or "float32")
    _check_distinct(src, dst)
    config, sources, types = gguf_sources(src, check_tokenizer=check_tokenizer)
    try:
        return write_sources_checkpoint(sources, config, dst, param_dtype=param_dtype,
                                        source_dtype="gguf:" + ",".join(types), overwrite=overwrite,
                                        compression=compression, progress=progress,
                                        desc=f"converting {Path(src).name} (keeping quantized tensors)")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None

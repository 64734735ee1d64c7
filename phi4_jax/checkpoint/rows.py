"""A checkpoint read back as Hugging Face tensor rows, in bounded blocks, whether its parameters are stored plain or
quantized (a ``--keep-quantized`` checkpoint): what ``--to-hf`` and ``--to-gguf`` write from.

`CheckpointRows(src)` opens a checkpoint's arrays lazily (`quantized_load.open_checkpoint_parts`: shapes and chunk
files checked first). `blocks(name, row_bytes)` walks HF tensor `name` piece by piece (`hf_mapping.hf_pieces`, row
order) and yields `RowBlock`s of at most about CHUNK_TARGET_BYTES (counting `row_bytes` per row): a plain
parameter's block holds its float rows as stored (a view of one read: a layer, or a chunk of rows of the
embedding / lm_head); a quantized parameter's block holds those rows' integer values, scales and offsets as a
`QuantizedWeight` with NumPy leaves, which a writer either keeps (GGUF Q8_0 / Q4_0 blocks,
`gguf_quantized.gguf_blocks`) or dequantizes (`RowBlock.float_rows`, the same dequantization the model runs). A
quantized parameter's rows are HF rows already (`QuantizedWeight`'s [N, K] layout is PyTorch's), so no transpose
is needed. So memory is one piece (at most one layer of one parameter) plus a block, never a whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import numpy as np

from phi4_jax.checkpoint import store as ckpt
from phi4_jax.checkpoint.hf_files import ConversionError
from phi4_jax.checkpoint.hf_mapping import Piece, hf_pieces, hf_tensor_shapes
from phi4_jax.quant.weights import QuantizedWeight


def piece_read_blocks(piece: Piece, chunks: tuple[int, ...]) -> list[tuple[int, int, tuple]]:
    """[(first row, end row, index into our array)] covering the piece: one block per chunk along the row
    axis when the array is chunked along it (embed, lm_head), else one block of all rows."""
    layer = () if piece.layer is None else (piece.layer,)
    if piece.row_axis is None or chunks[len(layer) + piece.row_axis] >= piece.rows:
        return [(0, piece.rows, layer)]
    step = chunks[len(layer) + piece.row_axis]
    lead = layer + (slice(None),) * piece.row_axis
    return [(a, min(piece.rows, a + step), lead + (slice(a, min(piece.rows, a + step)),))
            for a in range(0, piece.rows, step)]


@dataclasses.dataclass
class RowBlock:
    """Consecutive rows of a HF tensor: `rows` (float, as stored, [n, *trailing]; maybe a strided view) for a plain
    parameter, or `weight` (a `QuantizedWeight` of those n rows, NumPy leaves) for a quantized one."""
    rows: np.ndarray | None = None
    weight: QuantizedWeight | None = None

    @property
    def n(self) -> int:
        return int(self.rows.shape[0]) if self.weight is None else int(self.weight.values.shape[0])

    def float_rows(self, dtype) -> np.ndarray:
        """The rows as a C-contiguous array in `dtype` (quantized rows dequantized in float32, then cast)."""
        if self.weight is None:
            return ckpt.contiguous_copy(self.rows, dtype)
        return np.ascontiguousarray(self.weight.dequantize_rows(np.float32), dtype=dtype)


class CheckpointRows:
    """A phi4_jax checkpoint opened for reading as HF tensor rows (see the module docstring). Errors are
    `ConversionError`s naming the checkpoint and the parameter."""

    def __init__(self, src: str | os.PathLike):
        from phi4_jax.checkpoint.quantized_load import open_checkpoint_parts

        try:
            self.config, self.meta = ckpt.read_checkpoint_config(src)
            params_dir = ckpt.params_directory(src, self.meta)
            self.arrays, self.quantized, self._read = open_checkpoint_parts(params_dir, self.config, self.meta)
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from None
        self.shapes = hf_tensor_shapes(self.config)

    def read(self, path: tuple[str, ...], index) -> np.ndarray:
        try:
            return self._read(path, index)
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from None

    def float_dtypes(self) -> list[str]:
        """The dtypes the float tensors are stored in (quantized ones count as the checkpoint's parameter dtype)."""
        names = {np.dtype(a.dtype.numpy_dtype).name for path, a in self.arrays.items()
                 if path[:-1] not in self.quantized}  # not a quantized parameter's values / scales / offsets
        if self.quantized:
            names.add(self.meta.get("param_dtype", self.config.param_dtype))
        return sorted(names)

    def quantized_scheme(self, name: str) -> list[tuple[int, int, bool] | None]:
        """(bits, group size, offsets) or None (plain) of each piece of HF tensor `name`, in row order."""
        return [self.quantized.get(p.path) for p in hf_pieces(name, self.config)]

    def blocks(self, name: str, row_bytes: int) -> Iterator[RowBlock]:
        """`RowBlock`s covering HF tensor `name` in row order, each at most ~CHUNK_TARGET_BYTES at `row_bytes`
        bytes per row."""
        shape = self.shapes[name]
        step = max(1, ckpt.CHUNK_TARGET_BYTES // max(1, row_bytes))
        for piece in hf_pieces(name, self.config):
            scheme = self.quantized.get(piece.path)
            if scheme is None:
                array = self.arrays[piece.path]
                chunks = array.chunk_layout.read_chunk.shape or array.shape
                for _, _, index in piece_read_blocks(piece, chunks):
                    rows = piece.to_hf(self.read(piece.path, index), shape[1:])
                    for r in range(0, rows.shape[0], step):
                        yield RowBlock(rows=rows[r:r + step])
                    del rows  # before the next read: one piece (or chunk of rows) in memory at a time
                continue
            bits, group, has_offsets = scheme
            k = math.prod(shape[1:])
            lead = () if piece.layer is None else (piece.layer,)
            for a in range(0, piece.rows, step):
                b = min(piece.rows, a + step)
                index = lead + (slice(a, b),)
                parts = [self.read(piece.path + (part,), index) for part in ("values", "scales")]
                offsets = self.read(piece.path + ("offsets",), index) if has_offsets else None
                yield RowBlock(weight=QuantizedWeight(parts[0], parts[1], offsets, bits, group, (k,), (b - a,)))

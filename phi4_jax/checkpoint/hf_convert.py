"""Streaming conversion between Hugging Face Phi3ForCausalLM checkpoints and this project's checkpoint.

Both directions walk the same description of the mapping, `hf_mapping.hf_pieces`: each HF tensor is a few
row ranges ("pieces"), each (a layer of) one of our parameters. `hf_to_checkpoint` reads each piece with
positioned reads (`phi4_jax.checkpoint.hf_files`), in blocks of whole chunks where the parameter is chunked
along the HF rows (embed_tokens, lm_head), and writes it into its slot of the Orbax arrays, copying (and
casting) one chunk-block at a time. `checkpoint_to_hf` reads the same pieces back and writes each one
straight into the safetensors file at its offset, with one transpose-and-cast copy of a bounded block of
rows. So peak memory is about one piece (at most half of gate_up_proj) plus a chunk, not the model, whatever
the shard layout. Output is safetensors shards of bounded size plus ``model.safetensors.index.json`` and
config.json. Everything is validated before any output is written, and output goes through
`atomic_directory`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from phi4_jax.checkpoint import store as ckpt
from phi4_jax.checkpoint.hf_files import (
    SAFETENSORS_CODES,
    ConversionError,
    SourceTensor,
    find_hf_checkpoint,
    parse_dtype,
    parse_size,
    validate_tensors,
)
from phi4_jax.checkpoint.hf_mapping import hf_pieces, hf_tensor_shapes
from phi4_jax.checkpoint.rows import CheckpointRows, piece_read_blocks
from phi4_jax.model.config import Phi4Config

# ----------------------------------------------------------------------------- HF -> ours

def _check_distinct(src, dst) -> None:
    """The output may not be, contain, or sit inside the source (--overwrite would delete the source)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise ConversionError(f"output {str(dst)!r} must be outside the source directory {str(src)!r}")


def _progress(total_bytes: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True)


def _check_free_space(directory: Path, needed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ConversionError(f"not enough disk space in {str(directory)!r}: need about {needed / 1e9:.2f} GB, "
                              f"{free / 1e9:.2f} GB free")


def hf_to_checkpoint(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                     compression: str | None = "zstd", progress: bool = True) -> Path:
    """Converts a HF Phi3ForCausalLM directory into a phi4_jax checkpoint at `dst` (streaming, atomic)."""
    out_dtype = parse_dtype(dtype)
    _check_distinct(src, dst)
    config, _, tensors = find_hf_checkpoint(src)
    validate_tensors(config, tensors)
    source_dtypes = sorted({t.dtype.name for t in tensors.values()})
    if out_dtype is None and len(source_dtypes) > 1:
        raise ConversionError(f"source tensors mix dtypes {source_dtypes}; pass --dtype to pick one")
    param_dtype = out_dtype if out_dtype is not None else next(iter(tensors.values())).dtype

    return write_converted_checkpoint(config, tensors, dst, param_dtype=param_dtype,
                                      source_dtype=",".join(source_dtypes), overwrite=overwrite,
                                      compression=compression, progress=progress,
                                      desc=f"converting {Path(src).name}")


def write_converted_checkpoint(config: Phi4Config, tensors: dict[str, SourceTensor], dst, *, param_dtype: np.dtype,
                               source_dtype: str, overwrite: bool = False, compression: str | None = "zstd",
                               progress: bool = True, desc: str = "converting") -> Path:
    """Writes validated HF-named source tensors (any reader: safetensors, PyTorch, GGUF) into a checkpoint at
    `dst`, piece by piece, atomically. `config.param_dtype` becomes `param_dtype`."""
    from phi4_jax.model.decoder import flat_param_specs

    config = config.replace(param_dtype=param_dtype.name)
    specs = {path: (shape, param_dtype) for path, (shape, _) in flat_param_specs(config).items()}
    total_out = sum(math.prod(s) for s, _ in specs.values()) * param_dtype.itemsize
    dst = Path(dst).absolute()
    _check_free_space(dst.parent, total_out)

    # One file after another (tensors of a file in header order), so reads stay mostly sequential.
    order = sorted(tensors.values(), key=lambda t: t.file.name)
    total_in = sum(t.nbytes for t in order)
    try:
        with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
            writer = ckpt.ParamArrayWriter(tmp / ckpt.PARAMS_DIR, specs, compression=compression,
                                           split_axes=_whole_param_split_axes(config))
            with _progress(total_in, desc, progress) as bar:
                for t in order:
                    _convert_tensor(t, config, writer)
                    bar.update(t.nbytes)
            writer.finish()
            ckpt.write_checkpoint_config(tmp, config, param_dtype=param_dtype.name, source_dtype=source_dtype)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return dst


def _whole_param_split_axes(config: Phi4Config) -> dict[tuple[str, ...], int]:
    """Parameters that are not per-layer (embed, lm_head, final_norm) are chunked along the axis their HF rows
    run along, so that a block of HF rows is whole chunks and they stream in blocks, both ways. (Stacked
    parameters keep the writer's default: one layer per chunk, cut along the first axis after it.)"""
    return {p.path: p.row_axis for name in hf_tensor_shapes(config) for p in hf_pieces(name, config)
            if p.layer is None and p.row_axis is not None}


def _convert_tensor(t: SourceTensor, config: Phi4Config, writer: ckpt.ParamArrayWriter) -> None:
    """Reads each piece of `t` (in row blocks where it streams) and writes it into its parameter's slot."""
    for piece in hf_pieces(t.name, config):
        for a, b, index in piece_read_blocks(piece, writer.chunks[piece.path]):
            writer.write(piece.path, piece.to_ours(t.read((piece.r0 + a, piece.r0 + b))), index)


# ----------------------------------------------------------------------------- ours -> HF

def _plan_shards(items: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int
                 ) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, current_bytes = [], [], 0
    for name, shape in items:
        nbytes = math.prod(shape) * itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def checkpoint_to_hf(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                     max_shard_size: str | int = "5GB", progress: bool = True) -> Path:
    """Writes a phi4_jax checkpoint back as a transformers directory (safetensors shards, index, config.json).
    A checkpoint holding quantized tensors (``--keep-quantized``) is dequantized (float32, then `dtype`, default
    the checkpoint's parameter dtype) block by block."""
    out_dtype = parse_dtype(dtype)
    _check_distinct(src, dst)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ConversionError("--max-shard-size must be positive")
    source = CheckpointRows(src)
    config = source.config
    if out_dtype is None:
        stored_dtypes = source.float_dtypes()
        if len(stored_dtypes) > 1:
            raise ConversionError(f"checkpoint parameters mix dtypes {stored_dtypes}; pass --dtype to pick one")
        out_dtype = np.dtype(stored_dtypes[0])
    if out_dtype.name not in SAFETENSORS_CODES:
        raise ConversionError(f"cannot write dtype {out_dtype.name} to safetensors")

    items = list(hf_tensor_shapes(config).items())
    shards = _plan_shards(items, out_dtype.itemsize, max_bytes)
    total = sum(math.prod(s) for _, s in items) * out_dtype.itemsize
    dst = Path(dst).absolute()
    _check_free_space(dst.parent, total)

    def write_tensor(f, name, shape):
        """HF tensor `name`, block by block (`CheckpointRows.blocks`), goes to the file in row order; the only
        copy is the cast (or dequantization) of at most ~CHUNK_TARGET_BYTES of HF rows at a time."""
        for rows in source.blocks(name, math.prod(shape[1:]) * out_dtype.itemsize):
            block = rows.float_rows(out_dtype)
            f.write(memoryview(block.reshape(-1).view(np.uint8)))
            yield block.nbytes
            del block, rows

    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    try:
        with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
            with _progress(total, f"writing {dst.name}", progress) as bar:
                for fname, entries in zip(names, shards):
                    with open(tmp / fname, "wb") as f:
                        f.write(_safetensors_header(entries, out_dtype))
                        for name, shape in entries:
                            for nbytes in write_tensor(f, name, shape):
                                bar.update(nbytes)
            if n > 1:
                weight_map = {name: fname for fname, entries in zip(names, shards) for name, _ in entries}
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            hf = config.to_hf_dict(torch_dtype=out_dtype.name)
            hf["dtype"] = out_dtype.name
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    return dst

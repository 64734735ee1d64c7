"""Streaming conversion between Hugging Face Phi3ForCausalLM checkpoints and this project's checkpoint.

`hf_to_checkpoint` reads each source tensor once (`phi4_jax.checkpoint.hf_files`), maps it to our parameters
(`phi4_jax.checkpoint.hf_mapping`), and writes each piece straight into its slot of the Orbax arrays, so peak
memory is a small multiple of the largest tensor, not the model. `checkpoint_to_hf` goes back, reading one
layer slice at a time, and writes safetensors shards of bounded size plus ``model.safetensors.index.json`` and
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
from phi4_jax.model.config import Phi4Config
from phi4_jax.checkpoint.hf_mapping import (MappingError, hf_tensor_shapes, hf_to_params_pieces, params_to_hf_tensors)
from phi4_jax.checkpoint.hf_files import ConversionError, SAFETENSORS_CODES, SourceTensor, find_hf_checkpoint, parse_dtype, parse_size, validate_tensors


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
    from phi4_jax.model.decoder import flat_param_specs

    out_dtype = parse_dtype(dtype)
    _check_distinct(src, dst)
    config, _, tensors = find_hf_checkpoint(src)
    validate_tensors(config, tensors)
    source_dtypes = sorted({t.dtype.name for t in tensors.values()})
    if out_dtype is None and len(source_dtypes) > 1:
        raise ConversionError(f"source tensors mix dtypes {source_dtypes}; pass --dtype to pick one")
    param_dtype = out_dtype if out_dtype is not None else next(iter(tensors.values())).dtype
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
            writer = ckpt.ParamArrayWriter(tmp / ckpt.PARAMS_DIR, specs, compression=compression)
            with _progress(total_in, f"converting {Path(src).name}", progress) as bar:
                for t in order:
                    _convert_tensor(t, config, writer, param_dtype)
                    bar.update(t.nbytes)
            writer.finish()
            ckpt.write_checkpoint_config(tmp, config, param_dtype=param_dtype.name, source_dtype=source_dtypes[0]
                                         if len(source_dtypes) == 1 else ",".join(source_dtypes))
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    except MappingError as e:
        raise ConversionError(str(e)) from None
    return dst


def contiguous_copy(x: np.ndarray, dtype=None) -> np.ndarray:
    """C-contiguous copy of x (in `dtype`). Transposed views are copied in column tiles: NumPy's plain copy of
    a transposed matrix walks memory with a large stride and is several times slower."""
    dtype = np.dtype(dtype) if dtype is not None else x.dtype
    if x.flags.c_contiguous or x.ndim < 2:
        return np.ascontiguousarray(x, dtype=dtype)
    view = x.view()
    try:
        view.shape = (x.shape[0], -1)  # raises instead of copying when the trailing axes cannot merge
    except AttributeError:
        return np.ascontiguousarray(x, dtype=dtype)
    out = np.empty(view.shape, dtype=x.dtype)
    tile = 64
    for j in range(0, view.shape[1], tile):
        out[:, j:j + tile] = view[:, j:j + tile]
    out = out.reshape(x.shape)
    return out if out.dtype == dtype else out.astype(dtype)


# Whole tensors stream in blocks of rows: embed_tokens rows are our embed rows; lm_head rows are our lm_head
# columns (hf_mapping: lm_head is stored transposed). Blocks follow the writer's chunks along that axis.
_STREAMED = {"model.embed_tokens.weight": (("embed",), False), "lm_head.weight": (("lm_head",), True)}


def _convert_tensor(t: SourceTensor, config: Phi4Config, writer: ckpt.ParamArrayWriter, dtype: np.dtype) -> None:
    if t.name in _STREAMED:
        path, transposed = _STREAMED[t.name]
        axis = 1 if transposed else 0
        block = writer.chunks[path][axis]
        for r0 in range(0, t.shape[0], block):
            r1 = min(t.shape[0], r0 + block)
            rows = t.read((r0, r1))
            if transposed:
                writer.write(path, contiguous_copy(rows.T, dtype), (slice(None), slice(r0, r1)))
            else:
                writer.write(path, contiguous_copy(rows, dtype), (slice(r0, r1),))
        return
    arr = t.read()
    if tuple(arr.shape) != t.shape:
        raise ConversionError(f"tensor {t.name!r} in {t.file.name} read with shape {arr.shape}, expected {t.shape}")
    for path, layer, piece in hf_to_params_pieces(t.name, arr, config):
        writer.write(path, contiguous_copy(piece, dtype), () if layer is None else (layer,))


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
    """Writes a phi4_jax checkpoint back as a transformers directory (safetensors shards, index, config.json)."""
    out_dtype = parse_dtype(dtype)
    _check_distinct(src, dst)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ConversionError("--max-shard-size must be positive")
    try:
        config, meta = ckpt.read_checkpoint_config(src)
        params_dir = ckpt.params_directory(src)
        stored = ckpt.check_params_metadata(params_dir, config)
        ckpt.check_chunk_files(params_dir, stored)
        arrays = ckpt.open_param_arrays(params_dir, list(stored))
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    stored_dtypes = sorted({np.dtype(a.dtype.numpy_dtype).name for a in arrays.values()})
    if out_dtype is None:
        if len(stored_dtypes) > 1:
            raise ConversionError(f"checkpoint parameters mix dtypes {stored_dtypes}; pass --dtype to pick one")
        out_dtype = np.dtype(next(iter(arrays.values())).dtype.numpy_dtype)
    if out_dtype.name not in SAFETENSORS_CODES:
        raise ConversionError(f"cannot write dtype {out_dtype.name} to safetensors")

    items = list(hf_tensor_shapes(config).items())
    shards = _plan_shards(items, out_dtype.itemsize, max_bytes)
    total = sum(math.prod(s) for _, s in items) * out_dtype.itemsize
    dst = Path(dst).absolute()
    _check_free_space(dst.parent, total)

    def read(path, index=()):
        try:
            return arrays[path][index].read().result()
        except Exception as e:
            raise ConversionError(f"cannot read parameter {'/'.join(path)!r} from {str(params_dir)!r}: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    streamed_paths = {path for path, _ in _STREAMED.values()}

    def get(path, layer):
        if path in streamed_paths:  # written block by block below; the mapping gets an empty stand-in
            return np.empty((0, 0), out_dtype)
        return read(path, () if layer is None else (layer,))

    def write_streamed(f, name, shape):
        path, transposed = _STREAMED[name]
        chunks = arrays[path].chunk_layout.read_chunk.shape or shape
        block = max(1, chunks[1] if transposed else chunks[0])
        for r0 in range(0, shape[0], block):
            r1 = min(shape[0], r0 + block)
            if transposed:
                rows = contiguous_copy(read(path, (slice(None), slice(r0, r1))).T, out_dtype)
            else:
                rows = contiguous_copy(read(path, (slice(r0, r1),)), out_dtype)
            f.write(memoryview(rows.reshape(-1).view(np.uint8)))
            yield rows.nbytes

    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    tensors = params_to_hf_tensors(get, config)
    try:
        with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
            with _progress(total, f"writing {dst.name}", progress) as bar:
                for fname, entries in zip(names, shards):
                    with open(tmp / fname, "wb") as f:
                        f.write(_safetensors_header(entries, out_dtype))
                        for name, shape in entries:
                            got_name, arr = next(tensors)
                            if name in _STREAMED and got_name == name:
                                for nbytes in write_streamed(f, name, shape):
                                    bar.update(nbytes)
                                continue
                            if got_name != name or tuple(arr.shape) != shape:  # mapping and plan disagree: a bug
                                raise ConversionError(f"internal error: expected {name} {shape}, "
                                                      f"got {got_name} {arr.shape}")
                            arr = contiguous_copy(arr, out_dtype)
                            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                            bar.update(arr.nbytes)
                            del arr
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

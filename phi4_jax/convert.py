"""Streaming conversion between Hugging Face Phi3ForCausalLM checkpoints and this project's checkpoint.

`hf_to_checkpoint` reads a transformers directory (config.json plus ``*.safetensors`` with or without
``model.safetensors.index.json``, or ``pytorch_model*.bin`` / ``*.pt``) one tensor at a time, splits fused
tensors (`phi4_jax.hf_mapping`), and writes each piece straight into its place in the Orbax checkpoint
(`phi4_jax.checkpoint.ParamArrayWriter`): peak memory is a small multiple of the largest tensor, never the
model. `checkpoint_to_hf` goes back, reading one layer slice at a time and writing safetensors shards of
bounded size plus ``model.safetensors.index.json`` and config.json.

Everything is validated before any output is written (config, every tensor's name, shape and dtype,
shard sizes against their headers, the index), and output goes through `checkpoint.atomic_directory`.

Safetensors files are read with plain positioned reads (the format is an 8-byte header length, a JSON
header, then raw little-endian data), not memory-mapped, so resident memory holds only the tensor being
converted and a truncated or corrupt file is reported by name before conversion starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from phi4_jax import checkpoint as ckpt
from phi4_jax.config import ConfigError, Phi4Config
from phi4_jax.hf_mapping import MappingError, hf_tensor_shapes, hf_to_params_pieces, params_to_hf_tensors


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
SAFETENSORS_DTYPES = {"F32": DTYPES["float32"], "BF16": DTYPES["bfloat16"], "F16": DTYPES["float16"]}
SAFETENSORS_CODES = {v.name: k for k, v in SAFETENSORS_DTYPES.items()}


def parse_dtype(name: str | None):
    """'float32' | 'bfloat16' | 'float16' | None -> numpy dtype or None."""
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"unsupported --dtype {name!r}: choose one of {sorted(DTYPES)}") from None


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1GiB', '12345' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConversionError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


# ----------------------------------------------------------------------------- reading sources

@dataclasses.dataclass
class SourceTensor:
    """One tensor of a source checkpoint, read on demand."""
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    reader: Callable[[int, int], np.ndarray]  # (first row, end row) -> rows [r0:r1] of the tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only rows [r0, r1) of its first axis."""
        r0, r1 = rows if rows is not None else (0, self.shape[0] if self.shape else 1)
        return self.reader(r0, r1)


def _read_at(path: Path, offset: int, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)  # not zero-filled, unlike bytearray
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ConversionError(f"{path.name}: unexpected end of file while reading (file truncated?)")
            got += n
    return buf


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, checked against the file's size; data is read lazily."""
    size = path.stat().st_size
    if size < 8:
        raise ConversionError(f"{path.name}: not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ConversionError(f"{path.name}: corrupt or truncated safetensors header "
                                  f"(header length {header_len}, file size {size})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path.name}: corrupt safetensors header: {e}") from None
    data_start = 8 + header_len
    tensors = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: corrupt safetensors header entry for tensor {name!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name!r} in {path.name} has dtype {code}, which cannot be converted "
                                  f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[code]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{path.name}: tensor {name!r} has data_offsets [{begin}, {end}] that do not "
                                  f"match its shape {list(shape)} and dtype {code}")
        data_end = max(data_end, end)

        def reader(r0, r1, path=path, offset=data_start + begin, dtype=dtype, shape=shape):
            if not shape:
                return _read_at(path, offset, dtype.itemsize).view(dtype).reshape(())
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            buf = _read_at(path, offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            return buf.view(dtype).reshape((r1 - r0, *shape[1:]))

        tensors[name] = SourceTensor(name, path, dtype, shape, reader)
    if data_start + data_end > size:
        raise ConversionError(f"{path.name} is truncated: its header needs {data_start + data_end} bytes, "
                              f"the file has {size}")
    return tensors


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_torch_file(path: Path) -> dict[str, SourceTensor]:
    """The tensors of a ``.bin`` / ``.pt`` state dict (memory-mapped where the file format allows)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path.name}: reading PyTorch files needs torch "
                              "(pip install 'phi4_jax[torch]')") from None
    torch_dtypes = {torch.float32: DTYPES["float32"], torch.bfloat16: DTYPES["bfloat16"],
                    torch.float16: DTYPES["float16"]}
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"cannot read PyTorch file {path.name} (corrupt or truncated?): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path.name} does not hold a state dict (got {type(state).__name__})")
    tensors = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"entry {name!r} in {path.name} is not a tensor")
        if t.dtype not in torch_dtypes:
            raise ConversionError(f"tensor {name!r} in {path.name} has dtype {str(t.dtype).removeprefix('torch.')}"
                                  f", which cannot be converted (supported: float32, bfloat16, float16)")
        tensors[name] = SourceTensor(name, path, torch_dtypes[t.dtype], tuple(t.shape),
                                     lambda r0, r1, t=t: _torch_to_numpy(t[r0:r1] if t.ndim else t))
    return tensors


def _load_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("weight_map is not a mapping of tensor names to file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        reason = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConversionError(f"corrupt index {index_path.name}: {reason}") from None
    return weight_map


def find_hf_checkpoint(src: str | os.PathLike) -> tuple[Phi4Config, dict, dict[str, SourceTensor]]:
    """Reads config and every tensor header of a HF directory: (config, config.json dict, {name: tensor})."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"source {str(src)!r} is not a directory")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"no config.json in {str(src)!r}")
    try:
        hf_config = json.loads(cfg_path.read_text())
        if not isinstance(hf_config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"config.json in {str(src)!r} is not valid JSON: {e}") from None
    try:
        config = Phi4Config.from_hf_dict(hf_config)
    except ConfigError as e:
        raise ConversionError(f"config.json: {e}") from None

    st_index = src / "model.safetensors.index.json"
    pt_index = src / "pytorch_model.bin.index.json"
    if st_index.is_file() or pt_index.is_file():
        index_path = st_index if st_index.is_file() else pt_index
        weight_map = _load_index(index_path)
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not (src / fname).is_file():
                raise ConversionError(f"{index_path.name} lists shard {fname!r}, which is missing")
    else:
        weight_map = None
        files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            files = sorted(p.name for p in src.glob("pytorch_model*.bin")) or \
                sorted(p.name for p in src.glob("*.bin")) or sorted(p.name for p in src.glob("*.pt"))
        if not files:
            raise ConversionError(f"no weights in {str(src)!r}: expected *.safetensors, pytorch_model*.bin or *.pt")

    tensors: dict[str, SourceTensor] = {}
    for fname in files:
        path = src / fname
        found = read_safetensors_header(path) if fname.endswith(".safetensors") else read_torch_file(path)
        for name, t in found.items():
            if name in tensors:
                raise ConversionError(f"tensor {name!r} appears in both {tensors[name].file.name} and {fname}")
            tensors[name] = t
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise ConversionError(f"index {index_path.name} maps tensor {name!r} to {fname}, "
                                      "but that file does not hold it")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise ConversionError(f"tensor {unlisted[0]!r} in {tensors[unlisted[0]].file.name} is not listed in "
                                  f"{index_path.name}")
    return config, hf_config, tensors


def validate_tensors(config: Phi4Config, tensors: dict[str, SourceTensor]) -> None:
    """Missing, extra or misshapen tensors each raise a ConversionError naming the (first) tensor."""
    expected = hf_tensor_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"missing tensor {missing[0]!r}{more}")
    extra = [n for n in tensors if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"unexpected tensor {extra[0]!r} in {tensors[extra[0]].file.name}{more}: "
                              "not part of a Phi3ForCausalLM with this config")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ConversionError(f"tensor {name!r} in {tensors[name].file.name} has shape "
                                  f"{list(tensors[name].shape)}, expected {list(shape)} from config.json")


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


# ----------------------------------------------------------------------------- HF -> ours

def hf_to_checkpoint(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                     compression: str | None = "zstd", progress: bool = True) -> Path:
    """Converts a HF Phi3ForCausalLM directory into a phi4_jax checkpoint at `dst` (streaming, atomic)."""
    from phi4_jax.model import flat_param_specs

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

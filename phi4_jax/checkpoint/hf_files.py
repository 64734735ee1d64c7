"""Reading Hugging Face checkpoint files lazily: safetensors shards (with or without an index) and PyTorch files.

`find_hf_checkpoint(src)` returns the config and a `SourceTensor` per tensor name; a `SourceTensor` reads its
bytes (or a row range) only when asked. Safetensors files are read with plain positioned reads (the format is a
JSON header, then raw little-endian data), not memory-mapped, so resident memory stays bounded and a truncated
or corrupt file is reported by name before conversion starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from phi4_jax.checkpoint.hf_mapping import hf_tensor_shapes
from phi4_jax.model.config import DTYPES, ConfigError, Phi4Config


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


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
        return t.view(torch.int16).numpy().view(DTYPES["bfloat16"])
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

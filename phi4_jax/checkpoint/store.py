"""This project's model checkpoint on disk: layout, atomic writes, TensorStore array I/O, metadata.

A checkpoint directory holds ``config.json`` (the architecture plus a ``phi4_jax`` block: format version,
parameter dtype) and ``params/``, an Orbax PyTree checkpoint of the parameter dict. The converter writes
``params/`` tensor by tensor with TensorStore (`ParamArrayWriter`), in the zarr layout Orbax's own array
handler uses, then writes Orbax's ``_METADATA``; so plain `ocp.StandardCheckpointer` restores it, with any
shardings. Whole checkpoints are written into a hidden temporary directory beside the destination, fsynced, and
moved into place at the end (`atomic_directory`), so a crash never leaves something that looks like a checkpoint,
and overwriting never leaves the destination missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from phi4_jax.model.config import ConfigError, Phi4Config

FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
META_KEY = "phi4_jax"
_log = logging.getLogger(__name__)
CHUNK_TARGET_BYTES = 64 << 20  # zarr chunks of at most ~64 MB: bounded write buffers, parallel (de)compression


class CheckpointError(Exception):
    """A checkpoint directory that is missing, incomplete or corrupt, or an output that cannot be written."""


# ----------------------------------------------------------------------------- atomic output directories

_TMP, _BACKUP = ".tmp-", ".old-"


def _sibling(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}{kind}{uuid.uuid4().hex[:8]}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file and directory under `root` (directories after their contents), then `root`."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _recover_backups(dst: Path) -> None:
    """Finishes what a crash inside `atomic_directory` left behind: a backup of an overwritten `dst`.

    If `dst` is missing, the crash came between moving the old directory aside and moving the new one in:
    the (newest) backup goes back to `dst`. If `dst` exists, the new directory was already in place and the
    backup is stale: it is deleted. Either way a warning says what happened.
    """
    backups = sorted(dst.parent.glob(f".{dst.name}{_BACKUP}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    backups = [b for b in backups if b.is_dir()]
    if not backups:
        return
    if not dst.exists():
        os.rename(backups.pop(0), dst)
        _fsync_path(dst.parent)
        _log.warning("restored %s from the backup an interrupted overwrite left behind", dst)
    for stale in backups:
        shutil.rmtree(stale)
        _log.warning("deleted %s, a stale backup left behind by an interrupted overwrite of %s", stale, dst)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `dst`; on success it becomes `dst`, on any error it is deleted.

    Refuses an existing non-empty `dst` unless `overwrite`. On success every file and directory written is
    fsynced, then with `overwrite` the old `dst` is renamed to a hidden backup, the new directory renamed to
    `dst`, the parent directory fsynced, and only then the backup deleted. So `dst` is never missing: if the
    second rename fails the backup is renamed back at once, and if the process dies between the renames the
    next `atomic_directory(dst)` restores the backup (a stale backup after a completed swap is deleted).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {str(dst)!r} exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _recover_backups(dst)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {str(dst)!r} is not empty (pass --overwrite to replace it)")
    tmp = _sibling(dst, _TMP)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        backup = None
        if dst.exists() and any(dst.iterdir()):
            backup = _sibling(dst, _BACKUP)
            os.rename(dst, backup)
        try:
            os.rename(tmp, dst)  # replaces an empty `dst` directory atomically (POSIX rename)
        except BaseException:
            if backup is not None:
                os.rename(backup, dst)
            raise
        finally:
            _fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup)


# ----------------------------------------------------------------------------- writing params/ (streaming)

def _param_name(path: tuple[str, ...]) -> str:
    return ".".join(path)  # Orbax names a parameter's directory by its key path joined with "."


def chunk_shape(shape: tuple[int, ...], itemsize: int, *, stacked: bool, split_axis: int) -> tuple[int, ...]:
    """Chunks of at most ~CHUNK_TARGET_BYTES: one layer per chunk for stacked params, split along `split_axis`."""
    chunk = list(shape)
    if stacked:
        chunk[0] = 1
    if split_axis < len(chunk):
        nbytes = math.prod(chunk) * itemsize
        parts = max(1, math.ceil(nbytes / CHUNK_TARGET_BYTES))
        chunk[split_axis] = max(1, math.ceil(chunk[split_axis] / parts))
    return tuple(chunk)


def contiguous_copy(x: np.ndarray, dtype=None) -> np.ndarray:
    """x as a C-contiguous array in `dtype`: x itself when it already is one, else one copy (cast included).

    Transposed views are copied in column tiles: NumPy's plain copy of a transposed matrix walks memory with a
    large stride and is several times slower. Each tile is cast while it is copied.
    """
    dtype = np.dtype(dtype) if dtype is not None else x.dtype
    if x.flags.c_contiguous or x.ndim < 2:
        return np.ascontiguousarray(x, dtype=dtype)
    view = x.view()
    try:
        view.shape = (x.shape[0], -1)  # raises instead of copying when the trailing axes cannot merge
    except AttributeError:
        return np.ascontiguousarray(x, dtype=dtype)
    out = np.empty(view.shape, dtype=dtype)
    tile = 64
    for j in range(0, view.shape[1], tile):
        out[:, j:j + tile] = view[:, j:j + tile]
    return out.reshape(x.shape)


class ParamArrayWriter:
    """Creates the zarr arrays of an Orbax PyTree checkpoint and writes them piece by piece.

    `specs` is {key path: (shape, numpy dtype)}. Chunks are cut along `split_axes[path]` (default: the first
    axis after the layer axis of stacked parameters, axis 0 of the others); `chunks[path]` is each array's
    chunk shape. Call `write(path, value, index)` as pieces arrive (a layer of a stacked parameter, a block of
    a whole one), then `finish()` to write Orbax's metadata. A write is copied (and cast) one block of
    chunks at a time and waited for, so it holds at most one chunk-block copy of `value` besides `value`
    itself. Only whole chunks are written: the rows of a piece that covers part of a chunk are kept in that
    chunk's buffer until the pieces that follow complete it (a partial write would make TensorStore read,
    decode, merge and re-encode the chunk each time, quadratic in the pieces), so at most one buffered chunk
    per array and layer is held between writes, and nothing is read back unless a chunk is left incomplete:
    `finish()` writes the rows it got (reading the chunk back once).
    """

    def __init__(self, params_dir: str | os.PathLike, specs: dict[tuple[str, ...], tuple[tuple[int, ...], Any]],
                 *, compression: str | None = "zstd", split_axes: dict[tuple[str, ...], int] | None = None):
        import tensorstore as ts

        self.dir = Path(params_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.specs = specs
        self.split_axes = {path: (split_axes or {}).get(path, 1 if path[0] == "layers" else 0) for path in specs}
        self.chunks: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._arrays = {}
        # (path, index but the split axis, chunk start) -> _PartialChunk: the rows written so far of a chunk
        self._partial: dict[tuple, _PartialChunk] = {}
        if compression not in ("zstd", None, "none"):
            raise CheckpointError(f"unknown compression {compression!r}: use 'zstd' or 'none'")
        compressor = {"id": "zstd", "level": 1} if compression == "zstd" else None
        # No fsync per chunk (slow, serializes compression and I/O); `atomic_directory` fsyncs every file once.
        context = ts.Context({"file_io_sync": False})
        for path, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            chunks = chunk_shape(shape, dtype.itemsize, stacked=path[0] == "layers",
                                 split_axis=self.split_axes[path])
            self.chunks[path] = chunks
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self.dir / _param_name(path))},
                "metadata": {"shape": list(shape), "chunks": list(chunks),
                             "compressor": compressor, "dimension_separator": "."},
            }
            self._arrays[path] = ts.open(spec, create=True, delete_existing=True, context=context,
                                         dtype=ts.dtype(dtype.name)).result()

    def write(self, path: tuple[str, ...], value: np.ndarray, index: tuple = ()) -> None:
        """Writes `value` (any strides, any float dtype; not modified afterwards) into array `path` at `index`:
        leading ints (a layer) and/or slices, one per leading axis; () is the whole array."""
        arr, shape = self._arrays[path], self.specs[path][0]
        dtype = np.dtype(arr.dtype.numpy_dtype)
        value = np.asarray(value)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        axis = self.split_axes[path]
        if axis >= len(shape) or isinstance(index[axis], int):
            blocks = [(index, value)]
        else:
            start, stop, _ = index[axis].indices(shape[axis])
            value_axis = axis - sum(isinstance(i, int) for i in index[:axis])
            step = self.chunks[path][axis]
            bounds = [start, *range((start // step + 1) * step, stop, step), stop]
            blocks = [(index[:axis] + (slice(a, b),) + index[axis + 1:],
                       value[(slice(None),) * value_axis + (slice(a - start, b - start),)])
                      for a, b in zip(bounds[:-1], bounds[1:])]
        for block_index, block in blocks:
            if axis < len(shape) and not isinstance(index[axis], int):
                a, b, _ = block_index[axis].indices(shape[axis])
                step = self.chunks[path][axis]
                c0 = a // step * step
                c1 = min(c0 + step, shape[axis])
                key = (path, self._region(block_index, axis, shape), c0)
                if (a, b) != (c0, c1):
                    self._buffer(key, path, block_index, axis, value_axis, block, a, b, c0, c1, dtype)
                    continue
                self._partial.pop(key, None)   # a whole-chunk write replaces rows buffered for that chunk
            block = contiguous_copy(block, dtype)
            arr[block_index].write(block, can_reference_source_data_indefinitely=True).result()
            del block

    @staticmethod
    def _region(block_index: tuple, axis: int, shape: tuple[int, ...]) -> tuple:
        """The block's index on every axis but the split one, normalized (slice(None) == slice(0, n))."""
        return tuple(i if isinstance(i, int) else i.indices(n)[:2]
                     for d, (i, n) in enumerate(zip(block_index, shape)) if d != axis)

    def _buffer(self, key, path, block_index, axis, value_axis, block, a, b, c0, c1, dtype) -> None:
        """Copies rows [a, b) of the chunk starting at c0 into its buffer; writes the chunk once every row of it
        has been written (rows written again replace the earlier ones)."""
        chunk = self._partial.get(key)
        if chunk is None:
            buffer_shape = list(block.shape)
            buffer_shape[value_axis] = c1 - c0
            chunk = self._partial[key] = _PartialChunk(
                np.zeros(buffer_shape, dtype), np.zeros(c1 - c0, bool),
                block_index[:axis] + (slice(c0, c1),) + block_index[axis + 1:], value_axis, c0)
        chunk.buffer[(slice(None),) * value_axis + (slice(a - c0, b - c0),)] = block
        chunk.written[a - c0:b - c0] = True
        if chunk.written.all():
            del self._partial[key]
            self._arrays[path][chunk.index].write(chunk.buffer, can_reference_source_data_indefinitely=True).result()

    def finish(self) -> None:
        """Writes the rows written of any chunk left incomplete (only those: each such write reads the chunk back),
        then Orbax's metadata. (Files are not fsynced here: `atomic_directory` fsyncs the whole output.)"""
        for key, chunk in list(self._partial.items()):
            path = key[0]
            axis = self.split_axes[path]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], chunk.written.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):   # each run of written rows
                rows = chunk.index[:axis] + (slice(chunk.c0 + a, chunk.c0 + b),) + chunk.index[axis + 1:]
                self._arrays[path][rows].write(chunk.buffer[(slice(None),) * chunk.value_axis + (slice(a, b),)]
                                               ).result()
            del self._partial[key]
        write_pytree_metadata(self.dir, list(self.specs))


@dataclass
class _PartialChunk:
    """A chunk some rows of which `ParamArrayWriter.write` got: its buffer, which rows are written, where it goes
    (`index`), the split axis's position in the buffer and the chunk's first row."""
    buffer: np.ndarray
    written: np.ndarray
    index: tuple
    value_axis: int
    c0: int


def write_pytree_metadata(params_dir: str | os.PathLike, paths: list[tuple[str, ...]]) -> None:
    """Writes the Orbax PyTree ``_METADATA`` (and ``_CHECKPOINT_METADATA``) for zarr2, non-OCDBT arrays.

    Every leaf is recorded as a NumPy array: restoring without a target gives NumPy arrays, and restoring
    with `jax.ShapeDtypeStruct` targets (with shardings) gives `jax.Array`s placed straight onto devices.
    """
    params_dir = Path(params_dir)
    tree = {}
    for path in paths:
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2 = dict key
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    (params_dir / "_METADATA").write_text(json.dumps(meta))
    now = time.time_ns()
    ckpt_meta = {"item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
                 "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
                 "commit_timestamp_nsecs": now, "custom_metadata": {}}
    (params_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(ckpt_meta))


def write_checkpoint_config(ckpt_dir: str | os.PathLike, config: Phi4Config, *, param_dtype: str,
                            source_dtype: str | None = None) -> None:
    hf = config.to_hf_dict(torch_dtype=param_dtype)
    hf[META_KEY] = {"format_version": FORMAT_VERSION, "params_dir": PARAMS_DIR, "param_dtype": param_dtype,
                    "source_dtype": source_dtype or param_dtype}
    (Path(ckpt_dir) / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")


# ----------------------------------------------------------------------------- reading

def read_checkpoint_config(path: str | os.PathLike, **runtime: Any) -> tuple[Phi4Config, dict]:
    """(config, the ``phi4_jax`` metadata dict) of a checkpoint directory. `runtime` sets runtime fields."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a phi4_jax checkpoint: no {CONFIG_FILE}")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(cfg_file)!r} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{str(cfg_file)!r} does not hold a JSON object")
    meta = hf.get(META_KEY)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(cfg_file)!r} has no {META_KEY!r} entry: not written by phi4_jax "
                              "(convert a Hugging Face checkpoint with convert_weights.py first)")
    try:
        stored_dtype = meta.get("param_dtype", "float32")
        config = Phi4Config.from_hf_dict(hf, **{"param_dtype": stored_dtype, **runtime})
    except ConfigError as e:
        raise CheckpointError(f"{str(cfg_file)!r}: {e}") from None
    return config, meta


def params_directory(path: str | os.PathLike, meta: dict | None = None) -> Path:
    """The Orbax params directory of a checkpoint, checked to exist and to hold Orbax metadata. `meta` is the
    ``phi4_jax`` block from `read_checkpoint_config`, when the caller has it (else config.json is read)."""
    if meta is None:
        _, meta = read_checkpoint_config(path)
    params_dir = Path(path) / meta.get("params_dir", PARAMS_DIR)
    if not params_dir.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} has no parameters: {str(params_dir)!r} is missing")
    if not (params_dir / "_METADATA").is_file():
        raise CheckpointError(f"{str(params_dir)!r} is not a complete Orbax checkpoint (no _METADATA)")
    return params_dir


def _orbax_tree_metadata(params_dir: Path) -> dict:
    """{key path tuple: orbax ArrayMetadata} of an Orbax PyTree checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    try:
        meta = ocp.PyTreeCheckpointer().metadata(params_dir)
    except Exception as e:  # orbax raises assorted types for unreadable metadata
        raise CheckpointError(f"cannot read Orbax metadata of {str(params_dir)!r}: {e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(getattr(k, "key", getattr(k, "name", k)) for k in kp): leaf for kp, leaf in flat}


def check_params_metadata(params_dir: Path, config: Phi4Config) -> dict:
    """Compares the stored parameter shapes to the config; returns {path: ArrayMetadata}."""
    from phi4_jax.model.decoder import flat_param_specs

    expected = {path: shape for path, (shape, _) in flat_param_specs(config).items()}
    stored = _orbax_tree_metadata(params_dir)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {str(params_dir)!r} is missing parameter {'/'.join(missing[0])!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"checkpoint {str(params_dir)!r} has unexpected parameter {'/'.join(extra[0])!r}")
    for path, shape in expected.items():
        got = tuple(stored[path].shape)
        if got != shape:
            raise CheckpointError(f"parameter {'/'.join(path)!r} in {str(params_dir)!r} has shape {got}, "
                                  f"the config needs {shape}")
    return stored


def check_chunk_files(params_dir: Path, paths) -> None:
    """For zarr v2 arrays without OCDBT (what the converter writes): every data chunk file is present.

    (Orbax would also fail on a missing chunk, but with a long TensorStore message; this names the file.)
    """
    import itertools

    for path in paths:
        array_dir = Path(params_dir) / _param_name(path)
        zarray = array_dir / ".zarray"
        if not zarray.is_file():
            if (Path(params_dir) / "manifest.ocdbt").exists() or (array_dir / "zarr.json").exists():
                return  # another Orbax layout (OCDBT / zarr3): leave the checks to Orbax
            raise CheckpointError(f"parameter {'/'.join(path)!r} is missing from {str(params_dir)!r} "
                                  f"(no {_param_name(path)}/.zarray)")
        try:
            meta = json.loads(zarray.read_text())
            shape, chunks = meta["shape"], meta["chunks"]
            sep = meta.get("dimension_separator", ".")
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"corrupt array metadata {str(zarray)!r}") from None
        present = set(os.listdir(array_dir))
        grid = [range(math.ceil(n / c)) if n else range(0) for n, c in zip(shape, chunks)]
        for index in itertools.product(*grid):
            key = sep.join(map(str, index)) if index else "0"
            if key not in present:
                raise CheckpointError(f"corrupt or incomplete checkpoint: data file {_param_name(path)}/{key} "
                                      f"is missing from {str(params_dir)!r}")


def open_param_arrays(params_dir: str | os.PathLike, paths) -> dict:
    """{path: TensorStore array} opened lazily for reading (slices read on demand; any Orbax layout)."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    params_dir = Path(params_dir)
    meta = json.loads((params_dir / "_METADATA").read_text())
    use_zarr3 = bool(meta.get("use_zarr3", False))
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(params_dir))
    arrays = {}
    context = ts.Context()
    for path in paths:
        info = ocp.type_handlers.ParamInfo(name=_param_name(path), parent_dir=epath.Path(params_dir),
                                           use_zarr3=use_zarr3, ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            arrays[path] = ts.open(spec, open=True, read=True).result()
        except Exception as e:
            raise CheckpointError(f"cannot open parameter {'/'.join(path)!r} in {str(params_dir)!r}: "
                                  f"{str(e).splitlines()[0]}") from None
    return arrays

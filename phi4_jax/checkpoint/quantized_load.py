"""Loading a model with int8/int4 weights, tensor by tensor, and the checkpoint format for quantized tensors.

`load_quantized_params` builds the parameter tree `load_model(..., quantize=...)` runs on: every matrix the
`QuantizeOptions` select becomes a `phi4_jax.quant.weights.QuantizedWeight`, quantized one layer (or, for the
embedding and lm_head, one block of rows) at a time as it is read, so the full-precision model never exists in
memory: the peak is the quantized tree plus one float layer of one parameter. Tensors a source already holds
quantized (a ``--keep-quantized`` GGUF conversion, or a GGUF file loaded directly) are taken as they are.

Sources are `ParamSource`s: a parameter's path, shape, and how it is stored (quantized or float), with an
iterator of `Block`s (a layer, or a block of output rows, either as our float layout or as quantized rows).
`checkpoint_sources` reads this project's checkpoints; `phi4_jax.checkpoint.gguf_quantized` reads GGUF files.

Quantized checkpoint format: a normal checkpoint directory whose ``config.json`` ``phi4_jax`` block has
``"quantized": {"layers.q_proj": {"bits": 4, "group_size": 32, "offsets": true}, ...}``; each such parameter is
stored as the Orbax arrays ``<name>.values`` (int8, or uint8 holding two int4 values per byte), ``<name>.scales``
(float32) and, when ``offsets``, ``<name>.offsets`` (float32), in the `QuantizedWeight` layout
(``[layers, N, K]``, groups of ``group_size`` along K). The other parameters are stored as usual.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from phi4_jax.checkpoint import store as _store
from phi4_jax.checkpoint.store import (
    CONFIG_FILE,
    META_KEY,
    CheckpointError,
    _orbax_tree_metadata,
    check_chunk_files,
    check_params_metadata,
    open_param_arrays,
)
from phi4_jax.model.config import Phi4Config
from phi4_jax.quant.weights import (
    EMBED,
    QuantizationError,
    QuantizeOptions,
    matrix_dims,
    part_shapes,
    quantize_matrix,
    quantized_weight,
    to_rows,
)

QUANTIZED_KEY = "quantized"
PARTS = ("values", "scales", "offsets")


@dataclasses.dataclass
class Block:
    """Part of a parameter: layer `layer` (None: unstacked), output rows [n0, n1) (None: all of them), given
    either as `value` (float, our layout: the layer, or the rows' slice of it) or as `quantized` rows
    (values, scales, offsets or None)."""
    layer: int | None
    n0: int | None
    n1: int | None
    value: np.ndarray | None = None
    quantized: tuple | None = None


@dataclasses.dataclass
class ParamSource:
    """One of our parameters as a source holds it: `stored` = (bits, group_size, has offsets) when quantized."""
    path: tuple[str, ...]
    shape: tuple[int, ...]
    stored: tuple[int, int, bool] | None
    blocks: Callable[[], Iterator[Block]]

    @property
    def name(self) -> str:
        return self.path[-1]


def _row_index(name: str, n0: int | None, n1: int | None) -> tuple:
    """Where output rows [n0, n1) of an unstacked matrix sit in our layout (embed: axis 0; lm_head: axis 1)."""
    if n0 is None:
        return ()
    rows = slice(n0, n1)
    return (rows,) if name == EMBED else (slice(None), rows)


def row_blocks(n: int, row_bytes: int) -> list[tuple[int, int]]:
    """[n0, n1) blocks of output rows of about `store.CHUNK_TARGET_BYTES` each (read at each call, as the
    writer's `chunk_shape` reads it: a block smaller than the chunk it lands in makes every write of it read,
    decode, merge and re-encode that whole chunk)."""
    step = max(1, _store.CHUNK_TARGET_BYTES // max(1, row_bytes))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def quantized_meta(source: ParamSource) -> dict:
    bits, group, offsets = source.stored
    return {"bits": bits, "group_size": group, "offsets": bool(offsets)}


def assemble(source: ParamSource, options: QuantizeOptions | None, dtype):
    """The parameter as a device array (float, in `dtype`) or a `QuantizedWeight` (scales in `dtype`)."""
    import jax
    import jax.numpy as jnp

    name, shape = source.name, source.shape
    what = "/".join(source.path)
    scheme = source.stored
    if scheme is None and options is not None:
        chosen = options.scheme(name)
        scheme = None if chosen is None else (*chosen, False)
    if scheme is None:
        out = np.empty(shape, jnp.dtype(dtype))
        for b in source.blocks():
            if b.value is None:
                raise CheckpointError(f"{what}: quantized data where a float tensor was expected")
            index = ((b.layer,) if b.layer is not None else ()) + _row_index(name, b.n0, b.n1)
            out[index] = b.value
        return jax.device_put(out)
    bits, group, has_offsets = scheme
    lead, in_shape, out_shape = matrix_dims(name, shape)
    n, k = math.prod(out_shape), math.prod(in_shape)
    group = group or k
    values = np.empty(lead + (n, k // 2 if bits == 4 else k), np.uint8 if bits == 4 else np.int8)
    scales = np.empty(lead + (n, k // group), np.float32)
    offsets = np.zeros(lead + (n, k // group), np.float32) if has_offsets else None
    for b in source.blocks():
        index = ((b.layer,) if b.layer is not None else ()) + ((slice(b.n0, b.n1),) if b.n0 is not None else ())
        if b.quantized is not None:
            v, s, o = b.quantized
        else:
            v, s = quantize_matrix(to_rows(name, b.value), bits, group, what=what)
            o = None
        values[index], scales[index] = v, s
        if o is not None:
            offsets[index] = o
    cast = lambda a: None if a is None else jax.device_put(a.astype(jnp.dtype(dtype)))  # noqa: E731
    return quantized_weight(name, jax.device_put(values), cast(scales), cast(offsets), bits=bits,
                            group_size=group, shape=shape)


def load_params(sources: list[ParamSource], options: QuantizeOptions | None, dtype, *, progress: bool = True,
                desc: str = "loading") -> dict:
    """The nested parameter dict from `sources`, one parameter in host memory at a time (with a progress bar)."""
    from tqdm import tqdm

    params: dict = {"layers": {}}
    for source in tqdm(sources, desc=desc, unit="tensor", disable=not progress, dynamic_ncols=True):
        try:
            leaf = assemble(source, options, dtype)
        except QuantizationError as e:
            raise CheckpointError(str(e)) from None
        if source.path[0] == "layers":
            params["layers"][source.path[1]] = leaf
        else:
            params[source.path[0]] = leaf
    return params


# ----------------------------------------------------------------------------- this project's checkpoints

def _float_blocks(name: str, shape, read, stacked: bool) -> Callable[[], Iterator[Block]]:
    """Blocks of a float parameter read from TensorStore: a layer at a time, or row blocks (embed, lm_head)."""
    def blocks():
        if name in (EMBED, "lm_head"):
            _, in_shape, out_shape = matrix_dims(name, shape)
            for n0, n1 in row_blocks(math.prod(out_shape), math.prod(in_shape) * 4):
                yield Block(None, n0, n1, value=read(_row_index(name, n0, n1)))
        elif stacked:
            for layer in range(shape[0]):
                yield Block(layer, None, None, value=read((layer,)))
        else:
            yield Block(None, None, None, value=read(()))
    return blocks


def _quantized_blocks(shape, reads: dict, stacked: bool) -> Callable[[], Iterator[Block]]:
    def blocks():
        for layer in (range(shape[0]) if stacked else [None]):
            index = () if layer is None else (layer,)
            parts = tuple(None if reads.get(p) is None else reads[p](index) for p in PARTS)
            yield Block(layer, None, None, quantized=parts)
    return blocks


def open_checkpoint_parts(params_dir: Path, config: Phi4Config, meta: dict
                          ) -> tuple[dict, dict[tuple[str, ...], tuple[int, int, bool]], Callable]:
    """A checkpoint's stored arrays, plain or holding quantized tensors, checked against the config and opened
    lazily: ({array path: TensorStore array}, {parameter path: (bits, group size, has offsets)} of the quantized
    parameters, `read(array path, index)` -> NumPy, whose errors name the array). A quantized parameter's arrays
    are ``path + ("values",)``, ``("scales",)`` and, with offsets, ``("offsets",)``."""
    from phi4_jax.model.decoder import flat_param_specs

    quantized_meta = meta.get(QUANTIZED_KEY) or {}
    specs = flat_param_specs(config)
    quantized: dict[tuple[str, ...], tuple[int, int, bool]] = {}
    if not quantized_meta:
        stored = check_params_metadata(params_dir, config)
        array_paths = list(stored)
    else:
        stored = _orbax_tree_metadata(params_dir)
        array_paths = []
        for path, (shape, _) in specs.items():
            q = quantized_meta.get(".".join(path))
            wanted = [path] if q is None else [path + (p,) for p in PARTS if p != "offsets" or q.get("offsets")]
            for p in wanted:
                if p not in stored:
                    raise CheckpointError(f"checkpoint {str(params_dir)!r} is missing parameter {'/'.join(p)!r}")
            array_paths += wanted
            if q is None and tuple(stored[path].shape) != shape:
                raise CheckpointError(f"parameter {'/'.join(path)!r} in {str(params_dir)!r} has shape "
                                      f"{tuple(stored[path].shape)}, the config needs {shape}")
            if q is not None:
                try:
                    scheme = (int(q["bits"]), int(q["group_size"]), bool(q.get("offsets")))
                    want = part_shapes(path[-1], shape, *scheme)
                except (QuantizationError, KeyError, TypeError, ValueError) as e:
                    raise CheckpointError(f"checkpoint {str(params_dir)!r}: bad quantization entry for "
                                          f"{'/'.join(path)!r}: {e}") from None
                for part, part_shape in want.items():
                    got = tuple(stored[path + (part,)].shape)
                    if got != part_shape:
                        raise CheckpointError(f"parameter {'/'.join(path + (part,))!r} in {str(params_dir)!r} "
                                              f"has shape {got}, expected {part_shape}")
                quantized[path] = scheme
    check_chunk_files(params_dir, array_paths)
    arrays = open_param_arrays(params_dir, array_paths)

    def read(path, index):
        try:
            return arrays[path][index].read().result()
        except Exception as e:  # tensorstore errors for corrupt chunks
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"corrupt or incomplete checkpoint {str(params_dir)!r}: cannot read "
                                  f"{'/'.join(path)!r}: {first}") from None

    return arrays, quantized, read


def checkpoint_sources(params_dir: Path, config: Phi4Config, meta: dict) -> list[ParamSource]:
    """`ParamSource`s of a checkpoint's parameters (plain or holding quantized tensors), shapes checked."""
    from phi4_jax.model.decoder import flat_param_specs

    arrays, quantized, read = open_checkpoint_parts(params_dir, config, meta)

    def reader(path):
        return lambda index: read(path, index)

    sources = []
    for path, (shape, _) in flat_param_specs(config).items():
        scheme = quantized.get(path)
        if scheme is None:
            sources.append(ParamSource(path, shape, None, _float_blocks(path[-1], shape, reader(path),
                                                                           path[0] == "layers")))
        else:
            reads = {p: reader(path + (p,)) for p in PARTS if path + (p,) in arrays}
            sources.append(ParamSource(path, shape, scheme, _quantized_blocks(shape, reads, path[0] == "layers")))
    return sources


def write_sources_checkpoint(sources: list[ParamSource], config: Phi4Config, dst, *, param_dtype: np.dtype,
                             source_dtype: str, overwrite: bool = False, compression: str | None = "zstd",
                             progress: bool = True, desc: str = "converting") -> Path:
    """Writes `sources` as a checkpoint at `dst` (atomically): tensors a source holds quantized in the quantized
    format above, the others in `param_dtype`, one block at a time."""
    from tqdm import tqdm

    from phi4_jax.checkpoint import store as ckpt

    config = config.replace(param_dtype=param_dtype.name)
    specs, quantized = {}, {}
    for s in sources:
        if s.stored is None:
            specs[s.path] = (s.shape, param_dtype)
            continue
        bits = s.stored[0]
        for part, shape in part_shapes(s.name, s.shape, *s.stored).items():
            dtype = (np.uint8 if bits == 4 else np.int8) if part == "values" else np.float32
            specs[s.path + (part,)] = (shape, dtype)
        quantized[".".join(s.path)] = quantized_meta(s)
    split_axes = {("lm_head",): 1}  # embed/values are cut along their rows (axis 0), lm_head along its vocab
    dst = Path(dst).absolute()
    with ckpt.atomic_directory(dst, overwrite=overwrite) as tmp:
        writer = ckpt.ParamArrayWriter(tmp / ckpt.PARAMS_DIR, specs, compression=compression, split_axes=split_axes)
        for s in tqdm(sources, desc=desc, unit="tensor", disable=not progress, dynamic_ncols=True):
            for b in s.blocks():
                lead = (b.layer,) if b.layer is not None else ()
                if s.stored is None:
                    writer.write(s.path, b.value, lead + _row_index(s.name, b.n0, b.n1))
                    continue
                rows = lead + ((slice(b.n0, b.n1),) if b.n0 is not None else ())
                for part, value in zip(PARTS, b.quantized):
                    if s.path + (part,) in specs:
                        writer.write(s.path + (part,), np.zeros_like(b.quantized[1]) if value is None else value,
                                     rows)
        writer.finish()
        ckpt.write_checkpoint_config(tmp, config, param_dtype=param_dtype.name, source_dtype=source_dtype)
        cfg = json.loads((tmp / CONFIG_FILE).read_text())
        cfg[META_KEY][QUANTIZED_KEY] = quantized
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def quantize_params(params: dict, config: Phi4Config, options: QuantizeOptions, dtype) -> dict:
    """An in-memory parameter tree (float arrays, our layout) quantized by `options`, one layer at a time (for
    models built or trained in this process; `load_model(..., quantize=...)` reads checkpoints)."""
    from phi4_jax.model.decoder import flat_param_specs

    def source(path, shape):
        array = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]

        def blocks():
            if path[0] == "layers":
                for layer in range(shape[0]):
                    yield Block(layer, None, None, value=np.asarray(array[layer]))
            else:
                yield Block(None, None, None, value=np.asarray(array))
        return ParamSource(path, shape, None, blocks)

    sources = [source(path, shape) for path, (shape, _) in flat_param_specs(config).items()]
    return load_params(sources, options, dtype, progress=False)

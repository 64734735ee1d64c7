"""llama.cpp GGUF files (architecture ``phi3``) in and out, with llama.cpp's own `gguf` package.

A phi3 GGUF holds the Hugging Face Phi3ForCausalLM tensors under llama.cpp's names (`GGUF_TO_HF_PATTERNS`; the fused
``attn_qkv`` and ``ffn_up`` = gate then up, exactly as HF fuses them, or separate ``attn_q/k/v``), with the
dimensions listed innermost first; the NumPy views `gguf.GGUFReader` gives are already in HF's [out, in] order.
So reading one is the HF conversion with another source reader: `gguf_to_checkpoint` wraps each GGUF tensor as
a `SourceTensor` under its HF name, whose row reads dequantize only the rows asked for
(`gguf.quants.dequantize`; F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, and the other types the package
decodes), and hands them to `hf_convert.write_converted_checkpoint` (streaming, atomic). Hyper-parameters come
from the ``phi3.*`` metadata, the vocabulary size from ``token_embd``. An embedded tokenizer must be phi-4's
(`gguf_tokenizer.check_gguf_tokenizer`) unless the check is turned off.

`checkpoint_to_gguf` writes a checkpoint as a phi3 GGUF (f32, f16, bf16, q8_0 or q4_0 weights, encoded by
`gguf.quants.quantize`; norms stay f32, as llama.cpp keeps them, and with q4_0 the output layer is q8_0, as
llama.cpp's quantizer keeps it at higher precision) with the hyper-parameter metadata llama.cpp reads and phi-4's
tokenizer and chat template (`gguf_tokenizer.add_phi4_tokenizer`; a weights-only file with ``tokenizer=False``).
It streams: each tensor is read, encoded and appended in blocks of rows, to a temporary file renamed into place
when complete. A ``--keep-quantized`` checkpoint's int8 / int4 groups of 32 become Q8_0 / Q4_0 blocks exactly
(`gguf_quantized.gguf_blocks`); other quantized tensors are dequantized first.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from phi4_jax.checkpoint.gguf_tokenizer import add_no_tokenizer, add_phi4_tokenizer, check_gguf_tokenizer
from phi4_jax.checkpoint.hf_convert import _check_distinct, _progress, write_converted_checkpoint
from phi4_jax.checkpoint.hf_files import ConversionError, SourceTensor, parse_dtype, validate_tensors
from phi4_jax.checkpoint.hf_mapping import hf_tensor_shapes
from phi4_jax.model.config import ConfigError, Phi4Config
from phi4_jax.special_tokens import ENDOFTEXT_ID, IM_END_ID, N_VOCAB

ARCH = "phi3"

# llama.cpp tensor name (without ".weight"; {bid} = layer) -> HF Phi3ForCausalLM name.
GGUF_TO_HF_PATTERNS = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "blk.{bid}.attn_norm": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.attn_qkv": "model.layers.{bid}.self_attn.qkv_proj.weight",
    "blk.{bid}.attn_output": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.gate_up_proj.weight",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.down_proj.weight",
}
SPLIT_QKV = ("attn_q", "attn_k", "attn_v")  # some phi3 GGUFs store q, k, v separately
_log = logging.getLogger(__name__)
GGUF_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}  # --type -> GGMLQuantizationType


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading or writing GGUF needs the `gguf` package: pip install gguf") from None
    return gguf


def hf_name_for_gguf(name: str) -> str | None:
    """HF name of a GGUF tensor (``blk.3.ffn_up.weight`` -> ``model.layers.3.mlp.gate_up_proj.weight``)."""
    base = name.removesuffix(".weight")
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", base)
    key, bid = (f"blk.{{bid}}.{m.group(2)}", m.group(1)) if m else (base, None)
    if key not in GGUF_TO_HF_PATTERNS or not name.endswith(".weight"):
        return None
    return GGUF_TO_HF_PATTERNS[key].format(bid=bid)


def gguf_name_for_hf(name: str) -> str:
    """Inverse of `hf_name_for_gguf` for the tensors we write."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    key, bid = (f"model.layers.{{bid}}.{m.group(2)}", m.group(1)) if m else (name, None)
    for gguf_key, hf_key in GGUF_TO_HF_PATTERNS.items():
        if hf_key == key:
            return gguf_key.format(bid=bid) + ".weight"
    raise ConversionError(f"no GGUF name for tensor {name!r}")


# ----------------------------------------------------------------------------- GGUF -> ours

def _field(reader, key: str, path: Path, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ConversionError(f"{path.name}: GGUF metadata has no {key!r}")
        return None
    return field.contents()


@functools.lru_cache(maxsize=1)
def _reader_class(gguf):
    """`gguf.GGUFReader` slicing a plain ndarray view of its memory map instead of the `np.memmap` itself. The reader
    takes one slice per metadata value (a phi-4 GGUF holds ~300,000: its tokens, token types and merges), and every
    slice of an `np.memmap` runs Python (`np.memmap.__array_finalize__`), so this parses such a file ~3x faster; the
    arrays it gives are still views of the mapped file. A gguf package without the `_get` hook gets its own reader."""
    if not callable(getattr(gguf.GGUFReader, "_get", None)):
        return gguf.GGUFReader

    class PlainSliceReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:   # `data` (the np.memmap) is set before the first `_get`
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainSliceReader


def _open_reader(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise ConversionError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = _reader_class(gguf)(path)  # maps every tensor's bytes: a cut file fails here
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on corrupt or cut files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{path.name}: truncated or corrupt GGUF file ({msg})") from None
    return gguf, reader


def config_from_gguf(reader, path: Path, vocab_size: int) -> Phi4Config:
    """Phi4Config from a phi3 GGUF's metadata (through the same checks as a HF config.json)."""
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise ConversionError(f"{path.name}: GGUF architecture is {arch!r}; phi4_jax reads {ARCH!r} "
                              "(Phi-3 / Phi-4) files only")

    def key(name, required=True):
        return _field(reader, f"{ARCH}.{name}", path, required)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    hf = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", required=False) or heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", required=False) or 10000.0),
        "max_position_embeddings": int(key("context_length")),
    }
    rope_dims = key("rope.dimension_count", required=False)
    if heads and hidden % heads == 0 and rope_dims is not None and int(rope_dims) != hidden // heads:
        raise ConversionError(f"{path.name}: {ARCH}.rope.dimension_count {rope_dims} != head dim "
                              f"{hidden // heads}: partial rotary embeddings are not supported")
    window = key("attention.sliding_window", required=False)
    if window and int(window) < hf["max_position_embeddings"]:
        hf["sliding_window"] = int(window)  # refused by from_hf_dict with its reason
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{theirs}", path, required=False)
        if value is not None:
            hf[ours] = int(value)
    if vocab_size == N_VOCAB and hf.get("eos_token_id") == ENDOFTEXT_ID:
        # Some phi-4 GGUFs state <|endoftext|> as eos (microsoft/phi-4's first tokenizer_config.json did). The chat
        # format ends answers with <|im_end|>: that is the eos, and <|endoftext|> still stops generation
        # (`inference.engine.default_stop_tokens` stops at both).
        _log.info("%s: eos_token_id is %d (<|endoftext|>); using phi-4's <|im_end|> (%d) as eos", path.name,
                  ENDOFTEXT_ID, IM_END_ID)
        hf["eos_token_id"] = IM_END_ID
    try:
        return Phi4Config.from_hf_dict(hf)
    except ConfigError as e:
        raise ConversionError(f"{path.name}: {e}") from None


def _gguf_source_tensor(gguf, t, hf_name: str, path: Path) -> SourceTensor:
    """A GGUF tensor as a SourceTensor under its HF name; reads dequantize only the rows asked for."""
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))

    def reader(r0, r1, data=t.data):
        if len(shape) == 1:  # a 1-D quantized tensor is one row of blocks: decode it whole
            return np.asarray(gguf.quants.dequantize(np.asarray(data), qtype), np.float32).reshape(shape)[r0:r1]
        return np.asarray(gguf.quants.dequantize(np.asarray(data[r0:r1]), qtype), np.float32)

    try:
        gguf.quants.dequantize(np.asarray(t.data[:1]), qtype)  # refuse types the package cannot decode now
    except NotImplementedError:
        raise ConversionError(f"{path.name}: tensor {t.name!r} has quantization type {qtype.name}, which "
                              "cannot be dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                              "Q2_K..Q6_K and the other types the gguf package decodes)") from None
    return SourceTensor(hf_name, path, np.dtype(np.float32), shape, reader)


def _fused_qkv(parts: list[SourceTensor], hf_name: str) -> SourceTensor:
    """Separate q, k, v tensors as one HF qkv_proj (rows q, then k, then v): reads gather the row range."""
    bounds = np.cumsum([0] + [p.shape[0] for p in parts])

    def reader(r0, r1):
        blocks = [p.read((max(r0, a) - a, min(r1, b) - a)) for p, a, b in zip(parts, bounds[:-1], bounds[1:])
                  if max(r0, a) < min(r1, b)]
        return np.concatenate(blocks, axis=0)

    return SourceTensor(hf_name, parts[0].file, parts[0].dtype, (int(bounds[-1]), *parts[0].shape[1:]), reader)


def read_gguf_tensors(path, *, check_tokenizer: bool = True, reader=None
                      ) -> tuple[Phi4Config, dict[str, SourceTensor], list[str]]:
    """(config, {HF name: tensor}, GGUF type names) of a phi3 GGUF file; validated (one row of each tensor is
    decoded to check its type; an embedded tokenizer must be phi-4's if `check_tokenizer`), the data is read
    later. `reader`: the file's `gguf.GGUFReader`, when the caller has opened it already (parsing a file with
    phi-4's 100352-token vocabulary takes seconds)."""
    path = Path(path)
    if reader is None:
        gguf, reader = _open_reader(path)
    else:
        gguf = _gguf()
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConversionError(f"{path.name}: missing tensor 'token_embd.weight'")
    config = config_from_gguf(reader, path, vocab_size=int(by_name["token_embd.weight"].shape[-1]))
    if check_tokenizer:
        check_gguf_tokenizer(reader, path)
    tensors: dict[str, SourceTensor] = {}
    split: dict[str, dict[str, SourceTensor]] = {}
    for name, t in by_name.items():
        m = re.fullmatch(r"blk\.(\d+)\.(attn_[qkv])\.weight", name)
        if m:
            hf = f"model.layers.{m.group(1)}.self_attn.qkv_proj.weight"
            split.setdefault(hf, {})[m.group(2)] = _gguf_source_tensor(gguf, t, hf, path)
            continue
        hf = hf_name_for_gguf(name)
        if hf is None:
            raise ConversionError(f"{path.name}: unexpected tensor {name!r}: not part of a phi3 model that "
                                  "phi4_jax supports (e.g. LongRoPE rope_factors are not)")
        tensors[hf] = _gguf_source_tensor(gguf, t, hf, path)
    for hf, parts in split.items():
        if set(parts) != set(SPLIT_QKV) or hf in tensors:
            raise ConversionError(f"{path.name}: layer {hf.split('.')[2]} needs either attn_qkv or all of "
                                  f"attn_q, attn_k, attn_v; found {sorted(parts)}")
        tensors[hf] = _fused_qkv([parts[k] for k in SPLIT_QKV], hf)
    for hf, shape in hf_tensor_shapes(config).items():  # named as in the file, dims in GGUF order
        if hf not in tensors:
            tied = " (a tied output embedding is not supported: phi-4 has its own)" if hf == "lm_head.weight" else ""
            raise ConversionError(f"{path.name}: missing tensor {gguf_name_for_hf(hf)!r}{tied}")
        if tensors[hf].shape != shape:
            raise ConversionError(f"{path.name}: tensor {gguf_name_for_hf(hf)!r} has dims "
                                  f"{list(reversed(tensors[hf].shape))}, expected {list(reversed(shape))} "
                                  "from the phi3 metadata")
    validate_tensors(config, tensors)  # and no extra ones (e.g. a blk.N beyond block_count)
    types = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors})
    return config, tensors, types


def gguf_to_checkpoint(src, dst, *, dtype: str | None = None, overwrite: bool = False,
                       compression: str | None = "zstd", progress: bool = True, check_tokenizer: bool = True) -> Path:
    """Converts a llama.cpp phi3 GGUF into a phi4_jax checkpoint (dequantized to `dtype`, default float32)."""
    param_dtype = parse_dtype(dtype or "float32")
    _check_distinct(src, dst)
    config, tensors, types = read_gguf_tensors(src, check_tokenizer=check_tokenizer)
    return write_converted_checkpoint(config, tensors, dst, param_dtype=param_dtype,
                                      source_dtype="gguf:" + ",".join(types), overwrite=overwrite,
                                      compression=compression, progress=progress,
                                      desc=f"converting {Path(src).name}")


# ----------------------------------------------------------------------------- ours -> GGUF

def tensor_type(gguf, name: str, shape: tuple[int, ...], qtype):
    """The GGUF type `--type` gives HF tensor `name`: norms (1-D) stay F32; with Q4_0 the output layer (lm_head)
    is Q8_0, as llama.cpp's own quantizer keeps it at higher precision (it picks Q6_K, which the gguf package
    cannot encode); every other matrix is `qtype`."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if name == "lm_head.weight" and qtype == gguf.GGMLQuantizationType.Q4_0:
        return gguf.GGMLQuantizationType.Q8_0
    return qtype


def _encode_block(gguf, block, qtype, kept_quantized: list) -> np.ndarray:
    """A `RowBlock` as the bytes (or f32/f16 values) of GGUF type `qtype`: quantized rows whose groups are the
    type's blocks are re-blocked exactly (`gguf_blocks`); other rows are dequantized (if quantized) and encoded by
    `gguf.quants.quantize`. `kept_quantized` gets one bool per block: whether it was re-blocked."""
    from phi4_jax.checkpoint.gguf_quantized import gguf_blocks  # gguf_quantized imports this module

    if block.weight is not None and qtype.name in ("Q8_0", "Q4_0"):
        raw = gguf_blocks(qtype.name, block.weight)
        kept_quantized.append(raw is not None)
        if raw is not None:
            return raw
    rows = block.float_rows(np.float32)
    return rows if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(rows, qtype)


def checkpoint_to_gguf(src, dst, *, gguf_type: str = "f16", overwrite: bool = False, progress: bool = True,
                       tokenizer: bool = True) -> Path:
    """Writes a phi4_jax checkpoint as a llama.cpp phi3 GGUF file at `dst`, streaming: each tensor is read,
    encoded and written in blocks of rows (`rows.CheckpointRows`), so memory holds one piece of one tensor (at
    most a layer of one parameter) plus a block, never a whole tensor. phi-4's tokenizer and chat template are
    embedded, or nothing (weights only, ``tokenizer=False``). A ``--keep-quantized`` checkpoint's int8 / int4
    groups of 32 become Q8_0 / Q4_0 blocks exactly (no re-quantization); other quantized tensors are dequantized
    and quantized again, and a warning names them. The file is written to a temporary name and renamed into
    place when complete."""
    gguf = _gguf()
    from phi4_jax.checkpoint.rows import CheckpointRows

    if gguf_type not in GGUF_TYPES:
        raise ConversionError(f"unsupported --type {gguf_type!r}: choose one of {sorted(GGUF_TYPES)}")
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type]]
    dst = Path(dst).absolute()
    if Path(src).resolve() == dst.resolve() or Path(src).resolve() in dst.resolve().parents:
        raise ConversionError(f"output {str(dst)!r} must be outside the source checkpoint {str(src)!r}")
    if dst.exists() and not overwrite:
        raise ConversionError(f"output {str(dst)!r} exists; pass --overwrite to replace it")
    if dst.is_dir():
        raise ConversionError(f"output {str(dst)!r} is a directory; --to-gguf writes a file")
    source = CheckpointRows(src)
    c = source.config
    shapes = hf_tensor_shapes(c)
    types = {name: tensor_type(gguf, name, shape, qtype) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        block = gguf.GGML_QUANT_SIZES[types[name]][0]
        if shape[-1] % block:
            raise ConversionError(f"--type {gguf_type} needs rows that are a multiple of {block} values; "
                                  f"tensor {name!r} has rows of {shape[-1]}")

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    requantized = []
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(Path(src).name)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_block_count(c.num_layers)
        writer.add_head_count(c.num_heads)
        writer.add_head_count_kv(c.num_kv_heads)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        writer.add_bos_token_id(c.bos_token_id)
        writer.add_eos_token_id(c.eos_token_id)
        writer.add_pad_token_id(c.pad_token_id)
        (add_phi4_tokenizer if tokenizer else add_no_tokenizer)(writer, c)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32"
                             else gguf.LlamaFileType[f"MOSTLY_{GGUF_TYPES[gguf_type]}"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # Tensor infos need each tensor's encoded size: computed from the shape (no data read).
        sizes = {}
        for name, shape in shapes.items():
            block, type_size = gguf.GGML_QUANT_SIZES[types[name]]
            sizes[name] = math.prod(shape) // block * type_size
            writer.add_tensor_info(gguf_name_for_hf(name), shape, np.dtype(np.float32), sizes[name],
                                   raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        alignment = writer.data_alignment
        writer.close()
        # The tensor data, appended block by block in the order (and at the aligned offsets) of the tensor infos.
        total = sum(math.prod(s) for s in shapes.values())
        with open(tmp, "r+b") as f, _progress(total, f"writing {dst.name}", progress) as bar:
            f.seek(0, os.SEEK_END)
            f.write(bytes(-f.tell() % alignment))
            for name, shape in shapes.items():
                written, kept = 0, []
                row_bytes = math.prod(shape[1:]) * 4
                for block in source.blocks(name, row_bytes):
                    data = _encode_block(gguf, block, types[name], kept)
                    f.write(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
                    written += data.nbytes
                    bar.update(block.n * math.prod(shape[1:]))
                    del data, block
                if written != sizes[name]:
                    raise ConversionError(f"internal error: {name!r} encoded to {written} bytes, expected "
                                          f"{sizes[name]}")
                f.write(bytes(-written % alignment))
                if not all(kept):
                    requantized.append(gguf_name_for_hf(name))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    if requantized:
        _log.warning("note: %d tensor(s) held quantized in the checkpoint have no exact %s form (groups other than "
                     "32, offsets, int8 into q4_0, or scales float16 cannot hold), so they were dequantized and "
                     "quantized again: %s", len(requantized), gguf_type,
                     ", ".join(requantized[:6]) + (" ..." if len(requantized) > 6 else ""))
    return dst

"""Checkpoints that hold quantized tensors (`convert_weights.py X.gguf DST --keep-quantized`) read back by
`restore_params`, written out by `--to-hf` and `--to-gguf`.

Peers: the GGUF files themselves and llama.cpp's `gguf` package (`gguf.quants.dequantize` gives the weights a file
holds; `gguf.GGUFReader` the bytes of each tensor), and transformers (loads what `--to-hf` writes; its logits are
the reference for our quantized model's). The GGUF sources are written by tests/test_gguf.py's `write_gguf` from a
tiny random transformers model (rows of 64 and 96 values: whole 32-value blocks).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import hf_logits, make_tiny_phi3_model
from test_convert import cli_main, hf_tensors
from writer_probe import misaligned, record_array_writes

import phi4_jax
from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
from phi4_jax.checkpoint.load import restore_params
from phi4_jax.checkpoint.store import CheckpointError
from phi4_jax.quant.weights import QuantizedWeight

gguf = pytest.importorskip("gguf")

SIZES = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "intermediate": 96, "vocab": 131}
KEPT_TYPES = ("Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-ckpt")


@pytest.fixture(scope="module")
def hf_model():
    return make_tiny_phi3_model(seed=31, **SIZES)


@pytest.fixture(scope="module")
def kept(work, hf_model):
    """{GGUF type: (the .gguf, its --keep-quantized checkpoint, {HF name: the float32 weights the file holds})}."""
    from test_gguf import write_gguf

    out = {}
    for qtype in KEPT_TYPES:
        src = work / f"src-{qtype}.gguf"
        held = write_gguf(src, hf_model, qtype)
        dst = work / f"kept-{qtype}"
        assert cli_main(src, dst, "--keep-quantized") == 0
        out[qtype] = (src, dst, held)
    return out


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(3).integers(0, SIZES["vocab"], size=(1, 512), dtype=np.int64)


def _leaves(tree):
    return dict(jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight)))


@pytest.mark.parametrize("qtype", KEPT_TYPES)
def test_restore_params_keeps_or_dequantizes(kept, qtype):
    """restore_params(dtype=None) gives the QuantizedWeight leaves load_model runs (values and scales equal); with
    dtype float32 every parameter equals, exactly, the weights the GGUF file holds (gguf.quants.dequantize, mapped
    to our layout by the in-memory HF mapping): an int8 or int4 value times a float16 scale is exact in float32.
    A wrong nibble order, scale, transpose or group fails. A sharding with kept leaves is refused in one line."""
    _, dst, held = kept[qtype]
    model = phi4_jax.load_model(dst)
    params = restore_params(dst)
    ours, theirs = _leaves(params), _leaves(model.params)
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for path, leaf in ours.items():
        if isinstance(theirs[path], QuantizedWeight):
            assert isinstance(leaf, QuantizedWeight) and leaf.bits == (8 if qtype == "Q8_0" else 4), path
            np.testing.assert_array_equal(np.asarray(leaf.values), np.asarray(theirs[path].values))
            np.testing.assert_array_equal(np.asarray(leaf.scales), np.asarray(theirs[path].scales))
        else:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(theirs[path]))

    dense = restore_params(dst, dtype=jnp.float32)
    want = params_from_hf_state_dict(held, model.config)
    for path, leaf in _leaves(dense).items():
        keys = [k.key for k in path]
        ref = want[keys[0]] if len(keys) == 1 else want[keys[0]][keys[1]]
        assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(leaf), ref, err_msg=str(path))
    assert restore_params(dst, dtype=jnp.bfloat16)["layers"]["q_proj"].dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="^quantized weights load onto one device"):
        restore_params(dst, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


@pytest.mark.parametrize("qtype", KEPT_TYPES)
def test_to_hf_dequantizes_and_transformers_agrees(work, kept, hf_model, input_ids, qtype):
    """--to-hf of a kept checkpoint: transformers' AutoModelForCausalLM loads it; every tensor is exactly the
    file's dequantized weights, and transformers' logits on it equal our quantized model's (load_model of the
    kept checkpoint, dequantizing on the fly) to 1e-4 of max |logit| over 512 positions."""
    import torch
    from transformers import AutoModelForCausalLM

    _, dst, held = kept[qtype]
    out = work / f"hf-{qtype}"
    assert cli_main("--to-hf", dst, out) == 0
    tensors = hf_tensors(out)
    assert tensors.keys() == held.keys()
    for name, value in held.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    # (The GGUF states no padding id, so the config has phi-4's 100349, outside this tiny vocabulary.)
    theirs_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, pad_token_id=None)
    theirs = hf_logits(theirs_model, input_ids)
    assert np.std(theirs) > 0.5, "reference logits are too flat to be a meaningful check"
    ours = np.asarray(phi4_jax.load_model(dst)(input_ids))
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) <= 1e-4


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _raw(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def _decoded(t) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type))


def test_to_gguf_reblocks_kept_tensors_exactly(work, kept, caplog):
    """--to-gguf of kept checkpoints writes the file's blocks back without re-quantizing: Q8_0 -> kept -> q8_0 and
    Q4_0 -> kept -> q4_0 give every tensor byte for byte (norms f32 too), except that the q4_0 file's output layer
    is q8_0 (as llama.cpp keeps it), holding exactly the source's Q4_0 values; Q4_0 -> kept -> q8_0 holds exactly
    the source's values in every matrix. No re-quantization note is logged. A requantizing writer changes bytes
    (gguf's quantizer picks other scales), a wrong nibble order or scale the values."""
    caplog.set_level(logging.WARNING)
    for qtype in KEPT_TYPES:
        src, dst, _ = kept[qtype]
        out = work / f"back-{qtype}.gguf"
        assert cli_main("--to-gguf", dst, out, "--type", qtype.lower(), "--no-tokenizer") == 0
        source, back = _tensors(src), _tensors(out)
        assert source.keys() == back.keys()
        for name, t in source.items():
            if qtype == "Q4_0" and name == "output.weight":
                assert back[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
                np.testing.assert_array_equal(_decoded(back[name]), _decoded(t))
                continue
            assert back[name].tensor_type == t.tensor_type, name
            np.testing.assert_array_equal(_raw(back[name]), _raw(t), err_msg=name)
    src, dst, _ = kept["Q4_0"]
    out = work / "q4-as-q8.gguf"
    assert cli_main("--to-gguf", dst, out, "--type", "q8_0", "--no-tokenizer") == 0
    for name, t in _tensors(src).items():
        b = _tensors(out)[name]
        want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.Q8_0
        assert b.tensor_type == want, name
        np.testing.assert_array_equal(_decoded(b), _decoded(t), err_msg=name)
    assert "dequantized and quantized again" not in caplog.text


def test_to_gguf_requantizes_other_kept_tensors_with_a_note(work, caplog):
    """Tensors that have no exact form in the requested type (Q4_K's groups with offsets into q4_0; int8 into
    q4_0) are dequantized and quantized again by gguf's quantizer: a warning names them, and the values written are
    gguf.quants.quantize of the kept weights (within Q4_0's block bound of what the source file holds)."""
    from test_gguf import write_gguf
    from test_gguf_out import _block_bound

    model = make_tiny_phi3_model(seed=5, hidden=256, heads=4, kv_heads=2, layers=1, intermediate=256, vocab=131)
    rng = np.random.default_rng(3)

    def q4_k_blocks(tensor, q):
        raw = rng.integers(0, 256, size=(tensor.shape[0], tensor.shape[1] // 256, 144), dtype=np.uint8)
        raw[..., 0:4] = rng.uniform(0.0005, 0.002, size=(*raw.shape[:2], 2)).astype(np.float16).view(np.uint8)
        return raw.reshape(tensor.shape[0], -1)

    src = work / "src-Q4_K.gguf"
    held = write_gguf(src, model, "Q4_K", encode=q4_k_blocks)
    dst = work / "kept-Q4_K"
    assert cli_main(src, dst, "--keep-quantized") == 0
    caplog.set_level(logging.WARNING)
    out = work / "q4k-as-q4_0.gguf"
    assert cli_main("--to-gguf", dst, out, "--type", "q4_0", "--no-tokenizer") == 0
    assert "dequantized and quantized again" in caplog.text and "blk.0.attn_qkv.weight" in caplog.text
    from phi4_jax.checkpoint.gguf_convert import hf_name_for_gguf

    for name, t in _tensors(out).items():
        w = held[hf_name_for_gguf(name)]
        got = _decoded(t).reshape(w.shape)
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
            continue
        kind = "q8_0" if name == "output.weight" else "q4_0"
        assert t.tensor_type == gguf.GGMLQuantizationType[kind.upper()], name
        bound = _block_bound(w, kind) + 1e-6 * np.max(np.abs(w))  # + the Q4_K offsets' float32 rounding
        assert np.all(np.abs(got - w) <= bound), name


@pytest.mark.parametrize("target", [4096, 64 << 20])
def test_keep_quantized_writes_only_whole_chunks(kept, tmp_path, monkeypatch, target):
    """Every TensorStore write of a --keep-quantized conversion covers whole chunks of its array, at the default
    chunk target and at a small one that splits the embedding and lm_head (int8 values, scales) into chunks of
    other row counts than the conversion's row blocks: `ParamArrayWriter` buffers a chunk until its rows are all
    there. (A write of part of a chunk makes TensorStore read, decode, merge and re-encode that chunk: with one
    25 MB chunk per 100K-vocabulary lm_head and the row blocks cut for a small target, a conversion once took
    10 minutes.) The checkpoint still holds what the file holds."""
    from phi4_jax.checkpoint import store

    src = kept["Q8_0"][0]
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", target)
    writes = record_array_writes(monkeypatch)
    chunks, shapes, axes, pieces = {}, {}, {}, []
    write = store.ParamArrayWriter.write

    def remember(self, path, value, index=()):
        chunks[path], shapes[path], axes[path] = self.chunks[path], self.specs[path][0], self.split_axes[path]
        pieces.append((path, tuple(index)))
        return write(self, path, value, index)

    monkeypatch.setattr(store.ParamArrayWriter, "write", remember)
    assert cli_main(src, tmp_path / "kept", "--keep-quantized") == 0
    assert writes
    for path, index in writes:
        assert not misaligned(shapes[path], chunks[path], axes[path], index), (path, index)
    if target == 4096:   # the conversion's row blocks do not line up with these chunks: the writer buffered them
        assert any(misaligned(shapes[path], chunks[path], axes[path], index) for path, index in pieces)
    model = phi4_jax.load_model(tmp_path / "kept")
    reference = phi4_jax.load_model(kept["Q8_0"][1])
    for (p, ours), (_, theirs) in zip(_leaves(model.params).items(), _leaves(reference.params).items()):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))

"""How the converter streams: the piece-wise mapping, chunk-block writes, bounded reads and bounded copies.

Peers: NumPy indexing (what a write at an index must produce, what a transpose is), and the source bytes
themselves (a round trip must give them back bit for bit). End-to-end parity with transformers is in
test_convert.py; this file checks the memory-relevant mechanics on a synthetic checkpoint written with the
safetensors library, so no model is built.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

BF16 = np.dtype(ml_dtypes.bfloat16)


def _config(**kw):
    from phi4_jax.model.config import Phi4Config
    base = dict(num_layers=2, hidden_size=256, intermediate_size=2048, num_heads=4, num_kv_heads=2,
                vocab_size=8192, param_dtype="bfloat16")
    base.update(kw)
    return Phi4Config(head_dim=base["hidden_size"] // base["num_heads"], **base)


@pytest.fixture(scope="module")
def synthetic_hf(tmp_path_factory):
    """A bf16 HF directory of random tensors (2 shards + index), written by the safetensors library."""
    from safetensors.numpy import save_file

    from phi4_jax.checkpoint.hf_mapping import hf_tensor_shapes

    config = _config()
    src = tmp_path_factory.mktemp("streaming") / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config.to_hf_dict(torch_dtype="bfloat16")))
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape, dtype=np.float32).astype(BF16)
               for name, shape in hf_tensor_shapes(config).items()}
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
    weight_map = {n: fname for fname, part in halves.items() for n in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src, config, tensors


# ----------------------------------------------------------------------------- the mapping

def test_pieces_cover_each_tensor_in_row_order_and_are_views():
    from phi4_jax.checkpoint.hf_mapping import hf_pieces, hf_tensor_shapes

    config = _config(num_layers=1, hidden_size=48, intermediate_size=80, vocab_size=131)
    rng = np.random.default_rng(1)
    for name, shape in hf_tensor_shapes(config).items():
        tensor = rng.standard_normal(shape).astype(np.float32)
        pieces = hf_pieces(name, config)
        assert [p.r0 for p in pieces] == [0] + [p.r1 for p in pieces[:-1]] and pieces[-1].r1 == shape[0], name
        back = []
        for p in pieces:
            ours = p.to_ours(tensor[p.r0:p.r1])
            assert ours.shape == p.shape and np.shares_memory(ours, tensor), name  # a view, not a copy
            stored = np.ascontiguousarray(ours)  # as read back from the checkpoint
            hf = p.to_hf(stored, shape[1:])
            assert np.shares_memory(hf, stored), name  # a view too: the only copy is the caller's cast
            back.append(hf)
        np.testing.assert_array_equal(np.concatenate(back), tensor, err_msg=name)
    # The transposes themselves, against NumPy written from the definition (PyTorch Linear is [out, in]).
    gate_up = rng.standard_normal((160, 48)).astype(np.float32)
    _, up = hf_pieces("model.layers.0.mlp.gate_up_proj.weight", config)
    np.testing.assert_array_equal(up.to_ours(gate_up[80:]), gate_up[80:].T)
    qkv = rng.standard_normal((config.q_size + 2 * config.kv_size, 48)).astype(np.float32)
    q = hf_pieces("model.layers.0.self_attn.qkv_proj.weight", config)[0]
    np.testing.assert_array_equal(q.to_ours(qkv[:config.q_size])[:, 1, :],
                                  qkv[config.head_dim:2 * config.head_dim].T)


# ----------------------------------------------------------------------------- writer

def test_writer_chunk_blocks_match_numpy_assignment(tmp_path, monkeypatch):
    """Writes at unaligned slices that cross chunk boundaries, transposed views, and a float32 -> bf16 cast:
    the stored arrays equal NumPy's own assignment into zeros (zarr's fill value)."""
    import tensorstore as ts

    from phi4_jax.checkpoint import store

    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 512)
    specs = {("layers", "w"): ((3, 40, 24), BF16), ("lm_head",): ((24, 50), BF16)}
    writer = store.ParamArrayWriter(tmp_path, specs, split_axes={("lm_head",): 1})
    assert writer.chunks[("layers", "w")][0] == 1 and writer.chunks[("layers", "w")][1] < 40
    assert writer.chunks[("lm_head",)][0] == 24 and writer.chunks[("lm_head",)][1] < 50
    rng = np.random.default_rng(2)
    want = {path: np.zeros(shape, BF16) for path, (shape, _) in specs.items()}
    writes = [
        (("layers", "w"), (1,), rng.standard_normal((24, 40), dtype=np.float32).T),        # a layer, transposed
        (("layers", "w"), (2, slice(3, 37)), rng.standard_normal((34, 24), dtype=np.float32)),
        (("lm_head",), (slice(None), slice(7, 45)), rng.standard_normal((38, 24), dtype=np.float32).T),
        (("lm_head",), (slice(2, 20), slice(45, 50)), rng.standard_normal((18, 5), dtype=np.float32)),
    ]
    for path, index, value in writes:
        writer.write(path, value, index)
        want[path][index] = value.astype(BF16)
    writer.finish()
    for path in specs:
        got = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                      "path": str(tmp_path / ".".join(path))}}).result()
        np.testing.assert_array_equal(got.read().result(), want[path], err_msg=str(path))


# ----------------------------------------------------------------------------- bounded reads and copies

def test_hf_to_checkpoint_reads_pieces_and_chunk_blocks(synthetic_hf, tmp_path, monkeypatch):
    """gate_up / qkv are read piece by piece, embed / lm_head one chunk of rows at a time, every row once;
    and the result is bit-exact."""
    from phi4_jax.checkpoint import hf_convert, store
    from phi4_jax.checkpoint.hf_files import SourceTensor
    from phi4_jax.checkpoint.load import restore_params

    src, config, tensors = synthetic_hf
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 256 << 10)
    reads, real_read = {}, SourceTensor.read

    def read(self, rows=None):
        reads.setdefault(self.name, []).append(rows)
        return real_read(self, rows)

    monkeypatch.setattr(SourceTensor, "read", read)
    hf_convert.hf_to_checkpoint(src, tmp_path / "ours", progress=False)
    f, v, q = config.intermediate_size, config.vocab_size, config.q_size
    assert reads["model.layers.1.mlp.gate_up_proj.weight"] == [(0, f), (f, 2 * f)]
    assert reads["model.layers.0.self_attn.qkv_proj.weight"] == [(0, q), (q, q + config.kv_size),
                                                                  (q + config.kv_size, q + 2 * config.kv_size)]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        blocks = reads[name]
        assert len(blocks) > 4 and blocks[0][0] == 0 and blocks[-1][1] == v, (name, blocks)
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])), blocks
        assert max(b - a for a, b in blocks) * config.hidden_size * 2 <= 256 << 10, blocks

    params = restore_params(tmp_path / "ours")
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), tensors["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["up_proj"][1]),
                                  tensors["model.layers.1.mlp.gate_up_proj.weight"][f:].T)


def _numpy_peak_bytes(fn) -> int:
    """Peak bytes of NumPy (and Python) allocations while fn runs (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_conversion_copies_are_bounded_both_ways(synthetic_hf, tmp_path, monkeypatch):
    """HF -> ours holds one piece (half of gate_up) plus chunk-sized copies; --to-hf holds no NumPy copy larger
    than a block (TensorStore's read buffer is its own), so neither ever holds a whole gate_up, let alone a
    concatenation of pieces. The written file is byte-identical to the source tensors."""
    from safetensors.numpy import load_file

    from phi4_jax.checkpoint import hf_convert, store

    src, config, tensors = synthetic_hf
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 64 << 10)
    gate_up = 2 * config.intermediate_size * config.hidden_size * BF16.itemsize  # 2 MiB, the largest layer tensor
    piece = gate_up // 2

    # Once untraced, so that imports and first-call caches are not counted.
    hf_convert.hf_to_checkpoint(src, tmp_path / "warm", progress=False)
    hf_convert.checkpoint_to_hf(tmp_path / "warm", tmp_path / "warm_back", progress=False)

    peak_in = _numpy_peak_bytes(lambda: hf_convert.hf_to_checkpoint(src, tmp_path / "ours", progress=False))
    assert peak_in < piece + 4 * (64 << 10) + (256 << 10), (peak_in, piece)

    peak_out = _numpy_peak_bytes(lambda: hf_convert.checkpoint_to_hf(tmp_path / "ours", tmp_path / "back",
                                                                     max_shard_size="3MB", progress=False))
    assert peak_out < piece // 2, (peak_out, piece)

    back = {}
    for shard in sorted(Path(tmp_path / "back").glob("*.safetensors")):
        back.update(load_file(shard))
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == BF16 and np.array_equal(back[name].view(np.uint16), value.view(np.uint16)), name


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_to_gguf_streams_in_row_blocks(synthetic_hf, tmp_path, monkeypatch, gguf_type):
    """--to-gguf reads, encodes and writes each tensor in blocks of rows (64 KiB of float32 here): the NumPy peak
    (the gguf quantizer's temporaries of one block, a few times its size) stays below one layer's piece of
    gate_up_proj (1 MiB), an eighth of the largest tensor in float32 (embed_tokens, 8 MiB here) that a
    tensor-at-a-time writer holds, plus its encoding; and the file holds every tensor exactly as
    `gguf.quants.quantize` encodes the whole source tensor (blocks of rows encode independently)."""
    gguf = pytest.importorskip("gguf")

    from phi4_jax.checkpoint import gguf_convert, hf_convert, store

    src, config, tensors = synthetic_hf
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 64 << 10)
    hf_convert.hf_to_checkpoint(src, tmp_path / "ours", progress=False)
    gguf_convert.checkpoint_to_gguf(tmp_path / "ours", tmp_path / "warm.gguf", gguf_type=gguf_type,
                                    progress=False, tokenizer=False)  # imports and first-call caches untraced
    piece = config.intermediate_size * config.hidden_size * BF16.itemsize
    largest_f32 = config.vocab_size * config.hidden_size * 4
    out = tmp_path / "out.gguf"
    peak = _numpy_peak_bytes(lambda: gguf_convert.checkpoint_to_gguf(tmp_path / "ours", out, gguf_type=gguf_type,
                                                                     progress=False, tokenizer=False))
    assert peak < piece <= largest_f32 // 8, (peak, piece)  # measured: 0.19 MiB (f16), 0.55 MiB (q8_0)

    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, value in tensors.items():
        t = written[gguf_convert.gguf_name_for_hf(name)]
        want = value.astype(np.float32) if value.ndim == 1 else gguf.quants.quantize(value.astype(np.float32), qtype)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      want.reshape(-1).view(np.uint8), err_msg=name)

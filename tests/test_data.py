"""The grain pipeline: sources, tokenization, weighted mixture, host sharding, packing, iterator state."""

import dataclasses
import json

import numpy as np
import pytest

from phi4_jax.data import demo as demo_data
from phi4_jax.data import pipeline, sources, tokenizing
from phi4_jax.special_tokens import ENDOFTEXT_ID, PAD_ID
from phi4_jax.train.config import DataConfig, SourceConfig

WEIGHTS = {"arithmetic": 40, "facts": 15, "stories": 15, "code": 20, "lessons": 10}
DEMO = DataConfig(tokenizer="demo_compact", shuffle_seed=3, sources=tuple(
    SourceConfig(name=g, type="demo", generator=g, weight=w) for g, w in WEIGHTS.items()))


class ByteTokenizer:
    """A stand-in tokenizer (bytes + 1, end = 0) so pipeline tests need no BPE."""
    endoftext_id = 0
    vocab_size = 257

    def encode_document(self, text):
        return np.append(np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 1, 0).astype(np.int32)


def test_mixture_hits_weights_on_every_host():
    # document weighting: the weights are shares of documents (token weighting: tests/test_tokenize_shards.py)
    by_docs = dataclasses.replace(DEMO, mixture_weighting="documents")
    docs = pipeline.mixed_documents(by_docs, ByteTokenizer(), 257)
    n = 20000
    counts = np.bincount([int(docs[i]["source"]) for i in range(n)], minlength=5)
    want = np.array(list(WEIGHTS.values()), float) / sum(WEIGHTS.values())
    np.testing.assert_allclose(counts / n, want, atol=0.01)
    # two hosts: disjoint shares of every source, each host's stream with the same proportions
    shards = [pipeline.mixed_documents(by_docs, ByteTokenizer(), 257, i, 2) for i in range(2)]
    for shard in shards:
        c = np.bincount([int(shard[i]["source"]) for i in range(n // 2)], minlength=5)
        np.testing.assert_allclose(c / (n // 2), want, atol=0.01)
    first = [[shard[i]["input_ids"].tobytes() for i in range(40)] for shard in shards]
    assert first[0] != first[1] and first[0] != [docs[i]["input_ids"].tobytes() for i in range(40)][:40:2]


def test_packing_segments_positions_and_stream():
    seq, rows = 96, 4
    it = iter(pipeline.packed_batches(DEMO, ByteTokenizer(), 257, seq, rows))
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert set(b) == {"input_ids", "segment_ids", "positions", "source_tokens"}
        assert all(b[k].shape == (rows, seq) and b[k].dtype == np.int32 for k in ("input_ids", "segment_ids",
                                                                              "positions"))
        # every token is counted once, under its source
        np.testing.assert_array_equal(b["source_tokens"].sum(1), (b["segment_ids"] > 0).sum(1))
    # rows are consecutive cuts of the concatenated document stream
    stream = np.concatenate([row for b in batches for row in b["input_ids"]])
    docs = pipeline.mixed_documents(DEMO, ByteTokenizer(), 257)
    expected = np.concatenate([docs[i]["input_ids"] for i in range(200)])[:stream.size]
    np.testing.assert_array_equal(stream, expected)
    for b in batches:
        for seg, pos, ids in zip(b["segment_ids"], b["positions"], b["input_ids"]):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and seg.min() >= 1
            for s in np.unique(seg):
                np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
            # every new segment (after the first) starts right after a document end
            starts = np.flatnonzero(np.diff(seg)) + 1
            assert np.all(ids[starts - 1] == ByteTokenizer.endoftext_id)


def test_iterator_state_restores_exactly():
    ds = pipeline.packed_batches(DEMO, ByteTokenizer(), 257, 64, 2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    want = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def test_demo_generators_are_deterministic_and_varied():
    for name in demo_data.GENERATORS:
        a = demo_data.SyntheticSource(name, seed=1)
        b = demo_data.SyntheticSource(name, seed=1)
        texts = [a[i]["text"] for i in range(30)]
        assert texts == [b[i]["text"] for i in range(30)]
        assert len(set(texts)) > 5
    with pytest.raises(ValueError, match="unknown demo generator"):
        demo_data.SyntheticSource("poems")


@pytest.fixture(scope="module")
def phi4():
    return tokenizing.Phi4TextTokenizer()


def test_file_sources_tokenize_with_phi4(tmp_path, phi4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["The first document.", "A second one, with <|im_end|> as plain text.", "Third."]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "b.txt").write_text("\n\n".join(texts) + "\n")
    pq.write_table(pa.table({"content": texts}), tmp_path / "c.parquet")
    stream = np.concatenate([phi4.encode_document(t) for t in texts]).astype(np.int32)
    np.save(tmp_path / "d.npy", stream)
    np.save(tmp_path / "e.npy", np.array([[5, 6, 7, PAD_ID], [8, 9, PAD_ID, PAD_ID]], np.int32))

    assert phi4.encode_document(texts[1])[-1] == ENDOFTEXT_ID
    assert 100265 not in phi4.encode_document(texts[1])  # special-token text in data stays plain text
    for src in (sources.JsonlSource(str(tmp_path / "a.jsonl")), sources.TextSource(str(tmp_path / "b.txt")),
                sources.ParquetSource(str(tmp_path / "c.parquet"), "content")):
        assert [src[i]["text"] for i in range(len(src))] == texts
    (tmp_path / "blank.jsonl").write_text("\n".join(json.dumps({"text": t}) + "\n" for t in texts))
    jsonl = sources.JsonlSource(str(tmp_path / "*.jsonl"))   # a.jsonl, then blank.jsonl (blank lines between)
    for start in (0, 2, 4):   # one sequential pass from any document, across files
        assert [d["text"] for d in jsonl.iter_documents(start)] == (texts + texts)[start:]
    npy = sources.TokenArraySource(str(tmp_path / "d.npy"), 100352)
    assert len(npy) == 3
    np.testing.assert_array_equal(npy[1]["tokens"], phi4.encode_document(texts[1]))
    rows = sources.TokenArraySource(str(tmp_path / "e.npy"), 100352)
    np.testing.assert_array_equal(rows[1]["tokens"], [8, 9])

    cfg = DataConfig(tokenizer="phi4", sources=(
        SourceConfig(name="j", type="jsonl", path=str(tmp_path / "a.jsonl"), weight=1),
        SourceConfig(name="n", type="npy", path=str(tmp_path / "d.npy"), weight=1)))
    batch = next(iter(pipeline.packed_batches(cfg, phi4, 100352, 32, 2)))
    assert batch["input_ids"].shape == (2, 32)
    assert phi4.decode(batch["input_ids"][0][:5]).strip()


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(sources.DataError, match="no files match"):
        sources.JsonlSource(str(tmp_path / "missing*.jsonl"))
    (tmp_path / "x.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(sources.DataError, match="no string field 'text'"):
        sources.JsonlSource(str(tmp_path / "x.jsonl"))[0]
    (tmp_path / "y.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(sources.DataError, match="invalid JSON"):
        sources.JsonlSource(str(tmp_path / "y.jsonl"))[0]
    np.save(tmp_path / "f.npy", np.array([1.5, 2.5]))
    with pytest.raises(sources.DataError, match="must be integers"):
        sources.TokenArraySource(str(tmp_path / "f.npy"), 10)


def test_compact_demo_tokenizer_round_trips():
    tok = tokenizing.make_tokenizer(DEMO)
    assert tok.vocab_size <= 256
    text = demo_data.SyntheticSource("stories", seed=3)[7]["text"]
    ids = tok.encode(text)
    assert tok.unk_id not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode_document(text)[-1] == tok.endoftext_id

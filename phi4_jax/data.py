"""Training data with grain: sources -> tokenize -> weighted mixture -> host shard -> pack -> batch.

Sources (random access, so grain can shuffle, shard and checkpoint them by index):
- ``jsonl``: one JSON object per line, text under `text_key` (files given by a path or glob);
- ``text``: plain text files, documents separated by blank lines;
- ``parquet``: a string column `text_key`;
- ``npy``: pre-tokenized ids: a 1-D array (a token stream, documents end at `<|endoftext|>`) or a 2-D
  array (one document per row, trailing pad ids dropped);
- ``demo``: built-in synthetic documents (`phi4_jax.demo_data`).

Each text document is tokenized with the phi-4 tokenizer (`encode_ordinary`: special-token text in the
data stays plain text) and ends with `<|endoftext|>`. Sources are shuffled, repeated, then mixed with
`grain.MapDataset.mix` in proportion to their weights (proportions of documents). Each host reads a
disjoint share of every source (every `process_count`-th document) and mixes it; concat-then-split packing (`ConcatThenSplitIterDataset`) fills
fixed-length rows with per-document `segment_ids` (1, 2, ...; 0 = padding) and `positions` restarting at 0,
and rows are batched. The whole pipeline is a deterministic function of the config; its iterator state is
a small dict saved with each checkpoint (`grain.checkpoint.CheckpointSave`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import grain
import numpy as np

from phi4_jax import demo_data

ENDOFTEXT_ID = 100257  # phi-4's <|endoftext|>: the document separator of the pretraining stream
PAD_ID = 100349        # phi-4's pad token (<|dummy_85|>)


class DataError(ValueError):
    """A data source that is missing, malformed, or inconsistent with the config."""


# ----------------------------------------------------------------------------- sources

def _files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataError(f"{what}: no files match {pattern!r}")
    return files


class JsonlSource:
    """Random access over the lines of jsonl files (line offsets are indexed once)."""

    def __init__(self, pattern: str, text_key: str = "text"):
        self.files = _files(pattern, "jsonl source")
        self.text_key = text_key
        self._index: list[tuple[int, int]] = []
        for fi, path in enumerate(self.files):
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self._index.append((fi, offset))
                    offset += len(line)
        if not self._index:
            raise DataError(f"jsonl source {pattern!r} has no records")

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        fi, offset = self._index[i]
        with open(self.files[fi], "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.files[fi]} at byte {offset}: invalid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
            raise DataError(f"{self.files[fi]} at byte {offset}: no string field {self.text_key!r}")
        return {"text": record[self.text_key]}


class TextSource:
    """Plain-text files; documents are separated by blank lines."""

    def __init__(self, pattern: str):
        self.docs: list[str] = []
        for path in _files(pattern, "text source"):
            with open(path, encoding="utf-8") as f:
                self.docs.extend(d.strip() for d in f.read().split("\n\n") if d.strip())
        if not self.docs:
            raise DataError(f"text source {pattern!r} has no documents")

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"text": self.docs[i]}


class ParquetSource:
    """A string column of parquet files."""

    def __init__(self, pattern: str, text_key: str = "text"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for path in _files(pattern, "parquet source"):
            try:
                tables.append(pq.read_table(path, columns=[text_key]))
            except (KeyError, pa.ArrowInvalid) as e:
                raise DataError(f"parquet file {path}: cannot read column {text_key!r} ({e})") from None
        self.column = pa.concat_tables(tables).column(text_key)
        if len(self.column) == 0:
            raise DataError(f"parquet source {pattern!r} has no rows")

    def __len__(self):
        return len(self.column)

    def __getitem__(self, i):
        return {"text": self.column[i].as_py()}


class TokenArraySource:
    """Pre-tokenized .npy arrays: 1-D streams split after each <|endoftext|>, or 2-D rows."""

    def __init__(self, pattern: str, vocab_size: int, eos_id: int = ENDOFTEXT_ID, pad_id: int = PAD_ID):
        self.spans: list[tuple[np.ndarray, int, int]] = []
        for path in _files(pattern, "npy source"):
            arr = np.load(path, mmap_mode="r")
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{path}: token arrays must be integers, got {arr.dtype}")
            if arr.ndim == 1:
                ends = np.flatnonzero(arr == eos_id) + 1
                starts = np.concatenate([[0], ends])
                ends = np.concatenate([ends, [arr.shape[0]]])
                self.spans.extend((arr, int(s), int(e)) for s, e in zip(starts, ends) if e > s)
            elif arr.ndim == 2:
                for row in range(arr.shape[0]):
                    r = np.asarray(arr[row])
                    keep = np.flatnonzero(r != pad_id)
                    if keep.size:
                        self.spans.append((arr[row], 0, int(keep[-1]) + 1))
            else:
                raise DataError(f"{path}: token arrays must be 1-D or 2-D, got shape {arr.shape}")
        if not self.spans:
            raise DataError(f"npy source {pattern!r} has no tokens")
        self.vocab_size = vocab_size

    def __len__(self):
        return len(self.spans)

    def __getitem__(self, i):
        arr, s, e = self.spans[i]
        tokens = np.asarray(arr[s:e], dtype=np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"npy document {i} has token ids outside [0, {self.vocab_size})")
        return {"tokens": tokens}


# ----------------------------------------------------------------------------- tokenizers

class Phi4TextTokenizer:
    """Documents -> int32 ids with the phi-4 tokenizer, ending in <|endoftext|>."""

    def __init__(self):
        from phi4_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer()
        self.vocab_size = self.tokenizer.n_vocab
        self.endoftext_id = ENDOFTEXT_ID

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode_ordinary(text) + [ENDOFTEXT_ID], np.int32)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


class CompactTokenizer:
    """The phi-4 tokenizer restricted to the ids a closed corpus uses, renumbered 0..n-1.

    For the CPU demo: the built-in documents use a few hundred phi-4 tokens, and a 100,352-row embedding
    and lm_head would dominate a 1M-parameter model's compute. Id 0 is padding, 1 is <|endoftext|>, 2 stands
    for any phi-4 token outside the corpus; text is tokenized by phi-4's BPE first, then renumbered.
    """

    def __init__(self, phi4_ids):
        from phi4_jax.tokenizer import Tokenizer

        self.tokenizer = Tokenizer()
        self.unk_id = 2
        self.endoftext_id = 1
        self.phi4_ids = [PAD_ID, ENDOFTEXT_ID, PAD_ID] + sorted(set(int(i) for i in phi4_ids)
                                                                 - {PAD_ID, ENDOFTEXT_ID})
        self._to_compact = {p: i for i, p in enumerate(self.phi4_ids) if i != 2}
        self.vocab_size = len(self.phi4_ids)

    @classmethod
    def for_demo_generators(cls, generators, docs_per_generator: int = 3000, seed: int = 0):
        from phi4_jax.tokenizer import Tokenizer

        tok = Tokenizer()
        ids = set()
        for name in generators:
            src = demo_data.SyntheticSource(name, seed=seed)
            for i in range(docs_per_generator):
                ids.update(tok.encode_ordinary(src[i]["text"]))
        return cls(ids)

    def encode(self, text: str) -> list[int]:
        return [self._to_compact.get(t, self.unk_id) for t in self.tokenizer.encode_ordinary(text)]

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text) + [self.endoftext_id], np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([self.phi4_ids[int(i)] for i in ids if 2 < int(i) < self.vocab_size])


def make_tokenizer(data_cfg):
    if data_cfg.tokenizer == "demo_compact":
        gens = [s.generator for s in data_cfg.sources if s.type == "demo"]
        if len(gens) != len(data_cfg.sources):
            raise DataError("data.tokenizer 'demo_compact' only works with demo sources")
        return CompactTokenizer.for_demo_generators(gens, seed=data_cfg.shuffle_seed)
    return Phi4TextTokenizer()


# ----------------------------------------------------------------------------- the pipeline

def open_source(src, vocab_size: int, seed: int):
    if src.type == "jsonl":
        return JsonlSource(src.path, src.text_key)
    if src.type == "text":
        return TextSource(src.path)
    if src.type == "parquet":
        return ParquetSource(src.path, src.text_key)
    if src.type == "npy":
        return TokenArraySource(src.path, vocab_size)
    if src.type == "demo":
        return demo_data.SyntheticSource(src.generator, seed=seed)
    raise DataError(f"unknown source type {src.type!r}")


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer, source_index: int):
        self.tokenizer, self.source_index = tokenizer, source_index

    def map(self, element):
        if "tokens" in element:
            tokens = element["tokens"]
        else:
            tokens = self.tokenizer.encode_document(element["text"])
        return {"input_ids": tokens, "source": np.int32(self.source_index)}


def mixed_documents(data_cfg, tokenizer, vocab_size: int, process_index: int = 0, process_count: int = 1):
    """The tokenized, shuffled, weighted, host-sharded document stream as a grain MapDataset of
    {"input_ids": int32 [n], "source": int32 index of the source}."""
    datasets, weights = [], []
    for i, src in enumerate(data_cfg.sources):
        seed = data_cfg.shuffle_seed + 1000 * i
        ds = grain.MapDataset.source(open_source(src, vocab_size, seed)).shuffle(seed=seed)
        if process_count > 1:
            # each host reads a disjoint share of every source (sharding the mixture instead would
            # skew the weights: the mixture interleaves sources in a fixed periodic pattern)
            if len(ds) < process_count:
                raise DataError(f"data source {src.name!r} has {len(ds)} documents, fewer than the "
                                f"{process_count} hosts")
            ds = ds[process_index::process_count]
        datasets.append(ds.repeat(None).map(_Tokenize(tokenizer, i)))
        weights.append(float(src.weight))
    return grain.MapDataset.mix(datasets, weights)


class _ToBatch(grain.transforms.Map):
    def map(self, element):
        return {"input_ids": element["input_ids"].astype(np.int32),
                "segment_ids": element["input_ids_segment_ids"].astype(np.int32),
                "positions": element["input_ids_positions"].astype(np.int32)}


def packed_batches(data_cfg, tokenizer, vocab_size: int, seq_len: int, host_batch: int,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Packed [host_batch, seq_len] batches {input_ids, segment_ids, positions} (int32 numpy)."""
    docs = mixed_documents(data_cfg, tokenizer, vocab_size, process_index, process_count)
    docs = docs.map(lambda e: {"input_ids": e["input_ids"]})
    packed = grain.experimental.ConcatThenSplitIterDataset(
        docs.to_iter_dataset(), length_struct={"input_ids": seq_len})
    return packed.map(_ToBatch()).batch(host_batch, drop_remainder=True)


def batch_iterator(data_cfg, tokenizer, vocab_size: int, seq_len: int, global_batch: int
                   ) -> Iterator[dict]:
    """This host's checkpointable iterator (`get_state` / `set_state`) over its share of each global batch."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise DataError(f"global batch {global_batch} is not divisible by the {count} hosts")
    return iter(packed_batches(data_cfg, tokenizer, vocab_size, seq_len, global_batch // count,
                               index, count))

"""Data sources with random access (so grain can shuffle, shard and checkpoint them by index).

- `JsonlSource`: one JSON object per line, text under `text_key` (files given by a path or glob);
- `TextSource`: plain text files, documents separated by blank lines;
- `ParquetSource`: a string column `text_key`;
- `TokenArraySource`: pre-tokenized ids in ``.npy``: a 1-D token stream (documents end at `<|endoftext|>`)
  or a 2-D array (one document per row, trailing pad ids dropped);
- the demo's synthetic documents (`phi4_jax.data.demo`);
- pre-tokenized ArrayRecord shards with a manifest (`phi4_jax.data.shards.TokenizedSource`).

File patterns may be local globs or cloud URLs (gs://bucket/corpus/*.jsonl); files are listed and opened through
`phi4_jax.paths`.

`open_source` builds one from a `[[data.sources]]` entry of the train config.
"""

from __future__ import annotations

import io
import json

import numpy as np

from phi4_jax import paths
from phi4_jax.data import demo as demo_data
from phi4_jax.special_tokens import ENDOFTEXT_ID, PAD_ID

# How a mixture's source weights are read: shares of tokens (the default, as the phi-4 report states its
# mixture) or of documents. Here, not in `pipeline`, so configs can check it without importing grain.
MIXTURE_WEIGHTINGS = ("tokens", "documents")


class DataError(ValueError):
    """A data source that is missing, malformed, or inconsistent with the config."""


# ----------------------------------------------------------------------------- sources

def _files(pattern: str, what: str) -> list[str]:
    try:
        files = paths.glob(pattern)
    except Exception as e:  # noqa: BLE001 - an unreachable bucket, bad credentials, ...
        raise DataError(f"{what}: cannot list {pattern!r}: {e}") from None
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
            with paths.open(path, "rb") as f:
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
        with paths.open(self.files[fi], "rb") as f:
            f.seek(offset)
            line = f.readline()
        return self._record(line, fi, offset)

    def iter_documents(self, start: int = 0):
        """Documents `start`, `start + 1`, ... in order, each file opened once and read sequentially (for
        one pass, e.g. pre-tokenizing; `__getitem__` opens and seeks per document)."""
        f, current, pos = None, None, None
        try:
            for fi, offset in self._index[start:]:
                if fi != current:
                    if f is not None:
                        f.close()
                    f, current, pos = paths.open(self.files[fi], "rb"), fi, None
                if pos != offset:
                    f.seek(offset)
                line = f.readline()
                pos = offset + len(line)
                yield self._record(line, fi, offset)
        finally:
            if f is not None:
                f.close()

    def _record(self, line: bytes, fi: int, offset: int) -> dict:
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
            with paths.open(path, "rb") as f:
                text = f.read().decode("utf-8").replace("\r\n", "\n")
                self.docs.extend(d.strip() for d in text.split("\n\n") if d.strip())
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
                with paths.open(path, "rb") as f:
                    tables.append(pq.read_table(f, columns=[text_key]))
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
            # Local files are memory-mapped; a cloud object is read into memory.
            arr = (np.load(io.BytesIO(paths.read_bytes(path))) if paths.is_url(path)
                   else np.load(path, mmap_mode="r"))
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


def open_source(src, vocab_size: int, seed: int, tokenizer_fingerprint: str | None = None):
    """The random-access source for a `[[data.sources]]` entry; a "tokenized" one (the manifest of
    `phi4_jax.data.shards`, source `src.name`) must have been made with `tokenizer_fingerprint`."""
    if src.type == "tokenized":
        from phi4_jax.data.shards import TokenizedSource

        if tokenizer_fingerprint is None:
            raise DataError(f"data source {src.name!r}: a tokenized source needs a tokenizer with a fingerprint")
        return TokenizedSource(src.path, src.name, tokenizer_fingerprint=tokenizer_fingerprint)
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

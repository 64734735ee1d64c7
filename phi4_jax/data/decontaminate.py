"""Decontamination: drop training documents or SFT/DPO examples that overlap evaluation sets (phi-4's hybrid n-grams).

Words are the runs of letters and digits of the NFKC-normalized, lower-cased text (`words`). Each word gets a stable
64-bit hash (blake2b, memoized per process) and an n-gram's hash is the polynomial sum_j h(w_j) * P^(n-1-j) modulo
2^64, computed for all positions at once with NumPy (`ngram_hashes`).

The index (`EvalIndex`) holds, for every evaluation item, its word 13-grams (`ngram`) and, when the item has fewer than
`short_threshold` words (a short question has few or no 13-grams), also its 7-grams (`short_ngram`); an item with
fewer than `short_ngram` words cannot be matched and is counted as too short. A document is contaminated when one of
its 13-grams is a 13-gram of the index or one of its 7-grams is a short item's 7-gram; the first such n-gram, and the
evaluation item it came from, are reported.

Inputs stream through a process pool in chunks (`decontaminate_file`); the kept documents are written in their input
order, in the input's format (JSONL and text line by line, byte for byte; parquet by row batches), to a temporary
file renamed into place when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
import unicodedata
from typing import Iterator

import numpy as np

from phi4_jax.data.sources import DataError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet"}
_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)    # odd multiplier of the polynomial n-gram hash


class DecontaminationError(DataError):
    """Bad decontamination input: a missing or unreadable file, an empty evaluation set, an unknown format."""


def words(text: str) -> list[str]:
    """The normalized words of a text: NFKC, lower case, runs of letters/digits (punctuation and spacing ignored)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


_WORD_HASHES: dict[str, int] = {}
MAX_CACHED_WORDS = 4_000_000


def word_hashes(ws: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of words (blake2b; the same in every process and run), memoized per process."""
    cache = _WORD_HASHES
    get = cache.get
    hashes = [get(w) for w in ws]
    if None in hashes:
        if len(cache) + len(ws) > MAX_CACHED_WORDS:
            cache.clear()
        for i, h in enumerate(hashes):
            if h is None:
                w = ws[i]
                hashes[i] = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return np.array(hashes, dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every n-gram of a word-hash sequence ([len - n + 1], empty when shorter than n)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, np.uint64)
    out = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = out * _P + hashes[j:j + count]
    return out


def record_text(record, field: str | None) -> str:
    """The text of a JSONL record: `field`'s value (a string, or a list of chat messages whose contents are joined),
    or with no field every string in the record (messages, prompt/chosen/rejected, question/answer...)."""
    if field is not None:
        if not isinstance(record, dict) or field not in record:
            raise KeyError(field)
        record = record[field]
    parts: list[str] = []

    def collect(value):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)
    collect(record)
    return "\n".join(parts)


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise DecontaminationError(f"{path}: unknown format {ext!r}: use .jsonl, .json (JSON lines), .txt (one "
                                   "document per line) or .parquet")
    return FORMATS[ext]


def _parquet_column(path: str, field: str | None) -> str:
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    column = field or ("text" if "text" in names else None)
    if column is None or column not in names:
        raise DecontaminationError(f"{path}: no column {column or 'text'!r} (columns: {', '.join(names)}); "
                                   "pick one with --field")
    return column


def iter_items(path: str, field: str | None) -> Iterator[tuple[int, str | None, str]]:
    """(line or row number from 1, an error message or None, text) for each item of an evaluation file."""
    if not os.path.isfile(path):
        raise DecontaminationError(f"{path}: no such file")
    kind = file_format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        column = _parquet_column(path, field)
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                number += 1
                yield number, None, record_text(value, None) if value is not None else ""
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if kind == "txt":
                yield number, None, line
                continue
            try:
                yield number, None, record_text(json.loads(line), field)
            except json.JSONDecodeError as e:
                yield number, f"not valid JSON ({e.msg})", ""
            except KeyError:
                yield number, f"no field {field!r}", ""


@dataclasses.dataclass
class EvalItem:
    file: str
    line: int


@dataclasses.dataclass
class EvalIndex:
    """Sorted n-gram hashes of the evaluation sets and, for each, the (first) item it came from."""
    ngram: int
    short_ngram: int
    long_hashes: np.ndarray      # sorted unique 13-gram hashes
    long_items: np.ndarray       # item index of each
    short_hashes: np.ndarray     # sorted unique 7-gram hashes of short items
    short_items: np.ndarray
    items: list[EvalItem]
    counts: dict                 # items, long (13-grams), short (7-grams too), too_short, unreadable


def _sorted_unique(hashes: list[np.ndarray], items: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    h, it = np.concatenate(hashes), np.concatenate(items)
    order = np.argsort(h, kind="stable")
    h, it = h[order], it[order]
    first = np.ones(len(h), bool)
    first[1:] = h[1:] != h[:-1]
    return h[first], it[first]


def build_index(eval_paths: list[str], *, field: str | None = None, ngram: int = 13, short_ngram: int = 7,
                short_threshold: int = 20, log=lambda message: None) -> EvalIndex:
    """The n-gram index of the evaluation files; raises DecontaminationError for a missing file or one with no
    usable item (an empty evaluation set)."""
    if not 1 <= short_ngram <= ngram:
        raise DecontaminationError(f"need 1 <= --short-ngram ({short_ngram}) <= --ngram ({ngram})")
    items: list[EvalItem] = []
    long_h, long_i, short_h, short_i = [], [], [], []
    counts = {"items": 0, "long": 0, "short": 0, "too_short": 0, "unreadable": 0}
    for path in eval_paths:
        usable = 0
        for number, error, text in iter_items(path, field):
            if error is not None:
                counts["unreadable"] += 1
                log(f"eval {path}:{number}: skipped: {error}")
                continue
            hashes = word_hashes(words(text))
            if len(hashes) < short_ngram:
                counts["too_short"] += 1
                continue
            index = len(items)
            items.append(EvalItem(path, number))
            usable += 1
            if len(hashes) >= ngram:
                g = ngram_hashes(hashes, ngram)
                long_h.append(g)
                long_i.append(np.full(len(g), index, np.int64))
                counts["long"] += 1
            if len(hashes) < short_threshold:
                g = ngram_hashes(hashes, short_ngram)
                short_h.append(g)
                short_i.append(np.full(len(g), index, np.int64))
                counts["short"] += 1
        if usable == 0:
            raise DecontaminationError(f"evaluation set {path} has no item of at least {short_ngram} words "
                                       "(empty, unreadable, or only very short items): nothing to match against")
    counts["items"] = len(items)
    lh, li = _sorted_unique(long_h, long_i)
    sh, si = _sorted_unique(short_h, short_i)
    return EvalIndex(ngram, short_ngram, lh, li, sh, si, items, counts)


def match_documents(texts: list[str | None], index: EvalIndex) -> list[tuple[int, int, str] | None]:
    """For each text (None: skip it), the first overlap with the index as (eval item index, n, the matched n-gram's
    words), or None: its first 13-gram in the index, else its first short-item 7-gram.

    The whole batch is hashed as one concatenated word sequence, n-grams that cross a document boundary are masked
    out, and one sorted-table lookup covers every n-gram of the batch."""
    word_lists = [words(t) if t is not None else [] for t in texts]
    lengths = np.array([len(ws) for ws in word_lists], np.int64)
    flat = [w for ws in word_lists for w in ws]
    hashes = word_hashes(flat)
    ends = np.cumsum(lengths)
    doc_of_word = np.repeat(np.arange(len(texts)), lengths)
    results: list[tuple[int, int, str] | None] = [None] * len(texts)
    for n, table, owners in ((index.ngram, index.long_hashes, index.long_items),
                             (index.short_ngram, index.short_hashes, index.short_items)):
        grams = ngram_hashes(hashes, n)
        if len(table) == 0 or len(grams) == 0:
            continue
        doc = doc_of_word[:len(grams)]
        pos = np.minimum(np.searchsorted(table, grams), len(table) - 1)
        hits = np.flatnonzero((table[pos] == grams) & (np.arange(len(grams)) + n <= ends[doc]))
        for at in hits:
            d = int(doc[at])
            if results[d] is None:
                results[d] = (int(owners[pos[at]]), n, " ".join(flat[at:at + n]))
    return results


# ----------------------------------------------------------------------------- streaming a file through a pool

_INDEX: EvalIndex | None = None


def _init_worker(index: EvalIndex) -> None:
    global _INDEX
    _INDEX = index


def _judge_chunk(texts: list[str | None]) -> list[tuple[int, int, str] | None]:
    return match_documents(texts, _INDEX)


def _chunks(path: str, kind: str, field: str | None, chunk: int):
    """Chunks of (payload to write if kept, text or None when unreadable, number, error) in input order."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        column = _parquet_column(path, field)
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk):
            values = batch.column(column).to_pylist()
            rows = []
            for i, value in enumerate(values):
                number += 1
                rows.append((i, record_text(value, None) if value is not None else "", number, None))
            yield batch, rows
        return
    with open(path, "rb") as f:
        rows = []
        for number, raw in enumerate(f, 1):
            if kind == "txt":
                rows.append((raw, raw.decode("utf-8", "replace"), number, None))
            elif not raw.strip():
                rows.append((raw, "", number, None))
            else:
                try:
                    rows.append((raw, record_text(json.loads(raw), field), number, None))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    rows.append((raw, None, number, f"not valid JSON ({getattr(e, 'msg', e)})"))
                except KeyError:
                    rows.append((raw, None, number, f"no field {field!r}"))
            if len(rows) == chunk:
                yield None, rows
                rows = []
        if rows:
            yield None, rows


@dataclasses.dataclass
class FileResult:
    input: str
    output: str
    documents: int = 0
    kept: int = 0
    removed: int = 0
    skipped: int = 0          # unreadable records: not kept, listed in the report


def open_pool(index: EvalIndex, workers: int):
    """A pool of `workers` processes holding the index (None for 1: work in this process). Forked where the platform
    can (the children start at once with the index in memory), else spawned (they import this module)."""
    _init_worker(index)
    if workers <= 1:
        return None
    return multiprocessing.get_context(_start_method()).Pool(workers, _init_worker, (index,))


def _start_method() -> str:
    """"fork" unless the platform lacks it or JAX's backends (and their threads) are up in this process: forking
    a multithreaded JAX process can deadlock the child, so then "spawn"."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return "spawn"
    return "fork"


def decontaminate_file(path: str, out_path: str, index: EvalIndex, report, *, field: str | None = None,
                       pool=None, chunk: int = 2000, read_ahead: int = 8, progress=None) -> FileResult:
    """Writes the documents of `path` that do not overlap the index to `out_path` (same format, atomically) and one
    report line per removed or skipped document to the open file `report`; `pool` from `open_pool` (None: here)."""
    if not os.path.isfile(path):
        raise DecontaminationError(f"{path}: no such file")
    kind = file_format(path)
    result = FileResult(path, out_path)
    tmp = out_path + ".partial"
    if pool is None:
        _init_worker(index)
    writer = sink = None
    pending: collections.deque = collections.deque()

    def handle(batch, rows, found):
        nonlocal writer
        keep_mask = []
        for (payload, _text, number, error), match in zip(rows, found):
            result.documents += 1
            if error is not None:
                result.skipped += 1
                report.write(json.dumps({"input": path, "line": number, "skipped": error}) + "\n")
                keep_mask.append(False)
            elif match is not None:
                owner, n, gram = match
                item = index.items[owner]
                result.removed += 1
                report.write(json.dumps({"input": path, "line": number, "eval_file": item.file,
                                         "eval_line": item.line, "n": n, "ngram": gram}) + "\n")
                keep_mask.append(False)
            else:
                result.kept += 1
                keep_mask.append(True)
                if sink is not None:
                    sink.write(payload)
        if kind == "parquet":
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema)
            writer.write_table(pa.Table.from_batches([batch.filter(pa.array(keep_mask, pa.bool_()))]))
        if progress is not None:
            progress(len(rows))

    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
        else:
            sink = open(tmp, "wb")
        for batch, rows in _chunks(path, kind, field, chunk):
            texts = [text for _, text, _, _ in rows]
            if pool is None:
                handle(batch, rows, _judge_chunk(texts))
                continue
            pending.append((batch, rows, pool.apply_async(_judge_chunk, (texts,))))
            if len(pending) > read_ahead:        # chunks in flight are bounded; results are written in input order
                batch_, rows_, job = pending.popleft()
                handle(batch_, rows_, job.get())
        while pending:
            batch_, rows_, job = pending.popleft()
            handle(batch_, rows_, job.get())
        if kind == "parquet" and writer is None:   # no rows at all: an empty file with the input's schema
            writer = pq.ParquetWriter(tmp, pq.ParquetFile(path).schema_arrow)
    except BaseException:
        for open_file in (writer, sink):
            if open_file is not None:
                open_file.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if writer is not None:
        writer.close()
    if sink is not None:
        sink.close()
    os.replace(tmp, out_path)
    return result

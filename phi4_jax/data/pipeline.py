"""The training data pipeline with grain: sources -> tokenize -> weighted mixture -> host shard -> pack -> batch.

Sources are shuffled, repeated, then mixed with `grain.MapDataset.mix`. `data.mixture_weighting = "tokens"`
(the default) makes the weights shares of training tokens, as the phi-4 report states its mixture: each source is
drawn with probability proportional to weight / mean tokens per document, the mean read from a tokenized
source's manifest or measured on `data.mixture_sample_docs` shuffled documents of any other source (the same
sample on every host). `"documents"` makes the weights shares of documents. Each host reads a disjoint share of
every source (every `process_count`-th document) and mixes it; concat-then-split packing
(`ConcatThenSplitIterDataset`) fills fixed-length rows with per-document `segment_ids` (1, 2, ...; 0 = padding)
and `positions` restarting at 0, and rows are batched. Each batch also carries `source_tokens` [rows, sources]:
how many of each row's tokens came from each source (the realised mixture the trainer logs). The whole
pipeline is a deterministic function of the config and the host count; its iterator state is a small dict
saved with each checkpoint (`grain.checkpoint.CheckpointSave`), one per host, so a checkpoint resumes only on
the host count that wrote it (`check_resume_hosts`).
"""

from __future__ import annotations

import re
from typing import Iterator

import grain
import numpy as np

from phi4_jax.data.sources import MIXTURE_WEIGHTINGS, DataError, open_source


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer, source_index: int):
        self.tokenizer, self.source_index = tokenizer, source_index

    def map(self, element):
        if "tokens" in element:
            tokens = element["tokens"]
        else:
            tokens = self.tokenizer.encode_document(element["text"])
        return {"input_ids": tokens, "source": np.int32(self.source_index)}




def mean_document_tokens(source, docs: grain.MapDataset, sample_docs: int) -> float:
    """Mean tokens per document: from a tokenized source's manifest, else over the first `sample_docs` of
    `docs` (the shuffled, tokenized documents)."""
    if hasattr(source, "mean_document_tokens"):
        return float(source.mean_document_tokens)
    n = min(len(docs), sample_docs)
    return float(np.mean([len(docs[i]["input_ids"]) for i in range(n)]))


def mixture_weights(data_cfg, means: list[float]) -> list[float]:
    """The per-document sampling weights that make `data_cfg.sources` weights shares of tokens or documents."""
    weighting = getattr(data_cfg, "mixture_weighting", "tokens")
    if weighting not in MIXTURE_WEIGHTINGS:
        raise DataError(f"data.mixture_weighting must be one of {MIXTURE_WEIGHTINGS}, got {weighting!r}")
    weights = [float(src.weight) for src in data_cfg.sources]
    for src, w in zip(data_cfg.sources, weights):
        if not (np.isfinite(w) and w > 0):
            raise DataError(f"data source {src.name!r}: mixture weight must be positive, got {src.weight!r}")
    if weighting == "documents":
        return weights
    return [w / m for w, m in zip(weights, means)]


def mixed_documents(data_cfg, tokenizer, vocab_size: int, process_index: int = 0, process_count: int = 1):
    """The tokenized, shuffled, weighted, host-sharded document stream as a grain MapDataset of
    {"input_ids": int32 [n], "source": int32 index of the source}."""
    datasets, means = [], []
    sample_docs = getattr(data_cfg, "mixture_sample_docs", 256)
    for i, src in enumerate(data_cfg.sources):
        seed = data_cfg.shuffle_seed + 1000 * i
        opened = open_source(src, vocab_size, seed, getattr(tokenizer, "fingerprint", None))
        if len(opened) == 0:
            raise DataError(f"data source {src.name!r} has no documents")
        ds = grain.MapDataset.source(opened).shuffle(seed=seed)
        means.append(mean_document_tokens(opened, ds.map(_Tokenize(tokenizer, i)), sample_docs))
        if process_count > 1:
            # each host reads a disjoint share of every source (sharding the mixture instead would
            # skew the weights: the mixture interleaves sources in a fixed periodic pattern)
            if len(ds) < process_count:
                raise DataError(f"data source {src.name!r} has {len(ds)} documents, fewer than the "
                                f"{process_count} hosts")
            ds = ds[process_index::process_count]
        datasets.append(ds.repeat(None).map(_Tokenize(tokenizer, i)))
    return grain.MapDataset.mix(datasets, mixture_weights(data_cfg, means))


class _ToBatch(grain.transforms.Map):
    def __init__(self, num_sources: int):
        self.num_sources = num_sources

    def map(self, element):
        return {"input_ids": element["input_ids"].astype(np.int32),
                "segment_ids": element["input_ids_segment_ids"].astype(np.int32),
                "positions": element["input_ids_positions"].astype(np.int32),
                "source_tokens": np.bincount(element["source_ids"],
                                             minlength=self.num_sources + 1)[1:].astype(np.int32)}


def _with_source_ids(element):
    ids = element["input_ids"]
    return {"input_ids": ids, "source_ids": np.full(len(ids), element["source"] + 1, np.int32)}


def packed_batches(data_cfg, tokenizer, vocab_size: int, seq_len: int, host_batch: int,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Packed [host_batch, seq_len] batches {input_ids, segment_ids, positions} (int32 numpy), plus
    `source_tokens` [host_batch, number of sources]: the tokens of each row from each source."""
    docs = mixed_documents(data_cfg, tokenizer, vocab_size, process_index, process_count).map(_with_source_ids)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        docs.to_iter_dataset(), length_struct={"input_ids": seq_len, "source_ids": seq_len})
    return packed.map(_ToBatch(len(data_cfg.sources))).batch(host_batch, drop_remainder=True)


def host_batches(data_cfg, tokenizer, vocab_size: int, seq_len: int, global_batch: int) -> grain.IterDataset:
    """This host's share of each global batch, as a grain IterDataset (its iterators are checkpointable)."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise DataError(f"global batch {global_batch} is not divisible by the {count} hosts")
    return packed_batches(data_cfg, tokenizer, vocab_size, seq_len, global_batch // count, index, count)


def batch_iterator(data_cfg, tokenizer, vocab_size: int, seq_len: int, global_batch: int
                   ) -> Iterator[dict]:
    """This host's checkpointable iterator (`get_state` / `set_state`) over its share of each global batch."""
    return iter(host_batches(data_cfg, tokenizer, vocab_size, seq_len, global_batch))


def check_resume_hosts(data_dir, process_count: int) -> None:
    """Refuses to restore data iterators saved by a different number of hosts (DataError).

    Each host's document stream is a function of the host count (every `process_count`-th document of each
    source), so no iterator state of an N-host run describes where an M-host run should continue. `data_dir`
    is a checkpoint's `data` item (an `etils.epath.Path` or local path) holding `process_I-of-N.json` files."""
    from etils import epath

    counts = set()
    for f in epath.Path(data_dir).glob("process_*-of-*.json"):
        m = re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name)
        if m:
            counts.add(int(m.group(1)))
    if counts and counts != {process_count}:
        saved = ", ".join(str(c) for c in sorted(counts))
        raise DataError(f"the checkpoint's data iterators ({data_dir}) were saved by {saved} host(s) but this "
                        f"run has {process_count}: each host's share of the data depends on the host count, "
                        "so the run cannot continue from the same position. Resume on the same number of "
                        "hosts, or start a new workdir with train.init_from pointing at the checkpoint")

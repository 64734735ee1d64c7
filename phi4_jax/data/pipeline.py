"""The training data pipeline with grain: sources -> tokenize -> weighted mixture -> host shard -> pack -> batch.

Sources are shuffled, repeated, then mixed with `grain.MapDataset.mix` in proportion to their weights
(proportions of documents). Each host reads a disjoint share of every source (every `process_count`-th
document) and mixes it; concat-then-split packing (`ConcatThenSplitIterDataset`) fills fixed-length rows with
per-document `segment_ids` (1, 2, ...; 0 = padding) and `positions` restarting at 0, and rows are batched. The
whole pipeline is a deterministic function of the config; its iterator state is a small dict saved with each
checkpoint (`grain.checkpoint.CheckpointSave`).
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from phi4_jax.data.sources import DataError, open_source


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

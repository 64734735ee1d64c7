"""Training data: sources, document tokenizing, mixing, packing, and the demo's synthetic corpus.

- `sources`: random-access sources (jsonl, text, parquet, pre-tokenized npy) and `open_source`.
- `tokenizing`: document tokenizers (phi-4 BPE; the demo's compact renumbering).
- `pipeline`: the grain pipeline: tokenize -> weighted mixture -> host shard -> pack -> batch, checkpointable.
- `demo`: built-in synthetic "textbook" documents for `python train.py`.
- `decontaminate`: removal of documents sharing word 13-grams (7-grams for short items) with evaluation sets.

May import: `phi4_jax.tokenizer`, `phi4_jax.special_tokens`, `phi4_jax.paths` (files and cloud URLs), grain, numpy,
pyarrow. Not the model or training.
"""

"""Training data: sources, document tokenizing, mixing, packing, and the demo's synthetic corpus.

- `sources`: random-access sources (jsonl, text, parquet, pre-tokenized npy or shards) and `open_source`.
- `jsonl`: `jsonl_objects`, a JSONL file's objects located as FILE:LINE, a bad line raised or skipped and counted.
- `tokenizing`: document tokenizers (phi-4 BPE; the demo's compact renumbering).
- `pipeline`: the grain pipeline: tokenize -> weighted mixture -> host shard -> pack -> batch, checkpointable.
- `shards`: pre-tokenized corpora (ArrayRecord shards + manifest): writing on several processes, reading;
  `tokenize` is its command line (`python -m phi4_jax.data.tokenize`, in `phi4_jax.cli.tokenize`).
- `demo`: built-in synthetic "textbook" documents for `python train.py`.
- `decontaminate`: removal of documents sharing word 13-grams (7-grams for short items) with evaluation sets.

May import: `phi4_jax.tokenizer`, `phi4_jax.special_tokens`, `phi4_jax.paths` (files and cloud URLs), grain, numpy,
pyarrow (and, in the thin `tokenize` entry point only, `phi4_jax.cli.tokenize`). Not the model or training.
"""

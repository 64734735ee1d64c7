"""Pre-tokenize a corpus into ArrayRecord token shards: `python -m phi4_jax.data.tokenize`.

    python -m phi4_jax.data.tokenize --config CFG.toml --out DIR [--shard-tokens N] [--workers P]
    python -m phi4_jax.data.tokenize --source [NAME=]TYPE:PATTERN ... --out DIR [--text-key KEY] ...

`--config` takes the `[[data.sources]]` of a training config (jsonl, text, parquet or npy sources);
`--source` names them on the command line (TYPE one of jsonl, text, parquet, npy; NAME defaults to
TYPE plus its position). Shards hold whole documents, so the same output serves any training `seq_len`.
Running the same command again resumes an interrupted run. Train on the result with a source
`type = "tokenized"`, `path = "DIR/manifest.json"` and the same `name` (see `phi4_jax.data.shards`).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phi4_jax.data.tokenize", description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a training config whose [[data.sources]] to tokenize")
    what.add_argument("--source", action="append", metavar="[NAME=]TYPE:PATTERN",
                      help="a source to tokenize (repeatable), e.g. web=jsonl:data/web/*.jsonl")
    p.add_argument("--out", required=True, help="output directory (manifest.json and shards/)")
    p.add_argument("--text-key", default="text", help="jsonl/parquet field with the text (--source only)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16,777,216)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizing processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.shard_tokens < 1:
        p.error(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if args.workers < 1:
        p.error(f"--workers must be positive, got {args.workers}")
    return args


def corpus_from_args(args):
    from phi4_jax.data.shards import CorpusSource
    from phi4_jax.data.sources import DataError

    if args.config:
        from phi4_jax.train.config import load_train_config

        cfg = load_train_config(args.config)
        return [CorpusSource(s.name, s.type, s.path or "", s.text_key) for s in cfg.data.sources]
    corpus = []
    for i, item in enumerate(args.source):
        name, eq, spec = item.rpartition("=") if "=" in item.split(":", 1)[0] else ("", "", item)
        kind, colon, pattern = spec.partition(":")
        if not colon or not kind or not pattern:
            raise DataError(f"--source {item!r} must look like [NAME=]TYPE:PATTERN (e.g. web=jsonl:data/*.jsonl)")
        corpus.append(CorpusSource(name if eq else f"{kind}{i}", kind, pattern, args.text_key))
    return corpus


def main(argv=None) -> int:
    args = parse_args(argv)
    from phi4_jax.data.shards import tokenize_corpus
    from phi4_jax.data.sources import DataError
    from phi4_jax.tokenizer import TokenizerError
    from phi4_jax.train.config import TrainConfigError

    try:
        manifest = tokenize_corpus(corpus_from_args(args), args.out, shard_tokens=args.shard_tokens,
                                   workers=args.workers, progress=not args.no_progress,
                                   log=lambda m: print(m, file=sys.stderr))
    except (DataError, TrainConfigError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for name, src in manifest["sources"].items():
        print(f"{name}: {src['documents']:,} documents, {src['tokens']:,} tokens, {len(src['shards'])} shards")
    print(os.path.join(args.out, "manifest.json"))
    return 0

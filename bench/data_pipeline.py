"""Data pipeline speed on this machine: pre-tokenizing a corpus, and packed training batches read from the shards,
against what one TPU v5p host (4 chips) consumes training phi-4 14B at 4K.

    python bench/data_pipeline.py                        # ~4M tokens of synthetic English documents
    python bench/data_pipeline.py --write BENCHMARKS.md  # also append the results to "Data pipeline"

1. A corpus of jsonl files is written: documents of 5 to 60 of the demo's synthetic "textbook" texts each
   (`phi4_jax.data.demo`), so lengths vary from about a hundred to a few thousand tokens.
2. Tokenizer CLI: `phi4_jax.data.shards.tokenize_corpus` with `--workers` processes (what
   `python -m phi4_jax.data.tokenize` runs), wall time including process start-up and writing the shards;
   peer in the same run: tiktoken's own `encode_ordinary_batch` over the same texts in memory, with as many
   threads (the BPE alone, no reading or writing).
3. Training input: `phi4_jax.data.pipeline.packed_batches` (shuffle, token-weighted mixture, host share, pack
   into `--seq-len` rows, batch) reading the shards, one host's batches of `--host-batch` rows, timed over
   `--batches` batches after the first; peer in the same run: the same pipeline over the raw jsonl files
   (tokenizing on the fly, as training without pre-tokenized shards does).
4. Target: tokens/s one v5p host consumes = MFU x peak FLOP/s per chip x 4 chips / training FLOPs per token,
   with MFU 0.55 (DESIGN.md's training target), 459 TFLOP/s bf16 per v5p chip and the FLOPs per token of the
   14B model at 4K from `phi4_jax.train.mfu.training_flops_per_token` (6 x matmul parameters + causal
   attention).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import publish, run_heading  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402

MFU_TARGET = 0.55            # DESIGN.md: training at >= 55% MFU
V5P_PEAK = 459e12            # bf16 dense FLOP/s per TPU v5p chip
CHIPS_PER_HOST = 4
SECTION_KEY, SECTION_HEADING = "data-pipeline", "Data pipeline"
SECTION_INTRO = """`bench/data_pipeline.py`: tokens/s of the tokenizer CLI (`python -m phi4_jax.data.tokenize`) against
tiktoken's in-memory batch encoder, and of one host's packed training batches read from pre-tokenized ArrayRecord
shards against the same pipeline tokenizing raw jsonl on the fly, both against what one TPU v5p host (4 chips)
consumes training phi-4 14B at 4K at 55% MFU. Each run appends a table below."""


def v5p_host_tokens_per_s(seq_len: int) -> tuple[float, float]:
    """(tokens/s one v5p host consumes for the 14B model at `seq_len`, training FLOPs per token)."""
    from phi4_jax.model.config import get_preset
    from phi4_jax.train.mfu import training_flops_per_token

    flops = training_flops_per_token(get_preset("phi4-14b"), seq_len)
    return MFU_TARGET * V5P_PEAK * CHIPS_PER_HOST / flops, flops


def write_corpus(root: str, docs: int, files: int, seed: int = 0) -> list[str]:
    from phi4_jax.data import demo

    rng = random.Random(seed)
    gens = [demo.SyntheticSource(name, seed=seed) for name in demo.GENERATORS]
    texts, k = [], 0
    for _ in range(docs):
        parts = []
        for _ in range(rng.randint(5, 60)):
            parts.append(gens[k % len(gens)][k]["text"])
            k += 1
        texts.append("\n\n".join(parts))
    for f in range(files):
        with open(os.path.join(root, f"part{f}.jsonl"), "w") as out:
            out.writelines(json.dumps({"text": t}) + "\n" for t in texts[f::files])
    return texts


def time_batches(it, n: int) -> float:
    next(it)   # opening the sources, estimating the mixture, the first batch
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--host-batch", type=int, default=8, help="rows per batch read by the host")
    p.add_argument("--batches", type=int, default=40, help="timed batches (after the first)")
    p.add_argument("--raw-batches", type=int, default=5, help="timed batches of the on-the-fly peer")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)

    from phi4_jax.data import pipeline, shards
    from phi4_jax.data.tokenizing import Phi4TextTokenizer
    from phi4_jax.train.config import DataConfig, SourceConfig

    machine = describe_machine(with_load=True)
    target, flops = v5p_host_tokens_per_s(args.seq_len)
    tok = Phi4TextTokenizer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="phi4_data_bench_") as root:
        texts = write_corpus(root, args.docs, args.files)
        t0 = time.perf_counter()
        ids = tok.tokenizer.encoding.encode_ordinary_batch(texts, num_threads=args.workers)
        peer_s = time.perf_counter() - t0
        n_tokens = sum(map(len, ids)) + len(ids)
        t0 = time.perf_counter()
        manifest = shards.tokenize_corpus([shards.CorpusSource("corpus", "jsonl", os.path.join(root, "*.jsonl"))],
                                          os.path.join(root, "tokenized"), shard_tokens=1 << 20,
                                          workers=args.workers, progress=False, log=lambda m: None)
        cli_s = time.perf_counter() - t0
        assert manifest["sources"]["corpus"]["tokens"] == n_tokens
        rows.append(("tokenizer CLI, shards written (wall, incl. process start-up)", n_tokens / cli_s))
        rows.append((f"peer: tiktoken encode_ordinary_batch in memory, {args.workers} threads", n_tokens / peer_s))

        def batches(src):
            cfg = DataConfig(tokenizer="phi4", sources=(src,))
            return iter(pipeline.packed_batches(cfg, tok, tok.vocab_size, args.seq_len, args.host_batch))

        per_batch = args.seq_len * args.host_batch
        tokenized = SourceConfig(name="corpus", type="tokenized", weight=1,
                                 path=os.path.join(root, "tokenized", "manifest.json"))
        rows.append(("packed batches from the shards, one host", per_batch * args.batches /
                     time_batches(batches(tokenized), args.batches)))
        raw = SourceConfig(name="corpus", type="jsonl", weight=1, path=os.path.join(root, "*.jsonl"))
        rows.append(("peer: packed batches tokenizing the jsonl on the fly", per_batch * args.raw_batches /
                     time_batches(batches(raw), args.raw_batches)))
    rows.append((f"target: one TPU v5p host, 14B at {args.seq_len} ({MFU_TARGET:.0%} MFU x 4 x 459 TFLOP/s "
                 f"/ {flops / 1e9:.1f} GFLOP per token)", target))

    lines = [run_heading(__file__, argv), "",
             f"Machine: {machine}. Corpus: {args.docs} jsonl documents, {n_tokens:,} phi-4 tokens; "
             f"{args.workers} tokenizer processes; batches of {args.host_batch} x {args.seq_len}.", "",
             "| what | tokens/s | vs one v5p host |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / target:.1f}x |" for name, rate in rows]
    publish(lines, args.write, SECTION_HEADING, SECTION_KEY, intro=SECTION_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())

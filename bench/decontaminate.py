"""Decontamination speed: `python -m phi4_jax.decontaminate` against a plain-Python n-gram set, same data, same run.

    python bench/decontaminate.py                          # 100k synthetic documents
    python bench/decontaminate.py --write BENCHMARKS.md    # also record the run in the "Decontamination" section

Data (deterministic): documents of 60-200 words drawn from a Zipf-distributed 20,000-word vocabulary, 1% of them with
a 13-word span copied from one of 500 long evaluation items and 0.5% with a 7-word span of one of 200 short items.
The peer is the straightforward method: a Python set of word tuples built from the evaluation items, every
document's tuples looked up one by one (one process). Both must remove the same documents; documents/s are wall time
over the whole file (reading, matching, writing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import run_command, run_date, update_section  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=100_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--write", default=None, metavar="BENCHMARKS.md")
    return p.parse_args(argv)


def make_data(directory: str, n_docs: int) -> tuple[str, str, set[int]]:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(20_000)]
    ranks = np.minimum(rng.zipf(1.2, size=20_000_000), len(vocab)) - 1

    def sentence(n, at=[0]):
        out = [vocab[r] for r in ranks[at[0]:at[0] + n]]
        at[0] += n
        return out

    long_items = [sentence(int(rng.integers(30, 80))) for _ in range(500)]
    short_items = [sentence(int(rng.integers(8, 15))) for _ in range(200)]
    eval_path = os.path.join(directory, "eval.jsonl")
    with open(eval_path, "w") as f:
        for ws in long_items + short_items:
            f.write(json.dumps({"question": " ".join(ws)}) + "\n")
    contaminated = set()
    train_path = os.path.join(directory, "train.jsonl")
    with open(train_path, "w") as f:
        for i in range(n_docs):
            ws = sentence(int(rng.integers(60, 200)))
            u = rng.random()
            if u < 0.01 or u > 0.995:
                item = long_items[int(rng.integers(500))] if u < 0.01 else short_items[int(rng.integers(200))]
                n = 13 if u < 0.01 else 7
                at = int(rng.integers(0, len(item) - n + 1))
                ws[20:20] = item[at:at + n]
                contaminated.add(i + 1)
            f.write(json.dumps({"text": " ".join(ws).capitalize() + "."}) + "\n")
    return eval_path, train_path, contaminated


def naive(eval_path: str, train_path: str, out_path: str, short_threshold: int = 20) -> set[int]:
    """The peer: sets of word tuples, looked up per document."""
    word = re.compile(r"\w+")
    long_set, short_set = set(), set()
    for line in open(eval_path):
        ws = word.findall(json.loads(line)["question"].lower())
        long_set.update(tuple(ws[i:i + 13]) for i in range(len(ws) - 12))
        if len(ws) < short_threshold:
            short_set.update(tuple(ws[i:i + 7]) for i in range(len(ws) - 6))
    removed = set()
    with open(train_path) as f, open(out_path, "w") as out:
        for number, line in enumerate(f, 1):
            ws = word.findall(json.loads(line)["text"].lower())
            if (any(tuple(ws[i:i + 13]) in long_set for i in range(len(ws) - 12))
                    or any(tuple(ws[i:i + 7]) in short_set for i in range(len(ws) - 6))):
                removed.add(number)
            else:
                out.write(line)
    return removed


def main(argv=None) -> int:
    args = parse_args(argv)
    from phi4_jax.cli import decontaminate as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        eval_path, train_path, planted = make_data(tmp, args.documents)
        size_mb = os.path.getsize(train_path) / 1e6
        start = time.perf_counter()
        peer_removed = naive(eval_path, train_path, os.path.join(tmp, "naive.jsonl"))
        peer_s = time.perf_counter() - start
        rows.append(("plain-Python tuple sets (peer)", 1, peer_s))
        assert planted <= peer_removed, "the peer missed planted contamination"
        for workers in args.workers:
            out = os.path.join(tmp, f"out{workers}")
            start = time.perf_counter()
            code = cli.main(["--eval", eval_path, "--input", train_path, "--out", out, "--workers", str(workers),
                             "--no-progress"])
            seconds = time.perf_counter() - start
            assert code == 0
            ours = {json.loads(line)["line"] for line in open(os.path.join(out, "report.jsonl"))}
            assert ours == peer_removed, f"removed sets differ: {len(ours ^ peer_removed)} documents"
            rows.append((f"phi4_jax.decontaminate --workers {workers}", workers, seconds))
    print(f"{args.documents} documents ({size_mb:.0f} MB), {len(peer_removed)} removed "
          f"({len(planted)} planted); both remove the same documents")
    table = ["| method | processes | seconds | documents/s |", "|---|---|---|---|"]
    for name, workers, seconds in rows:
        table.append(f"| {name} | {workers} | {seconds:.1f} | {args.documents / seconds:,.0f} |")
    print("\n".join(table))
    if args.write:
        body = "\n".join([f"Run {run_date()}, `{run_command(__file__, argv)}`, on {describe_machine()}.", "",
                          f"{args.documents:,} JSONL documents ({size_mb:.0f} MB), 700 evaluation items; "
                          f"{len(peer_removed)} documents removed by both methods (the same ones).", "", *table])
        update_section(args.write, "Decontamination", "decontaminate",
                       intro="`bench/decontaminate.py`: documents/s of the hybrid 13/7-gram removal against a "
                             "plain-Python n-gram set (see its docstring).", append=body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

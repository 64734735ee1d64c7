"""`python -m phi4_jax.decontaminate`: remove training data that overlaps evaluation sets (13-gram / 7-gram hybrid).

    python -m phi4_jax.decontaminate --eval EVAL.jsonl [EVAL2.txt ...] --input DATA.jsonl|txt|parquet [...] --out DIR
        [--field text|messages|...] [--eval-field NAME] [--ngram 13] [--short-ngram 7] [--short-threshold 20]
        [--workers P]

Writes DIR/<input name> (the kept documents, same format), DIR/report.jsonl (one line per removed document: its input
line, the evaluation file and line it overlaps, and the matched n-gram; and one per unreadable record, skipped) and
DIR/summary.json (counts, documents/s). See `phi4_jax.data.decontaminate` for the method.

Exit status: 0 done; 2 bad input (a missing file, an unknown format, an empty evaluation set, --out clashing with an
input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phi4_jax.decontaminate", description=__doc__.splitlines()[0])
    p.add_argument("--eval", nargs="+", required=True, metavar="FILE", help="evaluation sets (.jsonl, .txt, .parquet)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training data (.jsonl, .txt, .parquet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--field", default=None,
                   help="the input records' field to check (a string or chat messages; default: all their text; "
                        "parquet: the 'text' column)")
    p.add_argument("--eval-field", default=None, help="the evaluation records' field (default: all their text)")
    p.add_argument("--ngram", type=int, default=13, help="word n-gram length (default 13)")
    p.add_argument("--short-ngram", type=int, default=7, help="n-gram length for short evaluation items (default 7)")
    p.add_argument("--short-threshold", type=int, default=20,
                   help="evaluation items with fewer words are also matched by short n-grams (default 20)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (default min(4, CPUs))")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from phi4_jax.data import decontaminate as dc

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    outputs = [os.path.join(args.out, os.path.basename(path)) for path in args.input]
    for path, out in zip(args.input, outputs):
        if not os.path.isfile(path):
            return fail(f"{path}: no such input file")
        if os.path.abspath(path) == os.path.abspath(out):
            return fail(f"--out {args.out} would overwrite the input {path}; choose another directory")
    if len(set(outputs)) != len(outputs):
        return fail("two inputs have the same file name; their outputs in --out would collide")
    try:
        for path in args.input:
            dc.file_format(path)
        index = dc.build_index(args.eval, field=args.eval_field, ngram=args.ngram, short_ngram=args.short_ngram,
                               short_threshold=args.short_threshold,
                               log=lambda m: print(m, file=sys.stderr))
    except dc.DecontaminationError as e:
        return fail(str(e))
    c = index.counts
    print(f"eval: {c['items']} items ({c['long']} with {args.ngram}-grams, {c['short']} short with "
          f"{args.short_ngram}-grams), {c['too_short']} shorter than {args.short_ngram} words not matchable, "
          f"{c['unreadable']} unreadable", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "report.jsonl")
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="decontaminate", unit="doc", dynamic_ncols=True)
    results, start = [], time.perf_counter()
    pool = dc.open_pool(index, args.workers)
    try:
        with open(report_path + ".partial", "w", encoding="utf-8") as report:
            for path, out in zip(args.input, outputs):
                results.append(dc.decontaminate_file(path, out, index, report, field=args.field, pool=pool,
                                                     progress=bar.update if bar is not None else None))
    except dc.DecontaminationError as e:
        return fail(str(e))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    os.replace(report_path + ".partial", report_path)
    seconds = time.perf_counter() - start
    documents = sum(r.documents for r in results)
    summary = {"eval": {"files": args.eval, **c}, "ngram": args.ngram, "short_ngram": args.short_ngram,
               "short_threshold": args.short_threshold, "workers": args.workers, "seconds": round(seconds, 3),
               "documents_per_s": round(documents / max(seconds, 1e-9), 1),
               "inputs": [vars(r) for r in results]}
    with open(os.path.join(args.out, "summary.json.partial"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(args.out, "summary.json.partial"), os.path.join(args.out, "summary.json"))
    for r in results:
        print(f"{r.input}: {r.documents} documents, kept {r.kept}, removed {r.removed}, skipped {r.skipped} "
              f"(unreadable) -> {r.output}")
    print(f"report: {report_path} ({documents / max(seconds, 1e-9):.0f} documents/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

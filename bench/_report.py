"""What benchmark scripts share around their measurements: the decode-comparison options, the heading that dates a
run and names its command, and the table printed and appended to its section of BENCHMARKS.md
(`bench.decode.update_section`, imported only when a file is written)."""

from __future__ import annotations

import datetime
import os
import sys


def add_decode_comparison_args(p) -> None:
    """The options of a decode comparison against transformers (`bench_pair`), then `--write BENCHMARKS_MD`."""
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-threads", type=int, default=1)
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)


def gib(n: float) -> str:
    """Bytes as "X.XX GiB"."""
    return f"{n / 2**30:.2f} GiB"


def run_heading(script: str, argv, title: str = "") -> str:
    """"### [title]YYYY-MM-DD HH:MM UTC, `python bench/SCRIPT ARGS`": one run's entry heading. `script` is the
    script's __file__; `argv` its main's argv (None: the command line's)."""
    command = f"python bench/{os.path.basename(script)} " + " ".join(argv if argv is not None else sys.argv[1:])
    return f"### {title}{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `{command.strip()}`"


def publish(lines: list[str], write: str | None, heading: str, key: str, *, intro: str = "") -> str:
    """Prints the entry (`lines` joined) and, with `write` (a BENCHMARKS.md path), appends it to the
    `<!-- key:begin/end -->` block of its `## heading` section (created with `intro` if absent). Returns the text."""
    text = "\n".join(lines)
    print(text)
    if write:
        from bench.decode import update_section

        update_section(write, heading, key, intro=intro, append=text)
    return text

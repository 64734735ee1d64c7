"""What benchmark scripts share around their measurements: the decode-comparison options, the date and command
line of a run (`run_date`, `run_command`, `run_heading`), the table printed and written to its section of
BENCHMARKS.md (`publish`, `update_section`), and the JSON file of results (`write_json`).

Standard library only: the GPU suite's scripts import this on a machine without the project's data packages."""

from __future__ import annotations

import datetime
import json
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


def run_date() -> str:
    """Now, as "YYYY-MM-DD HH:MM UTC"."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def run_command(script: str, argv) -> str:
    """"python bench/SCRIPT ARGS": `script` is the script's __file__; `argv` its main's argv (None: the command
    line's)."""
    command = f"python bench/{os.path.basename(script)} " + " ".join(argv if argv is not None else sys.argv[1:])
    return command.strip()


def run_heading(script: str, argv, title: str = "") -> str:
    """"### [title]YYYY-MM-DD HH:MM UTC, `python bench/SCRIPT ARGS`": one run's entry heading (`run_date`,
    `run_command`)."""
    return f"### {title}{run_date()}, `{run_command(script, argv)}`"


def publish(lines: list[str], write: str | None, heading: str, key: str, *, intro: str = "") -> str:
    """Prints the entry (`lines` joined) and, with `write` (a BENCHMARKS.md path), appends it to the
    `<!-- key:begin/end -->` block of its `## heading` section (created with `intro` if absent). Returns the text."""
    text = "\n".join(lines)
    print(text)
    if write:
        update_section(write, heading, key, intro=intro, append=text)
    return text


def update_section(path: str, heading: str, key: str, *, intro: str = "", append: str | None = None,
                   replace: str | None = None) -> None:
    """Edits the `<!-- key:begin -->...<!-- key:end -->` block of BENCHMARKS.md's `## heading` section.

    `append` adds text at the end of the block, `replace` replaces the block's body; the section (heading,
    `intro`, markers) is created at the end of the file if absent. Other sections are left untouched; the file is
    replaced whole (written beside it, then renamed), so an interrupted run leaves it as it was.
    """
    content = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin not in content or end not in content:
        content = content.rstrip("\n") + f"\n\n## {heading}\n\n{begin}\n{intro.strip()}\n{end}\n"
    head, rest = content.split(begin, 1)
    body, tail = rest.split(end, 1)
    if replace is not None:
        body = "\n" + replace.strip() + "\n"
    if append is not None:
        body = body.rstrip("\n") + "\n\n" + append.strip() + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(head + begin + body + end + tail)
    os.replace(tmp, path)


def write_json(path: str | None, result) -> None:
    """Writes `result` to `path` as indented JSON (nothing when `path` is None: the script's --json was not given)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

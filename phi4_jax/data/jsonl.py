"""JSON Lines files read line by line, each record located as ``FILE:LINE``.

`jsonl_objects` is the one reader behind the post-training data (`phi4_jax.posttrain.data.jsonl_records`: a bad
line is an error) and Pivotal Token Search's problems (`phi4_jax.posttrain.pts.read_problems`: a bad line is
skipped and counted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from phi4_jax.data.sources import DataError


def jsonl_objects(path: str, *, skipped: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """Yields ("FILE:LINE", object) for each non-blank line of the JSONL file `path`.

    A bad line (not valid JSON, or JSON that is not an object) raises DataError naming ``FILE:LINE`` and the
    problem; with a `skipped` list it is passed over and that message appended to the list instead."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{where}: not valid JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(record, dict):
                    yield where, record
                    continue
                problem = f"{where}: expected a JSON object, got {type(record).__name__}"
            if skipped is None:
                raise DataError(problem)
            skipped.append(problem)

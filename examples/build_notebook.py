"""Builds examples/phi4_jax_colab.ipynb from examples/colab_quickstart.py (run after editing the script).

Cells are separated by `# %%` lines (`# %% [markdown]` for text cells, whose lines drop the leading `# `).
In code cells, a line `# !command` becomes the shell line `!command`: a comment when the script runs as
Python (e.g. in the test), a command in Colab.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "colab_quickstart.py")
NOTEBOOK = os.path.join(HERE, "phi4_jax_colab.ipynb")


def split_cells(source: str) -> list[tuple[str, str]]:
    """[(cell_type, text)] of a `# %%`-delimited script."""
    cells, kind, lines = [], None, []

    def close():
        text = "\n".join(lines).strip("\n")
        if kind is not None and text:
            cells.append((kind, text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            close()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line[2:] if line.startswith("# !") else line)
    close()
    return cells


def build_notebook(source: str) -> dict:
    def lines(text):
        parts = text.split("\n")
        return [p + "\n" for p in parts[:-1]] + [parts[-1]]

    cells = []
    for kind, text in split_cells(source):
        cell = {"cell_type": kind, "metadata": {}, "source": lines(text)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "A100"},
            "kernelspec": {"display_name": "Python 3", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(source: str) -> str:
    return json.dumps(build_notebook(source), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    with open(SCRIPT) as f:
        text = render(f.read())
    with open(NOTEBOOK, "w") as f:
        f.write(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Oracles for Pivotal Token Search: did a completion solve its problem?

A problem is a dict (one JSONL line of `python -m phi4_jax.pts --problems`) with a prompt ("messages", or "prompt"
text for a base model), an "answer" and a "checker" spec: {"type": "exact" | "numeric" | "python", ...options}.

- exact: the final answer (see `extract_answer`) equals str(answer) after normalizing whitespace, a trailing period
  and, unless "case_sensitive": true, case.
- numeric: the number in the final answer (the last one, or group 1 of "pattern") is within "rel_tol" (default
  1e-6) or "abs_tol" (default 1e-9) of the numeric answer.
- python: the code of the completion (its last fenced ``` block, or all of it) followed by the problem's "tests"
  runs in a fresh `python -I` subprocess with a CPU-time limit ("timeout", default 5 s; the process group is killed
  at that wall time too) and an address-space limit ("memory_mb", default 1024) set by `resource.setrlimit`;
  it solved the problem when the process exits 0.
- a user callable `module:function(completion_text, problem) -> bool` (`--oracle module:function`).

`check_problem(problem, where)` validates a problem up front and raises `ProblemError` naming `where` (file:line);
`make_judge(oracle)` returns `judge(text, problem) -> bool`. Imports only the standard library.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Callable

BUILTIN = ("exact", "numeric", "python")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 1024

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"(?i)\banswer\s*(?:is|:)\s*(.+)")
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


class OracleError(ValueError):
    """An oracle that cannot be used (unknown name, an import that fails, a callable that raises)."""


class ProblemError(ValueError):
    """A problem that cannot be judged (no answer, a bad checker spec); the message names its file and line."""


def extract_answer(text: str, spec: dict) -> str:
    """The final answer in a completion: group 1 (else the match) of the first match of spec["pattern"], else the
    last \\boxed{...}, else what follows the last "answer is" / "Answer:", else the last non-empty line."""
    if spec.get("pattern"):
        m = re.search(spec["pattern"], text)
        if m is None:
            return ""
        return m.group(1) if m.re.groups else m.group(0)
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _normalize(text: str, case_sensitive: bool) -> str:
    text = " ".join(str(text).split()).rstrip(".").strip()
    return text if case_sensitive else text.lower()


def parse_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_oracle(text: str, problem: dict) -> bool:
    spec = problem.get("checker") or {}
    case = bool(spec.get("case_sensitive", False))
    return _normalize(extract_answer(text, spec), case) == _normalize(problem["answer"], case)


def numeric_oracle(text: str, problem: dict) -> bool:
    spec = problem.get("checker") or {}
    got = parse_number(extract_answer(text, spec))
    want = float(problem["answer"])
    if got is None:
        return False
    return math.isclose(got, want, rel_tol=float(spec.get("rel_tol", 1e-6)), abs_tol=float(spec.get("abs_tol", 1e-9)))


def extract_code(text: str) -> str:
    """The last fenced ``` block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


# Runs in the child: sets its own limits, then runs the file as __main__. (Setting them in a preexec_fn would run
# Python between fork and exec in the parent's image, which is unsafe in a multithreaded process such as JAX's.)
_RUNNER = """import resource, runpy, sys
cpu, memory = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_python_tests(code: str, tests: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                     memory_mb: int = DEFAULT_MEMORY_MB) -> bool:
    """Whether `code` followed by `tests` exits 0 in a fresh, isolated Python process within the limits.

    The process gets its own session and is killed with its whole group when it outlives `timeout` seconds of wall
    time; RLIMIT_CPU (`timeout`, rounded up) and RLIMIT_AS (`memory_mb`), set by `resource.setrlimit` in the child
    before the code runs, bound it from inside."""
    with tempfile.TemporaryDirectory(prefix="pts_python_") as tmp:
        path = os.path.join(tmp, "solution_and_tests.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code + "\n\n" + tests + "\n")
        limits = [str(max(1, math.ceil(timeout))), str(int(memory_mb) * 2**20)]
        proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, *limits, path], cwd=tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def python_oracle(text: str, problem: dict) -> bool:
    spec = problem["checker"]
    return run_python_tests(extract_code(text), spec["tests"], timeout=float(spec.get("timeout", DEFAULT_TIMEOUT_S)),
                            memory_mb=int(spec.get("memory_mb", DEFAULT_MEMORY_MB)))


ORACLES: dict[str, Callable[[str, dict], bool]] = {"exact": exact_oracle, "numeric": numeric_oracle,
                                                   "python": python_oracle}


def load_callable(name: str) -> Callable[[str, dict], bool]:
    """`module:function` imported, or OracleError saying what is wrong."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise OracleError(f"unknown oracle {name!r}: use one of {', '.join(BUILTIN)} or module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's oracle's problem
        raise OracleError(f"oracle {name!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise OracleError(f"oracle {name!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def check_problem(problem, where: str, oracle: str | None = None) -> None:
    """Raises ProblemError (naming `where`) unless `problem` can be judged by `oracle` (None: its checker type)."""
    if not isinstance(problem, dict):
        raise ProblemError(f"{where}: a problem must be a JSON object, got {type(problem).__name__}")
    has_messages, has_prompt = "messages" in problem, "prompt" in problem
    if has_messages == has_prompt:
        raise ProblemError(f"{where}: a problem needs exactly one of 'messages' (chat) or 'prompt' (text)")
    if has_messages:
        msgs = problem["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs)):
            raise ProblemError(f"{where}: 'messages' must be a non-empty list of {{role, content}} string objects")
    elif not isinstance(problem["prompt"], str) or not problem["prompt"]:
        raise ProblemError(f"{where}: 'prompt' must be a non-empty string")
    spec = problem.get("checker")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ProblemError(f"{where}: 'checker' must be an object like {{\"type\": \"numeric\"}}")
    kind = oracle or spec.get("type")
    if kind is None:
        raise ProblemError(f"{where}: no checker type: give checker.type ({', '.join(BUILTIN)}) or --oracle")
    if kind not in BUILTIN:
        if ":" in str(kind) and oracle is not None:
            return  # a user callable judges the problem as it likes
        raise ProblemError(f"{where}: unknown checker type {kind!r}: use one of {', '.join(BUILTIN)}")
    if kind == "python":
        if not isinstance(spec.get("tests"), str) or not spec["tests"].strip():
            raise ProblemError(f"{where}: a python checker needs 'tests' (Python code that fails when the solution "
                               "is wrong)")
        for key in ("timeout", "memory_mb"):
            if key in spec and (not isinstance(spec[key], (int, float)) or isinstance(spec[key], bool)
                                or spec[key] <= 0):
                raise ProblemError(f"{where}: checker.{key} must be a positive number, got {spec[key]!r}")
        return
    if "answer" not in problem or problem["answer"] is None or str(problem["answer"]).strip() == "":
        raise ProblemError(f"{where}: the problem has no 'answer' for its {kind} checker")
    if kind == "numeric":
        try:
            float(problem["answer"])
        except (TypeError, ValueError):
            raise ProblemError(f"{where}: numeric checker but the answer {problem['answer']!r} is not a number") from None
        for key in ("rel_tol", "abs_tol"):
            if key in spec and (not isinstance(spec[key], (int, float)) or isinstance(spec[key], bool)
                                or spec[key] < 0):
                raise ProblemError(f"{where}: checker.{key} must be a number >= 0, got {spec[key]!r}")
    if "pattern" in spec:
        try:
            re.compile(spec["pattern"])
        except (re.error, TypeError) as e:
            raise ProblemError(f"{where}: checker.pattern {spec['pattern']!r} is not a regular expression: {e}") from None


def make_judge(oracle: str | None = None) -> Callable[[str, dict], bool]:
    """judge(completion_text, problem) -> bool: `oracle` ("exact", "numeric", "python", "module:function") for every
    problem, or None to use each problem's checker.type. A user callable that raises becomes an OracleError."""
    if oracle is not None and oracle not in ORACLES:
        fn = load_callable(oracle)

        def judge_user(text: str, problem: dict) -> bool:
            try:
                return bool(fn(text, problem))
            except Exception as e:  # noqa: BLE001 - report the user's oracle failing, with its own message
                raise OracleError(f"oracle {oracle!r} raised {type(e).__name__}: {e}") from None
        return judge_user

    def judge(text: str, problem: dict) -> bool:
        return ORACLES[oracle or problem["checker"]["type"]](text, problem)
    return judge

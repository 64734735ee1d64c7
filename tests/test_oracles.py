"""PTS oracles: exact and numeric answers, Python tests in a limited subprocess, user callables, bad checker specs,
and the `python -m phi4_jax.pts` CLI's errors."""

from __future__ import annotations

import json
import time

import pytest

from phi4_jax.cli import pts as pts_cli
from phi4_jax.posttrain.oracles import OracleError, ProblemError, check_problem, make_judge, run_python_tests

judge = make_judge()


def problem(kind, answer=None, **spec):
    out = {"prompt": "q", "checker": {"type": kind, **spec}}
    if answer is not None:
        out["answer"] = answer
    return out


@pytest.mark.parametrize("text, answer, ok", [
    ("Let me think.\nThe answer is Paris.", "paris", True),
    ("The answer is Rome.", "Paris", False),
    ("so we get \\boxed{42} in the end", "42", True),
    ("first line\n  final   line  \n", "final line", True),
    ("Answer: Paris is nice", "Paris", False),
])
def test_exact(text, answer, ok):
    assert judge(text, problem("exact", answer)) is ok


def test_exact_case_sensitive():
    assert not judge("The answer is paris", problem("exact", "Paris", case_sensitive=True))
    assert judge("The answer is Paris", problem("exact", "Paris", case_sensitive=True))


@pytest.mark.parametrize("text, answer, spec, ok", [
    ("3 plus 4 is 7. So 3 + 4 = 7.", 7, {}, True),
    ("so the total is 1,234.5", 1234.5, {}, True),
    ("x = 7.0001", 7, {}, False),                          # relative error 1.4e-5 > the default rel_tol 1e-6
    ("x = 7.000001", 7, {}, True),                         # 1.4e-7
    ("x = 7.1", 7, {"abs_tol": 0.2}, True),
    ("x = 7.3", 7, {"abs_tol": 0.2}, False),
    ("3 plus 4 is 8. So 3 + 4 = 7.", 7, {"pattern": r"\bis\s+(-?\d+)"}, False),   # the pattern's number counts
    ("3 plus 4 is 7. So 3 + 4 = 8.", 7, {"pattern": r"\bis\s+(-?\d+)"}, True),
    ("no digits here", 7, {}, False),
    ("it is -3", -3, {}, True),
])
def test_numeric(text, answer, spec, ok):
    assert judge(text, problem("numeric", answer, **spec)) is ok


SQUARE_TESTS = "assert square(3) == 9\nassert square(-2) == 4\n"


def test_python_runs_the_last_code_block_against_the_tests():
    good = "Here:\n```python\ndef square(x):\n    return x * x\n```\n"
    bad = "```python\ndef square(x):\n    return x + x\n```"
    # A generous time limit for the runs that must pass: a loaded CI machine can take seconds to start Python.
    assert judge(good, problem("python", tests=SQUARE_TESTS, timeout=60))
    assert not judge(bad, problem("python", tests=SQUARE_TESTS))
    assert judge("def square(x):\n    return x ** 2\n",                                          # no fence: all of it
                 problem("python", tests=SQUARE_TESTS, timeout=60))


def test_python_timeout_kills_the_process_group(tmp_path):
    marker = tmp_path / "child_alive"
    code = (f"import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5); open({str(marker)!r}, \"w\")'])\n"
            "import time\ntime.sleep(60)\n")
    start = time.monotonic()
    assert not run_python_tests(code, "pass", timeout=0.5)
    assert time.monotonic() - start < 10
    time.sleep(2.0)
    assert not marker.exists()          # the grandchild died with the group


def test_python_cpu_and_memory_limits():
    spin = "while True:\n    pass\n"
    assert not run_python_tests(spin, "pass", timeout=1)
    hog = "x = bytearray(400 * 2**20)\nx[-1] = 1\n"
    assert not run_python_tests(hog, "pass", memory_mb=200)
    assert run_python_tests(hog, "pass", memory_mb=2000, timeout=60)  # the limit, not the code, failed it above


def test_user_callable_oracle(tmp_path, monkeypatch):
    (tmp_path / "my_oracle.py").write_text(
        "def check(text, problem):\n    return text.strip().endswith(str(problem['answer']))\n"
        "def broken(text, problem):\n    raise KeyError('expected')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = make_judge("my_oracle:check")
    assert mine("it is 5", {"answer": 5}) and not mine("it is 6", {"answer": 5})
    with pytest.raises(OracleError, match=r"oracle 'my_oracle:broken' raised KeyError: 'expected'"):
        make_judge("my_oracle:broken")("x", {"answer": 1})
    with pytest.raises(OracleError, match="has no callable 'nope'"):
        make_judge("my_oracle:nope")
    with pytest.raises(OracleError, match="cannot import module 'no_such_module_xyz'"):
        make_judge("no_such_module_xyz:f")
    with pytest.raises(OracleError, match="unknown oracle 'regex'"):
        make_judge("regex")


@pytest.mark.parametrize("data, message", [
    ({"prompt": "q", "checker": {"type": "exact"}}, "has no 'answer' for its exact checker"),
    ({"prompt": "q", "answer": "seven", "checker": {"type": "numeric"}}, "the answer 'seven' is not a number"),
    ({"prompt": "q", "answer": 1, "checker": {"type": "numeric", "pattern": "(unclosed"}}, "not a regular expression"),
    ({"prompt": "q", "checker": {"type": "python"}}, "a python checker needs 'tests'"),
    ({"prompt": "q", "checker": {"type": "python", "tests": "assert f()", "timeout": -1}}, "checker.timeout must be"),
    ({"prompt": "q", "answer": 1}, "no checker type"),
    ({"prompt": "q", "answer": 1, "checker": "numeric"}, "'checker' must be an object"),
    ({"answer": 1, "checker": {"type": "exact"}}, "exactly one of 'messages' (chat) or 'prompt'"),
    ({"messages": [{"role": "user"}], "answer": 1, "checker": {"type": "exact"}}, "'messages' must be a non-empty"),
])
def test_bad_problems_name_their_line(data, message):
    with pytest.raises(ProblemError) as info:
        check_problem(data, "problems.jsonl:7")
    assert str(info.value).startswith("problems.jsonl:7: ") and message in str(info.value)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "q", "answer": 1, "checker": {"type": "numeric"}}) + "\n"
                        + json.dumps({"prompt": "q", "checker": {"type": "numeric"}}) + "\n")
    base = ["--problems", str(problems), "--out", str(tmp_path / "o.jsonl"), "--checkpoint", str(tmp_path / "none")]
    cases = [(["--oracle", "nope"], "error: unknown oracle 'nope'"),
             (["--band", "0.9", "0.1"], "error: band must satisfy"),
             (["--solutions", "0"], "error: solutions must be at least 1, got 0"),
             (["--min-margin", "2"], "error: min_margin must be in [0, 1], got 2.0"),
             ([], f"error: checkpoint directory '{tmp_path / 'none'}' does not exist")]
    for extra, message in cases:
        assert pts_cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert f"skipped {problems}:2: the problem has no 'answer'" in err    # the bad line was reported and skipped
    problems.write_text("")
    assert pts_cli.main(base) == 2
    assert "no usable problems (0 skipped)" in capsys.readouterr().err

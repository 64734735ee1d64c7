"""The GPU evidence suite end to end on CPU: `python bench/gpu_suite.py --smoke --out TMP` in a subprocess.

Same stages and code paths as on a GPU, with tiny shapes and the kernels in interpret mode, and with grain
and tiktoken blocked (a sitecustomize on PYTHONPATH whose import finder refuses them): the GPU machine has no
grain, no offline tiktoken encodings and maybe no tiktoken. Checks that every stage ran to "ok", that the JSON holds every stage's result, the four
DESIGN.md target rows and the measurements each stage must produce, and that the Markdown table holds the
same rows. The suite's parts (probe retry logic, the probe's checks, per-test timeouts and restarts,
deselection of interpret-pinned tests, target verdicts, the kernel-mode switch) are checked directly too.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import attention_probe  # noqa: E402
import gpu_suite  # noqa: E402
import kernel_mode  # noqa: E402

from phi4_jax.model.config import get_preset  # noqa: E402

BLOCKED = ("grain", "tiktoken", "tiktoken_ext")
BLOCKER = f"""import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the GPU machine does not have it")
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """An environment whose Python processes (and their children) cannot import grain or tiktoken."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env.pop("PHI4_KERNEL_TESTS_ON_DEVICE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, blocked_env):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=blocked_env, capture_output=True, text=True, timeout=900)
    return proc, out


def test_suite_imports_need_neither_grain_nor_tiktoken(blocked_env):
    """Every module the suite's stages import, with grain and tiktoken blocked; the blocker itself works."""
    modules = ["bench.gpu_suite", "bench.attention_probe", "bench.attention", "bench.decode_bound", "bench.train_mfu",
               "bench.roofline", "bench.pytest_watchdog", "kernels.flash_attention_gpu", "kernels.decode_attention",
               "kernels.rope_pallas", "phi4_jax.train.step", "phi4_jax.inference.kv_cache"]
    modules += [os.path.splitext(os.path.basename(f))[0] for f in gpu_suite.KERNEL_TEST_FILES] + ["conftest"]
    code = ("import importlib, sys; sys.path.insert(0, 'tests')\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [n for n in {BLOCKED!r} if n in sys.modules]\n"
            "assert not bad, bad\n"
            "try:\n    import grain\nexcept ImportError as e:\n    print('BLOCKED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(blocked_env, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BLOCKED grain is blocked" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_every_stage_runs_and_reports(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu_suite.json", "gpu_suite.md", "gpu_suite.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["device"].startswith("cpu")
    assert list(report["stages"]) == list(gpu_suite.STAGE_NAMES)
    for name, stage in report["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage.get("log_tail", "")[-2000:])
        assert stage["result"], name

    probe = report["stages"]["probe"]["result"]["rows"]
    assert [r["config"] for r in probe] == list(attention_probe.SMOKE_CONFIGS)
    for r in probe:
        assert r["status"] == "passed" and r["semantics_passed"] == "lane", r
        res = r["result"]
        assert res["interpret"] and res["segments"] and res["rope"] and res["implementation"] == "pallas_gpu"
        assert 0 < res["rel_err"]["out"] < res["tol"], res     # bf16 output vs the float32 reference
        assert res["compile_s"] > 0 and res["first_run_s"] > 0
    log = (out / "gpu_suite.log").read_text()
    for r in probe:   # every attempt's own log comes back in full (the device machine keeps nothing)
        assert f"===== probe attempt probe-{r['config']}-lane.log" in log and f"[probe {r['config']}] compiled" in log
    kernels = report["stages"]["kernels"]["result"]
    assert kernels["counts"]["passed"] == len(gpu_suite.SMOKE_KERNEL_TESTS) and not kernels["failures"], kernels
    assert ("tests/test_flash_attention_gpu.py::test_float32_inputs_are_refused_not_rounded"
            in kernels["deselected_interpret_pinned"])
    attention = report["stages"]["attention_16k"]["result"]
    assert attention["complete"] is True
    assert [r["implementation"] for r in attention["rows"]][::3] == [
        "cudnn", "ours (pallas_gpu)", "jax pallas attention_mgpu (fp16)"]
    assert report["meta"]["semantics_after_probe"] == "lane"
    ours = [r for r in attention["rows"] if r["implementation"].startswith("ours") and r["pass_"] in ("fwd", "bwd")]
    assert len(ours) == 2, ours
    for r in ours:
        # causal attention: QK^T and PV, 2 FLOPs per multiply-add, half the S x S scores; backward = 2.5 x forward
        flops = 2 * 2 * r["batch"] * r["heads_q"] * r["seq"] * r["seq"] * r["head_dim"] / (2 if r["causal"] else 1)
        factor = {"fwd": 1.0, "bwd": 2.5}[r["pass_"]]
        assert r["tflops"] == pytest.approx(factor * flops / (r["ms"] / 1e3) / 1e12, rel=1e-9), r
    assert {r["dtype"] for r in attention["rows"] if "mgpu" in r["implementation"]} == {"float16"}
    mfu = report["stages"]["train_mfu"]["result"]
    assert mfu["median_step_s"] == statistics.median(mfu["step_times_s"])
    assert mfu["tokens_per_s"] == pytest.approx(mfu["batch"] * mfu["seq"] / mfu["median_step_s"], rel=1e-9)
    assert mfu["achieved_tflops"] == pytest.approx(mfu["flops_per_token"] * mfu["tokens_per_s"] / 1e12, rel=1e-9)
    vocab = get_preset(mfu["model"]).vocab_size
    assert abs(mfu["first_loss"] - math.log(vocab)) < 1.0, mfu  # a random model starts near ln(vocab)
    decode = report["stages"]["decode_bound"]["result"]
    assert [r["batch"] for r in decode["rows"]] == [1, 8]
    for r in decode["rows"]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["median_step_s"], rel=1e-9), r
        assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / r["bound_tokens_per_s"], rel=1e-9), r
        assert r["bound_tokens_per_s"] == pytest.approx(
            r["batch"] * decode["copy_bandwidth_gbs"] * 1e9 / r["bytes_per_step"]["total"], rel=1e-9), r

    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == set(gpu_suite.TARGETS)
    for name in ("attention_fwd", "attention_bwd", "decode_bound"):
        assert targets[name]["value"] is not None, targets[name]
    assert "no cuDNN figure" in targets["attention_fwd"]["where"]   # a CPU has no cuDNN
    assert "unknown peak" in targets["train_mfu"]["verdict"]   # a CPU has no known peak FLOP/s

    stages_with_rows = {r["stage"] for r in report["measurements"]}
    assert stages_with_rows == set(gpu_suite.STAGE_NAMES)
    md = (out / "gpu_suite.md").read_text()
    for t in report["targets"]:
        assert t["description"] in md
    for r in report["measurements"]:
        assert r["metric"] in md
    for name in gpu_suite.STAGE_NAMES:
        assert f"| {name} | ok |" in md


def test_a_stage_past_the_total_budget_is_skipped_and_the_report_still_written(tmp_path):
    """--total-budget below the minimum for one stage: every stage is skipped, the report is complete."""
    out = tmp_path / "out"
    rc = gpu_suite.main(["--smoke", "--out", str(out), "--total-budget", "1"])
    report = json.loads((out / "gpu_suite.json").read_text())
    assert rc == 1
    assert {s["status"] for s in report["stages"].values()} == {"skipped: total budget spent"}
    assert [t["verdict"] for t in report["targets"]] == ["not measured (skipped: total budget spent)"] * 4


def test_target_verdicts_compare_against_design_targets():
    stages = {
        "attention_16k": {"status": "ok", "result": {"rows": [
            {"implementation": "ours (pallas_gpu)", "seq": 4096, "pass_": "fwd", "tflops": 700.0},
            {"implementation": "ours (pallas_gpu)", "seq": 16384, "pass_": "fwd", "tflops": 640.0},
            {"implementation": "ours (pallas_gpu)", "seq": 16384, "pass_": "bwd", "tflops": 455.0},
            {"implementation": "cudnn", "seq": 4096, "pass_": "fwd", "tflops": 100.0},
            {"implementation": "cudnn", "seq": 16384, "pass_": "fwd", "tflops": 800.0}]}},
        "train_mfu": {"status": "timeout", "result": None},
        "decode_bound": {"status": "ok", "result": {"rows": [
            {"batch": 1, "fraction_of_bound": 0.86, "tokens_per_s": 86.0, "bound_tokens_per_s": 100.0}]}},
    }
    targets = {t["target"]: t for t in gpu_suite.target_rows(stages)}
    verdicts = {name: (t["value"], t["verdict"]) for name, t in targets.items()}
    assert verdicts["attention_fwd"] == (640.0, "below target")      # the 16K row, not the 4K one
    assert "ours/cuDNN 0.80" in targets["attention_fwd"]["where"]   # against cuDNN at the same length
    assert verdicts["attention_bwd"] == (455.0, "met")
    assert "no cuDNN figure" in targets["attention_bwd"]["where"]
    assert verdicts["train_mfu"] == (None, "not measured (timeout)")
    assert verdicts["decode_bound"] == (0.86, "met")


def test_probe_retries_with_the_other_semantics_and_keeps_the_one_that_passed():
    calls = []

    def attempt(name, semantics, deadline):
        calls.append((name, semantics))
        if name == "fwd" and semantics == "lane":
            return {"status": "failed", "error": "lowering failed"}
        if name == "fwd+seg" and semantics == "warpgroup":
            return {"status": "ok", "passed": False, "rel_err": {"out": 0.5}}    # compiles, wrong numbers
        if name == "fwd+rope":
            return {"status": "timeout", "error": "killed"}
        return {"status": "ok", "passed": True, "rel_err": {"out": 1e-3}, "run_ms": 1.0}

    emitted = []
    rows = attention_probe.probe_all(["fwd", "fwd+seg", "fwd+rope", "fwd+bwd"], attempt,
                                     deadline=time.perf_counter() + 60, emit=lambda r: emitted.append(len(r)))
    assert calls == [("fwd", "lane"), ("fwd", "warpgroup"),            # default failed: retried, passed
                     ("fwd+seg", "warpgroup"), ("fwd+seg", "lane"),    # the passing one first, then the other
                     ("fwd+rope", "lane"), ("fwd+rope", "warpgroup"),
                     ("fwd+bwd", "lane")]
    assert [(r["status"], r["semantics_passed"]) for r in rows] == [
        ("passed", "warpgroup"), ("passed", "lane"), ("failed", None), ("passed", "lane")]
    assert emitted == [1, 2, 3, 4]                                     # written after every config
    assert rows[0]["result"] == {"passed": True, "rel_err": {"out": 1e-3}, "run_ms": 1.0}
    skipped = attention_probe.probe_all(["fwd"], attempt, deadline=time.perf_counter(), emit=lambda r: None)
    assert skipped[0]["status"] == "skipped" and skipped[0]["attempts"][0]["status"].startswith("skipped")
    with pytest.raises(attention_probe.ProbeError, match="unknown probe config"):
        attention_probe.parse_config("fwd+bwd+rope+seg")


def test_later_stages_use_the_semantics_the_probe_found_passing():
    rows = lambda *passed: {"rows": [{"semantics_passed": p} for p in passed]}
    assert gpu_suite.probe_semantics(rows("warpgroup", "warpgroup", None, "lane")) == "warpgroup"
    assert gpu_suite.probe_semantics(rows("lane", "warpgroup")) == "warpgroup"     # a tie: the later config
    assert gpu_suite.probe_semantics(rows(None, None)) is None
    assert gpu_suite.probe_semantics(None) is None
    args = argparse.Namespace(smoke=False, platforms="", semantics="warpgroup")
    assert gpu_suite.stage_env(args, "kernels")[attention_probe.SEMANTICS_ENV] == "warpgroup"


def test_probe_checks_forward_and_backward_against_the_reference():
    """The probe's own checking (segments, RoPE, backward) on a CPU with the XLA attention in place of the
    kernel: bf16 errors are small but not zero; the same run with a 1e-6 tolerance fails."""
    shape = dict(batch=1, seq=64, heads_q=4, heads_kv=1, head_dim=32)
    row = attention_probe.run_one("fwd+bwd+seg+rope", shape, interpret=False, iters=1, tol=2e-2,
                                  implementation="xla")
    assert set(row["rel_err"]) == {"out", "dq", "dk", "dv"} and row["finite"] and row["passed"], row
    assert all(0 < e < 2e-2 for e in row["rel_err"].values()), row
    strict = attention_probe.run_one("fwd+bwd+seg+rope", shape, interpret=False, iters=0, tol=1e-6,
                                     implementation="xla")
    assert strict["passed"] is False and strict["run_ms"] is None


def test_kernel_tests_get_per_test_timeouts_restarts_and_deselection(tmp_path):
    """A hanging test is killed by the per-test watchdog, recorded as "timeout", and pytest starts again
    without it and without the tests done; a test with interpret=True written in it is deselected; the
    tests named in KERNEL_TESTS_FIRST-style ordering run first."""
    tests = tmp_path / "test_fake_kernels.py"
    tests.write_text("import time\n"
                     "def test_a():\n    pass\n"
                     "def test_hang():\n    time.sleep(900)\n"
                     "def test_after():\n    assert 1 == 2\n"
                     "def test_pinned():\n    f(interpret=True)\n")
    args = argparse.Namespace(smoke=True, platforms="")
    t0 = time.perf_counter()
    record = gpu_suite.run_kernel_tests(gpu_suite.Stage("kernels", 1, 1, "test"), args, str(tmp_path), 100,
                                        lambda text: None, targets=[str(tests)], per_test_timeout=4)
    # Killed by the 4 s watchdog, not waited out: far below the hang's 900 s (the two pytest starts alone took up to
    # 100 s on a loaded 2-core CI machine, so no tighter wall bound).
    assert time.perf_counter() - t0 < 450
    result = record["result"]
    outcomes = {c["nodeid"].split("::")[-1]: c["outcome"] for c in result["cases"]}
    assert outcomes == {"test_a": "passed", "test_hang": "timeout", "test_after": "failed"}, result["cases"]
    assert len(result["runs"]) == 2 and record["status"] == "failed"
    assert result["deselected_interpret_pinned"] == [f"{tests}::test_pinned"]
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 0, "timeout": 1}


def _test_functions(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


def test_named_kernel_tests_exist_and_interpret_pinned_ones_are_found():
    """KERNEL_TESTS_FIRST and SMOKE_KERNEL_TESTS name tests that exist (a rename would silently drop the
    phi-4-shaped tests from the front); the interpret-pinned scan finds the test that hard-codes it."""
    for nodeid in gpu_suite.KERNEL_TESTS_FIRST + gpu_suite.SMOKE_KERNEL_TESTS:
        path, name = nodeid.split("::", 1)
        assert path in gpu_suite.KERNEL_TEST_FILES
        assert name.split("[")[0].removesuffix("__with_jit") in _test_functions(path), nodeid
    pinned = gpu_suite.interpret_pinned_tests("tests/test_flash_attention_gpu.py")
    assert pinned == ["tests/test_flash_attention_gpu.py::test_float32_inputs_are_refused_not_rounded"]


def test_kernel_mode_switch(monkeypatch):
    monkeypatch.delenv(kernel_mode.ON_DEVICE_ENV, raising=False)
    assert kernel_mode.interpret_for("gpu") and kernel_mode.interpret_for("any")
    monkeypatch.setenv(kernel_mode.ON_DEVICE_ENV, "maybe")
    with pytest.raises(kernel_mode.KernelModeError, match="not a boolean"):
        kernel_mode.interpret_for("gpu")
    monkeypatch.setenv(kernel_mode.ON_DEVICE_ENV, "1")
    with pytest.raises(kernel_mode.KernelModeError, match="unknown kernel backend"):
        kernel_mode.interpret_for("cuda")
    monkeypatch.setattr(kernel_mode, "device_platform", lambda: "gpu")
    assert kernel_mode.interpret_for("gpu") is False and kernel_mode.interpret_for("any") is False
    assert kernel_mode.interpret_for("tpu") is True      # a TPU kernel stays interpreted on a GPU machine
    monkeypatch.setattr(kernel_mode, "device_platform", lambda: "cpu")
    with pytest.raises(kernel_mode.KernelModeError, match="need a GPU or TPU"):
        kernel_mode.interpret_for("gpu")


@pytest.mark.parametrize("code, status, deadline", [
    ("import time; print('working', flush=True); time.sleep(600)", "timeout", 5.0),
    ("raise SystemExit('stage crashed')", "failed", 120.0),
    ("pass", "failed", 120.0),                             # exit 0 but no result file
    ("import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))", "ok", 120.0),
])
def test_a_hanging_or_crashing_stage_is_contained(tmp_path, code, status, deadline):
    """Each stage is a subprocess with a deadline: a hang is killed, a crash recorded, and the suite goes on.
    (Deadlines are generous where the stage must finish: a loaded CI machine can take seconds to start Python.)"""
    result = str(tmp_path / "result.json")
    args = argparse.Namespace(smoke=True, platforms="")
    stage = gpu_suite.Stage("train_mfu", 2, 2, "test stage")
    record = gpu_suite.run_stage(stage, args, str(tmp_path), deadline, lambda text: None,
                                 command=([sys.executable, "-c", code, result], result))
    assert record["status"] == status, record
    if status == "timeout":
        assert record["returncode"] is None and "working" in record["log_tail"]
    if status == "ok":
        assert record["result"] == {"x": 1}

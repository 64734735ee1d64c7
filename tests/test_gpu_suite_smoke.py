"""The GPU evidence suite end to end on CPU: `python bench/gpu_suite.py --smoke --out TMP` in a subprocess.

Same stages and code paths as on a GPU, with tiny shapes and the kernels in interpret mode. Checks that every
stage ran to "ok", that the JSON holds every stage's result, the four DESIGN.md target rows and the
measurements each stage must produce, and that the Markdown table holds the same rows. The suite's
helpers (kernel-mode switch, JUnit parsing, target verdicts) are checked directly as well.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_suite  # noqa: E402
from phi4_jax.model.config import get_preset  # noqa: E402
import kernel_mode  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ)
    env.pop("PHI4_KERNEL_TESTS_ON_DEVICE", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.slow
def test_every_stage_runs_and_reports(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu_suite.json", "gpu_suite.md", "gpu_suite.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["device"].startswith("cpu")
    assert set(report["stages"]) == set(gpu_suite.STAGE_NAMES)
    for name, stage in report["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage.get("log_tail", "")[-2000:])
        assert stage["result"], name

    for name in gpu_suite.KERNEL_TESTS:
        kernel = report["stages"][name]["result"]
        assert kernel["counts"]["passed"] >= 1 and not kernel["failures"], (name, kernel)
    attention = report["stages"]["attention"]["result"]["rows"]
    ours = [r for r in attention if r["implementation"].startswith("ours") and r["pass_"] in ("fwd", "bwd")]
    assert len(ours) == 2, ours
    for r in ours:
        # causal attention: QK^T and PV, 2 FLOPs per multiply-add, half the S x S scores; backward = 2.5 x forward
        flops = 2 * 2 * r["batch"] * r["heads_q"] * r["seq"] * r["seq"] * r["head_dim"] / (2 if r["causal"] else 1)
        factor = {"fwd": 1.0, "bwd": 2.5}[r["pass_"]]
        assert r["tflops"] == pytest.approx(factor * flops / (r["ms"] / 1e3) / 1e12, rel=1e-9), r
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


def test_target_verdicts_compare_against_design_targets():
    stages = {
        "attention": {"status": "ok", "result": {"rows": [
            {"implementation": "ours (pallas_gpu)", "seq": 4096, "pass_": "fwd", "tflops": 700.0},
            {"implementation": "ours (pallas_gpu)", "seq": 16384, "pass_": "fwd", "tflops": 640.0},
            {"implementation": "ours (pallas_gpu)", "seq": 16384, "pass_": "bwd", "tflops": 455.0},
            {"implementation": "cudnn", "seq": 16384, "pass_": "fwd", "tflops": 900.0}]}},
        "train_mfu": {"status": "timeout", "result": None},
        "decode_bound": {"status": "ok", "result": {"rows": [
            {"batch": 1, "fraction_of_bound": 0.86, "tokens_per_s": 86.0, "bound_tokens_per_s": 100.0}]}},
    }
    verdicts = {t["target"]: (t["value"], t["verdict"]) for t in gpu_suite.target_rows(stages)}
    assert verdicts["attention_fwd"] == (640.0, "below target")      # the 16K row, not the 4K one
    assert verdicts["attention_bwd"] == (455.0, "met")
    assert verdicts["train_mfu"] == (None, "not measured (timeout)")
    assert verdicts["decode_bound"] == (0.86, "met")


def test_junit_parsing_counts_outcomes(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_decode_attention" name="test_a" time="0.5"/>'
        '<testcase classname="tests.test_decode_attention" name="test_b" time="0.1">'
        '<failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_flash_attention_gpu" name="test_c" time="0">'
        '<skipped message="needs a Hopper GPU"/></testcase>'
        '</testsuite></testsuites>')
    result = gpu_suite.read_junit(str(xml))
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert result["by_file"]["tests/test_decode_attention.py"] == {"passed": 1, "failed": 1, "error": 0,
                                                                   "skipped": 0}
    assert [f["test"] for f in result["failures"]] == ["test_b"]


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


@pytest.mark.parametrize("code, status", [
    ("import time; print('working', flush=True); time.sleep(60)", "timeout"),
    ("raise SystemExit('stage crashed')", "failed"),
    ("pass", "failed"),                                   # exit 0 but no result file
    ("import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))", "ok"),
])
def test_a_hanging_or_crashing_stage_is_contained(tmp_path, code, status):
    """Each stage is a subprocess with a deadline: a hang is killed, a crash recorded, and the suite goes on."""
    import argparse
    import time

    result = str(tmp_path / "result.json")
    args = argparse.Namespace(smoke=True, platforms="")
    stage = gpu_suite.Stage("train_mfu", 2, 2, "test stage")
    t0 = time.perf_counter()
    record = gpu_suite.run_stage(stage, args, str(tmp_path), None, 2.0, lambda text: None,
                                 command=([sys.executable, "-c", code, result], result))
    assert time.perf_counter() - t0 < 30
    assert record["status"] == status, record
    if status == "timeout":
        assert record["returncode"] is None and "working" in record["log_tail"]
    if status == "ok":
        assert record["result"] == {"x": 1}

#!/usr/bin/env python
"""The GPU evidence suite, one command, most valuable evidence first: does our Mosaic GPU attention compile
and compute the right thing on the device, how fast is it at 16K against cuDNN, do the kernel tests pass
there, decode against the bandwidth bound, training MFU. Writes one JSON and one Markdown table.

    python bench/gpu_suite.py --out DIR            # a bare H100/H200 machine, no network, ~8 minutes
    python bench/gpu_suite.py --out DIR --smoke    # the same stages with tiny shapes on a CPU
    bash bench/gpu_suite.sh DIR [--smoke]          # the same, from a shell

The device tool, in one call (the suite stops itself at --total-budget, 500 s by default, inside the
540 s; nothing to carry: the GPU machine's image has every package the suite imports):

    run(command="python3 bench/gpu_suite.py --out $OUT", timeout_s=540)

A rerun of only what was cut or failed, with the rest of the device time (the results of a run are gone
from the device machine, so fetch them first): e.g. `--stages decode_bound,train_mfu --total-budget 200`.

Stages, in this order, each in its own subprocess (bench/killable.py: its own process group, killed whole
at its deadline, so a crash or hang loses only that stage; its row says "failed" or "timeout"). A stage
gets min(its own budget, what is left of --total-budget) and is skipped when under 15 s are left, so when
the time runs out, the stages cut are the last, least valuable ones. gpu_suite.json and gpu_suite.md are
rewritten after every stage, and the stages' own JSON files after every row, so a call killed from
outside still leaves everything finished so far under --out.

1. probe          `bench/attention_probe.py`: our pallas_gpu attention at phi-4 heads (40/10, head_dim 128,
                  GQA 4:1, causal, bf16, seq 2048), forward then forward+backward, each with and without
                  segment ids and fused RoPE: one subprocess per config with its own timeout; compile time,
                  run time, relative error against the XLA float32 reference; a config that fails with the
                  default (Lane) lowering semantics is retried with Warpgroup, and the row says which passed.
                  Every later stage runs with the semantics that passed the most configs
                  (PHI4_MOSAIC_GPU_SEMANTICS; `probe_semantics`).
2. attention_16k  `bench/attention.py --seq 16384 --impls cudnn,ours,mgpu`: cuDNN forward and forward+backward
                  (seconds, and the peer figure survives a hang of ours), then ours, TFLOP/s, each row written
                  as it finishes; JAX's attention_mgpu last, in fp16 (its scratch buffers are fp16); no XLA
                  reference at 16K.
3. kernels        pytest on the kernel test files with PHI4_KERNEL_TESTS_ON_DEVICE=1 (tests/kernel_mode.py:
                  compiled kernels on the device against the same references), through the
                  `bench/pytest_watchdog.py` plugin: the phi-4-shaped cases first (KERNEL_TESTS_FIRST), a
                  hard per-test timeout (a test that hangs is recorded as "timeout" and pytest starts again
                  without it and without the tests done), and the tests that hard-code `interpret=True`
                  deselected (found by reading the test files). --smoke runs one quick test per file,
                  interpreted.
4. decode_bound   `bench/decode_bound.py`: 14B-shaped bf16 decode tokens/s at batch 1 and 8 against the
                  (bytes read per token) / (measured copy bandwidth) bound.
5. train_mfu      `bench/train_mfu.py`: MFU of the ~1.5B phi-4-shaped model at seq 4096 on one GPU.
6. roofline       `bench/roofline.py`: copy bandwidth and bf16 matmul rate, only with time left over (on the
                  H200 they are known: ~4.3 TB/s copy, ~790 TFLOP/s bf16 matmul).

Output in --out (few files, so the device tool brings them all back): `gpu_suite.json` (every stage's
status, timing, log tail and full results), `gpu_suite.md` (the targets table, every measurement, stage
status), `gpu_suite.log` (all stage logs, and every probe attempt's log in full). Targets
(../shared/DESIGN.md): attention forward >= 650 TFLOP/s, backward >= 450 TFLOP/s (16K, with the ratio to
cuDNN measured in the same run), MFU >= 55%, decode >= 85% of the bandwidth bound (batch 1).

Into BENCHMARKS.md: the device tool returns $OUT's files under its `files_at` folder; read gpu_suite.md
there (and the log for every failure), then add its tables to BENCHMARKS.md by hand under a "GPU suite"
heading with the device, date, jax version and the command above (gpu_suite.md's first lines carry them).
The suite imports neither grain nor tiktoken (the GPU image has no grain, no offline tiktoken encodings, and
maybe no tiktoken); tests/test_gpu_suite_smoke.py runs it with both blocked.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.attention_probe import SEMANTICS_ENV  # noqa: E402
from bench.killable import run_killable  # noqa: E402

KERNEL_TEST_FILES = ("tests/test_flash_attention_gpu.py", "tests/test_decode_attention.py",
                     "tests/test_rope_kernel.py", "tests/test_paged_attention_gpu.py")
KERNEL_TESTS_FIRST = (   # phi-4-shaped first: GQA 4:1 at head_dim 128 (fwd+bwd, segments), fused RoPE at 128
    "tests/test_flash_attention_gpu.py::test_wgmma_path_needs_gpu",
    "tests/test_flash_attention_gpu.py::test_fused_rope_head_dim_128_gqa2_through_dispatch",
    "tests/test_flash_attention_gpu.py::test_head_dim_128_noncausal_mha",
)
SMOKE_KERNEL_TESTS = (   # one quick test per file, interpreted
    "tests/test_flash_attention_gpu.py::test_one_warpgroup_forward[True]",
    "tests/test_decode_attention.py::DispatchTest::test_dispatch_pallas_bf16__with_jit",
    "tests/test_rope_kernel.py::test_matches_reference_bf16",
    "tests/test_paged_attention_gpu.py::test_kernel_matches_float64_oracle[decode_gqa3_d64_p8]",
)
TARGETS = {  # name: (stage, description, comparison, value)
    "attention_fwd": ("attention_16k", "Attention forward, ours, bf16 causal 40/10 heads, d 128, 16K", ">=", 650.0),
    "attention_bwd": ("attention_16k", "Attention backward, ours, same shape", ">=", 450.0),
    "train_mfu": ("train_mfu", "Training MFU, phi4-1.5b, seq 4096, one GPU", ">=", 0.55),
    "decode_bound": ("decode_bound", "Decode 14B bf16 batch 1, fraction of the bandwidth bound", ">=", 0.85),
}
MAX_LOG_TAIL = 4000
MIN_STAGE_S = 15        # a stage with less time than this left is skipped
PER_TEST_TIMEOUT_S = 60  # kernels stage, on the device (the first test also pays the compile caches' warm-up)
SMOKE_PER_TEST_TIMEOUT_S = 240


class SuiteError(RuntimeError):
    """Bad arguments or an unusable environment for the suite."""


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float          # on the GPU
    smoke_budget_s: float    # with --smoke on a CPU
    description: str


# On the GPU: 150 + 100 + 90 + 80 + 80 = 500 s = the default --total-budget; the roofline runs only when
# earlier stages finish under their budgets.
STAGES = (
    Stage("probe", 150, 300, "pallas_gpu attention compiles and matches the XLA reference (fwd, fwd+bwd, seg, RoPE)"),
    Stage("attention_16k", 100, 240, "attention TFLOP/s at 16K, ours vs cuDNN, forward and backward"),
    Stage("kernels", 90, 300, "kernel tests on the device, phi-4-shaped first, per-test timeouts"),
    Stage("decode_bound", 80, 180, "decode tokens/s vs bandwidth bound"),
    Stage("train_mfu", 80, 180, "training MFU"),
    Stage("roofline", 30, 60, "copy bandwidth and bf16 matmul ceiling (only with time left)"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ----------------------------------------------------------------------------------------------- stages

def stage_command(name: str, args, work: str, timeout: float) -> tuple[list[str], str]:
    """(argv, path of the stage's result file or folder) for one subprocess stage."""
    py = sys.executable
    smoke = ["--smoke"] if args.smoke else []
    if name == "probe":
        out = os.path.join(work, "probe")
        per_config = 240 if args.smoke else 60
        return [py, "bench/attention_probe.py", "--out", out, "--budget", f"{max(timeout - 5, 1):.0f}",
                "--config-timeout", str(per_config), *smoke], os.path.join(out, "attention_probe.json")
    if name == "attention_16k":
        out = os.path.join(work, "attention")
        extra = ["--warmup", "0"] if args.smoke else ["--warmup", "1", "--iters", "5"]
        return [py, "bench/attention.py", "--out", out, "--seq", "16384", "--impls", "cudnn,ours,mgpu",
                *smoke, *extra], out
    if name == "train_mfu":
        out = os.path.join(work, "train_mfu.json")
        extra = ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        return [py, "bench/train_mfu.py", "--json", out, *smoke, *extra], out
    if name == "decode_bound":
        out = os.path.join(work, "decode_bound.json")
        return [py, "bench/decode_bound.py", "--json", out, *smoke], out
    if name == "roofline":
        out = os.path.join(work, "roofline.json")
        return [py, "bench/roofline.py", "--json", out, *smoke], out
    raise SuiteError(f"unknown stage {name!r}")


def stage_env(args, name: str) -> dict:
    env = dict(os.environ)
    if getattr(args, "semantics", None):   # what the probe found passing, for every later stage
        env[SEMANTICS_ENV] = args.semantics
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("PHI4_KERNEL_TESTS_ON_DEVICE", None)
    else:
        env["JAX_PLATFORMS"] = args.platforms   # set explicitly: tests/conftest.py defaults it to cpu
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
        if name == "kernels":
            env["PHI4_KERNEL_TESTS_ON_DEVICE"] = "1"
    return env


def run_stage(stage: Stage, args, work: str, timeout: float, log, command=None) -> dict:
    """Runs one stage's subprocess with a hard deadline and reads its result (also after a timeout: the
    stages write their results as they go). `command` = (argv, result path) overrides the stage's own."""
    cmd, result_path = command or stage_command(stage.name, args, work, timeout)
    record = {"stage": stage.name, "description": stage.description, "command": shlex.join(["python", *cmd[1:]]),
              "timeout_s": round(timeout, 1)}
    run = run_killable(cmd, timeout=timeout, log_path=os.path.join(work, f"{stage.name}.log"), cwd=ROOT,
                       env=stage_env(args, stage.name))
    record.update(returncode=run["returncode"], status=run["status"], wall_s=run["wall_s"])
    log(f"\n===== stage {stage.name}: {run['status']} in {run['wall_s']} s: {record['command']}\n{run['log']}")
    record["log_tail"] = run["log"][-MAX_LOG_TAIL:]
    try:
        record["result"] = read_result(stage.name, result_path)
    except (OSError, ValueError) as e:
        record["result"] = None
        if record["status"] == "ok":
            record["status"] = "failed"
            record["error"] = f"the stage exited 0 but its result could not be read: {e}"
    return record


def read_result(name: str, path: str):
    if name == "attention_16k":
        files = sorted((os.path.join(path, f) for f in os.listdir(path)
                        if f.startswith("attention-") and f.endswith(".json")), key=os.path.getmtime)
        if not files:
            raise OSError(f"bench/attention.py wrote no attention-*.json into {path}")
        path = files[-1]
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------- kernel tests

def interpret_pinned_tests(test_file: str) -> list[str]:
    """Node ids of the tests in `test_file` (relative to the repository root) whose code passes
    `interpret=True` literally: they cannot run compiled on the device, so the suite deselects them."""
    with open(os.path.join(ROOT, test_file)) as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}::")
            elif isinstance(child, ast.FunctionDef) and child.name.startswith("test"):
                if any(isinstance(n, ast.keyword) and n.arg == "interpret" and isinstance(n.value, ast.Constant)
                       and n.value.value is True for n in ast.walk(child)):
                    found.append(f"{test_file}::{prefix}{child.name}")
    visit(tree, "")
    return found


def read_watchdog_log(path: str) -> tuple[list[dict], list[str]]:
    """(finished test records, node ids started but never finished) from one pytest_watchdog log."""
    ended, started = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                event = json.loads(line)
                if event["event"] == "start":
                    started.append(event["nodeid"])
                else:
                    ended.append({k: v for k, v in event.items() if k != "event"})
    done = {e["nodeid"] for e in ended}
    return ended, [n for n in started if n not in done]


def run_kernel_tests(stage: Stage, args, work: str, timeout: float, log, targets=None,
                     per_test_timeout=None) -> dict:
    """pytest on the kernel tests through bench/pytest_watchdog.py: phi-4-shaped first, a hard per-test
    timeout, restarts without the test that hung and the tests already done, until every test ran or the
    stage's time is spent. `targets` / `per_test_timeout` override the defaults (tests use them)."""
    deadline = time.perf_counter() + timeout
    if targets is None:
        targets = SMOKE_KERNEL_TESTS if args.smoke else KERNEL_TEST_FILES
    if per_test_timeout is None:
        per_test_timeout = SMOKE_PER_TEST_TIMEOUT_S if args.smoke else PER_TEST_TIMEOUT_S
    test_files = sorted({t.split("::")[0] for t in targets if t.split("::")[0].endswith(".py")})
    pinned = [n for f in test_files if os.path.exists(os.path.join(ROOT, f)) for n in interpret_pinned_tests(f)]
    cases, killed, runs, status, t0 = [], [], [], "ok", time.perf_counter()
    while True:
        left = deadline - time.perf_counter()
        if left < 5:
            status = "timeout"
            break
        skip = pinned + [c["nodeid"] for c in cases]
        wd_log = os.path.join(work, f"kernels-{len(runs)}.jsonl")
        cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-rfEs",
               "-o", "faulthandler_timeout=0",   # pyproject's would replace the watchdog's timer (pytest_watchdog)
               "-p", "bench.pytest_watchdog", "--watchdog-log", wd_log,
               "--watchdog-timeout", f"{min(per_test_timeout, left):.0f}",
               *[a for f in KERNEL_TESTS_FIRST for a in ("--watchdog-first", f)],
               *[a for n in skip for a in ("--watchdog-deselect", n)]]
        run = run_killable(cmd, timeout=left, log_path=os.path.join(work, f"kernels-{len(runs)}.log"), cwd=ROOT,
                           env=stage_env(args, stage.name))
        log(f"\n===== stage {stage.name}, pytest run {len(runs)}: {run['status']} (rc {run['returncode']}) in "
            f"{run['wall_s']} s: {shlex.join(['python', *cmd[1:]])}\n{run['log']}")
        ended, unfinished = read_watchdog_log(wd_log)
        cases += ended
        runs.append({"status": run["status"], "returncode": run["returncode"], "wall_s": run["wall_s"],
                     "log_tail": run["log"][-MAX_LOG_TAIL:]})
        if not unfinished:
            if run["returncode"] not in (0, 1) and run["status"] != "timeout":  # e.g. 5: no test, 4: usage
                status = "failed"
            break
        why = "stage budget spent" if run["status"] == "timeout" else \
            f"killed by the per-test timeout ({min(per_test_timeout, left):.0f} s) or crashed; see the log"
        killed += [{"nodeid": n, "outcome": "timeout", "message": why} for n in unfinished]
        cases += killed[-len(unfinished):]
        if run["status"] == "timeout":
            status = "timeout"
            break
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped", "timeout")}
    failures = [c for c in cases if c["outcome"] in ("failed", "error", "timeout")]
    if status == "ok" and (failures or not cases):
        status = "failed"
    result = {"counts": counts, "cases": cases, "failures": failures, "deselected_interpret_pinned": pinned,
              "runs": runs}
    record = {"stage": stage.name, "description": stage.description, "status": status,
              "timeout_s": round(timeout, 1), "wall_s": round(time.perf_counter() - t0, 1),
              "command": f"pytest {' '.join(targets)} -p bench.pytest_watchdog (see the log)",
              "log_tail": runs[-1]["log_tail"] if runs else "", "result": result}
    if not cases and runs and runs[-1]["returncode"] == 5:
        record["error"] = f"pytest selected no test from {targets}: update SMOKE_KERNEL_TESTS / KERNEL_TEST_FILES"
    return record


# ----------------------------------------------------------------------------------------------- report

def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _num(x):
    """A measured value: 3 significant digits for small numbers (CPU smoke runs), thousands separators otherwise."""
    if x is None:
        return "-"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"


def _cell(text, n=160):
    return str(text)[:n].replace("|", "/").replace("\n", " ")


def probe_rows(result) -> list[dict]:
    rows = []
    for r in (result or {}).get("rows", []):
        res = r.get("result") or {}
        tried = ", ".join(f"{a['semantics']}: {a['status']}" + ("" if a.get("passed", True) else " (wrong numbers)")
                          for a in r["attempts"])
        errs = res.get("rel_err") or {}
        note = (f"{r['status']}; semantics passed: {r['semantics_passed'] or '-'}; compile "
                f"{res.get('compile_s', '-')} s; rel err " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
                if res else f"{r['status']}; tried {tried}; {_cell(r['attempts'][-1].get('error', ''))}")
        rows.append({"stage": "probe", "metric": f"pallas_gpu {r['config']}", "value": res.get("run_ms"),
                     "unit": "ms", "note": note})
    return rows


def attention_rows(result) -> list[dict]:
    rows = []
    for r in (result or {}).get("rows", []):
        rows.append({"stage": "attention_16k",
                     "metric": f"{r['implementation']} {r['pass_']} S={r['seq']} B={r['batch']} "
                               f"{r['heads_q']}/{r['heads_kv']} heads d={r['head_dim']} {r.get('dtype', '')}",
                     "value": r.get("tflops"), "unit": "TFLOP/s", "note": _cell(r.get("note", ""))})
    return rows


def measurement_rows(stages: dict) -> list[dict]:
    rows = probe_rows(stages.get("probe", {}).get("result"))
    rows += attention_rows(stages.get("attention_16k", {}).get("result"))
    kt = stages.get("kernels", {}).get("result")
    if kt:
        c = kt["counts"]
        rows.append({"stage": "kernels", "metric": "kernel tests", "value": None, "unit": "",
                     "note": f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['timeout']} timed out, "
                             f"{c['skipped']} skipped; {len(kt['deselected_interpret_pinned'])} deselected "
                             "(interpret=True in the test)"})
        for f in kt["failures"]:
            rows.append({"stage": "kernels", "metric": f"{f['outcome'].upper()} {f['nodeid']}", "value": None,
                         "unit": "", "note": _cell(f["message"])})
    mfu = stages.get("train_mfu", {}).get("result")
    if mfu:
        where = f"{mfu['model']} S={mfu['seq']} B={mfu['batch']} remat={mfu['remat']}"
        rows += [
            {"stage": "train_mfu", "metric": f"MFU {where}", "value": None if mfu["mfu"] is None else 100 * mfu["mfu"],
             "unit": "%", "note": f"peak {_fmt(mfu['peak_tflops'])} TFLOP/s" if mfu["peak_tflops"] else
             "unknown peak FLOP/s (pass --peak-tflops)"},
            {"stage": "train_mfu", "metric": f"step time {where}", "value": 1e3 * mfu["median_step_s"], "unit": "ms",
             "note": f"{mfu['tokens_per_s']:,.0f} tokens/s, {mfu['achieved_tflops']:.2f} TFLOP/s achieved"},
        ]
    dec = stages.get("decode_bound", {}).get("result")
    if dec:
        for r in dec["rows"]:
            rows.append({"stage": "decode_bound", "metric": f"{dec['model']} bf16 decode batch {r['batch']} "
                                                            f"(context {r['context']})",
                         "value": r["tokens_per_s"], "unit": "tokens/s",
                         "note": f"bound {r['bound_tokens_per_s']:,.1f} tokens/s at "
                                 f"{dec['copy_bandwidth_gbs']:,.0f} GB/s = {100 * r['fraction_of_bound']:.1f}%"})
    roof = stages.get("roofline", {}).get("result")
    if roof:
        rows.append({"stage": "roofline", "metric": f"copy bandwidth ({roof['copy']['buffer_bytes'] / 2**20:.0f} MiB)",
                     "value": roof["copy"]["gb_per_s"], "unit": "GB/s", "note": ""})
        rows.append({"stage": "roofline", "metric": f"bf16 matmul n={roof['matmul_bf16']['n']}",
                     "value": roof["matmul_bf16"]["tflops"], "unit": "TFLOP/s", "note": ""})
    return rows


def target_rows(stages: dict) -> list[dict]:
    """The four DESIGN.md targets with the measured value (None when the stage gave none)."""
    values = {name: None for name in TARGETS}
    att = stages.get("attention_16k", {}).get("result")
    if att:
        rows_ = att.get("rows", [])
        ours = [r for r in rows_ if r["implementation"].startswith("ours")]
        if ours:
            longest = max(r["seq"] for r in ours)
            for r in ours:
                if r["seq"] == longest and r["pass_"] in ("fwd", "bwd"):
                    peer = next((c.get("tflops") for c in rows_ if c["implementation"] == "cudnn"
                                 and c["seq"] == longest and c["pass_"] == r["pass_"]), None)
                    vs = (f", cuDNN {peer:,.1f} TFLOP/s, ours/cuDNN {r['tflops'] / peer:.2f}"
                          if peer and r.get("tflops") else ", no cuDNN figure")
                    values[f"attention_{r['pass_']}"] = (r.get("tflops"), f"S={longest}{vs}")
    reasons = {}
    mfu = stages.get("train_mfu", {}).get("result")
    if mfu and mfu.get("mfu") is not None:
        values["train_mfu"] = (mfu["mfu"], f"B={mfu['batch']}, remat {mfu['remat']}")
    elif mfu:
        reasons["train_mfu"] = "unknown peak FLOP/s of this device; pass --peak-tflops"
    dec = stages.get("decode_bound", {}).get("result")
    if dec:
        b1 = [r for r in dec["rows"] if r["batch"] == 1]
        if b1:
            values["decode_bound"] = (b1[0]["fraction_of_bound"],
                                      f"{b1[0]['tokens_per_s']:,.1f} of {b1[0]['bound_tokens_per_s']:,.1f} tokens/s")
    rows = []
    for name, (stage, desc, cmp, target) in TARGETS.items():
        got = values[name]
        value, where = got if got else (None, "")
        stage_status = stages.get(stage, {}).get("status", "not run")
        if value is None:
            verdict = f"not measured ({reasons.get(name, stage_status)})"
        else:
            verdict = "met" if value >= target else "below target"
        rows.append({"target": name, "description": desc, "target_value": target, "value": value,
                     "where": where, "verdict": verdict})
    return rows


def to_markdown(report: dict) -> str:
    m = report["meta"]
    pct = lambda name, x: "-" if x is None else (f"{_num(100 * x)}%" if name in ("train_mfu", "decode_bound")
                                                 else f"{_num(x)} TFLOP/s")
    lines = [f"## GPU suite{' (smoke: tiny shapes, CPU, interpret mode)' if m['smoke'] else ''}, {m['date']}", "",
             f"- device: {m['device']}; jax {m['jax_version']}; python {m['python']}; host {m['host']}",
             f"- command: `{m['command']}`; total {m['wall_s']} s", "",
             "| target | measured | target value | verdict | where |", "|---|---:|---:|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['description']} | {pct(t['target'], t['value'])} | "
                     f"{pct(t['target'], t['target_value'])} | {t['verdict']} | {t['where']} |")
    lines += ["", "| stage | measurement | value | unit | note |", "|---|---|---:|---|---|"]
    for r in report["measurements"]:
        lines.append(f"| {r['stage']} | {r['metric']} | {_num(r['value'])} | {r['unit']} | {r['note']} |")
    lines += ["", "| stage | status | wall s | budget s | command |", "|---|---|---:|---:|---|"]
    for name in STAGE_NAMES:
        s = report["stages"][name]
        lines.append(f"| {name} | {s['status']} | {_fmt(s.get('wall_s'))} | {_fmt(s.get('timeout_s'))} | "
                     f"`{s.get('command', '')}` |")
    return "\n".join(lines) + "\n"


def device_summary(stages: dict) -> tuple[str, str]:
    """(device, jax version) as reported by the first stage that ran on the device."""
    att = (stages.get("attention_16k", {}).get("result") or {}).get("meta")
    if att:
        return att["device"], att["jax_version"]
    for r in (stages.get("probe", {}).get("result") or {}).get("rows", []):
        for a in r["attempts"]:
            if "devices" in a:
                return a["devices"], a["jax_version"]
    roof = stages.get("roofline", {}).get("result")
    if roof:
        d = roof["device"]
        return f"{d['platform']}: {d['device_kind']} x{d['device_count']}", d["jax_version"]
    return "unknown (no stage reported it)", "unknown"


# -------------------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernels in interpret mode")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {STAGE_NAMES}")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for all stages together (default 500 on the GPU, 900 with --smoke)")
    p.add_argument("--work", default=None, help="scratch folder for stage outputs (default: a temporary one)")
    p.add_argument("--platforms", default="", help="JAX_PLATFORMS for the stages on the GPU (default: auto)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per device for MFU")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGE_NAMES)
    if unknown or not stages:
        p.error(f"--stages: unknown stage(s) {sorted(unknown)}; choose from {STAGE_NAMES}")
    args.stage_list = stages
    if args.total_budget is None:
        args.total_budget = 900.0 if args.smoke else 500.0
    return args


def probe_semantics(result) -> str | None:
    """The lowering semantics for the stages after the probe: the one that passed the most configs (ties go
    to the later config: the backward ones come last), None when none passed."""
    passed = [r["semantics_passed"] for r in (result or {}).get("rows", []) if r.get("semantics_passed")]
    if not passed:
        return None
    return max(reversed(passed), key=passed.count)


def write_report(args, argv, stages: dict, start: float, work: str) -> str:
    """Writes gpu_suite.json and gpu_suite.md for the stages so far; returns the Markdown."""
    device, jax_version = device_summary(stages)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/gpu_suite.py " + " ".join(argv), "smoke": args.smoke, "device": device,
            "jax_version": jax_version, "python": platform.python_version(), "host": platform.node(),
            "wall_s": round(time.perf_counter() - start, 1), "work_dir": work,
            "semantics_after_probe": getattr(args, "semantics", None)}
    full = {name: stages.get(name, {"stage": name, "status": "not run yet", "result": None})
            for name in STAGE_NAMES}
    report = {"meta": meta, "targets": target_rows(full), "measurements": measurement_rows(full), "stages": full}
    markdown = to_markdown(report)
    for name, text in (("gpu_suite.json", json.dumps(report, indent=1)), ("gpu_suite.md", markdown)):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))   # a reader never sees half a file
    return markdown


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.total_budget
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="phi4_gpu_suite_")
    os.makedirs(work, exist_ok=True)
    log_file = open(os.path.join(args.out, "gpu_suite.log"), "w")

    def log(text):
        log_file.write(text + "\n")
        log_file.flush()

    stages: dict[str, dict] = {}
    for stage in STAGES:
        if stage.name not in args.stage_list:
            stages[stage.name] = {"stage": stage.name, "status": "not selected", "result": None}
            continue
        remaining = deadline - time.perf_counter()
        if remaining < MIN_STAGE_S:
            stages[stage.name] = {"stage": stage.name, "status": "skipped: total budget spent", "result": None}
            print(f"[gpu_suite] {stage.name}: skipped ({remaining:.0f} s left)", flush=True)
            continue
        budget = min(stage.smoke_budget_s if args.smoke else stage.budget_s, remaining)
        print(f"[gpu_suite] {stage.name}: {stage.description} (budget {budget:.0f} s)", flush=True)
        if stage.name == "kernels":
            if importlib.util.find_spec("pytest") is None:
                stages[stage.name] = {"stage": stage.name, "status": "failed", "result": None,
                                      "error": "pytest is not installed here"}
            else:
                stages[stage.name] = run_kernel_tests(stage, args, work, budget, log)
        else:
            stages[stage.name] = run_stage(stage, args, work, budget, log)
        print(f"[gpu_suite] {stage.name}: {stages[stage.name]['status']} in "
              f"{stages[stage.name].get('wall_s', 0)} s", flush=True)
        if stage.name == "probe":
            probe_dir = os.path.join(work, "probe")
            for name in sorted(os.listdir(probe_dir)) if os.path.isdir(probe_dir) else []:
                if name.endswith(".log"):   # each config's own log, in full (the JSON keeps only its tail)
                    with open(os.path.join(probe_dir, name), errors="replace") as f:
                        log(f"\n===== probe attempt {name}\n{f.read()}")
            args.semantics = probe_semantics(stages["probe"].get("result"))
            print(f"[gpu_suite] later stages compile with {SEMANTICS_ENV}={args.semantics or '(default)'}",
                  flush=True)
        write_report(args, argv, stages, start, work)
    markdown = write_report(args, argv, stages, start, work)
    log_file.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown)
    print(f"wrote {args.out}/gpu_suite.json, gpu_suite.md, gpu_suite.log", flush=True)
    return 0 if all(s["status"] in ("ok", "not selected") for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

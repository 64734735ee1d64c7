#!/usr/bin/env python
"""The GPU evidence suite, one command: kernel correctness on the device, attention TFLOP/s, training MFU,
decode speed against the bandwidth bound. Writes one JSON and one Markdown table.

    python bench/gpu_suite.py --out DIR            # a bare H100/H200 machine, no network, <= 8 minutes
    python bench/gpu_suite.py --out DIR --smoke    # the same stages with tiny shapes on a CPU (~1-2 minutes)
    bash bench/gpu_suite.sh DIR [--smoke]          # the same, from a shell

Stages, in order, each in its own subprocess with its own time budget (a crash or hang loses only that
stage: its row says "failed" or "timeout" and the next stage runs), all cut to fit `--total-budget`
(each stage's budget also leaves 40 s for every stage after it):

1. roofline      `bench/roofline.py`: copy bandwidth and the bf16 matmul ceiling, measured first.
2. kernels_*     pytest, one stage per kernel test file (Mosaic GPU attention, decode attention, RoPE),
                 with PHI4_KERNEL_TESTS_ON_DEVICE=1: tests that take their `interpret` flag from
                 `tests/kernel_mode.py` compile the Pallas kernels for the GPU and check them against the
                 pure-JAX references (GPU-only tests such as test_wgmma_path_needs_gpu run there too).
                 --smoke runs one quick test per file in interpret mode instead.
3. attention     `bench/attention.py`: ours vs cuDNN vs XLA vs JAX's bundled Mosaic GPU attention at phi-4
                 shapes (40/10 heads, head_dim 128, causal, 4K and 16K), TFLOP/s forward and backward.
4. train_mfu     `bench/train_mfu.py`: MFU of the ~1.5B phi-4-shaped model at seq 4096 on one GPU.
5. decode_bound  `bench/decode_bound.py`: 14B-shaped bf16 decode tokens/s at batch 1 and 8 vs the
                 (bytes read per token) / (measured copy bandwidth) bound.

Output in --out (few files, so the device tool can bring them all back): `gpu_suite.json` (every stage's
status, timing, log tail and full results), `gpu_suite.md` (the targets table, every measurement, stage
status), `gpu_suite.log` (all stage logs). Targets (../shared/DESIGN.md): attention forward >= 650 TFLOP/s,
backward >= 450 TFLOP/s (16K), MFU >= 55%, decode >= 85% of the bandwidth bound (batch 1).

The GPU machine is assumed to have jax (CUDA), flax, optax, orbax, chex, transformers and torch. Anything
else (pytest and its dependencies) comes as wheels. Put them in the git-ignored folder `.whl/` at the
repository root (on a machine with network: `pip download --only-binary=:all: --no-deps -d .whl pytest
pluggy iniconfig packaging pygments tqdm`), carry it with the device tool (`carry: [".whl"]`),
and the suite installs them with `pip install --no-index --no-deps --target WORK/site .whl/*.whl` and puts
that folder on PYTHONPATH for every stage (`--wheels DIR` to use another folder). One device-tool call:

    run(command="python bench/gpu_suite.py --out $OUT", carry=[".whl"], timeout_s=600)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel test files, one stage each: {stage name: (test file, -k selection of one quick test for --smoke)}.
KERNEL_TESTS = {
    "kernels_attention_gpu": ("tests/test_flash_attention_gpu.py",
                              "test_float32_inputs_one_warpgroup_forward and True"),
    "kernels_decode": ("tests/test_decode_attention.py", "test_dispatch_pallas_bf16__with_jit"),
    "kernels_rope": ("tests/test_rope_kernel.py", "test_matches_reference_bf16"),
}
KERNEL_TEST_FILES = tuple(f for f, _ in KERNEL_TESTS.values())
TARGETS = {  # name: (stage, description, comparison, value)
    "attention_fwd": ("attention", "Attention forward, ours, bf16 causal 40/10 heads, d 128, 16K", ">=", 650.0),
    "attention_bwd": ("attention", "Attention backward, ours, same shape", ">=", 450.0),
    "train_mfu": ("train_mfu", "Training MFU, phi4-1.5b, seq 4096, one GPU", ">=", 0.55),
    "decode_bound": ("decode_bound", "Decode 14B bf16 batch 1, fraction of the bandwidth bound", ">=", 0.85),
}
MAX_LOG_TAIL = 4000
MIN_STAGE_S = 10               # a stage with less time than this left is skipped
RESERVE_PER_LATER_STAGE_S = 40  # kept back for each later stage, so an overrunning stage cannot starve them


class SuiteError(RuntimeError):
    """Bad arguments or an unusable environment for the suite."""


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float          # on the GPU
    smoke_budget_s: float    # with --smoke on a CPU
    description: str


STAGES = (
    Stage("roofline", 45, 60, "copy bandwidth and bf16 matmul ceiling"),
    Stage("kernels_attention_gpu", 100, 120, "Mosaic GPU flash attention vs reference (fwd, bwd, GQA, segments)"),
    Stage("kernels_decode", 40, 60, "decode attention kernel vs reference"),
    Stage("kernels_rope", 30, 60, "RoPE kernels vs reference"),
    Stage("attention", 140, 180, "attention TFLOP/s, forward and backward"),
    Stage("train_mfu", 120, 120, "training MFU"),
    Stage("decode_bound", 110, 120, "decode tokens/s vs bandwidth bound"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ----------------------------------------------------------------------------------------------- stages

def stage_command(name: str, args, work: str) -> tuple[list[str], str]:
    """(argv, path of the stage's result file) for one stage."""
    py = sys.executable
    smoke = ["--smoke"] if args.smoke else []
    if name == "roofline":
        out = os.path.join(work, "roofline.json")
        return [py, "bench/roofline.py", "--json", out, *smoke], out
    if name in KERNEL_TESTS:
        test_file, smoke_selection = KERNEL_TESTS[name]
        out = os.path.join(work, f"{name}.xml")
        cmd = [py, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={out}"]
        if args.smoke:
            cmd += ["-k", smoke_selection]
        return cmd, out
    if name == "attention":
        out = os.path.join(work, "attention")
        extra = ["--warmup", "0"] if args.smoke else []
        return [py, "bench/attention.py", "--out", out, *smoke, *extra], out
    if name == "train_mfu":
        out = os.path.join(work, "train_mfu.json")
        extra = ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        return [py, "bench/train_mfu.py", "--json", out, *smoke, *extra], out
    if name == "decode_bound":
        out = os.path.join(work, "decode_bound.json")
        return [py, "bench/decode_bound.py", "--json", out, *smoke], out
    raise SuiteError(f"unknown stage {name!r}")


def stage_env(args, site_dir: str | None, name: str) -> dict:
    env = dict(os.environ)
    paths = [p for p in (site_dir, ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["TOKENIZERS_PARALLELISM"] = "false"
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("PHI4_KERNEL_TESTS_ON_DEVICE", None)
    else:
        env["JAX_PLATFORMS"] = args.platforms   # set explicitly: tests/conftest.py defaults it to cpu
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
        if name in KERNEL_TESTS:
            env["PHI4_KERNEL_TESTS_ON_DEVICE"] = "1"
    return env


def run_stage(stage: Stage, args, work: str, site_dir: str | None, timeout: float, log, command=None) -> dict:
    """Runs one stage's subprocess (in its own process group, killed whole on timeout) and reads its result.

    `command` = (argv, result path) overrides the stage's own command (tests use it)."""
    cmd, result_path = command or stage_command(stage.name, args, work)
    log_path = os.path.join(work, f"{stage.name}.log")
    record = {"stage": stage.name, "description": stage.description, "command": shlex.join(["python", *cmd[1:]]),
              "timeout_s": round(timeout, 1)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(args, site_dir, stage.name), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the stage's own process group, started just above
            proc.wait()
            rc, status = None, "timeout"
    record.update(returncode=rc, status=status, wall_s=round(time.perf_counter() - t0, 1))
    with open(log_path, errors="replace") as f:
        text = f.read()
    log(f"\n===== stage {stage.name}: {status} in {record['wall_s']} s: {record['command']}\n{text}")
    record["log_tail"] = text[-MAX_LOG_TAIL:]
    try:
        record["result"] = read_result(stage.name, result_path)
    except (OSError, ValueError, ET.ParseError) as e:
        record["result"] = None
        if status == "ok":
            record["status"] = "failed"
            record["error"] = f"the stage exited 0 but its result could not be read: {e}"
    if stage.name in KERNEL_TESTS and status == "failed":
        if rc == 1:
            record["error"] = "some kernel tests failed (see result.failures)"
        elif rc == 5:
            record["error"] = (f"pytest selected no test in {KERNEL_TESTS[stage.name][0]}: with --smoke, update the "
                               "-k selection in KERNEL_TESTS (bench/gpu_suite.py) to a test that exists")
    return record


def read_result(name: str, path: str):
    if name in KERNEL_TESTS:
        return read_junit(path)
    if name == "attention":
        files = sorted(glob.glob(os.path.join(path, "attention-*.json")), key=os.path.getmtime)
        if not files:
            raise OSError(f"bench/attention.py wrote no attention-*.json into {path}")
        with open(files[-1]) as f:
            return json.load(f)
    with open(path) as f:
        return json.load(f)


def read_junit(path: str) -> dict:
    root = ET.parse(path).getroot()
    cases, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, (node.get("message") or "")[:300]
                break
        counts[outcome] += 1
        cases.append({"file": (case.get("classname") or "").replace(".", "/"), "test": case.get("name"),
                      "outcome": outcome, "time_s": float(case.get("time") or 0.0), "message": message})
    by_file: dict[str, dict] = {}
    for c in cases:
        module = c["file"].split("/")
        key = next((f for f in KERNEL_TEST_FILES if os.path.splitext(os.path.basename(f))[0] in module), c["file"])
        by_file.setdefault(key, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})[c["outcome"]] += 1
    return {"counts": counts, "by_file": by_file, "cases": cases,
            "failures": [c for c in cases if c["outcome"] in ("failed", "error")]}


# ------------------------------------------------------------------------------------------------ wheels

def install_wheels(wheel_dir: str | None, work: str, log) -> str | None:
    """pip-installs every wheel of `wheel_dir` (no index, no network) into WORK/site; returns that folder."""
    if not wheel_dir:
        default = os.path.join(ROOT, ".whl")
        wheel_dir = default if glob.glob(os.path.join(default, "*.whl")) else None
        if wheel_dir is None:
            return None
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        raise SuiteError(f"--wheels {wheel_dir!r} holds no .whl files")
    site = os.path.join(work, "site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", site, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"===== wheels: pip install --no-index --no-deps --target {site} ({len(wheels)} wheels): "
        f"rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
    if proc.returncode:
        raise SuiteError(f"installing the wheels of {wheel_dir} failed: {proc.stderr.strip()[-500:]}")
    return site


def missing_modules(names, site_dir) -> list[str]:
    code = ("import importlib.util, sys; "
            "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site_dir, ROOT) if p))
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env)
    return out.stdout.split()


# ----------------------------------------------------------------------------------------------- report

def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _num(x):
    """A measured value: 3 significant digits for small numbers (CPU smoke runs), thousands separators otherwise."""
    if x is None:
        return "-"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"


def attention_rows(result) -> list[dict]:
    rows = []
    for r in (result or {}).get("rows", []):
        rows.append({"stage": "attention",
                     "metric": f"{r['implementation']} {r['pass_']} S={r['seq']} B={r['batch']} "
                               f"{r['heads_q']}/{r['heads_kv']} heads d={r['head_dim']}",
                     "value": r.get("tflops"), "unit": "TFLOP/s", "note": r.get("note", "")})
    return rows


def measurement_rows(stages: dict) -> list[dict]:
    rows = []
    roof = stages.get("roofline", {}).get("result")
    if roof:
        rows.append({"stage": "roofline", "metric": f"copy bandwidth ({roof['copy']['buffer_bytes'] / 2**20:.0f} MiB)",
                     "value": roof["copy"]["gb_per_s"], "unit": "GB/s", "note": ""})
        rows.append({"stage": "roofline", "metric": f"bf16 matmul n={roof['matmul_bf16']['n']}",
                     "value": roof["matmul_bf16"]["tflops"], "unit": "TFLOP/s", "note": ""})
    for name in KERNEL_TESTS:
        kt = stages.get(name, {}).get("result")
        if not kt:
            continue
        for path, c in kt["by_file"].items():
            rows.append({"stage": name, "metric": path, "value": None, "unit": "",
                         "note": f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped"})
        for f in kt["failures"]:
            rows.append({"stage": name, "metric": f"FAILED {f['test']}", "value": None, "unit": "",
                         "note": f["message"][:160].replace("|", "/").replace("\n", " ")})
    rows += attention_rows(stages.get("attention", {}).get("result"))
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
    return rows


def target_rows(stages: dict) -> list[dict]:
    """The four DESIGN.md targets with the measured value (None when the stage gave none)."""
    values = {name: None for name in TARGETS}
    att = stages.get("attention", {}).get("result")
    if att:
        ours = [r for r in att.get("rows", []) if r["implementation"].startswith("ours")]
        if ours:
            longest = max(r["seq"] for r in ours)
            for r in ours:
                if r["seq"] == longest and r["pass_"] in ("fwd", "bwd"):
                    values[f"attention_{r['pass_']}"] = (r.get("tflops"), f"S={longest}")
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
    roof = stages.get("roofline", {}).get("result")
    if roof:
        d = roof["device"]
        return f"{d['platform']}: {d['device_kind']} x{d['device_count']}", d["jax_version"]
    return "unknown (roofline stage gave no result)", "unknown"


# -------------------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernels in interpret mode")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {STAGE_NAMES}")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for all stages together (default 460 on the GPU, 600 with --smoke)")
    p.add_argument("--wheels", default=None, help="folder of .whl files to install first (default: .whl/ if any)")
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
        args.total_budget = 600.0 if args.smoke else 460.0
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.total_budget
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="phi4_gpu_suite_")
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(args.out, "gpu_suite.log")
    log_file = open(log_path, "w")

    def log(text):
        log_file.write(text + "\n")
        log_file.flush()

    try:
        site = install_wheels(args.wheels, work, log)
    except SuiteError as e:   # go on: stages that need nothing from the wheels still run
        print(f"[gpu_suite] warning: {e}", flush=True)
        log(f"warning: {e}")
        site = None
    stages: dict[str, dict] = {}
    missing = missing_modules(["pytest"], site) if set(KERNEL_TESTS) & set(args.stage_list) else []
    for stage in STAGES:
        if stage.name not in args.stage_list:
            stages[stage.name] = {"stage": stage.name, "status": "not selected", "result": None}
            continue
        if stage.name in KERNEL_TESTS and missing:
            stages[stage.name] = {"stage": stage.name, "status": "failed", "result": None,
                                  "error": f"missing module(s) {missing}: carry their wheels in .whl/ "
                                           "(see this script's docstring)"}
            print(f"[gpu_suite] {stage.name}: missing {missing}", flush=True)
            continue
        remaining = deadline - time.perf_counter()
        later = [s for s in STAGES[STAGES.index(stage) + 1:] if s.name in args.stage_list]
        budget = min(stage.smoke_budget_s if args.smoke else stage.budget_s,
                     max(remaining - RESERVE_PER_LATER_STAGE_S * len(later), MIN_STAGE_S))
        if remaining < MIN_STAGE_S:
            stages[stage.name] = {"stage": stage.name, "status": "skipped: total budget spent", "result": None}
            continue
        print(f"[gpu_suite] {stage.name}: {stage.description} (budget {budget:.0f} s)", flush=True)
        stages[stage.name] = run_stage(stage, args, work, site, budget, log)
        print(f"[gpu_suite] {stage.name}: {stages[stage.name]['status']} in {stages[stage.name]['wall_s']} s",
              flush=True)
    device, jax_version = device_summary(stages)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/gpu_suite.py " + " ".join(argv), "smoke": args.smoke, "device": device,
            "jax_version": jax_version, "python": platform.python_version(), "host": platform.node(),
            "wall_s": round(time.perf_counter() - start, 1), "work_dir": work}
    report = {"meta": meta, "targets": target_rows(stages), "measurements": measurement_rows(stages),
              "stages": stages}
    markdown = to_markdown(report)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write(markdown)
    log_file.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown)
    print(f"wrote {args.out}/gpu_suite.json, gpu_suite.md, gpu_suite.log", flush=True)
    return 0 if all(s["status"] in ("ok", "not selected") for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

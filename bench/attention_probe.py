"""Does our Mosaic GPU attention compile and compute the right thing on this GPU? One config per subprocess.

    python bench/attention_probe.py --out DIR                 # on a Hopper GPU: phi-4 heads, seq 2048
    python bench/attention_probe.py --out DIR --smoke         # tiny shapes on a CPU, kernels interpreted
    python bench/attention_probe.py --one fwd+seg --json F    # one config in this process (what the driver runs)

Configs, in order: the forward first, then forward plus backward, each plain, with segment ids (packed
documents and a padded tail), with fused RoPE (positions restarting per document, theta 250000), and with
both; at phi-4's heads (40 query / 10 kv heads, head_dim 128, GQA 4:1), causal, bf16. Each config runs in
its own subprocess with a hard timeout (bench/killable.py), and prints and writes its result at once, so a
hang or a crash costs one config and leaves every earlier result on disk.

Each config reports the compile time (lower + compile of the jitted function), the first run, the median
run time, and the relative error ||ours - ref|| / ||ref|| of the output (and dq, dk, dv) against the XLA
reference: `kernels.attention_reference.attention_naive` in float32 on the same bf16 inputs upcast (with
RoPE: `apply_rope_reference` first), run by XLA on the same device. A config passes when every output is
finite and every relative error is under --tol (bf16 operands land between 1e-3 and 1e-2).

Lowering semantics: the kernels compile with Mosaic GPU's Lane semantics by default
(kernels/flash_attention_gpu.py, PHI4_MOSAIC_GPU_SEMANTICS). When a config fails (error, timeout or wrong
numbers) with one semantics, it is retried with the other one; the semantics that passed is kept for the
configs after it. Each result row lists every attempt and names the semantics that passed.

Output in --out: `attention_probe.json` ({"meta", "rows"}), rewritten after every config, and one log per
attempt (`probe-<config>-<semantics>.log`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.killable import run_killable  # noqa: E402

SEMANTICS_ENV = "PHI4_MOSAIC_GPU_SEMANTICS"   # read by kernels/flash_attention_gpu.py (not imported here: no jax)
SEMANTICS = ("lane", "warpgroup")
PASSES = ("fwd", "fwd+bwd")
VARIANTS = ("", "+seg", "+rope", "+seg+rope")
CONFIGS = tuple(p + v for p in PASSES for v in VARIANTS)     # fwd, fwd+seg, ..., fwd+bwd+seg+rope
SMOKE_CONFIGS = ("fwd+seg+rope",)   # the interpreted kernel is slow on a CPU: one forward, segments and RoPE
GPU_SHAPE = dict(batch=1, seq=2048, heads_q=40, heads_kv=10, head_dim=128)
SMOKE_SHAPE = dict(batch=1, seq=64, heads_q=2, heads_kv=1, head_dim=64)
ROPE_THETA = 250000.0
PAD_TAIL = 8


class ProbeError(ValueError):
    """A bad config name or option."""


def parse_config(name: str) -> dict:
    """'fwd+bwd+seg+rope' -> {"backward": True, "segments": True, "rope": True}."""
    if name not in CONFIGS:
        raise ProbeError(f"unknown probe config {name!r}; choose from {CONFIGS}")
    parts = name.split("+")
    return {"backward": "bwd" in parts, "segments": "seg" in parts, "rope": "rope" in parts}


# ---------------------------------------------------------------------------------- one config (child)

def _relative_error(got, want) -> float:
    import jax.numpy as jnp  # noqa: PLC0415
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))


def _inputs(shape, cfg, seed):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    b, s, hq, hkv, d = (shape[k] for k in ("batch", "seq", "heads_q", "heads_kv", "head_dim"))
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
    dout = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32).astype(jnp.bfloat16)
    rng = np.random.default_rng(seed)
    seg = pos = None
    if cfg["segments"]:   # three packed documents per row, then PAD_TAIL padding tokens (segment 0)
        seg = np.zeros((b, s), np.int32)
        for row in range(b):
            cuts = np.sort(rng.choice(np.arange(1, s - PAD_TAIL), size=2, replace=False))
            seg[row, :cuts[0]], seg[row, cuts[0]:cuts[1]], seg[row, cuts[1]:s - PAD_TAIL] = 1, 2, 3
    if cfg["rope"]:       # positions restart at every document start, as for packed data
        pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
        if seg is not None:
            for row in range(b):
                starts = np.flatnonzero(np.diff(seg[row], prepend=-1))
                for a, e in zip(starts, list(starts[1:]) + [s]):
                    pos[row, a:e] = np.arange(e - a)
        pos = jnp.asarray(pos)
    return q, k, v, dout, None if seg is None else jnp.asarray(seg), pos


def run_one(name: str, shape: dict, *, interpret: bool, iters: int, tol: float, seed: int = 0,
            implementation: str = "pallas_gpu") -> dict:
    """Compiles and runs one config of our attention (`implementation`, pallas_gpu unless checking this
    script itself) and checks it against the XLA reference."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from kernels.attention_reference import attention_naive  # noqa: PLC0415
    from kernels.dispatch import flash_attention, flash_attention_rope  # noqa: PLC0415
    from kernels.rope_reference import apply_rope_reference  # noqa: PLC0415

    cfg = parse_config(name)
    q, k, v, dout, seg, pos = _inputs(shape, cfg, seed)

    def ours(q, k, v):
        if cfg["rope"]:
            return flash_attention_rope(q, k, v, pos, theta=ROPE_THETA, causal=True, segment_ids=seg,
                                        implementation=implementation, interpret=interpret)
        return flash_attention(q, k, v, causal=True, segment_ids=seg, implementation=implementation,
                               interpret=interpret)

    def reference(q, k, v):   # float32 on the upcast bf16 inputs (RoPE'd q, k rounded to bf16 as ours are)
        if cfg["rope"]:
            q, k = (apply_rope_reference(x.astype(jnp.bfloat16), pos, theta=ROPE_THETA).astype(jnp.float32)
                    for x in (q, k))
        return attention_naive(q, k, v, causal=True, segment_ids=seg)

    def with_grads(attn):
        def fn(q, k, v, dout):
            out, vjp = jax.vjp(attn, q, k, v)
            return (out, *vjp(dout.astype(out.dtype)))
        return fn

    names = ("out", "dq", "dk", "dv") if cfg["backward"] else ("out",)
    fn = with_grads(ours) if cfg["backward"] else (lambda q, k, v, dout: (ours(q, k, v),))
    ref = with_grads(reference) if cfg["backward"] else (lambda q, k, v, dout: (reference(q, k, v),))
    args = (q, k, v, dout)
    row = {"config": name, "implementation": implementation, **cfg, **shape, "causal": True, "dtype": "bfloat16",
           "devices": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}", "jax_version": jax.__version__,
           "interpret": interpret}

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    print(f"[probe {name}] compiled in {row['compile_s']} s", flush=True)
    t0 = time.perf_counter()
    got = jax.block_until_ready(compiled(*args))
    row["first_run_s"] = round(time.perf_counter() - t0, 4)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    row["run_ms"] = round(1e3 * statistics.median(times), 4) if times else None
    want = jax.jit(ref)(*(x.astype(jnp.float32) for x in (q, k, v)), dout.astype(jnp.float32))
    finite = {n: bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for n, g in zip(names, got)}
    row["rel_err"] = {n: _relative_error(g, w) for n, g, w in zip(names, got, want)}
    row["finite"] = all(finite.values())
    row["tol"] = tol
    row["passed"] = row["finite"] and all(e < tol for e in row["rel_err"].values())
    print(f"[probe {name}] run {row['run_ms']} ms, rel err "
          + ", ".join(f"{n} {e:.2e}" for n, e in row["rel_err"].items())
          + f": {'PASS' if row['passed'] else 'FAIL'}", flush=True)
    return row


# ----------------------------------------------------------------------------------- driver (parent)

def probe_all(configs, attempt, *, deadline: float, emit, min_left_s: float = 5.0) -> list[dict]:
    """Runs every config through `attempt(config, semantics, deadline) -> attempt record` (a dict with
    "status" ok/failed/timeout and, when ok, "passed"), retrying a failed config with the other lowering
    semantics and keeping the one that passed for later configs. Calls `emit(rows)` after every config."""
    rows, preferred = [], SEMANTICS[0]
    for name in configs:
        row = {"config": name, "attempts": [], "semantics_passed": None}
        for semantics in (preferred, *[s for s in SEMANTICS if s != preferred]):
            if deadline - time.perf_counter() < min_left_s:
                row["attempts"].append({"semantics": semantics, "status": "skipped: probe budget spent"})
                break
            record = attempt(name, semantics, deadline)
            row["attempts"].append({"semantics": semantics, **record})
            if record["status"] == "ok" and record.get("passed"):
                row["semantics_passed"] = preferred = semantics
                break
        last = row["attempts"][-1]
        row["status"] = ("passed" if row["semantics_passed"] else
                         "skipped" if last["status"].startswith("skipped") else "failed")
        if row["semantics_passed"]:
            row["result"] = {k: v for k, v in last.items() if k not in ("semantics", "status", "log_tail")}
        rows.append(row)
        emit(rows)
    return rows


def _subprocess_attempt(args, out_dir):
    def attempt(name, semantics, deadline):
        result_path = os.path.join(out_dir, f"probe-{name}-{semantics}.json")
        log_path = os.path.join(out_dir, f"probe-{name}-{semantics}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--json", result_path,
               "--iters", str(args.iters), "--tol", str(args.tol), *(["--smoke"] if args.smoke else [])]
        env = dict(os.environ, **{SEMANTICS_ENV: semantics})
        timeout = min(args.config_timeout, deadline - time.perf_counter())
        print(f"[probe] {name} ({semantics} semantics, timeout {timeout:.0f} s) ...", flush=True)
        run = run_killable(cmd, timeout=timeout, log_path=log_path, cwd=ROOT, env=env)
        record = {"status": run["status"], "wall_s": run["wall_s"], "log_tail": run["log"][-1500:]}
        if run["status"] == "ok":
            try:
                with open(result_path) as f:
                    record.update(json.load(f))
            except (OSError, ValueError) as e:
                record.update(status="failed", error=f"exited 0 without a readable result: {e}")
        elif run["status"] == "failed":
            lines = [ln for ln in run["log"].strip().splitlines() if ln.strip()]
            record["error"] = lines[-1][:400] if lines else f"exit code {run['returncode']}, no output"
        else:
            record["error"] = f"killed after {timeout:.0f} s (see {os.path.basename(log_path)})"
        print(f"[probe] {name} ({semantics}): {describe(record)}", flush=True)
        return record
    return attempt


def describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"
    errs = ", ".join(f"{n} {e:.2e}" for n, e in record["rel_err"].items())
    return (f"{'PASS' if record['passed'] else 'WRONG'} compile {record['compile_s']} s, "
            f"run {record['run_ms']} ms, rel err {errs}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for attention_probe.json and the per-attempt logs")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, kernels in interpret mode (CPU)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {CONFIGS} (default: all; with --smoke {SMOKE_CONFIGS})")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole probe")
    p.add_argument("--config-timeout", type=float, default=75.0, help="seconds for one config's subprocess")
    p.add_argument("--iters", type=int, default=None, help="timed runs per config (default 5; 0 with --smoke: the first run only)")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative error that passes")
    p.add_argument("--one", default=None, help="run this one config in this process (the driver's child)")
    p.add_argument("--json", default=None, help="with --one: where to write its result")
    p.add_argument("--implementation", default="pallas_gpu", choices=("pallas_gpu", "xla"),
                   help="with --one: the attention checked (xla only to check this script on a CPU)")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 0 if args.smoke else 5
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    try:
        if args.one:
            if not args.json:
                raise ProbeError("--one needs --json")
            row = run_one(args.one, shape, interpret=args.smoke, iters=args.iters, tol=args.tol,
                          implementation=args.implementation)
            with open(args.json, "w") as f:
                json.dump(row, f, indent=1)
            return 0
        if not args.out:
            raise ProbeError("--out is required (or --one CONFIG --json FILE)")
        configs = (args.configs.split(",") if args.configs else list(SMOKE_CONFIGS if args.smoke else CONFIGS))
        for name in configs:
            parse_config(name)
    except ProbeError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/attention_probe.py " + " ".join(argv), "shape": shape, "smoke": args.smoke,
            "tol": args.tol, "rope_theta": ROPE_THETA}
    path = os.path.join(args.out, "attention_probe.json")

    def emit(rows):
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    rows = probe_all(configs, _subprocess_attempt(args, args.out), deadline=deadline, emit=emit)
    print("\n| config | status | semantics passed | compile s | run ms | max rel err |\n|---|---|---|---:|---:|---:|")
    for r in rows:
        res = r.get("result") or {}
        err = max(res["rel_err"].values()) if res else None
        print(f"| {r['config']} | {r['status']} | {r['semantics_passed'] or '-'} | {res.get('compile_s', '-')} | "
              f"{res.get('run_ms', '-')} | {'-' if err is None else f'{err:.2e}'} |")
    print(f"wrote {path}", flush=True)
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

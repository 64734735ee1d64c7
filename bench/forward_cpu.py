"""CPU comparisons against transformers: a forward pass, and checkpoint conversion speed and memory.

    python bench/forward_cpu.py                           # ~87M-parameter phi-4-shaped model, float32
    python bench/forward_cpu.py --write BENCHMARKS.md     # also record the tables in BENCHMARKS.md
    python bench/forward_cpu.py --size tiny --json OUT    # seconds; checks the script end to end

Forward: one random transformers `Phi3ForCausalLM` is converted in memory (`phi4_jax.checkpoint.hf_mapping`), so
both sides hold the same float32 weights. For each batch, after a warm-up call (phi4_jax: the jit compile,
timed separately), the median of `--repeats` full forward passes (logits over the whole sequence) is
taken, the sides alternating so machine load hits both alike. The logits are compared too (max |diff|),
so the two sides provably compute the same thing.

Conversion: the same model is saved with `save_pretrained` (safetensors); then, in fresh processes,
`python convert_weights.py SRC DST` (our streaming converter, Orbax output; with its default zstd
compression and with `--compression none`) and transformers' `from_pretrained(SRC)` + `save_pretrained(DST)`
(the usual way to re-save a checkpoint) are each run `--convert-repeats` times: median wall time of the
whole process (Python start and imports included on both sides) and its peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import run_command, run_date, update_section, write_json  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402

SECTION_KEY = "cpu-forward-convert"
SECTION_HEADING = "Forward pass and conversion on CPU (vs transformers)"
SECTION_INTRO = """`bench/forward_cpu.py`: full forward pass (logits over the whole sequence) of phi4_jax (jit) against
transformers' `Phi3ForCausalLM`, same random phi-4-shaped float32 weights, same machine and run; and checkpoint
conversion (`convert_weights.py`) against transformers' `from_pretrained` + `save_pretrained`, each in a fresh
process. Each run appends a table below."""


def bench_forward(hf, params, config, batches, seq, repeats) -> list[dict]:
    import jax
    import numpy as np
    import torch

    from phi4_jax.model.decoder import forward

    ours_fn = jax.jit(lambda p, ids: forward(p, ids, config))
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        ids = rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
        ids_t = torch.tensor(ids, dtype=torch.long)

        def ours():
            return jax.block_until_ready(ours_fn(params, ids))

        def theirs():
            with torch.no_grad():
                return hf(ids_t).logits

        t0 = time.perf_counter()
        ours_logits = np.asarray(ours())
        ours_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_logits = theirs().numpy()
        hf_first = time.perf_counter() - t0
        max_diff = float(np.max(np.abs(ours_logits - hf_logits)))
        t_ours, t_hf = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs()
            t_hf.append(time.perf_counter() - t0)
        o, h = statistics.median(t_ours), statistics.median(t_hf)
        rows.append({"batch": batch, "seq": seq, "ours_s": o, "hf_s": h, "ours_tokens_per_s": batch * seq / o,
                     "hf_tokens_per_s": batch * seq / h, "speedup": h / o, "ours_first_call_s": ours_first,
                     "hf_first_call_s": hf_first, "max_abs_logit_diff": max_diff})
        print(f"forward batch {batch} x {seq}: phi4_jax {batch * seq / o:.0f} tokens/s, transformers "
              f"{batch * seq / h:.0f} tokens/s ({h / o:.2f}x); max |logit diff| {max_diff:.2e}", flush=True)
    return rows


# Peak RSS from /proc/self/status VmHWM (reset at exec); getrusage's ru_maxrss would carry the parent's
# high-water mark over fork + exec.
_RSS_WRAPPER = """
import runpy, sys
code = 0
try:
    {body}
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print("MAXRSS_KB=%s" % hwm[0], file=sys.stderr)
sys.exit(code)
"""


def timed_process(body: str, cwd: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a fresh Python process running `body` (one indented statement)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER.format(body=body)], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"conversion process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB=")]
    return wall, int(rss[-1].split("=")[1]) * 1024


def bench_conversion(hf, repeats: int, workdir: str) -> list[dict]:
    src = os.path.join(workdir, "hf_src")
    hf.save_pretrained(src, safe_serialization=True)
    src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    script = os.path.join(ROOT, "convert_weights.py")
    variants = {
        "phi4_jax convert_weights.py (zstd, default)": lambda dst: (
            f"sys.argv = [{script!r}, {src!r}, {dst!r}, '--no-progress']; "
            f"runpy.run_path({script!r}, run_name='__main__')"),
        "phi4_jax convert_weights.py --compression none": lambda dst: (
            f"sys.argv = [{script!r}, {src!r}, {dst!r}, '--no-progress', '--compression', 'none']; "
            f"runpy.run_path({script!r}, run_name='__main__')"),
        "transformers from_pretrained + save_pretrained": lambda dst: (
            "import torch; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.float32).save_pretrained({dst!r})"),
    }
    rows = []
    for name, make_body in variants.items():
        walls, rsss = [], []
        for i in range(repeats):
            dst = os.path.join(workdir, f"dst_{len(rows)}_{i}")
            wall, rss = timed_process(make_body(dst), ROOT)
            if not os.listdir(dst):
                raise RuntimeError(f"{name} wrote nothing to {dst}")
            walls.append(wall)
            rsss.append(rss)
            shutil.rmtree(dst, ignore_errors=True)
        rows.append({"tool": name, "median_wall_s": statistics.median(walls), "walls_s": walls,
                     "peak_rss_bytes": max(rsss), "source_bytes": src_bytes})
        print(f"convert {name}: {statistics.median(walls):.2f} s, peak RSS {max(rsss) / 2**20:.0f} MiB", flush=True)
    return rows


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"### {m['date']}, `{m['command']}`", "",
             f"Machine: {m['machine']}; jax {m['jax_version']}, torch {m['torch_version']}, transformers "
             f"{m['transformers_version']} ({m['threads']} torch threads). Model: random phi-4-shaped "
             f"Phi3ForCausalLM, {m['num_params'] / 1e6:.3g}M parameters, float32 on both sides. Medians.", "",
             "| forward | phi4_jax tokens/s | transformers tokens/s | speed-up | phi4_jax compile + first call "
             "| max abs logit diff |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["forward"]:
        lines.append(f"| batch {r['batch']} x {r['seq']} | {r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} "
                     f"| {r['speedup']:.2f}x | {r['ours_first_call_s']:.2f} s | {r['max_abs_logit_diff']:.1e} |")
    if result["conversion"]:
        src_mb = result["conversion"][0]["source_bytes"] / 2**20
        lines += ["", f"| conversion of a {src_mb:.0f} MiB safetensors checkpoint (fresh process) | wall s "
                      "| peak RSS MiB |", "|---|---:|---:|"]
        for r in result["conversion"]:
            lines.append(f"| {r['tool']} | {r['median_wall_s']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="87m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--convert-repeats", type=int, default=2)
    p.add_argument("--no-conversion", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    p.add_argument("--json", default=None)
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)

    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    machine_description = describe_machine(with_load=True)
    hf, params, config = random_model_pair(args.size)
    forward_rows = bench_forward(hf, params, config, args.batches, args.seq, args.repeats)
    conversion_rows = []
    if not args.no_conversion:
        with tempfile.TemporaryDirectory(prefix="phi4_convert_bench_") as workdir:
            conversion_rows = bench_conversion(hf, args.convert_repeats, workdir)
    meta = {"date": run_date(), "command": run_command(__file__, argv), "machine": machine_description,
            "jax_version": jax.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "threads": args.threads,
            "num_params": config.num_params, "size": args.size}
    result = {"meta": meta, "forward": forward_rows, "conversion": conversion_rows}
    markdown = to_markdown(result)
    print(markdown)
    write_json(args.json, result)
    if args.write:
        update_section(args.write, SECTION_HEADING, SECTION_KEY, intro=SECTION_INTRO, append=markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

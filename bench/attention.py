"""Attention benchmark: TFLOP/s of our Pallas kernel, cuDNN, the XLA reference and JAX's bundled Pallas
attention at phi-4 shapes (bf16, 40 q / 10 kv heads, head_dim 128, causal, 4K and 16K), forward and
forward+backward.

    python bench/attention.py                       # on a GPU/TPU: phi-4 shapes
    python bench/attention.py --seq 16384 --impls ours,cudnn   # what bench/gpu_suite.py runs on a GPU
    python bench/attention.py --smoke               # tiny shapes on CPU (Pallas in interpret mode)
    python bench/attention.py --append-benchmarks   # also add the table to BENCHMARKS.md (Attention)

FLOPs are counted honestly: forward = 4 * B * Hq * S^2 * D (two matmuls), halved when causal (only the
visible half of the score matrix is work); backward = 2.5 x forward (five matmuls instead of two).
"fwd+bwd" rows time one forward and its VJP together (3.5 x forward FLOPs); "bwd" rows are derived as
fwd+bwd time minus fwd time. Times are medians over `--iters` runs after `--warmup` runs, each ended by
`block_until_ready`. Writes JSON and Markdown (date, device, jax version, command) to `--out`; the JSON
is rewritten after every row, so a run killed part way leaves every finished row on disk.

`--impls` picks implementations, in that order: ours, cudnn, mgpu (JAX's `attention_mgpu`, run in fp16:
its scratch buffers are fp16, so bf16 inputs fail), xla; on a TPU, ours and jax_tpu. Rows carry their dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels.attention_reference import attention_blockwise  # noqa: E402
from kernels.dispatch import flash_attention, is_hopper_gpu  # noqa: E402

SECTION_BEGIN = "<!-- attention:begin -->"
SECTION_END = "<!-- attention:end -->"


class Unavailable(Exception):
    """This implementation does not run here / for this configuration (the message says why)."""


def attention_flops(batch, heads_q, seq, head_dim, causal):
    """Forward FLOPs of attention: two S x S x D matmuls per head, half of them when causal."""
    flops = 4.0 * batch * heads_q * seq * seq * head_dim
    return flops / 2 if causal else flops


# ------------------------------------------------------------------------------------ implementations

def impl_ours(interpret):
    def attn(q, k, v, causal):
        if not interpret and not is_hopper_gpu(jax.devices()[0]):
            raise Unavailable("the Mosaic GPU kernel needs a Hopper GPU (or --smoke for interpret mode)")
        return flash_attention(q, k, v, causal=causal, implementation="pallas_gpu", interpret=interpret)
    return attn


def impl_ours_tpu(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal, implementation="pallas_tpu")


def impl_cudnn(q, k, v, causal):
    if jax.devices()[0].platform != "gpu":
        raise Unavailable("cuDNN needs a CUDA GPU")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def impl_xla(q, k, v, causal):
    return attention_blockwise(q, k, v, causal=causal)


def impl_jax_mgpu(q, k, v, causal, *, backward):
    """JAX's bundled FlashAttention-3 (jax.experimental.pallas.ops.gpu.attention_mgpu), Hopper only."""
    if not is_hopper_gpu(jax.devices()[0]):
        raise Unavailable("attention_mgpu needs a Hopper GPU")
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu  # noqa: PLC0415
    except ImportError as e:
        raise Unavailable(f"attention_mgpu not importable: {e}") from e
    if backward and causal:
        raise Unavailable("attention_mgpu has no causal backward")
    if q.dtype != jnp.float16:
        raise Unavailable("attention_mgpu's scratch buffers are fp16: run it on fp16 inputs")
    blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64) if backward else {}
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                                         **blocks)
    return attention_mgpu.attention(q, k, v, config)


def impl_jax_tpu_flash(q, k, v, causal):
    """JAX's bundled TPU flash attention (layout [B, H, S, D], no GQA: K/V heads are repeated)."""
    if jax.devices()[0].platform != "tpu":
        raise Unavailable("pallas.ops.tpu.flash_attention needs a TPU")
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa  # noqa: PLC0415
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    to_bhsd = lambda x: x.transpose(0, 2, 1, 3)
    out = tpu_fa.flash_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), causal=causal,
                                 sm_scale=q.shape[-1] ** -0.5)
    return to_bhsd(out)


IMPL_KEYS = ("ours", "cudnn", "mgpu", "xla", "jax_tpu")


def implementations(args):
    """{row name: (factory(backward) -> attention function, input dtype)} for the `--impls` keys, in order."""
    platform_ = jax.devices()[0].platform
    bf16 = jnp.bfloat16
    if platform_ == "tpu":
        table = {"ours": ("ours (pallas_tpu)", lambda bwd: impl_ours_tpu, bf16),
                 "jax_tpu": ("jax pallas tpu flash_attention", lambda bwd: impl_jax_tpu_flash, bf16)}
    else:
        table = {"ours": ("ours (pallas_gpu)", lambda bwd: impl_ours(args.smoke), bf16),
                 "cudnn": ("cudnn", lambda bwd: impl_cudnn, bf16),
                 "mgpu": ("jax pallas attention_mgpu (fp16)",
                          lambda bwd: (lambda q, k, v, causal: impl_jax_mgpu(q, k, v, causal, backward=bwd)),
                          jnp.float16)}
    table["xla"] = ("xla reference (blockwise)", lambda bwd: impl_xla, bf16)
    return {table[key][0]: table[key][1:] for key in args.impls if key in table}


# ------------------------------------------------------------------------------------------- timing

def _time(fn, inputs, warmup, iters):
    for _ in range(warmup):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(make_impl, shape, causal, mode, warmup, iters, dtype=jnp.bfloat16):
    b, s, hq, hkv, d = shape
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    attn = make_impl(mode != "fwd")
    if mode == "fwd":
        fn = jax.jit(lambda q, k, v: attn(q, k, v, causal))
        inputs = (q, k, v)
    else:
        dout = jax.random.normal(ks[3], (b, s, hq, d), dtype)

        def fwd_bwd(q, k, v, dout):
            out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)
            return out, vjp(dout)
        fn = jax.jit(fwd_bwd)
        inputs = (q, k, v, dout)
    return _time(fn, inputs, warmup, iters)


def run(args, emit=lambda rows: None):
    """Times every (shape, implementation) in order; calls `emit(rows so far)` after each finished row."""
    if args.smoke:
        shapes = [(1, 64, 2, 1, 64)]
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 1)
    else:
        shapes = [(args.batch, s, 40, 10, 128) for s in args.seq]
    impls = implementations(args)
    causal = not args.non_causal
    rows = []
    jobs = [(name, shape) for shape in shapes for name in impls]
    for name, shape in tqdm(jobs, desc="attention bench", unit="config"):
        b, s, hq, hkv, d = shape
        make_impl, dtype = impls[name]
        flops_fwd = attention_flops(b, hq, s, d, causal)
        result = {}

        def add_row(mode, factor):
            t = result[mode]
            row = dict(implementation=name, batch=b, seq=s, heads_q=hq, heads_kv=hkv, head_dim=d,
                       causal=causal, dtype=jnp.dtype(dtype).name, pass_=mode)
            if isinstance(t, float):
                row.update(ms=t * 1e3, tflops=factor * flops_fwd / t / 1e12)
            else:
                row.update(ms=None, tflops=None, note=t)
            rows.append(row)
            print(f"[attention] {name} {mode} S={s}: "
                  + (f"{row['ms']:.3f} ms, {row['tflops']:.4g} TFLOP/s" if row["ms"] is not None else row["note"]),
                  flush=True)
            emit(rows)

        for mode, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            try:
                result[mode] = bench_one(make_impl, shape, causal, mode, args.warmup, args.iters, dtype)
            except Unavailable as e:
                result[mode] = f"n/a: {e}"
            except Exception as e:  # noqa: BLE001 (one failing implementation must not end the run)
                result[mode] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            add_row(mode, factor)
        if isinstance(result["fwd"], float) and isinstance(result["fwd+bwd"], float):
            result["bwd"] = max(result["fwd+bwd"] - result["fwd"], 1e-12)
        else:
            result["bwd"] = "n/a: needs fwd and fwd+bwd"
        add_row("bwd", 2.5)
    return rows


# ------------------------------------------------------------------------------------------- output

def metadata(argv):
    dev = jax.devices()[0]
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
                jax_version=jax.__version__, python=platform.python_version(),
                command="python bench/attention.py " + " ".join(argv))


def to_markdown(meta, rows):
    lines = [f"### Attention benchmark, {meta['date']}", "",
             f"- device: {meta['device']}; jax {meta['jax_version']}",
             f"- command: `{meta['command']}`",
             "- TFLOP/s with causal FLOPs halved; fwd = 4*B*Hq*S^2*D (/2 causal), bwd = 2.5x fwd; "
             "bwd time = (fwd+bwd) - fwd; medians after warm-up", "",
             "| implementation | B | S | Hq/Hkv | D | causal | pass | ms | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.4g}" if r["tflops"] is not None else r.get("note", "-")
        lines.append(f"| {r['implementation']} | {r['batch']} | {r['seq']} | {r['heads_q']}/{r['heads_kv']} | "
                     f"{r['head_dim']} | {r['causal']} | {r['pass_']} | {ms} | {tf} |")
    return "\n".join(lines) + "\n"


def append_to_benchmarks(path, markdown):
    """Adds the table inside this script's own section of BENCHMARKS.md (created if absent)."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION_BEGIN not in text:
        text = text.rstrip("\n") + (f"\n\n## Attention\n\n{SECTION_BEGIN}\n"
                                    "Tables written by `bench/attention.py --append-benchmarks`.\n"
                                    f"{SECTION_END}\n")
    head, rest = text.split(SECTION_BEGIN, 1)
    body, tail = rest.split(SECTION_END, 1)
    body = body.rstrip("\n") + "\n\n" + markdown
    with open(path, "w") as f:
        f.write(head + SECTION_BEGIN + body + SECTION_END + tail)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU; Pallas runs in interpret mode (checks the script end to end)")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--append-benchmarks", action="store_true",
                   help="append the Markdown table to BENCHMARKS.md (Attention section)")
    p.add_argument("--impls", default="ours,cudnn,mgpu,xla,jax_tpu",
                   help=f"comma-separated implementations, run in this order, from {IMPL_KEYS} "
                        "(those that do not exist on this platform are left out)")
    args = p.parse_args(argv)
    args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    bad = sorted(set(args.impls) - set(IMPL_KEYS))
    if bad or not args.impls:
        p.error(f"--impls: unknown implementation(s) {bad}; choose from {IMPL_KEYS}")
    meta = metadata(argv)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "attention-" + ("smoke-" if args.smoke else "")
                        + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S"))

    def emit(rows):
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows, complete=False), f, indent=1)

    rows = run(args, emit)
    md = to_markdown(meta, rows)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, complete=True), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    if args.append_benchmarks:
        append_to_benchmarks(os.path.join(ROOT, "BENCHMARKS.md"), md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

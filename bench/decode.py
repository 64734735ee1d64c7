"""Decode speed on this machine: phi4_jax.generate against transformers' generate (KV cache), same model.

    python bench/decode.py                       # phi-4-shaped layers with an 8K and the 100K vocab, fp32 both sides
    python bench/decode.py --write BENCHMARKS.md # also append the results to the "Decode" section

One random Phi3ForCausalLM is built in transformers and converted in memory, so both sides run the same
weights in float32 (with `--dtype bfloat16`, both rounded to bfloat16 and computed in it). transformers runs at each of `--hf-threads` torch thread counts (on a loaded machine,
torch's OpenMP threads can be far slower with more threads) and the fastest is compared. For batch 1 and
batch 8 (equal-length prompts), after a warm-up call, each side generates 1 token (prefill + first token)
and N tokens with stop tokens off (every sequence runs to N), the sides alternating so that machine load
hits all alike; with t_1 and t_N the medians, decode tokens/s = batch * (N - 1) / (t_N - t_1) and prefill
tokens/s = batch * prompt_len / t_1. Time to first token is also measured on the very first call, which
for phi4_jax includes compiling the prefill. The serving engine (`ContinuousBatchingEngine`, compiled before
timing) is timed the same way in the same rotation, answering the batch as concurrent requests ("engine decode").
Last (greedy runs only), one more greedy generation on each side gives how many leading tokens agree (the least
over the rows): in float32 all of them unless a near-tie flips (2026-12-01 23:45: one row of 8 parted after 38 tokens where
transformers' top two logits were 5.5e-6 apart); in bfloat16 the sides round different sums, so near-ties flip
after a few tokens.

    python bench/decode.py --dtype bfloat16      # both sides in bfloat16 (phi-4's checkpoint dtype)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import update_section  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="87m-8k,87m",
                   help=f"comma-separated model sizes from {sorted(SIZES)} (vocabulary 8K and phi-4's 100K)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median is reported)")
    p.add_argument("--hf-threads", default=f"1,{os.cpu_count()}",
                   help="torch thread counts to measure; the fastest is compared (XLA uses all cores)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="both sides' weights and compute: float32, or bfloat16 (phi-4's checkpoint dtype; transformers "
                        "in torch.bfloat16, phi4_jax with bfloat16 params, compute and KV cache)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature on both sides (0: greedy, the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature: top-k sampling (0: off)")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None,
                   help="append the results to this file's 'Decode' section")
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if args.temperature == 0 and (args.top_p < 1 or args.top_k > 0):
        p.error("--top-p and --top-k need a sampling --temperature above 0")
    return args


def sampling_kwargs(args) -> dict:
    """phi4_jax's sampling arguments (`generate`'s and `GenerationRequest`'s) for the command line's settings."""
    if args.temperature == 0:
        return {}
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None}


def hf_sampling_kwargs(args) -> dict:
    """transformers' `generate` arguments for the same settings (its top_k defaults to 50: 0 turns it off)."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def ours_runner(model, prompts, sampling: dict):
    """Each call's prompts differ from the last call's in their first token: `generate` runs on the model's engine,
    whose prefix cache would otherwise skip the prefill of a repeated prompt (prefill would look faster than it is)."""
    import phi4_jax

    calls = [0]

    def run(n):
        calls[0] += 1
        fresh = [[(p[0] + calls[0]) % 1000 + 3] + p[1:] for p in prompts]
        out = phi4_jax.generate(model, fresh, max_new_tokens=n, stop_tokens=[], seed=calls[0], **sampling)
        assert all(len(o) == n for o in out)
    return run


def engine_runner(model, prompts, new_tokens: int, sampling: dict):
    """(run, engine): the serving engine (`ContinuousBatchingEngine`, max_batch = the batch) answering the prompts
    as concurrent requests. Each call changes the prompts' first token, so no call reuses another's prefix cache."""
    from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest

    engine = ContinuousBatchingEngine(model, max_batch=len(prompts), max_context=len(prompts[0]) + new_tokens,
                                      prefill_chunk=len(prompts[0])).start()
    calls = iter(range(1, 1 << 30))

    def run(n):
        call = next(calls)
        first = 3 + call % (model.config.vocab_size - 3)
        streams = engine.submit_many([GenerationRequest([first] + list(p[1:]), n, seed=call * len(prompts) + i,
                                                        **sampling) for i, p in enumerate(prompts)])
        assert all(len(list(s)) == n for s in streams)
    return run, engine


def hf_runner(model, prompts, threads: int, sampling: dict):
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                 pad_token_id=0, **sampling)
        assert out.shape[1] == ids.shape[1] + n
    return run


def greedy_agreement(model, hf, prompts, new_tokens: int) -> int:
    """How many leading greedy tokens phi4_jax.generate and transformers' generate agree on, the least over the
    rows (new_tokens when all agree). In float32 they agree unless two logits are tied within float32 rounding;
    in bfloat16 the two sides round different sums (summation order, fused ops), so near-ties flip much sooner."""
    import numpy as np
    import torch

    import phi4_jax

    ours = np.asarray(phi4_jax.generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=[]))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                                                              dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=0)[:, len(prompts[0]):].numpy()
    differ = ours != theirs
    return int(min(row.argmax() if row.any() else new_tokens for row in differ))


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_pair(runners: dict, new_tokens: int, repeats: int) -> dict:
    """{name: (first call incl. compile, median t_1, median t_N)}; the sides alternate, so load hits both alike."""
    cold = {name: seconds(run, 1) for name, run in runners.items()}
    for run in runners.values():
        run(new_tokens)  # warm-up (phi4_jax: compiles the engine's decode step and prefill chunks)
    t1 = {name: [] for name in runners}
    tn = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t1[name].append(seconds(run, 1))
            tn[name].append(seconds(run, new_tokens))
    return {name: (cold[name], statistics.median(t1[name]), statistics.median(tn[name])) for name in runners}


DECODE_INTRO = """`bench/decode.py`: decode tokens/s of `phi4_jax.generate` (the serving engine's paged KV cache and step,
driven on the caller's thread) and of the serving engine itself against transformers' `generate` (its KV cache),
same random phi-4-shaped model and weights, float32 on both sides (or, with `--dtype bfloat16`, bfloat16 on both
sides), same machine and run; phi-4-shaped layers (hidden 384, 6 layers, 6/2 heads) with an 8K and with phi-4's
100K vocabulary, batch 1 and 8, 256 new tokens, after a warm-up; torch at 1 and at all cores, the faster compared;
also prefill tokens/s, time to first token (phi4_jax's first call includes compiling the prefill) and how many
greedy tokens equal transformers'. Goal on CPU: decode at least 2x transformers. Since 2026-12-02 also the bytes of
weights a decode step reads (every matrix once, the embedding only for the batch's rows) and the tokens/s that
torch's read rate over a buffer larger than the last-level cache (`torch.sum`, all threads, measured in the same
run) would allow for them: a DRAM bound, which a model whose weights fit the cache exceeds. Each run appends a
table below."""

BANDWIDTH_BUFFER_BYTES = 1 << 30    # larger than any last-level cache this runs on


def read_bandwidth(threads: int, nbytes: int = BANDWIDTH_BUFFER_BYTES, calls: int = 7) -> float:
    """Bytes per second torch reads with `threads` threads: the median of `calls` sums over an nbytes float32
    buffer (after one warm-up), a peer's measure of the machine's memory read rate."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[calls // 2]


def weight_bytes_per_step(params, batch: int) -> int:
    """Bytes of weights a decode step reads: every parameter once but the embedding, of which only the batch's
    rows."""
    import jax

    total = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(
        {k: v for k, v in params.items() if k != "embed"}))
    embed = params["embed"]
    return total + batch * embed.shape[-1] * embed.dtype.itemsize


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    from kernels import cpu_native
    from phi4_jax.model.decoder import model_from_params

    hf_threads = [int(t) for t in args.hf_threads.split(",")]
    bandwidth = read_bandwidth(max(hf_threads))
    native = ("native CPU kernels (kernels/cpu_native)" if cpu_native.available()
              else f"XLA's ops (native CPU kernels unavailable: {cpu_native.unavailable_reason()})")
    command = "python bench/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    decoding = ("greedy" if args.temperature == 0 else
                f"sampled on both sides at temperature {args.temperature}, top_p {args.top_p}, top_k "
                f"{args.top_k or 'off'} (transformers: do_sample with its top-k/top-p warpers)")
    lines = [
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `{command.strip()}`",
        "",
        f"Machine: {describe_machine(with_load=True)}; jax {jax.__version__} ({jax.default_backend()}, XLA's default "
        f"threads), torch {torch.__version__} (measured with {args.hf_threads} threads; the table compares the "
        f"fastest, the others are listed). Models: random phi-4-shaped Phi3ForCausalLM, {args.dtype} on both sides; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {decoding}, median of {args.repeats}. "
        f"phi4_jax ran {native}. torch's read rate: {bandwidth / 1e9:.1f} GB/s ({max(hf_threads)} threads, "
        f"{BANDWIDTH_BUFFER_BYTES >> 20} MiB buffer).",
        "",
        "| model | batch | phi4_jax decode tok/s | transformers decode tok/s (best threads; others) | speed-up "
        "| engine decode tok/s (speed-up) | phi4_jax prefill tok/s "
        "| transformers prefill tok/s | phi4_jax first token: cold (incl. compile) / warm "
        "| transformers first token: first call / warm | greedy tokens equal to transformers' "
        "| weights read per step / DRAM bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes.split(","):
        hf, params, config = random_model_pair(size, args.dtype)
        ours = model_from_params(config, params)
        model_name = (f"{config.num_params / 1e6:.0f}M: hidden {config.hidden_size}, {config.num_layers} layers, "
                      f"{config.num_heads}/{config.num_kv_heads} heads, vocab {config.vocab_size}")
        rng = np.random.default_rng(0)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
            engine_run, engine = engine_runner(ours, prompts, args.new_tokens, sampling_kwargs(args))
            runners = {"ours": ours_runner(ours, prompts, sampling_kwargs(args)), "engine": engine_run}
            runners.update({th: hf_runner(hf, prompts, th, hf_sampling_kwargs(args)) for th in hf_threads})
            times = bench_pair(runners, args.new_tokens, args.repeats)
            engine.shutdown()
            torch.set_num_threads(max(hf_threads))
            agree = (f"{greedy_agreement(ours, hf, prompts, args.new_tokens)} of {args.new_tokens}"
                     if args.temperature == 0 else "n/a (sampled)")
            decode = {name: batch * (args.new_tokens - 1) / (tn - t1) for name, (_, t1, tn) in times.items()}
            best = max(hf_threads, key=lambda th: decode[th])
            e_dec = decode["engine"]
            (o_cold, o_1, _), (h_cold, h_1, _) = times["ours"], times[best]
            o_dec, h_dec = decode["ours"], decode[best]
            others = ", ".join(f"{decode[th]:.1f} with {th} threads" for th in hf_threads if th != best)
            o_pre, h_pre = batch * args.prompt_len / o_1, batch * args.prompt_len / h_1
            step_bytes = weight_bytes_per_step(params, batch)
            bound = batch * bandwidth / step_bytes
            print(f"{size} batch {batch}: decode {o_dec:.1f} (engine {e_dec:.1f}) vs {h_dec:.1f} tokens/s "
                  f"({o_dec / h_dec:.2f}x, engine {e_dec / h_dec:.2f}x; "
                  f"transformers {best} threads; {others or '-'}); prefill {o_pre:.0f} vs {h_pre:.0f} tokens/s; "
                  f"first token {o_cold:.2f}s cold / {o_1 * 1e3:.0f} ms warm vs {h_cold:.2f}s / {h_1 * 1e3:.0f} ms; "
                  f"greedy tokens equal: {agree}",
                  flush=True)
            lines.append(f"| {model_name} | {batch} | {o_dec:.1f} | {h_dec:.1f} ({best} threads; {others or '-'}) "
                         f"| **{o_dec / h_dec:.2f}x** | {e_dec:.1f} (**{e_dec / h_dec:.2f}x**) | {o_pre:.0f} | {h_pre:.0f} | "
                         f"{o_cold:.2f} s / {o_1 * 1e3:.0f} ms | {h_cold:.2f} s / {h_1 * 1e3:.0f} ms "
                         f"| {agree} | {step_bytes / 1e6:.0f} MB / {bound:.0f} tok/s |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        update_section(args.write, "Decode", "decode", intro=DECODE_INTRO, append=text)
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

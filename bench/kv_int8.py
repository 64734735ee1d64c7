"""The int8 KV cache on this machine: logits error and decode speed with float32 / bfloat16 / int8 KV, one run;
and phi-4 14B's cache bytes at 16K in bf16 and int8.

    python bench/kv_int8.py                         # ~87M-parameter phi-4-shaped random model
    python bench/kv_int8.py --write BENCHMARKS.md   # also append the tables to the "Quantized inference" section

One random Phi3ForCausalLM is built in transformers (`bench.random_models`) and converted in memory; our model
computes in float32 and only the KV cache's dtype changes. Accuracy: the serving engine's forward
(`paged_cache.paged_extend` over a page pool of that dtype) on one `--seq-len`-token sequence, prefilled in
`--chunk`-token chunks, then `--decode-steps` tokens one at a time; its logits at each chunk's end and at every
decode step against transformers' float32 logits (max |error|, that over max |logit|, top-1 agreement); greedy
agreement of the engine over `--new-tokens` tokens against the engine with a float32 cache, for `--prompts`
prompts. Speed: decode tokens/s of `ContinuousBatchingEngine(cache_dtype=...)` at batch 1 ((N - 1) / (t_N - t_1)
from t_1 and t_N medians, as in bench/decode.py), alternating with transformers' float32 generate (the peer) in
the same run. Memory: `jax.eval_shape` of the engine's page pool (16-token pages) and of the contiguous cache for
one 16K-token sequence of phi-4 14B: no memory is allocated.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import add_decode_comparison_args, publish, run_heading  # noqa: E402
from bench.decode import bench_pair, hf_runner  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402

CACHE_DTYPES = ("float32", "bfloat16", "int8")
PAGE = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="87m")
    p.add_argument("--seq-len", type=int, default=512, help="prefilled tokens for the logits check (default 512)")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=16)
    add_decode_comparison_args(p)
    return p.parse_args(argv)


def paged_logits(model, seq, n_prefill, chunk, cache_dtype):
    """float32 logits [n, vocab] at each prefill chunk's last token and at each decode step, and their positions."""
    import jax
    import numpy as np

    from phi4_jax.inference.paged_cache import init_pages, paged_extend

    n_pages = -(-len(seq) // PAGE) + 1
    pages = init_pages(model.config, n_pages, PAGE, cache_dtype)
    table = np.arange(1, n_pages + 1, dtype=np.int32)[None] % n_pages
    step = jax.jit(paged_extend, static_argnames="config")
    steps = [(s, chunk) for s in range(0, n_prefill, chunk)] + [(p, 1) for p in range(n_prefill, len(seq))]
    out = []
    for start, size in steps:
        tokens = np.asarray([seq[start:start + size]], np.int32)
        pages, logits = step(model.params, pages, tokens, np.array([start], np.int32), np.array([size], np.int32),
                             table, config=model.config)
        out.append(np.asarray(logits[0]))
    return np.stack(out), [start + size - 1 for start, size in steps]


def engine_runner(engine, prompt):
    from phi4_jax.inference.batching import GenerationRequest

    def run(n):
        got = [e.token_id for e in engine.submit(GenerationRequest(prompt, n))]
        assert len(got) == n
    return run


def cache_bytes_14b():
    """{dtype: (page pool bytes, contiguous cache bytes)} for one 16384-token sequence of phi-4 14B (eval_shape)."""
    import jax

    from phi4_jax.inference.kv_cache import init_cache
    from phi4_jax.inference.paged_cache import init_pages
    from phi4_jax.model.config import get_preset

    config = get_preset("phi4-14b")
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    out = {}
    for dtype in ("bfloat16", "int8"):
        pages = jax.eval_shape(lambda d=dtype: init_pages(config, 16384 // PAGE, PAGE, d))
        cache = jax.eval_shape(lambda d=dtype: init_cache(config, 1, 16384, d))
        out[dtype] = (nbytes(pages), nbytes(cache))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest
    from phi4_jax.model.decoder import model_from_params

    hf, params, config = random_model_pair(args.size)
    model = model_from_params(config, params)
    rng = np.random.default_rng(0)
    seq = rng.integers(3, config.vocab_size, args.seq_len + args.decode_steps).tolist()
    with torch.no_grad():
        ref = hf(torch.as_tensor([seq])).logits.float().numpy()[0]

    context = max(args.prompt_len, 32) + args.new_tokens
    engines = {d: ContinuousBatchingEngine(model, max_batch=1, max_context=context, page_size=PAGE,
                                           prefill_chunk=128, cache_dtype=d).start() for d in CACHE_DTYPES}
    try:
        prompts = rng.integers(3, config.vocab_size, (args.prompts, 32)).tolist()
        greedy = {d: [[e.token_id for e in eng.submit(GenerationRequest(p, args.new_tokens))] for p in prompts]
                  for d, eng in engines.items()}
        accuracy = {}
        for dtype in CACHE_DTYPES:
            got, positions = paged_logits(model, seq, args.seq_len, args.chunk, dtype)
            want = ref[positions]
            err = float(np.abs(got - want).max())
            top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
            agree = float(np.mean([a == b for g, f in zip(greedy[dtype], greedy["float32"]) for a, b in zip(g, f)]))
            accuracy[dtype] = (err, err / float(np.abs(want).max()), top1, agree)
            print(f"{dtype} KV: max |err| {err:.4g}, top-1 {top1:.3f}, greedy agreement {agree:.3f}", flush=True)

        decode_prompt = rng.integers(3, config.vocab_size, (1, args.prompt_len)).tolist()
        runners = {f"{d} KV": engine_runner(eng, decode_prompt[0]) for d, eng in engines.items()}
        runners["transformers fp32"] = hf_runner(hf, decode_prompt, args.hf_threads)
        times = bench_pair(runners, args.new_tokens, args.repeats)
        pool_bytes = {d: sum(x.nbytes for x in jax.tree.leaves(eng.pages)) / eng.pool.num_pages / PAGE
                      for d, eng in engines.items()}
    finally:
        for eng in engines.values():
            eng.shutdown()
    speed = {name: (args.new_tokens - 1) / (tn - t1) for name, (_, t1, tn) in times.items()}
    for name, tps in speed.items():
        print(f"{name}: decode {tps:.1f} tokens/s", flush=True)
    big = cache_bytes_14b()

    n_checked = len(range(0, args.seq_len, args.chunk)) + args.decode_steps
    lines = [
        run_heading(__file__, argv, "int8 KV cache: "),
        "",
        f"Machine: {describe_machine(with_load=True)}; jax {jax.__version__} ({jax.default_backend()}), torch "
        f"{torch.__version__} ({args.hf_threads} thread(s)). Model: random phi-4-shaped Phi3ForCausalLM, "
        f"{config.num_params / 1e6:.0f}M parameters (hidden {config.hidden_size}, {config.num_layers} layers, "
        f"{config.num_kv_heads} kv heads of {config.head_dim}), float32 compute; only the KV cache's dtype "
        f"changes. Logits: the engine's paged forward at {n_checked} positions ({args.seq_len} tokens prefilled in "
        f"chunks of {args.chunk}, then {args.decode_steps} decode steps) against transformers fp32. Greedy: "
        f"{args.prompts} prompts x {args.new_tokens} tokens against the float32-KV engine. Decode: the engine at "
        f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}, alternating "
        "with transformers.",
        "",
        "| KV cache | bytes per token (all layers, k+v) | max abs logit error | / max abs logit | top-1 agreement "
        f"| greedy agreement ({args.new_tokens} tokens) | decode tok/s | vs float32 KV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in CACHE_DTYPES:
        err, rel, top1, agree = accuracy[dtype]
        name = f"{dtype} KV"
        lines.append(f"| {dtype} | {pool_bytes[dtype]:.0f} | {err:.3g} | {rel:.3g} | {top1:.3f} | {agree:.3f} "
                     f"| {speed[name]:.1f} | {speed[name] / speed['float32 KV']:.2f}x |")
    lines.append(f"| transformers fp32 (peer) | | | | | | {speed['transformers fp32']:.1f} "
                 f"| {speed['transformers fp32'] / speed['float32 KV']:.2f}x |")
    (bf_pages, bf_cache), (i8_pages, i8_cache) = big["bfloat16"], big["int8"]
    lines += [
        "",
        "phi-4 14B, one 16384-token sequence (`jax.eval_shape`; 40 layers x 10 kv heads x 128; int8 adds a float32 "
        "scale per token and kv head):",
        "",
        "| KV cache | page pool (16-token pages) | contiguous cache | tokens per GiB |",
        "|---|---:|---:|---:|",
        f"| bfloat16 | {bf_pages / 2**30:.3f} GiB | {bf_cache / 2**30:.3f} GiB | {2**30 * 16384 // bf_cache} |",
        f"| int8 | {i8_pages / 2**30:.3f} GiB | {i8_cache / 2**30:.3f} GiB | {2**30 * 16384 // i8_cache} "
        f"({bf_cache / i8_cache:.2f}x) |",
    ]
    publish(lines, args.write, "Quantized inference", "quant-kv-int8")
    if args.write:
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

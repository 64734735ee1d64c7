"""Prompt log-probs (echo + logprobs, lm-eval's log-likelihood) through the serving engine, and its resident memory.

    python bench/prompt_logprobs.py                        # 87M-shaped random model (vocab 100352), CPU
    python bench/prompt_logprobs.py --write BENCHMARKS.md  # also append the results to the "Prompt log-probs" section

Scoring: --prompts random prompts of --prompt-len tokens (new ones for each run, so no run finds the last one's pages
in the prefix cache), submitted together to one `ContinuousBatchingEngine`
(`GenerationRequest(prompt, 0, prompt_logprobs=5)`: every position's logprob and top-5, computed by the requests'
own prefill chunks) and run to completion; prompt tokens/s over the best of --repeats runs. Beside it, the same
prompts prefilled without scoring (max_new_tokens 1: what the scoring adds to a prefill), and the peer, same run,
same weights: transformers' Phi3ForCausalLM forward over each prompt, then log_softmax, the target tokens' logprobs
and top-5 (batch 1, torch with all cores).

Memory: the process's resident set (VmRSS) after the engine is built with the model still alive (as the engine
before this change held it: its params kept the stacked layer weights beside its per-layer CPU copy) and after the
model is dropped (what `python -m phi4_jax.serve` now does), against the resident set of transformers' model of the
same weights (the peer), each over the process's resident set before it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import publish, run_heading  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402

TOP = 5
INTRO = """`bench/prompt_logprobs.py`: echo + logprobs (lm-eval's log-likelihood requests) scored by the serving
engine's own prefill chunks, against transformers' forward + log_softmax + top-5 over the same prompts (same random
weights, same run), the same prefills without scoring, and the engine's resident memory with and without the model's
stacked layer weights kept alive. Each run appends a table below."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="87m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled_rss() -> int:
    """VmRSS after a garbage collection and glibc's malloc_trim (freed heap memory handed back to the system, so
    that what is freed shows; without it the allocator may keep freed arrays' pages)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def time_engine(engine, requests, repeats: int) -> float:
    """Best wall seconds of running `requests` (a function returning GenerationRequests) to completion."""
    best = float("inf")
    for _ in range(repeats):
        reqs = requests()
        start = time.perf_counter()
        engine.run_to_completion([engine.submit(r) for r in reqs])
        best = min(best, time.perf_counter() - start)
    return best


def time_hf(hf, prompts, repeats: int) -> float:
    import torch

    def score(ids):
        x = torch.tensor([ids])
        logp = torch.log_softmax(hf(x).logits[0, :-1].float(), dim=-1)
        return logp.gather(1, x[0, 1:, None])[:, 0], torch.topk(logp, TOP, dim=-1)

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for ids in prompts:
                score(ids)
            best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest
    from phi4_jax.model.decoder import model_from_params

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    rss0 = settled_rss()
    hf, params, config = random_model_pair(args.size)
    rss_pair = settled_rss()
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    def fresh():   # new prompts for every engine run: a repeat must not find the last one's pages in the prefix cache
        return [rng.integers(3, config.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)]

    prompts = fresh()
    bar = tqdm(total=4, desc="prompt log-probs bench", unit="stage", dynamic_ncols=True)
    hf_s = time_hf(hf, prompts, args.repeats)
    bar.update()
    del hf
    rss_jax = settled_rss()     # our params alone (the pair's transformers half freed)
    hf_rss = rss_pair - rss_jax

    model = model_from_params(config, params)
    del params
    context = args.prompt_len + 16
    engine = ContinuousBatchingEngine(model, max_batch=8, max_context=context, prefill_chunk=128,
                                      kv_cache_bytes=None)
    rss_kept = settled_rss()
    layer_bytes = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(model.params["layers"]))
    del model
    rss_engine = settled_rss()
    engine.warmup()
    bar.update()
    score_s = time_engine(engine, lambda: [GenerationRequest(p, 0, prompt_logprobs=TOP) for p in fresh()],
                          args.repeats)
    bar.update()
    prefill_s = time_engine(engine, lambda: [GenerationRequest(p, 1) for p in fresh()], args.repeats)
    bar.update()
    bar.close()
    tokens = args.prompts * args.prompt_len

    lines = [run_heading(__file__, argv, f"{args.size}, {args.prompts} prompts x {args.prompt_len} tokens: "),
             "", describe_machine(), "",
             "| what | prompt tokens/s | vs transformers |", "|---|---:|---:|",
             f"| transformers forward + log_softmax + top-{TOP}, one prompt at a time | {tokens / hf_s:.0f} | 1.00x |",
             f"| engine, prompt_logprobs={TOP} (echo + logprobs), all submitted at once | {tokens / score_s:.0f} | "
             f"{hf_s / score_s:.2f}x |",
             f"| engine, the same prefills without scoring (max_new_tokens 1) | {tokens / prefill_s:.0f} | "
             f"{hf_s / prefill_s:.2f}x |",
             "",
             "| resident memory (over the process before loading) | bytes |", "|---|---:|",
             f"| transformers Phi3ForCausalLM, same weights (peer; parameters {mib(hf_bytes)}) | {mib(hf_rss)} |",
             f"| engine + model kept alive (the stacked layers, {mib(layer_bytes)}, beside the per-layer copy) | "
             f"{mib(rss_kept - rss0)} |",
             f"| engine alone, model dropped (as `python -m phi4_jax.serve` does now) | {mib(rss_engine - rss0)} |"]
    publish(lines, args.write, "Prompt log-probs", "prompt-logprobs", intro=INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())

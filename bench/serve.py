"""Server throughput on this machine: `phi4_jax.serve` (continuous batching) at 1, 8 and 32 concurrent clients.

    python bench/serve.py                        # tiny random phi-4-shaped model (vocab 4096), CPU
    python bench/serve.py --write BENCHMARKS.md  # also append the results to the "Serving" section

A random Phi3ForCausalLM is built in transformers and converted in memory; the server (`create_app` on uvicorn,
127.0.0.1, a free port, in this process) runs it on the continuous-batching engine. Each client is a thread that
sends streamed /v1/completions requests (token-id prompts of --prompt-len random ids, --new-tokens greedy tokens,
no stop token in the vocabulary, so every answer has exactly that length) one after another; a run at C clients
sends C * --requests-per-client requests. Reported: generated tokens/s (all completion tokens over the run's wall
time) and time to first token (request sent -> first streamed token, median and 90th percentile).

Start-up: the engine's start (every program compiled) in fresh processes, on one compile thread, the default
threads, and a second start with `--compile-cache` (`bench/serve_startup.py`; skip with --no-startup).

Peer, same run, same weights and prompts: transformers' `generate` answering the same requests one at a time
(batch 1, KV cache), i.e. what a server without batching does, with the fastest of --hf-threads torch threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import update_section  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402
from bench.serve_startup import startup_table, startup_times  # noqa: E402

INTRO = """`bench/serve.py`: generated tokens/s and time to first token of the OpenAI-compatible server
(`python -m phi4_jax.serve`'s app and engine, in process on 127.0.0.1) at 1, 8 and 32 concurrent streaming clients,
against transformers' `generate` answering the same requests one at a time (batch 1: a server without batching),
same random model and weights, same machine and run. Each run appends a table below."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8, help="the engine's decode slots (the CLI's default: 8)")
    p.add_argument("--hf-requests", type=int, default=4, help="requests timed for the transformers peer")
    p.add_argument("--hf-threads", default=f"1,{os.cpu_count()}")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    p.add_argument("--no-startup", action="store_true", help="skip the start-up runs (bench/serve_startup.py)")
    args = p.parse_args(argv)
    for name in ("requests_per_client", "prompt_len", "new_tokens", "max_batch", "hf_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def stream_request(http, url, prompt, new_tokens) -> tuple[float, float, int]:
    """(seconds to the first token, total seconds, completion tokens) of one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"]:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


def run_clients(url, prompts, clients: int, per_client: int, new_tokens: int) -> dict:
    import httpx

    results, errors = [], []

    def client(c):
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                try:
                    results.append(stream_request(http, url, prompts[(c * per_client + r) % len(prompts)],
                                                  new_tokens))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]}")
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    assert tokens == len(results) * new_tokens, (tokens, len(results), new_tokens)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall,
            "tokens_per_s": tokens / wall, "ttft_median": statistics.median(ttft),
            "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]}


def hf_sequential(hf, prompts, new_tokens, requests, threads) -> tuple[float, int]:
    """(generated tokens/s answering `requests` prompts one at a time, the torch thread count)."""
    import torch

    best = None
    for n in threads:
        torch.set_num_threads(n)
        with torch.no_grad():
            hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            start = time.perf_counter()
            for i in range(requests):
                ids = torch.tensor([prompts[i % len(prompts)]])
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
                assert out.shape[1] == ids.shape[1] + new_tokens
            rate = requests * new_tokens / (time.perf_counter() - start)
        if best is None or rate > best[0]:
            best = (rate, n)
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.model.decoder import model_from_params
    from phi4_jax.serve.app import create_app, serve_in_thread
    from phi4_jax.tokenizer import Tokenizer

    hf, params, config = random_model_pair(args.size)
    model = model_from_params(config, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, min(config.vocab_size, 100000), args.prompt_len).tolist() for _ in range(64)]
    clients = [int(c) for c in args.clients.split(",")]
    max_context = args.prompt_len + args.new_tokens
    engine = ContinuousBatchingEngine(model, max_batch=args.max_batch, max_context=max_context,
                                      prefill_chunk=128, max_queue=max(clients) * 2)
    start = time.perf_counter()
    engine.start(progress=True)
    warmup_s = time.perf_counter() - start
    rows = []
    with serve_in_thread(create_app(engine, Tokenizer(), "bench")) as url:
        run_clients(url, prompts, 1, 1, args.new_tokens)  # warm-up: first HTTP request, prompt-logprob-free path
        for c in clients:
            row = run_clients(url, prompts, c, args.requests_per_client, args.new_tokens)
            rows.append(row)
            print(f"{c:3d} clients: {row['tokens_per_s']:8.1f} tokens/s, first token median "
                  f"{row['ttft_median'] * 1e3:.0f} ms, p90 {row['ttft_p90'] * 1e3:.0f} ms "
                  f"({row['requests']} requests, {row['wall']:.1f} s)", flush=True)
    engine.shutdown()
    hf_rate, hf_threads = hf_sequential(hf, prompts, args.new_tokens, args.hf_requests,
                                        [int(t) for t in args.hf_threads.split(",")])
    print(f"transformers generate, one request at a time: {hf_rate:.1f} tokens/s ({hf_threads} torch threads)")
    startup = [] if args.no_startup else startup_table(startup_times(args.size, args.max_batch, max_context))
    print("\n".join(startup))

    if args.write:
        hidden, layers, heads, kv, _, vocab = SIZES[args.size]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [f"### {now}, `{command.strip()}`", "",
                 f"Machine: {describe_machine()}; jax {jax.__version__} ({jax.default_backend()}), torch "
                 f"{torch.__version__}. Model: random phi-4-shaped, {config.num_params / 1e6:.1f}M parameters "
                 f"(hidden {hidden}, {layers} layers, {heads}/{kv} heads, vocab {vocab}), float32; prompts "
                 f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, streamed; engine max_batch "
                 f"{args.max_batch}, compile at start {warmup_s:.1f} s. transformers: {args.hf_requests} requests "
                 f"one at a time, {hf_threads} torch threads (fastest of {args.hf_threads}).", "",
                 "| clients | requests | server tokens/s | vs transformers one at a time | first token median | "
                 "first token p90 |", "|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / hf_rate:.2f}x | {r['ttft_median'] * 1e3:.0f} ms | "
                         f"{r['ttft_p90'] * 1e3:.0f} ms |")
        lines.append(f"| transformers, 1 at a time | {args.hf_requests} | {hf_rate:.1f} | 1.00x | | |")
        if startup:
            lines += ["", "Start-up (bench/serve_startup.py, same model and engine, each start a fresh process):", "",
                      *startup]
        update_section(args.write, "Serving", "serve", intro=INTRO, append="\n".join(lines))
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight-only int8 / int4 inference on this machine: accuracy against fp32 and CPU decode speed, one run.

    python bench/quant.py                         # ~87M-parameter phi-4-shaped random model
    python bench/quant.py --write BENCHMARKS.md   # also append the tables to the "Quantized inference" section

One random Phi3ForCausalLM is built in transformers (`bench.random_models`) and converted in memory; the
variants are our model in float32, in bfloat16, and quantized with `quantize_params` (the same code as
`load_model(..., quantize=...)`): int8 per output channel and int4 in groups of `--group-size`, each computing in
float32 (CPU matmuls are float32) and in bfloat16. Accuracy, against transformers' float32 logits on one
`--seq-len`-token input: max |error|, that over max |logit|, and top-1 agreement; and greedy agreement over 64
tokens against our float32 model (whose tokens are transformers'), position by position, for `--prompts` prompts.
Speed: decode tokens/s at batch 1 as in bench/decode.py (t_1 and t_N medians, (N - 1) / (t_N - t_1)), the
variants and transformers' float32 generate alternating in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import add_decode_comparison_args, publish, run_heading  # noqa: E402
from bench.decode import bench_pair, hf_runner, ours_runner  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402

INTRO = """Weight-only quantization (`load_model(..., quantize="int8" | "int4")`, `phi4_jax.quant`). Accuracy and CPU decode
speed: `bench/quant.py` (a random phi-4-shaped model; every variant and transformers in the same run). On random
weights every quantization error is amplified into the near-tied logits (bf16 alone keeps only 26% of 64 greedy
tokens), so these are worst-case accuracy numbers and the int4 rows say little about a trained model; the
correctness of the quantized forward is pinned by tests/test_quant.py (transformers on the dequantized weights, to
1e-4). Memory of phi-4 14B in int4 with a 16K bf16 cache: `bench/inference_memory.py --quantize int4` (XLA:CPU's
plan) and `bench/quant_tpu_memory.py` (the TPU compiler's plan for one 16 GB v5e chip): it fits both. Our int8 /
int4 decode against llama.cpp's on the same Q8_0 / Q4_0 file: `bench/llamacpp_check.py` ("GGUF and llama.cpp").
Not measured here: 14B int8 decode on a GPU."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="87m")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--seq-len", type=int, default=512)
    add_decode_comparison_args(p)
    return p.parse_args(argv)


def variants(params, config, group_size):
    """{name: model}: float32, bfloat16, and int8 / int4 computing in float32 and in bfloat16."""
    import jax
    import jax.numpy as jnp

    from phi4_jax.checkpoint.quantized_load import quantize_params
    from phi4_jax.model.decoder import model_from_params
    from phi4_jax.quant.weights import QuantizeOptions, quantized_model

    models = {"fp32": model_from_params(config, params)}
    bf16 = config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    models["bf16"] = model_from_params(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    for mode, group in (("int8", None), ("int4", group_size)):
        options = QuantizeOptions(mode, group)
        for dtype, cfg in (("float32", config), ("bfloat16", bf16)):
            name = f"{mode}{f'-g{group}' if group else ''} ({'fp32' if dtype == 'float32' else 'bf16'} compute)"
            models[name] = quantized_model(cfg, quantize_params(params, config, options, dtype))
    return models


def param_bytes(model) -> int:
    import jax
    return sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    import phi4_jax

    hf, params, config = random_model_pair(args.size)
    models = variants(params, config, args.group_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (1, args.seq_len))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.float().numpy()
    prompts = rng.integers(3, config.vocab_size, (args.prompts, 32)).tolist()
    greedy = {name: phi4_jax.generate(m, prompts, max_new_tokens=64, stop_tokens=[]) for name, m in models.items()}
    accuracy = []
    for name, model in models.items():
        out = np.asarray(model(ids), np.float32)
        err = float(np.max(np.abs(out - ref)))
        top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        agree = float(np.mean([a == b for g, f in zip(greedy[name], greedy["fp32"]) for a, b in zip(g, f)]))
        accuracy.append((name, param_bytes(model), err, err / float(np.max(np.abs(ref))), top1, agree))
        print(f"{name}: {param_bytes(model) / 1e6:.1f} MB, max |err| {err:.4g} ({accuracy[-1][3]:.3g} of max), "
              f"top-1 {top1:.3f}, greedy agreement {agree:.3f}", flush=True)

    decode_prompt = rng.integers(3, config.vocab_size, (1, args.prompt_len)).tolist()
    runners = {name: ours_runner(m, decode_prompt) for name, m in models.items()}
    runners["transformers fp32"] = hf_runner(hf, decode_prompt, args.hf_threads)
    times = bench_pair(runners, args.new_tokens, args.repeats)
    speed = {name: (args.new_tokens - 1) / (tn - t1) for name, (_, t1, tn) in times.items()}
    for name, tps in speed.items():
        print(f"{name}: decode {tps:.1f} tokens/s", flush=True)

    lines = [
        run_heading(__file__, argv),
        "",
        f"Machine: {describe_machine(with_load=True)}; jax {jax.__version__} ({jax.default_backend()}), torch "
        f"{torch.__version__} ({args.hf_threads} thread(s)). Model: random phi-4-shaped Phi3ForCausalLM, "
        f"{config.num_params / 1e6:.0f}M parameters (hidden {config.hidden_size}, {config.num_layers} layers, "
        f"vocab {config.vocab_size}); int8 embedding rows in both quantized modes. Logits: one {args.seq_len}-token "
        f"input against transformers fp32. Greedy: {args.prompts} prompts x 64 tokens against our fp32 model. "
        f"Decode: batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}.",
        "",
        "| variant | parameter bytes | max abs logit error | / max abs logit | top-1 agreement | greedy agreement "
        "(64 tokens) | decode tok/s | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, nbytes, err, rel, top1, agree in accuracy:
        lines.append(f"| {name} | {nbytes / 1e6:.1f} MB | {err:.3g} | {rel:.3g} | {top1:.3f} | {agree:.3f} "
                     f"| {speed[name]:.1f} | {speed[name] / speed['fp32']:.2f}x |")
    lines.append(f"| transformers fp32 | | | | | | {speed['transformers fp32']:.1f} "
                 f"| {speed['transformers fp32'] / speed['fp32']:.2f}x |")
    publish(lines, args.write, "Quantized inference", "quant", intro=INTRO)
    if args.write:
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp runs what `convert_weights.py --to-gguf` writes: same tokens, same logits, same greedy tokens as ours.

    python bench/llamacpp_check.py                        # f16, q8_0, q4_0
    python bench/llamacpp_check.py --write BENCHMARKS.md  # also append to the "GGUF and llama.cpp" section

Needs `llama-cpp-python` (it builds llama.cpp from source; see README). A random phi-4-shaped Phi3ForCausalLM
with phi-4's real vocabulary (100352 tokens; head_dim 128 and fused qkv / gate_up as in phi-4, grouped-query
attention 2:1 where phi-4 has 4:1)
is saved by transformers and goes through the public CLIs only: HF dir -> ours -> `--to-gguf --type T` -> and
back from that GGUF to ours (so both sides run exactly the weights the file holds). Then, for each type:

- llama.cpp (`llama_cpp.Llama`) tokenizes sample texts with the file's tokenizer: ids must equal tiktoken's;
- greedy decoding of N tokens from a random prompt (token ids, no text) in both: how many leading tokens agree,
  and at the first difference how much ours preferred its token (relative to max |logit|: a near-tie there means
  rounding, not a bug, decided it);
- both sides' logits along llama.cpp's greedy sequence (teacher-forced, so one split does not compound): max
  |difference| / max |logit| and at how many of the N generated positions the top-1 token is the same
  (llama.cpp computes with its own kernels: activations rounded to f16 / 8-bit blocks for the matmuls, so the
  difference is not zero);
- decode tokens/s of both on this machine: llama.cpp's `eval` of one token at a time (at each of
  `--llama-threads`; on a loaded 2-core machine OpenMP's spinning threads can be far slower with 2) and
  `phi4_jax.generate` (float32 dequantized weights, XLA's threads), as in bench/decode.py: (N-1) / (t_N - t_1);
- for q8_0 and q4_0, also phi4_jax with the file's blocks kept quantized (`load_model("model-q8_0.gguf")`: Q8_0 ->
  int8, Q4_0 -> int4, groups of 32, the output layer of a q4_0 file int8; what `--keep-quantized` stores): its
  logits against the float32 model's on the same sequence (the same weights: only rounding differs) and its
  decode tokens/s, against llama.cpp's on the same file in the same run; and, for comparison, our own quantizer on
  the same weights (`load_model(..., quantize="int8")`: per output channel; `"int4"`: groups of 128).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import publish, run_heading  # noqa: E402
from bench.decode import seconds  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402

# name: (hidden, layers, heads, kv_heads, intermediate); vocabulary 100352 always
SIZES = {"55m": (256, 4, 2, 1, 896), "tiny": (64, 1, 4, 2, 96)}
INTRO = """`bench/llamacpp_check.py`: a random phi-4-shaped model with phi-4's 100352-token vocabulary, written by
`convert_weights.py --to-gguf --type T` and run by llama.cpp itself (`llama-cpp-python`, built from source on
this machine) against phi4_jax on the same GGUF (converted back, float32): tokenization of sample texts against
tiktoken, both sides' logits along llama.cpp's greedy continuation of a random prompt, greedy agreement, and
decode tokens/s of both; for q8_0 / q4_0 also phi4_jax with the file's blocks kept as int8 / int4
(`load_model("x.gguf")`). Each run appends a table."""
TEXTS = [
    "Hello World! I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "3 33 333 3333 33333 333333 3333333 3.3 3..3 3...3 1,000,000.25",
    "\n \n\n \t \t\t \t\n  \n   \n    \n     \nend",
    "def f(x):\n    return x ** 2  # squares\n",
    "нещо на Български 我想在apple工作1314151天～ 🚀 😶\u200d🌫️ ✅ 🦙🦙 naïve café",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="55m")
    p.add_argument("--types", default="f16,q8_0,q4_0")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median is reported)")
    p.add_argument("--llama-threads", default=f"1,{os.cpu_count()}",
                   help="llama.cpp thread counts to measure (the fastest is reported, the others listed)")
    p.add_argument("--init-scale", type=float, default=0.1, help="weight init std (larger: more peaked logits)")
    p.add_argument("--workdir", default=None, help="where the checkpoints and GGUF files go (default: a temp dir)")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    return p.parse_args(argv)


def cli(*args):
    from phi4_jax.cli.convert import main
    code = main(["--no-progress", *map(str, args)])
    if code != 0:
        raise SystemExit(f"convert_weights.py {' '.join(map(str, args))} failed")


def make_checkpoint(work: Path, size: str, init_scale: float) -> Path:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    config = Phi3Config(vocab_size=100352, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                        rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
                        bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
                        initializer_range=init_scale, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    model.save_pretrained(work / "hf")
    cli(work / "hf", work / "ours")
    return work / "ours"


def llama_runner(llm, prompt):
    """Greedy decoding in llama.cpp from token ids: returns the new tokens; llm.scores then holds the logits of
    every position evaluated."""
    def run(n):
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) < n:
                llm.eval([out[-1]])
        return out
    return run


def ours_runner(model, prompt):
    import phi4_jax

    def run(n):
        return phi4_jax.generate(model, [prompt], max_new_tokens=n, stop_tokens=[])[0]
    return run


def tokens_per_s(run, n: int, repeats: int) -> float:
    run(1), run(n)  # warm-up (phi4_jax: compiles the prefill and the decode loop)
    t1 = statistics.median(seconds(run, 1) for _ in range(repeats))
    tn = statistics.median(seconds(run, n) for _ in range(repeats))
    return (n - 1) / (tn - t1)


def check_type(work: Path, ours_ckpt: Path, gguf_type: str, args, prompt: list[int]) -> dict:
    import llama_cpp

    from phi4_jax import Tokenizer, load_model

    path = work / f"model-{gguf_type}.gguf"
    cli("--to-gguf", ours_ckpt, path, "--type", gguf_type, "--overwrite")
    cli(path, work / f"back-{gguf_type}", "--overwrite")
    llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_len + args.new_tokens + 8, n_batch=512,
                          n_threads=os.cpu_count(), logits_all=True, verbose=False, seed=0)
    tok = Tokenizer()
    bad = [t for t in TEXTS if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode_ordinary(t)]
    model = load_model(work / f"back-{gguf_type}")
    n, p0 = args.new_tokens, len(prompt) - 1
    theirs = llama_runner(llm, prompt)(n)
    ours = ours_runner(model, prompt)(n)
    # Both sides' logits along llama.cpp's greedy sequence (teacher-forced: no divergence compounds).
    seq = prompt + theirs[:-1]
    theirs_logits = np.asarray(llm.scores[:len(seq)], np.float32)
    ours_logits = np.asarray(model(np.asarray([seq], np.int32)))[0]
    scale = float(np.max(np.abs(ours_logits)))
    err = float(np.max(np.abs(ours_logits - theirs_logits))) / scale
    forced = int(np.sum(np.argmax(ours_logits[p0:], -1) == np.argmax(theirs_logits[p0:], -1)))
    agree = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), n)
    margin = None  # at the first free-running divergence: ours' preference for its token over llama.cpp's
    if agree < n:
        row_logits = ours_logits[p0 + agree]
        margin = float(row_logits[ours[agree]] - row_logits[theirs[agree]]) / scale
    speeds = {}
    for threads in [int(t) for t in args.llama_threads.split(",")]:
        llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)
        speeds[threads] = tokens_per_s(llama_runner(llm, prompt), n, args.repeats)
    ot = tokens_per_s(ours_runner(model, prompt), n, args.repeats)
    kept_err = kept_tps = ours_q_tps = None
    if gguf_type in ("q8_0", "q4_0"):
        from phi4_jax.quant.weights import QuantizedWeight

        kept = load_model(path)  # the file's Q8_0 / Q4_0 blocks as int8 / int4 weights, float32 compute
        if not isinstance(kept.params["layers"]["gate_proj"], QuantizedWeight):
            raise SystemExit(f"{path.name}: load_model did not keep the {gguf_type} blocks quantized")
        kept_logits = np.asarray(kept(np.asarray([seq], np.int32)))[0]
        kept_err = float(np.max(np.abs(kept_logits - ours_logits))) / scale
        kept_tps = tokens_per_s(ours_runner(kept, prompt), n, args.repeats)
        del kept
        mode = "int8" if gguf_type == "q8_0" else "int4"  # our own quantizer on the same weights, for comparison
        requantized = load_model(work / f"back-{gguf_type}", quantize=mode)
        ours_q_tps = tokens_per_s(ours_runner(requantized, prompt), n, args.repeats)
    row = {"type": gguf_type, "mib": path.stat().st_size / 2**20, "tokenize_ok": len(TEXTS) - len(bad),
           "logit_err": err, "forced": forced, "agree": agree, "margin": margin, "llama_tps": speeds,
           "ours_tps": ot, "kept_err": kept_err, "kept_tps": kept_tps, "ours_q_tps": ours_q_tps}
    best = max(speeds, key=speeds.get)
    print(f"{gguf_type}: {row['mib']:.0f} MiB; tokenization {row['tokenize_ok']}/{len(TEXTS)} texts equal tiktoken; "
          f"logits max err {err:.2e} of max |logit|; top-1 equal at {forced}/{n} positions of llama.cpp's greedy "
          f"sequence; free-running greedy agreement {agree}/{n}"
          f"{'' if margin is None else f' (then ours prefers its token by {margin:.1e} of max |logit|)'}; decode "
          f"llama.cpp {speeds[best]:.1f} tok/s ({best} threads), phi4_jax (f32) {ot:.1f} tok/s"
          + ("" if kept_tps is None else f", phi4_jax kept quantized {kept_tps:.1f} tok/s (logits {kept_err:.1e} "
                                         f"from f32), quantize= {ours_q_tps:.1f} tok/s"), flush=True)
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import llama_cpp

    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        ours_ckpt = make_checkpoint(work, args.size, args.init_scale)
        print(f"checkpoint ready ({time.perf_counter() - started:.0f} s)", flush=True)
        prompt = np.random.default_rng(0).integers(0, 100256, args.prompt_len).tolist()
        rows = [check_type(work, ours_ckpt, t, args, prompt) for t in args.types.split(",")]
    hidden, layers, heads, kv, inter = SIZES[args.size]
    lines = [
        run_heading(__file__, argv),
        "",
        f"Machine: {describe_machine(with_load=True)}; llama-cpp-python {llama_cpp.__version__} (CPU build: "
        f"{llama_cpp.llama_print_system_info().decode().strip(' |')}), jax {jax.__version__} (XLA's default threads, float32 on the file's weights). "
        f"Model: random Phi3ForCausalLM, hidden {hidden}, {layers} layers, {heads}/{kv} heads (head_dim "
        f"{hidden // heads}), intermediate {inter}, vocab 100352, init std {args.init_scale}; prompt "
        f"{args.prompt_len} random token ids, {args.new_tokens} greedy tokens, decode median of {args.repeats}.",
        "",
        "| type | file MiB | texts tokenized as tiktoken | logits: max err / max \\|logit\\| "
        "| same top-1 (teacher-forced) | free-running greedy agreement (ours' margin at the split) "
        "| llama.cpp decode tok/s (best threads; others) | phi4_jax decode tok/s (f32) "
        "| phi4_jax decode tok/s, blocks kept (int8 / int4) | kept vs f32 logits "
        "| phi4_jax decode tok/s, load_model(quantize=int8 / int4: ours, per channel / groups of 128) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = args.new_tokens
    for r in rows:
        speeds = r["llama_tps"]
        best = max(speeds, key=speeds.get)
        others = ", ".join(f"{v:.1f} with {t}" for t, v in speeds.items() if t != best) or "-"
        split = "" if r["margin"] is None else f" ({r['margin']:.1e})"
        lines.append(f"| {r['type']} | {r['mib']:.0f} | {r['tokenize_ok']}/{len(TEXTS)} | {r['logit_err']:.2e} "
                     f"| {r['forced']}/{n} | {r['agree']}/{n}{split} | {speeds[best]:.1f} ({best}; {others}) "
                     f"| {r['ours_tps']:.1f} | {_fmt(r['kept_tps'], '.1f')} | {_fmt(r['kept_err'], '.1e')} "
                     f"| {_fmt(r['ours_q_tps'], '.1f')} |")
    publish(lines, args.write, "GGUF and llama.cpp", "gguf-llamacpp", intro=INTRO)
    ok = all(r["tokenize_ok"] == len(TEXTS) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Post-training throughput on CPU: our train step (SFT, LoRA SFT, DPO) against TRL's SFTTrainer / DPOTrainer.

    python bench/posttrain.py                                  # tiny random phi-4-shaped model
    python bench/posttrain.py --size 87m-8k --write BENCHMARKS.md
    python bench/posttrain.py --json OUT                       # numbers as JSON too

Both sides train the same random float32 `Phi3ForCausalLM` (`bench.random_models`, converted in memory) on the
same synthetic token data with AdamW at the same learning rate and batch:
- SFT: `--batch` examples of a prompt and a completion (random lengths, loss on the completion). Ours: first-fit
  packed rows (`phi4_jax.posttrain.data.sft_batches`); TRL: `SFTTrainer` (completion-only loss, each batch padded
  to its longest example, TRL's default collator).
- LoRA SFT: the same with rank-`--lora-rank` adapters (alpha = 2 * rank). Ours on q/k/v/o/gate/up/down; TRL
  through peft on Phi3's fused qkv_proj/o_proj/gate_up_proj/down_proj (peft cannot split the fused weights).
- DPO: `--batch` pairs (prompt + chosen / rejected of random lengths), sigmoid loss, beta 0.1, reference log-probs
  computed before timing on both sides (TRL: `precompute_ref_log_probs=True`). Ours: pairs packed several to a row
  (`pack_dpo_pairs`); TRL: each side padded to the batch's longest.
Throughput counts real (non-padding) tokens the step runs the model on (DPO: chosen + rejected) over the median
wall time of the timed steps (after `--warmup` steps: our jit compile, torch's first allocations). TRL's step time
is taken by a `TrainerCallback` from step begin to step end (its data collation inside).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import publish, run_heading, write_json  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402
from bench.random_models import SIZES, random_model_pair  # noqa: E402

SECTION_KEY = "posttrain-cpu"
SECTION_HEADING = "Post-training throughput on CPU (vs TRL)"
SECTION_INTRO = """`bench/posttrain.py`: training tokens/s (real tokens, padding not counted) of our train step for SFT,
LoRA SFT and DPO against TRL's `SFTTrainer` / `DPOTrainer` (peft for LoRA) on the same random phi-4-shaped
float32 model, data, batch and optimizer, same machine and run. Each run appends a table below."""


def make_data(n: int, seq: int, vocab: int, seed: int = 0):
    """n SFT examples (prompt, completion) and n DPO pairs (prompt, chosen, rejected), random token ids (3..vocab)
    of random lengths that fit `seq` (a DPO side: prompt + completion <= seq // 2, so pairs can pack)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).tolist()   # noqa: E731
    sft = [(ids(int(rng.integers(seq // 8, seq // 4))), ids(int(rng.integers(seq // 8, seq // 2))))
           for _ in range(n)]
    dpo = [(ids(int(rng.integers(seq // 16, seq // 8))), ids(int(rng.integers(seq // 16, seq // 4))),
            ids(int(rng.integers(seq // 16, seq // 4)))) for _ in range(n)]
    return sft, dpo


def _median_after(times, warmup):
    return statistics.median(times[warmup:])


# ----------------------------------------------------------------------------- ours

def ours(kind: str, params, config, sft, dpo, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from phi4_jax.model import sharding
    from phi4_jax.posttrain.data import dpo_batches, sft_batches
    from phi4_jax.posttrain.lora import init_adapters
    from phi4_jax.posttrain.objectives import SFT, dpo_objective
    from phi4_jax.posttrain.reference import compute_reference_logps
    from phi4_jax.train.config import LORA_TARGETS, LoraConfig, OptimizerConfig
    from phi4_jax.train.loop import build_train_step
    from phi4_jax.train.step import create_train_state

    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    opt = OptimizerConfig(lr=args.lr, warmup_steps=0, weight_decay=0.0)
    steps = args.warmup + args.steps
    lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, base_dtype="float32") \
        if kind == "lora-sft" else None
    objective = dpo_objective(0.1, "sigmoid") if kind == "dpo" else SFT
    built = build_train_step(config, mesh, optimizer=opt, total_steps=steps, micro_batches=1, loss_chunk=args.seq,
                             objective=objective, lora=lora)
    if lora is not None:
        adapters = init_adapters(config, lora.rank, LORA_TARGETS, jax.random.key(0))
        state = {"step": jnp.zeros((), jnp.int32), "params": adapters, "opt_state": built.tx.init(adapters),
                 "frozen": jax.tree.map(jnp.array, params)}
    else:
        state = create_train_state(config, built.tx, built.shardings, None, params=jax.tree.map(jnp.array, params))
    if kind == "dpo":
        pairs = {f"{s}_{k}": np.zeros((len(dpo), args.seq), np.int32) for s in ("chosen", "rejected")
                 for k in ("input_ids", "segment_ids", "loss_mask")}
        for i, (prompt, chosen, rejected) in enumerate(dpo):
            for side, completion in (("chosen", chosen), ("rejected", rejected)):
                n = len(prompt) + len(completion)
                pairs[f"{side}_input_ids"][i, :n] = prompt + completion
                pairs[f"{side}_segment_ids"][i, :n] = 1
                pairs[f"{side}_loss_mask"][i, len(prompt):n] = 1
        refs = compute_reference_logps(params, config, pairs, mesh, built.shardings.batch, args.batch, args.seq,
                                       progress=False)
        rows = iter(dpo_batches(pairs, refs, args.rows, seed=0))
    else:
        examples = [{"input_ids": np.asarray(p + c, np.int32),
                     "loss_mask": np.asarray([0] * len(p) + [1] * len(c), np.int32)} for p, c in sft]
        rows = iter(sft_batches(examples, args.seq, args.rows, seed=0))
    times, tokens, losses = [], [], []
    for _ in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(rows).items()}
        t = time.perf_counter()
        state, metrics = built.step_fn(state, batch)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - t)
        tokens.append(float(metrics["batch_tokens"]))
        losses.append(float(metrics["loss"]))
    # rows are packed to `args.rows` per step; each step's unit count (examples' tokens, or pairs) is reported
    return {"seconds": _median_after(times, args.warmup), "compile_s": times[0],
            "tokens_per_step": statistics.mean(tokens[args.warmup:]),
            "tokens_per_s": statistics.mean(tokens[args.warmup:]) / _median_after(times, args.warmup),
            "first_loss": losses[0]}


# ----------------------------------------------------------------------------- TRL

def trl_side(kind: str, hf, sft, dpo, args) -> dict:
    import copy

    import datasets
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    vocab = hf.config.vocab_size
    word = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, pad_token="t0", bos_token="t1", eos_token="t2")
    model = copy.deepcopy(hf).train()
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    common = dict(output_dir=os.path.join(args.tmp, kind), per_device_train_batch_size=args.batch,
                  max_steps=args.warmup + args.steps, learning_rate=args.lr, weight_decay=0.0,
                  lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
                  dataloader_num_workers=0, logging_steps=1, disable_tqdm=True, seed=0)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        text = lambda ids: " ".join(f"t{i}" for i in ids)   # noqa: E731 - one word per token id
        ds = datasets.Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c) + " t2",
                                          "rejected": " " + text(r) + " t2"} for p, c, r in dpo])
        cfg = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                        max_length=args.seq)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
        # real tokens per step: a batch of the pairs' chosen and rejected sequences (prompt + completion + eos
        # each), on average (TRL's sampler shuffles the pairs)
        tokens = [args.batch * statistics.mean(2 * len(p) + len(c) + len(r) + 2 for p, c, r in dpo)] * len(dpo)
    else:
        from trl import SFTConfig, SFTTrainer

        ds = datasets.Dataset.from_list([{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
                                         for p, c in sft])
        cfg = SFTConfig(**common, max_length=args.seq, packing=False, completion_only_loss=True)
        peft_config = None
        if kind == "lora-sft":
            from peft import LoraConfig as PeftLoraConfig

            peft_config = PeftLoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                         target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()],
                             peft_config=peft_config)
        tokens = None
    torch.manual_seed(0)
    out = trainer.train()
    if tokens is None:   # TRL logs the tokens it trained on cumulatively (num_tokens, non-padding)
        cum = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        tokens = [b - a for a, b in zip([0] + cum[:-1], cum)]
    per_step = statistics.mean(tokens[args.warmup:len(times)])
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    del out
    return {"seconds": _median_after(times, args.warmup), "tokens_per_step": per_step,
            "tokens_per_s": per_step / _median_after(times, args.warmup), "first_loss": first}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seq", type=int, default=256, help="our row length and TRL's max_length")
    p.add_argument("--batch", type=int, default=8, help="examples (SFT) or pairs (DPO) per TRL step")
    p.add_argument("--rows", type=int, default=4, help="our packed rows per step (pairs/examples vary)")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--kinds", default="sft,lora-sft,dpo")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--write", metavar="BENCHMARKS.md")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    import jax
    import torch
    import trl

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf, params, config = random_model_pair(args.size)
    n = args.batch * (args.warmup + args.steps)
    sft, dpo = make_data(n, args.seq, hf.config.vocab_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for kind in args.kinds.split(","):
            print(f"{kind}: phi4_jax", flush=True)
            mine = ours(kind, params, config, sft, dpo, args)
            print(f"{kind}: TRL", flush=True)
            theirs = trl_side(kind, hf, sft, dpo, args)
            results[kind] = {"phi4_jax": mine, "trl": theirs}
            print(kind, json.dumps(results[kind]), flush=True)
    lines = [run_heading(__file__, argv), "",
             f"Machine: {describe_machine(with_load=True)}; jax {jax.__version__}, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), trl {trl.__version__}. Model `{args.size}` "
             f"({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M parameters), float32, AdamW lr {args.lr}; "
             f"rows of {args.seq} tokens; TRL {args.batch} examples/pairs a step, ours {args.rows} packed rows a step; "
             f"median of {args.steps} steps after {args.warmup}.", "",
             "| workload | phi4_jax tok/s | TRL tok/s | ratio | phi4_jax s/step (tokens) | TRL s/step (tokens) "
             "| phi4_jax first step (compile) |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        m, t = r["phi4_jax"], r["trl"]
        lines.append(f"| {kind} | {m['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                     f"{m['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                     f"{m['seconds']:.2f} ({m['tokens_per_step']:,.0f}) | "
                     f"{t['seconds']:.2f} ({t['tokens_per_step']:,.0f}) | {m['compile_s']:.1f} s |")
    publish(lines, args.write, SECTION_HEADING, SECTION_KEY, intro=SECTION_INTRO)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

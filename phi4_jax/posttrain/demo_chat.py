"""The CPU demo's chat data: Q/A conversations and preference pairs built from `phi4_jax.data.demo`'s facts.

Three kinds of question, worded with the pretraining demo's own tokens (so `demo_compact` encodes them without
unknown tokens): sums ("Question: What is 3 plus 4?" -> "3 plus 4 is 7."), capitals and counting. Sums with
``(a + 2 b) % 5 == 0`` and counts from a multiple of 7 are held out of the training data; `evaluate` asks them.
DPO pairs prefer the right answer to one that is off by one (or names another capital).

    python -m phi4_jax.posttrain.demo_chat write --out examples/chat_demo      # sft.jsonl, dpo.jsonl
    python -m phi4_jax.posttrain.demo_chat eval --config configs/demo-sft.toml --checkpoint WORKDIR
"""

from __future__ import annotations

import json
import os

import numpy as np

from phi4_jax.data.demo import CAPITALS
from phi4_jax.posttrain.sft import turn_tokens
from phi4_jax.special_tokens import IM_END_ID


def _held_out_sum(a: int, b: int) -> bool:
    return (a + 2 * b) % 5 == 0


def _held_out_count(start: int) -> bool:
    return start % 7 == 0


def question(rng: np.random.Generator, held_out: bool = False) -> tuple[str, str, str]:
    """(user text, right answer, a wrong answer) of one random question, from the training or held-out split."""
    kinds = ("sum", "count") if held_out else ("sum", "capital", "count")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "capital":
        i = int(rng.integers(len(CAPITALS)))
        country, capital = CAPITALS[i]
        wrong = CAPITALS[(i + 1 + int(rng.integers(len(CAPITALS) - 1))) % len(CAPITALS)][1]
        return (f"Question: What is the capital of {country}?", f"The capital of {country} is {capital}.",
                f"The capital of {country} is {wrong}.")
    while True:
        if kind == "sum":
            a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
            if _held_out_sum(a, b) == held_out:
                off = a + b + (1 if rng.random() < 0.5 or a + b == 0 else -1)
                return (f"Question: What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {off}.")
        else:
            start = int(rng.integers(0, 60))
            if _held_out_count(start) == held_out:
                right = ", ".join(str(start + i) for i in range(5)) + "."
                wrong = ", ".join(str(start + i) for i in (0, 1, 2, 4, 5)) + "."
                return f"Count from {start}:", right, wrong


def write_demo_data(out_dir: str, *, n_sft: int = 1500, n_dpo: int = 600, seed: int = 0) -> tuple[str, str]:
    """Writes OUT_DIR/sft.jsonl ({"messages"}) and OUT_DIR/dpo.jsonl ({"prompt", "chosen", "rejected"})."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    sft_path, dpo_path = os.path.join(out_dir, "sft.jsonl"), os.path.join(out_dir, "dpo.jsonl")
    with open(sft_path, "w") as f:
        for _ in range(n_sft):
            q, a, _ = question(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    with open(dpo_path, "w") as f:
        for _ in range(n_dpo):
            q, a, wrong = question(rng)
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": wrong}) + "\n")
    return sft_path, dpo_path


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """A user turn and an opened assistant turn, in the data tokenizer's ids."""
    phi4 = tokenizer.tokenizer
    user = turn_tokens(phi4, {"role": "user", "content": user_text})
    header = turn_tokens(phi4, {"role": "assistant", "content": ""})[0]
    return tokenizer.from_phi4_ids(user[0] + user[1] + header).tolist()


def evaluate(model, tokenizer, *, n: int = 60, seed: int = 1234, max_new_tokens: int = 24) -> dict:
    """Greedy answers to `n` held-out questions: {"accuracy": exact answers then <|im_end|>, "closed": fraction
    of answers ending with <|im_end|>, "examples": a few (question, answer) pairs}."""
    from phi4_jax.inference.engine import generate

    rng = np.random.default_rng(seed)
    qs = [question(rng, held_out=True) for _ in range(n)]
    im_end = int(tokenizer.from_phi4_ids([IM_END_ID])[0])
    outs = generate(model, [chat_prompt_ids(tokenizer, q) for q, _, _ in qs], max_new_tokens=max_new_tokens,
                    stop_tokens=[im_end])
    closed = [bool(o) and o[-1] == im_end for o in outs]
    texts = [tokenizer.decode(o[:-1] if c else o) for o, c in zip(outs, closed)]
    right = [c and t.strip() == a for c, t, (_, a, _) in zip(closed, texts, qs)]
    return {"accuracy": float(np.mean(right)), "closed": float(np.mean(closed)),
            "examples": [(q, t + ("<|im_end|>" if c else "")) for (q, _, _), t, c in list(zip(qs, texts, closed))[:4]]}


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m phi4_jax.posttrain.demo_chat", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the demo's sft.jsonl and dpo.jsonl")
    w.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="answer held-out questions with a demo checkpoint")
    e.add_argument("--config", required=True, help="the run's config (model and tokenizer)")
    e.add_argument("--checkpoint", required=True, help="a train.py workdir or a converted checkpoint")
    e.add_argument("-n", type=int, default=60)
    args = p.parse_args(argv)
    if args.command == "write":
        for path in write_demo_data(args.out):
            print(path)
        return 0
    import jax

    from phi4_jax.data.tokenizing import make_tokenizer
    from phi4_jax.model.decoder import logical_axes_tree, model_from_params
    from phi4_jax.train.checkpoints import TrainCheckpointError, init_params_from
    from phi4_jax.train.config import TrainConfigError, load_train_config

    try:
        cfg = load_train_config(args.config)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, logical_axes_tree(cfg.model), is_leaf=lambda x: isinstance(x, tuple))
        params = init_params_from(args.checkpoint, cfg.model, shardings)
    except (TrainConfigError, TrainCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = evaluate(model_from_params(cfg.model, params), make_tokenizer(cfg.data), n=args.n)
    print(f"held-out questions: {args.n} | exact answer + <|im_end|>: {result['accuracy']:.1%} | "
          f"closed with <|im_end|>: {result['closed']:.1%}")
    for q, a in result["examples"]:
        print(f"  {q!r} -> {a!r}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""`python -m phi4_jax.pts`: Pivotal Token Search, from problems to DPO pairs.

    python -m phi4_jax.pts --checkpoint DIR --problems FILE.jsonl --out PAIRS.jsonl [--oracle exact|numeric|python|
        module:function] [--rollouts 8] [--band 0.2 0.8] [--threshold 0.2] [--max-new-tokens 256]
        [--temperature 1.0] [--seed 0] [--cache DIR] [--max-alternatives 4] [--solutions 1] [--top-alternatives 0]
        [--min-margin THRESHOLD]

DIR is a converted checkpoint (chat problems: {"messages": [...]}) or a `python train.py` workdir (text problems:
{"prompt": "..."}); each problem has an "answer" and a "checker" (see `phi4_jax.posttrain.oracles`). Pairs are
appended to PAIRS.jsonl as {"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "problem",
"position", "p_before", "p_chosen", "p_rejected", ...}: the DPO trainer's input (ids are phi-4 token ids; the demo's
compact vocabulary is mapped back id by id). --solutions N bisects N distinct sampled solutions per problem;
--top-alternatives N tries the model's N most probable next tokens at a pivot where no rollout offered a qualifying
alternative ("alternative_from": "distribution" in the pair). Estimates are cached in --cache
(default PAIRS.jsonl.cache/); rerunning the same command resumes and writes no pair twice.

Exit status: 0 done; 2 bad input (unknown oracle, no usable problems, unloadable checkpoint, a broken user oracle).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phi4_jax.pts", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint or train.py workdir")
    p.add_argument("--problems", required=True, help="JSONL of problems")
    p.add_argument("--out", required=True, help="JSONL of DPO pairs (appended; a rerun resumes)")
    p.add_argument("--oracle", default=None,
                   help="exact, numeric, python or module:function for every problem (default: each checker.type)")
    p.add_argument("--rollouts", type=int, default=8, help="K rollouts per estimate (default 8)")
    p.add_argument("--band", type=float, nargs=2, default=(0.2, 0.8), metavar=("LOW", "HIGH"),
                   help="keep problems whose success probability lies in [LOW, HIGH] (default 0.2 0.8)")
    p.add_argument("--threshold", type=float, default=0.2, help="pivotal when a token moves p by this (default 0.2)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="estimate cache directory (default OUT.cache)")
    p.add_argument("--max-alternatives", type=int, default=4,
                   help="alternative tokens from the rollouts tried per pivot (default 4)")
    p.add_argument("--solutions", type=int, default=1, help="distinct sampled solutions bisected per problem (default 1)")
    p.add_argument("--min-margin", type=float, default=None,
                   help="keep a pair only when p_chosen - p_rejected >= this (default: the threshold)")
    p.add_argument("--top-alternatives", type=int, default=0,
                   help="then the model's N most probable next tokens, where the rollouts offered none (default 0)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from phi4_jax.posttrain import pts
    from phi4_jax.posttrain.oracles import OracleError, make_judge
    from phi4_jax.posttrain.policy import PolicyError, load_policy

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        settings = pts.PTSSettings(rollouts=args.rollouts, band=tuple(args.band), threshold=args.threshold,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                   max_alternatives=args.max_alternatives, solutions=args.solutions,
                                   top_alternatives=args.top_alternatives, min_margin=args.min_margin)
        oracle = make_judge(args.oracle)
        problems, skipped = pts.read_problems(args.problems, args.oracle)
    except (pts.PTSError, OracleError) as e:
        return fail(str(e))
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    try:
        policy = load_policy(args.checkpoint, args.dtype)
    except PolicyError as e:
        return fail(str(e))
    stops = set(policy.stop_tokens)

    def judge(ids: list[int], problem: dict) -> bool:
        return oracle(policy.decode([t for t in ids if t not in stops]), problem)

    sampler = pts.ModelSampler(policy.model, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               stop_tokens=policy.stop_tokens, identity=policy.name)
    cache = pts.EstimateCache(args.cache or args.out + ".cache")
    top_tokens = pts.ModelTopTokens(policy.model, policy.token_limit) if args.top_alternatives else None
    search = pts.PivotalTokenSearch(sampler, judge, settings, cache, top_tokens)
    log = (lambda line: None) if not args.no_progress else print
    try:
        summary = pts.run_pts(problems, search, lambda p: pts.prompt_ids(p, policy.encode_text, policy.encode_chat),
                              policy.decode, args.out, progress=not args.no_progress, log=log,
                              output_ids=policy.to_phi4_ids)
    except (pts.PTSError, OracleError) as e:
        return fail(str(e))
    finally:
        cache.close()
    print(f"problems {summary.problems} (skipped {len(skipped)}), in band {summary.in_band}, pivotal tokens "
          f"{summary.pivots}, pairs written {summary.pairs_written} (already there {summary.pairs_already_there}, "
          f"alternative from the model's distribution {summary.pairs_from_distribution}, no alternative "
          f"{summary.no_alternative}, holding an id outside the tokenizer {summary.pairs_unmapped}), rollouts "
          f"{summary.rollouts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

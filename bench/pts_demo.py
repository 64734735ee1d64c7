"""Pivotal Token Search end to end on CPU: the `python train.py` demo model and built-in arithmetic problems.

    python bench/pts_demo.py                          # trains the demo into runs/demo first if it is not there
    python bench/pts_demo.py --write BENCHMARKS.md    # also record the run in the "Pivotal Token Search" section

Steps: (1) the demo model (`python train.py --workdir runs/demo`, unless that workdir has a checkpoint);
(2) built-in arithmetic problems ("Question: What is a plus b? Answer:", numeric checker on the first number after
"is"), split into a PTS set and held-out problems with other (a, b); (3) the held-out success rate, `--samples`
samples per problem at the PTS temperature; (4) `python -m phi4_jax.pts` on the PTS set (a subprocess: the real CLI;
`--solutions` sampled solutions per problem, `--top-alternatives` tokens from the model's own next-token distribution
where the rollouts offered no alternative), pairs counted and a few shown; (5) DPO on the pairs from the demo model
(`python train.py --config configs/demo-dpo.toml` with `train.init_from` the demo, `data.dpo_files` the pairs,
`--dpo-epochs` passes over them), once per `--dpo` setting (learning rate, beta, RPO's rpo_alpha); (6) the held-out
success rate of each DPO model, with the same problems, samples and seeds as (3), and its change with a paired
standard error (per-problem differences: the same problems and seeds before and after).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.decode import update_section  # noqa: E402
from bench.machine_info import describe_machine  # noqa: E402

DPO_KEYS = {"lr": "optimizer.lr", "beta": "dpo.beta", "rpo_alpha": "dpo.rpo_alpha"}


def dpo_setting(text: str) -> dict:
    """"lr=5e-5,beta=0.1,rpo_alpha=1" -> {"lr": 5e-5, "beta": 0.1, "rpo_alpha": 1.0} (lr required)."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in DPO_KEYS:
            raise argparse.ArgumentTypeError(f"--dpo {text!r}: unknown key {key!r}; known: {', '.join(DPO_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--dpo {text!r}: {key} must be a number, got {value!r}") from None
    if "lr" not in out:
        raise argparse.ArgumentTypeError(f"--dpo {text!r}: needs lr=")
    return {"beta": 0.1, "rpo_alpha": 0.0, **out}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-workdir", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "pts_demo"))
    p.add_argument("--problems", type=int, default=70, help="problems searched by PTS")
    p.add_argument("--held-out", type=int, default=30, help="held-out problems for the success rate")
    p.add_argument("--samples", type=int, default=32, help="samples per held-out problem")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--solutions", type=int, default=4, help="sampled solutions bisected per PTS problem")
    p.add_argument("--top-alternatives", type=int, default=4,
                   help="tokens from the model's next-token distribution tried where the rollouts offered none")
    p.add_argument("--min-margin", type=float, default=0.6, help="PTS keeps pairs with p_chosen - p_rejected >= this")
    p.add_argument("--temperature", type=float, default=1.4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dpo-epochs", type=float, default=4.0, help="passes over the pairs per DPO run")
    p.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO step")
    p.add_argument("--dpo", type=dpo_setting, nargs="+", metavar="lr=X[,beta=B][,rpo_alpha=A]",
                   default=[dpo_setting(x) for x in ("lr=5e-5", "lr=5e-5,rpo_alpha=1", "lr=1e-4,rpo_alpha=1",
                                                     "lr=1e-4,beta=0.05,rpo_alpha=1")],
                   help="one DPO run (and held-out measurement) per setting")
    p.add_argument("--write", default=None, metavar="BENCHMARKS.md")
    return p.parse_args(argv)


def split_problems(n_pts: int, n_held: int):
    """PTS problems and held-out problems with different (a, b)."""
    from phi4_jax.posttrain.problems import arithmetic_problems

    pool = arithmetic_problems(400, seed=7)
    seen, pts_set, held = set(), [], []
    for problem in pool:
        key = problem["prompt"]
        if key in seen:
            continue
        seen.add(key)
        if len(pts_set) < n_pts:
            pts_set.append(problem)
        elif len(held) < n_held:
            held.append(problem)
    return pts_set, held


def successes(policy, problems, *, samples, temperature, max_new_tokens, seed=12345) -> list[int]:
    """Solved samples per problem (problem i's samples drawn with seeds seed + 1000 i + j)."""
    from phi4_jax.posttrain.oracles import make_judge
    from phi4_jax.posttrain.pts import ModelSampler

    judge = make_judge()
    sampler = ModelSampler(policy.model, temperature=temperature, max_new_tokens=max_new_tokens,
                           stop_tokens=policy.stop_tokens)
    stops = set(policy.stop_tokens)
    wins = []
    for i, problem in enumerate(problems):
        outs = sampler.rollouts(policy.encode_text(problem["prompt"]), samples, seed + 1000 * i)
        wins.append(sum(judge(policy.decode([t for t in out if t not in stops]), problem) for out in outs))
    return wins


def rate_and_error(wins: list[int], samples: int) -> tuple[float, float]:
    """(success rate, its binomial standard error sqrt(p (1 - p) / n))."""
    n = samples * len(wins)
    p = sum(wins) / n
    return p, math.sqrt(p * (1 - p) / n)


def paired_change(before: list[int], after: list[int], samples: int) -> tuple[float, float]:
    """(mean change of the per-problem success rate, its standard error over problems)."""
    d = [(a - b) / samples for a, b in zip(after, before)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if not os.path.isdir(os.path.join(args.demo_workdir, "checkpoints")):
        print(f"training the demo model into {args.demo_workdir}", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", args.demo_workdir], check=True)
    from phi4_jax.posttrain.policy import load_policy

    policy = load_policy(args.demo_workdir)
    pts_set, held = split_problems(args.problems, args.held_out)
    problems_path = os.path.join(args.workdir, "problems.jsonl")
    with open(problems_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pts_set)
    measure = dict(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    start = time.perf_counter()
    base = successes(policy, held, **measure)
    before, before_se = rate_and_error(base, args.samples)
    print(f"held-out success rate (base): {before:.3f} ± {before_se:.3f} ({len(held)} problems x {args.samples} "
          f"samples, T={args.temperature}; {time.perf_counter() - start:.0f} s)", flush=True)

    pairs_path = os.path.join(args.workdir, "pairs.jsonl")
    cache, dpo_dir = os.path.join(args.workdir, "cache"), os.path.join(args.workdir, "dpo")
    for stale in glob.glob(pairs_path) + glob.glob(pairs_path + ".ref_logps-*"):   # a fresh run (the CLIs resume)
        os.remove(stale)
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "phi4_jax.pts", "--checkpoint", args.demo_workdir, "--problems", problems_path,
               "--out", pairs_path, "--rollouts", str(args.rollouts), "--temperature", str(args.temperature),
               "--max-new-tokens", str(args.max_new_tokens), "--cache", cache, "--solutions", str(args.solutions),
               "--top-alternatives", str(args.top_alternatives), "--min-margin", str(args.min_margin), "--no-progress"]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    pts_seconds = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    summary_line = run.stdout.strip().splitlines()[-1]
    print(summary_line, flush=True)
    pairs = [json.loads(line) for line in open(pairs_path)]
    estimates = sum(1 for _ in open(os.path.join(cache, "estimates.jsonl")))
    rollouts = estimates * args.rollouts
    shown = [p for p in pairs if p["alternative_from"] == "rollouts"][:2] + \
        [p for p in pairs if p["alternative_from"] == "distribution"][:2]
    examples = [f"`{p['prompt'][-28:]!r}` + chosen `{p['chosen']!r}` (p={p['p_chosen']:.2f}) / rejected "
                f"`{p['rejected']!r}` (p={p['p_rejected']:.2f}), alternative from the {p['alternative_from']}"
                for p in shown]
    print("\n".join(examples))

    steps = max(1, math.ceil(args.dpo_epochs * len(pairs) / args.dpo_batch))
    dpo_rows = []
    for setting in args.dpo:   # each setting: DPO from the demo model, then the same held-out measurement
        name = "-".join(f"{k}{v:g}" for k, v in setting.items())
        workdir = f"{dpo_dir}-{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        dpo_command = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
                       os.path.join(ROOT, "configs", "demo-dpo.toml"), "--workdir", workdir, "--no-progress",
                       "--set", f"train.init_from={os.path.abspath(args.demo_workdir)}",
                       "--set", f"data.dpo_files={os.path.abspath(pairs_path)}", "--set", f"train.steps={steps}",
                       "--set", f"train.global_batch={args.dpo_batch}", "--set", f"checkpoint.save_every={steps}",
                       *[x for k, v in setting.items() for x in ("--set", f"{DPO_KEYS[k]}={v!r}")]]
        start = time.perf_counter()
        run = subprocess.run(dpo_command, cwd=ROOT, capture_output=True, text=True)
        dpo_seconds = time.perf_counter() - start
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
        wins = successes(load_policy(workdir), held, **measure)
        after, after_se = rate_and_error(wins, args.samples)
        change, change_se = paired_change(base, wins, args.samples)
        dpo_rows.append((setting, dpo_seconds, last, after, after_se, change, change_se))
        print(f"DPO {name}: {steps} steps in {dpo_seconds:.0f} s, last loss {last['loss']:.3f}, reward accuracy "
              f"{last['rewards/accuracies']:.2f}; held-out success rate {before:.3f} -> {after:.3f} ± {after_se:.3f} "
              f"(change {change:+.3f} ± {change_se:.3f})", flush=True)

    if args.write:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python bench/pts_demo.py " + " ".join(a for a in (argv or sys.argv[1:]))
        body = "\n".join([
            "`bench/pts_demo.py`: PTS end to end on CPU (see its docstring).",
            "",
            f"Run {date}, `{cmd.strip()}`, on {describe_machine()}.",
            "",
            f"- Model: the `python train.py` demo (0.85M parameters), sampled at T={args.temperature}, "
            f"at most {args.max_new_tokens} new tokens.",
            f"- Held-out success rate before DPO: **{before:.3f}** ± {before_se:.3f} (binomial standard error; "
            f"{len(held)} problems x {args.samples} samples).",
            f"- PTS on {len(pts_set)} problems, K={args.rollouts}, band 0.2-0.8, threshold 0.2, {args.solutions} "
            f"sampled solutions per problem, up to {args.top_alternatives} alternatives from the model's next-token "
            f"distribution where the rollouts offered none, pairs at least {args.min_margin:g} apart in p: "
            f"{summary_line}; {pts_seconds:.0f} s wall including "
            f"start-up and compiles ({rollouts / pts_seconds:.1f} rollouts/s).",
            f"- {estimates} p estimates ({rollouts} rollouts) in all: the band checks, the bisections and the "
            "alternatives' estimates.",
            "- Example pairs:",
            *[f"  - {e}" for e in examples],
            f"- DPO on the {len(pairs)} pairs from the demo model (`configs/demo-dpo.toml`, sigmoid loss, "
            f"{steps} steps of {args.dpo_batch} pairs = {args.dpo_epochs:g} epochs), one run per setting, then the "
            "held-out success rate with the same problems, samples and seeds as before; the change is the mean "
            "per-problem change with its standard error over the problems:",
            "",
            "| DPO lr | beta | rpo_alpha | seconds | last loss | reward accuracy | held-out before | after | change |",
            "|---|---|---|---|---|---|---|---|---|",
            *[f"| {st['lr']:g} | {st['beta']:g} | {st['rpo_alpha']:g} | {sec:.0f} | {last['loss']:.3f} | "
              f"{last['rewards/accuracies']:.2f} | {before:.3f} | **{after:.3f}** ± {ase:.3f} | {ch:+.3f} ± {chse:.3f} |"
              for st, sec, last, after, ase, ch, chse in dpo_rows],
        ])
        update_section(args.write, "Pivotal Token Search", "pts-demo", replace=body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pivotal Token Search end to end on CPU: the `python train.py` demo model and built-in arithmetic problems.

    python bench/pts_demo.py                          # trains the demo into runs/demo first if it is not there
    python bench/pts_demo.py --write BENCHMARKS.md    # also record the run in the "Pivotal Token Search" section

Steps: (1) the demo model (`python train.py --workdir runs/demo`, unless that workdir has a checkpoint);
(2) built-in arithmetic problems ("Question: What is a plus b? Answer:", numeric checker on the first number after
"is"), split into a PTS set and held-out problems with other (a, b); (3) the held-out success rate, K samples per
problem at the PTS temperature; (4) `python -m phi4_jax.pts` on the PTS set (a subprocess: the real CLI), pairs
counted and a few shown; (5) DPO on the pairs from the demo model (`python train.py --config configs/demo-dpo.toml`
with `train.init_from` the demo, `data.dpo_files` the pairs), once per `--dpo-lr`; (6) the held-out success rate of
each DPO model, with the same problems, samples and seeds as (3).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-workdir", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "pts_demo"))
    p.add_argument("--problems", type=int, default=70, help="problems searched by PTS")
    p.add_argument("--held-out", type=int, default=30, help="held-out problems for the success rate")
    p.add_argument("--samples", type=int, default=16, help="samples per held-out problem")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dpo-steps", type=int, default=30)
    p.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO step")
    p.add_argument("--dpo-lr", type=float, nargs="+", default=[3e-5, 5e-5, 1.5e-4],
                   help="one DPO run (and held-out measurement) per learning rate")
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


def success_rate(policy, problems, *, samples, temperature, max_new_tokens, seed=12345) -> float:
    from phi4_jax.posttrain.oracles import make_judge
    from phi4_jax.posttrain.pts import ModelSampler

    judge = make_judge()
    sampler = ModelSampler(policy.model, temperature=temperature, max_new_tokens=max_new_tokens,
                           stop_tokens=policy.stop_tokens)
    stops = set(policy.stop_tokens)
    wins = 0
    for i, problem in enumerate(problems):
        for out in sampler.rollouts(policy.encode_text(problem["prompt"]), samples, seed + 1000 * i):
            wins += judge(policy.decode([t for t in out if t not in stops]), problem)
    return wins / (samples * len(problems))


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

    start = time.perf_counter()
    before = success_rate(policy, held, samples=args.samples, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens)
    rate_seconds = time.perf_counter() - start
    print(f"held-out success rate (base): {before:.3f} ({len(held)} problems x {args.samples} samples, "
          f"T={args.temperature}; {rate_seconds:.0f} s)", flush=True)

    pairs_path = os.path.join(args.workdir, "pairs.jsonl")
    cache, dpo_dir = os.path.join(args.workdir, "cache"), os.path.join(args.workdir, "dpo")
    for stale in [pairs_path] + glob.glob(pairs_path + ".ref_logps-*"):   # a fresh run (the CLIs would resume)
        os.remove(stale)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(dpo_dir, ignore_errors=True)
    command = [sys.executable, "-m", "phi4_jax.pts", "--checkpoint", args.demo_workdir, "--problems", problems_path,
               "--out", pairs_path, "--rollouts", str(args.rollouts), "--temperature", str(args.temperature),
               "--max-new-tokens", str(args.max_new_tokens), "--cache", cache]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    pts_seconds = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    summary_line = run.stdout.strip().splitlines()[-1]
    print(summary_line)
    pairs = [json.loads(line) for line in open(pairs_path)]
    estimates = sum(1 for _ in open(os.path.join(cache, "estimates.jsonl")))
    rollouts = estimates * args.rollouts
    examples = [f"`{p['prompt'][-28:]!r}` + chosen `{p['chosen']!r}` (p={p['p_chosen']:.2f}) / rejected "
                f"`{p['rejected']!r}` (p={p['p_rejected']:.2f})" for p in pairs[:4]]
    print("\n".join(examples))

    dpo_rows = []
    for lr in args.dpo_lr:   # each learning rate: DPO from the demo model, then the same held-out measurement
        workdir = f"{dpo_dir}-lr{lr:g}"
        shutil.rmtree(workdir, ignore_errors=True)
        dpo_command = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
                       os.path.join(ROOT, "configs", "demo-dpo.toml"), "--workdir", workdir, "--no-progress",
                       "--set", f"train.init_from={os.path.abspath(args.demo_workdir)}",
                       "--set", f"data.dpo_files={os.path.abspath(pairs_path)}", "--set", f"train.steps={args.dpo_steps}",
                       "--set", f"train.global_batch={args.dpo_batch}", "--set", f"optimizer.lr={lr}"]
        start = time.perf_counter()
        run = subprocess.run(dpo_command, cwd=ROOT, capture_output=True, text=True)
        dpo_seconds = time.perf_counter() - start
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
        after = success_rate(load_policy(workdir), held, samples=args.samples, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens)
        dpo_rows.append((lr, dpo_seconds, last, after))
        print(f"DPO lr {lr:g}: {args.dpo_steps} steps in {dpo_seconds:.0f} s, last loss {last['loss']:.3f}, reward "
              f"accuracy {last['rewards/accuracies']:.2f}; held-out success rate {before:.3f} -> {after:.3f}",
              flush=True)

    if args.write:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python bench/pts_demo.py " + " ".join(a for a in (argv or sys.argv[1:]))
        body = "\n".join([
            f"Run {date}, `{cmd.strip()}`, on {describe_machine()}.",
            "",
            f"- Model: the `python train.py` demo (0.85M parameters), sampled at T={args.temperature}, "
            f"at most {args.max_new_tokens} new tokens.",
            f"- Held-out success rate before DPO: **{before:.3f}** ({len(held)} problems x {args.samples} samples).",
            f"- PTS on {len(pts_set)} problems, K={args.rollouts}, band 0.2-0.8, threshold 0.2: {summary_line}; "
            f"{pts_seconds:.0f} s wall including start-up and compiles ({rollouts / pts_seconds:.1f} rollouts/s).",
            f"- {estimates} p estimates ({rollouts} rollouts) in all: the band checks, the bisections and the "
            "alternatives' estimates.",
            "- Example pairs:",
            *[f"  - {e}" for e in examples],
            f"- DPO on the pairs from the demo model (`configs/demo-dpo.toml`, sigmoid loss, beta 0.1, "
            f"{args.dpo_steps} steps of {args.dpo_batch} pairs), one run per learning rate, then the held-out success "
            "rate with the same problems, samples and seeds as before:",
            "",
            "| DPO lr | seconds | last loss | reward accuracy | held-out success before | after |",
            "|---|---|---|---|---|---|",
            *[f"| {lr:g} | {sec:.0f} | {last['loss']:.3f} | {last['rewards/accuracies']:.2f} | {before:.3f} | "
              f"**{after:.3f}** |" for lr, sec, last, after in dpo_rows],
        ])
        update_section(args.write, "Pivotal Token Search", "pts-demo",
                       intro="`bench/pts_demo.py`: PTS end to end on CPU (see its docstring).", append=body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pivotal Token Search end to end on CPU: a demo model with a planted pivotal habit, built-in arithmetic problems,
PTS, then DPO on its pairs, and the held-out success rate before and after.

    python bench/pts_demo.py                          # trains what is missing (runs/demo, runs/demo-pts) first
    python bench/pts_demo.py --write BENCHMARKS.md    # also record the run in the "Pivotal Token Search" section

Steps: (1) the demo model (`python train.py --workdir runs/demo`, unless that workdir has a checkpoint);
(2) the planted model: a short continued pretraining of it on the demo mixture whose sums are guessed half of the
time ("Answer: no time to add, it is 12."; `configs/demo-pts.toml`, generator `arithmetic_guessing`), so every
problem shares one pivotal choice right after "Answer:" (skipped when `--planted-workdir` has a checkpoint);
(3) built-in arithmetic problems ("Question: What is a plus b? Answer:", numeric checker on the first number after
"is"), split into a PTS set and held-out problems with other (a, b); (4) the held-out success rate, `--samples`
samples per problem, and how many of them start with the habit's first token; (5) `python -m phi4_jax.pts` on the
PTS set (a subprocess: the real CLI), pairs counted, the ones against the habit's first token counted, a few shown;
(6) DPO on the pairs from the planted model (`python train.py --config configs/demo-dpo.toml` with
`train.init_from` the planted model, `data.dpo_files` the pairs, `--dpo-epochs` passes over them), once per `--dpo`
setting and data-order seed (`data.shuffle_seed`, `--dpo-seeds`), and once as a control on the pairs after the first
token only (none at the habit's choice; `--no-control` skips it); (7) the held-out success rate of each DPO model,
with the same problems, samples and seeds as (4), and its change with a paired standard error (per-problem
differences: the same problems and sampling seeds before and after).
"""

from __future__ import annotations

import argparse
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

from bench._report import run_command, run_date, update_section  # noqa: E402
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
    p.add_argument("--planted-workdir", default=os.path.join(ROOT, "runs", "demo-pts"),
                   help="the demo continued on configs/demo-pts.toml (trained here when it has no checkpoint)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "pts_demo"))
    p.add_argument("--problems", type=int, default=40, help="problems searched by PTS")
    p.add_argument("--held-out", type=int, default=30, help="held-out problems for the success rate")
    p.add_argument("--samples", type=int, default=32, help="samples per held-out problem")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--solutions", type=int, default=2, help="sampled solutions bisected per PTS problem")
    p.add_argument("--top-alternatives", type=int, default=4,
                   help="tokens from the model's next-token distribution tried where the rollouts offered none")
    p.add_argument("--min-margin", type=float, default=0.6, help="PTS keeps pairs with p_chosen - p_rejected >= this")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--dpo-epochs", type=float, default=4.0, help="passes over the pairs per DPO run")
    p.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO step")
    p.add_argument("--dpo", type=dpo_setting, nargs="+", metavar="lr=X[,beta=B][,rpo_alpha=A]",
                   default=[dpo_setting("lr=1e-4")], help="DPO settings (each run once per --dpo-seeds seed)")
    p.add_argument("--dpo-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="DPO data-order seeds (data.shuffle_seed), one DPO run and measurement each")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control DPO run on the pairs after the first token (none at the habit's choice)")
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


def outcomes(policy, problems, *, samples, temperature, max_new_tokens, first_token,
             seed=12345) -> tuple[list[int], list[int]]:
    """(solved samples per problem, samples per problem whose first token is `first_token`); problem i's samples
    are drawn with seeds seed + 1000 i + j."""
    from phi4_jax.posttrain.oracles import make_judge
    from phi4_jax.posttrain.pts import ModelSampler

    judge = make_judge()
    sampler = ModelSampler(policy.model, temperature=temperature, max_new_tokens=max_new_tokens,
                           stop_tokens=policy.stop_tokens)
    stops = set(policy.stop_tokens)
    wins, firsts = [], []
    for i, problem in enumerate(problems):
        outs = sampler.rollouts(policy.encode_text(problem["prompt"]), samples, seed + 1000 * i)
        wins.append(sum(judge(policy.decode([t for t in out if t not in stops]), problem) for out in outs))
        firsts.append(sum(bool(out) and out[0] == first_token for out in outs))
    return wins, firsts


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


def run_logged(command: list[str], what: str) -> float:
    """Runs a CLI from the repository root; its seconds, or SystemExit with the tail of its stderr."""
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {run.returncode}): {' '.join(command)}")
    return time.perf_counter() - start


def span(values) -> str:
    """"0.001" or "0.001-0.003": the range of some rates."""
    lo, hi = f"{min(values := list(values)):.3f}", f"{max(values):.3f}"
    return lo if lo == hi else f"{lo}-{hi}"


def control_note(row, space_pairs: int, n_pairs: int, guess_before: float) -> str:
    """What the control run (no pair at the decision token) says, from its row."""
    change, change_se, guess_after = row[8], row[9], row[10]
    if change < 2 * change_se:
        return (f"The control, with no pair at the decision, does not raise the success rate beyond noise "
                f"({change:+.3f} ± {change_se:.3f}): the gain comes from the pairs at the habit's choice.")
    return (f"The control, with no pair at the decision, keeps a small part of the gain ({change:+.3f} ± "
            f"{change_se:.3f}; guesses {guess_before:.3f} -> {guess_after:.3f}): {space_pairs} of its {n_pairs} pairs "
            "prefer `' '` (the token that starts a worked sum) later in a solution, which in this 0.85M-parameter "
            "model likely raises it after \"Answer:\" too; the pairs at the decision give the rest.")


def has_checkpoint(workdir: str) -> bool:
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*")))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    total_start = time.perf_counter()
    demo_seconds = planted_seconds = None
    if not has_checkpoint(args.demo_workdir):
        print(f"training the demo model into {args.demo_workdir}", flush=True)
        demo_seconds = run_logged([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", args.demo_workdir, "--no-progress"],
                   "python train.py")
    if not has_checkpoint(args.planted_workdir):
        print(f"continuing it with the planted habit into {args.planted_workdir}", flush=True)
        planted_seconds = run_logged([
            sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "demo-pts.toml"),
            "--workdir", args.planted_workdir, "--no-progress",
            "--set", f"train.init_from={os.path.abspath(args.demo_workdir)}"], "the planted continued pretraining")
    planted_cfg = json.load(open(os.path.join(args.planted_workdir, "config.json")))
    planted_steps = planted_cfg["train"]["steps"]

    from phi4_jax.data.demo import GUESS_HABIT, GUESS_RATE
    from phi4_jax.posttrain.policy import load_policy

    policy = load_policy(args.planted_workdir)
    habit_token = policy.encode_text(GUESS_HABIT)[0]
    habit_text = policy.decode([habit_token])
    pts_set, held = split_problems(args.problems, args.held_out)
    problems_path = os.path.join(args.workdir, "problems.jsonl")
    with open(problems_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pts_set)
    measure = dict(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                   first_token=habit_token)

    start = time.perf_counter()
    base, base_guesses = outcomes(policy, held, **measure)
    before, before_se = rate_and_error(base, args.samples)
    guess_before = sum(base_guesses) / (args.samples * len(held))
    print(f"held-out success rate (planted model): {before:.3f} ± {before_se:.3f}, {guess_before:.3f} of the samples "
          f"start with {habit_text!r} ({len(held)} problems x {args.samples} samples, T={args.temperature}; "
          f"{time.perf_counter() - start:.0f} s)", flush=True)

    pairs_path = os.path.join(args.workdir, "pairs.jsonl")
    cache, dpo_dir = os.path.join(args.workdir, "cache"), os.path.join(args.workdir, "dpo")
    for stale in glob.glob(pairs_path) + glob.glob(pairs_path + ".ref_logps-*"):   # a fresh run (the CLIs resume)
        os.remove(stale)
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "phi4_jax.pts", "--checkpoint", args.planted_workdir, "--problems", problems_path,
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
    # the pairs PTS found at the habit's choice: right after "Answer:", the habit's first token rejected
    at_habit = [p for p in pairs if p["position"] == 0 and p["rejected"] == habit_text]   # (the ids are phi-4's)
    first_position = sum(p["position"] == 0 for p in pairs)
    pts_problems = len({p["problem"] for p in pairs})
    chosen_there = sorted({p["chosen"] for p in at_habit})
    shown = at_habit[:1] + [p for p in pairs if p not in at_habit][:3]
    examples = [f"`{p['prompt'][-28:]!r}` + chosen `{p['chosen']!r}` (p={p['p_chosen']:.2f}) / rejected "
                f"`{p['rejected']!r}` (p={p['p_rejected']:.2f}), alternative from the {p['alternative_from']}"
                for p in shown]
    print(f"{len(at_habit)} of {len(pairs)} pairs reject {habit_text!r} right after 'Answer:' "
          f"({first_position} pairs at that position; pairs from {pts_problems} problems)")
    print("\n".join(examples), flush=True)

    jobs = [(f"all {len(pairs)}", pairs_path, len(pairs), setting, seed)
            for setting in args.dpo for seed in args.dpo_seeds]
    if args.control:   # the same DPO without any pair at the decision token: what those pairs add
        control_path = os.path.join(args.workdir, "pairs-after-the-decision.jsonl")
        rest = [p for p in pairs if p["position"] > 0]
        with open(control_path, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in rest)
        rest_space = sum(p["chosen"] == " " for p in rest)
        jobs.append((f"control: the {len(rest)} later ones", control_path, len(rest), args.dpo[0], args.dpo_seeds[0]))
    dpo_rows = []
    for label, path, n_pairs, setting, seed in jobs:   # DPO from the planted model, then the same measurement
        steps = max(1, math.ceil(args.dpo_epochs * n_pairs / args.dpo_batch))
        name = "-".join(f"{k}{v:g}" for k, v in setting.items()) + f"-seed{seed}" + ("-control" * (path != pairs_path))
        workdir = f"{dpo_dir}-{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        dpo_seconds = run_logged([
            sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs", "demo-dpo.toml"), "--workdir", workdir, "--no-progress",
            "--set", f"train.init_from={os.path.abspath(args.planted_workdir)}",
            "--set", f"data.dpo_files={os.path.abspath(path)}", "--set", f"train.steps={steps}",
            "--set", f"train.global_batch={args.dpo_batch}", "--set", f"checkpoint.save_every={steps}",
            "--set", f"data.shuffle_seed={seed}",
            *[x for k, v in setting.items() for x in ("--set", f"{DPO_KEYS[k]}={v!r}")]], f"DPO {name}")
        last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
        wins, guesses = outcomes(load_policy(workdir), held, **measure)
        after, after_se = rate_and_error(wins, args.samples)
        change, change_se = paired_change(base, wins, args.samples)
        guess_after = sum(guesses) / (args.samples * len(held))
        dpo_rows.append((label, steps, setting, seed, dpo_seconds, last, after, after_se, change, change_se,
                         guess_after))
        print(f"DPO {name} (pairs: {label}): {steps} steps in {dpo_seconds:.0f} s, last loss {last['loss']:.3f}, "
              f"reward accuracy {last['rewards/accuracies']:.2f}; held-out success rate {before:.3f} -> {after:.3f} "
              f"± {after_se:.3f} (change {change:+.3f} ± {change_se:.3f}), samples starting with {habit_text!r} "
              f"{guess_before:.3f} -> {guess_after:.3f}", flush=True)
    total_seconds = time.perf_counter() - total_start
    print(f"total {total_seconds:.0f} s", flush=True)

    if args.write:
        main_rows = [row for row in dpo_rows if row[0].startswith("all")]
        changes = [row[8] for row in main_rows]
        z = [row[8] / max(row[9], 1e-9) for row in main_rows]
        spread = [abs(a[6] - b[6]) * args.samples * len(held) for a in main_rows for b in main_rows] or [0]
        spread = [round(x) for x in spread]
        body = "\n".join([
            "`bench/pts_demo.py`: PTS end to end on CPU (see its docstring), on a demo model with a **planted** "
            "pivotal habit.",
            "",
            f"Run {run_date()}, `{run_command(__file__, argv)}`, on {describe_machine()}; {total_seconds:.0f} s in all ("
            + ("the demo trained first: " + f"{demo_seconds:.0f} s; " if demo_seconds else "the demo already trained; ")
            + (f"the planted continued pretraining: {planted_seconds:.0f} s)." if planted_seconds else
               "the planted model already trained)."),
            "",
            "Why planted: on the plain `python train.py` demo, DPO on PTS pairs moved the held-out success rate by less "
            "than a standard error (best +0.020 ± 0.018, 10 settings; git history of this section): its clean pairs "
            "were the sum token of one PTS problem (`'15'` after \"9 plus 6 is\"), a fact that does not transfer to "
            "other sums, and its failures at T=1.4 were junk tokens from the other demo documents. This bench on the "
            "plain demo at T=1.0 (`--planted-workdir runs/demo`, 2026-12-01 20:04 UTC) does no better: 0.851 held-out "
            "success, 12 of 40 problems in band, 19 pairs (15 of them at the sum token), and DPO on them lowers success by "
            "0.096 ± 0.046 (3 data-order seeds alike). The PTS paper's "
            "pivotal tokens are shared decisions (guessing instead of computing), so the demo now has one by "
            f"construction: `configs/demo-pts.toml` continues the demo for {planted_steps} steps on the demo mixture "
            f"whose sums are guessed {GUESS_RATE:.0%} of the time (`Answer:{GUESS_HABIT} 12.`, a random number; "
            "generator `arithmetic_guessing`). PTS is not told about it.",
            "",
            f"- Model: the planted demo (0.85M parameters), sampled at T={args.temperature}, at most "
            f"{args.max_new_tokens} new tokens.",
            f"- Held-out success rate before DPO: **{before:.3f}** ± {before_se:.3f} (binomial standard error; "
            f"{len(held)} problems x {args.samples} samples); {guess_before:.3f} of the samples start with the "
            f"habit's first token {habit_text!r}.",
            f"- PTS on {len(pts_set)} other problems, K={args.rollouts}, band 0.2-0.8, threshold 0.2, {args.solutions} "
            f"sampled solutions per problem, up to {args.top_alternatives} alternatives from the model's next-token "
            f"distribution where the rollouts offered none, pairs at least {args.min_margin:g} apart in p: "
            f"{summary_line}; {pts_seconds:.0f} s wall including start-up and compiles "
            f"({rollouts / pts_seconds:.1f} rollouts/s; {estimates} p estimates).",
            f"- PTS found the habit on its own: **{len(at_habit)} of the {len(pairs)} pairs** (from "
            f"{len({p['problem'] for p in at_habit})} of the {len(pts_set)} problems) are at the first token after "
            f"\"Answer:\" with {habit_text!r} rejected (chosen: {', '.join(repr(c) for c in chosen_there) or '-'}); "
            f"other pairs at that token: {first_position - len(at_habit)}; later in the solution: "
            f"{len(pairs) - first_position} (mostly the number said). Examples:",
            *[f"  - {e}" for e in examples],
            f"- DPO from the planted model (`configs/demo-dpo.toml`, sigmoid loss, {args.dpo_epochs:g} epochs of "
            f"{args.dpo_batch} pairs a step) on all {len(pairs)} pairs, once per setting and data-order seed "
            "(`data.shuffle_seed`)" + (", and as a control on the pairs after the first token only (none at the "
                                       "habit's choice)" if args.control else "")
            + "; then the held-out success rate with the same problems, samples and sampling seeds as before. The "
            "change is the mean per-problem change with its standard error over the problems (paired):",
            "",
            "| pairs | steps | DPO lr | beta | rpo_alpha | data seed | seconds | last loss | reward accuracy | held-out "
            f"before | after | change | samples starting with {habit_text!r} |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {label} | {steps} | {st['lr']:g} | {st['beta']:g} | {st['rpo_alpha']:g} | {seed} | {sec:.0f} | "
              f"{last['loss']:.3f} | {last['rewards/accuracies']:.2f} | {before:.3f} | **{after:.3f}** ± {ase:.3f} | "
              f"{ch:+.3f} ± {chse:.3f} | {guess_before:.3f} -> {ga:.3f} |"
              for label, steps, st, seed, sec, last, after, ase, ch, chse, ga in dpo_rows],
            "",
            f"Over the {len(main_rows)} DPO runs on all pairs the change is {min(changes):+.3f} to {max(changes):+.3f} "
            f"(mean {sum(changes) / len(changes):+.3f}), each {min(z):.1f} or more of its standard errors; the "
            f"data orders end in slightly different models (last loss {min(r[5]['loss'] for r in main_rows):.3f} to "
            f"{max(r[5]['loss'] for r in main_rows):.3f}) that solve the same held-out samples within "
            f"{max(spread)} of {args.samples * len(held)}.",
            "",
            "What it shows: PTS isolates a decision shared by every problem without being told where it is (the first "
            "token after \"Answer:\", guessing against working the sum), and DPO on those single-token pairs "
            f"transfers to held-out sums: the held-out samples that start with {habit_text!r} fall from "
            f"{guess_before:.3f} to {span(r[10] for r in main_rows)}, and the success rate rises with them.",
            *(["", control_note(dpo_rows[-1], rest_space, len(rest), guess_before)] if args.control else []),
        ])
        update_section(args.write, "Pivotal Token Search", "pts-demo", replace=body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

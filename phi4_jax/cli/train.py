"""Train phi4_jax models: `python train.py` runs the built-in CPU demo (configs/demo.toml).

    python train.py [--config PATH] [--workdir DIR] [--steps N] [--save-every N] [--set SECTION.KEY=VALUE ...]
                    [--allow-config-change] [--no-progress]

Appends one JSON object per logged step to WORKDIR/metrics.jsonl (TensorBoard event files beside it) and resumes
from the newest checkpoint in WORKDIR, a local directory or a cloud URL such as gs://BUCKET/run; a resume whose
config differs from WORKDIR/config.json in more than steps, logging, checkpointing, mesh or remat is refused unless `--allow-config-change` is given. With the demo config it also writes
WORKDIR/loss.png and prints greedy continuations of a few prompts. Multi-host: run the same command on every host (see README); `jax.distributed.initialize` is
called when the environment describes several processes.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.toml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: configs/demo.toml)")
    p.add_argument("--workdir", default=None,
                   help="run directory, local or a cloud URL such as gs://BUCKET/run (default: runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint interval (checkpoint.save_every)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=1e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the run's saved config.json in more than "
                        "steps, logging, checkpointing, mesh or remat")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from phi4_jax import paths
    from phi4_jax.data.sources import DataError
    from phi4_jax.model.config import ConfigError
    from phi4_jax.model.sharding import MeshError
    from phi4_jax.train.checkpoints import TrainCheckpointError
    from phi4_jax.train.config import TrainConfigError, load_train_config
    from phi4_jax.train.loop import NonFiniteLossError, plot_loss_curve, sample_continuations, train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"checkpoint.save_every={args.save_every}")
    workdir = args.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config))[0])
    try:
        cfg = load_train_config(args.config, overrides)
        print(f"config {args.config} | model {cfg.model.num_params / 1e6:.2f}M params | "
              f"workdir {paths.normalize(workdir)}", flush=True)
        result = train(cfg, workdir, progress=not args.no_progress,
                       allow_config_change=args.allow_config_change)
    except (TrainConfigError, ConfigError, MeshError, DataError, TrainCheckpointError, NonFiniteLossError,
            paths.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["stopped_by_sigterm"]:
        return 0
    import jax

    is_main = jax.process_index() == 0
    metrics = result["metrics_path"]
    if is_main and cfg.demo.plot and paths.exists(metrics):
        print(f"loss curve: {plot_loss_curve(metrics, paths.join(workdir, 'loss.png'))}")
    if cfg.demo.sample_prompts:  # every process takes part (the parameters stay sharded); process 0 prints
        outs = sample_continuations(result["state"], cfg.model, result["tokenizer"],
                                    list(cfg.demo.sample_prompts), cfg.demo.max_new_tokens, result["mesh"])
        if is_main:
            print("samples (greedy):")
            for prompt, out in zip(cfg.demo.sample_prompts, outs):
                print(f"  {prompt!r} -> {out!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

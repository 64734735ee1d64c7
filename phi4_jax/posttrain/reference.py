"""DPO's reference log-probs, precomputed in one pass over the pairs and stored beside the data.

The reference model is the run's starting point (`train.init_from`). Its summed completion log-probs of every
kept pair are computed once (chosen and rejected in one forward pass per batch, on the run's mesh, with a progress
bar) and saved as ``<first data file>.ref_logps-<key>.npz``, where the key hashes the encoded pairs (so the
tokenizer and `train.seq_len` are covered) and the reference checkpoint's path. Training reads that file, so no
second copy of the weights is alive while the policy trains. `python train.py` computes the file when it is
missing; ``python -m phi4_jax.posttrain.precompute_ref --config CFG`` does it ahead of time.
"""

from __future__ import annotations

import glob
import hashlib
import os

import jax
import numpy as np

from phi4_jax.data.sources import DataError
from phi4_jax.model import sharding
from phi4_jax.model.decoder import logical_axes_tree
from phi4_jax.posttrain.objectives import DPO_SIDES, dpo_pair_logps

PAIR_KEYS = tuple(f"{side}_{k}" for side in DPO_SIDES for k in ("input_ids", "segment_ids", "loss_mask"))


def reference_key(pairs: dict, reference: str) -> str:
    """A hex digest of the encoded pairs and the reference checkpoint's (absolute) path."""
    h = hashlib.sha256(os.path.abspath(reference).encode())
    for k in PAIR_KEYS:
        h.update(k.encode())
        h.update(np.ascontiguousarray(pairs[k]).tobytes())
    return h.hexdigest()[:16]


def reference_path(data_pattern: str, pairs: dict, reference: str) -> str:
    first = sorted(glob.glob(os.path.expanduser(data_pattern)))[0]
    return f"{first}.ref_logps-{reference_key(pairs, reference)}.npz"


def compute_reference_logps(params, config, pairs: dict, mesh, batch_sharding, batch_size: int, chunk: int, *,
                            progress: bool = True) -> dict:
    """{"ref_chosen_logps", "ref_rejected_logps"} float32 [N] of `pairs` under `params` (on `mesh`), in batches
    of `batch_size` pairs laid out by `batch_sharding` (the train step's)."""
    fn = jax.jit(lambda p, b: dpo_pair_logps(p, config, b, chunk))
    n = len(pairs[PAIR_KEYS[0]])
    out = {side: [] for side in DPO_SIDES}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="reference log-probs", unit=" batch", dynamic_ncols=True)
    for start in starts:
        idx = np.arange(start, start + batch_size) % n   # the last batch wraps around; the extra rows are dropped
        batch = {}
        for k in PAIR_KEYS:
            rows = pairs[k][idx]
            batch[k] = jax.make_array_from_callback(rows.shape, batch_sharding, lambda i, rows=rows: rows[i])
        with sharding.activation_sharding(mesh, sharding.TRAINING_RULES):
            chosen, rejected = fn(params, batch)
        keep = min(batch_size, n - start)
        out["chosen"].append(np.asarray(jax.device_get(chosen))[:keep])
        out["rejected"].append(np.asarray(jax.device_get(rejected))[:keep])
    return {f"ref_{side}_logps": np.concatenate(out[side]).astype(np.float32) for side in DPO_SIDES}


def load_or_compute_reference(cfg, pairs: dict, mesh, shardings, *, log=print, progress: bool = True) -> dict:
    """The reference log-probs of `pairs` for a dpo run: read from their file beside the data, else computed
    from `train.init_from` and written there (atomically). Reference-free runs get zeros (unused)."""
    n = len(pairs[PAIR_KEYS[0]])
    if cfg.dpo.reference_free:
        return {f"ref_{side}_logps": np.zeros(n, np.float32) for side in DPO_SIDES}
    if not cfg.train.init_from:
        raise DataError("DPO needs a reference model: set train.init_from (the checkpoint DPO starts from), "
                        "or dpo.reference_free = true")
    path = reference_path(cfg.data.dpo_files, pairs, cfg.train.init_from)
    if os.path.exists(path):
        with np.load(path) as f:
            stored = {k: f[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}
        if len(stored["ref_chosen_logps"]) != n:
            raise DataError(f"{path}: holds {len(stored['ref_chosen_logps'])} reference log-probs for {n} pairs; "
                            "delete it to recompute")
        log(f"reference log-probs: {path}")
        return stored
    from phi4_jax.train.checkpoints import init_params_from

    log(f"computing reference log-probs of {n} pairs with {cfg.train.init_from}")
    base_shardings = sharding.tree_shardings(mesh, logical_axes_tree(cfg.model), sharding.TRAINING_RULES)
    params = init_params_from(cfg.train.init_from, cfg.model, base_shardings)   # not the LoRA adapters
    logps = compute_reference_logps(params, cfg.model, pairs, mesh, shardings.batch, cfg.micro_batch,
                                    cfg.train.loss_chunk, progress=progress)
    del params
    if jax.process_index() == 0:
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **logps, reference=os.path.abspath(cfg.train.init_from))
        os.replace(tmp, path)
        log(f"reference log-probs written to {path}")
    return logps


def posttrain_batches(cfg, tokenizer, mesh, shardings, *, log=print, progress: bool = True):
    """This host's batches for a post-training config (`train.objective` "sft" or "dpo"), as a grain
    IterDataset; data problems are reported (skips) or raised (DataError) before training starts."""
    from phi4_jax.posttrain.data import dpo_batches, read_dpo_pairs, read_sft_examples, sft_batches

    count, index = jax.process_count(), jax.process_index()
    loop = cfg.train
    if loop.global_batch % count:
        raise DataError(f"global batch {loop.global_batch} is not divisible by the {count} hosts")
    host_batch = loop.global_batch // count
    if loop.objective == "sft":
        examples, report = read_sft_examples(cfg.data.sft_files, tokenizer, loop.seq_len, progress=progress)
        log(report.summary("sft data"))
        return sft_batches(examples, loop.seq_len, host_batch, seed=cfg.data.shuffle_seed,
                           process_index=index, process_count=count)
    pairs, report = read_dpo_pairs(cfg.data.dpo_files, tokenizer, loop.seq_len, progress=progress)
    log(report.summary("dpo data"))
    refs = load_or_compute_reference(cfg, pairs, mesh, shardings, log=log, progress=progress)
    return dpo_batches(pairs, refs, host_batch, seed=cfg.data.shuffle_seed, process_index=index,
                       process_count=count, slot_multiple=dict(mesh.shape).get("context", 1))


def main(argv=None) -> int:
    """python -m phi4_jax.posttrain.precompute_ref --config CFG [--set SECTION.KEY=VALUE ...]"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m phi4_jax.posttrain.precompute_ref",
                                description="Precompute a DPO config's reference log-probs beside its data.")
    p.add_argument("--config", required=True, help="a train config with train.objective = \"dpo\"")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from phi4_jax.model.config import ConfigError
    from phi4_jax.model.sharding import MeshError
    from phi4_jax.posttrain.data import read_dpo_pairs
    from phi4_jax.train.checkpoints import TrainCheckpointError
    from phi4_jax.train.config import TrainConfigError, load_train_config
    from phi4_jax.train.loop import setup

    try:
        cfg = load_train_config(args.config, args.overrides)
        if cfg.train.objective != "dpo" or cfg.dpo.reference_free:
            raise TrainConfigError(f"{args.config}: not a DPO config with a reference (train.objective = "
                                   f"{cfg.train.objective!r}, dpo.reference_free = {cfg.dpo.reference_free})")
        mesh, tokenizer, built = setup(cfg)
        pairs, report = read_dpo_pairs(cfg.data.dpo_files, tokenizer, cfg.train.seq_len,
                                       progress=not args.no_progress)
        print(report.summary("dpo data"))
        load_or_compute_reference(cfg, pairs, mesh, built.shardings, progress=not args.no_progress)
    except (TrainConfigError, ConfigError, MeshError, DataError, TrainCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

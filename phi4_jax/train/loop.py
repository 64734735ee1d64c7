"""The training loop: mesh, data, state (fresh, converted, or resumed), jitted steps, metrics, checkpoints.

`train(cfg, workdir)` is what `python train.py` runs, from the CPU demo to a multi-host pod:

- resumes from the newest checkpoint in WORKDIR/checkpoints (params, optimizer, step, data iterator),
  else starts from `train.init_from` (a converted or previous-stage checkpoint), else from a fresh init;
- prepares batches ahead in background threads (`prefetched_batches`) and fetches a step's metrics only
  after the next step is dispatched, so the device does not wait on the host;
- WORKDIR may be a local directory or a cloud URL (gs://bucket/run): every file goes through `phi4_jax.paths`
  (checkpoints through Orbax/TensorStore, to the same place); it is checked writable before anything else;
- appends one JSON object per logged step to WORKDIR/metrics.jsonl, with TensorBoard events beside it
  (`phi4_jax.train.metrics`): step, loss, grad_norm, lr, tokens, tokens_per_s (and per device) and mfu over the
  wall time between two steps' metrics (`seconds`), that time split into data wait, compilation, checkpoint
  and compute (tokens count the batch's non-padding tokens: packed SFT/DPO rows are not full), the run's
  goodput (productive compute time over wall time since the run started), and
  source_tokens: {source name: tokens of this host's share of the batch}, the realised data mixture;
- saves every `checkpoint.save_every` steps (async) and at the end; on SIGTERM it saves and returns;
- a non-finite loss raises `NonFiniteLossError` naming the step; nothing is saved after the last good step.

`train.objective` "sft" / "dpo" runs post-training through the same step, state and checkpoints: its data and
loss come from `phi4_jax.posttrain` (imported only for those objectives; posttrain builds on train).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import signal
from typing import Any, NamedTuple

import grain
import jax
import numpy as np

from phi4_jax import paths
from phi4_jax.data.pipeline import host_batches
from phi4_jax.data.sources import DataError
from phi4_jax.data.tokenizing import make_tokenizer
from phi4_jax.model import sharding
from phi4_jax.train.checkpoints import TrainCheckpointer, init_params_from
from phi4_jax.train.config import OptimizerConfig, TrainConfig, TrainConfigError, config_json, resume_config_changes
from phi4_jax.train.metrics import METRICS_FILE, MetricsWriter, StepClock, read_metrics
from phi4_jax.train.mfu import mfu, peak_flops_per_device, training_flops_per_token
from phi4_jax.train.optimizer import make_optimizer
from phi4_jax.train.step import (
    PRETRAIN,
    StepShardings,
    abstract_train_state,
    batch_shardings,
    create_train_state,
    make_train_step,
    train_state_shardings,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


class _SigtermFlag:
    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict, batch_sharding) -> dict:
    """Host arrays -> global arrays; `batch_sharding` is one sharding, or {key: sharding}. `source_tokens` (this
    host's tokens per data source) stays on the host."""
    return {k: np.asarray(v).sum(0) if k == "source_tokens" else jax.make_array_from_process_local_data(
        batch_sharding[k] if isinstance(batch_sharding, dict) else batch_sharding, np.asarray(v))
        for k, v in local.items()}


def prefetched_batches(dataset: grain.IterDataset, batch_sharding, *, host_buffer: int = 2,
                       device_buffer: int = 1):
    """An iterator over global device batches that background threads prepare ahead of the train step.

    One grain `ThreadPrefetchIterDataset` reads and packs up to `host_buffer` host batches ahead, a second
    turns up to `device_buffer` of them into global arrays (`make_array_from_process_local_data`) while the
    device runs the current step. Its `get_state` / `set_state` are grain's: the state is that of the last
    batch handed out, so a checkpoint never counts prefetched-but-unconsumed batches and a resumed run sees
    exactly the batches it would have seen.
    """
    host = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=host_buffer)
    device = host.map(functools.partial(_global_batch, batch_sharding=batch_sharding))
    return iter(grain.experimental.ThreadPrefetchIterDataset(device, prefetch_buffer_size=device_buffer))


class BuiltStep(NamedTuple):
    """What `build_train_step` returns: the jitted step and what it is compiled against."""
    step_fn: Any            # jit(step)(state, batch) -> (state, metrics), state donated
    shardings: StepShardings
    abstract_state: Any     # the train state as sharded ShapeDtypeStructs (AOT `lower`, restore)
    tx: Any                 # the optax optimizer (to create a train state)
    create_state: Any       # (key, init_from=None) -> a new train state, sharded (from init_from's params if given)
    frozen_base: Any = None  # LoRA: `posttrain.lora.FrozenBase` (state["frozen"] is referenced, not checkpointed)


def build_train_step(model_cfg, mesh, *, optimizer: OptimizerConfig, total_steps: int, micro_batches: int,
                     loss_chunk: int, objective=PRETRAIN, lora=None) -> BuiltStep:
    """The train step for a model, optimizer and mesh: the one construction `train.py` (`setup`) and the AOT
    plan (`phi4_jax.train.plan`) share. Checks the model against the mesh (MeshError); no arrays are made.

    `step_fn.lower(abstract_state, batch)` with batch = {BATCH_KEYS: ShapeDtypeStruct([G, S], int32,
    sharding=shardings.batch)} compiles it ahead of time."""
    sharding.validate_model_mesh(model_cfg, mesh)
    if lora is not None and lora.rank:   # LoRA (`phi4_jax.posttrain.lora`): adapters trained, base frozen
        from phi4_jax.posttrain.lora import build_lora_train_step

        return BuiltStep(*build_lora_train_step(model_cfg, mesh, lora, optimizer=optimizer, total_steps=total_steps,
                                                micro_batches=micro_batches, loss_chunk=loss_chunk,
                                                objective=objective))
    tx, schedule = make_optimizer(optimizer, model_cfg, total_steps)
    shardings = train_state_shardings(mesh, model_cfg, tx)
    step_fn = make_train_step(model_cfg, tx, schedule, micro_batches=micro_batches, loss_chunk=loss_chunk,
                              mesh=mesh, shardings=shardings, objective=objective)

    def create_state(key, init_from=None):
        if init_from:
            return create_train_state(model_cfg, tx, shardings, None,
                                      params=init_params_from(init_from, model_cfg, shardings.params))
        return create_train_state(model_cfg, tx, shardings, key)

    return BuiltStep(step_fn, shardings, abstract_train_state(model_cfg, tx, shardings), tx, create_state)


def setup(cfg: TrainConfig, mesh=None):
    """Mesh, tokenizer, optimizer, shardings and the jitted step for a config (validated against each other)."""
    sharding.maybe_initialize_distributed(cfg.distributed)
    mesh = mesh if mesh is not None else sharding.build_mesh(cfg.mesh)
    model_cfg = cfg.model
    sharding.validate_batch_mesh(mesh, cfg.micro_batch, cfg.train.seq_len, what="micro-batch",
                                 hint=f"; micro-batch = train.global_batch {cfg.train.global_batch} / "
                                      f"train.micro_batches {cfg.train.micro_batches}")
    tokenizer = make_tokenizer(cfg.data)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                               f"{model_cfg.vocab_size}")
    built = build_train_step(model_cfg, mesh, optimizer=cfg.optimizer, total_steps=cfg.train.steps,
                             micro_batches=cfg.train.micro_batches, loss_chunk=cfg.train.loss_chunk,
                             objective=objective_of(cfg), lora=cfg.lora)
    return mesh, tokenizer, built


def objective_of(cfg: TrainConfig):
    """The `Objective` of `train.objective`: pretraining's here, post-training's from `phi4_jax.posttrain`."""
    if cfg.train.objective == "pretrain":
        return PRETRAIN
    from phi4_jax.posttrain.objectives import objective_for

    return objective_for(cfg)


def run_batches(cfg: TrainConfig, tokenizer, mesh, built: BuiltStep, *, log=print, progress: bool = True):
    """This host's batches for the run, as a grain IterDataset: the pretraining mixture, or post-training data."""
    if cfg.train.objective == "pretrain":
        return host_batches(cfg.data, tokenizer, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.global_batch)
    from phi4_jax.posttrain.reference import posttrain_batches

    return posttrain_batches(cfg, tokenizer, mesh, built.shardings, log=log, progress=progress)


def check_resume_config(cfg: TrainConfig, workdir: str, *, allow_change: bool = False, log=print) -> None:
    """Refuses to resume the run in `workdir` with a config that differs from its saved config.json.

    Keys in `RESUME_CHANGEABLE` (steps, logging, checkpointing, mesh, ...) may change; any other difference
    raises TrainConfigError naming the keys, unless `allow_change` (train.py --allow-config-change), in
    which case the differences are logged."""
    saved = paths.join(workdir, "config.json")
    if not paths.exists(saved):
        return
    changes = resume_config_changes(saved, cfg)
    if not changes:
        return
    if not allow_change:
        raise TrainConfigError(
            f"the run in {workdir} was started with a different config; changed: {'; '.join(changes)}. "
            "Use a new --workdir, or pass --allow-config-change to resume with the new values")
    log(f"resuming with a changed config: {'; '.join(changes)}")


def train(cfg: TrainConfig, workdir: str, *, progress: bool = True, log=print, mesh=None,
          allow_config_change: bool = False):
    """Runs (or resumes) training to `cfg.train.steps`; returns {"state", "tokenizer", "last_step", ...}.

    `mesh`: a prebuilt `jax.sharding.Mesh` (e.g. over a subset of devices) instead of `cfg.mesh`.
    Resuming checks the config against WORKDIR/config.json (`check_resume_config`; `allow_config_change`); the
    file is (re)written only after the state is restored or created, so a refused resume leaves it as it was.
    `workdir` may be a cloud URL; it is checked writable (StorageError) before anything is set up or written.
    """
    clock = StepClock()   # the run's wall time (goodput's denominator) starts now
    workdir = paths.check_writable_dir(workdir, "workdir")
    mesh, tokenizer, built = setup(cfg, mesh)
    shardings, step_fn = built.shardings, built.step_fn
    model_cfg, loop = cfg.model, cfg.train
    is_main = jax.process_index() == 0
    ckpt = TrainCheckpointer(workdir, save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    start = ckpt.latest_step()
    if start is not None:
        try:
            check_resume_config(cfg, workdir, allow_change=allow_config_change, log=log)
        except TrainConfigError:
            ckpt.close()
            raise

    try:
        dataset = run_batches(cfg, tokenizer, mesh, built, log=log, progress=progress and is_main)
    except BaseException:
        ckpt.close()
        raise
    data_it = prefetched_batches(dataset, batch_shardings(objective_of(cfg), shardings))
    base_reference = None   # LoRA: what checkpoints store instead of the frozen base weights
    try:
        if start is not None:
            frozen = None
            if built.frozen_base is not None:   # first: a checkpoint without a base reference (an old one that
                # held the base itself) gets reload's clear error, not a tree-structure mismatch from Orbax
                frozen, base_reference = built.frozen_base.reload(
                    ckpt.base_reference(start), jax.random.key(loop.seed), loop.init_from,
                    where=f"checkpoint step {start} in {ckpt.directory}")
            state, start = ckpt.restore(built.abstract_state, data_it, step=start)
            if frozen is not None:
                state["frozen"] = frozen
            log(f"resumed from {ckpt.directory} at step {start}")
        else:
            state = built.create_state(jax.random.key(loop.seed), init_from=loop.init_from)
            start = 0
            if built.frozen_base is not None:
                base_reference = built.frozen_base.reference(state["frozen"], loop.init_from)
            if loop.init_from:
                log(f"initialized parameters from {loop.init_from}")
        if is_main:   # only once the state came back: a refused resume leaves the run's config.json as it was
            paths.write_atomic(paths.join(workdir, "config.json"), config_json(cfg))
        writer = MetricsWriter(workdir, start_step=start) if is_main else None
    except BaseException:
        data_it.close()
        ckpt.close()
        raise

    flops_per_token = training_flops_per_token(model_cfg, loop.seq_len)
    peak = peak_flops_per_device()
    n_devices = mesh.size
    tokens_per_step = loop.global_batch * loop.seq_len
    last_saved = start
    bar = None
    if progress and is_main and start < loop.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=loop.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    step = start
    stopped_by_sigterm = False

    source_names = [s.name for s in cfg.data.sources]

    def report(done_step: int, device_metrics: dict, source_tokens):
        """Fetches a dispatched step's metrics, checks the loss, logs. Its wall time (`seconds`) runs from the
        previous step's report to this one, split by `clock` into data wait, compilation, checkpoint and
        compute."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        times = clock.step_done()
        if not math.isfinite(metrics["loss"]):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['loss']}) at step {done_step}; stopping. The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
        tokens_per_s = metrics.pop("batch_tokens", tokens_per_step) / times["seconds"]   # real tokens, no padding
        record = {"step": done_step, **metrics, "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_device": tokens_per_s / n_devices,
                  "mfu": mfu(flops_per_token, tokens_per_s, n_devices, peak), **times}
        if source_tokens is not None:   # pretraining mixtures; SFT/DPO batches come from their own files
            record["source_tokens"] = dict(zip(source_names, (int(n) for n in source_tokens)))
        if writer is not None and (done_step % loop.log_every == 0 or done_step == loop.steps):
            writer.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                            tok_s_dev=f"{tokens_per_s / n_devices:,.0f}", goodput=f"{times['goodput']:.0%}")

    try:
        with _SigtermFlag() as sigterm:
            pending = None   # (step, its metrics on the device): dispatched, not yet reported
            clock.start_steps()
            while step < loop.steps:
                with clock.timed("data"):
                    try:
                        batch = next(data_it)
                    except StopIteration:
                        raise DataError("the data pipeline ran out of batches") from None
                source_tokens = batch.pop("source_tokens", None)
                # The first call traces and compiles before it dispatches; later calls return at once.
                with clock.timed("compile") if step == start else contextlib.nullcontext():
                    state, metrics = step_fn(state, batch)   # dispatched; runs while the host goes on
                step += 1
                if pending is not None:   # the previous step's metrics, fetched now that this step is queued
                    report(*pending)
                pending = (step, metrics, source_tokens)
                stop = sigterm.raised
                if ckpt.due(step) or stop or step == loop.steps:
                    report(*pending)   # a step's loss is checked before its state is saved
                    pending = None
                    with clock.timed("checkpoint"):
                        if ckpt.save(step, state, data_it, base_reference=base_reference):
                            last_saved = step
                            if writer is not None:   # the metrics of the saved steps are durable with them
                                writer.flush()
                if stop:
                    stopped_by_sigterm = True
                    log(f"SIGTERM: saving step {step} and stopping")
                    break
            if step != last_saved:
                ckpt.save(step, state, data_it, force=True, base_reference=base_reference)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        data_it.close()
        if writer is not None:
            writer.close()
    return {"state": state, "tokenizer": tokenizer, "last_step": step, "mesh": mesh,
            "stopped_by_sigterm": stopped_by_sigterm, "metrics_path": paths.join(workdir, METRICS_FILE)}


def plot_loss_curve(metrics_path: str, png_path: str) -> str:
    """Writes the loss curve of a metrics.jsonl to a PNG (matplotlib, Agg backend); either may be a cloud URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    paths.write_atomic(png_path, png.getvalue())
    return png_path


def sample_continuations(state, model_cfg, tokenizer, prompts, max_new_tokens: int, mesh) -> list[str]:
    """Greedy continuations of text prompts from the trained parameters (stops at <|endoftext|>).

    Runs on every process with the parameters as they are sharded on `mesh` (nothing is gathered to a
    host): the weights keep the training layout, the few prompts and their cache are replicated (batch and
    sequence unsharded), and XLA gathers each layer's weights where it needs them. Call it on all
    processes of a multi-host run; each gets the same texts (print them on process 0).
    """
    from phi4_jax.inference.engine import generate
    from phi4_jax.model.decoder import model_from_params

    model = model_from_params(model_cfg, state["params"])
    rules = {**sharding.TRAINING_RULES, "batch": None, "seq": None}
    ids = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                    stop_tokens=[tokenizer.endoftext_id], mesh=mesh, rules=rules)
    return [tokenizer.decode(o) for o in outs]

"""Training checkpoints with Orbax's CheckpointManager: train state + data iterator, async, keep-K, resume.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``: `state` is the train state pytree (params, optimizer
state, step; each host writes its shards), `data` is each host's grain iterator state (JSON). A state's
``"frozen"`` entry (LoRA's base weights) is not written: the step holds a `frozen_base` item instead (JSON: where
the base came from and its content fingerprint), and the run reloads and checks the base on resume. Orbax
writes a step into a temporary directory and renames it when complete, so a crash mid-save never leaves
a partial checkpoint that resume would pick up. WORKDIR may be a cloud URL (gs://bucket/run): Orbax lists and
finalizes steps through etils.epath (the client `phi4_jax.paths` uses) and TensorStore writes the arrays with its
gcs driver; on a bucket Orbax marks a finished step with a commit file instead of a rename.

`init_params_from` starts a run from a converted (`convert_weights.py`) or previous-stage checkpoint:
parameters only (a previous stage's optimizer state is not read), restored straight into the run's
shardings, in float32 master precision.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from phi4_jax import paths
from phi4_jax.data.pipeline import check_resume_hosts
from phi4_jax.model.config import RUNTIME_FIELDS, Phi4Config

# Fields a run may change relative to the checkpoint it starts from (midtraining raises rope_theta and
# the context length; runtime fields do not change the math).
CHANGEABLE_FIELDS = {"rope_theta", "max_position_embeddings", *RUNTIME_FIELDS}


class TrainCheckpointError(RuntimeError):
    """A checkpoint that cannot be used to start or resume this run."""


FROZEN = "frozen"              # a train-state entry that is never checkpointed (LoRA's frozen base weights)
BASE_ITEM = "frozen_base"      # the checkpoint item that names that base instead (JSON)
ITEMS = ("state", "data", BASE_ITEM)


def _without_frozen(tree):
    return {k: v for k, v in tree.items() if k != FROZEN} if isinstance(tree, dict) else tree


class _DataIteratorState:
    """The data iterator as grain's checkpoint handler sees it: its state as JSON bytes (the same file grain
    writes for a `DatasetIterator`), restored with the JSON round trip undone where grain needs it.

    grain's concat-then-split packer compares its remainder slices with the tuple sentinel ``(-1, -1)`` ("no
    remainder"); JSON brings them back as lists, and ``[-1, -1] != (-1, -1)``, so a checkpoint taken when no
    document was split resumed on the wrong tokens (grain 0.2.x). Here they become tuples again."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state(), indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(_with_slice_tuples(json.loads(state)))

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


def _with_slice_tuples(state):
    if isinstance(state, dict):
        return {k: ({f: tuple(v) if isinstance(v, list) else v for f, v in value.items()}
                    if k == "remainder_slices" and isinstance(value, dict) else _with_slice_tuples(value))
                for k, value in state.items()}
    if isinstance(state, list):
        return [_with_slice_tuples(v) for v in state]
    return state


class TrainCheckpointer:
    """Saves every `save_every` steps (async), keeps the newest `keep`, restores the newest."""

    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = paths.join(workdir, "checkpoints")
        self.save_every = int(save_every)
        # The interval is applied here (Orbax's own policy would also save the first step of every run).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` will save (step is a multiple of `save_every`)."""
        return step % self.save_every == 0

    def save(self, step: int, state, data_iterator, *, force: bool = False, base_reference: dict | None = None) -> bool:
        """Saves if `step` is a multiple of `save_every` (or `force`); returns whether a save started.

        The data iterator's state is captured now; array data is copied off the devices before this
        returns and written in the background when async (so the state may be donated afterwards). A state with
        a ``"frozen"`` entry needs `base_reference` (JSON-able), saved in its place."""
        if not force and not self.due(step):
            return False
        items = {"state": ocp.args.StandardSave(_without_frozen(state)),
                 "data": grain.checkpoint.CheckpointSave(_DataIteratorState(data_iterator))}
        if isinstance(state, dict) and FROZEN in state:
            if base_reference is None:
                raise ValueError("a train state with frozen weights is saved with a base_reference naming them")
            items[BASE_ITEM] = ocp.args.JsonSave(base_reference)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, data_iterator, step: int | None = None):
        """(state, step) from the newest (or given) checkpoint; `data_iterator` is restored in place.
        A checkpoint saved by another number of hosts is refused (DataError, `check_resume_hosts`). A ``"frozen"``
        entry of `abstract_state` is not restored (the returned state has none; see `base_reference`)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise TrainCheckpointError(f"no checkpoint in {self.directory}")
        check_resume_hosts(paths.join(self.directory, str(step), "data"), jax.process_count())
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_without_frozen(abstract_state)),
                                  data=grain.checkpoint.CheckpointRestore(_DataIteratorState(data_iterator)))
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise TrainCheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's model/optimizer: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return restored["state"], step

    def base_reference(self, step: int) -> dict | None:
        """The `base_reference` saved with checkpoint `step` (None when it has none: not a frozen-base run)."""
        return _read_base_reference(self.manager, self.directory, step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def init_params_from(path: str, config: Phi4Config, param_shardings):
    """Parameters to start a run from, placed on `param_shardings` in `config.param_dtype`.

    `path` is either a previous stage's train.py workdir (only the "params" subtree of its newest
    checkpoint's train state is read, with an Orbax partial restore: the optimizer moments stay on disk) or a
    model checkpoint written by `convert_weights.py` (architecture checked field by field; `rope_theta` and
    `max_position_embeddings` may differ, as in midtraining). Either way each host reads only its shards,
    straight into the target shardings.
    """
    from phi4_jax.checkpoint import load, store

    if not paths.isdir(path):
        raise TrainCheckpointError(f"train.init_from: {path!r} is not a directory")
    if paths.isdir(paths.join(path, "checkpoints")):
        return _restore_train_params(path, config, param_shardings)
    try:
        stored, _ = store.read_checkpoint_config(path)
    except Exception as e:  # noqa: BLE001 - any failure reading it means it cannot start the run
        raise TrainCheckpointError(f"train.init_from: cannot read checkpoint {path!r}: {e}") from None
    mismatched = [f.name for f in dataclasses.fields(config)
                  if f.name not in CHANGEABLE_FIELDS and getattr(stored, f.name) != getattr(config, f.name)]
    if mismatched:
        detail = ", ".join(f"{n}: checkpoint {getattr(stored, n)!r} vs run {getattr(config, n)!r}"
                           for n in mismatched)
        raise TrainCheckpointError(f"train.init_from {path!r} has a different architecture ({detail})")
    try:
        return load.restore_params(path, config, dtype=config.param_dtype, sharding=param_shardings)
    except Exception as e:  # noqa: BLE001
        raise TrainCheckpointError(f"train.init_from: cannot restore parameters from {path!r}: {e}") from None


def _read_base_reference(manager, directory: str, step: int) -> dict | None:
    if not paths.exists(paths.join(directory, str(step), BASE_ITEM)):
        return None
    return manager.restore(step, args=ocp.args.Composite(**{BASE_ITEM: ocp.args.JsonRestore()}))[BASE_ITEM]


def restore_latest_state(workdir: str, abstract: dict, *, what: str, with_base_reference: bool = False):
    """The parts of the newest train-state checkpoint in a train.py workdir that `abstract` names (a partial,
    read-only restore onto its shardings). `what` starts each error message (e.g. "train.init_from").
    `with_base_reference`: returns (state, the step's saved base reference or None)."""
    directory = paths.join(workdir, "checkpoints")
    previous = ocp.CheckpointManager(
        directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None))
    try:
        step = previous.latest_step()
        if step is None:
            raise TrainCheckpointError(f"{what}: {workdir!r} has no checkpoint yet")
        args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        try:
            state = previous.restore(step, args=ocp.args.Composite(state=args))["state"]
            if with_base_reference:
                return state, _read_base_reference(previous, directory, step)
            return state
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise TrainCheckpointError(
                f"{what}: step {step} of {workdir!r} does not match this model: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        previous.close()


def _restore_train_params(workdir: str, config: Phi4Config, param_shardings):
    """The params of the newest train-state checkpoint in a train.py workdir (a partial restore)."""
    from phi4_jax.model.decoder import is_param_spec, param_specs

    dtype = jnp.dtype(config.param_dtype)
    abstract = {"params": jax.tree.map(lambda spec, sh: jax.ShapeDtypeStruct(spec[0], dtype, sharding=sh),
                                       param_specs(config), param_shardings, is_leaf=is_param_spec)}
    return restore_latest_state(workdir, abstract, what="train.init_from")["params"]

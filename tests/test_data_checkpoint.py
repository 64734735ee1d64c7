"""The data iterator's position survives a train checkpoint (saved as JSON, restored into a fresh iterator),
also at a position where no document was split across batches (grain's remainder sentinel (-1, -1), which
JSON turns into a list)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi4_jax.data.pipeline import host_batches
from phi4_jax.data.tokenizing import make_tokenizer
from phi4_jax.train.checkpoints import TrainCheckpointer
from phi4_jax.train.config import load_train_config
from phi4_jax.train.loop import prefetched_batches

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.toml")


def test_data_position_round_trips_through_a_checkpoint(tmp_path):
    # Document-weighted demo mixture: its batches include positions where no document is split.
    cfg = load_train_config(DEMO, ["train.global_batch=8", "train.seq_len=64", 'data.mixture_weighting="documents"'])
    tokenizer = make_tokenizer(cfg.data)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), PartitionSpec())

    def batches():
        return prefetched_batches(host_batches(cfg.data, tokenizer, cfg.model.vocab_size, 64, 8), sharding)

    steps = 8
    reference = batches()
    expected = [np.asarray(next(reference)["input_ids"]) for _ in range(steps + 1)]   # batches 1..steps+1
    reference.close()
    ckpt = TrainCheckpointer(str(tmp_path), save_every=1, keep=steps, async_save=False)
    state = {"x": jnp.zeros(2)}
    it, split = batches(), {}
    for step in range(1, steps + 1):
        next(it)
        split[step] = it.get_state()["remainder_slices"]["input_ids"] != (-1, -1)
        ckpt.save(step, state, it)
    it.close()
    unsplit = [s for s in split if not split[s]]   # no document split across batches: the sentinel case
    cut = [s for s in split if split[s]]
    assert unsplit and cut, f"the demo data must give both cases in {steps} batches, got {split}"
    for step in (unsplit[0], cut[0]):
        restored = batches()
        ckpt.restore(jax.eval_shape(lambda: state), restored, step=step)
        got = np.asarray(next(restored)["input_ids"])
        restored.close()
        assert np.array_equal(got, expected[step]), f"resumed at step {step} on the wrong tokens"
    ckpt.close()

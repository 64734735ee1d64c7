"""The SFT and DPO objectives, run by the pretraining train step (`phi4_jax.train.step.Objective`).

- SFT: the summed next-token loss of the tokens the batch's ``loss_mask`` selects (assistant turns and their
  closing ``<|im_end|>``; token t predicted from position t-1, never across a packed example's boundary), over
  their count: the step reports the mean loss per trained token.
- DPO: rows hold several packed pairs (`phi4_jax.posttrain.data.pack_dpo_pairs`: pair k of a row is segment k+1
  of its chosen row and of its rejected row); chosen and rejected rows are concatenated into one [2G, S] forward
  pass and each segment's summed completion log-probs ([G, K] per side), with the precomputed reference log-probs,
  give TRL's per-pair `dpo_loss`, summed over the real pairs (``pair_mask``; the step divides by their number, so
  accumulation over micro-batches is exact), and TRL's metrics `rewards/chosen`, `rewards/rejected`,
  `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`, logged beside the loss. With
  `dpo.rpo_alpha` > 0 (RPO) the chosen tokens' NLL (over the micro-batch's real chosen tokens) is added, weighted by
  it, and logged as `nll/chosen`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi4_jax.posttrain.dpo import dpo_loss, dpo_metrics, rpo_nll_loss
from phi4_jax.posttrain.logps import segment_weights, sequence_logps_from_params, target_weights
from phi4_jax.train.step import Objective

SFT_BATCH_KEYS = {"input_ids": 2, "segment_ids": 2, "positions": 2, "loss_mask": 2}
DPO_SIDES = ("chosen", "rejected")
PACKED_ROW_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")
DPO_BATCH_KEYS = {**{f"{side}_{k}": 2 for side in DPO_SIDES for k in PACKED_ROW_KEYS},
                  "ref_chosen_logps": 2, "ref_rejected_logps": 2, "pair_mask": 2}   # [G, K]: per pair slot


def sft_loss(params, batch, config, chunk):
    """(-sum of the masked tokens' log-probs, their count, {}) for a packed SFT batch."""
    logps = sequence_logps_from_params(params, config, batch["input_ids"], batch["loss_mask"],
                                       positions=batch["positions"], segment_ids=batch["segment_ids"], chunk=chunk)
    _, weights = target_weights(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    return -jnp.sum(logps), jnp.sum(weights), {}


def dpo_pair_logps(params, config, batch, chunk):
    """(chosen, rejected) summed completion log-probs [G] each, from one forward pass over both."""
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in ("input_ids", "segment_ids", "loss_mask")}
    logps = sequence_logps_from_params(params, config, both["input_ids"], both["loss_mask"],
                                       segment_ids=both["segment_ids"], chunk=chunk)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:]


def packed_pair_logps(params, config, batch, chunk):
    """(chosen, rejected) summed completion log-probs [G, K] each of a packed DPO batch (slot k = segment k+1),
    and their target counts {"chosen_lengths", "rejected_lengths"} [G, K], from one forward pass over both."""
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in PACKED_ROW_KEYS}
    k = batch["pair_mask"].shape[1]
    logps = sequence_logps_from_params(params, config, both["input_ids"], both["loss_mask"],
                                       positions=both["positions"], segment_ids=both["segment_ids"], chunk=chunk,
                                       n_segments=k)
    weights = segment_weights(target_weights(both["input_ids"], both["loss_mask"], both["segment_ids"])[1],
                              both["segment_ids"], k)
    lengths = jnp.sum(weights, axis=1)
    n = batch["pair_mask"].shape[0]
    return logps[:n], logps[n:], {"chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:]}


def dpo_objective(beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  reference_free: bool = False, rpo_alpha: float = 0.0) -> Objective:
    """The DPO objective with TRL's loss `loss_type` (``ipo`` length-normalized, as TRL does) on packed
    batches: `dpo_loss` and `dpo_metrics` of each pair slot, summed over the slots `pair_mask` marks; plus
    `rpo_alpha` times the chosen completions' per-token NLL (`rpo_nll_loss`, averaged over the (micro-)batch's real
    chosen tokens as TRL does per forward batch) when `rpo_alpha` > 0."""
    def per_pair(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
        one = lambda x: x[None]   # noqa: E731 - dpo_loss/dpo_metrics take [batch] arrays; this is a batch of one
        refs = (None, None) if reference_free else (one(ref_chosen), one(ref_rejected))
        lengths = {"chosen_lengths": one(chosen_len), "rejected_lengths": one(rejected_len)} \
            if loss_type == "ipo" else {}
        loss = dpo_loss(one(chosen), one(rejected), *refs, beta=beta, loss_type=loss_type,
                        label_smoothing=label_smoothing, **lengths)
        return loss, dpo_metrics(one(chosen), one(rejected), *refs, beta=beta)

    def loss(params, batch, config, chunk):
        chosen, rejected, lengths = packed_pair_logps(params, config, batch, chunk)
        flat = [x.reshape(-1) for x in (chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                                        lengths["chosen_lengths"], lengths["rejected_lengths"])]
        losses, metrics = jax.vmap(per_pair)(*flat)
        mask = batch["pair_mask"].reshape(-1).astype(jnp.float32)
        n = jnp.sum(mask)
        total = jnp.sum(losses * mask)
        sums = {name: jnp.sum(value * mask) for name, value in metrics.items()}
        if rpo_alpha:   # the step divides by n: n * nll gives the batch's per-token NLL, as TRL adds it
            nll = rpo_nll_loss(flat[0] * mask, flat[4] * mask)
            total = total + rpo_alpha * nll * n
            sums["nll/chosen"] = nll * n
        return total, n, sums

    return Objective(DPO_BATCH_KEYS, loss)


SFT = Objective(SFT_BATCH_KEYS, sft_loss)


def objective_for(cfg) -> Objective:
    """The objective a train config's `train.objective` names ("sft" or "dpo")."""
    if cfg.train.objective == "sft":
        return SFT
    if cfg.train.objective == "dpo":
        d = cfg.dpo
        return dpo_objective(d.beta, d.loss_type, d.label_smoothing, d.reference_free, d.rpo_alpha)
    raise ValueError(f"no post-training objective {cfg.train.objective!r}")

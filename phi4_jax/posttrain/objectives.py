"""The SFT and DPO objectives, run by the pretraining train step (`phi4_jax.train.step.Objective`).

- SFT: the summed next-token loss of the tokens the batch's ``loss_mask`` selects (assistant turns and their
  closing ``<|im_end|>``; token t predicted from position t-1, never across a packed example's boundary), over
  their count: the step reports the mean loss per trained token.
- DPO: chosen and rejected rows are concatenated into one [2G, S] forward pass; their summed completion
  log-probs and the precomputed reference log-probs give `dpo_loss` (summed over pairs; the step divides by the
  number of pairs, so accumulation over micro-batches is exact) and TRL's metrics `rewards/chosen`,
  `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`, logged beside the
  loss. With `dpo.rpo_alpha` > 0 (RPO) the chosen tokens' NLL is added, weighted by it, and logged as `nll/chosen`.
"""

from __future__ import annotations

import jax.numpy as jnp

from phi4_jax.posttrain.dpo import dpo_loss, dpo_metrics, rpo_nll_loss
from phi4_jax.posttrain.logps import sequence_logps_from_params, target_weights
from phi4_jax.train.step import Objective

SFT_BATCH_KEYS = {"input_ids": 2, "segment_ids": 2, "positions": 2, "loss_mask": 2}
DPO_SIDES = ("chosen", "rejected")
DPO_BATCH_KEYS = {**{f"{side}_{k}": 2 for side in DPO_SIDES for k in ("input_ids", "segment_ids", "loss_mask")},
                  "ref_chosen_logps": 1, "ref_rejected_logps": 1}


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


def dpo_objective(beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  reference_free: bool = False, rpo_alpha: float = 0.0) -> Objective:
    """The DPO objective with TRL's loss `loss_type` (``ipo`` length-normalized, as TRL does), plus `rpo_alpha` times
    the chosen completions' per-token NLL (`rpo_nll_loss`, averaged over the (micro-)batch's chosen tokens as TRL
    does per forward batch) when `rpo_alpha` > 0."""
    def loss(params, batch, config, chunk):
        chosen, rejected = dpo_pair_logps(params, config, batch, chunk)
        refs = (None, None) if reference_free else (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        lengths = {side: jnp.sum(target_weights(batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"],
                                                batch[f"{side}_segment_ids"])[1], axis=1) for side in DPO_SIDES}
        ipo_lengths = ({f"{side}_lengths": lengths[side] for side in DPO_SIDES} if loss_type == "ipo" else {})
        n = chosen.shape[0]
        mean = dpo_loss(chosen, rejected, *refs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                        **ipo_lengths)
        metrics = dpo_metrics(chosen, rejected, *refs, beta=beta)
        if rpo_alpha:
            nll = rpo_nll_loss(chosen, lengths["chosen"])
            mean = mean + rpo_alpha * nll
            metrics["nll/chosen"] = nll
        return mean * n, jnp.float32(n), {k: v * n for k, v in metrics.items()}

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

"""Direct Preference Optimization losses and metrics, with TRL's definitions (trl/trainer/dpo_trainer.py,
`DPOTrainer._compute_loss` and its logged metrics, TRL 1.16).

With chosen/rejected log-probs of the policy (pi) and the reference (ref), summed over the completion tokens:
    z = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
- ``sigmoid`` (DPO; with label smoothing eps, conservative DPO):
      -(1 - eps) * logsigmoid(beta * z) - eps * logsigmoid(-beta * z)
  (TRL 1.16 applies no label smoothing to ``sigmoid``; at eps = 0, the default, the two agree. The smoothed form
  is the cDPO one TRL used for ``sigmoid`` before and still uses for ``aot``.)
- ``ipo``: (z - 1 / (2 * beta))^2. TRL divides each side's log-ratio by its number of completion tokens first;
  pass `chosen_lengths` / `rejected_lengths` to do the same, or per-token averaged log-probs. Label smoothing
  does not apply to it (an error).
- ``robust``: (-(1 - eps) * logsigmoid(beta * z) + eps * logsigmoid(-beta * z)) / (1 - 2 * eps), eps in [0, 0.5).
Reference-free DPO: pass None for both reference log-probs (treated as 0).

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): `rpo_nll_loss` is the negative log-likelihood
of the chosen completions, averaged over their tokens in the batch; the objective adds ``rpo_alpha`` times it to the
DPO loss. That is TRL's ``rpo_alpha`` (TRL 0.x: ``rpo_alpha * nll_loss``) and, in TRL 1.16, the ``sft`` term of
``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, rpo_alpha]`` (``-chosen_per_token_logps[chosen_mask].mean()``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")


def _logps_array(name: str, value, shape=None):
    arr = jnp.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-sequence log-probs [batch], got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, but chosen_logps has shape {shape}")
    return arr.astype(jnp.float32)


def _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """(chosen log-ratio, rejected log-ratio), float32 [batch]; reference None = reference-free (0)."""
    chosen = _logps_array("chosen_logps", chosen_logps)
    rejected = _logps_array("rejected_logps", rejected_logps, chosen.shape)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free DPO)")
    if ref_chosen_logps is None:
        return chosen, rejected
    ref_chosen = _logps_array("ref_chosen_logps", ref_chosen_logps, chosen.shape)
    ref_rejected = _logps_array("ref_rejected_logps", ref_rejected_logps, chosen.shape)
    return chosen - ref_chosen, rejected - ref_rejected


def _check_beta(beta):
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """The mean DPO loss over the batch (float32 scalar); see the module docstring for each `loss_type`.

    `chosen_lengths` / `rejected_lengths` (completion token counts, [batch]) are used by ``ipo`` only, as TRL
    does; other loss types reject them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    _check_beta(beta)
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError(f"label_smoothing does not apply to the ipo loss; got {label_smoothing}")
    if loss_type == "sigmoid" and not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing for the sigmoid loss must lie in [0, 0.5], got {label_smoothing}")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for the robust loss must lie in [0, 0.5), got {label_smoothing}")
    if (chosen_lengths is not None or rejected_lengths is not None) and loss_type != "ipo":
        raise ValueError("chosen_lengths / rejected_lengths are used by the ipo loss only")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")

    chosen_ratio, rejected_ratio = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "ipo":
        if chosen_lengths is not None:
            chosen_ratio = chosen_ratio / jnp.maximum(
                _logps_array("chosen_lengths", chosen_lengths, chosen_ratio.shape), 1.0)
            rejected_ratio = rejected_ratio / jnp.maximum(
                _logps_array("rejected_lengths", rejected_lengths, chosen_ratio.shape), 1.0)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * (chosen_ratio - rejected_ratio)
        clean, flipped = -jax.nn.log_sigmoid(z), -jax.nn.log_sigmoid(-z)
        if loss_type == "sigmoid":
            losses = (1 - eps) * clean + eps * flipped
        else:  # robust
            losses = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    return jnp.mean(losses)


def rpo_nll_loss(chosen_logps, chosen_lengths):
    """The chosen completions' negative log-likelihood per token (float32 scalar): -sum(chosen_logps) over the
    batch's total chosen token count (`chosen_lengths`, [batch]), as TRL averages it over the batch's chosen tokens."""
    chosen = _logps_array("chosen_logps", chosen_logps)
    lengths = _logps_array("chosen_lengths", chosen_lengths, chosen.shape)
    return -jnp.sum(chosen) / jnp.maximum(jnp.sum(lengths), 1.0)


def dpo_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1):
    """TRL's logged DPO metrics, batch means (float32 scalars): ``rewards/chosen`` = beta * (pi_chosen -
    ref_chosen), ``rewards/rejected``, ``rewards/margins`` (chosen - rejected), ``rewards/accuracies``
    (fraction with chosen reward > rejected reward), and ``logps/chosen`` / ``logps/rejected`` (the policy's
    summed completion log-probs)."""
    _check_beta(beta)
    chosen_ratio, rejected_ratio = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(_logps_array("chosen_logps", chosen_logps)),
        "logps/rejected": jnp.mean(_logps_array("rejected_logps", rejected_logps)),
    }

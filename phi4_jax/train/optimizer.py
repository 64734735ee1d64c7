"""The optimizer: AdamW with linear warm-up then linear decay, global-norm clipping (optax).

Phi-4 pretraining defaults (PHI4.md): peak lr 3e-4, weight decay 0.1. Weight decay skips norm weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from phi4_jax.model.decoder import logical_axes_tree


def learning_rate_schedule(opt_cfg, total_steps: int):
    """step -> lr: linear warm-up to `lr` over `warmup_steps` (step 0 already gets lr/warmup_steps), then
    linear decay to `lr * end_lr_ratio` over `decay_steps` (default: the rest of the run), then constant."""
    peak = float(opt_cfg.lr)
    warmup = int(opt_cfg.warmup_steps)
    decay = int(opt_cfg.decay_steps or max(total_steps - warmup, 1))
    end = peak * float(opt_cfg.end_lr_ratio)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        frac = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        return jnp.where(step < warmup, warm, peak + (end - peak) * frac)

    return schedule


def weight_decay_mask(model_config):
    """True for parameters that get weight decay (everything but norm weights)."""
    return jax.tree.map(lambda axes: axes[-1] != "norm", logical_axes_tree(model_config),
                        is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(opt_cfg, model_config, total_steps: int, decay_mask=None):
    """(optax GradientTransformation, lr schedule). `decay_mask`: which parameters get weight decay (default:
    the model's weights but its norms; LoRA passes its adapters' tree)."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    parts = []
    if opt_cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay,
                             mask=weight_decay_mask(model_config) if decay_mask is None else decay_mask))
    return optax.chain(*parts), schedule

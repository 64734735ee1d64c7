"""Per-sequence log-probabilities of masked tokens: the quantity DPO compares between policy and reference.

Token t is predicted by the logits at position t-1, so `loss_mask[:, 0]` never selects a target. With
`segment_ids` (packed rows, 0 = padding), a token is scored only when it and the position before it lie in the
same non-padding segment, so the first token of each packed document is never a target. The lm_head and the
log-softmax run in float32 over sequence chunks (`phi4_jax.train.loss.chunked_target_logprob_sums`), so the full
[B, S, vocab] logits never exist at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phi4_jax.model.decoder import ModelInputError, check_inputs, hidden_states
from phi4_jax.train.loss import chunked_target_logprob_sums, next_token_targets

DEFAULT_CHUNK = 1024


def target_weights(input_ids, loss_mask, segment_ids):
    """(targets, weights) [B, S]: position t predicts targets[t] = token t+1, weighted 1 when token t+1 is
    selected by `loss_mask` and lies in t's non-padding segment (float32), else 0."""
    targets, valid = next_token_targets(input_ids, segment_ids)  # position t predicts token t+1
    mask_next = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, valid * mask_next.astype(jnp.float32)


def segment_weights(weights, segment_ids, n_segments: int):
    """[B, S, n_segments] float32: `weights` [B, S] split into one column per segment id 1..n_segments (a
    target's weight goes to the segment of the position that predicts it)."""
    ids = jnp.arange(1, n_segments + 1, dtype=segment_ids.dtype)
    return weights[..., None] * (segment_ids[..., None] == ids).astype(jnp.float32)


def sequence_logps_from_params(params, config, input_ids, loss_mask, *, positions=None, segment_ids=None,
                               chunk: int = DEFAULT_CHUNK, n_segments: int | None = None):
    """Pure, differentiable form of `sequence_logps` on a params dict: float32 [B]; with `n_segments` (packed
    rows), one sum per segment id 1..n_segments: float32 [B, n_segments] (0 for an absent segment)."""
    b, s = input_ids.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    h = hidden_states(params, input_ids, config, positions=positions, segment_ids=segment_ids)
    targets, weights = target_weights(input_ids, loss_mask, segment_ids)
    if n_segments is not None:
        weights = segment_weights(weights, segment_ids, n_segments)
    chunk = min(chunk, s)
    pad = -s % chunk  # pad the tail so the chunk divides the sequence; padded positions weigh 0
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)) + ((0, 0),) * (weights.ndim - 2))
    return chunked_target_logprob_sums(params, h, targets, weights, config, chunk)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _sequence_logps_jit(params, input_ids, loss_mask, positions, segment_ids, *, config, chunk):
    return sequence_logps_from_params(params, config, input_ids, loss_mask, positions=positions,
                                      segment_ids=segment_ids, chunk=chunk)


def sequence_logps(model, input_ids, loss_mask, *, positions=None, segment_ids=None, chunk: int = DEFAULT_CHUNK):
    """float32 [batch]: per row, the summed log-prob of the tokens where `loss_mask` is 1.

    `model` is a phi4_jax model (`model.params`, `model.config`); `input_ids` and `loss_mask` are [batch, seq]
    (the mask as 0/1 integers or booleans); `positions` and `segment_ids` as for `model(...)`. Each selected
    token t is predicted from position t-1 (see the module docstring). `chunk` bounds the tokens whose float32
    logits exist at once.
    """
    input_ids = jnp.asarray(input_ids)
    check_inputs(input_ids, model.config, positions, segment_ids)
    loss_mask = jnp.asarray(loss_mask)
    if loss_mask.shape != input_ids.shape:
        raise ModelInputError(f"loss_mask must have the shape of input_ids {input_ids.shape}, got {loss_mask.shape}")
    if not (jnp.issubdtype(loss_mask.dtype, jnp.integer) or loss_mask.dtype == jnp.bool_):
        raise ModelInputError(f"loss_mask must be 0/1 integers or booleans, got dtype {loss_mask.dtype}")
    if not bool(jnp.all((loss_mask == 0) | (loss_mask == 1))):
        raise ModelInputError("loss_mask must contain only 0 and 1")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return _sequence_logps_jit(
        model.params, input_ids.astype(jnp.int32), loss_mask.astype(jnp.int32),
        None if positions is None else jnp.asarray(positions, jnp.int32),
        None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
        config=model.config, chunk=chunk)

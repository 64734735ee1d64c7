"""Next-token cross-entropy in float32, computed in sequence chunks.

Packed batches: `segment_ids` [B, S] (0 = padding) mark documents. Position t predicts token t+1 only when
both belong to the same non-padding document, so padding and document boundaries never contribute.

The lm_head and the loss run over strided sequence chunks under `jax.checkpoint` inside a `lax.scan`, so
float32 logits exist for one chunk ([B, chunk, vocab]) at a time, forward and backward: at 16K tokens and
a 100K vocabulary, full logits would take 6.5 GB per sequence. Chunk c holds tokens c, c+n, c+2n, ...
(n = number of chunks), which keeps every chunk spread evenly over a sequence-sharded (context) mesh axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi4_jax.model import sharding
from phi4_jax.model.decoder import hidden_states, logits_from_hidden


def next_token_targets(input_ids, segment_ids):
    """(targets [B, S], weights [B, S] float32): token t+1 and whether position t is trained on."""
    s = input_ids.shape[1]
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    seg_next = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    valid = (segment_ids != 0) & (seg_next == segment_ids) & (jnp.arange(s)[None, :] < s - 1)
    return targets, valid.astype(jnp.float32)


def chunked_target_logprob_sums(params, h, targets, weights, config, chunk: int):
    """Per row, the sum over positions of weights * log p(target), from hidden states h [B, S, E]: float32 [B].
    `weights` may have trailing axes ([B, S, K...]: e.g. one weight column per packed segment); the sums then
    have them too ([B, K...]).

    The one chunked lm_head + log-softmax pass: the training loss and post-training's sequence log-probs
    both use it. `S` must be divisible by `min(chunk, S)`.
    """
    b, s, e = h.shape
    chunk = min(chunk, s)
    if s % chunk:
        raise ValueError(f"sequence length {s} is not divisible by the loss chunk {chunk}")
    n = s // chunk
    # [B, chunk, n, ...] -> scan over n: chunk i = tokens i, i+n, i+2n, ...
    hc = jnp.moveaxis(h.reshape(b, chunk, n, e), 2, 0)
    tc = jnp.moveaxis(targets.reshape(b, chunk, n), 2, 0)
    wc = jnp.moveaxis(weights.reshape(b, chunk, n, *weights.shape[2:]), 2, 0)

    @jax.checkpoint
    def one_chunk(total, xs):
        h_i, t_i, w_i = xs
        h_i = sharding.constrain(h_i, ("batch", "seq", "embed"))
        logits = logits_from_hidden(params, h_i, config)  # float32 [B, chunk, V]
        logits = sharding.constrain(logits, ("batch", "seq", "vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_i[..., None], axis=-1)[..., 0]
        lp = (target_logit - lse).reshape(*target_logit.shape, *(1,) * (w_i.ndim - 2))
        return total + jnp.sum(lp * w_i, axis=1), None

    total, _ = jax.lax.scan(one_chunk, jnp.zeros((b, *weights.shape[2:]), jnp.float32), (hc, tc, wc))
    return total


def chunked_cross_entropy_sum(params, h, targets, weights, config, chunk: int):
    """Sum over positions of weights * (-log p(target)), from hidden states h [B, S, E]; float32."""
    return -jnp.sum(chunked_target_logprob_sums(params, h, targets, weights, config, chunk))


def loss_sum_and_count(params, batch, config, chunk: int):
    """(sum of token losses, number of trained tokens) for a packed batch dict
    {input_ids, segment_ids, positions} of [B, S] int32 arrays."""
    input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]
    h = hidden_states(params, input_ids, config, positions=batch["positions"], segment_ids=segment_ids)
    targets, weights = next_token_targets(input_ids, segment_ids)
    return chunked_cross_entropy_sum(params, h, targets, weights, config, chunk), jnp.sum(weights)

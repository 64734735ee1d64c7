"""Sampling the next token: greedy, temperature, top-k and top-p, per row, with reproducible per-sequence PRNG keys.

Sequence b draws its t-th new token with key `fold_in(key_b, t)`; key_b comes from `seed` (see `sequence_keys`), so
results are reproducible, and with one seed per prompt a prompt's tokens do not depend on the rest of the batch.
Every setting is a per-row array (`sample_rows`), so one compiled program serves any mix of requests.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.inference.errors import GenerationError


def sample_rows(logits, keys, steps, temperature, top_k, top_p, argmax=None, restrict=None):
    """Next token per row of float32 logits [B, V], each row with its own settings.

    Row b is greedy (argmax) where temperature[b] == 0; else it is drawn with key fold_in(keys[b], steps[b]) (keys:
    typed PRNG keys [B]) from softmax(logits[b] / temperature[b]) restricted to the top_k[b] most likely tokens
    (`top_k_mask`; 0 = no limit) and then to the nucleus of mass top_p[b] of what is left (`top_p_mask`; 1 = no
    limit). The passes over the vocabulary that top-k and top-p need run only when some row uses them
    (`lax.cond`): an all-greedy batch costs one argmax: `argmax` (float32 [B, V] -> int32 [B], jnp.argmax's
    answer; the CPU engine passes `kernels.cpu_native.argmax`) or jnp.argmax, which also picks the sampled rows'
    draws (jax.random.categorical's own formula, so the same draws either way). `restrict` (logits [B, V], top_k
    [B], top_p [B] -> logits with the tokens outside each row's top-k and then nucleus at -inf; the CPU engine
    passes `kernels.cpu_native.sampling_filter`) replaces the two masks' passes, in one call when any row uses
    either.
    """
    logits = logits.astype(jnp.float32)
    pick = (lambda x: jnp.argmax(x, axis=-1)) if argmax is None else argmax   # noqa: E731
    greedy = pick(logits).astype(jnp.int32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def masked(x, needed, mask_fn, setting):
        return jax.lax.cond(jnp.any(needed), lambda: jnp.where(mask_fn(x, setting), x, -jnp.inf), lambda: x)

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        if restrict is None:
            scaled = masked(scaled, (temperature > 0) & (top_k > 0), top_k_mask, top_k)
            scaled = masked(scaled, (temperature > 0) & (top_p < 1.0), top_p_mask, top_p)
        else:
            k, p = jnp.where(temperature > 0, top_k, 0), jnp.where(temperature > 0, top_p, 1.0)
            scaled = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), lambda: restrict(scaled, k, p), lambda: scaled)
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        # jax.random.categorical(key, row) is argmax(gumbel(key, row.shape) + row): the same draw, with `argmax`
        noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], scaled.dtype))(step_keys)
        drawn = pick(noise + scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _ordered_bits(x):
    """uint32 keys of float32 x that order like the numbers (-inf smallest, +inf largest; -0.0 and +0.0 one key,
    as they compare equal)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    negative = bits >= jnp.uint32(0x80000000)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_k_mask(logits, top_k):
    """The top_k[b] largest logits of each row [B, V] as a bool mask, without sorting the vocabulary.

    The k-th largest value is the largest t with count(logits >= t) >= k, found exactly by a binary search over the
    32-bit order-preserving keys of the float32 values (`_ordered_bits`), 32 passes over the unsorted row. Values
    tied with the k-th largest are all kept (a sort keeps an arbitrary part of them); top_k <= 0 or >= V keeps all.
    """
    keys = _ordered_bits(logits)
    k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), logits.shape[:1])

    def halve(_, bounds):                                  # invariant: count(keys >= lo) >= k
        lo, hi = bounds
        mid = hi - (hi - lo) // 2                          # the upper middle, without lo + hi + 1 wrapping
        enough = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo = jnp.zeros(logits.shape[:1], jnp.uint32)
    kth, _ = jax.lax.fori_loop(0, 32, halve, (lo, jnp.max(keys, axis=-1)))
    return (keys >= kth[:, None]) | (k[:, None] <= 0)


def top_p_mask(logits, top_p):
    """The nucleus of float32 logits [B, V] as a bool mask [B, V], without sorting the vocabulary; top_p is a scalar or
    one value per row.

    Definition (the sorted one): sort the probabilities in descending order and keep each token whose
    preceding mass is below `top_p`, i.e. the smallest prefix whose mass reaches `top_p`. For distinct
    probabilities that is {i : mass_above(p_i) < top_p} with mass_above(t) = sum of the probabilities > t, a
    non-increasing step function of t; so the nucleus is {i : p_i >= tau} with tau the smallest float32
    where mass_above(tau) < top_p. tau is found exactly by a binary search over the bit patterns of the
    non-negative float32s (ordered like the numbers), 31 passes over the unsorted probabilities. Tied
    probabilities at the boundary are all kept (a sort keeps an arbitrary part of them); top_p >= 1 keeps all.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), probs.shape[:1])

    def mass_above(bits):                                   # bits [B] int32 -> mass of probs > float(bits)
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1)

    def halve(_, bounds):                                   # invariant: mass_above(hi) < top_p
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)   # mass above the max is 0
    _, tau_bits = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi), hi))
    tau = jax.lax.bitcast_convert_type(tau_bits, jnp.float32)[:, None]
    return (probs >= tau) | (top_p[:, None] >= 1.0)


def seed_array(seed: int | Sequence[int], n: int, batch: int) -> tuple[np.ndarray, bool]:
    """(uint32 seeds [batch], whether they are per prompt) from `generate`'s `seed` argument."""
    if isinstance(seed, (int, np.integer)):
        return np.full((batch,), int(seed) % 2**32, np.uint32), False
    try:
        seeds = [int(s) for s in seed]
    except (TypeError, ValueError):
        raise GenerationError(f"seed must be an int or a list of ints (one per prompt), got {seed!r}") from None
    if len(seeds) != n:
        raise GenerationError(f"seed has {len(seeds)} entries but there are {n} prompts")
    return np.array(seeds + [0] * (batch - n), np.int64).astype(np.uint32), True


def keys_from_seeds(seeds, per_prompt: bool):
    """Per-sequence PRNG keys [B]: `key(seeds[b])` per prompt, else `fold_in(key(seeds[b]), b)` (one shared seed)."""
    keys = jax.vmap(jax.random.key)(seeds)
    if per_prompt:
        return keys
    return jax.vmap(jax.random.fold_in)(keys, jnp.arange(seeds.shape[0], dtype=jnp.uint32))


def sequence_keys(seed: int | Sequence[int], n: int):
    """The PRNG keys `generate` gives n prompts for `seed` (an int, or one int per prompt)."""
    seeds, per_prompt = seed_array(seed, n, n)
    return keys_from_seeds(jnp.asarray(seeds), per_prompt)

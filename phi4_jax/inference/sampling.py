"""Sampling the next token: greedy, temperature, top-k and top-p, with reproducible per-sequence PRNG keys.

Sequence b draws its token t with key `fold_in(key_b, t)`; key_b comes from `seed` (see `sequence_keys`), so
results are reproducible, and with one seed per prompt a prompt's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.inference.errors import GenerationError


class Sampler(NamedTuple):
    """Static sampling choices (part of the compiled program); temperature and top_p values are dynamic."""
    greedy: bool
    top_k: int | None
    use_top_p: bool


def sample(logits, keys, step, sampler: Sampler, temperature, top_p):
    """Next token per sequence from float32 logits [B, V]; keys [B] (typed PRNG keys), step scalar.

    top-k takes `lax.top_k` of k values; top-p without top-k keeps the nucleus found by `top_p_mask` on the
    unsorted vocabulary (no full sort per token)."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    if sampler.top_k is None:
        if sampler.use_top_p:
            logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
        return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
    values, ids = jax.lax.top_k(logits, min(sampler.top_k, logits.shape[-1]))   # descending
    if sampler.use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(step_keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def top_p_mask(logits, top_p):
    """The nucleus of float32 logits [B, V] as a bool mask [B, V], without sorting the vocabulary.

    Definition (the sorted one): sort the probabilities in descending order and keep each token whose
    preceding mass is below `top_p`, i.e. the smallest prefix whose mass reaches `top_p`. For distinct
    probabilities that is {i : mass_above(p_i) < top_p} with mass_above(t) = sum of the probabilities > t, a
    non-increasing step function of t; so the nucleus is {i : p_i >= tau} with tau the smallest float32
    where mass_above(tau) < top_p. tau is found exactly by a binary search over the bit patterns of the
    non-negative float32s (ordered like the numbers), 31 passes over the unsorted probabilities. Tied
    probabilities at the boundary are all kept (a sort keeps an arbitrary part of them); top_p >= 1 keeps all.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p = jnp.asarray(top_p, jnp.float32)

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
    return (probs >= tau) | (top_p >= 1.0)


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


keys_from_seeds_jit = jax.jit(keys_from_seeds, static_argnums=1)


def sequence_keys(seed: int | Sequence[int], n: int):
    """The PRNG keys `generate` gives n prompts for `seed` (an int, or one int per prompt)."""
    seeds, per_prompt = seed_array(seed, n, n)
    return keys_from_seeds(jnp.asarray(seeds), per_prompt)

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
    """Next token per sequence from float32 logits [B, V]; keys [B] (typed PRNG keys), step scalar."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    if sampler.top_k is None and not sampler.use_top_p:
        return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
    k = logits.shape[-1] if sampler.top_k is None else min(sampler.top_k, logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)                  # descending
    if sampler.use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(step_keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


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

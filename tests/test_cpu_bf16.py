"""The engine's bfloat16 CPU decode path (phi4_jax.inference.paged_layers with bfloat16 params, compute and pages)
against transformers.

A tiny random Phi3ForCausalLM in float32 is the peer: our bfloat16 per-layer path (`per_layer_params`,
`init_pages_per_layer`'s `PageBits` pool, `paged_extend_per_layer`), fed two sequences of different lengths (the
longer over 512 tokens) in 128-token prefill chunks and then one token at a time, must give logits as close to
transformers' float32 logits as transformers' own bfloat16 model does (within 2x its error), at the end of each
prompt and at every decode step (two rows, then one: the one-row lm_head product runs on its float32 copy). It runs
twice: head_dim 12 (the XLA paged attention) and head_dim 16 (the native CPU kernel, kernels/cpu_native, whose custom
call the compiled step must contain where the kernel is available). The float32 path's exact greedy equality with
transformers is covered by tests/test_batching.py, tests/test_one_path.py and tests/test_generation*.py.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_native
from tests.hf_models import hf_logits, make_tiny_phi3_model

PAGE, CHUNK, DECODE = 16, 128, 4
LENGTHS = (520, 300)   # prompt lengths of the two rows


@pytest.fixture(scope="module", params=[72, 96], ids=["head_dim12-xla", "head_dim16-native"])
def models(request):
    """Head dim 12 takes the XLA paged attention, 16 the native CPU kernel where it is available."""
    import torch

    from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
    from phi4_jax.model.config import Phi4Config

    hf = make_tiny_phi3_model(hidden=request.param)
    config = Phi4Config.from_hf_dict(hf.config.to_dict(), param_dtype="bfloat16", compute_dtype="bfloat16",
                                     remat_policy="none")
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(lambda w: jnp.asarray(w).astype(jnp.bfloat16), params_from_hf_state_dict(state, config))
    hf_bf16 = make_tiny_phi3_model(hidden=request.param).to(torch.bfloat16)
    return hf, hf_bf16, params, config


def test_bf16_cpu_decode_agrees_with_transformers_float32(models):
    """Head dim 12: XLA's ops throughout (`per_layer_params(native=False)`, XLA's paged attention); head dim 16:
    the native kernels where they build (packed bfloat16 products, the native paged attention)."""
    from phi4_jax.inference import paged_layers as pl

    PageBits, init_pages_per_layer = pl.PageBits, pl.init_pages_per_layer
    paged_extend_per_layer, per_layer_params = pl.paged_extend_per_layer, pl.per_layer_params

    hf, hf_bf16, params, config = models
    native = config.head_dim % 16 == 0 and cpu_native.available()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, config.vocab_size, n + DECODE) for n in LENGTHS]
    width = -(-(max(LENGTHS) + DECODE) // PAGE)
    tables = np.arange(1, 1 + 2 * width, dtype=np.int32).reshape(2, width)
    pages = init_pages_per_layer(config, 2 * width + 1, PAGE)
    assert all(isinstance(p, PageBits) and p.bits.dtype == jnp.uint16 and p.dtype == "bfloat16"
               for p in pages.k + pages.v)
    step_params = per_layer_params(params, native=native)
    head = step_params["lm_head"]
    if native:    # bfloat16 panels serve one row too: no float32 copy, no transposed copy
        assert not head.one_row_float32 and head.panels.dtype == jnp.uint16 and head.rows is None
        assert head.matrix.dtype == jnp.bfloat16
    else:
        assert head.one_row_float32 and head.matrix.dtype == jnp.float32 and head.rows.dtype == jnp.bfloat16
    extend = jax.jit(paged_extend_per_layer, static_argnames="config", donate_argnums=1)

    # The compiled step never materializes a layer's pool in another dtype (XLA:CPU widened a bf16 scatter's pool
    # to float32 and back; a bitcast around a scatter became a copy): every whole-pool array the step's top-level
    # ops make is the uint16 pool itself (fused computations may convert elements they gather).
    pool = rf"\[{2 * width + 1},{PAGE},{config.num_kv_heads},{config.head_dim}\]"
    hlo = extend.lower(step_params, pages, jnp.zeros((2, 1), jnp.int32), jnp.zeros(2, jnp.int32),
                       jnp.ones(2, jnp.int32), tables, config=config).compile().as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    whole_pools = re.findall(rf"= (\w+){pool}", entry)
    assert len(whole_pools) >= 4 * config.num_layers and set(whole_pools) == {"u16"}, whole_pools
    assert entry.count("phi4_cpu_paged_attention") == (config.num_layers if native else 0)

    ours = {b: [] for b in range(2)}    # logits at positions LENGTHS[b] - 1 + i, i = 0..DECODE
    for c in range(0, max(LENGTHS), CHUNK):
        tokens = np.zeros((2, CHUNK), np.int32)
        n_new = np.zeros(2, np.int32)
        for b, n in enumerate(LENGTHS):
            part = seqs[b][c:min(n, c + CHUNK)]
            tokens[b, :len(part)], n_new[b] = part, len(part)
        pages, logits = extend(step_params, pages, tokens, np.full(2, c, np.int32), n_new, tables, config=config)
        for b, n in enumerate(LENGTHS):
            if c < n <= c + CHUNK:
                ours[b].append(np.asarray(logits[b]))
    for i in range(DECODE):   # both rows, then row 0 alone (one-row products: the lm_head's float32 matrix)
        rows = 2 if i < DECODE // 2 else 1
        tokens = np.array([[s[n + i]] for s, n in zip(seqs, LENGTHS)], np.int32)[:rows]
        pages, logits = extend(step_params, pages, tokens, np.array(LENGTHS, np.int32)[:rows] + i,
                               np.ones(rows, np.int32), tables[:rows], config=config)
        for b in range(rows):
            ours[b].append(np.asarray(logits[b]))

    for b, n in enumerate(LENGTHS):
        got = np.stack(ours[b])
        want = hf_logits(hf, seqs[b][None])[0, n - 1:n - 1 + len(got)]                 # float32 peer
        theirs_bf16 = hf_logits(hf_bf16, seqs[b][None])[0, n - 1:n - 1 + len(got)]     # transformers' own bf16 error
        assert got.shape == want.shape and np.isfinite(got).all()
        bf16_err = np.abs(theirs_bf16 - want).max()
        assert 0 < bf16_err < 0.5 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=2 * bf16_err)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_bf16_engine_keeps_its_pages_as_bits(models):
    """The engine's own pool on the CPU is the `PageBits` pool for a bfloat16 model, and a float32 one for float32."""
    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.inference.paged_layers import PageBits
    from phi4_jax.model.decoder import model_from_params

    _, _, params, config = models
    engine = ContinuousBatchingEngine(model_from_params(config, params), max_batch=2, max_context=64)
    assert engine.per_layer and all(isinstance(p, PageBits) for p in engine.pages.k)
    f32 = dataclasses.replace(config, param_dtype="float32", compute_dtype="float32")
    engine32 = ContinuousBatchingEngine(model_from_params(f32, jax.tree.map(lambda w: w.astype(jnp.float32), params)),
                                        max_batch=2, max_context=64)
    assert all(p.dtype == jnp.float32 for p in engine32.pages.k)
    engine.shutdown()
    engine32.shutdown()

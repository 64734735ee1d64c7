"""The XLA blockwise flash attention (`attention_blockwise`, the "xla" implementation the model uses on CPU and
in training) against the materialized `attention_naive`, forward, log-sum-exp and gradients.

The blockwise backward is a hand-written `jax.custom_vjp` (probabilities recomputed from the saved
log-sum-exp). Here it is checked against autodiff through `attention_naive` across GQA ratios, masks and
many blocks; test_model.py checks the whole model's gradient against torch autograd, but at one attention
block, and its other gradient tests compare configurations that share this backward. A wrong dq / dk / dv
or causal block range would otherwise train silently wrong.

Small blocks (32 / 64 rows) give several q and kv blocks, causal block skipping and a ragged tail at small
sequence lengths. Tolerances: both sides compute in float32, so they agree to rounding (observed <= ~1.3e-6 on
the output, <= ~9e-6 on gradients of magnitude up to ~10): atol = rtol = 1e-5 (output, LSE) and 2e-5
(gradients). bfloat16 inputs against the float32 reference on the same bf16-rounded values: atol 2e-2 on the
output (values are O(1); bf16 keeps ~3 significant digits; observed 7e-3) and 2e-2 of the largest gradient
entry (observed <= 5e-3).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.attention_reference import MASK_VALUE, attention_blockwise, attention_forward_with_lse, attention_naive


def _inputs(seed, b, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, s, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32).astype(dtype)
    dout = jax.random.normal(kd, (b, s, hq, d), jnp.float32)
    return q, k, v, dout


def _packed_segments(b, s, seed, pad_tail):
    """Per row: 2-3 documents of random lengths (crossing block boundaries), then `pad_tail` padding tokens."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, s), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(5, s - pad_tail - 5), size=2, replace=False))
        seg[row, :cuts[0]] = 1
        seg[row, cuts[0]:cuts[1]] = 2
        seg[row, cuts[1]:s - pad_tail] = 3 if row % 2 else 2   # second row: three documents
    return jnp.asarray(seg)


def _lse_naive(q, k, causal, segment_ids):
    """log-sum-exp [B, Hq, S] of the masked, scaled scores, from the scores written out in full."""
    b, s, hq, d = q.shape
    k_full = jnp.repeat(k, hq // k.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_full, precision="highest") * d ** -0.5
    mask = jnp.ones((1, s, s), bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((s, s), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return jax.nn.logsumexp(jnp.where(mask[:, None], scores, MASK_VALUE), axis=-1)


@pytest.mark.parametrize("b,s,hq,hkv,d,causal,pad_tail,block", [
    (2, 200, 4, 4, 64, True, 7, 64),      # GQA 1, batch 2, packed + padding, ragged tail (200 = 3 x 64 + 8)
    (1, 256, 8, 2, 128, False, None, 64),  # GQA 4, head_dim 128, on the block grid, not causal
    (2, 136, 8, 1, 64, True, None, 32),    # GQA 8, causal, ragged tail, 5 blocks
    (2, 150, 4, 1, 64, False, 11, 32),     # GQA 4, not causal, packed + padding, ragged tail
])
def test_fp32_forward_lse_and_gradients_match_naive(b, s, hq, hkv, d, causal, pad_tail, block):
    q, k, v, dout = _inputs(s + hq, b, s, hq, hkv, d)
    seg = None if pad_tail is None else _packed_segments(b, s, s, pad_tail)

    def ours(q, k, v):
        return attention_blockwise(q, k, v, causal=causal, segment_ids=seg, block_size=block)

    def ref(q, k, v):
        return attention_naive(q, k, v, causal=causal, segment_ids=seg)

    out, vjp = jax.vjp(jax.jit(ours), q, k, v)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    chex.assert_trees_all_close(out, out_ref, atol=1e-5, rtol=1e-5)
    grads, grads_ref = vjp(dout), vjp_ref(dout)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert float(jnp.max(jnp.abs(g_ref))) > 0.1, name  # a gradient worth comparing
        chex.assert_trees_all_close(g, g_ref, atol=2e-5, rtol=2e-5, custom_message=name)

    out_lse, lse = jax.jit(lambda q, k, v: attention_forward_with_lse(
        q, k, v, causal=causal, segment_ids=seg, block_size=block))(q, k, v)
    chex.assert_trees_all_close(out_lse, out_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(lse, _lse_naive(q, k, causal, seg), atol=1e-5, rtol=1e-5)


def test_dispatch_xla_is_blockwise_and_matches_naive_at_default_blocks():
    """`kernels.flash_attention(implementation="xla")` with its default 512-row blocks: 600 tokens make two
    blocks (one partial), as in the model."""
    q, k, v, dout = _inputs(1, 1, 600, 2, 1, 64)
    seg = _packed_segments(1, 600, 2, 13)
    ours = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True, segment_ids=seg,
                                                           implementation="xla"))
    out, vjp = jax.vjp(ours, q, k, v)
    out_ref, vjp_ref = jax.vjp(lambda q, k, v: attention_naive(q, k, v, causal=True, segment_ids=seg), q, k, v)
    chex.assert_trees_all_close(out, out_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(vjp(dout), vjp_ref(dout), atol=2e-5, rtol=2e-5)


def test_bf16_against_fp32_naive():
    b, s, hq, hkv, d = 2, 160, 4, 1, 64
    q, k, v, dout = _inputs(7, b, s, hq, hkv, d, jnp.bfloat16)
    seg = _packed_segments(b, s, 8, 9)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda q, k, v: attention_blockwise(q, k, v, causal=True, segment_ids=seg, block_size=64),
                       q, k, v)
    out_ref, vjp_ref = jax.vjp(lambda q, k, v: attention_naive(q, k, v, causal=True, segment_ids=seg), *f32)
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(jnp.float32), out_ref, atol=2e-2, rtol=0)
    for name, g, g_ref in zip(("dq", "dk", "dv"), vjp(dout.astype(jnp.bfloat16)), vjp_ref(dout)):
        assert g.dtype == jnp.bfloat16, name
        scale = float(jnp.max(jnp.abs(g_ref)))
        chex.assert_trees_all_close(g.astype(jnp.float32) / scale, g_ref / scale, atol=2e-2, rtol=0,
                                    custom_message=name)


@pytest.mark.parametrize("b,s,hq,hkv,d,causal,pad_tail,block", [
    (2, 136, 8, 2, 64, True, 7, 32),       # GQA 4, causal, packed + padding, ragged tail, 5 blocks
    (1, 100, 3, 1, 32, False, None, 32),   # GQA 3, not causal, ragged tail
])
def test_blockwise_and_naive_match_the_float64_oracle(b, s, hq, hkv, d, causal, pad_tail, block):
    """Both pure-JAX references (which share `_mask`) against the float64 NumPy oracle written from the
    definition (tests/numpy_oracle.py): output, log-sum-exp and gradients. A mask mistake made in `_mask`
    (e.g. `q_pos > k_pos`, a token not seeing itself) fails this test, though the other tests here would not."""
    import numpy_oracle

    q, k, v, dout = _inputs(s + 3 * hq, b, s, hq, hkv, d)
    seg = None if pad_tail is None else _packed_segments(b, s, s + 1, pad_tail)
    blockwise = jax.jit(lambda q, k, v: attention_blockwise(q, k, v, causal=causal, segment_ids=seg,
                                                            block_size=block))
    naive = jax.jit(lambda q, k, v: attention_naive(q, k, v, causal=causal, segment_ids=seg))
    for fn in (blockwise, naive):
        numpy_oracle.assert_attention_close(fn, q, k, v, dout, causal=causal, segment_ids=seg, out_atol=1e-5,
                                            grad_rtol=1e-5)
    _, lse = attention_forward_with_lse(q, k, v, causal=causal, segment_ids=seg, block_size=block)
    _, lse_want = numpy_oracle.attention(q, k, v, causal=causal, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(lse), lse_want, atol=1e-5, rtol=1e-6)

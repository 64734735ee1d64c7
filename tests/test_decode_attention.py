"""Decode attention: the split-K Pallas kernel (interpret mode) against the reference and against full attention.

Full attention over the valid cache prefix is the independent check: for each sequence, the cache's first
`length` slots are a whole sequence, the T new queries are its last T tokens, and `attention_naive` (causal,
the rest of the cache marked as padding) over that sequence gives the expected rows.
Tolerances: float32 kernel vs float32 references atol = rtol = 1e-5 (observed ~3e-7); bfloat16 inputs vs the
float32 reference atol 2e-2 (one bf16 rounding of the inputs and of the output, values of magnitude < 1).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for

import kernels
from kernels import attention_naive, decode_attention_reference
from kernels.decode_attention import DecodeAttentionError, decode_attention, decode_attention_pallas
from kernels.pallas_compat import tpu_target

# Interpret mode on CPU; compiled on the device under PHI4_KERNEL_TESTS_ON_DEVICE=1 (bench/gpu_suite.py).
INTERPRET = interpret_for("any")


def _inputs(seed, b, t, hq, hkv, d, cache_len):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, t, hq, d))
    k_cache = jax.random.normal(kk, (b, cache_len, hkv, d))
    v_cache = jax.random.normal(kv, (b, cache_len, hkv, d))
    return q, k_cache, v_cache


def _full_attention_rows(q, k_cache, v_cache, lengths, seed):
    """The last T rows of causal attention over each sequence's valid prefix.

    One batched `attention_naive` call over the whole cache: the other queries are random, and segment ids
    (1 for the valid prefix, 0 after it) keep each sequence's rows on its own prefix.
    """
    b, t, hq, d = q.shape
    cache_len = k_cache.shape[1]
    q_full = jax.random.normal(jax.random.PRNGKey(seed), (b, cache_len, hq, d))
    rows = jnp.asarray(lengths)[:, None] - t + jnp.arange(t)[None, :]            # [B, T]
    q_full = q_full.at[jnp.arange(b)[:, None], rows].set(q)
    segment_ids = (jnp.arange(cache_len)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
    out = jax.jit(attention_naive)(q_full, k_cache, v_cache, segment_ids=segment_ids)
    return out[jnp.arange(b)[:, None], rows]


@pytest.mark.parametrize(
    "t,hq,hkv,d,lengths,block_k,num_splits",
    [
        (1, 4, 1, 128, (1, 77, 256), 32, 4),    # GQA 4, plain decoding; lengths: 1, mid-block, full cache
        (3, 8, 1, 64, (3, 130, 200), 64, 2),    # GQA 8, three new tokens (causal among them)
        (2, 2, 2, 64, (64, 5, 129), 64, 8),     # GQA 1, lengths on and off the chunk boundaries
    ],
)
def test_kernel_matches_reference_and_full_attention(t, hq, hkv, d, lengths, block_k, num_splits):
    lengths = jnp.asarray(lengths, jnp.int32)
    q, k_cache, v_cache = _inputs(0, len(lengths), t, hq, hkv, d, 256)
    out = decode_attention_pallas(q, k_cache, v_cache, lengths, interpret=INTERPRET, block_k=block_k,
                                  num_splits=num_splits)
    chex.assert_trees_all_close(out, decode_attention_reference(q, k_cache, v_cache, lengths),
                                atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out, _full_attention_rows(q, k_cache, v_cache, lengths, 10), atol=1e-5, rtol=1e-5)


class DispatchTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_dispatch_pallas_bf16(self):
        q, k_cache, v_cache = _inputs(1, 2, 1, 4, 1, 128, 128)
        lengths = jnp.asarray([17, 128], jnp.int32)
        bf = [x.astype(jnp.bfloat16) for x in (q, k_cache, v_cache)]
        fn = self.variant(lambda q, kc, vc, lengths: kernels.decode_attention(
            q, kc, vc, lengths, implementation="pallas", interpret=INTERPRET))
        out = fn(*bf, lengths)
        assert out.dtype == jnp.bfloat16
        chex.assert_trees_all_close(out.astype(jnp.float32),
                                    decode_attention_reference(q, k_cache, v_cache, lengths), atol=2e-2, rtol=0)


def test_default_on_cpu_is_the_reference():
    q, k_cache, v_cache = _inputs(2, 1, 1, 2, 1, 64, 32)
    lengths = jnp.asarray([9], jnp.int32)
    chex.assert_trees_all_equal(decode_attention(q, k_cache, v_cache, lengths),
                                decode_attention_reference(q, k_cache, v_cache, lengths))


@pytest.mark.parametrize(
    "q_shape,cache_shape,lengths,kwargs,match",
    [
        ((1, 1, 3, 64), (1, 32, 2, 64), (4,), {}, "multiple of cache kv heads"),
        ((1, 1, 2, 64), (1, 32, 2, 64), (4, 4), {}, "lengths must be integer \\[batch\\]"),
        ((1, 1, 2, 64), (1, 32, 2, 64), (4,), {"implementation": "cuda"}, "unknown decode attention"),
    ],
)
def test_bad_inputs_are_refused_clearly(q_shape, cache_shape, lengths, kwargs, match):
    cache = jnp.zeros(cache_shape)
    with pytest.raises(DecodeAttentionError, match=match):
        decode_attention(jnp.zeros(q_shape), cache, cache, jnp.asarray(lengths, jnp.int32), **kwargs)


def test_cache_not_a_multiple_of_block_is_refused():
    q, k_cache, v_cache = _inputs(3, 1, 1, 2, 1, 64, 100)
    with pytest.raises(DecodeAttentionError, match="multiple of block_k"):
        decode_attention_pallas(q, k_cache, v_cache, jnp.asarray([50], jnp.int32), interpret=INTERPRET, block_k=64)


def test_kernel_lowers_for_a_real_tpu_and_refuses_narrow_heads_there():
    """Pallas' TPU lowering (block-shape rules included) from this CPU host; Mosaic's own passes need a TPU."""
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

    def lower(d):
        q = jax.ShapeDtypeStruct((2, 1, 8, d), jnp.bfloat16)
        cache = jax.ShapeDtypeStruct((2, 4096, 2, d), jnp.bfloat16)
        fn = jax.jit(lambda q, kc, vc, n: decode_attention(q, kc, vc, n, implementation="pallas"))
        with tpu_target():
            return jax.export.export(fn, platforms=["tpu"])(q, cache, cache, lengths).mlir_module()

    assert "decode_attention_split_k" in lower(128)
    with pytest.raises(DecodeAttentionError, match="head_dim a multiple of 128"):
        lower(64)


def test_kernel_and_reference_match_the_float64_oracle():
    """The split-K kernel and `decode_attention_reference` against the float64 NumPy oracle (tests/numpy_oracle.py):
    query t of row b sits at position lengths[b] - T + t and sees cache slots up to it. GQA 4, three new tokens,
    lengths inside, on and at the end of the chunks. Letting a query see one slot past its position (or the
    cache slots past `lengths`) fails this test."""
    import numpy_oracle

    lengths = jnp.asarray([3, 64, 101, 256], jnp.int32)
    t = 3
    q, k_cache, v_cache = _inputs(5, 4, t, 8, 2, 64, 256)
    want, _ = numpy_oracle.attention(q, k_cache, v_cache, causal=True, q_offset=np.asarray(lengths) - t,
                                     kv_len=np.asarray(lengths))
    out = decode_attention_pallas(q, k_cache, v_cache, lengths, interpret=INTERPRET, block_k=32, num_splits=4)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decode_attention_reference(q, k_cache, v_cache, lengths)), want,
                               atol=1e-5, rtol=0)

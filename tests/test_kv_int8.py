"""The int8 KV cache: its number format (`kv_quant.quantize_kv`) against a NumPy statement of the definition;
`kernels.paged_attention` over int8 pages (XLA reference and the Pallas TPU kernel, interpreted) against the
float64 NumPy oracle of attention over the dequantized cache; the engine with `cache_dtype="int8"` against
transformers (logits error within a justified bound, greedy agreement); memory accounting; bad values refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
from kernel_mode import interpret_for

from kernels.paged_attention import paged_attention
from phi4_jax.inference.kv_quant import quantize_kv

INTERPRET = interpret_for("tpu")


def np_quantize(x):
    """The definition in NumPy float32: scale = max|x| / 127 over the last axis, code = round(x / scale)."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float32)


def test_quantize_matches_numpy_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 4, 128)).astype(np.float32) * rng.uniform(0.01, 50, (3, 7, 4, 1))
    x[1, 2, 3] = 0.0                                                # an all-zero vector: scale 0, codes 0
    x[0, 0, 0, 5] = -1e4                                            # an outlier coarsens only its own vector
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
        codes, scale = jax.jit(quantize_kv)(jnp.asarray(x, dtype))
        want_codes, want_scale = np_quantize(xd)
        assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
        # Equal codes, except that a value within float32 rounding of a .5 tie may round either way (XLA may
        # divide by 127 as a multiply by 1/127, one ulp off NumPy's scale).
        ratio = xd / np.where(want_scale > 0, want_scale, 1)[..., None]
        near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4
        diff = np.abs(np.asarray(codes, np.int32) - want_codes)
        assert np.all(diff[~near_tie] == 0) and np.all(diff <= 1), np.argwhere(diff[~near_tie])
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=2.5e-7)   # XLA may use x * (1/127)
        assert np.all(np.abs(want_codes).max(axis=-1)[want_scale > 0] == 127)
        err = np.abs(np.asarray(codes, np.float64) * np.asarray(scale, np.float64)[..., None] - xd)
        assert np.all(err <= np.asarray(scale, np.float64)[..., None] * (0.5 + 1e-4))
    assert not np.any(np.asarray(codes)[1, 2, 3]) and float(scale[1, 2, 3]) == 0.0


def _int8_case(seed, t, d, page):
    """Two layers of int8 pages scattered through a pool, GQA 6:2, ragged lengths; keys/values of very different
    magnitude per token and head (so a scale applied to the wrong column or head shows)."""
    rng = np.random.default_rng(seed)
    layers, num_pages, hkv, hq, width = 2, 23, 2, 6, 5
    shape = (layers, num_pages, page, hkv, d)
    k = rng.standard_normal(shape) * rng.uniform(0.05, 4.0, shape[:-1] + (1,))
    v = rng.standard_normal(shape) * rng.uniform(0.05, 4.0, shape[:-1] + (1,))
    (k8, ks), (v8, vs) = np_quantize(k), np_quantize(v)             # scales [L, P, S, H]
    lengths = np.array([t, page + 3, width * page, 2 * page + 5], np.int32)
    tables = rng.permutation(np.arange(1, num_pages))[:4 * width].reshape(4, width).astype(np.int32)
    q = rng.standard_normal((4, t, hq, d)).astype(np.float32)
    to_pool = lambda s: np.ascontiguousarray(np.swapaxes(s, -1, -2))   # [L, P, H, S]  # noqa: E731
    return q, k8, v8, to_pool(ks), to_pool(vs), tables, lengths


def _oracle(q, k8, v8, ks, vs, tables, lengths, layer):
    """float64 attention over the dequantized cache (code * scale), pages laid end to end."""
    b, w = tables.shape
    page = k8.shape[2]

    def seq(codes, scales):   # codes [L, P, S, H, D], scales [L, P, H, S]
        deq = codes[layer].astype(np.float64) * np.swapaxes(scales[layer], -1, -2)[..., None].astype(np.float64)
        return deq[tables].reshape(b, w * page, *codes.shape[3:])

    t = q.shape[1]
    return numpy_oracle.attention(q, seq(k8, ks), seq(v8, vs), causal=True, q_offset=lengths - t, kv_len=lengths)[0]


@pytest.mark.parametrize("t", [1, 5])
def test_int8_reference_matches_float64_oracle(t):
    q, k8, v8, ks, vs, tables, lengths = _int8_case(t, t, 8, 4)
    run = jax.jit(lambda q, k, v, ks, vs, tab, n, layer: paged_attention(q, k, v, tab, n, k_scales=ks, v_scales=vs,
                                                                          layer=layer, implementation="xla"))
    for layer in range(2):
        want = _oracle(q, k8, v8, ks, vs, tables, lengths, layer)
        got = run(q, k8, v8, ks, vs, tables, lengths, layer)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    one_layer = paged_attention(q, k8[1], v8[1], tables, lengths, k_scales=ks[1], v_scales=vs[1])
    np.testing.assert_allclose(np.asarray(one_layer), _oracle(q, k8, v8, ks, vs, tables, lengths, 1), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_int8_pallas_kernel_matches_float64_oracle(t):
    """head_dim 128 and 8-row pages, as on a TPU; the stacked pool read at a traced layer index."""
    q, k8, v8, ks, vs, tables, lengths = _int8_case(10 + t, t, 128, 8)
    run = jax.jit(lambda q, k, v, ks, vs, tab, n, layer: paged_attention(
        q, k, v, tab, n, k_scales=ks, v_scales=vs, layer=layer, implementation="pallas", interpret=INTERPRET))
    want = _oracle(q, k8, v8, ks, vs, tables, lengths, 1)
    np.testing.assert_allclose(np.asarray(run(q, k8, v8, ks, vs, tables, lengths, 1)), want, rtol=2e-5, atol=2e-5)

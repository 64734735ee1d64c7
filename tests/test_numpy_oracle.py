"""The float64 NumPy oracle (tests/numpy_oracle.py) checked on its own: hand-computed values, and its
analytic attention gradients against float64 central finite differences. NumPy only, well under a second."""

import numpy as np
import numpy_oracle
import pytest


def test_attention_small_case_by_hand():
    """Two tokens, one head, head_dim 1, scale 1: token 0 sees only itself; token 1 weighs v by
    softmax(q1 k0, q1 k1). A wrong causal direction (j >= i) or a missing GQA/segment mask fails this test."""
    q = np.array([2.0, 0.5]).reshape(1, 2, 1, 1)
    k = np.array([1.0, -1.0]).reshape(1, 2, 1, 1)
    v = np.array([3.0, 7.0]).reshape(1, 2, 1, 1)
    out, lse = numpy_oracle.attention(q, k, v, causal=True, sm_scale=1.0)
    w = np.exp([0.5, -0.5]) / np.exp([0.5, -0.5]).sum()
    np.testing.assert_allclose(out[0, :, 0, 0], [3.0, w @ [3.0, 7.0]], rtol=1e-15)
    np.testing.assert_allclose(lse[0, 0], [2.0, np.log(np.exp(0.5) + np.exp(-0.5))], rtol=1e-15)
    # Segments: token 1 in another document sees only itself even without the causal mask.
    out, _ = numpy_oracle.attention(q, k, v, causal=False, segment_ids=np.array([[1, 2]]), sm_scale=1.0)
    np.testing.assert_allclose(out[0, :, 0, 0], [3.0, 7.0], rtol=1e-15)
    # GQA: query head 1 of 2 uses the single kv head, so both heads see the same keys and values.
    q2 = np.concatenate([q, 2 * q], axis=2)
    out, _ = numpy_oracle.attention(q2, k, v, causal=True, sm_scale=1.0)
    w2 = np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
    np.testing.assert_allclose(out[0, 1], [[w @ [3.0, 7.0]], [w2 @ [3.0, 7.0]]], rtol=1e-15)


@pytest.mark.parametrize("causal, segmented, chunk", [(True, False, False), (False, True, False),
                                                     (True, True, False), (True, True, True)])
def test_attention_gradients_match_finite_differences(causal, segmented, chunk):
    """Analytic dq, dk, dv against float64 central differences of sum(out * dout) on a GQA-2 tiny shape.
    Dropping the rowsum(dO * O) term in dS, or not summing dk/dv over the shared query heads, fails this test.
    `chunk`: the queries are tokens 2..4 of the 5 keys (q_offset 2, their own segment ids), as one context shard
    sees them; ignoring the offset in the gradient's mask fails it."""
    rng = np.random.default_rng(0)
    b, s, hq, hkv, d = 2, 5, 4, 2, 3
    q, k, v = (rng.standard_normal((b, s, h, d)) for h in (hq, hkv, hkv))
    dout = rng.standard_normal((b, s, hq, d))
    seg = np.array([[1, 1, 2, 2, 2], [1, 2, 2, 3, 3]]) if segmented else None
    kw = {"causal": causal, "segment_ids": seg}
    if chunk:
        q, dout = q[:, 2:], dout[:, 2:]
        kw = {"causal": causal, "segment_ids": seg[:, 2:], "kv_segment_ids": seg, "q_offset": 2}

    def f(q, k, v):
        return np.sum(numpy_oracle.attention(q, k, v, **kw)[0] * dout)

    analytic = numpy_oracle.attention_vjp(q, k, v, dout, **kw)
    eps = 1e-6
    for which, g in enumerate(analytic):
        args = [q, k, v]
        numeric = np.zeros_like(args[which])
        for idx in np.ndindex(numeric.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            numeric[idx] = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(g, numeric, atol=1e-8, rtol=1e-6, err_msg=("dq", "dk", "dv")[which])


def test_rope_by_hand_and_inverse():
    """head_dim 2 has one frequency (1): the pair rotates by the position in radians; head_dim 4 at theta 100
    has frequencies 1 and 1/10 applied to (x0, x2) and (x1, x3). Pairing adjacent dims (GPT-J interleaved
    instead of NeoX rotate-half) or a sign flip in rotate_half fails this test."""
    x = np.array([0.3, -1.2]).reshape(1, 1, 1, 2)
    p = 5
    got = numpy_oracle.rope(x, np.array([[p]]), 10000.0)[0, 0, 0]
    np.testing.assert_allclose(got, [0.3 * np.cos(p) + 1.2 * np.sin(p), -1.2 * np.cos(p) + 0.3 * np.sin(p)],
                               rtol=1e-15)
    x4 = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    got = numpy_oracle.rope(x4, np.array([[p]]), 100.0)[0, 0, 0]
    a, c = p * 1.0, p * 0.1
    want = [1 * np.cos(a) - 3 * np.sin(a), 2 * np.cos(c) - 4 * np.sin(c),
            3 * np.cos(a) + 1 * np.sin(a), 4 * np.cos(c) + 2 * np.sin(c)]
    np.testing.assert_allclose(got, want, rtol=1e-14)
    y = np.random.default_rng(1).standard_normal((2, 3, 2, 8))
    pos = np.array([[0, 7, 16000], [3, 2, 1]])
    np.testing.assert_allclose(numpy_oracle.rope(numpy_oracle.rope(y, pos, 250000.0), pos, 250000.0,
                                                 inverse=True), y, atol=1e-12)
    np.testing.assert_array_equal(numpy_oracle.rope(y, np.zeros((2, 3), int), 250000.0)[:, 0], y[:, 0])

"""The Pallas RoPE kernels (single tensor and fused q+k) against the pure-JAX reference, values and gradients.

Run on CPU with `interpret=True`; compiled on the device under PHI4_KERNEL_TESTS_ON_DEVICE=1. Tolerances: float32 kernel vs float32 reference, both computing fp32 angles
from the same integer positions: atol = rtol = 1e-5 (observed ~5e-7). bfloat16: the kernel and the reference
both rotate in float32 and round once, so they agree within one bf16 ulp of values of magnitude <~4
(atol 3e-2, rtol 1e-2).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for

import kernels
from kernels import AttentionConfigError, apply_rope_reference
from kernels.pallas_compat import tpu_target
from kernels.rope_pallas import apply_rope_pallas, apply_rope_qk_pallas

# Interpret mode on CPU; compiled on the device under PHI4_KERNEL_TESTS_ON_DEVICE=1 (bench/gpu_suite.py).
INTERPRET = interpret_for("any")

THETA = 250000.0  # phi-4's base: at 16K positions, bf16 angles would be visibly wrong


def _positions(b, s, seed):
    """Packed documents restarting at 0, plus a decode-style offset in the second row, up to ~16K."""
    rng = np.random.default_rng(seed)
    pos = np.zeros((b, s), np.int32)
    for row in range(b):
        start = 0 if row == 0 else int(rng.integers(15000, 16000))
        restart = int(rng.integers(5, s - 5))
        pos[row, :restart] = start + np.arange(restart)
        pos[row, restart:] = np.arange(s - restart)
    return jnp.asarray(pos)


class RopeValuesTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference_fp32_through_dispatch(self):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 100, 3, 64))   # S off the 64-row block grid
        pos = _positions(2, 100, 1)
        # The reference runs in the same variant: at ~16K positions an angle is ~1.6e4 rad, whose fp32 ulp is
        # ~1e-3, and XLA's jitted pow for inv_freq can differ from the eager one by an ulp, so jit vs eager
        # legitimately differ by ~1e-3 there. Within one mode kernel and reference agree to rounding.
        fn = self.variant(lambda x, pos: (
            kernels.apply_rope(x, pos, theta=THETA, implementation="pallas", interpret=INTERPRET),
            apply_rope_reference(x, pos, theta=THETA)))
        out, ref = fn(x, pos)
        chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_matches_reference_bf16():
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 70, 2, 128)).astype(jnp.bfloat16)
    pos = _positions(1, 70, 3)
    out = apply_rope_pallas(x, pos, theta=THETA, interpret=INTERPRET, block_s=32)
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(jnp.float32), apply_rope_reference(x, pos, theta=THETA).astype(
        jnp.float32), atol=3e-2, rtol=1e-2)


def test_fused_qk_matches_reference_values_and_gradients():
    kq, kk = jax.random.split(jax.random.PRNGKey(4))
    q = jax.random.normal(kq, (2, 48, 4, 64))
    k = jax.random.normal(kk, (2, 48, 1, 64))                          # GQA: fewer k heads than q heads
    pos = _positions(2, 48, 5)

    def loss(rotate, q, k):
        rq, rk = rotate(q, k)
        return jnp.sum(jnp.sin(rq) * jnp.arange(64)) + jnp.sum(rk * rk * jnp.cos(jnp.arange(64)))

    def ours(q, k):
        return apply_rope_qk_pallas(q, k, pos, theta=THETA, interpret=INTERPRET, block_s=16)

    def ref(q, k):
        return apply_rope_reference(q, pos, theta=THETA), apply_rope_reference(k, pos, theta=THETA)

    chex.assert_trees_all_close(ours(q, k), ref(q, k), atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda q, k: loss(ours, q, k), argnums=(0, 1))(q, k)
    grads_ref = jax.grad(lambda q, k: loss(ref, q, k), argnums=(0, 1))(q, k)
    chex.assert_trees_all_close(grads, grads_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,positions,match",
    [
        ((1, 8, 2, 63), jnp.zeros((1, 8), jnp.int32), "head_dim must be even"),
        ((1, 8, 2, 64), jnp.zeros((1, 8), jnp.float32), "positions must be integer"),
        ((1, 8, 2, 64), jnp.zeros((1, 9), jnp.int32), "positions must be integer \\[batch, seq\\]"),
    ],
)
def test_bad_inputs_are_refused_clearly(shape, positions, match):
    with pytest.raises(AttentionConfigError, match=match):
        apply_rope_pallas(jnp.zeros(shape), positions, theta=THETA, interpret=INTERPRET)


def test_fused_qk_kernel_lowers_for_a_real_tpu():
    """Pallas' TPU lowering (pltpu.roll lane rotates, block-shape rules) from this CPU host."""
    q = jax.ShapeDtypeStruct((1, 1000, 40, 128), jnp.bfloat16)   # phi-4 heads, ragged length
    k = jax.ShapeDtypeStruct((1, 1000, 10, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

    def loss(q, k, pos):
        rq, rk = apply_rope_qk_pallas(q, k, pos, theta=THETA)
        return jnp.sum(rq.astype(jnp.float32)) + jnp.sum(rk.astype(jnp.float32))

    with tpu_target():
        module = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
                                   platforms=["tpu"])(q, k, pos).mlir_module()
    assert module.count("tpu_custom_call") == 2   # forward and backward rotation


def test_kernels_match_the_float64_rotate_half_oracle():
    """Both Pallas RoPE kernels and the pure-JAX reference against a float64 NumPy rotate-half written from the
    definition (tests/numpy_oracle.py), positions up to ~16K at theta 250000, and the fused kernel's gradient
    against the inverse rotation of the cotangent. Tolerance: the contract's float32 angles are off by a few
    ulps of the angle (~p * 2^-24 rad at position p, see `numpy_oracle.rope_angle_tolerance`); the wrong
    convention (interleaved pairs), a sign flip in rotate-half or the wrong frequency exponent is off by O(1).
    Swapping the halves of rotate-half (concat(x2, -x1)) fails this test."""
    import numpy_oracle

    kq, kk = jax.random.split(jax.random.PRNGKey(7))
    q = jax.random.normal(kq, (2, 48, 4, 64))
    k = jax.random.normal(kk, (2, 48, 2, 64))
    pos = _positions(2, 48, 9)
    tol = lambda x: numpy_oracle.rope_angle_tolerance(pos, x) + 1e-6
    want_q, want_k = (numpy_oracle.rope(x, pos, THETA) for x in (q, k))
    assert np.all(np.abs(np.asarray(apply_rope_pallas(q, pos, theta=THETA, interpret=INTERPRET, block_s=16))
                         - want_q) <= tol(q))
    assert np.all(np.abs(np.asarray(apply_rope_reference(q, pos, theta=THETA)) - want_q) <= tol(q))

    (rq, rk), vjp = jax.vjp(lambda q, k: apply_rope_qk_pallas(q, k, pos, theta=THETA, interpret=INTERPRET,
                                                              block_s=16), q, k)
    assert np.all(np.abs(np.asarray(rq) - want_q) <= tol(q)) and np.all(np.abs(np.asarray(rk) - want_k) <= tol(k))
    gq, gk = jax.random.normal(jax.random.PRNGKey(8), q.shape), jax.random.normal(jax.random.PRNGKey(9), k.shape)
    dq, dk = vjp((gq, gk))
    assert np.all(np.abs(np.asarray(dq) - numpy_oracle.rope(gq, pos, THETA, inverse=True)) <= tol(gq))
    assert np.all(np.abs(np.asarray(dk) - numpy_oracle.rope(gk, pos, THETA, inverse=True)) <= tol(gk))

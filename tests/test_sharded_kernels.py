"""The kernels on a mesh (kernels.sharded, kernels.context_parallel) against the single-device reference.

8 simulated CPU devices (tests/conftest.py), Pallas kernels in interpret mode (on a mesh the Mosaic TPU kernels
are interpreted as XLA ops, "hlo": kernels/sharded.py says why). Each case compares the sharded wrapper, forward
and gradients of a random cotangent, with `kernels.attention_naive` (after the XLA RoPE reference) on one device,
on packed documents whose segments cross the shard boundaries and RoPE positions that restart per document. With
pallas_tpu the traced program must contain the Pallas TPU kernels (forward, dq, dk/dv): under context parallelism
they are the per-shard attention, with each shard's query offset. Tolerances: float32 throughout, so 2e-5 (max
abs, outputs O(1)) for the XLA and Pallas TPU paths; the Pallas GPU kernel feeds its matmuls bf16 on purpose (see
kernels/flash_attention_gpu.py): 3e-2 relative.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_mode import interpret_for

import kernels
from kernels import mosaic_gpu_interpret
from kernels.context_parallel import attention_with_offset, zigzag_inverse, zigzag_order
from kernels.pallas_compat import HLO_INTERPRET, tpu_interpret_params
from kernels.rope_reference import apply_rope_reference
from phi4_jax.model import sharding

THETA = 10000.0
AXES = dict(batch_axes=("data", "fsdp"), seq_axes="context", q_head_axes="tensor", kv_head_axes="tensor")


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: run under tests/conftest.py")


def _inputs(b, s, hq, hkv, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32)
    w = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32)
    seg = np.ones((b, s), np.int32)
    cut = (3 * s) // 8 + 3          # documents straddle every shard boundary of 2, 4 and 8 shards
    seg[:, cut:] = 2
    seg[0, (3 * s) // 4 + 1:] = 3
    seg[-1, s - 5:] = 0             # padding tail
    start = np.zeros((b, s), np.int32)
    for i in range(b):
        for j in range(1, s):
            start[i, j] = start[i, j - 1] if seg[i, j] == seg[i, j - 1] else j
    pos = np.arange(s)[None] - start
    return q, k, v, w, jnp.asarray(seg), jnp.asarray(pos, jnp.int32)


def _reference(q, k, v, seg, pos):
    return kernels.attention_naive(apply_rope_reference(q, pos, theta=THETA),
                                   apply_rope_reference(k, pos, theta=THETA), v, segment_ids=seg)


def _value_and_grads(fn, q, k, v, w):
    out = fn(q, k, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    return out, grads


def _assert_close(got, want, tol, relative):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.max(jnp.abs(a - b)))
        scale = float(jnp.max(jnp.abs(b))) if relative else 1.0
        assert err <= tol * scale, (name, err, scale)


def test_attention_with_offset_matches_naive():
    q, k, v, w, seg, _ = _inputs(2, 64, 4, 2, 16)
    ref = kernels.attention_naive(q, k, v, segment_ids=seg)
    lo, hi = 21, 45                                  # a chunk that starts and ends inside blocks of 8
    fn = lambda q, k, v: attention_with_offset(      # noqa: E731
        q[:, lo:hi], k, v, q_start=lo, q_segment_ids=seg[:, lo:hi], kv_segment_ids=seg, block_size=8)
    got = _value_and_grads(fn, q, k, v, w[:, lo:hi])
    want = _value_and_grads(lambda q, k, v: kernels.attention_naive(q, k, v, segment_ids=seg)[:, lo:hi],
                            q, k, v, w[:, lo:hi])
    np.testing.assert_allclose(got[0], ref[:, lo:hi], atol=2e-6)
    _assert_close((got[0], *got[1]), (want[0], *want[1]), 2e-5, relative=False)


def test_zigzag_order_balances_and_inverts():
    order = zigzag_order(16, 4)   # chunks of 2: shard r holds chunks r and 7 - r
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert (order[zigzag_inverse(16, 4)] == np.arange(16)).all()
    with pytest.raises(ValueError, match="divisible by 2 x context shards"):
        zigzag_order(12, 4)


CASES = [
    # mesh, implementation, seq_layout, (b, s, hq, hkv, d)
    ("data=2,context=2,tensor=2", "xla", "contiguous", (2, 64, 4, 2, 16)),
    ("fsdp=2,context=4", "xla", "zigzag", (2, 64, 4, 2, 16)),
    ("context=8", "xla", "contiguous", (1, 64, 2, 1, 16)),
    ("fsdp=4,tensor=2", "pallas_tpu", "contiguous", (4, 128, 4, 2, 128)),     # kernel per shard, fused RoPE
    # CP with the Pallas TPU kernel per shard (query offset; Pallas RoPE kernel before the gather): two chunks of
    # 32 queries per shard; then one chunk of 128 per shard against 2 kv blocks, shard 0 skipping the second.
    ("data=2,context=2,tensor=2", "pallas_tpu", "zigzag", (2, 128, 4, 2, 128)),
    ("fsdp=4,context=2", "pallas_tpu", "contiguous", (4, 256, 2, 1, 128)),
]


@pytest.mark.parametrize("mesh_spec, impl, layout, shape", CASES)
def test_sharded_attention_matches_single_device(mesh_spec, impl, layout, shape):
    _need_8()
    mesh = sharding.build_mesh(mesh_spec)
    n_ctx = mesh.shape["context"]
    q, k, v, w, seg, pos = _inputs(*shape)
    perm = zigzag_order(shape[1], n_ctx) if layout == "zigzag" else np.arange(shape[1])
    inv = np.argsort(perm)
    interpret = interpret_for("tpu") if impl == "pallas_tpu" else False

    @jax.jit
    def sharded(q, k, v):   # the zigzag layout is the data pipeline's permutation, undone afterwards
        out = kernels.sharded_flash_attention(
            q[:, perm], k[:, perm], v[:, perm], mesh=mesh, segment_ids=seg[:, perm], positions=pos[:, perm],
            rope_theta=THETA, implementation=impl, interpret=interpret, seq_layout=layout, block_size=16, **AXES)
        return out[:, inv]

    got = _value_and_grads(sharded, q, k, v, w)
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, pos), q, k, v, w)
    _assert_close((got[0], *got[1]), (want[0], *want[1]), 2e-5, relative=False)
    if impl == "pallas_tpu":
        # The per-shard attention really is the Pallas TPU kernel (forward, dq, dk/dv), with the query offset
        # under context parallelism, not an XLA fallback.
        kernels_called = _pallas_kernel_names(jax.grad(lambda q, k, v: jnp.sum(sharded(q, k, v) * w),
                                                       argnums=(0, 1, 2)), q, k, v)
        assert {"flash_attention_tpu_fwd", "flash_attention_tpu_dq", "flash_attention_tpu_dkv"} <= kernels_called, \
            kernels_called


def _pallas_kernel_names(fn, *args):
    """Names of the `pallas_call`s in fn's traced program, nested jaxprs (jit, shard_map, custom_vjp) included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                names.add(str(eqn.params["name"]))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _python_callbacks(fn, *args) -> int:
    """How many Python-callback custom calls fn's lowered program (StableHLO text) contains."""
    return len(re.findall(r"python_cpu_callback", jax.jit(fn).lower(*args).as_text()))


def test_interpreted_tpu_kernels_on_a_mesh_have_no_cross_device_callbacks():
    # The TPU interpreter runs a kernel as Python callbacks that wait for every device; XLA:CPU may run an unrelated
    # collective first on one device, and the program deadlocks (kernels/sharded.py). On a mesh, interpret=True
    # therefore lowers the same kernels as XLA ops ("hlo"): no callbacks, for flash attention (forward and
    # backward) and the paged kernel. An explicit InterpretParams still gets the TPU interpreter, as does a
    # one-device call.
    _need_8()
    mesh = sharding.build_mesh("data=2,context=2,tensor=2")
    q, k, v, w, seg, pos = _inputs(4, 64, 4, 2, 128)

    def flash(interpret, mesh=mesh):
        return lambda q, k, v: jnp.sum(w * kernels.sharded_flash_attention(
            q, k, v, mesh=mesh, segment_ids=seg, positions=pos, rope_theta=THETA, implementation="pallas_tpu",
            interpret=interpret, block_size=16, **AXES))

    grads = lambda f: jax.grad(f, argnums=(0, 1, 2))  # noqa: E731
    assert _python_callbacks(grads(flash(True)), q, k, v) == 0
    assert "flash_attention_tpu_dkv" in _pallas_kernel_names(grads(flash(True)), q, k, v)
    assert _python_callbacks(grads(flash(pltpu.InterpretParams())), q, k, v) > 0
    assert _python_callbacks(flash(True, mesh=None), q, k, v) > 0

    pages = jax.random.normal(jax.random.key(3), (6, 16, 2, 128), jnp.float32)
    tables = jnp.array([[0, 1, 2], [3, 4, 5], [1, 0, 2], [5, 4, 3]], jnp.int32)
    lengths = jnp.array([40, 3, 17, 48], jnp.int32)

    def paged(interpret):
        return lambda q: kernels.sharded_paged_attention(
            q, pages, pages, tables, lengths, mesh=mesh, batch_axes=("data", "fsdp"), q_head_axes="tensor",
            kv_head_axes="tensor", interpret=interpret)

    q1 = q[:, :1]
    assert _python_callbacks(paged(True), q1) == 0
    assert _python_callbacks(paged(pltpu.InterpretParams()), q1) > 0
    np.testing.assert_allclose(jax.jit(paged(True))(q1),
                               kernels.paged_attention_reference(q1, pages, pages, tables, lengths), atol=2e-5)


def test_hlo_interpret_mode_names():
    assert tpu_interpret_params(HLO_INTERPRET) is True
    assert isinstance(tpu_interpret_params(True), pltpu.InterpretParams)
    with pytest.raises(kernels.AttentionConfigError, match="'tpu'.*a bool, a pltpu.InterpretParams or 'hlo'"):
        tpu_interpret_params("tpu")


@pytest.mark.skip(reason="too slow for CI: the Mosaic GPU interpreter on 4 shards, forward and backward, ran past "
                         "10 minutes on a 2-core machine (unverified there; run it on a GPU or a bigger CPU)")
@pytest.mark.skipif(interpret_for("gpu") and not mosaic_gpu_interpret.is_available(),
                    reason="this JAX has no Mosaic GPU interpret mode")
def test_sharded_pallas_gpu_attention_on_batch_and_heads():
    _need_8()
    mesh = sharding.build_mesh("data=2,fsdp=2,tensor=2")
    q, k, v, w, seg, pos = _inputs(4, 128, 4, 2, 64)
    fn = jax.jit(lambda q, k, v: kernels.sharded_flash_attention(
        q, k, v, mesh=mesh, segment_ids=seg, positions=pos, rope_theta=THETA, implementation="pallas_gpu",
        interpret=interpret_for("gpu"), **AXES))
    got = _value_and_grads(fn, q, k, v, w)
    want = _value_and_grads(lambda q, k, v: _reference(q, k, v, seg, pos), q, k, v, w)
    _assert_close((got[0], *got[1]), (want[0], *want[1]), 3e-2, relative=True)


def test_sharded_rope_kernel_matches_reference():
    _need_8()
    mesh = sharding.build_mesh("fsdp=2,context=2,tensor=2")
    x = jax.random.normal(jax.random.key(1), (2, 64, 4, 128), jnp.float32)
    _, _, _, _, _, pos = _inputs(2, 64, 1, 1, 8)
    out = jax.jit(lambda x: kernels.sharded_apply_rope(
        x, pos, mesh=mesh, batch_axes=("data", "fsdp"), seq_axes="context", head_axes="tensor", theta=THETA,
        implementation="pallas", interpret=interpret_for("any")))(x)
    np.testing.assert_allclose(out, apply_rope_reference(x, pos, theta=THETA), atol=1e-5)


def test_sharded_decode_attention_matches_reference():
    _need_8()
    mesh = sharding.build_mesh("data=2,fsdp=2,tensor=2")
    b, t, hq, hkv, c, d = 4, 2, 4, 2, 64, 128
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32)
    kc = jax.random.normal(ks[1], (b, c, hkv, d), jnp.float32)
    vc = jax.random.normal(ks[2], (b, c, hkv, d), jnp.float32)
    lengths = jnp.array([5, 64, 17, 33], jnp.int32)
    out = jax.jit(lambda q, kc, vc, n: kernels.sharded_decode_attention(
        q, kc, vc, n, mesh=mesh, batch_axes=("data", "fsdp"), q_head_axes="tensor", kv_head_axes="tensor",
        implementation="pallas", interpret=interpret_for("any")))(q, kc, vc, lengths)
    want = kernels.decode_attention_reference(q, kc, vc, lengths)
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_trivial_mesh_is_a_plain_call():
    q, k, v, _, seg, _ = _inputs(2, 32, 4, 2, 16)
    direct = kernels.flash_attention(q, k, v, segment_ids=seg, implementation="xla")
    one = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    for mesh in (None, one):
        out = kernels.sharded_flash_attention(q, k, v, mesh=mesh, segment_ids=seg, implementation="xla", **AXES)
        np.testing.assert_array_equal(out, direct)


@pytest.mark.parametrize("mesh_spec, shape, kwargs, message", [
    ("fsdp=2,tensor=4", (2, 64, 4, 2, 16), {}, r"'tensor' of size 4 .* kv heads=2"),
    ("fsdp=4,context=2", (4, 63, 4, 2, 16), {}, r"'context' of size 2 .* sequence length=63"),
    ("fsdp=2,context=4", (2, 36, 4, 2, 16), {"seq_layout": "zigzag"}, r"zigzag chunks"),
    ("data=8", (4, 64, 4, 2, 16), {}, r"of size 8 .* batch=4"),
    ("fsdp=4,tensor=2", (4, 64, 4, 2, 16), {"kv_head_axes": None}, r"same mesh axes"),
    ("fsdp=4,tensor=2", (4, 64, 4, 2, 16), {"seq_axes": "nope"}, r"no axis 'nope'"),
])
def test_unusable_meshes_raise_clear_errors(mesh_spec, shape, kwargs, message):
    _need_8()
    mesh = sharding.build_mesh(mesh_spec)
    q, k, v, _, _, _ = _inputs(*shape)
    with pytest.raises(kernels.AttentionConfigError, match=message):
        kernels.sharded_flash_attention(q, k, v, mesh=mesh, implementation="xla", **{**AXES, **kwargs})

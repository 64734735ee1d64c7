"""`kernels.flash_attention` / `kernels.apply_rope` dispatch: the default per backend, and the clear errors
for inputs or options an implementation cannot handle (the [kernels] issue's dispatch item).

The kernels themselves are tested against the references in the test_flash_attention_* / test_rope_kernel /
test_attention_reference files; here only the choice and the refusals, so nothing large is compiled.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import AttentionConfigError, default_implementation


def _qkv(hq=4, hkv=2, s=16, d=32, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(kq, (2, s, hq, d)).astype(dtype), jax.random.normal(kk, (2, s, hkv, d)).astype(dtype),
            jax.random.normal(kv, (2, s, hkv, d)).astype(dtype))


@pytest.mark.parametrize("platform, kind, expected", [
    ("tpu", "TPU v5p", "pallas_tpu"),
    ("gpu", "NVIDIA H100 80GB HBM3", "pallas_gpu"),
    ("gpu", "NVIDIA H200", "pallas_gpu"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "xla"),   # no wgmma / TMA: the Hopper kernel cannot run there
    ("cpu", "cpu", "xla"),
])
def test_default_implementation_per_backend(monkeypatch, platform, kind, expected):
    fake = SimpleNamespace(platform=platform, device_kind=kind)
    monkeypatch.setattr(jax, "devices", lambda backend=None: [fake])
    assert default_implementation() == expected


def test_default_on_cpu_is_the_xla_reference():
    assert jax.devices()[0].platform == "cpu" and default_implementation() == "xla"
    q, k, v = _qkv()
    seg = jnp.asarray(np.repeat([[1, 1, 2, 0]], 4, axis=1).repeat(2, axis=0).astype(np.int32))
    np.testing.assert_array_equal(kernels.flash_attention(q, k, v, segment_ids=seg),
                                  kernels.flash_attention(q, k, v, segment_ids=seg, implementation="xla"))


def test_cudnn_refuses_what_it_cannot_do():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    seg = jnp.ones((2, 16), jnp.int32)
    with pytest.raises(AttentionConfigError, match="'cudnn' does not support segment_ids"):
        kernels.flash_attention(q, k, v, segment_ids=seg, implementation="cudnn")
    with pytest.raises(AttentionConfigError, match="'cudnn' needs bfloat16 or float16 inputs, got float32"):
        kernels.flash_attention(*_qkv(), implementation="cudnn")


@pytest.mark.parametrize("change, kwargs, match", [
    ({}, {"implementation": "triton"}, "unknown attention implementation 'triton'"),
    ({"hq": 3}, {}, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    ({"q_shape": (2, 16, 4)}, {}, r"q must be \[batch, seq, heads, head_dim\]"),
    ({"k_seq": 15}, {}, "must agree in batch, sequence length and head_dim"),
    ({"dtype": jnp.int32}, {}, "dtype int32 is not supported"),
    ({"v_dtype": jnp.bfloat16}, {}, "q, k, v dtypes differ"),
    ({}, {"segment_ids": jnp.ones((2, 15), jnp.int32)}, r"segment_ids must be \[batch, seq\] = \(2, 16\)"),
    ({}, {"segment_ids": jnp.ones((2, 16), jnp.float32)}, "segment_ids must be integers"),
])
def test_flash_attention_refuses_bad_inputs_clearly(change, kwargs, match):
    q, k, v = _qkv(hq=change.get("hq", 4))
    if "q_shape" in change:
        q = jnp.zeros(change["q_shape"])
    if "k_seq" in change:
        k, v = k[:, :change["k_seq"]], v[:, :change["k_seq"]]
    if "dtype" in change:
        q, k, v = (x.astype(change["dtype"]) for x in (q, k, v))
    if "v_dtype" in change:
        v = v.astype(change["v_dtype"])
    with pytest.raises(AttentionConfigError, match=match):
        kernels.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shape, positions, kwargs, match", [
    ((1, 8, 2, 64), np.zeros((1, 8), np.int32), {"implementation": "triton"}, "unknown RoPE implementation"),
    ((1, 8, 2, 63), np.zeros((1, 8), np.int32), {}, "head_dim must be even"),
    ((1, 8, 64), np.zeros((1, 8), np.int32), {}, r"x must be \[batch, seq, heads, head_dim\]"),
    ((1, 8, 2, 64), np.zeros((1, 9), np.int32), {}, r"positions must be \[batch, seq\] = \(1, 8\)"),
    ((1, 8, 2, 64), np.zeros((1, 8), np.float32), {}, "positions must be integers"),
])
def test_apply_rope_refuses_bad_inputs_clearly(shape, positions, kwargs, match):
    with pytest.raises(AttentionConfigError, match=match):
        kernels.apply_rope(jnp.zeros(shape), jnp.asarray(positions), theta=10000.0, **kwargs)

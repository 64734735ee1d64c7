"""`kernels.flash_attention` / `kernels.apply_rope` dispatch: the default per backend, and the clear errors
for inputs or options an implementation cannot handle (the [kernels] issue's dispatch item).

The kernels themselves are tested against the references in the test_flash_attention_* / test_rope_kernel /
test_attention_reference files; here only the choice and the refusals, so nothing large is compiled.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import AttentionConfigError, HardwareRun, default_implementation, dispatch
from kernels.attention_reference import attention_naive


def _qkv(hq=4, hkv=2, s=16, d=32, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(kq, (2, s, hq, d)).astype(dtype), jax.random.normal(kk, (2, s, hkv, d)).astype(dtype),
            jax.random.normal(kv, (2, s, hkv, d)).astype(dtype))


@pytest.fixture
def fake_device(monkeypatch):
    """Makes jax.devices() report one fake device of the given platform / kind (no HARDWARE_RUNS rows)."""
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", ())

    def use(platform, kind):
        fake = SimpleNamespace(platform=platform, device_kind=kind)
        monkeypatch.setattr(jax, "devices", lambda backend=None: [fake])
        return fake
    return use


def _run(kind, implementation, tflops=None):
    return HardwareRun(kind, implementation, "2027-01-01", "Attention: test row", tflops)


@pytest.mark.parametrize("platform, kind, expected", [
    ("tpu", "TPU v5p", "xla"),                  # lowered by Mosaic TPU from a CPU host, never run: opt-in
    ("gpu", "NVIDIA H100 80GB HBM3", "cudnn"),  # no recorded run of the Pallas GPU kernel: cuDNN
    ("gpu", "NVIDIA H200", "cudnn"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "cudnn"),
    ("cpu", "cpu", "xla"),
])
def test_default_without_recorded_runs(fake_device, platform, kind, expected):
    fake_device(platform, kind)
    assert default_implementation() == expected           # still callable with no arguments: bf16, no segments
    assert default_implementation(dtype=jnp.bfloat16) == expected


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dtype=jnp.bfloat16), "cudnn"),
    (dict(dtype=jnp.float16), "cudnn"),
    (dict(dtype=jnp.float32), "xla"),                  # fp32 is never computed in bf16 by default
    (dict(dtype=jnp.bfloat16, segment_ids=True), "xla"),  # cuDNN has no segment ids
    (dict(dtype=jnp.bfloat16, head_dim=256), "xla"),
])
def test_gpu_default_depends_on_the_inputs(fake_device, kwargs, expected):
    fake_device("gpu", "NVIDIA H100 80GB HBM3")
    assert default_implementation(**kwargs) == expected


def test_a_recorded_hardware_run_flips_the_default(fake_device, monkeypatch):
    fake_device("gpu", "NVIDIA H100 80GB HBM3")
    assert default_implementation(dtype=jnp.bfloat16, segment_ids=True) == "xla"
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("H100", "pallas_gpu"),))
    assert default_implementation() == "pallas_gpu"
    assert default_implementation(dtype=jnp.bfloat16, segment_ids=True) == "pallas_gpu"
    assert default_implementation(dtype=jnp.float32) == "xla"        # the kernel refuses fp32
    assert default_implementation(dtype=jnp.bfloat16, head_dim=96) == "cudnn"
    # The row is for H100s only: an H200 (or an A100) keeps the unrecorded defaults.
    fake_device("gpu", "NVIDIA H200")
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("H100", "pallas_gpu"),))
    assert default_implementation() == "cudnn"


def test_fastest_recorded_run_wins(fake_device, monkeypatch):
    fake_device("gpu", "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("H100", "pallas_gpu", 500.0), _run("H100", "cudnn", 600.0)))
    assert default_implementation() == "cudnn"
    assert default_implementation(segment_ids=True) == "pallas_gpu"  # cuDNN cannot take them
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("H100", "pallas_gpu", 700.0), _run("H100", "cudnn", 600.0)))
    assert default_implementation() == "pallas_gpu"


def test_tpu_default_flips_only_with_a_recorded_run(fake_device, monkeypatch):
    fake_device("tpu", "TPU v5p")
    assert default_implementation(dtype=jnp.float32) == "xla"
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("TPU v5p", "pallas_tpu"),))
    assert default_implementation() == "pallas_tpu"
    assert default_implementation(dtype=jnp.float32) == "pallas_tpu"
    fake_device("tpu", "TPU v6e")
    monkeypatch.setattr(dispatch, "HARDWARE_RUNS", (_run("TPU v5p", "pallas_tpu"),))
    assert default_implementation() == "xla"


def test_hardware_runs_table_rows_are_well_formed():
    assert isinstance(kernels.HARDWARE_RUNS, tuple)
    benchmarks = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    for row in kernels.HARDWARE_RUNS:
        assert row.implementation in dispatch.ATTENTION_IMPLEMENTATIONS
        assert row.device_kind and re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.date)
        assert row.benchmarks_entry.split(":")[0] in benchmarks, row
    # No hardware run of either Pallas kernel exists yet (BENCHMARKS.md says so); a row must come with one.
    assert not any(r.implementation.startswith("pallas") for r in kernels.HARDWARE_RUNS)


def test_default_dispatch_passes_the_inputs_dtype_and_segments(fake_device, monkeypatch):
    """flash_attention(implementation=None) asks for the default with the inputs' dtype and segment ids: on a
    (fake) H100, fp32 and segment ids take the XLA path (which runs here), bf16 without segments takes cuDNN."""
    fake_device("gpu", "NVIDIA H100 80GB HBM3")
    called = []
    monkeypatch.setattr(dispatch, "_cudnn_attention", lambda q, k, v, **kw: called.append(q.dtype) or q)
    q, k, v = _qkv()
    ref = kernels.flash_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(kernels.flash_attention(q, k, v), ref)
    seg = jnp.ones((2, 16), jnp.int32)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_array_equal(kernels.flash_attention(qb, kb, vb, segment_ids=seg),
                                  kernels.flash_attention(qb, kb, vb, segment_ids=seg, implementation="xla"))
    assert called == []
    kernels.flash_attention(qb, kb, vb)
    assert called == [jnp.bfloat16]


def test_is_hopper_gpu():
    assert kernels.is_hopper_gpu(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"))
    assert kernels.is_hopper_gpu(SimpleNamespace(platform="gpu", device_kind="whatever", compute_capability="9.0"))
    assert not kernels.is_hopper_gpu(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100",
                                                     compute_capability="8.0"))
    assert not kernels.is_hopper_gpu(SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB"))
    assert not kernels.is_hopper_gpu(SimpleNamespace(platform="cpu", device_kind="cpu"))


@pytest.mark.parametrize("with_segments", [False, True])
def test_grad_with_numpy_inputs_on_the_xla_path(with_segments):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 16, 4, 32)).astype(np.float32)
    k = rng.standard_normal((1, 16, 2, 32)).astype(np.float32)
    v = rng.standard_normal((1, 16, 2, 32)).astype(np.float32)
    seg = np.repeat(np.array([[1, 2]], np.int32), 8, axis=1) if with_segments else None
    loss = lambda q, k, v: (kernels.flash_attention(q, k, v, segment_ids=seg, implementation="xla") ** 2).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
    for got, want, x in zip(grads, expected, (q, k, v)):
        assert got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # and the naive reference agrees on dq (autodiff of the plain softmax attention)
    naive = lambda q: (attention_naive(q, k, v, causal=True,
                                       segment_ids=None if seg is None else jnp.asarray(seg)) ** 2).sum()
    np.testing.assert_allclose(grads[0], jax.grad(naive)(jnp.asarray(q)), rtol=1e-4, atol=1e-4)


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

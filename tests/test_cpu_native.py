"""The native CPU kernels' build and fallback (kernels.cpu_native), the packed matmul (`pack_matrix`,
`packed_matmul`) against float64 NumPy and the greedy `argmax` against NumPy's, with their errors;
`MatrixWeight`s with panels (phi4_jax.inference.cpu_weights) route products
of few rows to it. The engine's greedy tokens against transformers (tests/test_batching.py, test_cpu_bf16.py) run
on it end to end wherever it builds."""

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest

from kernels import cpu_native

needs_native = pytest.mark.skipif(not cpu_native.available("phi4_cpu_packed_matmul"),
                                  reason=f"native CPU kernels unavailable: {cpu_native.unavailable_reason()}")


def test_builds_where_a_compiler_exists():
    """CI has g++: the kernels must build there, so the tests below cannot all skip silently."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    if cpu_native.disabled_on_purpose():
        pytest.skip(f"native CPU kernels disabled on purpose ({cpu_native.DISABLE_ENV})")
    assert cpu_native.available("phi4_cpu_packed_matmul"), cpu_native.unavailable_reason()
    assert cpu_native.library_path().is_file()


def _bf16_as_float64(w):
    return np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64)


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", [(1, 37, 5), (3, 64, 130), (8, 40, 64), (9, 33, 200), (16, 128, 96), (5, 1, 17)])
def test_packed_matmul_equals_float64_numpy(dtype, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(dtype)
    panels = cpu_native.pack_matrix(w)
    assert panels.shape == (-(-n // cpu_native.PANEL), k, cpu_native.PANEL)
    assert panels.dtype == (jnp.uint16 if dtype == "bfloat16" else jnp.float32)
    got = jax.jit(cpu_native.packed_matmul, static_argnums=2)(jnp.asarray(x), panels, n)
    want = x.astype(np.float64) @ _bf16_as_float64(w)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_native
def test_packed_matmul_errors_name_the_problem():
    w = jnp.ones((8, 70), jnp.float32)
    panels = cpu_native.pack_matrix(w)
    with pytest.raises(cpu_native.NativeKernelError, match="do not hold 200 columns"):
        cpu_native.packed_matmul(jnp.ones((2, 8)), panels, 200)
    with pytest.raises(cpu_native.NativeKernelError, match=r"x must be \[M, K\]"):
        cpu_native.packed_matmul(jnp.ones((2, 9)), panels, 70)
    with pytest.raises(cpu_native.NativeKernelError, match="float32 or uint16"):
        cpu_native.packed_matmul(jnp.ones((2, 8)), panels.astype(jnp.int32), 70)
    with pytest.raises(cpu_native.NativeKernelError, match="float32 or bfloat16 weights"):
        cpu_native.pack_matrix(jnp.ones((8, 70), jnp.float16))
    with pytest.raises(cpu_native.NativeKernelError, match=r"\[K, N\] matrix"):
        cpu_native.pack_matrix(jnp.ones((2, 8, 70)))


def test_disabled_by_environment_falls_back():
    """PHI4_JAX_NATIVE_CPU=0: unavailable, with the reason, and the engine's weights keep XLA's layout."""
    code = ("from kernels import cpu_native; from phi4_jax.inference.cpu_weights import native_matmul_available; "
            "print(cpu_native.available(), native_matmul_available(), '|', cpu_native.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PHI4_JAX_NATIVE_CPU": "0", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False | disabled by PHI4_JAX_NATIVE_CPU=0", out.stdout


def test_a_failing_compiler_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves the kernels unavailable with its error as the reason (logged once), and
    nothing half-written in the cache."""
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    with caplog.at_level("WARNING", logger="kernels.cpu_native"):
        assert not cpu_native.available()
    assert "compiling the native CPU kernels failed" in cpu_native.unavailable_reason()
    assert "native CPU kernels unavailable" in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.raises(cpu_native.NativeKernelError, match="unavailable: compiling"):
        cpu_native.packed_matmul(jnp.ones((1, 8)), jnp.ones((1, 8, 64)), 64)


@needs_native
@pytest.mark.parametrize("b,v", [(1, 1), (3, 5), (2, 16), (8, 17), (4, 100), (8, 8195)])
def test_argmax_equals_numpy(b, v):
    """First index of the largest value; ties, infinities, all -inf rows and NaN (the first NaN wins, as in NumPy
    and jnp.argmax) included."""
    rng = np.random.default_rng(b * v)
    x = rng.standard_normal((b, v)).astype(np.float32)
    x[0, rng.integers(v, size=3)] = 7.0                       # a tie: the first of them
    if b > 1:
        x[1] = -np.inf                                       # all -inf: index 0
    if b > 2:
        x[2, v // 2] = np.inf
    if b > 3:
        x[3, rng.integers(v, size=2)] = np.nan               # the first NaN
    got = np.asarray(jax.jit(cpu_native.argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    with pytest.raises(cpu_native.NativeKernelError, match="float32 \\[B, V\\]"):
        cpu_native.argmax(jnp.asarray(x, jnp.bfloat16))


@needs_native
@pytest.mark.parametrize("rows", [1, 8, 9])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matrix_weight_routes_few_rows_to_the_panels(rows, dtype):
    """A packed `MatrixWeight`: float32 products of any row count and bfloat16 ones of at most
    `NATIVE_MAX_ROWS_16BIT` rows are the native call (seen in the lowered program), more bfloat16 rows XLA's dot of
    the kept matrix; all equal float64 NumPy of the same (rounded) inputs."""
    from phi4_jax.inference.cpu_weights import NATIVE_MAX_ROWS_16BIT, MatrixWeight

    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 1, 5, 8)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((5, 8, 24)), jnp.float32).astype(dtype)
    weight = MatrixWeight.packed(w, 2, dtype=jnp.dtype(dtype), matrix=dtype == "bfloat16")
    fn = jax.jit(lambda x, weight: weight.linear_einsum("bshd,hde->bse", x, jnp.dtype(dtype),
                                                        preferred_element_type=jnp.float32))
    got = fn(x, weight)
    want = np.einsum("bshd,hde->bse", _bf16_as_float64(x), _bf16_as_float64(w))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)
    native = "phi4_cpu_packed_matmul" in fn.lower(x, weight).as_text()
    assert native == (dtype == "float32" or rows <= NATIVE_MAX_ROWS_16BIT)
    if dtype == "float32":
        assert weight.matrix is None and weight.rows is None    # panels only: no second copy


@needs_native
def test_engine_weights_are_packed():
    """The CPU engine's per-layer weights and lm_head carry native panels (float32: panels only, no transposed
    lm_head copy; the lm_head's `matrix` is the model's own array), its decode step calls the native matmul, and
    its sampling the native argmax and top-k/top-p filter."""
    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.inference.cpu_weights import MatrixWeight
    from phi4_jax.model.config import get_preset
    from phi4_jax.model.decoder import Phi4ForCausalLM

    model = Phi4ForCausalLM(get_preset("tiny", vocab_size=256, num_layers=1))
    engine = ContinuousBatchingEngine(model, max_batch=2, max_context=64)
    assert engine.per_layer
    layer = engine.step_params["layers"][0]
    o_proj = layer["o_proj"]
    assert isinstance(o_proj, MatrixWeight) and o_proj.matrix is None and o_proj.panels.shape == (1, 4 * 16, 64)
    head = engine.step_params["lm_head"]
    assert head.rows is None and head.panels.shape == (4, 64, 64)
    assert head.matrix.unsafe_buffer_pointer() == engine.params["lm_head"].unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(head.panels).transpose(1, 0, 2).reshape(64, 256),
                                  np.asarray(model.params["lm_head"]))
    from phi4_jax.inference.paged_layers import paged_extend_per_layer

    width = 64 // engine.page_size
    text = jax.jit(paged_extend_per_layer, static_argnames="config").lower(
        engine.step_params, engine.pages, jnp.zeros((2, 1), jnp.int32), jnp.zeros(2, jnp.int32),
        jnp.ones(2, jnp.int32), jnp.zeros((2, width), jnp.int32), config=model.config).as_text()
    calls = re.findall(r"phi4_cpu_packed_matmul", text)
    assert len(calls) == 5, len(calls)      # q/k/v, o, gate/up, down (1 layer) and the lm_head
    from phi4_jax.inference.batching import engine_step

    args, kwargs = engine._step_args([None, None], np.zeros((2, 1), np.int32), np.full(2, -1, np.int32),
                                     engine._carry(None, None), np.zeros(2, np.int32),
                                     np.ones(2, np.int32), np.zeros(2, np.int32), width)
    step_text = engine_step.lower(*args, **kwargs).as_text()
    assert "phi4_cpu_argmax" in step_text and "phi4_cpu_sampling_filter" in step_text


@needs_native
@pytest.mark.parametrize("rows", [1, 8, 9])
def test_float32_weights_computing_in_bfloat16_round_like_xla(rows):
    """float32 weights with a bfloat16 compute dtype (a training checkpoint served as is): `per_layer_params` packs
    them rounded to bfloat16 (`panel_dtype`), so every product equals XLA's dot of the model's own layer in that
    dtype (weights and x rounded once, float32 sums) whichever path it takes (panels, or the kept float32 matrix
    for more rows): float64 NumPy of the rounded inputs is the reference."""
    from phi4_jax.inference.cpu_weights import panel_dtype
    from phi4_jax.inference.paged_layers import per_layer_params

    assert panel_dtype(jnp.float32, jnp.bfloat16) == jnp.bfloat16 and panel_dtype(jnp.float32, jnp.float32) == jnp.float32
    assert panel_dtype(jnp.float32, jnp.float16) is None and panel_dtype(jnp.float16, jnp.float32) is None
    rng = np.random.default_rng(rows)
    stacked = {"gate_up_proj": jnp.asarray(rng.standard_normal((1, 64, 2, 48)), jnp.float32)}
    head = jnp.asarray(rng.standard_normal((64, 100)), jnp.float32)
    step = per_layer_params({"layers": stacked, "lm_head": head}, native=True, compute_dtype="bfloat16")
    weight = step["layers"][0]["gate_up_proj"]
    assert weight.panels.dtype == jnp.uint16 and step["lm_head"].panels.dtype == jnp.uint16
    x = jnp.asarray(rng.standard_normal((rows, 1, 64)), jnp.float32)       # wider than the compute dtype
    got = jax.jit(lambda x, w: w.linear_einsum("bse,efh->bsfh", x, jnp.bfloat16,
                                               preferred_element_type=jnp.float32))(x, weight)
    rounded = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    want = np.einsum("bse,efh->bsfh", rounded(x), rounded(stacked["gate_up_proj"][0]))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)
    logits = jax.jit(lambda x, w: w.linear_einsum("...e,ev->...v", x, jnp.bfloat16,
                                                  preferred_element_type=jnp.float32))(x[:, 0], step["lm_head"])
    np.testing.assert_allclose(np.asarray(logits, np.float64), rounded(x[:, 0]) @ rounded(head), rtol=1e-5,
                               atol=1e-4)


@needs_native
def test_16bit_matrices_are_dropped_when_memory_is_short(monkeypatch):
    """When the bfloat16 panels' [K, N] copies would break the memory rule, `per_layer_params` keeps the panels
    only (prefill runs on them too) instead of leaving the per-layer layout, and products still equal NumPy."""
    from phi4_jax.inference import paged_layers

    rng = np.random.default_rng(0)
    stacked = {"down_proj": jnp.asarray(rng.standard_normal((1, 96, 64)), jnp.bfloat16)}
    params = {"layers": stacked, "lm_head": jnp.asarray(rng.standard_normal((64, 80)), jnp.bfloat16)}
    small = paged_layers.copy_bytes(params, True, "bfloat16", keep_matrix=False)
    assert paged_layers.copy_bytes(params, True, "bfloat16", keep_matrix=True) == small + 96 * 64 * 2
    monkeypatch.setattr(paged_layers, "_memory_allows", lambda nbytes: nbytes <= small)
    step = paged_layers.per_layer_params(params, native=True, compute_dtype="bfloat16")
    weight = step["layers"][0]["down_proj"]
    assert weight.matrix is None and weight.panels is not None
    x = jnp.asarray(rng.standard_normal((12, 96)), jnp.bfloat16)            # 12 rows: prefill-sized
    got = weight.linear_einsum("bf,fe->be", x, jnp.bfloat16, preferred_element_type=jnp.float32)
    want = _bf16_as_float64(x) @ _bf16_as_float64(stacked["down_proj"][0])
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)


def test_engine_without_native_kernels_equals_transformers():
    """The fallback end to end: with PHI4_JAX_NATIVE_CPU=0 (as on a machine with no C++ compiler) the CPU engine
    runs XLA's ops throughout, and its concurrent greedy answers and logprobs still equal transformers' (two
    tests of tests/test_batching.py, run in a child pytest with the variable set)."""
    tests = ["tests/test_batching.py::test_concurrent_greedy_equals_transformers_and_generate",
             "tests/test_batching.py::test_logprobs_match_transformers"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, timeout=900, cwd=root,
                         env={**os.environ, cpu_native.DISABLE_ENV: "0", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]


@needs_native
def test_sampling_with_the_native_argmax_draws_what_categorical_draws():
    """`sample_rows` with the native argmax and top-k/top-p filter (the CPU engine's) gives the tokens of
    jax.random.categorical over the logits scaled and restricted by the XLA masks, with the same keys (its
    argmax(gumbel + logits) formula), for greedy, temperature, top-k and top-p rows mixed."""
    from phi4_jax.inference.sampling import sample_rows, top_k_mask, top_p_mask

    b, v = 6, 3000
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((b, v)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(7), b)
    steps = jnp.arange(b, dtype=jnp.int32) * 5
    temperature = jnp.asarray([0.0, 0.7, 1.0, 1.3, 0.9, 0.5], jnp.float32)
    top_k = jnp.asarray([0, 0, 50, 0, 7, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 1.0, 0.8, 0.9, 0.95], jnp.float32)
    native = jax.jit(lambda *a: sample_rows(*a, argmax=cpu_native.argmax, restrict=cpu_native.sampling_filter))
    got = native(logits, keys, steps, temperature, top_k, top_p)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = jnp.where(top_k_mask(scaled, top_k), scaled, -jnp.inf)
    scaled = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in)(keys, steps), scaled)
    want = np.where(np.asarray(temperature) > 0, np.asarray(drawn), np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(set(np.asarray(got)[1:].tolist())) > 1      # the draws are not all one token


@needs_native
def test_sampling_filter_top_k_is_the_sorted_definition():
    """Each row keeps its k largest logits (float64 sort; every value tied with the k-th kept, -0.0 with +0.0 too;
    -inf entries; k 0 and k >= V keep all), and the mask is XLA's `top_k_mask` exactly."""
    from phi4_jax.inference.sampling import top_k_mask

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(7, 3001)) * 3.0).astype(np.float32)
    logits[1, :10] = -np.inf
    logits[2, 100:104] = np.sort(logits[2])[-5]                     # ties at the 5th largest value
    logits[5] = -np.abs(logits[5]) - 1.0                            # the 4th largest is zero, three times:
    logits[5, :3] = [3.0, 2.0, 1.0]                                 # -0.0 ties +0.0 (they compare equal)
    logits[5, [7, 9, 11]] = [-0.0, 0.0, -0.0]
    ks = np.array([1, 17, 5, 0, 3000, 4, 40], np.int32)
    got = np.isfinite(np.asarray(jax.jit(cpu_native.sampling_filter)(logits, ks, np.ones(7, np.float32))))
    for b, k in enumerate(ks):
        np.testing.assert_array_equal(got[b], numpy_oracle.top_k_kept(logits[b], k) & np.isfinite(logits[b]),
                                      err_msg=f"row {b}, k {k}")
    assert got[2].sum() == 4 + 1 + 4 and got[5].sum() == 3 + 3
    np.testing.assert_array_equal(got, np.asarray(top_k_mask(jnp.asarray(logits), jnp.asarray(ks))) &
                                  np.isfinite(logits))
    kept = np.asarray(jax.jit(cpu_native.sampling_filter)(logits, ks, np.ones(7, np.float32)))
    np.testing.assert_array_equal(kept[got], logits[got])          # kept logits pass through unchanged


@needs_native
@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 30.0])   # flat ... peaked (one token above top_p)
def test_sampling_filter_top_p_is_the_sorted_definition(scale):
    """Each row's nucleus by the sorted float64 definition (every token not within rounding of the boundary
    decided the same way), alone and after a top-k cut (the nucleus of what the top-k left)."""
    rng = np.random.default_rng(int(scale * 100))
    logits = (rng.normal(size=(6, 5003)) * scale).astype(np.float32)
    fn = jax.jit(cpu_native.sampling_filter)
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.999, 1.0):
        for k in (0, 300):
            got = np.isfinite(np.asarray(fn(logits, np.full(6, k, np.int32), np.full(6, top_p, np.float32))))
            for b in range(6):
                row = np.where(numpy_oracle.top_k_kept(logits[b], k), logits[b], -np.inf)
                want, before = numpy_oracle.nucleus(row, top_p)
                want &= np.isfinite(row)
                decided = np.abs(before - top_p) > 1e-5
                assert got[b].any()
                np.testing.assert_array_equal(got[b][decided], want[decided],
                                              err_msg=f"scale {scale} top_p {top_p} k {k} row {b}")


@needs_native
def test_sampling_filter_refuses_bad_arguments():
    x = jnp.zeros((2, 5), jnp.float32)
    for args, match in [((x.astype(jnp.bfloat16), [0, 0], [1.0, 1.0]), "float32"),
                        ((x[:, :0], [0, 0], [1.0, 1.0]), "V >= 1"),
                        ((x, [0], [1.0, 1.0]), r"top_k and top_p of shape \(2,\)")]:
        with pytest.raises(cpu_native.NativeKernelError, match=match):
            cpu_native.sampling_filter(*(jnp.asarray(a) for a in args))

"""kernels.dequant_matmul: the Pallas TPU dequantize-matmul kernel and its opt-in dispatch from QuantizedWeight.

- interpret mode (CPU) against the float64 NumPy oracle (tests/numpy_oracle.py): int8 per channel and in groups,
  int4 in groups and per channel, several blocks along N and K, odd batch sizes;
- compiled by Mosaic for a TPU chip (libtpu's compile-only devices): the kernel reads the packed bytes once (the
  optimized HLO's HBM traffic within 2% of the ideal, no weight-sized intermediate), where XLA's int4 path writes
  weight-sized intermediates (the reason the kernel exists; if a libtpu fuses them, this test says so);
- the dispatch: `use_dequant_kernel` sends a decode step's matmuls to the kernel when compiled for a TPU, leaves
  prefill on XLA, and gives the XLA path's numbers for every equation the model uses.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for
from numpy_oracle import dequant_matmul as oracle

from kernels.dequant_matmul import DequantMatmulError, dequant_matmul, dequant_matmul_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quantized(rng, n, k, bits, group):
    """Random int values (packed by hand from the definition for int4), scales and the [N, K] shape."""
    qmax = 7 if bits == 4 else 127
    q = rng.integers(-qmax - 1, qmax + 1, size=(n, k)).astype(np.int8)
    values = ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).astype(np.uint8) if bits == 4 else q
    scales = rng.uniform(0.002, 0.02, size=(n, k // group)).astype(np.float32)
    return values, scales


# (M, N, K, bits, group, layers): grids of 2 x 2, 1 x 1 and 1 x 2 blocks of (128, 256); odd batch sizes; the
# last one reads layer 1 of 2 stacked matrices through `layer`
CASES = [(3, 256, 512, 8, 512, None), (5, 128, 256, 8, 128, None), (1, 128, 512, 4, 128, None),
         (7, 128, 256, 4, 256, 2)]


@pytest.mark.parametrize("m,n,k,bits,group,layers", CASES)
def test_kernel_matches_the_float64_oracle(m, n, k, bits, group, layers):
    rng = np.random.default_rng(m * 1000 + n + bits)
    stacked = [_quantized(rng, n, k, bits, group) for _ in range(layers or 1)]
    values, scales = stacked[-1]
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = oracle(x, values, scales, bits=bits, group_size=group)
    if layers:
        args = [jnp.asarray(np.stack([v for v, _ in stacked])), jnp.asarray(np.stack([s for _, s in stacked]))]
    else:
        args = [jnp.asarray(values), jnp.asarray(scales)]
    got = dequant_matmul(jnp.asarray(x), *args, bits=bits, group_size=group, block_n=128, block_k=256,
                         layer=None if layers is None else jnp.int32(layers - 1), interpret=interpret_for("tpu"))
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max())
    ref = dequant_matmul_reference(jnp.asarray(x), jnp.asarray(values), jnp.asarray(scales), bits=bits,
                                   group_size=group)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_kernel_in_bf16_is_as_close_as_xla_bf16():
    """bf16 x and scales: the kernel's error against the float64 oracle is within XLA's own bf16 error."""
    rng = np.random.default_rng(7)
    m, n, k, group = 2, 128, 256, 128
    values, scales = _quantized(rng, n, k, 4, group)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    s = jnp.asarray(scales, jnp.bfloat16)
    want = oracle(x, values, s, bits=4, group_size=group)
    got = dequant_matmul(x, jnp.asarray(values), s, bits=4, group_size=group, block_n=128, block_k=256,
                         interpret=interpret_for("tpu"))
    ref = dequant_matmul_reference(x, jnp.asarray(values), s, bits=4, group_size=group)
    assert got.dtype == jnp.bfloat16
    err_kernel = np.abs(np.asarray(got, np.float64) - want).max()
    err_xla = np.abs(np.asarray(ref, np.float64) - want).max()
    assert err_kernel <= 1.5 * err_xla + 1e-3 * np.abs(want).max(), (err_kernel, err_xla)


@pytest.mark.parametrize("shapes,bits,group,message", [
    (((2, 512), (256, 512), (256, 4)), 4, 128, r"4-bit values for x \(2, 512\) must be \(256, 256\)"),
    (((2, 512), (256, 512), (256, 3)), 8, 128, "scales .* do not fit groups of 128"),
    (((2, 512), (200, 512), (200, 1)), 8, 512, "N=200 needs a block_n"),
    (((2, 320), (256, 160), (256, 5)), 4, 64, "K=320 needs a block_k"),
])
def test_bad_shapes_are_named(shapes, bits, group, message):
    xs, vs, ss = shapes
    dtype = jnp.uint8 if bits == 4 and vs[1] * 2 == xs[1] else jnp.int8
    with pytest.raises(DequantMatmulError, match=message):
        dequant_matmul(jnp.zeros(xs, jnp.float32), jnp.zeros(vs, dtype), jnp.ones(ss, jnp.float32), bits=bits,
                       group_size=group, interpret=True)


# ----------------------------------------------------------------------------- the dispatch, numerically (CPU)

@pytest.fixture
def kernel_as_if_on_tpu(monkeypatch):
    """The dispatch's TPU check answered yes and the kernel interpreted, so the routing runs on a CPU."""
    import functools

    from phi4_jax.quant import tpu_kernel

    monkeypatch.setattr(tpu_kernel, "on_tpu", lambda: True)
    monkeypatch.setattr(tpu_kernel, "dequant_matmul", functools.partial(dequant_matmul, interpret=True))


@pytest.mark.parametrize("equation,x_shape,in_shape,out_shape,bits,kwargs", [
    ("bse,ehd->bshd", (1, 3, 256), (256,), (2, 128), 4, {}),                                   # q_proj
    ("bshd,hde->bse", (3, 1, 2, 128), (2, 128), (256,), 8, {}),                                # o_proj
    ("...e,ev->...v", (2, 256), (256,), (384,), 8, {"preferred_element_type": jnp.float32}),   # lm_head
])
def test_dispatch_gives_the_xla_paths_numbers(kernel_as_if_on_tpu, equation, x_shape, in_shape, out_shape, bits,
                                              kwargs):
    from phi4_jax.quant.tpu_kernel import use_dequant_kernel
    from phi4_jax.quant.weights import quantize_matrix, quantized_weight

    rng = np.random.default_rng(3)
    k, n = int(np.prod(in_shape)), int(np.prod(out_shape))
    values, scales = quantize_matrix(rng.standard_normal((n, k)).astype(np.float32), bits,
                                     128 if bits == 4 else None)
    name = {"bse,ehd->bshd": "q_proj", "bshd,hde->bse": "o_proj"}.get(equation, "lm_head")
    shape = (1,) * (name != "lm_head") + in_shape + out_shape
    w = quantized_weight(name, jnp.asarray(values)[None] if name != "lm_head" else jnp.asarray(values),
                         jnp.asarray(scales)[None] if name != "lm_head" else jnp.asarray(scales), None, bits=bits,
                         group_size=128 if bits == 4 else k, shape=shape)
    if name != "lm_head":                                          # one layer's slice, as lax.scan gives it
        w = dataclasses.replace(w, values=w.values[0], scales=w.scales[0])
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    xla = jax.jit(lambda x, w: w.linear_einsum(equation, x, jnp.float32, **kwargs))(x, w)
    on = use_dequant_kernel(w, max_rows=3)
    assert on.kernel_rows == 3 and w.kernel_rows == 0
    ker = jax.jit(lambda x, w: w.linear_einsum(equation, x, jnp.float32, **kwargs))
    assert "pallas" in str(jax.make_jaxpr(ker)(x, on)), "the product did not go to the kernel"
    got = ker(x, on)
    assert got.shape == xla.shape and got.dtype == xla.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-5, atol=1e-5 * float(jnp.abs(xla).max()))
    more = jnp.concatenate([x] * 2, axis=0)                        # more rows than max_rows: XLA
    assert "pallas" not in str(jax.make_jaxpr(ker)(more, on))


def test_use_dequant_kernel_marks_the_lm_head_and_the_layers_only_when_asked():
    from phi4_jax.quant.tpu_kernel import use_dequant_kernel
    from phi4_jax.quant.weights import QuantizationError, QuantizedWeight

    def weight(*lead):
        return QuantizedWeight(np.zeros((*lead, 128, 256), np.int8), np.ones((*lead, 128, 1), np.float32), None, 8,
                               256, (256,), (128,))

    params = {"lm_head": weight(), "layers": {"up_proj": weight(2)}, "final_norm": np.ones(256)}
    some = use_dequant_kernel(params, max_rows=4)
    assert some["lm_head"].kernel_rows == 4 and some["layers"]["up_proj"].kernel_rows == 0
    assert use_dequant_kernel(params, max_rows=4, layers=True)["layers"]["up_proj"].kernel_rows == 4
    assert some["final_norm"] is params["final_norm"] and params["lm_head"].kernel_rows == 0
    with pytest.raises(QuantizationError, match="max_rows must be a non-negative integer, got -1"):
        use_dequant_kernel({}, max_rows=-1)


# ----------------------------------------------------------------------------- compiled for TPU (libtpu)

@pytest.fixture(scope="module")
def tpu_chip():
    pytest.importorskip("libtpu", reason="needs the libtpu wheel (pip install -e '.[tpu-aot]') for the TPU compiler")
    from phi4_jax.train.plan import tpu_topology_devices

    return tpu_topology_devices("v5p:2x2x2")[0]


@pytest.fixture(scope="module")
def tpu_bench():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import bench.quant_tpu_matmul as tpu_bench

    return tpu_bench


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_compiles_for_tpu_and_reads_each_weight_byte_once(tpu_chip, tpu_bench, bits):
    """phi-4's gate projection at batch 1, compiled by Mosaic: the kernel's program moves within 2% of the
    ideal bytes (the bytes are counted from the optimized HLO, independently of the kernel's code) and
    makes no weight-sized intermediate; XLA's int4 program does make them."""
    on = jax.sharding.SingleDeviceSharding(tpu_chip)
    n, k = tpu_bench.N_OUT, tpu_bench.K_IN
    w = tpu_bench.quantized_weight_spec(bits, n, k, on)
    x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16, sharding=on)
    kern = tpu_bench.compile_on(tpu_chip, lambda x, v, s: dequant_matmul(x, v, s, bits=bits, group_size=w.group_size),
                                x, w.values, w.scales)
    text = kern.as_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    ideal = tpu_bench.ideal_bytes(w, 1)
    hbm = tpu_bench.hbm_bytes(text)
    assert ideal <= hbm <= 1.01 * ideal, (hbm, ideal)
    assert tpu_bench.weight_sized_intermediates(text, n * k) == []
    assert kern.memory_analysis().temp_size_in_bytes < n * k // 64
    if bits == 4:
        xla = tpu_bench.compile_on(tpu_chip, lambda x, w: w.linear_einsum("bk,kn->bn", x, jnp.bfloat16), x, w)
        found = tpu_bench.weight_sized_intermediates(xla.as_text(), n * k // 4)
        assert any("s8[" in f for f in found) and any("bf16[" in f for f in found), found


def test_decode_step_uses_the_kernel_only_when_asked_and_only_for_decode(tpu_chip):
    """A TPU-shaped tiny model in int4, its jitted decode step lowered for a TPU chip: the kernel is called for the
    lm_head with `use_dequant_kernel(max_rows=1)`, and also for the 7 layer matmuls (once each, inside the layer
    scan) with `layers=True`; never without it. A 64-token prefill keeps its layer matmuls (64 rows > max_rows)
    on XLA; only its lm_head, on the last token's row, goes to the kernel."""
    from phi4_jax.inference import kv_cache as generation
    from phi4_jax.model.config import get_preset
    from phi4_jax.quant.tpu_kernel import use_dequant_kernel
    from phi4_jax.quant.weights import QuantizeOptions, abstract_quantized_params

    on = jax.sharding.SingleDeviceSharding(tpu_chip)
    place = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)  # noqa
    config = get_preset("tiny", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=128, param_dtype="bfloat16", compute_dtype="bfloat16",
                        attention_impl="xla")
    params = place(abstract_quantized_params(config, QuantizeOptions("int4", embed=None), "bfloat16"))
    cache = place(jax.eval_shape(lambda: generation.init_cache(config, 1, 128)))
    token = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on)
    tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32, sharding=on)
    mesh = jax.sharding.Mesh(np.array([tpu_chip]), ("x",))

    def kernel_calls(p, prefill=False):
        step = (lambda p, t, n: generation.prefill(p, t, n, config, 128)) if prefill else (
            lambda p, c, t: generation.decode_step(p, c, t, config))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):      # lowered (not compiled) for the TPU
            text = jax.jit(step).lower(p, *((tokens, token) if prefill else (cache, token))).as_text()
        return text.count("tpu_custom_call")

    assert kernel_calls(params) == 0
    assert kernel_calls(use_dequant_kernel(params, max_rows=1)) == 1
    assert kernel_calls(use_dequant_kernel(params, max_rows=1, layers=True)) == 8
    assert kernel_calls(use_dequant_kernel(params, max_rows=1, layers=True), prefill=True) == 1

"""The engine's CPU weight layout (phi4_jax.inference.cpu_weights): `MatrixWeight.linear_einsum` against float64
NumPy for every product the decoder computes, in both stored layouts, and the rule that picks between them.

The engine runs its per-layer CPU step on these weights, so its greedy tokens and logprobs against transformers
(tests/test_batching.py: concurrent greedy, logprobs, stops; tests/test_one_path.py; tests/test_generation*.py) are
the end-to-end peer checks; `test_engine_runs_on_the_cpu_layout` makes sure those tests do exercise it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.inference.cpu_weights import MatrixWeight, MatrixWeightError, cpu_layer

# (equation, x shape, weight shape, contracted weight axes): every `linear` product in `model.decoder`.
PRODUCTS = [
    ("bse,ehd->bshd", (3, 2, 24), (24, 5, 8), 1),     # q/k/v (fused qkv_proj)
    ("bshd,hde->bse", (3, 2, 5, 8), (5, 8, 24), 2),   # o_proj: two contracted axes
    ("bse,ef->bsf", (3, 2, 24), (24, 40), 1),         # gate/up
    ("bsf,fe->bse", (3, 2, 40), (40, 24), 1),         # down
    ("...e,ev->...v", (3, 24), (24, 96), 1),          # lm_head
]


def numpy_einsum(equation, x, w):
    return np.einsum(equation, np.asarray(x, np.float64), np.asarray(w, np.float64))


@pytest.mark.parametrize("equation,x_shape,w_shape,n_in", PRODUCTS)
@pytest.mark.parametrize("layout", ["matrix", "rows", "both"])
@pytest.mark.parametrize("one_row", [False, True])
def test_linear_einsum_equals_float64_numpy(equation, x_shape, w_shape, n_in, layout, one_row):
    rng = np.random.default_rng(len(equation) + n_in)
    if one_row:   # a single decode row: every leading axis 1
        x_shape = (1,) * (len(x_shape) - n_in) + x_shape[len(x_shape) - n_in:]
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    weight = MatrixWeight.of(jnp.asarray(w), n_in, matrix=layout != "rows", rows=layout != "matrix")
    kw = {"preferred_element_type": jnp.float32} if equation.startswith("...") else {}
    got = jax.jit(lambda x, weight: weight.linear_einsum(equation, x, jnp.float32, **kw))(jnp.asarray(x), weight)
    want = numpy_einsum(equation, x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)


def test_rows_serve_several_rows_and_the_matrix_one():
    """With both layouts kept, a product of more than one row reads `rows` and a one-row product `matrix` (the
    lm_head's rule): made visible by storing two different matrices."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16, 32)).astype(np.float32)
    weight = MatrixWeight(jnp.asarray(a), jnp.asarray(b.T), (16,), (32,))
    x = rng.standard_normal((4, 16)).astype(np.float32)
    several = weight.linear_einsum("...e,ev->...v", jnp.asarray(x), jnp.float32)
    one = weight.linear_einsum("...e,ev->...v", jnp.asarray(x[:1]), jnp.float32)
    np.testing.assert_allclose(np.asarray(several), x.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(one), x[:1].astype(np.float64) @ a, rtol=1e-5, atol=1e-4)


def test_products_it_cannot_compute_are_refused():
    weight = MatrixWeight.of(jnp.ones((6, 4)), 1)
    with pytest.raises(MatrixWeightError, match="not x"):
        weight.linear_einsum("bse,fe->bsf", jnp.ones((1, 2, 6)), jnp.float32)    # contracts W's output axis
    with pytest.raises(MatrixWeightError, match="input shape"):
        weight.linear_einsum("bse,ef->bsf", jnp.ones((1, 2, 5)), jnp.float32)
    with pytest.raises(MatrixWeightError, match="not supported"):
        weight.linear_einsum("bse,ef->bsf", jnp.ones((1, 2, 6)), jnp.float32, optimize=True)
    with pytest.raises(MatrixWeightError, match="needs"):
        MatrixWeight.of(jnp.ones((6, 4)), 1, matrix=False, rows=False)


def test_engine_runs_on_the_cpu_layout():
    """On the CPU backend the engine's per-layer params are `MatrixWeight`s, so the engine tests against
    transformers run this layout. Without the native kernels (`native=False`, as where they cannot build) the
    matrices are [K, N] arrays and the lm_head has both layouts, its `matrix` the model's own array (with them:
    tests/test_cpu_native.py)."""
    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.inference.paged_layers import per_layer_params
    from phi4_jax.model.config import get_preset
    from phi4_jax.model.decoder import Phi4ForCausalLM

    model = Phi4ForCausalLM(get_preset("tiny", vocab_size=256, num_layers=1))
    engine = ContinuousBatchingEngine(model, max_batch=2, max_context=64)
    assert engine.per_layer
    for step_params in (engine.step_params, per_layer_params(engine.params | {"layers": model.params["layers"]},
                                                             native=False)):
        layer = step_params["layers"][0]
        assert all(isinstance(layer[n], MatrixWeight) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
        head = step_params["lm_head"]
        for name in ("lm_head", "embed"):   # the model's own arrays, not copies
            mine = head.matrix if name == "lm_head" else step_params[name]
            assert mine.unsafe_buffer_pointer() == engine.params[name].unsafe_buffer_pointer()
        assert cpu_layer({"o_proj": layer["o_proj"]})["o_proj"] is layer["o_proj"]   # weight objects left alone
    assert layer["o_proj"].matrix.shape == (4 * 16, 64) and layer["o_proj"].rows is None
    assert layer["o_proj"].panels is None
    assert isinstance(head, MatrixWeight) and head.rows.shape == (256, 64) and head.panels is None
    np.testing.assert_array_equal(np.asarray(head.rows), np.asarray(model.params["lm_head"]).T)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_bf16_products_pad_to_8_rows_and_round_once(rows):
    """A 16-bit product of fewer than `MIN_ROWS_16BIT` rows is computed as one of that many (XLA:CPU's 1-row
    bfloat16 dot is slow), accumulated in float32 and rounded once to bfloat16: equal to float64 NumPy of the same
    bfloat16 inputs within one bfloat16 rounding of the result; the preferred float32 output stays float32."""
    from phi4_jax.inference.cpu_weights import MIN_ROWS_16BIT

    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 1, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((512, 48)), jnp.bfloat16)
    weight = MatrixWeight.of(w, 1)
    want = numpy_einsum("bse,ef->bsf", x, w)
    fn = jax.jit(lambda x, weight: weight.linear_einsum("bse,ef->bsf", x, jnp.bfloat16))
    got = fn(x, weight)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=1e-6)
    wide = jax.jit(lambda x, weight: weight.linear_einsum("bse,ef->bsf", x, jnp.bfloat16,
                                                          preferred_element_type=jnp.float32))(x, weight)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wide, np.float64), want, rtol=1e-5, atol=1e-4)
    compiled = fn.lower(x, weight).compile().as_text()    # after XLA's simplifier, which could undo the padding
    dot_rows = [int(m) for m in re.findall(r"= f32\[(\d+),48\]\S* dot\(", compiled)]
    assert dot_rows == [max(rows, MIN_ROWS_16BIT)]


def test_one_row_float32_lm_head():
    """A 16-bit lm_head keeps a float32 `matrix` (`cpu_lm_head(..., one_row=...)`): a one-row product is one
    float32 dot of that matrix (x widened), several rows one bfloat16 dot of `rows`; both equal float64 NumPy of
    the bfloat16 inputs (float32 output, as the lm_head asks)."""
    from phi4_jax.inference.cpu_weights import cpu_lm_head

    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((256, 96)), jnp.bfloat16)
    head = cpu_lm_head(w, jnp.transpose(w), w.astype(jnp.float32))
    for rows, dot_dtype in ((1, "f32"), (3, "bf16")):
        x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
        fn = jax.jit(lambda x, head: head.linear_einsum("...e,ev->...v", x, jnp.bfloat16,
                                                         preferred_element_type=jnp.float32))
        got = fn(x, head)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), numpy_einsum("...e,ev->...v", x, w), rtol=1e-5,
                                   atol=1e-4)
        operands = re.findall(r"dot_general.*: \(tensor<\d+x\d+x(\w+)>, tensor<\d+x\d+x(\w+)>\)",
                              fn.lower(x, head).as_text())
        assert len(operands) == 1 and set(operands[0]) == {dot_dtype}, operands

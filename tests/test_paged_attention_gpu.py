"""The Pallas GPU (Triton) paged attention kernel (`kernels.paged_attention_gpu`, `implementation="pallas_gpu"`).

- Interpret mode on a CPU against the float64 NumPy oracle (tests/numpy_oracle.py) over each sequence's pages laid
  end to end: lengths 1 .. a full table, page sizes 4/8/16, GQA 1/3/4/8 q heads per kv head, head_dim 64 and 128,
  one and several new tokens per sequence, several splits and row blocks; float32 and bfloat16.
- Lowered for CUDA (`jax.export(..., platforms=["cuda"])` on this CPU): the Triton IR is built and verified for
  phi-4's shapes (40 q / 10 kv heads, head_dim 128, 16-token pages) in bf16 and fp32, for a decode step and a
  prefill chunk. Lowered, not compiled by Triton to PTX and not run on a GPU (no GPU here).
- Bad inputs and targets are refused with one clear line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
from kernel_mode import interpret_for

import kernels
from kernels.decode_attention import DecodeAttentionError
from kernels.paged_attention_gpu import paged_attention_gpu

INTERPRET = interpret_for("gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def _case(seed, *, t, d, page, hq, hkv, width, lengths, dtype=np.float32):
    """Two layers of pages scattered through a pool (shuffled block tables); T new queries per sequence."""
    rng = np.random.default_rng(seed)
    b, num_pages = len(lengths), len(lengths) * width + 3
    k_pages = rng.standard_normal((2, num_pages, page, hkv, d)).astype(dtype)
    v_pages = rng.standard_normal((2, num_pages, page, hkv, d)).astype(dtype)
    tables = rng.permutation(np.arange(1, num_pages))[:b * width].reshape(b, width).astype(np.int32)
    q = rng.standard_normal((b, t, hq, d)).astype(dtype)
    return q, k_pages, v_pages, tables, np.asarray(lengths, np.int32)


def _oracle(q, k_pages, v_pages, tables, lengths, layer):
    b, w = tables.shape
    k_seq = np.asarray(k_pages)[layer][tables].reshape(b, w * k_pages.shape[2], *k_pages.shape[3:])
    v_seq = np.asarray(v_pages)[layer][tables].reshape(b, w * v_pages.shape[2], *v_pages.shape[3:])
    t = q.shape[1]
    return numpy_oracle.attention(q, k_seq, v_seq, causal=True, q_offset=lengths - t, kv_len=lengths)[0]


@jax.jit
def _run(q, k, v, tables, lengths, layer):
    return kernels.paged_attention(q, k, v, tables, lengths, layer=layer, implementation="pallas_gpu",
                                   interpret=INTERPRET)


CASES = {   # name: (t, head_dim, page_size, q heads, kv heads, table width, lengths)
    "decode_gqa4_d128_p16": (1, 128, 16, 8, 2, 6, [1, 17, 96, 40]),           # length 1 and a full table
    "decode_gqa3_d64_p8": (1, 64, 8, 6, 2, 5, [40, 9, 1]),                     # rows 3 padded to 16
    "chunk5_mha_d64_p4": (5, 64, 4, 4, 4, 20, [5, 80, 33]),                   # 16 pages per block, causal chunk
    "chunk40_gqa8_d128_p16": (40, 128, 16, 8, 1, 4, [40, 64, 57]),            # 320 rows: 5 row blocks
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_oracle(name):
    t, d, page, hq, hkv, width, lengths = CASES[name]
    q, k_pages, v_pages, tables, lengths = _case(len(name), t=t, d=d, page=page, hq=hq, hkv=hkv, width=width,
                                                 lengths=lengths)
    got = np.asarray(_run(q, k_pages, v_pages, tables, lengths, 1))
    np.testing.assert_allclose(got, _oracle(q, k_pages, v_pages, tables, lengths, 1), rtol=2e-5, atol=2e-5)


def test_splits_and_a_single_layer_pool():
    """Explicit splits (5: more than the short sequences have blocks, so some splits are empty and must not count),
    one page per block, and the unstacked [num_pages, page_size, Hkv, D] pool."""
    q, k_pages, v_pages, tables, lengths = _case(7, t=2, d=64, page=16, hq=4, hkv=2, width=8,
                                                 lengths=[2, 128, 70, 16])
    run = jax.jit(lambda *a: paged_attention_gpu(*a, pages_per_block=1, num_splits=5, interpret=INTERPRET))
    got = np.asarray(run(q, k_pages[0], v_pages[0], tables, lengths))
    np.testing.assert_allclose(got, _oracle(q, k_pages, v_pages, tables, lengths, 0), rtol=2e-5, atol=2e-5)


def test_bfloat16_within_rounding_of_the_oracle():
    """bf16 q and pages (the serving dtype): the oracle on the same bf16 values in float64; the kernel rounds the
    probabilities to bf16 for the P.V dot (as the reference does) and its output to bf16."""
    q, k_pages, v_pages, tables, lengths = _case(3, t=1, d=128, page=16, hq=8, hkv=2, width=6, lengths=[1, 50, 96],
                                                 dtype=np.float32)
    q, k_pages, v_pages = (jnp.asarray(x, jnp.bfloat16) for x in (q, k_pages, v_pages))
    got = _run(q, k_pages, v_pages, tables, lengths, 0)
    assert got.dtype == jnp.bfloat16
    want = _oracle(q, k_pages, v_pages, tables, lengths, 0)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-2)
    assert np.abs(np.asarray(got, np.float64) - want).mean() < 4e-3


def test_bad_inputs_and_targets_are_refused_clearly():
    q = jnp.zeros((2, 1, 4, 64), jnp.float32)
    pages = jnp.zeros((5, 16, 2, 64), jnp.float32)
    tables, lengths = jnp.ones((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    gpu = lambda q, k, v, **kw: kernels.paged_attention(q, k, v, tables, lengths, implementation="pallas_gpu",  # noqa: E731
                                                        interpret=True, **kw)
    with pytest.raises(DecodeAttentionError, match="one dtype among bfloat16, float16, float32; got q float32, "
                                                   "k_pages int8"):
        gpu(q, pages.astype(jnp.int8), pages.astype(jnp.int8))
    with pytest.raises(DecodeAttentionError, match="got q bfloat16, k_pages float32"):
        gpu(q.astype(jnp.bfloat16), pages, pages)
    with pytest.raises(DecodeAttentionError, match="head_dim a power of two >= 16 .* got head_dim 96"):
        gpu(jnp.zeros((2, 1, 4, 96)), jnp.zeros((5, 16, 2, 96)), jnp.zeros((5, 16, 2, 96)))
    with pytest.raises(DecodeAttentionError, match="page_size 12"):
        gpu(q, pages[:, :12], pages[:, :12])
    with pytest.raises(DecodeAttentionError, match="pages_per_block must be a power of two"):
        paged_attention_gpu(q, pages[:, :4], pages[:, :4], tables, lengths, pages_per_block=2, interpret=True)
    # compiled (not interpreted) for this CPU: refused when lowering, naming the target
    with pytest.raises(kernels.AttentionConfigError, match="needs an NVIDIA GPU .* being lowered for cpu"):
        jax.jit(lambda q, k, v: kernels.paged_attention(q, k, v, tables, lengths, implementation="pallas_gpu")
                ).lower(q, pages, pages)


# ----------------------------------------------------------------------------- lowered for CUDA (no GPU)

def _sds(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowered_for_cuda_at_phi4_shapes(dtype, monkeypatch):
    """`jax.export` for CUDA runs the Pallas Triton lowering on this CPU; the Triton module of each kernel is
    checked by MLIR's verifier. A decode step (8 sequences x 1 token) and a prefill chunk (1 x 128 tokens) over a
    stacked 4-layer pool of 16-token pages, read at a traced layer index."""
    from jax._src.pallas.triton import pallas_call_registration  # private: where the Triton module is built

    lower_module = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        with result.module.context:
            verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    pages = _sds(4, 300, 16, 10, 128, dtype=dtype)
    fn = jax.jit(lambda q, k, v, tables, n, layer: kernels.paged_attention(q, k, v, tables, n, layer=layer,
                                                                           implementation="pallas_gpu"))
    for b, t in ((8, 1), (1, 128)):
        exported = jax.export.export(
            fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
            _sds(b, t, 40, 128, dtype=dtype), pages, pages, _sds(b, 64, dtype=jnp.int32), _sds(b, dtype=jnp.int32),
            _sds(dtype=jnp.int32))
        module = exported.mlir_module()
        assert module.count(f"stablehlo.custom_call @{TRITON_CALL}") == 1
        assert "paged_attention_gpu" in module
        assert [(tuple(a.shape), a.dtype) for a in exported.out_avals] == [((b, t, 40, 128), jnp.dtype(dtype))]
    assert verified == [True, True]

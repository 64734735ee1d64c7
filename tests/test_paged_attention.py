"""`kernels.paged_attention`: the XLA reference and the Pallas TPU kernel (TPU interpreter on CPU) against the float64
NumPy oracle (tests/numpy_oracle.py) over each sequence's pages laid end to end; Mosaic compiles the kernel for
real TPU generations (libtpu's deviceless topologies); bad shapes are refused clearly."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
from kernel_mode import interpret_for

import kernels
from kernels.decode_attention import DecodeAttentionError
from kernels.paged_attention import paged_attention

INTERPRET = interpret_for("tpu")


def _case(seed, t, d, page):
    """Two layers of pages scattered through a pool (shuffled block tables), GQA 6:2, ragged lengths (one
    sequence shorter than its table, one exactly T long) and T new queries per sequence."""
    rng = np.random.default_rng(seed)
    layers, num_pages, hkv, hq, width = 2, 23, 2, 6, 5
    k_pages = rng.standard_normal((layers, num_pages, page, hkv, d)).astype(np.float32)
    v_pages = rng.standard_normal((layers, num_pages, page, hkv, d)).astype(np.float32)
    lengths = np.array([t, page + 3, width * page, 2 * page + 5], np.int32)
    tables = rng.permutation(np.arange(1, num_pages))[:4 * width].reshape(4, width).astype(np.int32)
    q = rng.standard_normal((4, t, hq, d)).astype(np.float32)
    return q, k_pages, v_pages, tables, lengths


def _oracle(q, k_pages, v_pages, tables, lengths, layer):
    b, w = tables.shape
    k_seq = k_pages[layer][tables].reshape(b, w * k_pages.shape[2], *k_pages.shape[3:])   # pages end to end
    v_seq = v_pages[layer][tables].reshape(b, w * v_pages.shape[2], *v_pages.shape[3:])
    t = q.shape[1]
    return numpy_oracle.attention(q, k_seq, v_seq, causal=True, q_offset=lengths - t, kv_len=lengths)[0]


@pytest.mark.parametrize("t", [1, 5])
def test_reference_matches_float64_oracle(t):
    q, k_pages, v_pages, tables, lengths = _case(t, t, 8, 4)
    for layer in range(2):
        want = _oracle(q, k_pages, v_pages, tables, lengths, layer)
        stacked = paged_attention(q, k_pages, v_pages, tables, lengths, layer=layer)
        one_layer = jax.jit(paged_attention)(q, k_pages[layer], v_pages[layer], tables, lengths)
        np.testing.assert_allclose(np.asarray(stacked), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(one_layer), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_pallas_kernel_matches_float64_oracle(t):
    """head_dim 128 and 8-row pages, as on a TPU; the stacked pool read at a traced layer index."""
    q, k_pages, v_pages, tables, lengths = _case(10 + t, t, 128, 8)
    run = jax.jit(lambda q, k, v, tab, n, layer: paged_attention(q, k, v, tab, n, layer=layer,
                                                                  implementation="pallas", interpret=INTERPRET))
    want = _oracle(q, k_pages, v_pages, tables, lengths, 1)
    np.testing.assert_allclose(np.asarray(run(q, k_pages, v_pages, tables, lengths, 1)), want, rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_are_refused_clearly():
    q = jnp.zeros((2, 1, 4, 8))
    pages = jnp.zeros((5, 4, 3, 8))
    with pytest.raises(DecodeAttentionError, match="multiple of kv heads"):
        paged_attention(q, pages, pages, jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32))
    with pytest.raises(DecodeAttentionError, match="block_tables"):
        paged_attention(q, pages[:, :, :2], pages[:, :, :2], jnp.zeros((3, 3), jnp.int32), jnp.ones((2,), jnp.int32))
    with pytest.raises(DecodeAttentionError, match="with `layer`"):
        paged_attention(q, pages[:, :, :2], pages[:, :, :2], jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32),
                        layer=0)
    with pytest.raises(DecodeAttentionError, match="unknown paged attention implementation"):
        paged_attention(q, pages[:, :, :2], pages[:, :, :2], jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32),
                        implementation="cuda")
    assert kernels.paged_attention is paged_attention


_AOT_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from kernels.pallas_compat import tpu_target
    from kernels.paged_attention import paged_attention_pallas

    device = topologies.get_topology_desc(platform="tpu", topology_name=sys.argv[1]).devices[0]
    sharding = SingleDeviceSharding(device)
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    hq, hkv, d = 40, 10, 128                                     # phi-4 heads
    pages = sds((4, 300, 16, hkv, d), jnp.bfloat16)              # [layers, pages, page_size, kv heads, head_dim]
    int8_pages, scales = sds((4, 300, 16, hkv, d), jnp.int8), sds((4, 300, hkv, 16), jnp.float32)
    fn = lambda q, k, v, ks, vs, tables, n, layer: paged_attention_pallas(q, k, v, tables, n, k_scales=ks,
                                                                          v_scales=vs, layer=layer)
    for t, b in ((1, 8), (128, 1)):                              # a decode step and a prefill chunk
        for kv in ((pages, pages, None, None), (int8_pages, int8_pages, scales, scales)):   # bf16 and int8 pages
            args = (sds((b, t, hq, d), jnp.bfloat16), *kv, sds((b, 64), jnp.int32), sds((b,), jnp.int32),
                    sds((), jnp.int32))
            with tpu_target(device.device_kind, 1):
                lowered = jax.jit(fn).lower(*args)
            lowered.compile()
    print("COMPILED_ALL")
""")


def _libtpu_path() -> str | None:
    if os.environ.get("PHI4_LIBTPU_DIR"):
        return os.environ["PHI4_LIBTPU_DIR"]
    import importlib.util

    return "" if importlib.util.find_spec("libtpu") is not None else None


@pytest.mark.skipif(_libtpu_path() is None,
                    reason="needs libtpu==0.0.42.* (pip install -e '.[tpu-aot]', or PHI4_LIBTPU_DIR) to compile for TPU")
def test_pallas_kernel_compiles_with_mosaic_for_tpu():
    """The full Mosaic compiler (libtpu, no TPU needed) takes the kernel at phi-4's shapes with bf16 pages and with
    int8 pages and their scales."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [_libtpu_path(), root]))}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "v6e:2x2"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert "COMPILED_ALL" in result.stdout, result.stderr[-4000:]

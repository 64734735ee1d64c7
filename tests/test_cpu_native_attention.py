"""The native CPU paged decode attention (kernels/cpu_native/paged_attention.cc, `kernels.cpu_native.paged_attention`)
against float64 NumPy written from `kernels.paged_attention`'s contract (not against our XLA path).

Query t of sequence b sits at position lengths[b] - T + t and attends, with a softmax, over positions 0 .. that
position (at most the W * page_size its block table holds) of its pages, key/value of position p in page
block_tables[b, p // page_size] row p % page_size; query head h reads kv head h // (Hq / Hkv). The reference below
says exactly that, one row at a time. The pools are random everywhere (every page a sequence does not read is
garbage), the block tables scatter each sequence's pages in non-increasing order with unread entries pointing at
arbitrary valid pages, and the rows of a sequence's last page past its length hold NaN and inf (never written in the
engine's sense: a kernel that multiplied them by a zero probability would return NaN). The engine-level checks (the
CPU engine with this kernel against transformers, and its compiled step containing the custom call) are in
tests/test_batching.py and tests/test_cpu_bf16.py.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu_native
from kernels.cpu_native import NativeKernelError

TARGET = "phi4_cpu_paged_attention"


def test_native_kernels_build_where_a_compiler_exists():
    """CI has g++: the kernels must build there, so the tests below cannot all skip silently."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    if cpu_native.disabled_on_purpose():
        pytest.skip(cpu_native.unavailable_reason())
    assert cpu_native.available(TARGET), cpu_native.unavailable_reason()


@pytest.fixture(scope="module")
def native():
    if not cpu_native.available(TARGET):
        pytest.skip(f"native CPU kernels unavailable: {cpu_native.unavailable_reason()}")
    return jax.jit(cpu_native.paged_attention, static_argnames="sm_scale")


def bf16_bits(x):
    """float32 -> (bfloat16 bits as uint16, the bfloat16 values widened to float64)."""
    bits = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16))
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def reference(q, k, v, tables, lengths, sm_scale=None):
    """float64, from the definition; a row that sees no position is zeros; page ids clamped into the pool."""
    b_, t_, hq, d = q.shape
    num_pages, page, hkv, _ = k.shape
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros(q.shape, np.float64)
    for b in range(b_):
        for t in range(t_):
            n = int(np.clip(lengths[b] - t_ + t + 1, 0, tables.shape[1] * page))
            pages = np.clip(tables[b, np.arange(n) // page], 0, num_pages - 1)
            rows = np.arange(n) % page
            for h in range(hq):
                if n == 0:
                    continue
                keys, values = k[pages, rows, h // group], v[pages, rows, h // group]       # [n, D]
                s = keys @ q[b, t, h].astype(np.float64) * scale
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ values
    return out


def make_case(seed, *, batch_lengths, t, hq, hkv, d, page, width, num_pages, poison=True):
    """Random q and pools; each sequence's pages scattered through the pool in non-increasing order, table entries
    past its last page pointing at arbitrary valid pages, and (with `poison`) the unwritten rows of its last page
    NaN/inf."""
    rng = np.random.default_rng(seed)
    b = len(batch_lengths)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32) * 2
    v = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    lengths = np.array(batch_lengths, np.int32)
    tables = rng.integers(0, num_pages, (b, width)).astype(np.int32)         # garbage-but-valid by default
    free = rng.permutation(num_pages)
    for i, n in enumerate(lengths):
        used = -(-int(n) // page)
        ids = np.sort(free[:used])[::-1]                                     # scattered, non-increasing
        free = free[used:]
        tables[i, :used] = ids
        if poison and n % page:
            k[ids[-1], n % page:] = np.inf
            v[ids[-1], n % page:] = np.nan
    return q, k, v, tables, lengths


def check(native, case, *, bits=False, sm_scale=None, rtol=1e-5):
    q, k, v, tables, lengths = case
    if bits:
        (k, k64), (v, v64) = bf16_bits(k), bf16_bits(v)
    else:
        k64, v64 = k.astype(np.float64), v.astype(np.float64)
    got = np.asarray(native(q, k, v, tables, lengths, sm_scale=sm_scale))
    want = reference(q, k64, v64, tables, lengths, sm_scale)
    assert got.dtype == np.float32 and got.shape == q.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    return got


# Sequences of lengths on a page boundary (8, 32), just past one (9, 33), inside the first page (3) and the
# table's whole capacity (48 = 12 pages of 4).
DECODE = dict(batch_lengths=(3, 8, 9, 33, 48, 32), t=1, hq=6, hkv=2, d=32, page=4, width=12, num_pages=80)


def test_decode_one_token(native):
    check(native, make_case(0, **DECODE))


def test_decode_bfloat16_bits_pages(native):
    check(native, make_case(1, **DECODE), bits=True)


def test_decode_custom_scale_and_group_one(native):
    check(native, make_case(2, **dict(DECODE, hq=2, hkv=2, d=16)), sm_scale=0.37)


def test_chunk_of_new_tokens_is_causal(native):
    """T = 24 new tokens (more than one unit of query rows: the kernel splits them), GQA 3:1, head_dim 64."""
    case = make_case(3, batch_lengths=(24, 30, 41, 63), t=24, hq=6, hkv=2, d=64, page=16, width=4, num_pages=20)
    check(native, case)
    check(native, case, bits=True)


def test_one_sequence_one_kv_head_splits_a_long_chunk(native):
    """B = 1, Hkv = 1: the work units are chunks of the new tokens only (both threads must get some); head_dim
    128."""
    check(native, make_case(4, batch_lengths=(70,), t=40, hq=4, hkv=1, d=128, page=8, width=9, num_pages=12))


def test_table_entries_outside_the_pool_are_clamped(native):
    """An out-of-range page id in an entry that is read reads the nearest valid page (never out of bounds)."""
    q, k, v, tables, lengths = make_case(5, **DECODE, poison=False)
    tables[1, 0], tables[3, 2], tables[4, 11] = 1 << 30, -7, DECODE["num_pages"]
    check(native, (q, k, v, tables, lengths))


def test_lengths_outside_the_contract(native):
    """lengths < T (a row that sees no position: zeros, the rows after it see 1, 2, .. positions) and lengths past
    the table's capacity (every position the table holds is seen); head_dim 48 (the kernel's generic loop)."""
    q, k, v, tables, _ = make_case(6, batch_lengths=(8, 8), t=3, hq=4, hkv=2, d=48, page=4, width=2, num_pages=6,
                                   poison=False)
    lengths = np.array([1, 50], np.int32)
    got = check(native, (q, k, v, tables, lengths))
    assert (got[0, :2] == 0).all() and (got[0, 2] != 0).all()


@pytest.mark.parametrize("change, message", [
    (dict(k=np.zeros((4, 4, 2, 16), np.float16), v=np.zeros((4, 4, 2, 16), np.float16)), "float32 or uint16"),
    (dict(k=np.zeros((4, 4, 2, 16), np.uint16)), "k_pages and v_pages differ"),
    (dict(q=np.zeros((1, 1, 4, 24), np.float32), k=np.zeros((4, 4, 2, 24), np.float32),
          v=np.zeros((4, 4, 2, 24), np.float32)), "multiple of 16, got 24"),
    (dict(q=np.zeros((1, 1, 5, 16), np.float32)), r"query heads \(5\) must be a multiple of kv heads \(2\)"),
    (dict(v=np.zeros((4, 8, 2, 16), np.float32)), "k_pages and v_pages differ"),
    (dict(q=np.zeros((1, 4, 16), np.float32)), "q must be"),
    (dict(q=np.zeros((1, 1, 4, 32), np.float32)), "disagree in head_dim"),
    (dict(tables=np.zeros((2, 3), np.int32)), "block_tables must be integer"),
    (dict(tables=np.zeros((1, 0), np.int32)), "at least one page"),
    (dict(lengths=np.ones(1, np.float32)), "lengths must be integer"),
    (dict(k=np.zeros((0, 4, 2, 16), np.float32), v=np.zeros((0, 4, 2, 16), np.float32)), "page pool is empty"),
])
def test_bad_arguments_are_named(native, change, message):
    args = dict(q=np.zeros((1, 1, 4, 16), np.float32), k=np.zeros((4, 4, 2, 16), np.float32),
                v=np.zeros((4, 4, 2, 16), np.float32), tables=np.zeros((1, 3), np.int32),
                lengths=np.ones(1, np.int32))
    args.update(change)
    with pytest.raises(NativeKernelError, match=message):
        cpu_native.paged_attention(args["q"], args["k"], args["v"], args["tables"], args["lengths"])


@pytest.mark.parametrize("shapes, message", [
    (((1, 1, 4, 24), (4, 4, 2, 24), np.float32), "head_dim must be a positive multiple of 16"),
    (((1, 1, 4, 16), (4, 4, 2, 16), np.int32), "pages must be float32 or bfloat16 bits"),
    (((1, 1, 3, 16), (4, 4, 2, 16), np.float32), "query heads must be a multiple of kv heads"),
])
def test_the_kernel_itself_rejects_what_the_wrapper_would(native, shapes, message):
    """The C++ handler validates too (a caller of the FFI target that skips the wrapper gets an error, not a
    crash)."""
    q_shape, page_shape, dtype = shapes
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_shape, jnp.float32))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(call(np.zeros(q_shape, np.float32), np.zeros(page_shape, dtype),
                                   np.zeros(page_shape, dtype), np.zeros((1, 2), np.int32), np.ones(1, np.int32),
                                   sm_scale=np.float32(1.0)))

"""Test oracle: attention and RoPE in float64 NumPy, written from their definitions.

Independent of `kernels/` (no shared mask helper, no JAX): every kernel test can compare against this as well
as against the pure-JAX references, so a mistake shared by a kernel and its reference still shows.

- `attention(q, k, v, ...)`: for each batch row and query head h (kv head h // (Hq / Hkv)), the scores
  s_ij = scale * q_i . k_j over the keys query i may see (j <= its position when causal, the position being
  q_offset + i for a query chunk of a longer key sequence; same segment id when segment ids are given, the keys'
  own `kv_segment_ids` when they differ from the queries'; j < kv_len), a float64 softmax over those keys, and
  out_i = sum_j p_ij v_j. Returns the output [B, Sq, Hq, D] and the log-sum-exp [B, Hq, Sq] of the visible scores.
- `attention_vjp(q, k, v, dout, ...)`: dq, dk, dv from the analytic softmax-attention gradients
  (dv = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dq = scale dS K, dk = scale dS^T Q; kv-head
  gradients summed over the query heads that share them). `tests/test_numpy_oracle.py` checks them against
  float64 central finite differences.
- `rope(x, positions, theta)`: NeoX rotate-half, inv_freq_i = theta^(-2i/D), angle = position * inv_freq,
  out = x cos(emb) + rotate_half(x) sin(emb), emb = concat(angles, angles), rotate_half(x) = concat(-x2, x1);
  `rope(..., inverse=True)` rotates back (the gradient of a rotation is its transpose).
- `dequant_matmul(x, values, scales, bits=..., group_size=...)`: x @ W.T with W[n, k] = q[n, k] *
  scales[n, k // group_size], q the int8 values or, for 4 bits, byte j's low nibble (k = 2j) and high nibble
  (k = 2j + 1), each read as a 4-bit two's complement number.
- `top_k_kept(logits, k)`: a row's k largest logits by a float64 sort, every value tied with the k-th largest
  kept; k <= 0 or >= V keeps all.
- `nucleus(logits, top_p)`: the top-p (nucleus) of one row by the sorted definition: float64 softmax, tokens in
  descending order, each kept while the mass before it is below top_p (top_p >= 1 keeps all); returns the kept
  mask and each token's preceding mass (to tell the tokens decided within rounding of top_p).
Inputs may be JAX or NumPy arrays of any float dtype; everything is computed in float64.
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)  # bf16 (ml_dtypes) included


def visible(sq: int, sk: int, *, causal: bool, segment_ids=None, q_offset=None, kv_len=None, batch: int = 1,
            kv_segment_ids=None):
    """Boolean [B, Sq, Sk]: which keys each query sees. Query i of row b sits at position q_offset[b] + i
    (default 0: queries and keys are the same sequence); key j sits at position j. `segment_ids` [B, Sq] are the
    queries' segments and `kv_segment_ids` [B, Sk] the keys' (default: the same array)."""
    q_offset = np.zeros(batch, np.int64) if q_offset is None else np.broadcast_to(np.asarray(q_offset), (batch,))
    kv_len = np.full(batch, sk) if kv_len is None else np.broadcast_to(np.asarray(kv_len), (batch,))
    seg = None if segment_ids is None else np.asarray(segment_ids)
    kv_seg = seg if kv_segment_ids is None else np.asarray(kv_segment_ids)
    i = np.arange(sq)[None, :, None]
    j = np.arange(sk)[None, None, :]
    out = np.broadcast_to(j < kv_len[:, None, None], (batch, sq, sk))
    if causal:
        out = out & (j <= q_offset[:, None, None] + i)
    if seg is not None:
        out = out & (seg[:, :, None] == kv_seg[:, None, :])
    return out


def _probs(q, k, mask, scale, b, h, group):
    """Scores and float64 softmax of one (batch row, query head); masked keys get probability 0."""
    s = scale * (q[b, :, h, :] @ k[b, :, h // group, :].T)          # [Sq, Sk]
    s = np.where(mask[b], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    z = e.sum(axis=-1, keepdims=True)
    return e / z, (m + np.log(z))[:, 0]


def attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, q_offset=None, kv_len=None,
              kv_segment_ids=None):
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq]) in float64 (masking as in `visible`). Every query must see at least
    one key."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    assert hq % hkv == 0, (hq, hkv)
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    mask = visible(sq, sk, causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_len=kv_len, batch=bsz,
                   kv_segment_ids=kv_segment_ids)
    assert mask.any(axis=-1).all(), "a query sees no key: attention is undefined there"
    out = np.zeros((bsz, sq, hq, v.shape[-1]))
    lse = np.zeros((bsz, hq, sq))
    for b in range(bsz):
        for h in range(hq):
            p, lse[b, h] = _probs(q, k, mask, scale, b, h, group)
            out[b, :, h, :] = p @ v[b, :, h // group, :]
    return out, lse


def attention_vjp(q, k, v, dout, *, causal=True, segment_ids=None, sm_scale=None, q_offset=None,
                  kv_segment_ids=None):
    """(dq, dk, dv) of sum(out * dout), float64, by the analytic formulas (see the module docstring); masking
    as in `visible` (q [B, Sq, ...] may be a chunk at `q_offset` of the keys [B, Sk, ...])."""
    q, k, v, dout = _f64(q), _f64(k), _f64(v), _f64(dout)
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    mask = visible(sq, sk, causal=causal, segment_ids=segment_ids, q_offset=q_offset, batch=bsz,
                   kv_segment_ids=kv_segment_ids)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(bsz):
        for h in range(hq):
            kh = h // group
            p, _ = _probs(q, k, mask, scale, b, h, group)
            do = dout[b, :, h, :]
            out = p @ v[b, :, kh, :]
            dv[b, :, kh, :] += p.T @ do
            dp = do @ v[b, :, kh, :].T
            ds = p * (dp - np.sum(do * out, axis=-1, keepdims=True))
            dq[b, :, h, :] = scale * ds @ k[b, :, kh, :]
            dk[b, :, kh, :] += scale * ds.T @ q[b, :, h, :]
    return dq, dk, dv


def rope(x, positions, theta, *, inverse=False):
    """x [B, S, H, D] rotated by NeoX rotate-half RoPE at integer positions [B, S], float64."""
    x = _f64(x)
    d = x.shape[-1]
    assert d % 2 == 0, d
    inv_freq = np.asarray(theta, np.float64) ** (-np.arange(0, d, 2, dtype=np.float64) / d)   # [D/2]
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq                           # [B, S, D/2]
    emb = np.concatenate([angles, angles], axis=-1)[:, :, None, :]                             # [B, S, 1, D]
    sin = -np.sin(emb) if inverse else np.sin(emb)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotate_half = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(emb) + rotate_half * sin


def rope_angle_tolerance(positions, x, *, ulps=4.0):
    """Per-element [B, S, 1, 1] bound on |fp32-angle RoPE - float64 RoPE|: the contract computes angles in
    float32, whose rounding error at position p is about p * 2^-24 per ulp; `ulps` allows the product, the
    frequency's own rounding and cos/sin, each of which can move the angle by an ulp or so."""
    p = np.asarray(positions, np.float64)[..., None, None]
    return ulps * np.max(np.abs(_f64(x))) * np.maximum(p, 1.0) * 2.0 ** -24


# ----------------------------------------------------------------------------- comparing a JAX function

def attention_errors(fn, q, k, v, dout=None, *, causal=True, segment_ids=None, sm_scale=None, q_offset=None,
                     kv_segment_ids=None):
    """Runs `fn(q, k, v)` (and, with `dout`, its VJP) and measures it against the oracle on the same inputs
    (as given: bf16 inputs are compared with the exact attention of their bf16 values).

    Returns {name: (max |fn - oracle|, max |oracle|)} for "out" and, with dout, "dq", "dk", "dv".
    """
    import jax  # the oracle itself is NumPy-only

    kw = {"causal": causal, "segment_ids": segment_ids, "sm_scale": sm_scale, "q_offset": q_offset,
          "kv_segment_ids": kv_segment_ids}
    want = {"out": attention(q, k, v, **kw)[0]}
    if dout is None:
        got = {"out": fn(q, k, v)}
    else:
        out, vjp = jax.vjp(fn, q, k, v)
        dout = jax.numpy.asarray(dout).astype(out.dtype)  # the cotangent fn sees is the one the oracle uses
        got = dict(zip(("out", "dq", "dk", "dv"), (out, *vjp(dout))))
        want.update(zip(("dq", "dk", "dv"), attention_vjp(q, k, v, dout, **kw)))
    errors = {}
    for name, w in want.items():
        g = _f64(got[name])
        assert g.shape == w.shape, (name, g.shape, w.shape)
        errors[name] = (float(np.max(np.abs(g - w))), float(np.max(np.abs(w))))
    return errors


def assert_attention_close(fn, q, k, v, dout=None, *, causal=True, segment_ids=None, sm_scale=None,
                           q_offset=None, kv_segment_ids=None, out_atol, grad_rtol=None):
    """`fn` against the oracle: output within `out_atol`; each gradient within `grad_rtol` times the largest
    magnitude of the oracle's gradient. Returns the errors (see `attention_errors`)."""
    errors = attention_errors(fn, q, k, v, dout, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                              q_offset=q_offset, kv_segment_ids=kv_segment_ids)
    err, _ = errors["out"]
    assert err <= out_atol, f"output differs from the float64 oracle by {err:.3g} > {out_atol:.3g}"
    for name in ("dq", "dk", "dv"):
        if name in errors:
            err, scale = errors[name]
            assert scale > 0.1, f"{name}: the oracle's gradient is too small to compare ({scale:.3g})"
            assert err <= grad_rtol * scale, (
                f"{name} differs from the float64 oracle by {err:.3g} > {grad_rtol:.3g} x max|{name}| {scale:.3g}")
    return errors


def dequant_matmul(x, values, scales, *, bits: int, group_size: int) -> np.ndarray:
    """[M, N] float64: x [M, K] times the dequantized W [N, K] (see the module docstring)."""
    v = np.asarray(values)
    if bits == 4:
        u = v.view(np.uint8).astype(np.int64)
        nibbles = np.empty((u.shape[0], 2 * u.shape[1]), np.int64)
        nibbles[:, 0::2], nibbles[:, 1::2] = u % 16, u // 16
        q = np.where(nibbles >= 8, nibbles - 16, nibbles)
    else:
        q = v.astype(np.int64)
    s = np.repeat(_f64(scales), group_size, axis=1)
    return _f64(x) @ (q * s).T


def top_k_kept(logits, k: int) -> np.ndarray:
    row = _f64(logits)
    if k <= 0 or k >= row.shape[-1]:
        return np.ones(row.shape, bool)
    return row >= np.sort(row)[-k]


def nucleus(logits, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    row = _f64(logits)
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    before = np.empty_like(probs)
    before[order] = np.cumsum(probs[order]) - probs[order]
    return (before < top_p) | (top_p >= 1.0), before

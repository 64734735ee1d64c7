// Paged decode attention read in place from the page pool (`kernels.paged_attention`'s contract, one layer's pool):
// q [B, T, Hq, D] float32; k_pages, v_pages [num_pages, page_size, Hkv, D] float32 or bfloat16 bits (uint16,
// widened exactly); block_tables [B, W] int32; lengths [B] int32; attribute sm_scale; out [B, T, Hq, D] float32.
// Query t of sequence b sits at position lengths[b] - T + t and sees positions 0 .. that position (at most the
// W * page_size positions its block table holds); query head h * group + g reads kv head h (group = Hq / Hkv).
//
// Work unit: (sequence, kv head, chunk of new tokens), all group * chunk query rows of that kv head at once, so a
// block of 16 keys and values is read from its pages (and widened to float32) once for all of them. Each row keeps
// a float32 online softmax (running max, sum, accumulator [D]). Scores of a row against the block's 16 keys are 16
// head_dim-long dots vectorized along head_dim, reduced into one 16-lane vector by a transposing add tree; the
// exponentials are a 16-lane polynomial. Keys past a row's visible length are skipped (their values are never
// multiplied, so stale or non-finite values in unused rows of a page cannot reach the output). Page ids are clamped
// into the pool (an out-of-range id reads a valid page, never out of bounds); a row that sees no position (lengths
// smaller than T: outside the contract) comes out as zeros. Units are split among the threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace phi4_cpu {
namespace {

constexpr int kBlock = 16;          // keys per block: one 16-lane vector of scores per row
constexpr int64_t kMaxRows = 32;    // query rows per work unit (group * tokens) when the group allows

// Lane j of the result = the sum of the 16 lanes of a[j] (a transposing add tree: 15 shuffle pairs).
inline f32x16 reduce16x16(const f32x16* a) {
  f32x16 r1[8], r2[4], r3[2];
  for (int i = 0; i < 8; ++i) {
    const f32x16 x = a[2 * i], y = a[2 * i + 1];
    r1[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const f32x16 x = r1[2 * i], y = r1[2 * i + 1];
    r2[i] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const f32x16 x = r2[2 * i], y = r2[2 * i + 1];
    r3[i] = __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(r3[0], r3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(r3[0], r3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The max of the 16 lanes by halving (common.h's hsum16 sums them).
inline float hmax16(f32x16 v) {
  v = v > __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
          ? v : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
          ? v : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
          ? v : __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] > v[1] ? v[0] : v[1];
}

struct Shape {
  int64_t B, T, Hq, D, N, P, Hkv, W, group;
};

// One unit: sequence b, kv head h, new tokens t0 .. t1 - 1; NV = D / 16 when it is a compile-time constant (the
// loops over head_dim unroll), else 0 (read from s.D). Scratch (`scratch_floats`): rows * D floats of queries and of
// accumulators, 2 * kBlock * D floats of widened keys and values, and 2 * rows of running max and sum.
template <int NV, typename E>
void attend_unit(const Shape& s, const float* q, const E* kp, const E* vp, const int32_t* tables,
                 const int32_t* lengths, float sm_scale, float* out, int64_t b, int64_t h, int64_t t0, int64_t t1,
                 float* scratch) {
  const int64_t nv = NV > 0 ? NV : s.D / 16, D = 16 * nv, group = s.group, rows = group * (t1 - t0);
  float* qs = scratch;                 // [rows, D] scaled queries, row r = (t - t0) * group + g
  float* acc = qs + rows * D;          // [rows, D]
  float* kb = acc + rows * D;          // [kBlock, D]
  float* vb = kb + kBlock * D;         // [kBlock, D]
  float* m = vb + kBlock * D;          // [rows] running max
  float* l = m + rows;                 // [rows] running sum
  const int64_t capacity = s.W * s.P;
  int64_t n_max = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pos = int64_t(lengths[b]) - s.T + t;
    const int64_t n = std::min(std::max<int64_t>(pos + 1, 0), capacity);
    n_max = std::max(n_max, n);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (t - t0) * group + g;
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.f;
      const float* src = q + ((b * s.T + t) * s.Hq + h * group + g) * D;
      for (int64_t c = 0; c < nv; ++c) {
        store16(qs + r * D + 16 * c, load16(src + 16 * c) * sm_scale);
        store16(acc + r * D + 16 * c, f32x16{});
      }
    }
  }
  const int32_t* table = tables + b * s.W;
  for (int64_t c0 = 0; c0 < n_max; c0 += kBlock) {
    const int64_t nk = std::min<int64_t>(kBlock, n_max - c0);
    int64_t entry = c0 / s.P, row = c0 - entry * s.P;        // key c0 + j: table entry, row in its page
    for (int64_t j = 0; j < kBlock; ++j) {
      if (j < nk) {
        const int64_t page = std::min<int64_t>(std::max<int32_t>(table[entry], 0), s.N - 1);
        const int64_t off = ((page * s.P + row) * s.Hkv + h) * D;
        for (int64_t v = 0; v < nv; ++v) {
          store16(kb + j * D + 16 * v, load16(kp + off + 16 * v));
          store16(vb + j * D + 16 * v, load16(vp + off + 16 * v));
        }
        if (++row == s.P) row = 0, ++entry;
      } else {
        for (int64_t v = 0; v < nv; ++v) store16(kb + j * D + 16 * v, f32x16{});
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = int64_t(lengths[b]) - s.T + t0 + r / group;
      const int64_t visible = std::min(std::max<int64_t>(pos + 1, 0), capacity);
      const int64_t valid = std::min<int64_t>(visible - c0, kBlock);
      if (valid <= 0) continue;
      const float* qr = qs + r * D;
      f32x16 dots[kBlock];
      for (int j = 0; j < kBlock; ++j) {
        f32x16 a = load16(qr) * load16(kb + j * D);
        for (int64_t v = 1; v < nv; ++v) a += load16(qr + 16 * v) * load16(kb + j * D + 16 * v);
        dots[j] = a;
      }
      f32x16 scores = reduce16x16(dots);
      i32x16 lane;
      for (int j = 0; j < kBlock; ++j) lane[j] = j;
      const i32x16 live = lane < int32_t(valid);
      scores = live ? scores : f32x16{} - std::numeric_limits<float>::infinity();
      const float m_new = std::max(m[r], hmax16(scores));
      const f32x16 p = live ? exp16(scores - m_new) : f32x16{};
      const float corr = std::exp(m[r] - m_new);     // 0 on the first visible block (m = -inf)
      l[r] = l[r] * corr + hsum16(p);
      m[r] = m_new;
      float* ar = acc + r * D;
      for (int64_t v = 0; v < nv; ++v) {
        f32x16 a = load16(ar + 16 * v) * corr;
        for (int64_t j = 0; j < valid; ++j) a += p[j] * load16(vb + j * D + 16 * v);
        store16(ar + 16 * v, a);
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (t - t0) * group + g;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      float* dst = out + ((b * s.T + t) * s.Hq + h * group + g) * D;
      for (int64_t v = 0; v < nv; ++v) store16(dst + 16 * v, load16(acc + r * D + 16 * v) * inv);
    }
}

// attend_unit with head_dim's vector count fixed at compile time for the usual head sizes (16, 32, 64, 128).
template <typename E>
void unit(const Shape& s, const float* q, const E* kp, const E* vp, const int32_t* tables, const int32_t* lengths,
          float sm_scale, float* out, int64_t b, int64_t h, int64_t t0, int64_t t1, float* scratch) {
  switch (s.D / 16) {
    case 1: return attend_unit<1>(s, q, kp, vp, tables, lengths, sm_scale, out, b, h, t0, t1, scratch);
    case 2: return attend_unit<2>(s, q, kp, vp, tables, lengths, sm_scale, out, b, h, t0, t1, scratch);
    case 4: return attend_unit<4>(s, q, kp, vp, tables, lengths, sm_scale, out, b, h, t0, t1, scratch);
    case 8: return attend_unit<8>(s, q, kp, vp, tables, lengths, sm_scale, out, b, h, t0, t1, scratch);
    default: return attend_unit<0>(s, q, kp, vp, tables, lengths, sm_scale, out, b, h, t0, t1, scratch);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                          ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> lengths,
                          float sm_scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  const auto bd = block_tables.dimensions(), ld = lengths.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument(
        "paged_attention: q must be [batch, new_tokens, heads, head_dim] and the pages [num_pages, page_size, "
        "kv_heads, head_dim]");
  if (vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument("paged_attention: k_pages and v_pages differ in shape");
  if (k_pages.element_type() != v_pages.element_type())
    return ffi::Error::InvalidArgument("paged_attention: k_pages and v_pages differ in dtype");
  const bool bits16 = k_pages.element_type() == ffi::U16;
  if (!bits16 && k_pages.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("paged_attention: pages must be float32 or bfloat16 bits (uint16)");
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[2], 0, 0};
  if (kd[3] != s.D) return ffi::Error::InvalidArgument("paged_attention: q and the pages differ in head_dim");
  if (s.D % 16 != 0 || s.D == 0)
    return ffi::Error::InvalidArgument("paged_attention: head_dim must be a positive multiple of 16");
  if (s.Hkv < 1 || s.Hq % s.Hkv != 0)
    return ffi::Error::InvalidArgument("paged_attention: query heads must be a multiple of kv heads");
  if (s.N < 1 || s.P < 1) return ffi::Error::InvalidArgument("paged_attention: the page pool is empty");
  if (bd.size() != 2 || bd[0] != s.B || bd[1] < 1)
    return ffi::Error::InvalidArgument("paged_attention: block_tables must be [batch, pages_per_sequence >= 1]");
  if (ld.size() != 1 || ld[0] != s.B) return ffi::Error::InvalidArgument("paged_attention: lengths must be [batch]");
  if (od.size() != 4 || od[0] != s.B || od[1] != s.T || od[2] != s.Hq || od[3] != s.D)
    return ffi::Error::InvalidArgument("paged_attention: the output must have q's shape");
  s.W = bd[1];
  s.group = s.Hq / s.Hkv;
  if (s.B == 0 || s.T == 0) return ffi::Error::Success();

  // Tokens per unit: as many as fit kMaxRows rows, fewer when that leaves threads without a unit.
  const int64_t heads = s.B * s.Hkv;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t chunk = std::max<int64_t>(kMaxRows / s.group, 1);
  if (heads * ((s.T + chunk - 1) / chunk) < threads) {
    const int64_t want = (threads + heads - 1) / heads;          // chunks per (sequence, kv head)
    chunk = std::max<int64_t>((s.T + want - 1) / want, 1);
  }
  chunk = std::min(chunk, s.T);
  const int64_t chunks = (s.T + chunk - 1) / chunk;
  const int64_t units = heads * chunks;
  const int64_t parts = parts_for(pool, units);
  const int64_t rows = s.group * chunk;
  const int64_t scratch_floats = (2 * rows + 2 * kBlock) * s.D + 2 * rows;

  const float* qp = q.typed_data();
  const int32_t* tp = block_tables.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, parts, [&](int64_t i) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t u = units * i / parts; u < units * (i + 1) / parts; ++u) {
      const int64_t b = u / (s.Hkv * chunks), h = (u / chunks) % s.Hkv, c = u % chunks;
      const int64_t t0 = c * chunk, t1 = std::min(s.T, t0 + chunk);
      if (bits16) {
        unit(s, qp, k_pages.typed_data<uint16_t>(), v_pages.typed_data<uint16_t>(), tp, lp, sm_scale, op, b, h, t0,
             t1, scratch.data());
      } else {
        unit(s, qp, k_pages.typed_data<float>(), v_pages.typed_data<float>(), tp, lp, sm_scale, op, b, h, t0, t1,
             scratch.data());
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace phi4_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(Phi4CpuPagedAttention, phi4_cpu::PagedAttention,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

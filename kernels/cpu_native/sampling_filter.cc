// The sampled rows' top-k and top-p (nucleus) restriction of float32 logits x [B, V] -> [B, V]: x where a token is
// kept, -inf elsewhere. Row b keeps its top_k[b] largest logits (0 or >= V: all; ties with the k-th largest all
// kept), then, of what is left, the nucleus of mass top_p[b] (>= 1: all). The same definitions as
// phi4_jax/inference/sampling.py's top_k_mask and top_p_mask, with the same exact threshold searches:
//   - top-k: the k-th largest value is the largest 32-bit order-preserving key t with count(key >= t) >= k, found
//     by halving [0, max key] (32 counting passes over the row, in cache; -0.0 and +0.0 one key); the answer is
//     exactly XLA's.
//   - top-p: probabilities p = exp(x - max) / sum, then tau = the smallest non-negative float32 whose mass above
//     (the sum of p_i > tau) is below top_p, by halving over the float's bits (31 passes); the nucleus is p >= tau.
//     The sums here are float32 lanes added into a double per block, XLA's are its own reduction order, and the
//     exponentials a polynomial (common.h's exp16): a token whose inclusion is decided by a rounding-level tie
//     with top_p may differ from the XLA path, never a token clearly inside or outside the nucleus. A row holding
//     +inf is kept whole here (XLA's softmax turns it into NaN, which masks every token).
// XLA:CPU runs each pass as a separate reduction over [B, V] (~10 ms for top-p over 8 rows of a 100K vocabulary);
// here a row's passes read its key/probability copy from cache. Rows are split among the threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace phi4_cpu {
namespace {

typedef uint32_t u32x16u __attribute__((vector_size(64), aligned(4)));

inline uint32_t ordered_key(float f) {
  if (f == 0.0f) f = 0.0f;                                // -0.0 and +0.0 compare equal: one key
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits >= 0x80000000u ? ~bits : (bits | 0x80000000u);
}

// count(keys >= t) over V keys (the last V % 16 scalar).
int64_t count_at_least(const uint32_t* keys, int64_t V, uint32_t t) {
  const u32x16 tv = u32x16{} + t;
  i32x16 acc{};
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) acc -= (i32x16)(*reinterpret_cast<const u32x16u*>(keys + i) >= tv);
  int64_t n = 0;
  for (int l = 0; l < 16; ++l) n += acc[l];
  for (; i < V; ++i) n += keys[i] >= t;
  return n;
}

// The sum of the p_i > t (float32 lanes per block of 4096, blocks added in double).
double mass_above(const float* p, int64_t V, float t) {
  const f32x16 tv = f32x16{} + t;
  double total = 0.0;
  int64_t i = 0;
  while (i + 16 <= V) {
    f32x16 acc{};
    const int64_t end = std::min<int64_t>(V - V % 16, i + 4096);
    for (; i < end; i += 16) {
      const f32x16 v = load16(p + i);
      acc += v > tv ? v : f32x16{};
    }
    total += hsum16(acc);
  }
  for (; i < V; ++i) total += p[i] > t ? p[i] : 0.0f;
  return total;
}

void filter_row(const float* x, int64_t V, int32_t k, float top_p, float* out, std::vector<uint32_t>& keys,
                std::vector<float>& probs) {
  std::memcpy(out, x, sizeof(float) * V);
  if (k > 0 && k < V) {
    keys.resize(V);
    uint32_t lo = 0, hi = 0;
    for (int64_t i = 0; i < V; ++i) {
      keys[i] = ordered_key(x[i]);
      hi = keys[i] > hi ? keys[i] : hi;
    }
    for (int it = 0; it < 32 && lo < hi; ++it) {       // invariant: count(keys >= lo) >= k
      const uint32_t mid = hi - (hi - lo) / 2;        // the upper middle, without lo + hi + 1 wrapping
      if (count_at_least(keys.data(), V, mid) >= k) lo = mid; else hi = mid - 1;
    }
    for (int64_t i = 0; i < V; ++i)
      if (keys[i] < lo) out[i] = -INFINITY;
  }
  if (!(top_p < 1.0f)) return;
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = out[i] > m ? out[i] : m;
  if (!std::isfinite(m)) return;   // +inf in the row (XLA's softmax makes it NaN and masks all): keep the row
  probs.resize(V);
  float* p = probs.data();
  const f32x16 mv = f32x16{} + m;
  double sum = 0.0;
  int64_t i = 0;
  while (i + 16 <= V) {                                   // float32 lanes per block of 4096, blocks in double
    f32x16 acc{};
    const int64_t end = std::min<int64_t>(V - V % 16, i + 4096);
    for (; i < end; i += 16) {
      const f32x16 e = exp16(load16(out + i) - mv);
      store16(p + i, e);
      acc += e;
    }
    sum += hsum16(acc);
  }
  for (; i < V; ++i) {
    p[i] = std::exp(out[i] - m);
    sum += p[i];
  }
  const float inv = float(1.0 / sum);
  float pmax = 0.0f;
  for (int64_t j = 0; j < V; ++j) {
    p[j] *= inv;
    pmax = p[j] > pmax ? p[j] : pmax;
  }
  int32_t lo, hi;                                         // bits of non-negative floats order like the numbers
  std::memcpy(&hi, &pmax, sizeof(hi));
  lo = 0;
  for (int it = 0; it < 31 && lo < hi; ++it) {          // invariant: mass_above(hi) < top_p
    const int32_t mid = lo + (hi - lo) / 2;
    float t;
    std::memcpy(&t, &mid, sizeof(t));
    if (mass_above(p, V, t) < double(top_p)) hi = mid; else lo = mid + 1;
  }
  float tau;
  std::memcpy(&tau, &hi, sizeof(tau));
  for (int64_t j = 0; j < V; ++j)
    if (!(p[j] >= tau)) out[j] = -INFINITY;
}

ffi::Error SamplingFilter(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> top_k,
                          ffi::Buffer<ffi::F32> top_p, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] < 1) return ffi::Error::InvalidArgument("sampling_filter: x must be [B, V], V >= 1");
  const int64_t B = xd[0], V = xd[1];
  if (top_k.dimensions().size() != 1 || top_k.dimensions()[0] != B || top_p.dimensions().size() != 1 ||
      top_p.dimensions()[0] != B)
    return ffi::Error::InvalidArgument("sampling_filter: top_k and top_p must be [B] for x [B, V]");
  const float* xp = x.typed_data();
  const int32_t* kp = top_k.typed_data();
  const float* pp = top_p.typed_data();
  float* op = out->typed_data();
  const int64_t parts = parts_for(pool, B);
  parallel_for(pool, parts, [&](int64_t part) {
    std::vector<uint32_t> keys;
    std::vector<float> probs;
    for (int64_t b = B * part / parts; b < B * (part + 1) / parts; ++b)
      filter_row(xp + b * V, V, kp[b], pp[b], op + b * V, keys, probs);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace phi4_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(Phi4CpuSamplingFilter, phi4_cpu::SamplingFilter,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

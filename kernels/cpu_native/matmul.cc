// y [M, N] float32 = x [M, K] float32 . W, with W packed in column panels (`kernels.cpu_native.pack_matrix`):
// panels [P, K, 64], P = ceil(N / 64), panel p holding columns 64p .. 64p + 63 of W [K, N] row by row (the last
// panel zero-padded), as float32 or as bfloat16 bits (uint16). A decode step's products have a few rows and a
// weight read once: each panel is streamed once per group of rows, contiguously, with the rows' accumulators in
// registers (up to 8 rows x 64 columns: 32 vector accumulators; two passes of 8 x 32 measured 0-30% slower),
// the panel's rows prefetched ahead.
// bfloat16 weights are widened exactly and every product and sum is float32. Panels are split among the threads.
#include "common.h"

namespace phi4_cpu {
namespace {

constexpr int kPanel = 64;
constexpr int kPrefetchRows = 48;   // the panel row this many rows ahead is prefetched (16-48 measured within 15%)

template <int R, int CV, typename W>
void panel_columns(const float* x, int64_t K, const W* panel, float* y, int64_t ldy, int64_t ncols) {
  f32x16 acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = f32x16{};
  for (int64_t k = 0; k < K; ++k) {
    const W* wr = panel + k * kPanel;
    // Prefetch the whole panel row kPrefetchRows ahead: the hardware prefetcher alone left 8-row products at
    // ~60% of this (100K lm_head, 8 rows, float32 12.3 -> 7.6 ms, bfloat16 9.4 -> 4.1 ms).
    const char* ahead = reinterpret_cast<const char*>(panel + (k + kPrefetchRows) * kPanel);
    for (int b = 0; b < int(kPanel * sizeof(W)); b += 64) __builtin_prefetch(ahead + b);
    f32x16 wv[CV];
    for (int c = 0; c < CV; ++c) wv[c] = load16(wr + 16 * c);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * K + k];
      for (int c = 0; c < CV; ++c) acc[r][c] += xs * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) {
      const int64_t col = 16 * c;
      if (col + 16 <= ncols) {
        store16(y + r * ldy + col, acc[r][c]);
      } else {
        for (int64_t j = col; j < ncols; ++j) y[r * ldy + j] = acc[r][c][j - col];
      }
    }
}

template <int R, typename W>
void one_panel(const float* x, int64_t K, const W* panels, float* y, int64_t N, int64_t p) {
  const int64_t ncols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
  const W* panel = panels + p * K * kPanel;
  float* yp = y + p * kPanel;
  panel_columns<R, 4, W>(x, K, panel, yp, N, ncols);
}

template <typename W>
void panel_range(const float* x, int64_t M, int64_t K, const W* panels, int64_t N, float* y, int64_t p0,
                 int64_t p1, bool reverse) {
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t p = reverse ? p0 + p1 - 1 - i : i;
    for (int64_t m = 0; m < M; m += 8) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (M - m < 8 ? M - m : 8) {
        case 1: one_panel<1, W>(xm, K, panels, ym, N, p); break;
        case 2: one_panel<2, W>(xm, K, panels, ym, N, p); break;
        case 3: one_panel<3, W>(xm, K, panels, ym, N, p); break;
        case 4: one_panel<4, W>(xm, K, panels, ym, N, p); break;
        case 5: one_panel<5, W>(xm, K, panels, ym, N, p); break;
        case 6: one_panel<6, W>(xm, K, panels, ym, N, p); break;
        case 7: one_panel<7, W>(xm, K, panels, ym, N, p); break;
        default: one_panel<8, W>(xm, K, panels, ym, N, p); break;
      }
    }
  }
}

// Each weight is read in the opposite panel order from its previous product (a flag per weight, by its address):
// a decode step reads more weight bytes than the last-level cache holds (phi-4-shaped 100K lm_head: 154 MB in
// float32), and a cache keeping the most recent lines then still holds the end of the previous pass, which the
// reversed pass reads first; in one order every pass would miss throughout. Each output column is the same sum
// in either order (bit-identical results).
std::atomic<uint8_t> g_reverse[4096];

bool next_reverse(const void* weight) {
  const uintptr_t slot = (reinterpret_cast<uintptr_t>(weight) >> 6) % 4096;
  return (g_reverse[slot].fetch_xor(1, std::memory_order_relaxed) & 1) != 0;
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = panels.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("packed_matmul: x [M, K], panels [P, K, 64] and y [M, N] expected");
  const int64_t M = xd[0], K = xd[1], P = pd[0], N = yd[1];
  if (pd[1] != K || pd[2] != kPanel || yd[0] != M || P != (N + kPanel - 1) / kPanel)
    return ffi::Error::InvalidArgument("packed_matmul: x, panels and y shapes disagree");
  const bool bf16 = panels.element_type() == ffi::U16;
  if (!bf16 && panels.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("packed_matmul: panels must be float32 or bfloat16 bits (uint16)");
  const int64_t parts = parts_for(pool, P);
  const bool reverse = next_reverse(panels.untyped_data());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, parts, [&](int64_t i) {
    const int64_t p0 = P * i / parts, p1 = P * (i + 1) / parts;
    if (bf16) {
      panel_range(xp, M, K, panels.typed_data<uint16_t>(), N, yp, p0, p1, reverse);
    } else {
      panel_range(xp, M, K, panels.typed_data<float>(), N, yp, p0, p1, reverse);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace phi4_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(Phi4CpuPackedMatmul, phi4_cpu::PackedMatmul,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

// Shared pieces of the native CPU kernels (kernels/cpu_native): 16-float vectors through GCC's vector extensions
// (compiled with -march=native, so AVX-512 where the CPU has it, narrower vectors otherwise), bfloat16 widening,
// and a fork-join over XLA's own intra-op thread pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace phi4_cpu {

namespace ffi = xla::ffi;

// Unaligned 16-lane vectors (aligned(4) lets the compiler emit unaligned loads/stores).
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));   // a comparison's lanes: 0 or -1

inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16*>(p); }

// bfloat16 bits -> float32: the bits are the float's upper half (exact).
inline f32x16 load16(const uint16_t* p) {
  u16x16 h = *reinterpret_cast<const u16x16*>(p);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16*>(p) = v; }

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  uint32_t w = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline bool any_lane(i32x16 mask) {
  int32_t r = 0;
  for (int i = 0; i < 16; ++i) r |= mask[i];
  return r != 0;
}

// The sum of the 16 lanes by halving (a fixed order: deterministic).
inline float hsum16(f32x16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

// exp of 16 lanes (Cephes' expf: range reduction by ln 2 in two parts, a degree-6 polynomial; ~1 ulp on
// [-87, 88]); lanes below -87.3 give 0.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.3365448f, hi = f32x16{} + 88.3762626f;
  const i32x16 under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x16 z = x * 1.44269504088896341f + 0.5f;
  i32x16 n = __builtin_convertvector(z, i32x16);                       // truncates toward zero
  n += __builtin_convertvector(n, f32x16) > z;                         // floor (a true lane is -1)
  const f32x16 fn = __builtin_convertvector(n, f32x16);
  x = x - fn * 0.693359375f;
  x = x - fn * -2.12194440e-4f;
  f32x16 y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y *= scale;
  return under ? f32x16{} : y;
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs f(0) .. f(parts - 1) and returns when all are done: parts - 1 helper tasks go to XLA's intra-op pool, and
// every participant (the calling thread included) claims parts from a shared counter until none are left. The
// caller never waits for a part nobody has started (a helper that starts late finds no work and only touches the
// shared job, which it keeps alive), so two such calls running at once on a busy pool cannot deadlock.
struct ForkJoin {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t parts = 0;
  std::function<void(int64_t)> body;

  void run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t parts, F&& f) {
  if (parts <= 1) {
    if (parts == 1) f(0);
    return;
  }
  auto job = std::make_shared<ForkJoin>();
  job->parts = parts;
  job->body = std::forward<F>(f);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([job] { job->run(); });
  job->run();
  // Spin briefly (parts finish within microseconds of each other), then yield: a participant descheduled mid-part
  // (another process on the cores) must not cost the caller its whole time slice.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < parts; ++spins) {
    if (spins < 4096) {
      spin_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// How many parts to split work of `units` independent units into: the pool's threads plus the caller, capped.
inline int64_t parts_for(ffi::ThreadPool& pool, int64_t units) {
  int64_t n = pool.num_threads();
  if (n < 1) n = 1;
  return units < n ? (units < 1 ? 1 : units) : n;
}

}  // namespace phi4_cpu

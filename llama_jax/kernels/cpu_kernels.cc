// CPU kernels for the decode step, called from XLA as FFI custom calls (llama_jax/cpu_kernels.py).
//
// XLA:CPU's generic dot emitters read a decode step's weights at well under the machine's memory
// bandwidth (batch 1 is bandwidth-bound, ../shared/reference/cpu-performance.md), and its
// batched einsums over a KV cache slice copy the slice first. These are the two hot spots of a
// decode step, written by hand:
//
// - lj_matmul_f32 / lj_matmul_i8: y[R, N] = x[R, K] . w[N, K]^T (* scale[N]) for a weight packed
//   in tiles of 8 output channels (below), float32 or int8 with per-channel scales. int8
//   weights are widened to float in registers, so activations are not quantized and the
//   result is exact int8-weight math up to float rounding.
// - lj_matmul_q4: the same for 4-bit weights in groups of 32 with scales and mins (Q4_0, Q4_1,
//   Q4_K), with int8 activations and integer dot products.
// - lj_matmul_q8: the same for signed 8-bit weights in groups of 32 with scales (Q8_0, and the
//   5- and 6-bit formats, which load as 8-bit groups).
// - lj_top_k: the k largest logits of each row, for sampling and top_logprobs.
// - lj_attend: one new token per row attending over a layer of the KV cache, reading only each
//   row's valid positions (no padding to a context bucket, no copy of the cache).
// - lj_attend_chunk: a prefill chunk's rows attending causally over the slot's valid cache
//   positions and the chunk itself, skipping padding rows.
//
// Written with GCC/Clang vector extensions (8 float lanes), compiled at first use with
// -march=native (llama_jax/cpu_kernels.py), so the same source gives AVX2, AVX-512 or NEON code;
// the 4- and 8-bit matmuls use AVX2 intrinsics, VNNI where the CPU has it, and with AVX-512 VNNI
// take two tiles per 512-bit instruction (`micro_int_wide`: at 8 rows 1.8x faster on Zen 5).
// Work is split over a pool of spinning workers (below); the calling thread takes its share.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));

inline v8f load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f load(const int8_t* p) {
#if defined(__AVX2__)
  // Compilers scalarize __builtin_convertvector from 8 x int8; say it in two instructions.
  __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8b b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, v8f);
#endif
}

inline void store(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

float half_to_float(uint16_t h);

// 8 float16 values (a 16-bit KV cache) widened to float32.
inline v8f load(const uint16_t* p) {
#if defined(__F16C__)
  __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f v;
  for (int j = 0; j < 8; ++j) v[j] = half_to_float(p[j]);
  return v;
#endif
}

inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return half_to_float(x); }

// Whether any lane of a is greater than b's (false for NaN, as a scalar compare).
inline bool any_greater(v8f a, v8f b) {
#if defined(__AVX2__)
  __m256 x, y;
  std::memcpy(&x, &a, sizeof(x));
  std::memcpy(&y, &b, sizeof(y));
  return _mm256_movemask_ps(_mm256_cmp_ps(x, y, _CMP_GT_OQ)) != 0;
#else
  bool any = false;
  for (int j = 0; j < 8; ++j) any |= a[j] > b[j];
  return any;
#endif
}

inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// A small thread pool of our own. Its workers spin for a while after each job before they
// sleep, so the many short kernel calls of a decode step (a few hundred per step, tens of
// microseconds apart) find them awake: with XLA's intra-op pool, whose threads sleep between
// calls, the second core joined late and a 3.5 MB weight streamed at one core's bandwidth.
// One job at a time: a call that finds the pool busy (another model, another thread) runs its
// work inline. Threads: the CPUs this process may run on, or LLAMA_JAX_CPU_THREADS.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static teardown
    return *pool;
  }

  // work(i) for i in [0, total), on the caller and the workers; returns when all are done.
  void run(int64_t total, std::function<void(int64_t)> work) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (workers_ == 0 || total <= 1 || !busy.owns_lock()) {
      for (int64_t i = 0; i < total; ++i) work(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->total = total;
    job->work = std::move(work);
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    job->run();
    while (job->done.load(std::memory_order_acquire) < total) relax();
  }

 private:
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    std::function<void(int64_t)> work;

    void run() {
      int64_t i;
      while ((i = next.fetch_add(1, std::memory_order_relaxed)) < total) {
        work(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  Pool() {
    int64_t n = 0;
    if (const char* env = std::getenv("LLAMA_JAX_CPU_THREADS")) n = std::atoll(env);
    if (n <= 0) {
#if defined(__linux__)
      cpu_set_t set;
      if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
      if (n <= 0) n = std::max(1u, std::thread::hardware_concurrency());
    }
    workers_ = n - 1;
    if (const char* env = std::getenv("LLAMA_JAX_CPU_SPIN_US")) {
      spin_ = std::chrono::microseconds(std::atoll(env));
    }
    for (int64_t t = 0; t < workers_; ++t) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        relax();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > spin_) {
          std::unique_lock<std::mutex> lock(m_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(m_);
        job = job_;
        seen = gen_.load(std::memory_order_acquire);
      }
      job->run();
    }
  }

  std::chrono::microseconds spin_{2000};  // LLAMA_JAX_CPU_SPIN_US
  int64_t workers_ = 0;
  std::mutex busy_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> gen_{0};
  std::shared_ptr<Job> job_;
};

void parallel_for(int64_t total, std::function<void(int64_t)> work) {
  Pool::get().run(total, std::move(work));
}

// ---------------------------------------------------------------------------------------------
// Matmul: y[R, N] = x[R, K] . w[N, K]^T * scale[N], w packed (llama_jax/cpu_kernels.py `pack`)
// as [N/8, K, 8]: tiles of 8 output channels, each a contiguous [K, 8] run read in order
// (read channel by channel, 8 channels at a time, the weights came at a third of the
// bandwidth: 8 interleaved streams defeat the prefetcher). A tile row w[k, 0:8] is one vector,
// multiplied by a broadcast x[r, k] into the 8 outputs of row r (an outer product), so a widened
// int8 vector serves every row of a block from registers.
//
// A lone row (batch 1 decode) is bound by memory bandwidth: `tile_one_row` streams one tile
// at a time. More rows are bound by arithmetic: `micro` keeps a 6-row by 2-tile block of
// outputs in registers, with the rows' activations packed into panels and the inputs split
// in L1-sized blocks (a BLIS-style register-blocked GEMM).

constexpr int64_t kTile = 8;

// Software prefetch this many bytes ahead in a weight stream: int8 weights need 4x the work
// per cache line of float ones, so fewer lines are in flight, and the hardware prefetcher
// alone left a fifth to a third of the memory bandwidth unused.
constexpr int64_t kPrefetch = 2048;

template <typename W>
inline void prefetch_line(const W* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetch);
}

// One row against one tile: 8 partial sums (one per k mod 8) break the FMA latency chain.
template <typename W>
inline v8f tile_one_row(const float* xr, int64_t K, const W* w) {
  v8f acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (sizeof(W) == 1) prefetch_line(w + k * kTile);  // 8 inputs: one 64-byte line
    for (int kk = 0; kk < 8; ++kk) acc[kk] += xr[k + kk] * load(w + (k + kk) * kTile);
  }
  for (; k < K; ++k) acc[0] += xr[k] * load(w + k * kTile);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Several rows are bound by arithmetic: a register-blocked micro kernel, RT rows by TT tiles
// (6 x 2: 12 accumulators, 2 weight vectors and a broadcast fill the 16 AVX2 registers; per
// input, 2 weight loads and 6 broadcasts feed 12 FMAs). Its activations come from a panel
// `xp` [kc][RT] (one contiguous stream, packed by `pack_rows`); tile t's weights start at
// w + t * ldw, input k at + k * 8. Accumulates into y (rows ldy apart) unless `first`;
// `scale`, when given, multiplies the result (the last block of inputs of an int8 weight).
constexpr int kMR = 6;           // rows per micro kernel
constexpr int kNT = 2;           // tiles per micro kernel
constexpr int64_t kKC = 192;     // inputs per block: a 2-tile float panel is 12 KB, in L1
constexpr int64_t kSuper = 60;   // rows per work item (10 micro kernels), their panel in L2

template <int RT, int TT, typename W>
inline void micro(const float* xp, int64_t kc, const W* w, int64_t ldw, float* y, int64_t ldy,
                  bool first, const float* scale) {
  v8f acc[RT][TT];
  for (int i = 0; i < RT; ++i) {
    for (int t = 0; t < TT; ++t) acc[i][t] = first ? v8f{} : load(y + i * ldy + t * kTile);
  }
  for (int64_t k = 0; k < kc; ++k) {
    // Where memory is the limit (int8, or a few rows): one prefetch per 64-byte line.
    if (constexpr bool pf = sizeof(W) == 1 || RT <= 4; pf && k % (64 / (kTile * sizeof(W))) == 0) {
      for (int t = 0; t < TT; ++t) prefetch_line(w + t * ldw + k * kTile);
    }
    v8f wv[TT];
    for (int t = 0; t < TT; ++t) wv[t] = load(w + t * ldw + k * kTile);
    for (int i = 0; i < RT; ++i) {
      const float xv = xp[k * RT + i];
      for (int t = 0; t < TT; ++t) acc[i][t] += xv * wv[t];
    }
  }
  for (int t = 0; t < TT; ++t) {
    if (scale) {
      const v8f s = load(scale + t * kTile);
      for (int i = 0; i < RT; ++i) acc[i][t] *= s;
    }
    for (int i = 0; i < RT; ++i) store(y + i * ldy + t * kTile, acc[i][t]);
  }
}

// 7 or 8 rows: one block, one tile at a time (8 x 1: 8 accumulators, a weight vector loaded
// once for 8 FMAs), rather than two blocks of 4 that would read the weights twice.
constexpr int kMRWide = 8;

template <int TT, typename W>
inline void micro_rows(int rt, const float* xp, int64_t kc, const W* w, int64_t ldw, float* y,
                       int64_t ldy, bool first, const float* scale) {
  switch (rt) {
    case 1: micro<1, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    case 2: micro<2, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    case 3: micro<3, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    case 4: micro<4, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    case 5: micro<5, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    case 6: micro<6, TT>(xp, kc, w, ldw, y, ldy, first, scale); break;
    default:
      for (int t = 0; t < TT; ++t) {
        const float* st = scale ? scale + t * kTile : nullptr;
        if (rt == 7) {
          micro<7, 1>(xp, kc, w + t * ldw, ldw, y + t * kTile, ldy, first, st);
        } else {
          micro<kMRWide, 1>(xp, kc, w + t * ldw, ldw, y + t * kTile, ldy, first, st);
        }
      }
  }
}

// Rows [r0, r1) in near-equal blocks of at most kMR rows (16 rows: 6, 5, 5, not 6, 6, 4),
// or one block of up to kMRWide rows: f(first row, rows).
template <typename F>
inline void row_blocks(int64_t r0, int64_t r1, F f) {
  const int64_t n = r1 - r0;
  if (n <= kMRWide) {
    if (n > 0) f(r0, int(n));
    return;
  }
  const int64_t nb = (n + kMR - 1) / kMR;
  const int64_t base = n / nb, extra = n % nb;
  for (int64_t b = 0, r = r0; b < nb; ++b) {
    const int rt = int(base + (b < extra ? 1 : 0));
    f(r, rt);
    r += rt;
  }
}

// Rows [0, R) in near-equal super blocks of at most kSuper rows: super block s is
// [super_start(s), super_start(s + 1)).
inline int64_t supers_of(int64_t R) { return (R + kSuper - 1) / kSuper; }
inline int64_t super_start(int64_t s, int64_t R) { return s * R / supers_of(R); }

// x [R, K] -> panels: the block of rows [r, r + rt) (row_blocks of each super block) is
// stored at xp + r * K as [K][rt].
void pack_rows(const float* x, int64_t R, int64_t K, float* xp) {
  auto one = [=](int64_t s) {
    row_blocks(super_start(s, R), super_start(s + 1, R), [&](int64_t r, int rt) {
      float* dst = xp + r * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int i = 0; i < rt; ++i) dst[k * rt + i] = x[(r + i) * K + k];
      }
    });
  };
  const int64_t supers = supers_of(R);
  if (supers > 1) {
    parallel_for(supers, one);
  } else {
    one(0);
  }
}

// Rows at or past `valid` are not computed: they are zeros (the padding of a prefill chunk).
// int8 weights are widened in registers as they are loaded (`load`), once per micro kernel.
template <typename W>
void matmul(const float* x, int64_t R, int64_t valid, int64_t K, const W* w,
            const float* scale, float* y, int64_t N) {
  if (valid < R) std::memset(y + valid * N, 0, sizeof(float) * (R - valid) * N);
  R = valid;
  if (R == 0) return;
  const int64_t tiles = N / kTile;
  if (R == 1) {
    const int64_t per_run = std::max<int64_t>(1, tiles / 24);  // long runs, ~24 of them
    const int64_t runs = (tiles + per_run - 1) / per_run;
    parallel_for(runs, [=](int64_t run) {
      for (int64_t t = run * per_run; t < std::min(tiles, (run + 1) * per_run); ++t) {
        v8f s;
        for (int j = 0; j < 8; ++j) s[j] = scale ? scale[t * kTile + j] : 1.0f;
        store(y + t * kTile, tile_one_row(x, K, w + t * kTile * K) * s);
      }
    });
    return;
  }
  thread_local std::vector<float> panel;  // the caller's; workers only read it
  panel.resize(R * K);
  float* xp = panel.data();
  pack_rows(x, R, K, xp);
  // Work items: (super block of rows, run of units); a unit is kNT tiles (the last may be 1).
  const int64_t units = (tiles + kNT - 1) / kNT;
  const int64_t per_run = std::max<int64_t>(1, units / 24);  // ~24 items: even split on 2-16 threads
  const int64_t runs = (units + per_run - 1) / per_run;
  const int64_t supers = supers_of(R);
  const int64_t KC = R <= kMRWide ? K : kKC;  // one block of rows: nothing to keep in L1
  parallel_for(supers * runs, [=](int64_t item) {
    const int64_t s = item / runs, run = item % runs;
    const int64_t r0 = super_start(s, R), r1 = super_start(s + 1, R);
    for (int64_t u = run * per_run; u < std::min(units, (run + 1) * per_run); ++u) {
      const int64_t t0 = u * kNT;
      const bool pair = t0 + 1 < tiles;
      const W* wu = w + t0 * kTile * K;
      const float* su = scale ? scale + t0 * kTile : nullptr;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const float* sc = k0 + kc == K ? su : nullptr;
        row_blocks(r0, r1, [&](int64_t r, int rt) {
          const float* xb = xp + r * K + k0 * rt;
          float* yb = y + r * N + t0 * kTile;
          if (pair) {
            micro_rows<kNT>(rt, xb, kc, wu + k0 * kTile, K * kTile, yb, N, k0 == 0, sc);
          } else {
            micro_rows<1>(rt, xb, kc, wu + k0 * kTile, K * kTile, yb, N, k0 == 0, sc);
          }
        });
      }
    }
  });
}

// Packed weights arrive as [N/8, K, 8], or stacked [L, N/8, K, 8] with the layer to use (a
// slice of a stacked weight passed as an operand would be copied by XLA first, every call).
bool packed_dims(ffi::Span<const int64_t> wd, int64_t K, int64_t* N, int64_t* L) {
  const size_t n = wd.size();
  if ((n != 3 && n != 4) || wd[n - 1] != kTile || wd[n - 2] != K) return false;
  *N = wd[n - 3] * kTile;
  *L = n == 4 ? wd[0] : 1;
  return true;
}

// The layer and valid-row operands: int32 [2] = (layer, rows to compute, clamped to [0, R]).
bool layer_rows(ffi::Buffer<ffi::S32>& ctl, int64_t L, int64_t R, int64_t* l, int64_t* valid) {
  if (ctl.element_count() != 2) return false;
  *l = ctl.typed_data()[0];
  *valid = std::clamp<int64_t>(ctl.typed_data()[1], 0, R);
  return *l >= 0 && *l < L;
}

ffi::Error MatmulF32(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> ctl,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  int64_t N, L, l, valid;
  if (xd.size() != 2 || !packed_dims(w.dimensions(), xd[1], &N, &L) ||
      !layer_rows(ctl, L, xd[0], &l, &valid)) {
    return ffi::Error::InvalidArgument(
        "lj_matmul_f32: expected x [R, K], w [(L,) N/8, K, 8] and a layer in range");
  }
  const int64_t K = xd[1];
  matmul(x.typed_data(), xd[0], valid, K, w.typed_data() + l * N * K, static_cast<const float*>(nullptr),
         y->typed_data(), N);
  return ffi::Error::Success();
}

ffi::Error MatmulI8(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::S32> ctl, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  int64_t N, L, l, valid;
  if (xd.size() != 2 || !packed_dims(w.dimensions(), xd[1], &N, &L) ||
      scale.element_count() != L * N || !layer_rows(ctl, L, xd[0], &l, &valid)) {
    return ffi::Error::InvalidArgument(
        "lj_matmul_i8: expected x [R, K], w [(L,) N/8, K, 8], scale [(L,) N] and a layer in range");
  }
  const int64_t K = xd[1];
  matmul(x.typed_data(), xd[0], valid, K, w.typed_data() + l * N * K, scale.typed_data() + l * N,
         y->typed_data(), N);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// 4-bit matmul: y[R, N] = x[R, K] . w[N, K]^T for a weight of 4-bit codes q in groups of 32
// inputs, each group with its own scale and min (w = scale * q + min: llama.cpp's Q4_0, Q4_1 and
// Q4_K all are this, with group 32). Packed (llama_jax/cpu_kernels.py `pack_q4`) as
// w [N/8, K/32, 128] bytes, scale and min (or no min) [N/8, K/32, 8] float16: for a tile of 8 channels and
// a group, byte b*32 + j*4 + i holds channel j's code for input 4b+i in its low nibble and for
// input 16+4b+i in its high one, so a masked load is 8 lanes (one per channel) of 4 inputs.
//
// Activations are quantized per row and group of 32 to int8, x ~ dx * hi, as llama.cpp's Q8
// activations are, and the groups of a row's outlier channels also get a second int8 part,
// x - dx * hi ~ dx / 254 * lo (about 16 bits; `quantize_rows`): int8 alone everywhere moved the
// default model's greedy answers, and two parts everywhere doubled the integer work. Each lane's
// 4 code x activation products are summed in one integer instruction (vpdpbusd with AVX-VNNI or
// AVX512-VNNI, vpmaddubsw + vpmaddwd otherwise): a 4-bit weight is 4x the work per byte of a
// float one, and float widening would make several rows compute-bound. Per group:
// y += scale * dx * sum(q * hi) [+ scale * dx / 254 * sum(q * lo)] + min * sum(x), the integer
// sums exact in int32; a symmetric weight (Q4_0) has no mins stored, min = -8 * scale.
//
// 8-bit groups (lj_matmul_q8) are the same with signed codes and no min, w = scale * q, packed
// (`pack_q8`) as w [N/8, K/32, 256]: byte b*32 + j*4 + i is channel j's code for input 4b+i.
// The activations are quantized the same way; a weight's sign moves onto them (vpsignb), so
// the same unsigned x signed dot instruction computes sum(q * hi).

constexpr int64_t kGroup = 32;

// Activation rows quantized for the 4-bit kernel: codes [R, K] of the first part and (in the
// groups that have one) the second; per group the step dx and the sum of x; per row the list of
// groups with a second part (`split`, rows G apart, `n_split` entries each).
struct QuantRows {
  std::vector<int8_t> hi, lo;
  std::vector<float> d, s;
  std::vector<int32_t> split;
  std::vector<int32_t> n_split;
};

// Row by row (a row's numbers never depend on the other rows of its batch). x ~ dx * hi per
// group of 32, and a group whose int8 step would be large for its row, max |x| > split *
// rms(row) (the groups of the row's outlier channels), also gets x - dx * hi ~ dx / 254 * lo:
// the rounding error the row's dot products see is near two parts' (about 16 bits) for the
// integer work of one part and a few percent. split 0: every nonzero group has two parts.
// `offset`: codes stored as unsigned bytes, code + 128 (the 8-bit kernel's VNNI form).
void quantize_rows(const float* x, int64_t R, int64_t K, float split, QuantRows* out, bool offset) {
  const int64_t G = K / kGroup;
  out->hi.resize(R * K);
  out->lo.resize(R * K);
  out->d.resize(R * G);
  out->s.resize(R * G);
  out->split.resize(R * G);
  out->n_split.resize(R);
  int8_t* hp = out->hi.data();
  int8_t* lp = out->lo.data();
  float* dp = out->d.data();
  float* sp = out->s.data();
  int32_t* list = out->split.data();
  int32_t* count = out->n_split.data();
  auto row = [=](int64_t r) {
    const float* xr = x + r * K;
    float ss = 0;
    for (int64_t i = 0; i < K; ++i) ss += xr[i] * xr[i];
    const float bar = split * std::sqrt(ss / float(K));
    int32_t n = 0;
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = xr + g * kGroup;
      float amax = 0, sum = 0;
      for (int64_t i = 0; i < kGroup; ++i) {
        amax = std::max(amax, std::fabs(xg[i]));
        sum += xg[i];
      }
      const float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
      const bool two = amax > bar;
      int8_t* h8 = hp + r * K + g * kGroup;
      int8_t* l8 = lp + r * K + g * kGroup;
      for (int64_t i = 0; i < kGroup; ++i) {
        const float h = std::nearbyint(xg[i] * inv);  // |x - h * d| <= d / 2: lo in [-127, 127]
        h8[i] = int8_t(h);
        if (offset) h8[i] = int8_t(uint8_t(h8[i]) ^ 0x80);
        // x * inv - h as one fused multiply-add, whatever the compiler contracts (the tests
        // emulate this rounding exactly)
        if (two) l8[i] = int8_t(std::clamp(std::nearbyint(std::fma(xg[i], inv, -h) * 254.0f), -127.0f, 127.0f));
        if (two && offset) l8[i] = int8_t(uint8_t(l8[i]) ^ 0x80);
      }
      dp[r * G + g] = d;
      sp[r * G + g] = sum;
      if (two) list[r * G + n++] = int32_t(g);
    }
    count[r] = n;
  };
  if (R >= 8) {
    parallel_for(R, row);
  } else {
    for (int64_t r = 0; r < R; ++r) row(r);
  }
}

float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while (!(m & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (m & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Weight formats of the integer kernels: how one group of a tile (8 channels x 32 inputs) is
// stored and meets a row's 32 int8 activation codes. `kBytes`: bytes per tile and group;
// `kMin`: the group's min term (none, -8 * scale, or stored); `kOffset`: the activation codes
// come as unsigned bytes, code + 128 (`quantize_rows`).
enum class MinTerm { kNone, kMinus8, kStored };

#if defined(__AVX2__) && defined(__F16C__) && \
    ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
constexpr bool kVnni = true;  // vpdpbusd: unsigned x signed bytes summed in int32, no int16 step
#else
constexpr bool kVnni = false;
#endif

// 4-bit codes (pack_q4): byte b*32 + j*4 + i holds channel j's code for input 4b+i in its low
// nibble and for input 16+4b+i in its high one.
template <bool SYM>
struct Q4Fmt {
  static constexpr int64_t kBytes = 128;
  static constexpr MinTerm kMin = SYM ? MinTerm::kMinus8 : MinTerm::kStored;
  static constexpr bool kOffset = false;
  static int scalar_dot(const uint8_t* wg, const int8_t* x, int j) {
    int sum = 0;
    for (int b = 0; b < 4; ++b) {
      for (int i = 0; i < 4; ++i) {
        const uint8_t byte = wg[b * 32 + j * 4 + i];
        sum += (byte & 0x0f) * x[4 * b + i] + (byte >> 4) * x[16 + 4 * b + i];
      }
    }
    return sum;
  }
};

// Signed 8-bit codes (pack_q8), symmetric (w = scale * q: llama.cpp's Q8_0, and the int8 groups
// that Q5_x and Q6_K files become): byte b*32 + j*4 + i is channel j's code for input 4b+i.
struct Q8Fmt {
  static constexpr int64_t kBytes = 256;
  static constexpr MinTerm kMin = MinTerm::kNone;
  static constexpr bool kOffset = kVnni;
  static int scalar_dot(const uint8_t* wg, const int8_t* x, int j) {
    const int8_t* w = reinterpret_cast<const int8_t*>(wg);
    int sum = 0;
    for (int b = 0; b < 8; ++b) {
      for (int i = 0; i < 4; ++i) sum += w[b * 32 + j * 4 + i] * x[4 * b + i];
    }
    return sum;
  }
};

#if defined(__AVX2__) && defined(__F16C__)
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i pairs = _mm256_maddubs_epi16(u, s);  // |2 * 128 * 127| fits int16
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

inline __m256i broadcast4(const int8_t* x) {
  int32_t a;
  std::memcpy(&a, x, 4);
  return _mm256_set1_epi32(a);
}

// One group of a tile against RT rows' 32 int8 codes each (row r at x + r * K): acc[r][c], C
// independent chains per row. A 32-byte load is 8 channels x 4 inputs, the operand of one
// integer dot instruction (unsigned x signed bytes): 4-bit codes are unsigned as they are, and
// a signed weight lends its sign to the activations (|w| * sign(x, w) = w * x).
template <int RT, int C, bool SYM>
inline void group_dots(Q4Fmt<SYM>, const uint8_t* wg, const int8_t* x, int64_t K, __m256i (&acc)[RT][C]) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int b = 0; b < 4; ++b) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 32));
    const __m256i lo = _mm256_and_si256(raw, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    const int cl = (2 * b) % C, ch = (2 * b + 1) % C;
    for (int r = 0; r < RT; ++r) {
      acc[r][cl] = dot_u8s8(acc[r][cl], lo, broadcast4(x + r * K + 4 * b));
      acc[r][ch] = dot_u8s8(acc[r][ch], hi, broadcast4(x + r * K + 16 + 4 * b));
    }
  }
}

// With VNNI the activations come offset, x + 128 (unsigned), and meet the signed codes as they
// are: sum((x + 128) * q) - 128 * sum(q), the weights' sums shared by all RT rows (one dot
// per load instead of a sign per row and load). Without it (vpmaddubsw's int16 pairs would
// overflow on 255 * -128 * 2) the weight's sign moves onto the activations.
template <int RT, int C>
inline void group_dots(Q8Fmt, const uint8_t* wg, const int8_t* x, int64_t K, __m256i (&acc)[RT][C]) {
  if constexpr (Q8Fmt::kOffset) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i sum = _mm256_setzero_si256();
    for (int b = 0; b < 8; ++b) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 32));
      sum = dot_u8s8(sum, ones, raw);
      for (int r = 0; r < RT; ++r) acc[r][b % C] = dot_u8s8(acc[r][b % C], broadcast4(x + r * K + 4 * b), raw);
    }
    const __m256i shift = _mm256_slli_epi32(sum, 7);
    for (int r = 0; r < RT; ++r) acc[r][0] = _mm256_sub_epi32(acc[r][0], shift);
    return;
  }
  for (int b = 0; b < 8; ++b) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 32));
    const __m256i mag = _mm256_abs_epi8(raw);  // -128 -> 128 as an unsigned byte: exact
    for (int r = 0; r < RT; ++r) {
      acc[r][b % C] = dot_u8s8(acc[r][b % C], mag, _mm256_sign_epi8(broadcast4(x + r * K + 4 * b), raw));
    }
  }
}

// RT rows (codes xq and xl, rows K apart; dx, dxs rows G apart; each row's second-part groups
// `split`, rows G apart, `n_split` of them) against one tile of G groups; writes 8 outputs per
// row, rows ldy apart. The first parts of all RT rows share each weight load; then each row adds
// its second parts' products, group by group (the tile is in L1 by then). Per group:
// y += scale * dx * sum(q * hi) [+ scale * dx / 254 * sum(q * lo)] [+ min * sum(x)].
template <typename F, int RT>
inline void micro_int(const int8_t* xq, const int8_t* xl, const float* dx, const float* dxs,
                      const int32_t* split, const int32_t* n_split, int64_t K, int64_t G, const uint8_t* w,
                      const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy) {
  __m256 accf[RT];
  for (int r = 0; r < RT; ++r) accf[r] = _mm256_setzero_ps();
  // C independent chains per row (a dot instruction's latency is ~5 cycles: one chain of 8 per
  // group left a lone row latency-bound at half the memory bandwidth).
  constexpr int C = RT >= 4 ? 1 : RT == 1 ? 4 : 2;
  auto scale = [&](int64_t g) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 8)));
  };
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * F::kBytes;
    for (int64_t b = 0; b < F::kBytes; b += 128) __builtin_prefetch(wg + 4 * F::kBytes + b);
    __m256i acc[RT][C];
    for (int r = 0; r < RT; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
    }
    group_dots<RT, C>(F{}, wg, xq + g * kGroup, K, acc);
    const __m256 s = scale(g);
    for (int r = 0; r < RT; ++r) {
      __m256i h = acc[r][0];
      for (int c = 1; c < C; ++c) h = _mm256_add_epi32(h, acc[r][c]);
      accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(s, _mm256_set1_ps(dx[r * G + g])), accf[r]);
    }
    if constexpr (F::kMin != MinTerm::kNone) {
      const __m256 m = F::kMin == MinTerm::kMinus8
                           ? _mm256_mul_ps(s, _mm256_set1_ps(-8.0f))
                           : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g * 8)));
      for (int r = 0; r < RT; ++r) accf[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dxs[r * G + g]), accf[r]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int32_t i = 0; i < n_split[r]; ++i) {
      const int64_t g = split[r * G + i];
      __m256i acc[1][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()}};
      group_dots<1, 2>(F{}, w + g * F::kBytes, xl + r * K + g * kGroup, K, acc);
      const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(acc[0][0], acc[0][1]));
      accf[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(scale(g), _mm256_set1_ps(dx[r * G + g] / 254.0f)), accf[r]);
    }
    _mm256_storeu_ps(y + r * ldy, accf[r]);
  }
}

#if defined(__AVX512F__)
constexpr int kMRInt = 8;  // 32 vector registers: 8 integer and 8 float accumulators
#else
constexpr int kMRInt = 4;  // 16 registers
#endif

template <typename F>
inline void micro_int_rows(int rt, const int8_t* xq, const int8_t* xl, const float* dx, const float* dxs,
                           const int32_t* split, const int32_t* n_split, int64_t K, int64_t G, const uint8_t* w,
                           const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy) {
  switch (rt) {
    case 1: micro_int<F, 1>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 2: micro_int<F, 2>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 3: micro_int<F, 3>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 4: micro_int<F, 4>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
#if defined(__AVX512F__)
    case 5: micro_int<F, 5>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 6: micro_int<F, 6>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 7: micro_int<F, 7>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
    case 8: micro_int<F, 8>(xq, xl, dx, dxs, split, n_split, K, G, w, sc, mn, y, ldy); break;
#endif
    default: break;
  }
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
// Two tiles at once, 16 channels per 512-bit instruction: where AVX-512 runs at full width
// (Zen 5, Intel's server cores) that doubles the integer dots per cycle, the bound at several
// rows; where it is split in two halves (Zen 4) it costs what two tiles cost and still halves
// the broadcasts. The packed layout stays the 8-channel tiles': a register holds tile t's 32
// bytes below tile t+1's, so outputs t*8..t*8+15 come out in one store, and each lane sums in
// the same order as `micro_int` (the same results, bit for bit).
constexpr bool kWide = true;

inline __m512i pair_load(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

inline __m512 pair_halfs(const uint16_t* a, const uint16_t* b) {  // 8 + 8 float16 -> 16 floats
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

inline __m512i broadcast4_wide(const int8_t* x) {
  int32_t a;
  std::memcpy(&a, x, 4);
  return _mm512_set1_epi32(a);
}

template <int RT, int C, bool SYM>
inline void group_dots_wide(Q4Fmt<SYM>, const uint8_t* wa, const uint8_t* wb, const int8_t* x, int64_t K,
                            __m512i (&acc)[RT][C]) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int b = 0; b < 4; ++b) {
    const __m512i raw = pair_load(wa + b * 32, wb + b * 32);
    const __m512i lo = _mm512_and_si512(raw, low);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    const int cl = (2 * b) % C, ch = (2 * b + 1) % C;
    for (int r = 0; r < RT; ++r) {
      acc[r][cl] = _mm512_dpbusd_epi32(acc[r][cl], lo, broadcast4_wide(x + r * K + 4 * b));
      acc[r][ch] = _mm512_dpbusd_epi32(acc[r][ch], hi, broadcast4_wide(x + r * K + 16 + 4 * b));
    }
  }
}

template <int RT, int C>
inline void group_dots_wide(Q8Fmt, const uint8_t* wa, const uint8_t* wb, const int8_t* x, int64_t K,
                            __m512i (&acc)[RT][C]) {
  static_assert(Q8Fmt::kOffset, "with VNNI the 8-bit activations come offset");
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sum = _mm512_setzero_si512();
  for (int b = 0; b < 8; ++b) {
    const __m512i raw = pair_load(wa + b * 32, wb + b * 32);
    sum = _mm512_dpbusd_epi32(sum, ones, raw);
    for (int r = 0; r < RT; ++r) {
      acc[r][b % C] = _mm512_dpbusd_epi32(acc[r][b % C], broadcast4_wide(x + r * K + 4 * b), raw);
    }
  }
  const __m512i shift = _mm512_slli_epi32(sum, 7);
  for (int r = 0; r < RT; ++r) acc[r][0] = _mm512_sub_epi32(acc[r][0], shift);
}

// `micro_int` for tiles a and b (weights wa, wb; scales sa, sb; mins ma, mb): 16 outputs per row.
template <typename F, int RT>
inline void micro_int_wide(const int8_t* xq, const int8_t* xl, const float* dx, const float* dxs,
                           const int32_t* split, const int32_t* n_split, int64_t K, int64_t G, const uint8_t* wa,
                           const uint8_t* wb, const uint16_t* sa, const uint16_t* sb, const uint16_t* ma,
                           const uint16_t* mb, float* y, int64_t ldy) {
  __m512 accf[RT];
  for (int r = 0; r < RT; ++r) accf[r] = _mm512_setzero_ps();
  constexpr int C = RT >= 4 ? 1 : RT == 1 ? 4 : 2;
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* ga = wa + g * F::kBytes;
    const uint8_t* gb = wb + g * F::kBytes;
    for (int64_t b = 0; b < F::kBytes; b += 128) {
      __builtin_prefetch(ga + 4 * F::kBytes + b);
      __builtin_prefetch(gb + 4 * F::kBytes + b);
    }
    __m512i acc[RT][C];
    for (int r = 0; r < RT; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    }
    group_dots_wide<RT, C>(F{}, ga, gb, xq + g * kGroup, K, acc);
    const __m512 s = pair_halfs(sa + g * 8, sb + g * 8);
    for (int r = 0; r < RT; ++r) {
      __m512i h = acc[r][0];
      for (int c = 1; c < C; ++c) h = _mm512_add_epi32(h, acc[r][c]);
      accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_mul_ps(s, _mm512_set1_ps(dx[r * G + g])), accf[r]);
    }
    if constexpr (F::kMin != MinTerm::kNone) {
      const __m512 m = F::kMin == MinTerm::kMinus8 ? _mm512_mul_ps(s, _mm512_set1_ps(-8.0f))
                                                   : pair_halfs(ma + g * 8, mb + g * 8);
      for (int r = 0; r < RT; ++r) accf[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(dxs[r * G + g]), accf[r]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int32_t i = 0; i < n_split[r]; ++i) {
      const int64_t g = split[r * G + i];
      __m512i acc[1][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()}};
      group_dots_wide<1, 2>(F{}, wa + g * F::kBytes, wb + g * F::kBytes, xl + r * K + g * kGroup, K, acc);
      const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[0][0], acc[0][1]));
      const __m512 s = pair_halfs(sa + g * 8, sb + g * 8);
      accf[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(dx[r * G + g] / 254.0f)), accf[r]);
    }
    _mm512_storeu_ps(y + r * ldy, accf[r]);
  }
}

template <typename F>
inline void micro_int_wide_rows(int rt, const int8_t* xq, const int8_t* xl, const float* dx, const float* dxs,
                                const int32_t* split, const int32_t* n_split, int64_t K, int64_t G,
                                const uint8_t* wa, const uint8_t* wb, const uint16_t* sa, const uint16_t* sb,
                                const uint16_t* ma, const uint16_t* mb, float* y, int64_t ldy) {
#define LJ_WIDE(RT)                                                                                 \
  case RT:                                                                                          \
    micro_int_wide<F, RT>(xq, xl, dx, dxs, split, n_split, K, G, wa, wb, sa, sb, ma, mb, y, ldy); \
    break;
  switch (rt) {
    LJ_WIDE(1) LJ_WIDE(2) LJ_WIDE(3) LJ_WIDE(4) LJ_WIDE(5) LJ_WIDE(6) LJ_WIDE(7) LJ_WIDE(8)
    default: break;
  }
#undef LJ_WIDE
}
#else
constexpr bool kWide = false;
#endif
#else
// Portable code (no AVX2): the same arithmetic, one lane at a time.
constexpr int kMRInt = 1;
constexpr bool kWide = false;

template <typename F>
inline void micro_int_rows(int rt, const int8_t* xq, const int8_t* xl, const float* dx, const float* dxs,
                           const int32_t* split, const int32_t* n_split, int64_t K, int64_t G, const uint8_t* w,
                           const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy) {
  for (int r = 0; r < rt; ++r) {
    for (int j = 0; j < 8; ++j) {
      float acc = 0;
      for (int64_t g = 0; g < G; ++g) {
        const float s = half_to_float(sc[g * 8 + j]);
        acc += s * dx[r * G + g] * float(F::scalar_dot(w + g * F::kBytes, xq + r * K + g * kGroup, j));
        if (F::kMin != MinTerm::kNone) {
          const float m = F::kMin == MinTerm::kMinus8 ? -8.0f * s : half_to_float(mn[g * 8 + j]);
          acc += m * dxs[r * G + g];
        }
      }
      for (int32_t i = 0; i < n_split[r]; ++i) {
        const int64_t g = split[r * G + i];
        acc += half_to_float(sc[g * 8 + j]) * (dx[r * G + g] / 254.0f) *
               float(F::scalar_dot(w + g * F::kBytes, xl + r * K + g * kGroup, j));
      }
      y[r * ldy + j] = acc;
    }
  }
}
#endif

// Rows at or past `valid` are zeros (a prefill chunk's padding), as in `matmul`. `mn`: the
// stored mins (F::kMin kStored only). `split`: as in `quantize_rows`.
template <typename F>
void matmul_int(const float* x, int64_t R, int64_t valid, int64_t K, const uint8_t* w,
                const uint16_t* sc, const uint16_t* mn, float* y, int64_t N, float split) {
  if (valid < R) std::memset(y + valid * N, 0, sizeof(float) * (R - valid) * N);
  R = valid;
  if (R == 0) return;
  const int64_t G = K / kGroup, tiles = N / kTile;
  thread_local QuantRows xr;  // the caller's; workers only read it
  quantize_rows(x, R, K, split, &xr, F::kOffset);
  const int8_t* xq = xr.hi.data();
  const int8_t* xl = xr.lo.data();
  const float* dx = xr.d.data();
  const float* dxs = xr.s.data();
  const int32_t* split_at = xr.split.data();
  const int32_t* n_split = xr.n_split.data();
  // ~24 items: an even split on 2-16 threads; an even count of tiles each, for the wide pairs
  const int64_t per_run = (std::max<int64_t>(1, tiles / 24) + 1) & ~int64_t(1);
  const int64_t runs = (tiles + per_run - 1) / per_run;
  const int64_t supers = supers_of(R);
  parallel_for(supers * runs, [=](int64_t item) {
    const int64_t s = item / runs, run = item % runs;
    const int64_t r0 = super_start(s, R), r1 = super_start(s + 1, R);
    const int64_t end = std::min(tiles, (run + 1) * per_run);
    for (int64_t t = run * per_run; t < end;) {
      const uint8_t* wt = w + t * G * F::kBytes;
      const uint16_t* st = sc + t * G * 8;
      const uint16_t* mt = F::kMin == MinTerm::kStored ? mn + t * G * 8 : nullptr;
      const bool pair = kWide && R > 1 && t + 1 < end;  // a lone row is bound by memory: one stream reads best
      for (int64_t r = r0; r < r1; r += kMRInt) {
        const int rt = int(std::min<int64_t>(kMRInt, r1 - r));
        if constexpr (kWide) {
          if (pair) {
            micro_int_wide_rows<F>(rt, xq + r * K, xl + r * K, dx + r * G, dxs + r * G, split_at + r * G,
                                   n_split + r, K, G, wt, wt + G * F::kBytes, st, st + G * 8, mt,
                                   mt ? mt + G * 8 : nullptr, y + r * N + t * kTile, N);
            continue;
          }
        }
        micro_int_rows<F>(rt, xq + r * K, xl + r * K, dx + r * G, dxs + r * G, split_at + r * G, n_split + r, K,
                          G, wt, st, mt, y + r * N + t * kTile, N);
      }
      t += pair ? 2 : 1;
    }
  });
}

// The checks and the layer's pointers shared by the 4-bit and 8-bit handlers: x [R, K], w
// [(L,) N/8, K/32, bytes], scale [(L,) N/8, K/32, 8] float16, mins the same or empty.
struct IntOperands {
  int64_t K, N, G, l, valid;
  bool ok;
};

template <ffi::DataType WT>
IntOperands int_operands(ffi::Buffer<ffi::F32>& x, ffi::Buffer<WT>& w, ffi::Buffer<ffi::F16>& scale,
                         int64_t mins, ffi::Buffer<ffi::S32>& ctl, int64_t bytes, float split) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const size_t n = wd.size();
  IntOperands o{};
  const bool shapes = xd.size() == 2 && xd[1] % kGroup == 0 && (n == 3 || n == 4) && wd[n - 1] == bytes &&
                      wd[n - 2] == xd[1] / kGroup;
  const int64_t L = shapes && n == 4 ? wd[0] : 1;
  o.N = shapes ? wd[n - 3] * kTile : 0;
  o.G = xd.size() == 2 ? xd[1] / kGroup : 0;
  o.K = xd.size() == 2 ? xd[1] : 0;
  o.ok = shapes && scale.element_count() == L * o.N * o.G && (mins == 0 || mins == L * o.N * o.G) &&
         split >= 0 && layer_rows(ctl, L, xd[0], &o.l, &o.valid);
  return o;
}

ffi::Error MatmulQ4(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> scale,
                    ffi::Buffer<ffi::F16> mins, ffi::Buffer<ffi::S32> ctl, ffi::ResultBuffer<ffi::F32> y,
                    float split) {
  const IntOperands o = int_operands(x, w, scale, mins.element_count(), ctl, Q4Fmt<true>::kBytes, split);
  if (!o.ok) {
    return ffi::Error::InvalidArgument(
        "lj_matmul_q4: expected x [R, K], w [(L,) N/8, K/32, 128], scale and min (or no min) "
        "[(L,) N/8, K/32, 8], split >= 0 and a layer in range");
  }
  const bool sym = mins.element_count() == 0;
  const uint8_t* wl = w.typed_data() + o.l * o.N * o.K / 2;
  const uint16_t* sl = reinterpret_cast<const uint16_t*>(scale.typed_data()) + o.l * o.N * o.G;
  const uint16_t* ml = sym ? nullptr : reinterpret_cast<const uint16_t*>(mins.typed_data()) + o.l * o.N * o.G;
  (sym ? matmul_int<Q4Fmt<true>> : matmul_int<Q4Fmt<false>>)(x.typed_data(), x.dimensions()[0], o.valid, o.K, wl,
                                                             sl, ml, y->typed_data(), o.N, split);
  return ffi::Error::Success();
}

ffi::Error MatmulQ8(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F16> scale,
                    ffi::Buffer<ffi::S32> ctl, ffi::ResultBuffer<ffi::F32> y, float split) {
  const IntOperands o = int_operands(x, w, scale, 0, ctl, Q8Fmt::kBytes, split);
  if (!o.ok) {
    return ffi::Error::InvalidArgument(
        "lj_matmul_q8: expected x [R, K], w [(L,) N/8, K/32, 256], scale [(L,) N/8, K/32, 8], split >= 0 "
        "and a layer in range");
  }
  const uint8_t* wl = reinterpret_cast<const uint8_t*>(w.typed_data()) + o.l * o.N * o.K;
  const uint16_t* sl = reinterpret_cast<const uint16_t*>(scale.typed_data()) + o.l * o.N * o.G;
  matmul_int<Q8Fmt>(x.typed_data(), x.dimensions()[0], o.valid, o.K, wl, sl, nullptr, y->typed_data(), o.N, split);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Decode attention for one layer: q [B, KV, G, H]; k_new, v_new [B, KV, H] (this step's token);
// k_cache, v_cache [L, Bmax, S, KV, H]; layer [] int32; lengths [B] int32 (valid cached
// positions per row, clamped to S). out [B, KV, G, H].
// Each row is one work item: scores for its query heads over the valid cache positions and
// the new token, a softmax, and the weighted sums of values. A position's keys and values
// are read from memory once for all heads, in order.

// One query row over two runs of positions, each [n, KV, H] contiguous (all heads of a
// position together, so a run is one sequential read): n1 from k1, v1 (the row's cache), then
// n2 from k2, v2 (new tokens: the decode step's one, or a prefill chunk's first rows up to
// this one). q, out [KV, G, H]. The cache run is float32 or float16 (CacheT uint16_t: a 16-bit
// KV cache, half the memory and the bandwidth), widened as it is read.
template <typename CacheT>
void attend_row(const float* q, const CacheT* k1, const CacheT* v1, int64_t n1, const float* k2,
                const float* v2, int64_t n2, int64_t KV, int64_t G, int64_t H, float scale,
                float* out) {
  const int64_t NQ = KV * G, stride = KV * H, ld = n1 + n2;
  thread_local std::vector<float> buf;
  buf.resize(ld * NQ);
  float* sc = buf.data();  // [KV * G, n1 + n2]
  const bool vec = H % 8 == 0;
  auto dot = [&](const float* a, const auto* c) {
    if (vec) {
      v8f acc0 = {}, acc1 = {};
      int64_t h = 0;
      for (; h + 16 <= H; h += 16) {
        acc0 += load(a + h) * load(c + h);
        acc1 += load(a + h + 8) * load(c + h + 8);
      }
      if (h < H) acc0 += load(a + h) * load(c + h);
      return hsum(acc0 + acc1);
    }
    float s = 0;
    for (int64_t h = 0; h < H; ++h) s += a[h] * widen(c[h]);
    return s;
  };
  auto scores = [&](const auto* kt, int64_t t) {
    for (int64_t kh = 0; kh < KV; ++kh) {
      for (int64_t g = 0; g < G; ++g) {
        sc[(kh * G + g) * ld + t] = dot(q + (kh * G + g) * H, kt + kh * H) * scale;
      }
    }
  };
  for (int64_t t = 0; t < n1; ++t) scores(k1 + t * stride, t);
  for (int64_t t = 0; t < n2; ++t) scores(k2 + t * stride, n1 + t);
  for (int64_t j = 0; j < NQ; ++j) {
    float* s = sc + j * ld;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ld; ++t) m = std::max(m, s[t]);
    float sum = 0;
    for (int64_t t = 0; t < ld; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < ld; ++t) s[t] *= inv;
  }
  for (int64_t i = 0; i < NQ * H; ++i) out[i] = 0.0f;
  auto values = [&](const auto* vt, int64_t t) {
    for (int64_t kh = 0; kh < KV; ++kh) {
      const auto* x = vt + kh * H;
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (kh * G + g) * H;
        const float a = sc[(kh * G + g) * ld + t];
        if (vec) {
          for (int64_t h = 0; h < H; h += 8) store(o + h, load(o + h) + a * load(x + h));
        } else {
          for (int64_t h = 0; h < H; ++h) o[h] += a * widen(x[h]);
        }
      }
    }
  };
  for (int64_t t = 0; t < n1; ++t) values(v1 + t * stride, t);
  for (int64_t t = 0; t < n2; ++t) values(v2 + t * stride, n1 + t);
}

// All rows of one layer; kc, vc point at the layer's [Bmax, S, KV, H].
template <typename CacheT>
void attend(const float* q, const float* k_new, const float* v_new, const CacheT* kc,
            const CacheT* vc, const int32_t* len, float* out, int64_t B, int64_t KV, int64_t G,
            int64_t H, int64_t S) {
  const float scale = 1.0f / std::sqrt(float(H));
  parallel_for(B, [=](int64_t b) {
    const int64_t n = std::clamp<int64_t>(len[b], 0, S);
    attend_row(q + b * KV * G * H, kc + b * S * KV * H, vc + b * S * KV * H, n, k_new + b * KV * H,
               v_new + b * KV * H, 1, KV, G, H, scale, out + b * KV * G * H);
  });
}

template <ffi::DataType CT>
ffi::Error Attend(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                  ffi::Buffer<ffi::F32> v_new, ffi::Buffer<CT> k_cache,
                  ffi::Buffer<CT> v_cache, ffi::Buffer<ffi::S32> layer,
                  ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = k_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || cd[3] != qd[1] || cd[4] != qd[3] || cd[1] < qd[0] ||
      lengths.element_count() < qd[0]) {
    return ffi::Error::InvalidArgument(
        "lj_attend: expected q [B, KV, G, H], caches [L, Bmax, S, KV, H], lengths [B]");
  }
  const int64_t B = qd[0], KV = qd[1], G = qd[2], H = qd[3];
  const int64_t L = cd[0], Bmax = cd[1], S = cd[2];
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("lj_attend: layer out of range");
  const int64_t per_layer = Bmax * S * KV * H;
  attend(q.typed_data(), k_new.typed_data(), v_new.typed_data(), k_cache.typed_data() + l * per_layer,
         v_cache.typed_data() + l * per_layer, lengths.typed_data(), out->typed_data(), B, KV, G, H, S);
  return ffi::Error::Success();
}

// Prefill attention for one slot's chunk: q [T, KV, G, H]; k_new, v_new [T, KV, H] (the
// chunk's own keys and values); k_ctx, v_ctx [C, KV, H] (the slot's cache, of which the first
// `start` positions are valid: clamped to C); ctl int32 [2] = (start, valid rows). Row t attends
// causally over the valid cache and the chunk's rows 0..t; rows at or past `valid` (padding)
// are zeros, not computed. out [T, KV, G, H]. (XLA's masked einsums attend over the whole
// context bucket and every padded row.)
template <ffi::DataType CT>
ffi::Error AttendChunk(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                       ffi::Buffer<ffi::F32> v_new, ffi::Buffer<CT> k_ctx,
                       ffi::Buffer<CT> v_ctx, ffi::Buffer<ffi::S32> ctl,
                       ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), nd = k_new.dimensions(), cd = k_ctx.dimensions();
  if (qd.size() != 4 || nd.size() != 3 || cd.size() != 3 || nd[0] != qd[0] || nd[1] != qd[1] ||
      nd[2] != qd[3] || cd[1] != qd[1] || cd[2] != qd[3] || v_ctx.element_count() != k_ctx.element_count() ||
      v_new.element_count() != k_new.element_count() || ctl.element_count() != 2) {
    return ffi::Error::InvalidArgument(
        "lj_attend_chunk: expected q [T, KV, G, H], k_new/v_new [T, KV, H], k_ctx/v_ctx [C, KV, H], "
        "ctl [2]");
  }
  const int64_t T = qd[0], KV = qd[1], G = qd[2], H = qd[3], C = cd[0];
  const int64_t start = std::clamp<int64_t>(ctl.typed_data()[0], 0, C);
  const int64_t valid = std::clamp<int64_t>(ctl.typed_data()[1], 0, T);
  const float scale = 1.0f / std::sqrt(float(H));
  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  const auto *kc = k_ctx.typed_data(), *vc = v_ctx.typed_data();
  float* o = out->typed_data();
  const int64_t row = KV * G * H;
  std::memset(o + valid * row, 0, sizeof(float) * (T - valid) * row);
  parallel_for(valid, [=](int64_t t) {
    attend_row(qp + t * row, kc, vc, start, kn, vn, t + 1, KV, G, H, scale, o + t * row);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Top-k per row, as lax.top_k: x [B, V] -> values [B, k] descending, indices [B, k], ties in
// index order. A min-heap of the k best so far; most elements lose one comparison with its
// root. (XLA:CPU sorts: about 3 ms for 16 rows of 49152 logits, 0.2 ms here.)

ffi::Error TopK(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> indices) {
  auto xd = x.dimensions(), vd = values->dimensions();
  if (xd.size() != 2 || vd.size() != 2 || vd[0] != xd[0] || vd[1] > xd[1] || vd[1] < 1) {
    return ffi::Error::InvalidArgument("lj_top_k: expected x [B, V] and outputs [B, k], k <= V");
  }
  const int64_t B = xd[0], V = xd[1], k = vd[1];
  const float* xp = x.typed_data();
  float* vp = values->typed_data();
  int32_t* ip = indices->typed_data();
  parallel_for(B, [=](int64_t b) {
    const float* row = xp + b * V;
    thread_local std::vector<std::pair<float, int32_t>> heap;
    heap.clear();
    // "a ranks below b": smaller value, or the same value at a higher index.
    auto below = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& c) {
      return a.first < c.first || (a.first == c.first && a.second > c.second);
    };
    // std heaps are max-heaps of their comparator: with "ranks above", the root ranks lowest.
    auto above = [&](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& c) {
      return below(c, a);
    };
    for (int64_t i = 0; i < k; ++i) heap.emplace_back(row[i], int32_t(i));
    std::make_heap(heap.begin(), heap.end(), above);
    auto offer = [&](int64_t i) {
      if (row[i] > heap.front().first) {  // a later equal value ranks lower: never enters
        std::pop_heap(heap.begin(), heap.end(), above);
        heap.back() = {row[i], int32_t(i)};
        std::push_heap(heap.begin(), heap.end(), above);
      }
    };
    int64_t i = k;
    for (; i < V && i % 8 != 0; ++i) offer(i);
    // Eight at a time: most blocks hold nothing above the root, one vector compare says so.
    for (; i + 8 <= V; i += 8) {
      const v8f root = v8f{} + heap.front().first;
      if (any_greater(load(row + i), root)) {
        for (int64_t j = i; j < i + 8; ++j) offer(j);
      }
    }
    for (; i < V; ++i) offer(i);
    std::sort(heap.begin(), heap.end(), above);
    for (int64_t j = 0; j < k; ++j) {
      vp[b * k + j] = heap[j].first;
      ip[b * k + j] = heap[j].second;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_top_k, TopK,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_matmul_f32, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_matmul_i8, MatmulI8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_matmul_q4, MatmulQ4,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_matmul_q8, MatmulQ8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("split"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_attend, Attend<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_attend_f16, Attend<ffi::F16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_attend_chunk, AttendChunk<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(lj_attend_chunk_f16, AttendChunk<ffi::F16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// bvit_native: XNOR/AND-popcount matmuls for the packed ViT forward, called from
// JAX through the XLA FFI (bvit_jax/deploy/native/__init__.py documents the API).
//
// Operands are the project's plane-order packed signs (bvit_jax/deploy/bitops.py):
// uint32 words, bit 1 = +1, padding bits 0 in both operands.
//
//   pc[g, m, j] = sum_w popcount(op(a[g, m, w], b[g, w, j]))      op = xor | and
//   v = nbits - 2 * pc            (xor: the +-1 dot product)
//   v = 2 * pc - popcount(a row)  (and: sum_k m_k v_k for m in {0,1}, v in +-1)
//   out = v (int32) | float(v) * alpha + bias | float(v) / alpha | float(v) * alpha
//
// Float epilogues round each operation to float32 (built with -ffp-contract=off),
// the same arithmetic the XLA path does. One shared object runs on any x86-64:
// the AVX-512 (VPOPCNTDQ) and AVX2 kernels carry per-function target attributes
// and are chosen at run time from cpuid (__builtin_cpu_supports).

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

int best_isa() {
  static const int isa = detect_isa();
  return isa;
}

// ---------------------------------------------------------------------------
// Thread pool: nthreads - 1 workers plus the calling thread; items handed out
// by an atomic counter. A call made while the pool is busy (XLA may run two
// custom calls at once) runs serially on its own thread.
// ---------------------------------------------------------------------------

int default_threads() {
  if (const char* s = std::getenv("BVIT_NATIVE_THREADS")) {
    int n = std::atoi(s);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  explicit Pool(int n) : nthreads_(n) {
    for (int i = 1; i < n; ++i) std::thread([this] { loop(); }).detach();
  }
  int threads() const { return nthreads_; }

  void parallel_for(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (nthreads_ <= 1 || n <= 1 || !busy.owns_lock()) {
      for (int i = 0; i < n; ++i) f(i);
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = &f;
      n_ = n;
      next_.store(0);
      active_ = nthreads_ - 1;
      ++gen_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> l(mu_);
    done_.wait(l, [&] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    for (int i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return gen_ != seen; });
        seen = gen_;
      }
      work();
      std::lock_guard<std::mutex> l(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  const int nthreads_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, active_ = 0;
  uint64_t gen_ = 0;
  std::atomic<int> next_{0};
};

Pool& pool() {
  static Pool* p = new Pool(default_threads());  // never destroyed: workers outlive static destructors
  return *p;
}

// ---------------------------------------------------------------------------
// Panel kernels: c[i, j] = sum_w popcount(op(a[i, w], b[w, j])), i < mr, j < n.
// a: mr rows of W words (row stride W); b: W rows of n words (row stride n);
// c: int32, row stride ldc (overwritten).
// ---------------------------------------------------------------------------

using PanelFn = void (*)(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c, int ldc,
                        bool and_op);

void panel_portable(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c, int ldc,
                    bool and_op) {
  for (int i = 0; i < mr; ++i) {
    int32_t* ci = c + (size_t)i * ldc;
    std::fill(ci, ci + n, 0);
    for (int w = 0; w < W; ++w) {
      const uint32_t aw = a[(size_t)i * W + w];
      const uint32_t* bw = b + (size_t)w * ldb;
      if (and_op)
        for (int j = 0; j < n; ++j) ci[j] += __builtin_popcount(aw & bw[j]);
      else
        for (int j = 0; j < n; ++j) ci[j] += __builtin_popcount(aw ^ bw[j]);
    }
  }
}

// ---- AVX-512 VPOPCNTDQ: 16 words (512 bits) per vector; MR rows x NV vectors of
// int32 accumulators in registers, the a word broadcast, the b row loaded once per w.
#define BVIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq")))

template <int MR, int NV, bool AND>
BVIT_AVX512 inline void tile512(const uint32_t* a, int W, const uint32_t* b, int ldb, int j0, __mmask16 last,
                                int32_t* c, int ldc) {
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  for (int w = 0; w < W; ++w) {
    const uint32_t* bw = b + (size_t)w * ldb + j0;
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (v == NV - 1) ? _mm512_maskz_loadu_epi32(last, bw + 16 * v) : _mm512_loadu_si512(bw + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32((int)a[(size_t)i * W + w]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i x = AND ? _mm512_and_si512(av, bv[v]) : _mm512_xor_si512(av, bv[v]);
        acc[i][v] = _mm512_add_epi32(acc[i][v], _mm512_popcnt_epi32(x));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      int32_t* p = c + (size_t)i * ldc + j0 + 16 * v;
      if (v == NV - 1)
        _mm512_mask_storeu_epi32(p, last, acc[i][v]);
      else
        _mm512_storeu_si512(p, acc[i][v]);
    }
}

// Column tiles outer, row tiles inner: the b panel of a column tile (W x 64 words)
// stays in L1 while every row tile of the block reads it.
template <int NV, bool AND>
BVIT_AVX512 void cols512(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int j0, __mmask16 last,
                         int32_t* c, int ldc) {
  constexpr int MR = 6;
  int i = 0;
  for (; i + MR <= mr; i += MR) tile512<MR, NV, AND>(a + (size_t)i * W, W, b, ldb, j0, last, c + (size_t)i * ldc, ldc);
  const uint32_t* ai = a + (size_t)i * W;
  int32_t* ci = c + (size_t)i * ldc;
  switch (mr - i) {
    case 5: tile512<5, NV, AND>(ai, W, b, ldb, j0, last, ci, ldc); break;
    case 4: tile512<4, NV, AND>(ai, W, b, ldb, j0, last, ci, ldc); break;
    case 3: tile512<3, NV, AND>(ai, W, b, ldb, j0, last, ci, ldc); break;
    case 2: tile512<2, NV, AND>(ai, W, b, ldb, j0, last, ci, ldc); break;
    case 1: tile512<1, NV, AND>(ai, W, b, ldb, j0, last, ci, ldc); break;
    default: break;
  }
}

template <bool AND>
BVIT_AVX512 void panel512_impl(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c,
                               int ldc) {
  int j = 0;
  for (; j + 64 <= n; j += 64) cols512<4, AND>(a, mr, W, b, ldb, j, 0xFFFF, c, ldc);
  for (; j + 16 <= n; j += 16) cols512<1, AND>(a, mr, W, b, ldb, j, 0xFFFF, c, ldc);
  if (j < n) cols512<1, AND>(a, mr, W, b, ldb, j, (__mmask16)((1u << (n - j)) - 1), c, ldc);
}

BVIT_AVX512 void panel_avx512(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c,
                              int ldc, bool and_op) {
  if (and_op)
    panel512_impl<true>(a, mr, W, b, ldb, n, c, ldc);
  else
    panel512_impl<false>(a, mr, W, b, ldb, n, c, ldc);
}

// ---- AVX2: 8 words per vector; popcount of each byte by a 16-entry nibble table
// (vpshufb), byte counts accumulated for up to 31 words (31 * 8 < 256), then
// summed per 32-bit lane (vpmaddubsw, vpmaddwd) into the int32 result in memory.
#define BVIT_AVX2 __attribute__((target("avx2,fma")))

template <int MR, int NV, bool AND>
BVIT_AVX2 inline void tile256(const uint32_t* a, int W, const uint32_t* b, int ldb, int j0, int valid, int32_t* c,
                              int ldc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  // lanes of the last vector that are real columns (valid in 1..8)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lastmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane);
  __m256i tot[MR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) tot[i][v] = _mm256_setzero_si256();
  for (int w0 = 0; w0 < W; w0 += 31) {
    const int w1 = std::min(W, w0 + 31);
    __m256i acc[MR][NV];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_si256();
    for (int w = w0; w < w1; ++w) {
      const uint32_t* bw = b + (size_t)w * ldb + j0;
      __m256i bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v)
        bv[v] = (v == NV - 1) ? _mm256_maskload_epi32(reinterpret_cast<const int*>(bw + 8 * v), lastmask)
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 8 * v));
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m256i av = _mm256_set1_epi32((int)a[(size_t)i * W + w]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
          const __m256i x = AND ? _mm256_and_si256(av, bv[v]) : _mm256_xor_si256(av, bv[v]);
          const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low4));
          const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
          acc[i][v] = _mm256_add_epi8(acc[i][v], _mm256_add_epi8(lo, hi));
        }
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v)
        tot[i][v] = _mm256_add_epi32(tot[i][v], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[i][v], ones8), ones16));
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      int32_t* p = c + (size_t)i * ldc + j0 + 8 * v;
      if (v == NV - 1)
        _mm256_maskstore_epi32(reinterpret_cast<int*>(p), lastmask, tot[i][v]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), tot[i][v]);
    }
}

template <int NV, bool AND>
BVIT_AVX2 void cols256(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int j0, int valid, int32_t* c,
                       int ldc) {
  constexpr int MR = 3;
  int i = 0;
  for (; i + MR <= mr; i += MR) tile256<MR, NV, AND>(a + (size_t)i * W, W, b, ldb, j0, valid, c + (size_t)i * ldc, ldc);
  const uint32_t* ai = a + (size_t)i * W;
  int32_t* ci = c + (size_t)i * ldc;
  if (mr - i == 2) tile256<2, NV, AND>(ai, W, b, ldb, j0, valid, ci, ldc);
  if (mr - i == 1) tile256<1, NV, AND>(ai, W, b, ldb, j0, valid, ci, ldc);
}

template <bool AND>
BVIT_AVX2 void panel256_impl(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c,
                             int ldc) {
  int j = 0;
  for (; j + 16 <= n; j += 16) cols256<2, AND>(a, mr, W, b, ldb, j, 8, c, ldc);
  for (; j + 8 <= n; j += 8) cols256<1, AND>(a, mr, W, b, ldb, j, 8, c, ldc);
  if (j < n) cols256<1, AND>(a, mr, W, b, ldb, j, n - j, c, ldc);
}

BVIT_AVX2 void panel_avx2(const uint32_t* a, int mr, int W, const uint32_t* b, int ldb, int n, int32_t* c,
                          int ldc, bool and_op) {
  if (and_op)
    panel256_impl<true>(a, mr, W, b, ldb, n, c, ldc);
  else
    panel256_impl<false>(a, mr, W, b, ldb, n, c, ldc);
}


// ---------------------------------------------------------------------------
// Prologue and epilogue bodies, compiled once per level (the wrappers below carry
// the target attribute, so the compiler vectorises the same source for each).
// ---------------------------------------------------------------------------

enum Mode : int { kInt = -1, kMulAdd = 0, kDiv = 1, kMul = 2, kFma = 3 };

// Sign-and-pack (plane order): word w bit j = [x[j * W + w] >= 0] for j * W + w < K.
__attribute__((always_inline)) inline void pack_rows_body(const float* x, int rows, int K, int W, uint32_t* out) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * K;
    uint32_t* o = out + (size_t)r * W;
    std::fill(o, o + W, 0u);
    for (int j = 0; j < 32; ++j) {
      const int start = j * W;
      if (start >= K) break;
      const int len = std::min(W, K - start);
      const float* xs = xr + start;
      for (int w = 0; w < len; ++w) o[w] |= (uint32_t)(xs[w] >= 0.0f) << j;
    }
  }
}

// In place on rows x n int32 popcount sums pc (row stride ld): v = base[r] + mul * pc,
// then out = v | float(v) * alpha + bias | float(v) / alpha | float(v) * alpha | fma(float(v), alpha, bias),
// each float operation rounded to float32 (no contraction: -ffp-contract=off).
// alpha / bias strides an / bn are 1 or 0 (broadcast).
__attribute__((always_inline)) inline void epilogue_body(int32_t* pc, int rows, int n, int ld, const int32_t* base,
                                                         int32_t mul, int mode, const float* al, int64_t an,
                                                         const float* bi, int64_t bn) {
  for (int r = 0; r < rows; ++r) {
    int32_t* ci = pc + (size_t)r * ld;
    float* fi = reinterpret_cast<float*>(ci);
    const int32_t b0 = base[r];
    switch (mode) {
      case kInt:
        for (int j = 0; j < n; ++j) ci[j] = b0 + mul * ci[j];
        break;
      case kMulAdd:
        if (an == 1 && bn == 1) {
          for (int j = 0; j < n; ++j) {
            const float prod = (float)(b0 + mul * ci[j]) * al[j];
            fi[j] = prod + bi[j];
          }
        } else {
          for (int j = 0; j < n; ++j) {
            const float prod = (float)(b0 + mul * ci[j]) * al[j * an];
            fi[j] = prod + bi[j * bn];
          }
        }
        break;
      case kFma:  // one rounding: what XLA computes where it contracts the multiply into the add
        for (int j = 0; j < n; ++j) fi[j] = std::fma((float)(b0 + mul * ci[j]), al[j * an], bi[j * bn]);
        break;
      case kDiv: {
        if (an == 0) {
          const float d = al[0];
          for (int j = 0; j < n; ++j) fi[j] = (float)(b0 + mul * ci[j]) / d;
        } else {
          for (int j = 0; j < n; ++j) fi[j] = (float)(b0 + mul * ci[j]) / al[j];
        }
        break;
      }
      case kMul: {
        if (an == 0) {
          const float m = al[0];
          for (int j = 0; j < n; ++j) fi[j] = (float)(b0 + mul * ci[j]) * m;
        } else {
          for (int j = 0; j < n; ++j) fi[j] = (float)(b0 + mul * ci[j]) * al[j];
        }
        break;
      }
    }
  }
}

using PackFn = void (*)(const float*, int, int, int, uint32_t*);
using EpilogueFn = void (*)(int32_t*, int, int, int, const int32_t*, int32_t, int, const float*, int64_t,
                            const float*, int64_t);

void pack_portable(const float* x, int rows, int K, int W, uint32_t* out) { pack_rows_body(x, rows, K, W, out); }
BVIT_AVX2 void pack_avx2(const float* x, int rows, int K, int W, uint32_t* out) { pack_rows_body(x, rows, K, W, out); }
// AVX-512: 16 words at a time; bit j of words w0..w0+15 comes from the 16 floats at
// j * W + w0 (one masked load, one compare, one masked or per bit plane).
BVIT_AVX512 void pack_avx512(const float* x, int rows, int K, int W, uint32_t* out) {
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * K;
    uint32_t* o = out + (size_t)r * W;
    for (int w0 = 0; w0 < W; w0 += 16) {
      const int lanes = std::min(16, W - w0);
      __m512i acc = _mm512_setzero_si512();
      for (int j = 0; j < 32; ++j) {
        const int start = j * W + w0;
        if (start >= K) break;
        const int valid = std::min(lanes, K - start);
        const __mmask16 m = (__mmask16)(valid >= 16 ? 0xFFFFu : (1u << valid) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + start);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_GE_OQ);  // x >= 0, NaN false, as in C++
        acc = _mm512_mask_or_epi32(acc, ge, acc, _mm512_set1_epi32((int)(1u << j)));
      }
      _mm512_mask_storeu_epi32(o + w0, (__mmask16)(lanes >= 16 ? 0xFFFFu : (1u << lanes) - 1), acc);
    }
  }
}

#define BVIT_EPILOGUE_ARGS                                                                                   \
  int32_t *pc, int rows, int n, int ld, const int32_t *base, int32_t mul, int mode, const float *al, int64_t an, \
      const float *bi, int64_t bn
void epilogue_portable(BVIT_EPILOGUE_ARGS) { epilogue_body(pc, rows, n, ld, base, mul, mode, al, an, bi, bn); }
BVIT_AVX2 void epilogue_avx2(BVIT_EPILOGUE_ARGS) { epilogue_body(pc, rows, n, ld, base, mul, mode, al, an, bi, bn); }
BVIT_AVX512 void epilogue_avx512(BVIT_EPILOGUE_ARGS) {
  epilogue_body(pc, rows, n, ld, base, mul, mode, al, an, bi, bn);
}

struct Kernels {
  PanelFn panel;
  PackFn pack;
  EpilogueFn epilogue;
};

Kernels kernels_for(int isa) {
  switch (isa) {
    case kAvx512: return {panel_avx512, pack_avx512, epilogue_avx512};
    case kAvx2: return {panel_avx2, pack_avx2, epilogue_avx2};
    default: return {panel_portable, pack_portable, epilogue_portable};
  }
}

// ---------------------------------------------------------------------------
// One grouped problem: out[g] (M x N) from a[g] (M x W words, or M x K floats
// packed here) and b[g] (W x N words). Work items: (group, block of kRowBlock
// rows, block of kColBlock columns), handed to the threads.
// ---------------------------------------------------------------------------

struct Problem {
  int G = 0, M = 0, K = 0, W = 0, N = 0;
  const uint32_t* a_words = nullptr;  // (Ga, M, W)
  const float* a_vals = nullptr;      // (Ga, M, K)
  bool a_shared = false;              // Ga = 1: every group reads the same a
  const uint32_t* b = nullptr;        // (G, W, N)
  bool and_op = false;
  int nbits = 0;
  int mode = kInt;
  const float* alpha = nullptr;  // (Ga, Na), Ga in {1, G}, Na in {1, N}
  const float* bias = nullptr;
  int64_t al_g = 0, al_n = 0, bi_g = 0, bi_n = 0;  // element strides (0: broadcast)
  void* out = nullptr;                              // (G, M, N) int32 or float32
  int isa = kPortable;
};

constexpr int kRowBlock = 24;
constexpr int kColBlock = 256;

void run_item(const Problem& p, const Kernels& k, int item) {
  const int rblocks = (p.M + kRowBlock - 1) / kRowBlock, cblocks = (p.N + kColBlock - 1) / kColBlock;
  const int g = item / (rblocks * cblocks), rest = item % (rblocks * cblocks);
  const int m0 = (rest / cblocks) * kRowBlock, j0 = (rest % cblocks) * kColBlock;
  const int mr = std::min(kRowBlock, p.M - m0), nc = std::min(kColBlock, p.N - j0);
  const size_t ga = p.a_shared ? 0 : (size_t)g;
  const uint32_t* a = p.a_words + (ga * p.M + m0) * (size_t)p.W;
  int32_t* c = static_cast<int32_t*>(p.out) + ((size_t)g * p.M + m0) * p.N + j0;
  k.panel(a, mr, p.W, p.b + (size_t)g * p.W * p.N + j0, p.N, nc, c, p.N, p.and_op);
  int32_t base[kRowBlock];
  int32_t mul = -2;
  if (p.and_op) {
    mul = 2;
    for (int i = 0; i < mr; ++i) {
      int32_t ones = 0;
      for (int w = 0; w < p.W; ++w) ones += __builtin_popcount(a[(size_t)i * p.W + w]);
      base[i] = -ones;
    }
  } else {
    std::fill(base, base + mr, (int32_t)p.nbits);
  }
  const float* al = p.alpha ? p.alpha + g * p.al_g + j0 * p.al_n : nullptr;
  const float* bi = p.bias ? p.bias + g * p.bi_g + j0 * p.bi_n : nullptr;
  k.epilogue(c, mr, nc, p.N, base, mul, p.mode, al, p.al_n, bi, p.bi_n);
}

void run(Problem p) {
  const Kernels k = kernels_for(p.isa);
  const int rblocks = (p.M + kRowBlock - 1) / kRowBlock;
  const bool small = (double)p.G * p.M * p.N * std::max(p.W, 1) < 65536.0;  // not worth waking a worker
  if (p.a_vals) {
    // Sign-and-pack prologue, once per row of each distinct activation, into a
    // buffer of the calling thread (reused across calls).
    thread_local std::vector<uint32_t> packed;
    const int ga = p.a_shared ? 1 : p.G;
    packed.resize((size_t)ga * p.M * p.W);
    uint32_t* dst = packed.data();
    auto pack_item = [&p, &k, dst, rblocks](int i) {
      const int g = i / rblocks, m0 = (i % rblocks) * kRowBlock, mr = std::min(kRowBlock, p.M - m0);
      const size_t row = (size_t)g * p.M + m0;
      k.pack(p.a_vals + row * p.K, mr, p.K, p.W, dst + row * p.W);
    };
    if (small || (double)ga * p.M * p.K < 65536.0) {
      for (int i = 0; i < ga * rblocks; ++i) pack_item(i);
    } else {
      pool().parallel_for(ga * rblocks, pack_item);
    }
    p.a_words = dst;
    p.a_vals = nullptr;
  }
  const int items = p.G * rblocks * ((p.N + kColBlock - 1) / kColBlock);
  if (small) {
    for (int i = 0; i < items; ++i) run_item(p, k, i);
    return;
  }
  pool().parallel_for(items, [&p, &k](int i) { run_item(p, k, i); });
}

int resolve_isa(int64_t requested) {
  const int best = best_isa();
  if (requested < 0) return best;
  return std::min<int>((int)requested, best);
}

// ---------------------------------------------------------------------------
// FFI handlers.
// ---------------------------------------------------------------------------

ffi::Error check_b(const ffi::AnyBuffer::Dimensions& bd, int64_t G, int64_t W) {
  if (bd.size() != 3 || bd[0] != G || bd[1] != W)
    return ffi::Error::InvalidArgument("bvit_native: b must be (G, W, N) with the G and W of a");
  return ffi::Error::Success();
}

ffi::Error set_scales(Problem& p, ffi::Buffer<ffi::F32>& alpha, ffi::Buffer<ffi::F32>& bias) {
  auto ad = alpha.dimensions(), bd = bias.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || (ad[0] != 1 && ad[0] != p.G) || (ad[1] != 1 && ad[1] != p.N) ||
      (bd[0] != 1 && bd[0] != p.G) || (bd[1] != 1 && bd[1] != p.N))
    return ffi::Error::InvalidArgument("bvit_native: alpha and bias must be (1 or G, 1 or N)");
  p.alpha = alpha.typed_data();
  p.bias = bias.typed_data();
  p.al_g = ad[0] == 1 ? 0 : ad[1];
  p.al_n = ad[1] == 1 ? 0 : 1;
  p.bi_g = bd[0] == 1 ? 0 : bd[1];
  p.bi_n = bd[1] == 1 ? 0 : 1;
  return ffi::Error::Success();
}

ffi::Error MatmulI32Impl(ffi::Buffer<ffi::U32> a, ffi::Buffer<ffi::U32> b, ffi::ResultBuffer<ffi::S32> out,
                         int64_t nbits, int64_t op, int64_t isa) {
  auto ad = a.dimensions();
  if (ad.size() != 3) return ffi::Error::InvalidArgument("bvit_native: a must be (G, M, W)");
  if (auto e = check_b(b.dimensions(), ad[0], ad[2]); e.failure()) return e;
  Problem p;
  p.G = ad[0], p.M = ad[1], p.W = ad[2], p.N = b.dimensions()[2];
  p.a_words = a.typed_data(), p.b = b.typed_data(), p.and_op = op == 1, p.nbits = (int)nbits;
  p.mode = kInt, p.out = out->typed_data(), p.isa = resolve_isa(isa);
  run(p);
  return ffi::Error::Success();
}

ffi::Error MatmulF32Impl(ffi::Buffer<ffi::U32> a, ffi::Buffer<ffi::U32> b, ffi::Buffer<ffi::F32> alpha,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, int64_t nbits, int64_t op,
                         int64_t mode, int64_t isa) {
  auto ad = a.dimensions();
  if (ad.size() != 3) return ffi::Error::InvalidArgument("bvit_native: a must be (G, M, W)");
  if (auto e = check_b(b.dimensions(), ad[0], ad[2]); e.failure()) return e;
  if (mode < 0 || mode > 3) return ffi::Error::InvalidArgument("bvit_native: mode must be 0, 1, 2 or 3");
  Problem p;
  p.G = ad[0], p.M = ad[1], p.W = ad[2], p.N = b.dimensions()[2];
  if (auto e = set_scales(p, alpha, bias); e.failure()) return e;
  p.a_words = a.typed_data(), p.b = b.typed_data(), p.and_op = op == 1, p.nbits = (int)nbits;
  p.mode = (int)mode, p.out = out->typed_data(), p.isa = resolve_isa(isa);
  run(p);
  return ffi::Error::Success();
}

ffi::Error SignMatmulF32Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> b, ffi::Buffer<ffi::F32> alpha,
                             ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                             int64_t isa) {
  auto xd = x.dimensions(), bd = b.dimensions();
  if (xd.size() != 3 || bd.size() != 3 || (xd[0] != 1 && xd[0] != bd[0]))
    return ffi::Error::InvalidArgument("bvit_native: x must be (1 or G, M, K) and b (G, W, N)");
  const int64_t K = xd[2], W = (K + 31) / 32;
  if (bd[1] != W) return ffi::Error::InvalidArgument("bvit_native: b must hold ceil(K / 32) words per column");
  if (mode < 0 || mode > 3) return ffi::Error::InvalidArgument("bvit_native: mode must be 0, 1, 2 or 3");
  Problem p;
  p.G = bd[0], p.M = xd[1], p.K = K, p.W = W, p.N = bd[2];
  if (auto e = set_scales(p, alpha, bias); e.failure()) return e;
  p.a_vals = x.typed_data(), p.a_shared = xd[0] == 1, p.b = b.typed_data(), p.nbits = (int)K;
  p.mode = (int)mode, p.out = out->typed_data(), p.isa = resolve_isa(isa);
  run(p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvitMatmulI32, MatmulI32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("nbits")
                                  .Attr<int64_t>("op")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvitMatmulF32, MatmulF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("nbits")
                                  .Attr<int64_t>("op")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvitSignMatmulF32, SignMatmulF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa"));

extern "C" {
// The best level this CPU runs: 0 portable, 1 AVX2, 2 AVX-512 VPOPCNTDQ.
int bvit_native_best_isa() { return best_isa(); }
// Threads the pool uses (BVIT_NATIVE_THREADS, else the CPUs this process may run on).
int bvit_native_threads() { return pool().threads(); }
}

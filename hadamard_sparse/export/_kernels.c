/* SPDX-License-Identifier: BSD-3-Clause
 *
 * Sparse x dense kernels for hadamard_sparse (CPU, float32), compiled at first use by
 * hadamard_sparse/export/kernels.py and called through ctypes. Plain C11 with GCC/Clang vector
 * extensions, AVX-512 gathers where the compiler targets them, optional OpenMP (the pragmas
 * are ignored without it).
 *
 *   y[M, N] = x[M, K] @ W^T + b,   W in CSR: rowptr int32[N + 1], col uint16|int32[nnz], val float[nnz]
 *
 * M == 1 (memory/gather bound): one gathered dot product per output row.
 * M >= 2 (compute bound): weight-stationary SpMM. x is transposed into zero-padded tiles of
 *   W tokens, xt[K][W]; for each output row and each of its nonzeros, one contiguous
 *   multiply-add of W lanes, val[j] * xt[col[j]][:], into accumulators held in registers (the
 *   scheme of XNNPACK's sparse inference kernels, with tokens in the place of pixels).
 * Threads split output rows (and token tiles); each output element is written by one thread.
 */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

#define TILE 64     /* tokens per full tile: 4 x 16 lanes */
#define CHUNK 16    /* output rows per scheduled work item (one 64-byte line of outputs) */

/* Output rows [n0, n1) (at most CHUNK) for one tile of W = VW * NV tokens; U accumulator sets
   (U nonzeros in flight) hide FMA latency. */
#define ROWS(NAME, VT, VW, NV, U, IDX)                                                        \
  static void NAME(const float *restrict xt, const int32_t *restrict rowptr,                  \
                   const IDX *restrict col, const float *restrict val,                        \
                   const float *restrict bias, int64_t n0, int64_t n1, float *restrict y,     \
                   int64_t ldy, int64_t mvalid) {                                             \
    enum { W = VW * NV };                                                                     \
    float blk[CHUNK * W]; /* rows x tokens, stored to y transposed below */                   \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      VT a[U][NV];                                                                            \
      for (int u = 0; u < U; ++u)                                                             \
        for (int q = 0; q < NV; ++q) a[u][q] = (VT){0};                                       \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      for (; j + U <= e; j += U) {                                                            \
        for (int u = 0; u < U; ++u) {                                                         \
          const VT v = (VT){0} + val[j + u];                                                  \
          const VT *r = (const VT *)(xt + (int64_t)col[j + u] * W);                           \
          for (int q = 0; q < NV; ++q) a[u][q] += v * r[q];                                   \
        }                                                                                     \
      }                                                                                       \
      for (; j < e; ++j) {                                                                    \
        const VT v = (VT){0} + val[j];                                                        \
        const VT *r = (const VT *)(xt + (int64_t)col[j] * W);                                 \
        for (int q = 0; q < NV; ++q) a[0][q] += v * r[q];                                     \
      }                                                                                       \
      const float b = bias ? bias[n] : 0.0f;                                                  \
      for (int q = 0; q < NV; ++q) {                                                          \
        VT s = a[0][q];                                                                       \
        for (int u = 1; u < U; ++u) s += a[u][q];                                             \
        s += b;                                                                               \
        memcpy(blk + (n - n0) * W + q * VW, &s, sizeof s);                                    \
      }                                                                                       \
    }                                                                                         \
    /* one contiguous run of (n1 - n0) outputs per token: whole cache lines, not scattered */ \
    for (int64_t i = 0; i < mvalid; ++i)                                                      \
      for (int64_t r = 0; r < n1 - n0; ++r) y[i * ldy + n0 + r] = blk[r * W + i];             \
  }

/* Batch 1: one gathered dot product per output row: AVX-512 gathers of x (it sits in L1) where
 * available, four scalar accumulators for the rest and elsewhere. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define LOAD_uint16_t(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_int32_t(p) _mm512_loadu_si512((const void *)(p))
#define DOT_SIMD(IDX)                                                                         \
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();                                  \
  for (; j + 32 <= e; j += 32) {                                                              \
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j),                                            \
                         _mm512_i32gather_ps(LOAD_##IDX(col + j), x, 4), s0);                 \
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j + 16),                                       \
                         _mm512_i32gather_ps(LOAD_##IDX(col + j + 16), x, 4), s1);            \
  }                                                                                           \
  s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
#define DOT_SIMD(IDX)
#endif

#define SPMV(NAME, IDX)                                                                       \
  static void NAME(const float *restrict x, const int32_t *restrict rowptr,                   \
                   const IDX *restrict col, const float *restrict val,                        \
                   const float *restrict bias, int64_t n0, int64_t n1, float *restrict y) {   \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      float s = 0.0f, t = 0.0f, u = 0.0f, w = 0.0f;                                           \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      DOT_SIMD(IDX)                                                                           \
      for (; j + 3 < e; j += 4) {                                                             \
        s += val[j] * x[col[j]];                                                              \
        t += val[j + 1] * x[col[j + 1]];                                                      \
        u += val[j + 2] * x[col[j + 2]];                                                      \
        w += val[j + 3] * x[col[j + 3]];                                                      \
      }                                                                                       \
      for (; j < e; ++j) s += val[j] * x[col[j]];                                             \
      y[n] = (s + t) + (u + w) + (bias ? bias[n] : 0.0f);                                     \
    }                                                                                         \
  }

/* hs_csr_linear_<idx>: see the top of the file. work holds ceil(M / TILE) * TILE * K floats
 * (unused when M == 1). ldx is x's row stride (x's rows are contiguous). Returns 0. */
#define ENTRY(IDX, SUF)                                                                       \
  ROWS(rows64_##SUF, v16, 16, 4, 2, IDX)                                                      \
  ROWS(rows32_##SUF, v16, 16, 2, 4, IDX)                                                      \
  ROWS(rows16_##SUF, v16, 16, 1, 4, IDX)                                                      \
  ROWS(rows8_##SUF, v8, 8, 1, 4, IDX)                                                         \
  ROWS(rows4_##SUF, v4, 4, 1, 4, IDX)                                                         \
  SPMV(spmv_##SUF, IDX)                                                                       \
  int hs_csr_linear_##SUF(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,       \
                          const int32_t *rowptr, const IDX *col, const float *val,            \
                          const float *bias, float *y, float *work, int nthreads) {           \
    const int64_t nch = (N + CHUNK - 1) / CHUNK;                                              \
    if (nthreads < 1) nthreads = 1;                                                           \
    if (M == 1) {                                                                             \
      _Pragma("omp parallel for schedule(dynamic, 4) num_threads(nthreads)")                  \
      for (int64_t c = 0; c < nch; ++c) {                                                     \
        const int64_t n1 = (c + 1) * CHUNK < N ? (c + 1) * CHUNK : N;                         \
        spmv_##SUF(x, rowptr, col, val, bias, c * CHUNK, n1, y);                              \
      }                                                                                       \
      return 0;                                                                               \
    }                                                                                         \
    const int64_t full = M / TILE, rem = M % TILE;                                            \
    int64_t wl = 0;                                                                           \
    if (rem) {                                                                                \
      wl = 4;                                                                                 \
      while (wl < rem) wl *= 2;                                                               \
    }                                                                                         \
    const int64_t ntile = full + (rem ? 1 : 0);                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                        \
    for (int64_t t = 0; t < ntile; ++t) {                                                     \
      const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                     \
      const float *src = x + t * TILE * ldx;                                                  \
      float *dst = work + t * TILE * K;                                                       \
      for (int64_t k = 0; k < K; ++k) {                                                       \
        for (int64_t i = 0; i < mv; ++i) dst[k * W + i] = src[i * ldx + k];                   \
        for (int64_t i = mv; i < W; ++i) dst[k * W + i] = 0.0f;                               \
      }                                                                                       \
    }                                                                                         \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                    \
    for (int64_t q = 0; q < ntile * nch; ++q) {                                               \
      const int64_t t = q / nch, c = q % nch;                                                 \
      const int64_t n0 = c * CHUNK, n1 = (c + 1) * CHUNK < N ? (c + 1) * CHUNK : N;           \
      const float *xt = work + t * TILE * K;                                                  \
      float *yt = y + t * TILE * N;                                                           \
      const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                     \
      switch (W) {                                                                            \
        case 64: rows64_##SUF(xt, rowptr, col, val, bias, n0, n1, yt, N, mv); break;          \
        case 32: rows32_##SUF(xt, rowptr, col, val, bias, n0, n1, yt, N, mv); break;          \
        case 16: rows16_##SUF(xt, rowptr, col, val, bias, n0, n1, yt, N, mv); break;          \
        case 8: rows8_##SUF(xt, rowptr, col, val, bias, n0, n1, yt, N, mv); break;            \
        default: rows4_##SUF(xt, rowptr, col, val, bias, n0, n1, yt, N, mv); break;           \
      }                                                                                       \
    }                                                                                         \
    return 0;                                                                                 \
  }

ENTRY(uint16_t, u16)
ENTRY(int32_t, i32)

/* Lets the loader check that it has the library it compiled. */
int hs_kernels_abi(void) { return 1; }

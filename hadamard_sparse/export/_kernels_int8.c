/* SPDX-License-Identifier: BSD-3-Clause
 *
 * Int8 sparse x dense kernels for hadamard_sparse (CPU), compiled at first use by
 * hadamard_sparse/export/kernels_int8.py (with the compiler, flags and cache of kernels.py) and
 * called through ctypes. The scheme is _kernels.c's (read it first); only the weight values differ:
 *
 *   y[M, N] = (x[M, K] @ Q^T) * scale[N] + b,   Q in CSR: rowptr int32[N + 1], col uint16|int32[nnz],
 *                                               q int8[nnz] (3 bytes per nonzero with uint16 indices)
 *
 * Variant "fp32" (hs_q8_linear_*): activations stay float32; each int8 value is converted to float
 *   in the loop, accumulated in float32, and the row sum is multiplied by the row's scale at the
 *   end. M == 1: one gathered dot product per row (AVX-512 gathers where compiled in, unless
 *   plain != 0); M >= 2: the weight-stationary tile loop of _kernels.c.
 * Variant "int8": each token is quantized to int8 (symmetric, sx[m] = max|x[m]| / 127), products
 *   accumulate in int32, and y = acc * scale[n] * sx[m] + b. On CPUs with AVX512-VBMI and
 *   AVX512-VNNI (runtime check) the weight is read in its "lanes" form (hs_q8_lanes_linear, below:
 *   16 rows per vpdpbusd, activations gathered in registers by vpermi2b); elsewhere
 *   (hs_q8a_linear_*, M >= 2) the CSR tile loop with the tokens in int32 lanes.
 * Threads: whole tiles per thread (or shared row chunks for M == 1): bits do not depend on the
 *   thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef int32_t vi16u __attribute__((vector_size(64), aligned(4)));
typedef int8_t vb16 __attribute__((vector_size(16), aligned(1)));

#define TILE 32
#define CHUNK 16
#define RB 16

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi16){__VA_ARGS__})
#endif
#define ZLO(a, b) SHUF(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define ZHI(a, b) SHUF(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)

static inline int thread_id(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static inline void tr16(const float *restrict s, int64_t lds, float *restrict d, int64_t ldd) {
  v16 r[16], t[16];
  for (int i = 0; i < 16; ++i) memcpy(&r[i], s + i * lds, sizeof(v16));
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = ZLO(r[i], r[i + 8]);
      t[2 * i + 1] = ZHI(r[i], r[i + 8]);
    }
    memcpy(r, t, sizeof r);
  }
  for (int j = 0; j < 16; ++j) memcpy(d + j * ldd, &r[j], sizeof(v16));
}

/* xt[k * W + i] = src[i * ldx + k] for i < mv, 0 for mv <= i < W. */
static void tile_in(const float *restrict src, int64_t ldx, int64_t mv, int64_t K, int64_t W,
                    float *restrict xt) {
  const int64_t m16 = mv & ~(int64_t)15, k16 = K & ~(int64_t)15;
  for (int64_t i = 0; i < m16; i += 16) {
    for (int64_t k = 0; k < k16; k += 16) tr16(src + i * ldx + k, ldx, xt + k * W + i, W);
    for (int64_t ii = i; ii < i + 16; ++ii)
      for (int64_t k = k16; k < K; ++k) xt[k * W + ii] = src[ii * ldx + k];
  }
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t k1 = k0 + 16 < K ? k0 + 16 : K;
    for (int64_t i = m16; i < mv; ++i)
      for (int64_t k = k0; k < k1; ++k) xt[k * W + i] = src[i * ldx + k];
  }
  if (mv < W)
    for (int64_t k = 0; k < K; ++k) memset(xt + k * W + mv, 0, (size_t)(W - mv) * sizeof(float));
}

/* y[i * ldy + r] = acc[r * W + i] for r < nr, i < mv. */
static void tile_out(const float *restrict acc, int64_t W, int64_t nr, int64_t mv, float *restrict y,
                     int64_t ldy) {
  const int64_t m16 = mv & ~(int64_t)15, r16 = nr & ~(int64_t)15;
  for (int64_t i = 0; i < m16; i += 16) {
    for (int64_t r = 0; r < r16; r += 16) tr16(acc + r * W + i, W, y + i * ldy + r, ldy);
    for (int64_t ii = i; ii < i + 16; ++ii)
      for (int64_t r = r16; r < nr; ++r) y[ii * ldy + r] = acc[r * W + ii];
  }
  for (int64_t i = m16; i < mv; ++i)
    for (int64_t r = 0; r < nr; ++r) y[i * ldy + r] = acc[r * W + i];
}

static void tiling(int64_t M, int64_t *full, int64_t *rem, int64_t *wl, int64_t *ntile) {
  *full = M / TILE;
  *rem = M % TILE;
  *wl = 0;
  if (*rem) {
    *wl = 4;
    while (*wl < *rem) *wl *= 2;
  }
  *ntile = *full + (*rem ? 1 : 0);
}

/* Float activations: rows [n0, n1) of one tile into acc[n - n0][W], int8 values. */
#define ROWS(NAME, VT, VW, NV, U, IDX)                                                        \
  static void NAME(const float *restrict xt, const int32_t *restrict rowptr,                  \
                   const IDX *restrict col, const int8_t *restrict val,                       \
                   const float *restrict scale, const float *restrict bias, int64_t n0,       \
                   int64_t n1, float *restrict acc) {                                         \
    enum { W = VW * NV };                                                                     \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      VT a[U][NV];                                                                            \
      for (int u = 0; u < U; ++u)                                                             \
        for (int q = 0; q < NV; ++q) a[u][q] = (VT){0};                                       \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      for (; j + U <= e; j += U) {                                                            \
        for (int u = 0; u < U; ++u) {                                                         \
          const float v = (float)val[j + u];                                                  \
          const VT *r = (const VT *)(xt + (int64_t)col[j + u] * W);                           \
          for (int q = 0; q < NV; ++q) a[u][q] += v * r[q];                                   \
        }                                                                                     \
      }                                                                                       \
      for (; j < e; ++j) {                                                                    \
        const float v = (float)val[j];                                                        \
        const VT *r = (const VT *)(xt + (int64_t)col[j] * W);                                 \
        for (int q = 0; q < NV; ++q) a[0][q] += v * r[q];                                     \
      }                                                                                       \
      const float b = bias ? bias[n] : 0.0f, sc = scale[n];                                   \
      for (int q = 0; q < NV; ++q) {                                                          \
        VT s = a[0][q];                                                                       \
        for (int u = 1; u < U; ++u) s += a[u][q];                                             \
        s = s * sc + b;                                                                       \
        memcpy(acc + (n - n0) * W + q * VW, &s, sizeof s);                                    \
      }                                                                                       \
    }                                                                                         \
  }

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOAD_uint16_t(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_int32_t(p) _mm512_loadu_si512((const void *)(p))
#define QVAL(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define DOT_SIMD(IDX)                                                                         \
  if (!plain) {                                                                               \
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();                                \
    for (; j + 32 <= e; j += 32) {                                                            \
      s0 = _mm512_fmadd_ps(QVAL(val + j), _mm512_i32gather_ps(LOAD_##IDX(col + j), x, 4), s0); \
      s1 = _mm512_fmadd_ps(QVAL(val + j + 16),                                                \
                           _mm512_i32gather_ps(LOAD_##IDX(col + j + 16), x, 4), s1);          \
    }                                                                                         \
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));                                          \
  }
#define HAVE_SIMD 1
#else
#define DOT_SIMD(IDX)
#define HAVE_SIMD 0
#endif

#define SPMV(NAME, IDX)                                                                       \
  static void NAME(const float *restrict x, const int32_t *restrict rowptr,                   \
                   const IDX *restrict col, const int8_t *restrict val,                       \
                   const float *restrict scale, const float *restrict bias, int64_t n0,       \
                   int64_t n1, float *restrict y, int plain) {                                \
    (void)plain;                                                                              \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      float s = 0.0f, t = 0.0f, u = 0.0f, w = 0.0f;                                           \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      DOT_SIMD(IDX)                                                                           \
      for (; j + 3 < e; j += 4) {                                                             \
        s += (float)val[j] * x[col[j]];                                                       \
        t += (float)val[j + 1] * x[col[j + 1]];                                               \
        u += (float)val[j + 2] * x[col[j + 2]];                                               \
        w += (float)val[j + 3] * x[col[j + 3]];                                               \
      }                                                                                       \
      for (; j < e; ++j) s += (float)val[j] * x[col[j]];                                      \
      y[n] = ((s + t) + (u + w)) * scale[n] + (bias ? bias[n] : 0.0f);                        \
    }                                                                                         \
  }

/* Int8 activations: xq[k * W + i] (int8 tile), int32 lanes, 16 tokens per vector. */
#define ROWSQ(NAME, NV, U, IDX)                                                               \
  static void NAME(const int8_t *restrict xq, const float *restrict sx,                       \
                   const int32_t *restrict rowptr, const IDX *restrict col,                   \
                   const int8_t *restrict val, const float *restrict scale,                   \
                   const float *restrict bias, int64_t n0, int64_t n1, float *restrict acc) { \
    enum { W = 16 * NV };                                                                     \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      vi16 a[U][NV];                                                                          \
      for (int u = 0; u < U; ++u)                                                             \
        for (int q = 0; q < NV; ++q) a[u][q] = (vi16){0};                                     \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      for (; j + U <= e; j += U) {                                                            \
        for (int u = 0; u < U; ++u) {                                                         \
          const int32_t v = val[j + u];                                                       \
          const int8_t *r = xq + (int64_t)col[j + u] * W;                                     \
          for (int q = 0; q < NV; ++q) {                                                      \
            vb16 b8;                                                                          \
            memcpy(&b8, r + 16 * q, 16);                                                      \
            a[u][q] += v * __builtin_convertvector(b8, vi16);                                 \
          }                                                                                   \
        }                                                                                     \
      }                                                                                       \
      for (; j < e; ++j) {                                                                    \
        const int32_t v = val[j];                                                             \
        const int8_t *r = xq + (int64_t)col[j] * W;                                           \
        for (int q = 0; q < NV; ++q) {                                                        \
          vb16 b8;                                                                            \
          memcpy(&b8, r + 16 * q, 16);                                                        \
          a[0][q] += v * __builtin_convertvector(b8, vi16);                                   \
        }                                                                                     \
      }                                                                                       \
      const float b = bias ? bias[n] : 0.0f, sc = scale[n];                                   \
      for (int q = 0; q < NV; ++q) {                                                          \
        vi16 s = a[0][q];                                                                     \
        for (int u = 1; u < U; ++u) s += a[u][q];                                             \
        v16 sxv;                                                                              \
        memcpy(&sxv, sx + 16 * q, sizeof sxv);                                                \
        v16 f = __builtin_convertvector(s, v16) * (sxv * sc) + b;                             \
        memcpy(acc + (n - n0) * W + q * 16, &f, sizeof f);                                    \
      }                                                                                       \
    }                                                                                         \
  }

/* Quantize mv tokens (rows of src) to int8 into xq[K][W] (zero padded), sx[i] = max|x_i| / 127. */
static void qtile_in(const float *restrict src, int64_t ldx, int64_t mv, int64_t K, int64_t W,
                     int8_t *restrict xq, float *restrict sx) {
  for (int64_t i = 0; i < W; ++i) {
    if (i >= mv) {
      sx[i] = 0.0f;
      for (int64_t k = 0; k < K; ++k) xq[k * W + i] = 0;
      continue;
    }
    const float *r = src + i * ldx;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = fabsf(r[k]) > amax ? fabsf(r[k]) : amax;
    const float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    sx[i] = s;
    for (int64_t k = 0; k < K; ++k) xq[k * W + i] = (int8_t)lrintf(r[k] * inv);
  }
}

/* First output row of part p of parts (a multiple of RB): short batches share a tile's rows. */
static inline int64_t part_row(int64_t N, int64_t p, int64_t parts) {
  const int64_t r = (N * p / parts + RB - 1) / RB * RB;
  return p == parts ? N : (r < N ? r : N);
}

/* Floats of scratch hs_q8_linear_* / hs_q8a_linear_* need (M >= 2), per thread a tile and acc. */
int64_t hs_q8_work_floats(int64_t M, int64_t K, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (M <= 1) return 0;
  return (int64_t)nthreads * (TILE * K + RB * TILE + TILE);
}

#define ENTRY(IDX, SUF)                                                                       \
  ROWS(rows32_##SUF, v16, 16, 2, 8, IDX)                                                      \
  ROWS(rows16_##SUF, v16, 16, 1, 8, IDX)                                                      \
  ROWS(rows8_##SUF, v8, 8, 1, 8, IDX)                                                         \
  ROWS(rows4_##SUF, v4, 4, 1, 8, IDX)                                                         \
  ROWSQ(qrows32_##SUF, 2, 8, IDX)                                                             \
  ROWSQ(qrows16_##SUF, 1, 8, IDX)                                                             \
  SPMV(spmv_##SUF, IDX)                                                                       \
  int hs_q8_linear_##SUF(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,        \
                         const int32_t *rowptr, const IDX *col, const int8_t *val,            \
                         const float *scale, const float *bias, float *y, float *work,        \
                         int nthreads, int plain) {                                           \
    if (nthreads < 1) nthreads = 1;                                                           \
    if (!HAVE_SIMD) plain = 1;                                                                \
    if (M == 1) {                                                                             \
      const int64_t nch = (N + CHUNK - 1) / CHUNK;                                            \
      _Pragma("omp parallel for schedule(dynamic, 4) num_threads(nthreads)")                  \
      for (int64_t c = 0; c < nch; ++c) {                                                     \
        const int64_t n1 = (c + 1) * CHUNK < N ? (c + 1) * CHUNK : N;                         \
        spmv_##SUF(x, rowptr, col, val, scale, bias, c * CHUNK, n1, y, plain);                \
      }                                                                                       \
      return 0;                                                                               \
    }                                                                                         \
    int64_t full, rem, wl, ntile;                                                             \
    tiling(M, &full, &rem, &wl, &ntile);                                                      \
    const int64_t parts = ntile < nthreads ? nthreads : 1;                                    \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                    \
    for (int64_t q = 0; q < ntile * parts; ++q) {                                             \
      const int64_t t = q / parts, r0 = part_row(N, q % parts, parts),                        \
                    r1 = part_row(N, q % parts + 1, parts);                                   \
      const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                     \
      float *xt = work + thread_id() * (TILE * K + RB * TILE + TILE), *acc = xt + TILE * K;   \
      float *yt = y + t * TILE * N;                                                           \
      tile_in(x + t * TILE * ldx, ldx, mv, K, W, xt);                                         \
      for (int64_t n0 = r0; n0 < r1; n0 += RB) {                                              \
        const int64_t n1 = n0 + RB < r1 ? n0 + RB : r1;                                       \
        switch (W) {                                                                          \
          case 32: rows32_##SUF(xt, rowptr, col, val, scale, bias, n0, n1, acc); break;       \
          case 16: rows16_##SUF(xt, rowptr, col, val, scale, bias, n0, n1, acc); break;       \
          case 8: rows8_##SUF(xt, rowptr, col, val, scale, bias, n0, n1, acc); break;         \
          default: rows4_##SUF(xt, rowptr, col, val, scale, bias, n0, n1, acc); break;        \
        }                                                                                     \
        tile_out(acc, W, n1 - n0, mv, yt + n0, N);                                            \
      }                                                                                       \
    }                                                                                         \
    return 0;                                                                                 \
  }                                                                                           \
  int hs_q8a_linear_##SUF(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,       \
                          const int32_t *rowptr, const IDX *col, const int8_t *val,           \
                          const float *scale, const float *bias, float *y, float *work,       \
                          int nthreads) {                                                     \
    if (nthreads < 1) nthreads = 1;                                                           \
    int64_t full, rem, wl, ntile;                                                             \
    tiling(M, &full, &rem, &wl, &ntile);                                                      \
    const int64_t parts = ntile < nthreads ? nthreads : 1;                                    \
    (void)wl;                                                                                 \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                    \
    for (int64_t q = 0; q < ntile * parts; ++q) {                                             \
      const int64_t t = q / parts, r0 = part_row(N, q % parts, parts),                        \
                    r1 = part_row(N, q % parts + 1, parts);                                   \
      const int64_t mv = t < full ? TILE : rem, W = mv > 16 ? 32 : 16;                        \
      float *base = work + thread_id() * (TILE * K + RB * TILE + TILE);                       \
      int8_t *xq = (int8_t *)base;                                                            \
      float *acc = base + TILE * K, *sx = acc + RB * TILE;                                    \
      float *yt = y + t * TILE * N;                                                           \
      qtile_in(x + t * TILE * ldx, ldx, mv, K, W, xq, sx);                                    \
      for (int64_t n0 = r0; n0 < r1; n0 += RB) {                                              \
        const int64_t n1 = n0 + RB < r1 ? n0 + RB : r1;                                       \
        if (W == 32)                                                                          \
          qrows32_##SUF(xq, sx, rowptr, col, val, scale, bias, n0, n1, acc);                  \
        else                                                                                  \
          qrows16_##SUF(xq, sx, rowptr, col, val, scale, bias, n0, n1, acc);                  \
        tile_out(acc, W, n1 - n0, mv, yt + n0, N);                                            \
      }                                                                                       \
    }                                                                                         \
    return 0;                                                                                 \
  }

ENTRY(uint16_t, u16)
ENTRY(int32_t, i32)

/* Int8 activations on CPUs with AVX512-VBMI and AVX512-VNNI: the weight in "lanes" form. Rows go
 * in groups of 16 (one int32 lane of a 512-bit register per row) and columns in windows of 128.
 * For each group and window, the nonzeros of the group's 16 rows in that window are packed into
 * rounds of 64 bytes of column offsets (7 bits, into the window) and 64 int8 values, row i of the
 * group owning bytes 4i..4i+3 of each round (4 nonzeros per row per round, zero values pad rows
 * with fewer). lanes[r * 128 + 0..63] are round r's offsets, lanes[r * 128 + 64..127] its values;
 * cnt[g * nw + w] is the rounds of group g in window w, ptr[g] group g's first round.
 * Each token is quantized once, xu[k] = round(x[k] / sx) + 128 (unsigned, windows padded with 128),
 * and each round is one vpermi2b (gathers the 64 activations from the window's two registers) and
 * one vpdpbusd (64 products into the 16 rows' int32 lanes): no gathers from memory, 2 bytes read
 * per stored slot. y[n] = (acc - 128 * rowsum[n]) * scale[n] * sx + b[n]. */
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9))
#include <immintrin.h>
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))
#define LT 8 /* tokens per pass over a group's rounds */
#define PF 2048 /* bytes of rounds prefetched ahead for one token */

VNNI_TARGET static void quantize_token(const float *restrict x, int64_t K, int64_t Kp,
                                       uint8_t *restrict xu, float *restrict sx) {
  __m512 m = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(m);
  for (; k < K; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *sx = amax / 127.0f;
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i off = _mm512_set1_epi32(128);
  for (k = 0; k + 16 <= K; k += 16) {  /* round to nearest even, as lrintf */
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vi)), off);
    _mm_storeu_si128((__m128i *)(xu + k), _mm512_cvtepi32_epi8(q));
  }
  for (; k < K; ++k) xu[k] = (uint8_t)(lrintf(x[k] * inv) + 128);
  memset(xu + K, 128, (size_t)(Kp - K));
}

VNNI_TARGET static void lane_group(int64_t M, int64_t Kp, int64_t nw, const uint8_t *restrict xu,
                                   const float *restrict sx, const uint8_t *restrict cnt,
                                   const uint8_t *restrict lanes, const int32_t *restrict rowsum,
                                   const float *restrict scale, const float *restrict bias,
                                   int64_t N, int64_t r0, float *restrict y) {
  const int nr = N - r0 < 16 ? (int)(N - r0) : 16;
  const __mmask16 km = (__mmask16)((1u << nr) - 1);
  const __m512 sc = _mm512_maskz_loadu_ps(km, scale + r0);
  const __m512 bi = bias ? _mm512_maskz_loadu_ps(km, bias + r0) : _mm512_setzero_ps();
  const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(km, rowsum + r0), 7);
  if (M == 1) { /* the window stays in registers; 2 chains hide vpdpbusd's latency */
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    const uint8_t *p = lanes;
    for (int64_t w = 0; w < nw; ++w) {
      int c = cnt[w];
      if (!c) continue;
      const __m512i lo = _mm512_loadu_si512(xu + w * 128), hi = _mm512_loadu_si512(xu + w * 128 + 64);
      for (; c >= 2; c -= 2, p += 256) {
        _mm_prefetch((const char *)(p + PF), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PF + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PF + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PF + 192), _MM_HINT_T0);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_permutex2var_epi8(lo, _mm512_loadu_si512(p), hi),
                                 _mm512_loadu_si512(p + 64));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_permutex2var_epi8(lo, _mm512_loadu_si512(p + 128), hi),
                                 _mm512_loadu_si512(p + 192));
      }
      if (c) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_permutex2var_epi8(lo, _mm512_loadu_si512(p), hi),
                                 _mm512_loadu_si512(p + 64));
        p += 128;
      }
    }
    const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), corr);
    _mm512_mask_storeu_ps(y + r0, km, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                                      _mm512_mul_ps(sc, _mm512_set1_ps(sx[0])), bi));
    return;
  }
  /* LT tokens at a time (xu holds whole tiles: tokens past M are zeros); each window's activations
   * of the LT tokens stay in registers while its rounds stream by */
  for (int64_t t0 = 0; t0 < M; t0 += LT) {
    __m512i a[LT], lo[LT], hi[LT];
    for (int t = 0; t < LT; ++t) a[t] = _mm512_setzero_si512();
    const uint8_t *p = lanes, *xb = xu + t0 * Kp;
    for (int64_t w = 0; w < nw; ++w) {
      int c = cnt[w];
      if (!c) continue;
      for (int t = 0; t < LT; ++t) {
        lo[t] = _mm512_loadu_si512(xb + t * Kp + w * 128);
        hi[t] = _mm512_loadu_si512(xb + t * Kp + w * 128 + 64);
      }
      for (; c > 0; --c, p += 128) {
        const __m512i iv = _mm512_loadu_si512(p), vv = _mm512_loadu_si512(p + 64);
        for (int t = 0; t < LT; ++t)
          a[t] = _mm512_dpbusd_epi32(a[t], _mm512_permutex2var_epi8(lo[t], iv, hi[t]), vv);
      }
    }
    const int tv = M - t0 < LT ? (int)(M - t0) : LT;
    for (int t = 0; t < tv; ++t) {
      const __m512i s = _mm512_sub_epi32(a[t], corr);
      _mm512_mask_storeu_ps(y + (t0 + t) * N + r0, km,
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                            _mm512_mul_ps(sc, _mm512_set1_ps(sx[t0 + t])), bi));
    }
  }
}

static int have_vnni(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("avx512vnni");
}
#define HAVE_VNNI_CODE 1
#else
#define HAVE_VNNI_CODE 0
#endif

/* Whether the lanes + VNNI path runs on this CPU. */
int hs_q8_vnni(void) {
#if HAVE_VNNI_CODE
  return have_vnni();
#else
  return 0;
#endif
}

/* y[M, N] (row-major) for x[M, K] (row stride ldx) with the weight in lanes form (see above):
 * quantizes each token into xu (Mt * Kp bytes of scratch, Kp = 128 * ceil(K / 128), Mt = M rounded
 * up to a multiple of 8 when M > 1) and sx (M floats), then one group of 16 rows per task. lanes
 * must be readable 128 bytes past the last round.
 * Returns 0, or -1 when the CPU lacks the instructions (nothing written). */
int hs_q8_lanes_linear(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                       const int64_t *ptr, const uint8_t *cnt, const uint8_t *lanes,
                       const int32_t *rowsum, const float *scale, const float *bias, float *y,
                       uint8_t *xu, float *sx, int nthreads) {
#if HAVE_VNNI_CODE
  if (!have_vnni()) return -1;
  if (nthreads < 1) nthreads = 1;
  const int64_t nw = (K + 127) / 128, Kp = nw * 128, ng = (N + 15) / 16;
  const int qt = M >= 16 ? nthreads : 1;
  _Pragma("omp parallel for schedule(static) num_threads(qt)")
  for (int64_t m = 0; m < M; ++m) quantize_token(x + m * ldx, K, Kp, xu + m * Kp, sx + m);
  const int64_t Mt = M == 1 ? 1 : (M + LT - 1) / LT * LT;
  memset(xu + M * Kp, 128, (size_t)((Mt - M) * Kp));
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")
  for (int64_t g = 0; g < ng; ++g)
    lane_group(M, Kp, nw, xu, sx, cnt + g * nw, lanes + ptr[g] * 128, rowsum, scale, bias, N, g * 16, y);
  return 0;
#else
  (void)M; (void)K; (void)N; (void)x; (void)ldx; (void)ptr; (void)cnt; (void)lanes; (void)rowsum;
  (void)scale; (void)bias; (void)y; (void)xu; (void)sx; (void)nthreads;
  return -1;
#endif
}

/* Whether the AVX-512 batch-1 path is compiled in. */
int hs_q8_simd(void) { return HAVE_SIMD; }

/* Lets the loader check that it has the library it compiled. */
int hs_q8_abi(void) { return 4; }

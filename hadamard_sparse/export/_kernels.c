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
 * M >= 2 (compute bound): weight-stationary SpMM. x is transposed, 16 x 16 blocks in registers,
 *   into a zero-padded tile of W tokens, xt[K][W] (W = 32, or 16/8/4 for the last tile); for
 *   each output row and each of its nonzeros, one contiguous multiply-add of W lanes,
 *   val[j] * xt[col[j]][:], into accumulators held in registers (the scheme of XNNPACK's sparse
 *   inference kernels, with tokens in the place of pixels). Every 16 finished rows go to
 *   acc[16][W], which is transposed back into y 16 x 16 in registers (whole 64-byte lines).
 * Threads: with enough tiles each thread transposes whole tiles into its own scratch (kept in
 *   its L2) and computes all their rows; with few tiles (a short batch) the tiles are
 *   transposed together first and (tile, 16 rows) items are shared out. Each output element
 *   is computed by one thread in an order fixed by M alone: the bits do not depend on the
 *   thread count.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));

#define TILE 32  /* tokens per full tile: 2 x 16 lanes (64 measured 0-20% slower: its tile is twice
                    as large in L1/L2 and pads more tokens) */
#define CHUNK 16 /* output rows per shared work item */
#define RB 16    /* output rows per pass through acc[RB][W] before it is transposed into y (16 x 16
                    blocks, one 64-byte line per token; 128 rows measured ~5% slower at N = 1536) */

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

/* d[j * ldd + i] = s[i * lds + j] for i, j < 16: four perfect-shuffle rounds in registers. */
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

/* xt[k * W + i] = src[i * ldx + k] for i < mv, 0 for mv <= i < W; 16 tokens at a time, so x is
   read as 16 sequential streams. */
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

/* y[i * ldy + r] = acc[r * W + i] for r < nr, i < mv: 16 tokens at a time. */
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

/* Output rows [n0, n1) for one tile of W = VW * NV tokens into acc[n - n0][W]. U nonzeros in
   flight: U * NV independent accumulator chains (>= 8 hide the FMA latency at two FMAs a cycle). */
#define ROWS(NAME, VT, VW, NV, U, IDX)                                                        \
  static void NAME(const float *restrict xt, const int32_t *restrict rowptr,                  \
                   const IDX *restrict col, const float *restrict val,                        \
                   const float *restrict bias, int64_t n0, int64_t n1, float *restrict acc) { \
    enum { W = VW * NV };                                                                     \
    for (int64_t n = n0; n < n1; ++n) {                                                       \
      VT a[U][NV];                                                                            \
      for (int u = 0; u < U; ++u)                                                             \
        for (int q = 0; q < NV; ++q) a[u][q] = (VT){0};                                       \
      int64_t j = rowptr[n];                                                                  \
      const int64_t e = rowptr[n + 1];                                                        \
      for (; j + U <= e; j += U) {                                                            \
        for (int u = 0; u < U; ++u) {                                                         \
          const float v = val[j + u]; /* scalar x vector: one broadcast load */               \
          const VT *r = (const VT *)(xt + (int64_t)col[j + u] * W);                           \
          for (int q = 0; q < NV; ++q) a[u][q] += v * r[q];                                   \
        }                                                                                     \
      }                                                                                       \
      for (; j < e; ++j) {                                                                    \
        const float v = val[j];                                                               \
        const VT *r = (const VT *)(xt + (int64_t)col[j] * W);                                 \
        for (int q = 0; q < NV; ++q) a[0][q] += v * r[q];                                     \
      }                                                                                       \
      const float b = bias ? bias[n] : 0.0f;                                                  \
      const int short_row = e - rowptr[n] < U; /* only a[0] used: skip the U - 1 zero adds */ \
      for (int q = 0; q < NV; ++q) {                                                          \
        VT s = a[0][q];                                                                       \
        if (short_row)                                                                        \
          s += 0.0f; /* the same bits as adding the zero chains (-0 becomes +0) */            \
        else                                                                                  \
          for (int u = 1; u < U; ++u) s += a[u][q];                                           \
        s += b;                                                                               \
        memcpy(acc + (n - n0) * W + q * VW, &s, sizeof s);                                    \
      }                                                                                       \
    }                                                                                         \
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

/* Rows [r0, r1) of one tile (xt, W tokens wide, mv of them real) into y (token-major, row
   stride ldy), RB rows at a time through acc[RB][W]. */
#define ITEM(NAME, IDX, SUF)                                                                  \
  static void NAME(const float *xt, int64_t W, int64_t mv, const int32_t *rowptr,             \
                   const IDX *col, const float *val, const float *bias, int64_t r0,           \
                   int64_t r1, float *y, int64_t ldy, float *acc) {                           \
    for (int64_t n0 = r0; n0 < r1; n0 += RB) {                                                \
      const int64_t n1 = n0 + RB < r1 ? n0 + RB : r1;                                         \
      switch (W) {                                                                            \
        case 32: rows32_##SUF(xt, rowptr, col, val, bias, n0, n1, acc); break;                \
        case 16: rows16_##SUF(xt, rowptr, col, val, bias, n0, n1, acc); break;                \
        case 8: rows8_##SUF(xt, rowptr, col, val, bias, n0, n1, acc); break;                  \
        default: rows4_##SUF(xt, rowptr, col, val, bias, n0, n1, acc); break;                 \
      }                                                                                       \
      tile_out(acc, W, n1 - n0, mv, y + n0, ldy);                                             \
    }                                                                                         \
  }

/* Tiles of TILE tokens; the last one W = the smallest power of two >= 4 holding the rest. */
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

/* Whole tiles per thread when that keeps every thread busy; else shared (tile, rows) items. */
static int tile_mode(int64_t ntile, int nthreads) {
  return ntile >= 4 * (int64_t)nthreads || ntile % nthreads == 0;
}

/* Floats of scratch hs_csr_linear_* needs for M tokens of K features on nthreads threads. */
int64_t hs_work_floats(int64_t M, int64_t K, int nthreads) {
  int64_t full, rem, wl, ntile;
  if (nthreads < 1) nthreads = 1;
  if (M <= 1) return 0;
  tiling(M, &full, &rem, &wl, &ntile);
  const int64_t tiles = tile_mode(ntile, nthreads) ? (ntile < nthreads ? ntile : nthreads) : ntile;
  return tiles * TILE * K + (int64_t)nthreads * RB * TILE;
}

/* hs_csr_linear_<idx>: see the top of the file. work holds hs_work_floats(M, K, nthreads)
 * floats, 64-byte aligned. ldx is x's row stride (x's rows are contiguous). Returns 0. */
#define ENTRY(IDX, SUF)                                                                       \
  ROWS(rows32_##SUF, v16, 16, 2, 8, IDX)                                                      \
  ROWS(rows16_##SUF, v16, 16, 1, 8, IDX)                                                      \
  ROWS(rows8_##SUF, v8, 8, 1, 8, IDX)                                                         \
  ROWS(rows4_##SUF, v4, 4, 1, 8, IDX)                                                         \
  SPMV(spmv_##SUF, IDX)                                                                       \
  ITEM(item_##SUF, IDX, SUF)                                                                  \
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
    int64_t full, rem, wl, ntile;                                                             \
    tiling(M, &full, &rem, &wl, &ntile);                                                      \
    if (tile_mode(ntile, nthreads)) {                                                         \
      const int64_t tiles = ntile < nthreads ? ntile : nthreads;                              \
      _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                  \
      for (int64_t t = 0; t < ntile; ++t) {                                                   \
        const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                   \
        const int id = thread_id();                                                           \
        float *xt = work + id * TILE * K;                                                     \
        tile_in(x + t * TILE * ldx, ldx, mv, K, W, xt);                                       \
        item_##SUF(xt, W, mv, rowptr, col, val, bias, 0, N, y + t * TILE * N, N,              \
                   work + tiles * TILE * K + id * RB * TILE);                                 \
      }                                                                                       \
      return 0;                                                                               \
    }                                                                                         \
    _Pragma("omp parallel num_threads(nthreads)") {                                           \
      const int64_t kc = 64, nkc = (K + kc - 1) / kc;                                         \
      _Pragma("omp for schedule(static)")                                                     \
      for (int64_t q = 0; q < ntile * nkc; ++q) {                                             \
        const int64_t t = q / nkc, k0 = (q % nkc) * kc, k1 = k0 + kc < K ? k0 + kc : K;       \
        const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                   \
        tile_in(x + t * TILE * ldx + k0, ldx, mv, k1 - k0, W, work + t * TILE * K + k0 * W);  \
      }                                                                                       \
      float *acc = work + ntile * TILE * K + thread_id() * RB * TILE;                         \
      _Pragma("omp for schedule(dynamic, 1)")                                                 \
      for (int64_t q = 0; q < ntile * nch; ++q) {                                             \
        const int64_t t = q / nch, c = q % nch;                                               \
        const int64_t n0 = c * CHUNK, n1 = (c + 1) * CHUNK < N ? (c + 1) * CHUNK : N;         \
        const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                   \
        item_##SUF(work + t * TILE * K, W, mv, rowptr, col, val, bias, n0, n1,                \
                   y + t * TILE * N, N, acc);                                                 \
      }                                                                                       \
    }                                                                                         \
    return 0;                                                                                 \
  }

ENTRY(uint16_t, u16)
ENTRY(int32_t, i32)

/* Direct convolution (no im2col matrix, no transposes), channels-first in and out:
 *
 *   y[n, o, p] = sum_k W[o, k] * patch(n, p)[k] + b[o],   p = oh * Wo + ow,  k = (a * kw + b) * C + c
 *
 * (the column order of SparseConv's 'csr_kernel' layout). The tokens of one tile are W
 * consecutive output positions of one sample; conv_tile_in reads them straight from x
 * (N, C, H, Wd) into xt[K][W] (zero outside the input: padding by bounds), the same ROWS loop as
 * hs_csr_linear_* runs on it, and each finished output row of acc is a contiguous run of y's
 * (N, O, Ho * Wo) layout. Whole tiles per thread, so the bits do not depend on the thread count
 * (and equal hs_csr_linear_* on the im2col matrix: each lane sums in the same order).
 * g: N, C, H, Wd, O, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw (ph, pw: top/left zero padding). */
enum { G_N, G_C, G_H, G_W, G_O, G_HO, G_WO, G_KH, G_KW, G_SH, G_SW, G_PH, G_PW, G_DH, G_DW, G_LEN };

/* xt[k * W + i] = patch(p0 + i)[k] for i < mv, 0 for mv <= i < W, for one sample xs (C, H, Wd). */
static void conv_tile_in(const float *restrict xs, const int64_t *g, int64_t p0, int64_t mv, int64_t W,
                         float *restrict xt) {
  const int64_t C = g[G_C], H = g[G_H], Wd = g[G_W], Wo = g[G_WO], kh = g[G_KH], kw = g[G_KW];
  const int64_t sh = g[G_SH], sw = g[G_SW], ph = g[G_PH], pw = g[G_PW], dh = g[G_DH], dw = g[G_DW];
  const int64_t K = kh * kw * C;
  for (int64_t i = 0; i < mv;) { /* runs of tokens on one output row */
    const int64_t oh = (p0 + i) / Wo, ow = (p0 + i) % Wo;
    const int64_t run = mv - i < Wo - ow ? mv - i : Wo - ow;
    for (int64_t c = 0; c < C; ++c) {
      const float *plane = xs + c * H * Wd;
      for (int64_t a = 0; a < kh; ++a) {
        const int64_t ih = oh * sh - ph + a * dh;
        for (int64_t b = 0; b < kw; ++b) {
          float *restrict d = xt + ((a * kw + b) * C + c) * W + i;
          if (ih < 0 || ih >= H) {
            for (int64_t t = 0; t < run; ++t) d[t] = 0.0f;
            continue;
          }
          const float *restrict s = plane + ih * Wd;
          const int64_t iw0 = ow * sw - pw + b * dw;
          if (sw == 1) {
            const int64_t lo = iw0 < 0 ? (-iw0 < run ? -iw0 : run) : 0;
            const int64_t hi = Wd - iw0 < run ? (Wd - iw0 > lo ? Wd - iw0 : lo) : run;
            for (int64_t t = 0; t < lo; ++t) d[t] = 0.0f;
            for (int64_t t = lo; t < hi; ++t) d[t] = s[iw0 + t];
            for (int64_t t = hi; t < run; ++t) d[t] = 0.0f;
          } else {
            for (int64_t t = 0; t < run; ++t) {
              const int64_t iw = iw0 + t * sw;
              d[t] = iw >= 0 && iw < Wd ? s[iw] : 0.0f;
            }
          }
        }
      }
    }
    i += run;
  }
  if (mv < W)
    for (int64_t k = 0; k < K; ++k) memset(xt + k * W + mv, 0, (size_t)(W - mv) * sizeof(float));
}

/* Tiles per work item: with a short K (few input channels) a group of consecutive tiles of one
   sample shares each pass over the output rows, so that every row of y is written in runs of
   up to GROUP * TILE floats, not 32 (1 -> 512 channels, K = 10: 512 rows of y per tile). The
   group's patch tiles stay within 32 KiB; GROUP depends on K alone (bits do not depend on it). */
static int64_t conv_group(int64_t K) {
  const int64_t g = 8192 / (TILE * K);
  return g < 1 ? 1 : g > 16 ? 16 : g;
}

/* Floats of scratch hs_conv_* needs for K = kh * kw * C on nthreads threads. */
int64_t hs_conv_work_floats(int64_t K, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  return (int64_t)nthreads * (conv_group(K) * TILE * K + RB * TILE);
}

#define CONV_ENTRY(IDX, SUF)                                                                  \
  int hs_conv_##SUF(const int64_t *g, const float *x, const int32_t *rowptr, const IDX *col,  \
                    const float *val, const float *bias, float *y, float *work, int nthreads) { \
    const int64_t C = g[G_C], H = g[G_H], Wd = g[G_W], O = g[G_O];                            \
    const int64_t P = g[G_HO] * g[G_WO], K = g[G_KH] * g[G_KW] * C, G = conv_group(K);        \
    int64_t full, rem, wl, tps;                                                               \
    if (nthreads < 1) nthreads = 1;                                                           \
    tiling(P, &full, &rem, &wl, &tps);                                                        \
    const int64_t gps = (tps + G - 1) / G; /* groups per sample */                            \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                    \
    for (int64_t q = 0; q < g[G_N] * gps; ++q) {                                              \
      const int64_t n = q / gps, t0 = (q % gps) * G, t1 = t0 + G < tps ? t0 + G : tps;        \
      float *xt = work + thread_id() * (G * TILE * K + RB * TILE), *acc = xt + G * TILE * K;  \
      for (int64_t t = t0; t < t1; ++t)                                                       \
        conv_tile_in(x + n * C * H * Wd, g, t * TILE, t < full ? TILE : rem,                  \
                     t < full ? TILE : wl, xt + (t - t0) * TILE * K);                          \
      for (int64_t n0 = 0; n0 < O; n0 += RB) {                                                \
        const int64_t n1 = n0 + RB < O ? n0 + RB : O;                                         \
        for (int64_t t = t0; t < t1; ++t) {                                                   \
          const int64_t W = t < full ? TILE : wl, mv = t < full ? TILE : rem;                 \
          const float *xg = xt + (t - t0) * TILE * K;                                         \
          float *yn = y + n * O * P + t * TILE;                                               \
          switch (W) {                                                                        \
            case 32: rows32_##SUF(xg, rowptr, col, val, bias, n0, n1, acc); break;            \
            case 16: rows16_##SUF(xg, rowptr, col, val, bias, n0, n1, acc); break;            \
            case 8: rows8_##SUF(xg, rowptr, col, val, bias, n0, n1, acc); break;              \
            default: rows4_##SUF(xg, rowptr, col, val, bias, n0, n1, acc); break;             \
          }                                                                                   \
          if (mv == TILE) /* a fixed size: inlined vector copies, no libc call per row */     \
            for (int64_t r = n0; r < n1; ++r)                                                 \
              memcpy(yn + r * P, acc + (r - n0) * W, TILE * sizeof(float));                   \
          else                                                                                \
            for (int64_t r = n0; r < n1; ++r)                                                 \
              memcpy(yn + r * P, acc + (r - n0) * W, (size_t)mv * sizeof(float));             \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
    return 0;                                                                                 \
  }

CONV_ENTRY(uint16_t, u16)
CONV_ENTRY(int32_t, i32)

/* Lets the loader check that it has the library it compiled. */
int hs_kernels_abi(void) { return 3; }

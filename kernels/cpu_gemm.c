/* bf16 GEMM for CPU linears: out [M, N] = x [M, K] @ w [N, K]^T (+ bias), AVX-512 BF16.
 *
 * Why: a decode step multiplies 1-64 activation rows by every weight matrix once. oneDNN's
 * packed bf16 GEMM reached ~290 GFLOP/s at M = 32 and read weights at ~19 GB/s at M = 1 on
 * the 2-core dev VM; this kernel ~360 GFLOP/s and ~27 GB/s on the same weights (cpu_gemm.py's
 * docstring has the measurement). Large M (prefill) runs as fast as oneDNN (~400 GFLOP/s).
 *
 * Layout. The weight is packed once into panels of 48 output columns, and within a panel
 * k-pair by k-pair: packed[p][kp][c][j] = w[48p + c][2kp + j] (zero past N). One k-pair of
 * a panel is 48 x 2 bf16 = three 64-byte vectors, each holding 16 columns' (k, k+1) pairs:
 * exactly what vdpbf16ps multiplies with a broadcast (x[r][k], x[r][k+1]) pair. A panel is
 * read front to back, so the hardware prefetcher streams it (requesting the next panel into
 * L2 by hand, during the first or spread over all row blocks, measured no different).
 *
 * Tile: 8 rows x 48 columns = 24 fp32 accumulators in registers; a row block's 8 broadcasts
 * share each loaded weight vector. The rows of x are read in place (a row stride, unit
 * column stride). Accumulation is fp32 over the whole K; the result is rounded to bf16
 * (round to nearest even) after the bias is added, as F.linear does.
 *
 * Threads: see cpu_gemm_common.h (contiguous panel ranges; rows too when panels are few).
 */
#include <stdint.h>
#include "cpu_gemm_common.h"

#define MR 8  /* rows per tile */

int tf_gemm_fast_bf16(void) { return TF_FAST; }

/* w [n, k] (row stride ldw) -> packed [ceil(n / 48)][k / 2][48][2]; k even. */
int tf_gemm_pack(const uint16_t *w, int64_t n, int64_t k, int64_t ldw, uint16_t *out) {
  if (k <= 0 || k % 2 || n <= 0) return 3;
  int64_t k2 = k / 2, num_panels = (n + NP - 1) / NP;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < num_panels; p++) {
    uint16_t *panel = out + p * k2 * NP * 2;
    for (int64_t kp = 0; kp < k2; kp++)
      for (int64_t c = 0; c < NP; c++) {
        int64_t col = p * NP + c;
        panel[(kp * NP + c) * 2] = col < n ? w[col * ldw + 2 * kp] : 0;
        panel[(kp * NP + c) * 2 + 1] = col < n ? w[col * ldw + 2 * kp + 1] : 0;
      }
  }
  return 0;
}

#if TF_FAST
typedef struct {
  const uint16_t *x; /* the tile's first row */
  int64_t ldx;
  const uint16_t *panel; /* [k2][48][2] */
  int64_t k2;
  const uint16_t *bias; /* this panel's 48 entries, or NULL */
  uint16_t *out;        /* the tile's first output */
  int64_t ldo;
  __mmask16 cols[3]; /* valid columns of each 16-column vector */
} tile_args;

#define ACC_INIT(r) __m512 c##r##0 = z0, c##r##1 = z1, c##r##2 = z2;
#define ACC_STEP(r)                                                                      \
  if (rows > r) {                                                                        \
    __m512bh xr = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + r * ldx + 2 * kp)); \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, xr, w0);                                         \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, xr, w1);                                         \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, xr, w2);                                         \
  }
#define ACC_STORE(r)                                                                       \
  if (rows > r) {                                                                          \
    uint16_t *o = t->out + r * t->ldo;                                                     \
    _mm256_mask_storeu_epi16(o, t->cols[0], (__m256i)_mm512_cvtneps_pbh(c##r##0));        \
    _mm256_mask_storeu_epi16(o + 16, t->cols[1], (__m256i)_mm512_cvtneps_pbh(c##r##1));   \
    _mm256_mask_storeu_epi16(o + 32, t->cols[2], (__m256i)_mm512_cvtneps_pbh(c##r##2));   \
  }

/* One tile of `rows` (1..8) rows. `rows` is a constant in each caller below, so every copy
 * keeps only its own rows' accumulators (written out as 24 named variables: an array of them
 * was stored to the stack on every k step). */
static inline __attribute__((always_inline)) void tile(const tile_args *t, const int rows) {
  __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0;
  if (t->bias) {
    z0 = bf16_to_f32(_mm256_maskz_loadu_epi16(t->cols[0], t->bias));
    z1 = bf16_to_f32(_mm256_maskz_loadu_epi16(t->cols[1], t->bias + 16));
    z2 = bf16_to_f32(_mm256_maskz_loadu_epi16(t->cols[2], t->bias + 32));
  }
  ACC_INIT(0) ACC_INIT(1) ACC_INIT(2) ACC_INIT(3) ACC_INIT(4) ACC_INIT(5) ACC_INIT(6) ACC_INIT(7)
  const uint16_t *x = t->x;
  const int64_t ldx = t->ldx;
  for (int64_t kp = 0; kp < t->k2; kp++) {
    const uint16_t *wk = t->panel + kp * NP * 2;
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    ACC_STEP(0) ACC_STEP(1) ACC_STEP(2) ACC_STEP(3) ACC_STEP(4) ACC_STEP(5) ACC_STEP(6) ACC_STEP(7)
  }
  ACC_STORE(0) ACC_STORE(1) ACC_STORE(2) ACC_STORE(3)
  ACC_STORE(4) ACC_STORE(5) ACC_STORE(6) ACC_STORE(7)
}

#define DEFINE_TILE(R) \
  static __attribute__((noinline)) void tile_##R(const tile_args *t) { tile(t, R); }
DEFINE_TILE(1) DEFINE_TILE(2) DEFINE_TILE(3) DEFINE_TILE(4)
DEFINE_TILE(5) DEFINE_TILE(6) DEFINE_TILE(7) DEFINE_TILE(8)

typedef void (*tile_fn)(const tile_args *);
static const tile_fn TILES[MR + 1] = {0,      tile_1, tile_2, tile_3, tile_4,
                                      tile_5, tile_6, tile_7, tile_8};

typedef struct {
  const uint16_t *x, *packed, *bias;
  uint16_t *out;
  int64_t ldx, ldo, n, k2;
} gemm_args;

/* Panels [p0, p1) for rows [m0, m1): panel by panel, all row blocks of a panel in a row. */
static void run_part(const void *ctx, int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const gemm_args *a = ctx;
  const int64_t panel_len = a->k2 * NP * 2;
  for (int64_t p = p0; p < p1; p++) {
    tile_args t;
    t.ldx = a->ldx;
    t.k2 = a->k2;
    t.ldo = a->ldo;
    t.panel = a->packed + p * panel_len;
    t.bias = a->bias ? a->bias + p * NP : 0;
    tf_panel_masks(a->n, p, t.cols);
    for (int64_t m = m0; m < m1; m += MR) {
      int rows = m1 - m < MR ? (int)(m1 - m) : MR;
      t.x = a->x + m * a->ldx;
      t.out = a->out + m * a->ldo + p * NP;
      TILES[rows](&t);
    }
  }
}
#endif

/* out [m, n] (row stride ldo) = x [m, k] (row stride ldx) @ w^T + bias; w packed by
 * tf_gemm_pack; bias: n bf16 or NULL. Returns 0, or 3 for an unsupported shape or build. */
int tf_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *packed, const uint16_t *bias,
                 uint16_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k, int num_threads) {
#if TF_FAST
  if (k <= 0 || k % 2 || n <= 0 || m < 0) return 3;
  if (m == 0) return 0;
  const gemm_args args = {x, packed, bias, out, ldx, ldo, n, k / 2};
  tf_split(&args, run_part, (n + NP - 1) / NP, m, MR, num_threads);
  return 0;
#else
  (void)x; (void)ldx; (void)packed; (void)bias; (void)out; (void)ldo; (void)m; (void)n; (void)k;
  (void)num_threads;
  return 3;
#endif
}

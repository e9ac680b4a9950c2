/* Weight-only int4 and int8 GEMMs for CPU linears: out [M, N] = x [M, K] @ w [N, K]^T (+ bias),
 * bf16 activations and output, fp32 accumulation, AVX-512 BF16.
 *
 * Why: torch's own kernels for these formats (`_weight_int4pack_mm_for_cpu`,
 * `_weight_int8pack_mm`) were slower than plain bf16 on our bf16 kernel at every batch size
 * above 1 on the dev VM (a 32-row step of the default model's linears, int4 layers + int8 LM
 * head, took 64-71 ms on them against 24 ms in bf16 on our kernel), so quantizing only paid
 * at batch 1. Here the weights are widened to bf16 in registers and fed
 * to the same vdpbf16ps tile as cpu_gemm.c.
 *
 * int4 (llama.cpp's Q4_1 grid: w = d * q + m, q in 0..15, groups of 32 along K, d and m fp16).
 * A nibble q becomes the bf16 number 128 + q by OR-ing in 0x4300 (128.0's bits: the nibble
 * lands in the low mantissa bits, whose unit at that exponent is 1), so the group's dot
 * product is A = sum x (128 + q) and sum x w = d (A - 128 xs) + m xs, with xs the group's sum
 * of x (computed once per call). Each group's A is summed in its own fp32 registers, then
 * folded into the row's total. Packed per panel of 48 columns and per group, 960 bytes:
 * bytes [0, 768) nibbles: 8 double k-pairs x 3 vectors x 32 bytes; byte j of vector v of
 * double k-pair dk holds column 16v + j/2 at k = 4dk + j%2 (low nibble) and k + 2 (high);
 * [768, 864) d and [864, 960) m as fp16, 48 each. One 32-byte load widens (vpmovzxbw) to two
 * weight vectors: k-pair 2dk (low nibbles) and 2dk + 1 (high).
 *
 * int8 (symmetric, one fp32 scale per output column): packed like cpu_gemm.c's bf16 layout,
 * [panel][k-pair][48 columns][2], as int8; 16 bytes -> 16 int32 -> fp32 -> bf16, exact. The
 * scale multiplies the fp32 sum at the end.
 *
 * Tiles: int4 4 rows x 48 columns (12 group + 12 running accumulators); int8 8 x 48 (24
 * accumulators), each widened weight vector serving 8 rows. A row's result does not depend on
 * the other rows, so outputs are batch invariant.
 */
#include <stdint.h>
#include <stdlib.h>
#include "cpu_gemm_common.h"

#define Q4_ROWS 4 /* rows per int4 tile (12 group + 12 running accumulators) */
#define Q8_ROWS 8 /* rows per int8 tile (24 accumulators, like cpu_gemm.c's) */
#define GROUP 32
#define Q4_GROUP_BYTES 960
#define Q4_SCALES 768

int tf_qgemm_fast_bf16(void) { return TF_FAST; }

#if TF_FAST
typedef struct {
  const uint16_t *x, *bias;
  const uint8_t *packed;
  const float *xsum, *scales;
  uint16_t *out;
  int64_t ldx, ldo, n, k;
} qgemm_args;

typedef struct {
  const qgemm_args *a;
  const uint16_t *x, *bias;
  const uint8_t *panel;
  const float *xsum, *scales;
  uint16_t *out;
  __mmask16 cols[3];
} qtile;

static inline void start_totals(const qtile *t, __m512 *z) {
  for (int v = 0; v < 3; v++)
    z[v] = t->bias ? bf16_to_f32(_mm256_maskz_loadu_epi16(t->cols[v], t->bias + 16 * v))
                   : _mm512_setzero_ps();
}

static inline void store_row(const qtile *t, int r, __m512 c0, __m512 c1, __m512 c2) {
  uint16_t *o = t->out + r * t->a->ldo;
  _mm256_mask_storeu_epi16(o, t->cols[0], (__m256i)_mm512_cvtneps_pbh(c0));
  _mm256_mask_storeu_epi16(o + 16, t->cols[1], (__m256i)_mm512_cvtneps_pbh(c1));
  _mm256_mask_storeu_epi16(o + 32, t->cols[2], (__m256i)_mm512_cvtneps_pbh(c2));
}

static inline __m512bh bcast_pair(const uint16_t *x) {
  return (__m512bh)_mm512_set1_epi32(*(const int32_t *)x);
}

/* ---- int4 ---------------------------------------------------------------------------- */
#define Q4_DECL(r) __m512 t##r##0 = z[0], t##r##1 = z[1], t##r##2 = z[2], a##r##0, a##r##1, a##r##2;
#define Q4_ZERO(r) if (rows > r) { a##r##0 = a##r##1 = a##r##2 = _mm512_setzero_ps(); }
#define Q4_DOT(r, v)                                                                \
  if (rows > r) {                                                                   \
    const uint16_t *xr = x + r * ldx + GROUP * g + 4 * dk;                          \
    a##r##v = _mm512_dpbf16_ps(a##r##v, bcast_pair(xr), lo);                        \
    a##r##v = _mm512_dpbf16_ps(a##r##v, bcast_pair(xr + 2), hi);                    \
  }
#define Q4_FOLD(r, v)                                                               \
  if (rows > r) {                                                                   \
    t##r##v = _mm512_fmadd_ps(a##r##v, d, t##r##v);                                 \
    t##r##v = _mm512_fmadd_ps(_mm512_set1_ps(t->xsum[r * groups + g]), c, t##r##v); \
  }
#define Q4_VECTOR(v)                                                                \
  {                                                                                 \
    __m512i w = _mm512_cvtepu8_epi16(                                               \
        _mm256_loadu_si256((const __m256i *)(gp + (dk * 3 + v) * 32)));             \
    __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(w, low4, b128, 0xEA);         \
    __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 4), b128);         \
    Q4_DOT(0, v) Q4_DOT(1, v) Q4_DOT(2, v) Q4_DOT(3, v)                             \
  }
/* d A + (m - 128 d) xs: the 128 xs inside A cancels in fp32, to ~2^-24 of 128 |xs| d. */
#define Q4_FOLD_VECTOR(v)                                                           \
  {                                                                                 \
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sp + 16 * v))); \
    __m512 c = _mm512_fnmadd_ps(c128, d,                                            \
        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sp + 48 + 16 * v))));  \
    Q4_FOLD(0, v) Q4_FOLD(1, v) Q4_FOLD(2, v) Q4_FOLD(3, v)                         \
  }

static inline __attribute__((always_inline)) void q4_tile(const qtile *t, const int rows) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), b128 = _mm512_set1_epi16(0x4300);
  const __m512 c128 = _mm512_set1_ps(128.0f);
  __m512 z[3];
  start_totals(t, z);
  Q4_DECL(0) Q4_DECL(1) Q4_DECL(2) Q4_DECL(3)
  const uint16_t *x = t->x;
  const int64_t ldx = t->a->ldx, groups = t->a->k / GROUP;
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t *gp = t->panel + g * Q4_GROUP_BYTES;
    const uint16_t *sp = (const uint16_t *)(gp + Q4_SCALES);
    Q4_ZERO(0) Q4_ZERO(1) Q4_ZERO(2) Q4_ZERO(3)
    for (int dk = 0; dk < 8; dk++) {
      Q4_VECTOR(0) Q4_VECTOR(1) Q4_VECTOR(2)
    }
    Q4_FOLD_VECTOR(0) Q4_FOLD_VECTOR(1) Q4_FOLD_VECTOR(2)
  }
  if (rows > 0) store_row(t, 0, t00, t01, t02);
  if (rows > 1) store_row(t, 1, t10, t11, t12);
  if (rows > 2) store_row(t, 2, t20, t21, t22);
  if (rows > 3) store_row(t, 3, t30, t31, t32);
}

/* ---- int8 ---------------------------------------------------------------------------- */
#define Q8_DECL(r) __m512 a##r##0 = zero, a##r##1 = zero, a##r##2 = zero;
#define Q8_DOT(r, v) \
  if (rows > r) a##r##v = _mm512_dpbf16_ps(a##r##v, bcast_pair(x + r * ldx + 2 * kp), w##v);
#define Q8_HALF(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define Q8_WEIGHTS(v) \
  __m512bh w##v = _mm512_cvtne2ps_pbh(Q8_HALF(wk + 32 * v + 16), Q8_HALF(wk + 32 * v));
#define Q8_OUT(r)                                                                       \
  if (rows > r)                                                                         \
    store_row(t, r, _mm512_fmadd_ps(a##r##0, s[0], z[0]), _mm512_fmadd_ps(a##r##1, s[1], z[1]), \
              _mm512_fmadd_ps(a##r##2, s[2], z[2]));

static inline __attribute__((always_inline)) void q8_tile(const qtile *t, const int rows) {
  const __m512 zero = _mm512_setzero_ps();
  Q8_DECL(0) Q8_DECL(1) Q8_DECL(2) Q8_DECL(3) Q8_DECL(4) Q8_DECL(5) Q8_DECL(6) Q8_DECL(7)
  const uint16_t *x = t->x;
  const int64_t ldx = t->a->ldx, k2 = t->a->k / 2;
  for (int64_t kp = 0; kp < k2; kp++) {
    const int8_t *wk = (const int8_t *)t->panel + kp * NP * 2;
    Q8_WEIGHTS(0) Q8_WEIGHTS(1) Q8_WEIGHTS(2)
    Q8_DOT(0, 0) Q8_DOT(0, 1) Q8_DOT(0, 2) Q8_DOT(1, 0) Q8_DOT(1, 1) Q8_DOT(1, 2)
    Q8_DOT(2, 0) Q8_DOT(2, 1) Q8_DOT(2, 2) Q8_DOT(3, 0) Q8_DOT(3, 1) Q8_DOT(3, 2)
    Q8_DOT(4, 0) Q8_DOT(4, 1) Q8_DOT(4, 2) Q8_DOT(5, 0) Q8_DOT(5, 1) Q8_DOT(5, 2)
    Q8_DOT(6, 0) Q8_DOT(6, 1) Q8_DOT(6, 2) Q8_DOT(7, 0) Q8_DOT(7, 1) Q8_DOT(7, 2)
  }
  __m512 z[3], s[3];
  start_totals(t, z);
  for (int v = 0; v < 3; v++) s[v] = _mm512_maskz_loadu_ps(t->cols[v], t->scales + 16 * v);
  Q8_OUT(0) Q8_OUT(1) Q8_OUT(2) Q8_OUT(3) Q8_OUT(4) Q8_OUT(5) Q8_OUT(6) Q8_OUT(7)
}

#define DEFINE_TILE(kind, R) \
  static __attribute__((noinline)) void kind##_##R(const qtile *t) { kind##_tile(t, R); }
DEFINE_TILE(q4, 1) DEFINE_TILE(q4, 2) DEFINE_TILE(q4, 3) DEFINE_TILE(q4, 4)
DEFINE_TILE(q8, 1) DEFINE_TILE(q8, 2) DEFINE_TILE(q8, 3) DEFINE_TILE(q8, 4)
DEFINE_TILE(q8, 5) DEFINE_TILE(q8, 6) DEFINE_TILE(q8, 7) DEFINE_TILE(q8, 8)

typedef void (*qtile_fn)(const qtile *);
static const qtile_fn Q4_TILES[Q4_ROWS + 1] = {0, q4_1, q4_2, q4_3, q4_4};
static const qtile_fn Q8_TILES[Q8_ROWS + 1] = {0, q8_1, q8_2, q8_3, q8_4, q8_5, q8_6, q8_7, q8_8};

static void run_part(const qgemm_args *a, const qtile_fn *tiles, int64_t mr, int64_t panel_bytes,
                     int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const int64_t groups = a->k / GROUP;
  for (int64_t p = p0; p < p1; p++) {
    qtile t;
    t.a = a;
    t.panel = a->packed + p * panel_bytes;
    t.bias = a->bias ? a->bias + p * NP : 0;
    t.scales = a->scales ? a->scales + p * NP : 0;
    tf_panel_masks(a->n, p, t.cols);
    for (int64_t m = m0; m < m1; m += mr) {
      int rows = m1 - m < mr ? (int)(m1 - m) : (int)mr;
      t.x = a->x + m * a->ldx;
      t.xsum = a->xsum ? a->xsum + m * groups : 0;
      t.out = a->out + m * a->ldo + p * NP;
      tiles[rows](&t);
    }
  }
}

static void q4_part(const void *ctx, int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const qgemm_args *a = ctx;
  run_part(a, Q4_TILES, Q4_ROWS, a->k / GROUP * Q4_GROUP_BYTES, p0, p1, m0, m1);
}

static void q8_part(const void *ctx, int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const qgemm_args *a = ctx;
  run_part(a, Q8_TILES, Q8_ROWS, a->k * NP, p0, p1, m0, m1);
}

/* xsum [m, k / 32]: each group's sum of x, in one fixed order (a row's result must not depend
 * on the batch). */
static void group_sums(const qgemm_args *a, float *xsum, int64_t m, int num_threads) {
  const int64_t groups = a->k / GROUP;
#pragma omp parallel for num_threads(num_threads) if (m * a->k > (1 << 16))
  for (int64_t r = 0; r < m; r++)
    for (int64_t g = 0; g < groups; g++) {
      const uint16_t *xg = a->x + r * a->ldx + g * GROUP;
      __m512 s = _mm512_add_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i *)xg)),
                               bf16_to_f32(_mm256_loadu_si256((const __m256i *)(xg + 16))));
      xsum[r * groups + g] = _mm512_reduce_add_ps(s);
    }
}
#endif

/* int4: packed [ceil(n / 48)][k / 32][960] (see above). Returns 0, 2 when out of memory, or
 * 3 for an unsupported shape or build. */
int tf_qgemm_q4(const uint16_t *x, int64_t ldx, const uint8_t *packed, const uint16_t *bias,
                uint16_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k, int num_threads) {
#if TF_FAST
  if (k <= 0 || k % GROUP || n <= 0 || m < 0) return 3;
  if (m == 0) return 0;
  float *xsum = malloc((size_t)(m * (k / GROUP)) * sizeof(float)); /* [m, k / 32] */
  if (xsum == NULL) return 2;
  const qgemm_args args = {x, bias, packed, xsum, 0, out, ldx, ldo, n, k};
  group_sums(&args, xsum, m, num_threads < 1 ? 1 : num_threads);
  tf_split(&args, q4_part, (n + NP - 1) / NP, m, Q4_ROWS, num_threads);
  free(xsum);
  return 0;
#else
  (void)x; (void)ldx; (void)packed; (void)bias; (void)out; (void)ldo; (void)m;
  (void)n; (void)k; (void)num_threads;
  return 3;
#endif
}

/* int8: packed [ceil(n / 48)][k / 2][48][2] int8; scales: ceil(n / 48) * 48 floats. */
int tf_qgemm_q8(const uint16_t *x, int64_t ldx, const int8_t *packed, const float *scales,
                const uint16_t *bias, uint16_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k,
                int num_threads) {
#if TF_FAST
  if (k <= 0 || k % 2 || n <= 0 || m < 0) return 3;
  if (m == 0) return 0;
  const qgemm_args args = {x, bias, (const uint8_t *)packed, 0, scales, out, ldx, ldo, n, k};
  tf_split(&args, q8_part, (n + NP - 1) / NP, m, Q8_ROWS, num_threads);
  return 0;
#else
  (void)x; (void)ldx; (void)packed; (void)scales; (void)bias; (void)out; (void)ldo; (void)m;
  (void)n; (void)k; (void)num_threads;
  return 3;
#endif
}

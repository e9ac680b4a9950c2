/* What the CPU GEMM kernels (cpu_gemm.c, cpu_qgemm.c) share: the AVX-512 BF16 check, the
 * 48-column panels, bf16 widening, and how a call's work is split between threads.
 *
 * Threads: panels of output columns are split into contiguous ranges, one per thread: each
 * thread streams its own part of the weight, once. When there are too few panels for the
 * threads (a 576-wide matrix on 16 threads), the rows are split too, in whole tiles of `mr`.
 */
#ifndef TF_CPU_GEMM_COMMON_H
#define TF_CPU_GEMM_COMMON_H
#include <stdint.h>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TF_FAST 1
#else
#define TF_FAST 0
#endif

#define NP 48 /* columns per panel */

#if TF_FAST
static inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* The valid columns of panel p's three 16-column vectors (n columns in all). */
static inline void tf_panel_masks(int64_t n, int64_t p, __mmask16 cols[3]) {
  for (int v = 0; v < 3; v++) {
    int64_t valid = n - p * NP - 16 * v;
    cols[v] = valid >= 16 ? (__mmask16)0xFFFF
              : valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1);
  }
}
#endif

/* Computes panels [p0, p1) for rows [m0, m1). */
typedef void (*tf_part_fn)(const void *ctx, int64_t p0, int64_t p1, int64_t m0, int64_t m1);

static inline void tf_split(const void *ctx, tf_part_fn part, int64_t num_panels, int64_t m,
                            int64_t mr, int num_threads) {
  int threads = num_threads < 1 ? 1 : num_threads;
  if (threads == 1) {
    part(ctx, 0, num_panels, 0, m);
    return;
  }
  int64_t row_parts = 1;
  while (row_parts < threads && num_panels * row_parts < 4 * threads && m > mr * row_parts)
    row_parts *= 2;
  const int64_t part_rows = ((m + row_parts - 1) / row_parts + mr - 1) / mr * mr;
#pragma omp parallel num_threads(threads)
  {
    int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t items = num_panels * row_parts;
    int64_t i0 = items * tid / team, i1 = items * (tid + 1) / team;
    /* Items are row-part-major: a thread's range is contiguous panels of one or two parts. */
    while (i0 < i1) {
      int64_t rp = i0 / num_panels, p0 = i0 % num_panels;
      int64_t p1 = (rp + 1) * num_panels < i1 ? num_panels : i1 - rp * num_panels;
      int64_t m0 = rp * part_rows, m1 = m0 + part_rows < m ? m0 + part_rows : m;
      if (m0 < m1) part(ctx, p0, p1, m0, m1);
      i0 = rp * num_panels + p1;
    }
  }
}
#endif

/* How the CPU GEMM kernels (cpu_gemm.c, cpu_qgemm.c) share a call's work between threads.
 *
 * Panels of output columns are split into contiguous ranges, one per thread: each thread
 * streams its own part of the weight, once. When there are too few panels for the threads (a
 * 576-wide matrix on 16 threads), the rows are split too, in whole tiles of `mr` rows.
 */
#ifndef TF_CPU_GEMM_SPLIT_H
#define TF_CPU_GEMM_SPLIT_H
#include <stdint.h>
#include <omp.h>

/* Computes panels [p0, p1) for rows [m0, m1). */
typedef void (*tf_part_fn)(const void *ctx, int64_t p0, int64_t p1, int64_t m0, int64_t m1);

static inline void tf_split(const void *ctx, tf_part_fn part, int64_t num_panels, int64_t m, int64_t mr,
                     int num_threads) {
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

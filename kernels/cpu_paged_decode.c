/* Paged decode attention for CPUs: one query row per sequence, K/V read in place from the
 * paged cache, fp32 math, GQA (the G query heads of a KV head share each K/V row read).
 *
 * Why C and not torch ops: on a CPU the torch path gathers every sequence's keys and values
 * into a dense copy and calls SDPA, whose per-(sequence, head) set-up dominates at short
 * contexts: ~0.7 ms per layer for 32 sequences of ~200 tokens, ~40 % of a decode step.
 * Built at first use by cpu_paged_decode.py with the system C compiler (-O3 -march=native);
 * the engine falls back to the torch path when no compiler is found.
 *
 * Layout (attention_metadata.py): k_cache, v_cache [num_blocks, block_size, num_kv_heads,
 * head_dim], contiguous; q [num_seqs, num_heads, head_dim] with heads contiguous (q_row_stride
 * elements between sequences); out [num_seqs, num_heads, head_dim] contiguous. Key p of
 * sequence s is in block block_tables[s, p / block_size], row p % block_size. Sequence s
 * attends to keys max(0, seq_lens[s] - window) .. seq_lens[s] - 1 (window 0 = no window).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    const void *q, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *seq_lens;
    int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks, q_row_stride, window;
    float scale;
    int is_bf16;
} job_t;

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Row `row` of a cache as fp32 in `dst` (head_dim values). */
static inline __attribute__((always_inline)) void load_row(
    const job_t *j, const void *cache, int64_t row, float *dst, const int64_t d) {
    if (j->is_bf16) {
        const uint16_t *src = (const uint16_t *)cache + row * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)cache + row * d, (size_t)d * sizeof(float));
    }
}

/* One sequence, all its heads. Keys are visited in order and each key position's row of all
 * KV heads (contiguous in the cache) is read once: visiting (sequence, head) pairs instead
 * read rows num_kv_heads * head_dim apart and ran at DRAM latency (~100 ns a row).
 * `d` is a compile-time constant in the common instantiations below, so the vector loops have
 * no remainder handling. `buf`: 2 * H * d + H + kvh_n * d + H * n floats. */
static inline __attribute__((always_inline)) int attend_seq_d(
    const job_t *j, int64_t s, float *buf, int64_t buf_len, const int64_t d) {
    const int64_t kvh_n = j->num_kv_heads, h_n = j->num_heads, g_n = h_n / kvh_n;
    const int64_t len = j->seq_lens[s];
    const int64_t lo = (j->window > 0 && len > j->window) ? len - j->window : 0;
    const int64_t n = len - lo;
    if (n <= 0 || 2 * h_n * d + h_n + kvh_n * d + h_n * n > buf_len) return 1;
    float *qf = buf, *acc = qf + h_n * d, *m = acc + h_n * d, *row = m + h_n;
    float *scores = row + kvh_n * d; /* [H, n] */
    for (int64_t h = 0; h < h_n; h++) {
        const int64_t off = s * j->q_row_stride + h * d;
        for (int64_t i = 0; i < d; i++)
            qf[h * d + i] = j->scale * (j->is_bf16
                ? bf16_to_f32(((const uint16_t *)j->q)[off + i]) : ((const float *)j->q)[off + i]);
        m[h] = -FLT_MAX;
    }
    const int32_t *table = j->block_tables + s * j->max_blocks;
    for (int64_t t = 0; t < n; t++) { /* pass 1: scores q . k */
        const int64_t p = lo + t;
        const int64_t slot = (int64_t)table[p / j->block_size] * j->block_size + p % j->block_size;
        load_row(j, j->k_cache, slot, row, kvh_n * d);
        for (int64_t h = 0; h < h_n; h++) {
            const float *k = row + (h / g_n) * d, *qh = qf + h * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; i++) dot += qh[i] * k[i];
            scores[h * n + t] = dot;
            m[h] = dot > m[h] ? dot : m[h];
        }
    }
    for (int64_t h = 0; h < h_n; h++) { /* softmax numerators; m[h] becomes 1 / sum */
        float sum = 0.0f, *sc = scores + h * n;
        const float mh = m[h];
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - mh);
            sum += sc[t];
        }
        m[h] = 1.0f / sum;
    }
    memset(acc, 0, (size_t)(h_n * d) * sizeof(float));
    for (int64_t t = 0; t < n; t++) { /* pass 2: weighted sum of v */
        const int64_t p = lo + t;
        const int64_t slot = (int64_t)table[p / j->block_size] * j->block_size + p % j->block_size;
        load_row(j, j->v_cache, slot, row, kvh_n * d);
        for (int64_t h = 0; h < h_n; h++) {
            const float w = scores[h * n + t], *v = row + (h / g_n) * d;
            float *a = acc + h * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) a[i] += w * v[i];
        }
    }
    const int64_t off = s * h_n * d;
    for (int64_t h = 0; h < h_n; h++) {
        for (int64_t i = 0; i < d; i++) {
            const float x = acc[h * d + i] * m[h];
            if (j->is_bf16) ((uint16_t *)j->out)[off + h * d + i] = f32_to_bf16(x);
            else ((float *)j->out)[off + h * d + i] = x;
        }
    }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
/* bf16 caches, head_dim a multiple of 32, with AVX512-BF16: q . k with vdpbf16ps straight from
 * the bf16 rows (no conversion pass), and each query head's output accumulated in registers.
 * One KV head at a time: its G query heads reuse each K row while it is in L1. 2x faster than
 * the portable loop below (which is instruction-bound on conversions and spills). */
#define HAVE_BF16_KERNEL 1
static inline __m512 bf16x16_to_f32(const uint16_t *src) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* Where key position p of this sequence lives (row of all KV heads). */
static inline int64_t slot_of(const job_t *j, const int32_t *table, int64_t p) {
    return (int64_t)table[p / j->block_size] * j->block_size + p % j->block_size;
}

/* At the first row of a block, ask for the next block's first lines: blocks are scattered
 * over the cache, so the hardware prefetcher loses the stream at every block end. */
static inline void prefetch_next_block(const job_t *j, const uint16_t *cache,
                                       const int32_t *table, int64_t p, int64_t len,
                                       int64_t row_elems) {
    const int64_t next = p + j->block_size;
    if (p % j->block_size != 0 || next >= len) return;
    const char *addr = (const char *)(cache + slot_of(j, table, next - next % j->block_size)
                                      * row_elems);
    for (int64_t b = 0; b < 4 * 64; b += 64) _mm_prefetch(addr + b, _MM_HINT_T0);
}

static inline __attribute__((always_inline)) int attend_seq_bf16_d(
    const job_t *j, int64_t s, float *buf, int64_t buf_len, const int64_t d) {
    const int64_t kvh_n = j->num_kv_heads, h_n = j->num_heads, g_n = h_n / kvh_n;
    const int64_t len = j->seq_lens[s], row_elems = kvh_n * d;
    const int64_t lo = (j->window > 0 && len > j->window) ? len - j->window : 0;
    const int64_t n = len - lo;
    if (n <= 0 || 2 * h_n * d + h_n * n > buf_len) return 1;
    float *acc = buf, *scores = buf + h_n * d; /* acc [H, d], scores [H, n], then [H, d] */
    const uint16_t *kc = j->k_cache, *vc = j->v_cache;
    const uint16_t *q = (const uint16_t *)j->q + s * j->q_row_stride;
    const int32_t *table = j->block_tables + s * j->max_blocks;
    for (int64_t t = 0; t < n; t++) { /* pass 1: scores, reading each row of all heads once */
        const int64_t p = lo + t;
        prefetch_next_block(j, kc, table, p, len, row_elems);
        const uint16_t *row = kc + slot_of(j, table, p) * row_elems;
        for (int64_t h = 0; h < h_n; h++) {
            const uint16_t *k = row + (h / g_n) * d;
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < d; c += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(q + h * d + c),
                                       (__m512bh)_mm512_loadu_si512(k + c));
            scores[h * n + t] = _mm512_reduce_add_ps(dot) * j->scale;
        }
    }
    for (int64_t h = 0; h < h_n; h++) { /* softmax numerators; 1 / sum kept in the last slot */
        float *sc = scores + h * n, mx = -FLT_MAX, sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(acc + h * d + c, inv);
    }
    /* pass 2: acc[h] = sum_t w[h, t] * v[t], then times 1 / sum (which acc holds now) */
    float *inv_sum = scores + h_n * n;
    memcpy(inv_sum, acc, (size_t)(h_n * d) * sizeof(float));
    memset(acc, 0, (size_t)(h_n * d) * sizeof(float));
    for (int64_t t = 0; t < n; t++) {
        const int64_t p = lo + t;
        prefetch_next_block(j, vc, table, p, len, row_elems);
        const uint16_t *row = vc + slot_of(j, table, p) * row_elems;
        for (int64_t kvh = 0; kvh < kvh_n; kvh++) {
            __m512 v[16];
            for (int64_t c = 0; c < d / 16; c++) v[c] = bf16x16_to_f32(row + kvh * d + 16 * c);
            for (int64_t h = kvh * g_n; h < (kvh + 1) * g_n; h++) {
                const __m512 w = _mm512_set1_ps(scores[h * n + t]);
                for (int64_t c = 0; c < d / 16; c++) {
                    float *a = acc + h * d + 16 * c;
                    _mm512_storeu_ps(a, _mm512_fmadd_ps(w, v[c], _mm512_loadu_ps(a)));
                }
            }
        }
    }
    uint16_t *out = (uint16_t *)j->out + s * h_n * d;
    for (int64_t i = 0; i < h_n * d; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(
            _mm512_loadu_ps(acc + i), _mm512_loadu_ps(inv_sum + i))));
    return 0;
}

static int attend_seq_bf16(const job_t *j, int64_t s, float *buf, int64_t buf_len) {
    switch (j->head_dim) {
    case 64: return attend_seq_bf16_d(j, s, buf, buf_len, 64);
    case 128: return attend_seq_bf16_d(j, s, buf, buf_len, 128);
    default: return attend_seq_bf16_d(j, s, buf, buf_len, j->head_dim);
    }
}
#endif

static int attend_seq(const job_t *j, int64_t s, float *buf, int64_t buf_len) {
#ifdef HAVE_BF16_KERNEL
    if (j->is_bf16 && j->head_dim % 32 == 0 && j->head_dim <= 256)
        return attend_seq_bf16(j, s, buf, buf_len);
#endif
    switch (j->head_dim) {
    case 64: return attend_seq_d(j, s, buf, buf_len, 64);
    case 128: return attend_seq_d(j, s, buf, buf_len, 128);
    default: return attend_seq_d(j, s, buf, buf_len, j->head_dim);
    }
}

/* Returns 0 on success; 1 bad lengths, 2 out of memory, 3 bad shapes.
 * Threads: OpenMP. The library links the soname libgomp.so.1, which in a process that
 * imported torch resolves to the libgomp torch already loaded: the kernel runs on torch's own
 * intra-op threads. (Threads of its own fought torch's spinning OpenMP workers for the cores
 * and made the kernel 1.5x slower than on one thread.) */
int tf_paged_decode(const void *q, const void *k_cache, const void *v_cache, void *out,
                    const int32_t *block_tables, const int32_t *seq_lens, int64_t num_seqs,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t block_size, int64_t max_blocks, int64_t q_row_stride,
                    int64_t window, float scale, int is_bf16, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0)
        return 3;
    const job_t j = {q, k_cache, v_cache, out, block_tables, seq_lens, num_heads, num_kv_heads,
                     head_dim, block_size, max_blocks, q_row_stride, window, scale, is_bf16};
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    const int64_t buf_len = 2 * num_heads * head_dim + num_heads + num_kv_heads * head_dim
                            + num_heads * max_len;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > num_seqs) num_threads = num_seqs > 0 ? (int)num_seqs : 1;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *buf = malloc((size_t)buf_len * sizeof(float));
        int st = buf == NULL ? 2 : 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++)
            if (st == 0) st = attend_seq(&j, s, buf, buf_len);
        free(buf);
#pragma omp critical
        if (st > status) status = st;
    }
    return status;
}

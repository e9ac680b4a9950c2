/* Paged attention for CPUs, one query row at a time: K/V read in place from the paged cache,
 * fp32 math, GQA (the G query heads of a KV head share each K/V row read). A row is a decode
 * or one token of a prefill chunk: the caller gives each row its sequence's block table and
 * the number of keys it sees (a prefill row: its own position + 1), so "sequence" below means
 * one query row.
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
 * sequence s is in block block_tables[r, p / block_size], row p % block_size, with r =
 * row_seqs[s] (or s when row_seqs is NULL). Sequence s attends to keys
 * max(0, seq_lens[s] - window) .. seq_lens[s] - 1 (window 0 = no window).
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


typedef struct {
    const void *q, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *seq_lens;
    const int32_t *row_seqs; /* row r reads block table row row_seqs[r]; NULL: row r */
    int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks, q_row_stride, window;
    float scale;
    int is_bf16;
} job_t;

typedef struct { /* one thread's scratch */
    float *buf; /* 2 * H * d + H + kvh_n * d + H * max_len floats */
    int64_t buf_len;
    int64_t *offs, *next_offs; /* max_len key row offsets of this row and the next (bf16) */
    int64_t last_first_row; /* where the previous row's first key was: -1 none */
    int64_t requested_first_row; /* the previous row requested K/V of the row whose first
                                  * key is here: -1 none */
    float *parts; /* MAX_PARTS part states of a prompt row (attend_seq_in_parts); lazy */
    const int32_t *last_table; /* block table of the previous row on this thread */
} scratch_t;

/* Query row s's block table (the rows of one prompt share their sequence's). */
static inline const int32_t *table_of(const job_t *j, int64_t s) {
    return j->block_tables + (j->row_seqs != NULL ? j->row_seqs[s] : s) * j->max_blocks;
}

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
    const int32_t *table = table_of(j, s);
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
/* bf16 caches, head_dim a multiple of 32, with AVX512-BF16. Pass 1: q . k with vdpbf16ps
 * straight from the bf16 rows, four positions at a time so that one shuffle tree reduces four
 * dot products. Pass 2: see pass2_registers / pass2_memory. In L2-resident microbenchmarks
 * 3.5x faster than the portable loop below, which is instruction-bound (conversions, one full
 * reduction per dot product, accumulators in memory). */
#define HAVE_BF16_KERNEL 1
static inline __m512 bf16x16_to_f32(const uint16_t *src) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* offs[t]: where key position lo + t's row (all KV heads) starts in a cache, in elements, for
 * t < len - lo. Computed once per query row and shared by both passes and their prefetches
 * (which each divided by block_size per position before; no measurable speed difference). */
static inline void row_offsets(const job_t *j, const int32_t *table, int64_t lo, int64_t len,
                               int64_t row_elems, int64_t *offs) {
    int64_t b = lo / j->block_size, r = lo % j->block_size;
    for (int64_t t = 0; t < len - lo; t++) {
        offs[t] = ((int64_t)table[b] * j->block_size + r) * row_elems;
        if (++r == j->block_size) r = 0, b++;
    }
}

/* Prefetches as volatile asm: GCC deletes a loop whose body is only _mm_prefetch (no side
 * effects, as far as its optimizer knows): every row prefetch this file had until 2026-11-27
 * was missing from the machine code. */
static inline void prefetch_l1(const char *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*p)); }
static inline void prefetch_l2(const char *p) { __asm__ volatile("prefetcht1 %0" : : "m"(*p)); }

/* K/V rows come from memory in a decode step (the layer's weights passed through the caches
 * since the last one), scattered over the cache in blocks; with the math between the loads
 * few were in flight (~10 GB/s of the ~30 GB/s two threads can stream). So a "cold" row
 * (1) asks for the next row's K/V (the row its thread claimed next) into L2 as it goes, K
 * during pass 1 and V during pass 2, position for position: the next row's memory reads
 * overlap this row's math; (2) asks for the row ~8 KB ahead into L1 in each pass; (3) when
 * no previous row asked for its own rows - its thread's first - asks for all of them into
 * L2 up front (K before pass 1, V before the softmax), up to UPFRONT_BYTES.
 * Measured (30 layers of cold caches, A/B in one process), µs per layer call: 32 rows x 192
 * keys 416 -> 244-254, 8 x 1,024 530 -> 355-392, 1 x 1,024 (context split) 65 -> 46-50;
 * ~35 % slower when K/V were already hot (L3). Rows that follow a row with the same keys (a
 * prefill chunk's) are hot: they run a copy of the code without prefetches, as fast as
 * before these were added. */
#define UPFRONT_BYTES (256 * 1024) /* L2 is >= 512 KB a core on the CPUs this targets */

static inline void prefetch_row(const uint16_t *cache, const int64_t *offs, int64_t t,
                                int64_t n, int64_t row_elems) {
    if (t >= n) return;
    const char *row = (const char *)(cache + offs[t]);
    for (int64_t b = 0; b < row_elems * 2; b += 64) prefetch_l1(row + b);
}

static inline void prefetch_row_l2(const uint16_t *cache, const int64_t *offs, int64_t t,
                                   int64_t n, int64_t row_elems) {
    if (t >= n) return;
    const char *row = (const char *)(cache + offs[t]);
    for (int64_t b = 0; b < row_elems * 2; b += 64) prefetch_l2(row + b);
}

/* How many of a row's n keys are asked for ahead of it (up to UPFRONT_BYTES of K or V). */
static inline int64_t upfront_rows(int64_t n, int64_t row_elems) {
    const int64_t max_rows = UPFRONT_BYTES / (row_elems * 2);
    return n < max_rows ? n : max_rows;
}

static inline void prefetch_upfront(const uint16_t *cache, const int64_t *offs, int64_t n,
                                    int64_t row_elems) {
    for (int64_t t = 0; t < upfront_rows(n, row_elems); t++)
        prefetch_row_l2(cache, offs, t, n, row_elems);
}

/* The four sums of a, b, c, d, in lanes 0..3 (10 instructions instead of 4 full reductions). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d */
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

static inline __m512 dot_bf16(const uint16_t *q, const uint16_t *k, const int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c),
                               (__m512bh)_mm512_loadu_si512(k + c));
    return acc;
}

#define CHUNK 64 /* positions whose V rows pass 2 keeps hot while it walks the heads */
#define MAX_ACC 16 /* zmm accumulators pass 2 keeps in registers */

/* Pass 2 when a KV head's query heads fit MAX_ACC registers (SmolLM2: 3 heads x 4): per
 * chunk of positions and KV head, the heads' outputs stay in registers while the chunk's V
 * rows (hot in L1/L2 after the first KV head) stream past. acc [H, d] += w [H, n] . v. */
static inline __attribute__((always_inline)) void pass2_registers(
    const job_t *j, const int64_t *offs, int64_t n, const float *w, float *acc,
    int64_t ahead, const int64_t *next_offs, int64_t next_n, const int64_t d, const int cold) {
    const int64_t kvh_n = j->num_kv_heads, g_n = j->num_heads / kvh_n, nv = d / 16;
    const int64_t row_elems = kvh_n * d;
    const uint16_t *vc = j->v_cache;
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
        for (int64_t kvh = 0; kvh < kvh_n; kvh++) {
            float *acc_kvh = acc + kvh * g_n * d;
            __m512 a[MAX_ACC];
            for (int64_t i = 0; i < g_n * nv; i++) a[i] = _mm512_loadu_ps(acc_kvh + 16 * i);
            for (int64_t t = c0; t < c1; t++) {
                if (cold && kvh == 0) {
                    prefetch_row(vc, offs, t + ahead, n, row_elems);
                    prefetch_row_l2(vc, next_offs, t, next_n, row_elems);
                }
                const uint16_t *v = vc + offs[t] + kvh * d;
                for (int64_t c = 0; c < nv; c++) {
                    const __m512 vf = bf16x16_to_f32(v + 16 * c);
                    for (int64_t g = 0; g < g_n; g++)
                        a[g * nv + c] = _mm512_fmadd_ps(
                            _mm512_set1_ps(w[(kvh * g_n + g) * n + t]), vf, a[g * nv + c]);
                }
            }
            for (int64_t i = 0; i < g_n * nv; i++) _mm512_storeu_ps(acc_kvh + 16 * i, a[i]);
        }
    }
}

/* Pass 2 otherwise (Llama-3-8B: 4 heads x 8): position by position, each V row converted
 * once and added into every head's output in memory (L1). */
static inline __attribute__((always_inline)) void pass2_memory(
    const job_t *j, const int64_t *offs, int64_t n, const float *w, float *acc,
    int64_t ahead, const int64_t *next_offs, int64_t next_n, const int64_t d, const int cold) {
    const int64_t kvh_n = j->num_kv_heads, g_n = j->num_heads / kvh_n, nv = d / 16;
    const int64_t row_elems = kvh_n * d;
    const uint16_t *vc = j->v_cache;
    for (int64_t t = 0; t < n; t++) {
        if (cold) {
            prefetch_row(vc, offs, t + ahead, n, row_elems);
            prefetch_row_l2(vc, next_offs, t, next_n, row_elems);
        }
        const uint16_t *row = vc + offs[t];
        for (int64_t kvh = 0; kvh < kvh_n; kvh++) {
            for (int64_t c = 0; c < nv; c++) {
                const __m512 vf = bf16x16_to_f32(row + kvh * d + 16 * c);
                for (int64_t h = kvh * g_n; h < (kvh + 1) * g_n; h++) {
                    float *a = acc + h * d + 16 * c;
                    _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(w[h * n + t]), vf,
                                                        _mm512_loadu_ps(a)));
                }
            }
        }
    }
}

/* Keys lo..lo+n-1 of query row s (offsets in scratch->offs): writes the output or, with
 * several parts, the part's softmax state. `d` and `cold` are compile-time constants in each
 * copy (see attend_seq_bf16). Cold: `upfront` requests this row's K/V first (unless the
 * previous row did); the passes request the next row's first `next_n` K/V rows into L2 as
 * they go, so that its memory reads overlap this row's math. */
static inline __attribute__((always_inline)) void attend_rows_bf16(
    const job_t *j, int64_t s, int64_t n, int64_t num_parts, scratch_t *scratch,
    float *partial, int upfront, int64_t next_n, const int64_t d, const int cold) {
    const int64_t kvh_n = j->num_kv_heads, h_n = j->num_heads, g_n = h_n / kvh_n;
    const int64_t row_elems = kvh_n * d;
    const int64_t *offs = scratch->offs, *next_offs = scratch->next_offs;
    float *acc = num_parts > 1 ? partial + 2 * h_n : scratch->buf; /* [H, d] */
    float *scores = scratch->buf + h_n * d; /* [H, n] */
    const uint16_t *kc = j->k_cache;
    const uint16_t *q = (const uint16_t *)j->q + s * j->q_row_stride;
    if (cold && upfront) prefetch_upfront(kc, offs, n, row_elems);
    const int64_t ahead_rows = 8192 / (row_elems * 2); /* rows prefetched ahead: ~8 KB */
    const int64_t ahead = ahead_rows < 2 ? 2 : (ahead_rows > 24 ? 24 : ahead_rows);
    /* pass 1: scores, each row of all heads read once; four positions at a time where a KV
     * head's query heads are few (SmolLM2: 1.8x faster); with many (Llama-3-8B's 4 x 128)
     * the blocked loop measured 10 % slower than one position at a time */
    const int small_heads = g_n * (d / 16) <= MAX_ACC;
    int64_t t = 0;
    for (; small_heads && t + 4 <= n; t += 4) {
        const uint16_t *rows[4];
        for (int r = 0; r < 4; r++) {
            rows[r] = kc + offs[t + r];
            if (cold) {
                prefetch_row(kc, offs, t + r + ahead, n, row_elems);
                prefetch_row_l2(kc, next_offs, t + r, next_n, row_elems);
            }
        }
        for (int64_t h = 0; h < h_n; h++) {
            const int64_t off = (h / g_n) * d;
            const __m128 sums = hsum4(dot_bf16(q + h * d, rows[0] + off, d),
                                      dot_bf16(q + h * d, rows[1] + off, d),
                                      dot_bf16(q + h * d, rows[2] + off, d),
                                      dot_bf16(q + h * d, rows[3] + off, d));
            _mm_storeu_ps(scores + h * n + t, _mm_mul_ps(sums, _mm_set1_ps(j->scale)));
        }
    }
    for (; t < n; t++) {
        if (cold) {
            prefetch_row(kc, offs, t + ahead, n, row_elems);
            prefetch_row_l2(kc, next_offs, t, next_n, row_elems);
        }
        const uint16_t *row = kc + offs[t];
        for (int64_t h = 0; h < h_n; h++)
            scores[h * n + t] = _mm512_reduce_add_ps(
                dot_bf16(q + h * d, row + (h / g_n) * d, d)) * j->scale;
    }
    if (cold) { /* the next row's K rows past this one's; this row's V during the softmax */
        for (int64_t r = n; r < next_n; r++) prefetch_row_l2(kc, next_offs, r, next_n, row_elems);
        if (upfront) prefetch_upfront(j->v_cache, offs, n, row_elems);
    }
    for (int64_t h = 0; h < h_n; h++) { /* softmax numerators */
        float *sc = scores + h * n, mx = -FLT_MAX, sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < n; i++) mx = sc[i] > mx ? sc[i] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) {
            sc[i] = expf(sc[i] - mx);
            sum += sc[i];
        }
        if (num_parts > 1) { /* finalize_parts rescales and normalizes */
            partial[h] = mx, partial[h_n + h] = sum;
            continue;
        }
        const float inv = 1.0f / sum; /* fold 1 / sum into the weights */
#pragma omp simd
        for (int64_t i = 0; i < n; i++) sc[i] *= inv;
    }
    memset(acc, 0, (size_t)(h_n * d) * sizeof(float));
    if (small_heads) pass2_registers(j, offs, n, scores, acc, ahead, next_offs, next_n, d, cold);
    else pass2_memory(j, offs, n, scores, acc, ahead, next_offs, next_n, d, cold);
    if (cold)
        for (int64_t r = n; r < next_n; r++)
            prefetch_row_l2(j->v_cache, next_offs, r, next_n, row_elems);
    if (num_parts > 1) return;
    uint16_t *out = (uint16_t *)j->out + s * h_n * d;
    for (int64_t i = 0; i < h_n * d; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + i)));
}

/* The two copies as separate functions: compiled into one, the hot copy came out 10-20 %
 * slower than with no cold copy at all (16 x 128 prefill rows, A/B in one process). */
#define ATTEND_ROWS_COPY(NAME, COLD)                                                           \
    static __attribute__((noinline)) void NAME(const job_t *j, int64_t s, int64_t n,            \
                                               int64_t num_parts, scratch_t *scratch,          \
                                               float *partial, int upfront, int64_t next_n) {  \
        switch (j->head_dim) {                                                                 \
        case 64:                                                                               \
            attend_rows_bf16(j, s, n, num_parts, scratch, partial, upfront, next_n, 64, COLD); \
            break;                                                                             \
        case 128:                                                                              \
            attend_rows_bf16(j, s, n, num_parts, scratch, partial, upfront, next_n, 128, COLD);\
            break;                                                                             \
        default:                                                                               \
            attend_rows_bf16(j, s, n, num_parts, scratch, partial, upfront, next_n,            \
                             j->head_dim, COLD);                                               \
        }                                                                                      \
    }
ATTEND_ROWS_COPY(attend_rows_cold, 1)
ATTEND_ROWS_COPY(attend_rows_hot, 0)
#undef ATTEND_ROWS_COPY

/* The keys [*lo, *len) that part `part` of `num_parts` of query row s attends to. */
static inline void key_range(const job_t *j, int64_t s, int64_t part, int64_t num_parts,
                             int64_t *lo, int64_t *len) {
    const int64_t seq_len = j->seq_lens[s];
    const int64_t first = (j->window > 0 && seq_len > j->window) ? seq_len - j->window : 0;
    *lo = first + (seq_len - first) * part / num_parts;
    *len = first + (seq_len - first) * (part + 1) / num_parts;
}

/* Part `part` of `num_parts` of query row s's keys. One part: writes the output. Several (a
 * long context, see parts_of): writes the part's softmax state to `partial` [H max, H sum,
 * H x d unnormalized output] for finalize_parts. `next`: the part this thread takes next
 * (its row, part and part count; row -1: none), whose first K/V rows it requests. `hot`:
 * the K/V are known to be in cache (a prompt row's parts after the same prompt's previous
 * row, which read them): no prefetches. */
static int attend_seq_bf16(const job_t *j, int64_t s, int64_t part, int64_t num_parts,
                           scratch_t *scratch, float *partial, const int64_t next[3],
                           int hot) {
    const int64_t h_n = j->num_heads, d = j->head_dim, row_elems = j->num_kv_heads * d;
    int64_t lo, len;
    key_range(j, s, part, num_parts, &lo, &len);
    const int64_t n = len - lo;
    if (j->seq_lens[s] <= 0 || lo < 0 || 2 * h_n * d + h_n * n > scratch->buf_len) return 1;
    if (n == 0) { /* an empty part: weight 0 in finalize_parts */
        for (int64_t h = 0; h < h_n; h++) partial[h] = -FLT_MAX, partial[h_n + h] = 0.0f;
        memset(partial + 2 * h_n, 0, (size_t)(h_n * d) * sizeof(float));
        return 0;
    }
    row_offsets(j, table_of(j, s), lo, len, row_elems, scratch->offs);
    /* Cold unless the previous row on this thread started at the same key (the rows of a
     * prefill chunk; also a sequence sharing its first block, a cached prefix, with the
     * previous one: only a matter of speed). */
    const int64_t first_row = scratch->offs[0];
    const int cold = first_row != scratch->last_first_row && !hot;
    const int upfront = first_row != scratch->requested_first_row;
    scratch->last_first_row = first_row;
    int64_t next_n = 0;
    if (cold && next[0] >= 0 && j->seq_lens[next[0]] > 0) {
        int64_t next_lo, next_len;
        key_range(j, next[0], next[1], next[2], &next_lo, &next_len);
        row_offsets(j, table_of(j, next[0]), next_lo, next_len, row_elems,
                    scratch->next_offs);
        if (scratch->next_offs[0] != first_row) /* else hot */
            next_n = upfront_rows(next_len - next_lo, row_elems);
    }
    scratch->requested_first_row = next_n > 0 ? scratch->next_offs[0] : -1;
    if (cold) attend_rows_cold(j, s, n, num_parts, scratch, partial, upfront, next_n);
    else attend_rows_hot(j, s, n, num_parts, scratch, partial, 0, 0);
    return 0;
}

/* Sequence s's output from its parts' softmax states (flash-decoding's merge): with M the
 * largest part max, out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p. */
static void finalize_parts(const job_t *j, int64_t s, int64_t num_parts, const float *first) {
    const int64_t h_n = j->num_heads, d = j->head_dim, stride = 2 * h_n + h_n * d;
    uint16_t *out = (uint16_t *)j->out + s * h_n * d;
    for (int64_t h = 0; h < h_n; h++) {
        float mx = -FLT_MAX, total = 0.0f;
        for (int64_t p = 0; p < num_parts; p++)
            mx = first[p * stride + h] > mx ? first[p * stride + h] : mx;
        __m512 o[16]; /* d <= 256 (use_bf16_kernel) */
        for (int64_t c = 0; c < d / 16; c++) o[c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < num_parts; p++) {
            const float *part = first + p * stride;
            if (part[h_n + h] == 0.0f) continue; /* empty part */
            const float w = expf(part[h] - mx);
            total += w * part[h_n + h];
            const __m512 wv = _mm512_set1_ps(w);
            for (int64_t c = 0; c < d / 16; c++)
                o[c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(part + 2 * h_n + h * d + 16 * c), o[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / total);
        for (int64_t c = 0; c < d / 16; c++)
            _mm256_storeu_si256((__m256i *)(out + h * d + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[c], inv)));
    }
}
#endif

static int use_bf16_kernel(const job_t *j) {
#ifdef HAVE_BF16_KERNEL
    return j->is_bf16 && j->head_dim % 32 == 0 && j->head_dim <= 256;
#else
    (void)j;
    return 0;
#endif
}

/* A row's keys are split into parts of at least PART_KEYS keys by their number alone, never
 * by the batch, the thread count or the chunk the row came in: its output is then the same,
 * bit for bit, in any batch, on any number of threads, and whether its prompt was computed in
 * one chunk, in several, or its last token alone (batch invariance; a merge of parts sums in
 * another order than one pass). A decode row's parts run in parallel: a lone long sequence
 * uses every thread (flash-decoding), and long contexts balance better over the threads at
 * any batch size (bench_cpu_attention.py --against: 1,024-4,096 keys 0.70-0.92x the time of
 * splitting only when rows < threads). A prompt's rows (several rows of one sequence in the
 * call) compute their parts one after another on one thread (attend_seq_in_parts): spread
 * over threads, parts would start at different keys row by row and lose the K/V the previous
 * row left in cache (a 2,048-row prompt took 2.2x as long). */
#define PART_KEYS 128
#define MAX_PARTS 32

static int64_t parts_of(const job_t *j, int64_t s) {
    if (!use_bf16_kernel(j)) return 1; /* the portable loop does not split */
    const int64_t seq_len = j->seq_lens[s];
    const int64_t first = (j->window > 0 && seq_len > j->window) ? seq_len - j->window : 0;
    const int64_t parts = (seq_len - first) / PART_KEYS;
    return parts < 1 ? 1 : (parts > MAX_PARTS ? MAX_PARTS : parts);
}

/* One of a prompt's rows: its neighbour in the call is a row of the same sequence. */
static int is_prompt_row(const job_t *j, int64_t s, int64_t num_rows) {
    const int32_t *rs = j->row_seqs;
    return rs != NULL
           && ((s > 0 && rs[s - 1] == rs[s]) || (s + 1 < num_rows && rs[s + 1] == rs[s]));
}

/* Work items of row s: its parts (a decode row), or 1 (a prompt row: parts in sequence). */
static int64_t items_of(const job_t *j, int64_t s, int64_t num_rows) {
    return is_prompt_row(j, s, num_rows) ? 1 : parts_of(j, s);
}

static int attend_seq(const job_t *j, int64_t s, int64_t part, int64_t num_parts,
                      scratch_t *scratch, float *partial, const int64_t next[3]) {
#ifdef HAVE_BF16_KERNEL
    if (use_bf16_kernel(j))
        return attend_seq_bf16(j, s, part, num_parts, scratch, partial, next, 0);
#else
    (void)part, (void)partial, (void)next;
#endif
    if (num_parts != 1) return 3; /* the portable loop does not split */
    float *buf = scratch->buf;
    const int64_t buf_len = scratch->buf_len;
    switch (j->head_dim) {
    case 64: return attend_seq_d(j, s, buf, buf_len, 64);
    case 128: return attend_seq_d(j, s, buf, buf_len, 128);
    default: return attend_seq_d(j, s, buf, buf_len, j->head_dim);
    }
}

/* All `num_parts` parts of prompt row s on this thread, then their merge: the same
 * arithmetic as a decode row's parts run in parallel (see parts_of). */
static int attend_seq_in_parts(const job_t *j, int64_t s, int64_t num_parts, scratch_t *scratch,
                               const int64_t next[3]) {
#ifdef HAVE_BF16_KERNEL
    const int64_t stride = 2 * j->num_heads + j->num_heads * j->head_dim;
    if (scratch->parts == NULL) {
        scratch->parts = malloc((size_t)(MAX_PARTS * stride) * sizeof(float));
        if (scratch->parts == NULL) return 2;
    }
    const int hot = table_of(j, s) == scratch->last_table;
    for (int64_t p = 0; p < num_parts; p++) {
        const int64_t following[3] = {s, p + 1, num_parts};
        const int st = attend_seq_bf16(j, s, p, num_parts, scratch, scratch->parts + p * stride,
                                       p + 1 < num_parts ? following : next, hot);
        if (st != 0) return st;
    }
    finalize_parts(j, s, num_parts, scratch->parts);
    return 0;
#else
    (void)j, (void)s, (void)num_parts, (void)scratch, (void)next;
    return 3; /* never called: without the bf16 path nothing has parts */
#endif
}

/* 1 when the AVX-512 BF16 path is built in: bf16 rows without it take the portable loop,
 * slower than torch's SDPA for prefill rows (the attention backend asks). */
int tf_paged_decode_fast_bf16(void) {
#ifdef HAVE_BF16_KERNEL
    return 1;
#else
    return 0;
#endif
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
                    int64_t window, float scale, int is_bf16, int num_threads,
                    const int32_t *row_seqs) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0)
        return 3;
    const job_t j = {q, k_cache, v_cache, out, block_tables, seq_lens, row_seqs, num_heads,
                     num_kv_heads, head_dim, block_size, max_blocks, q_row_stride, window, scale,
                     is_bf16};
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    const int64_t buf_len = 2 * num_heads * head_dim + num_heads + num_kv_heads * head_dim
                            + num_heads * max_len;
    if (num_threads < 1) num_threads = 1;
    /* Items: the parts of every row, row by row (item_start[s] is row s's first). */
    int64_t *item_start = malloc((size_t)(num_seqs + 1) * sizeof(int64_t));
    if (item_start == NULL) return 2;
    item_start[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++)
        item_start[s + 1] = item_start[s] + items_of(&j, s, num_seqs);
    const int64_t num_items = item_start[num_seqs];
    if (num_threads > num_items) num_threads = num_items > 0 ? (int)num_items : 1;
    const int64_t stride = 2 * num_heads + num_heads * head_dim;
    int64_t *item_seq = NULL;
    float *parts = NULL;
    if (num_items > num_seqs) {
        item_seq = malloc((size_t)num_items * sizeof(int64_t));
        parts = malloc((size_t)(num_items * stride) * sizeof(float));
        if (item_seq == NULL || parts == NULL) {
            free(item_start), free(item_seq), free(parts);
            return 2;
        }
        for (int64_t s = 0; s < num_seqs; s++)
            for (int64_t i = item_start[s]; i < item_start[s + 1]; i++) item_seq[i] = s;
    }
    int status = 0;
    int64_t next_item = 0; /* thread t starts with item t; then one at a time, as they finish */
#pragma omp parallel num_threads(num_threads)
    {
        scratch_t scratch = {malloc((size_t)buf_len * sizeof(float)), buf_len,
                             malloc((size_t)max_len * sizeof(int64_t)),
                             malloc((size_t)max_len * sizeof(int64_t)), -1, -1, NULL, NULL};
        int st = scratch.buf == NULL || scratch.offs == NULL || scratch.next_offs == NULL ? 2 : 0;
        /* Each thread claims its next item before it starts the current one, so that the
         * current one can request the next one's K/V (attend_rows_bf16). */
#pragma omp single
        next_item = omp_get_num_threads(); /* the team OpenMP gave, maybe < num_threads */
        int64_t item = omp_get_thread_num(); /* (after the barrier that ends `single`) */
        while (item < num_items) {
            const int64_t next = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED);
            const int64_t s = item_seq ? item_seq[item] : item;
            const int64_t num_parts = parts_of(&j, s);
            const int64_t row_items = item_start[s + 1] - item_start[s];
            int64_t after[3] = {-1, 0, 1};
            if (next < num_items) {
                after[0] = item_seq ? item_seq[next] : next;
                after[1] = next - item_start[after[0]];
                after[2] = parts_of(&j, after[0]);
            }
            if (st == 0 && row_items == 1 && num_parts > 1) /* a prompt row in parts */
                st = attend_seq_in_parts(&j, s, num_parts, &scratch, after);
            else if (st == 0)
                st = attend_seq(&j, s, item - item_start[s], row_items, &scratch,
                                row_items > 1 ? parts + item * stride : NULL, after);
            scratch.last_table = table_of(&j, s);
            item = next;
        }
#ifdef HAVE_BF16_KERNEL /* (without it nothing is split: parts is NULL) */
        if (parts != NULL) {
#pragma omp barrier
#pragma omp for
            for (int64_t s = 0; s < num_seqs; s++)
                if (item_start[s + 1] - item_start[s] > 1)
                    finalize_parts(&j, s, item_start[s + 1] - item_start[s],
                                   parts + item_start[s] * stride);
        }
#endif
        free(scratch.buf);
        free(scratch.offs);
        free(scratch.next_offs);
        free(scratch.parts);
#pragma omp critical
        if (st > status) status = st;
    }
    free(item_start);
    free(item_seq);
    free(parts);
    return status;
}

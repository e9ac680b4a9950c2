// The sampler's reductions over a [num_rows, num_cols] block of logits, in one C pass per row:
// the argmax (first index of the maximum, as torch.argmax) and log(sum(exp(x))) (logsumexp).
//
// Why: torch runs argmax and logsumexp as separate passes and logsumexp as several (max, sub,
// exp, sum, log, with temporaries): ~2-3 ms a decode step at 32 rows of a 49,152-token vocab
// on 2 cores, against ~0.3-0.5 ms here. Each row is reduced by one thread in a fixed order,
// so a row's result never depends on the other rows of the batch. No -ffast-math: -inf
// (banned or filtered tokens) and NaN must keep their IEEE meaning; the lane arrays below let
// the compiler vectorize without reassociating anything.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 64  // independent partial maxima/sums: four AVX-512 registers
#define CHUNK (16 * LANES)  // columns summed in float before the sums go to double

// exp(x) for x <= 0, to ~1 ulp (Taylor to r^7): 2^n * p(r) with r = x - n ln2, |r| <= ln2/2. Inputs below
// -87 are clamped there (exp(-87) ~ 1.6e-38): a -inf logit adds ~1e-38, far below rounding.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    float n = (x * 1.44269504f + shifter) - shifter;
    float r = x - n * 0.693145752f;  // ln2 split in two for accuracy
    r = r - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f
              + r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static void row_stats(const float *x, int64_t n, int64_t *argmax, float *lse) {
    float lane_max[LANES];
    int32_t lane_nan[LANES];
    for (int l = 0; l < LANES; l++) lane_max[l] = -INFINITY, lane_nan[l] = 0;
    int64_t body = n - n % LANES;
    for (int64_t i = 0; i < body; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float v = x[i + l];
            lane_max[l] = v > lane_max[l] ? v : lane_max[l];
            lane_nan[l] |= v != v;
        }
    float m = -INFINITY;
    int nan = 0;
    for (int l = 0; l < LANES; l++) m = lane_max[l] > m ? lane_max[l] : m, nan |= lane_nan[l];
    for (int64_t i = body; i < n; i++) m = x[i] > m ? x[i] : m, nan |= x[i] != x[i];
    if (nan) {  // as torch: NaN is the maximum, and the sum is NaN
        int64_t i = 0;
        while (x[i] == x[i]) i++;
        *argmax = i, *lse = NAN;
        return;
    }
    int64_t best = 0;
    while (best < n && x[best] != m) best++;
    *argmax = best < n ? best : 0;
    if (m == -INFINITY) {  // every entry -inf
        *lse = -INFINITY;
        return;
    }
    // Sums in float over CHUNK columns, then the chunks' partial sums in double: as
    // accurate as torch's logsumexp over a 49,152-token vocab (a float running sum per
    // lane over the whole row was 2-3x less).
    double lane_sum[LANES];
    for (int l = 0; l < LANES; l++) lane_sum[l] = 0.0;
    for (int64_t start = 0; start < body; start += CHUNK) {
        int64_t stop = start + CHUNK < body ? start + CHUNK : body;
        float part[LANES];
        for (int l = 0; l < LANES; l++) part[l] = 0.0f;
        for (int64_t i = start; i < stop; i += LANES)
            for (int l = 0; l < LANES; l++) part[l] += exp_nonpositive(x[i + l] - m);
        for (int l = 0; l < LANES; l++) lane_sum[l] += part[l];
    }
    double sum = 0.0;
    for (int l = 0; l < LANES; l++) sum += lane_sum[l];
    for (int64_t i = body; i < n; i++) sum += exp_nonpositive(x[i] - m);
    *lse = (float)((double)m + log(sum));
}

// x: [num_rows, num_cols] float32 (is_bf16 = 0) or bfloat16, rows `row_stride` elements apart.
// Writes argmax[num_rows] and lse[num_rows]. Returns 0, or 2 when out of memory.
int tf_row_stats(const void *x, int64_t num_rows, int64_t num_cols, int64_t row_stride,
                 int is_bf16, int64_t *argmax, float *lse, int num_threads) {
    int status = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        // bf16 rows are widened into a per-thread buffer and reduced by the same code, so
        // a bf16 row gives exactly what its float32 copy would.
        float *buf = is_bf16 ? malloc((size_t)num_cols * sizeof(float)) : NULL;
        if (is_bf16 && buf == NULL) {
            #pragma omp atomic write
            status = 2;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < num_rows; r++) {
            if (is_bf16) {
                if (buf == NULL) continue;
                const uint16_t *src = (const uint16_t *)x + r * row_stride;
                for (int64_t i = 0; i < num_cols; i++) {
                    uint32_t bits = (uint32_t)src[i] << 16;
                    memcpy(buf + i, &bits, sizeof(float));
                }
                row_stats(buf, num_cols, argmax + r, lse + r);
            } else {
                row_stats((const float *)x + r * row_stride, num_cols, argmax + r, lse + r);
            }
        }
        free(buf);
    }
    return status;
}

// All-reduce (sum) between the tensor-parallel ranks of one machine through shared memory.
//
// Why: gloo's all-reduce goes through TCP on localhost: 0.7-2 ms for a decode step's
// [1, 1024] hidden state on the 2-core development VM, and a split layer pays two of them. Here
// each rank copies its partial sum into its own slot of a shared mapping, publishes a sequence
// number, waits until every rank published the same number, and sums all slots in rank order
// (float accumulation): every rank computes bit-identical results, in microseconds.
//
// Layout of the mapping: one 64-byte line for the abort flag, one line per rank for its
// published sequence number, then two banks (by the sequence number's parity) of `size`
// slots of `slot_bytes` each. Two banks make one barrier per all-reduce enough: a rank writes
// bank (seq & 1) only after every rank published seq - 1, i.e. finished reading bank
// (seq - 2) & 1, the same bank, in its reduce of seq - 2.
//
// The wait is a spin (each rank owns a core while it runs a step) bounded by a timeout, so
// that the caller can check that its peers are still alive and call again.
#include <stdint.h>
#include <string.h>
#include <time.h>

#define LINE 64

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int64_t* flag_of(char* shm, int index) {  // index 0: abort; 1 + r: rank r
    return (int64_t*)(shm + (int64_t)index * LINE);
}

static inline char* slot_of(char* shm, int size, int64_t slot_bytes, int64_t seq, int rank) {
    int64_t bank = seq & 1;
    return shm + (int64_t)(size + 1) * LINE + (bank * size + rank) * slot_bytes;
}

// The mapping's size for `size` ranks with slots of `slot_bytes`.
int64_t tf_ar_bytes(int size, int64_t slot_bytes) {
    return (int64_t)(size + 1) * LINE + 2 * (int64_t)size * slot_bytes;
}

// Copy this rank's part (nbytes <= slot_bytes) into its slot and publish `seq`.
void tf_ar_publish(char* shm, int rank, int size, int64_t slot_bytes, int64_t seq,
                   const void* src, int64_t nbytes) {
    memcpy(slot_of(shm, size, slot_bytes, seq, rank), src, (size_t)nbytes);
    __atomic_store_n(flag_of(shm, 1 + rank), seq, __ATOMIC_RELEASE);
}

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

// Wait until every rank published `seq`: 0 done, 1 timed out (call again), 2 aborted.
int tf_ar_wait(char* shm, int size, int64_t seq, int64_t timeout_us) {
    int64_t start = now_us();
    for (uint64_t spin = 0;; spin++) {
        int done = 1;
        for (int r = 0; r < size && done; r++)
            done = __atomic_load_n(flag_of(shm, 1 + r), __ATOMIC_ACQUIRE) >= seq;
        if (done) return 0;
        if (__atomic_load_n(flag_of(shm, 0), __ATOMIC_ACQUIRE)) return 2;
        if ((spin & 1023) == 1023 && now_us() - start > timeout_us) return 1;
        cpu_relax();
    }
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// dst[i] = sum over ranks (in rank order) of slot[r][i]; dtype 0 float32, 1 bfloat16.
void tf_ar_reduce(char* shm, int size, int64_t slot_bytes, int64_t seq, void* dst,
                  int64_t n, int dtype) {
    if (dtype == 0) {
        float* out = (float*)dst;
        const float* first = (const float*)slot_of(shm, size, slot_bytes, seq, 0);
        for (int64_t i = 0; i < n; i++) out[i] = first[i];
        for (int r = 1; r < size; r++) {
            const float* part = (const float*)slot_of(shm, size, slot_bytes, seq, r);
            for (int64_t i = 0; i < n; i++) out[i] += part[i];
        }
        return;
    }
    uint16_t* out = (uint16_t*)dst;
    enum { BLOCK = 256 };
    float acc[BLOCK];
    for (int64_t base = 0; base < n; base += BLOCK) {
        int64_t m = n - base < BLOCK ? n - base : BLOCK;
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int r = 0; r < size; r++) {
            const uint16_t* part = (const uint16_t*)slot_of(shm, size, slot_bytes, seq, r) + base;
            for (int64_t i = 0; i < m; i++) acc[i] += bf16_to_float(part[i]);
        }
        for (int64_t i = 0; i < m; i++) out[base + i] = float_to_bf16(acc[i]);
    }
}

// Make every waiter (now and later) return 2: a rank died or the group is closing.
void tf_ar_abort(char* shm) {
    __atomic_store_n(flag_of(shm, 0), 1, __ATOMIC_RELEASE);
}

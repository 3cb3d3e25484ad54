/* ==== AVX2 fused mat-vec, for x86 CPUs without AVX-512 (Zen 2-4 as some VMs expose them, most
 * desktop Intel chips) ====
 * The generic kernels above decode a block to memory and then multiply; here 8 weights at a time go
 * from their bytes to a float register (zero-extend 8 bytes to dword lanes, mask/shift the field,
 * convert) and straight into the FMAs, with x in its natural order. The weights are the dequantizer's
 * values: sc * q - mn and D * q - 32 D are one rounding each, d * q is exact. Up to 4 rows of x per
 * pass (16 ymm registers: 4 FMA chains per row of x, so 8 accumulators, the weights and x). */
#if !defined(FAST) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FAST 1
enum { X_NAT, X_P32 = X_NAT, X_P16 = X_NAT };
#ifndef PF_AHEAD
#define PF_AHEAD 4096
#endif
#define PREFETCH(p, n) _Pragma("GCC unroll 4") for (int pf_ = 0; pf_ < (n); pf_ += 64) \
    _mm_prefetch((const char *)(p) + PF_AHEAD + pf_, _MM_HINT_T1)
#define KFN static inline __attribute__((always_inline)) void
#define ROW_ARGS const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                 const float *X, float *Y
#define FOR_T _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)
/* four FMA chains per row of x whatever T is: a row's sum is the same alone or in a batch */
#define ROW_BEGIN                                                                                \
    for (int64_t r = r0; r < r1; r++) {                                                          \
        const u8 *row = W + r * rb; __m256 acc[2][4];                                            \
        FOR_T for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_ps();
#define ROW_END                                                                                  \
        FOR_T { __m256 a = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])); \
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));       \
            s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s));       \
            Y[t * rows + r] = _mm_cvtss_f32(s); }                                                \
    }
/* The 8 weights w at column off of row r: mat-vec (T > 0 rows of x): acc chain c of every row of x +=
 * w * x[off .. off + 8); row decoding (the same kernels with T = 0 / -1, fdq_*): w stored to Y[r, off..]
 * as float32 / bfloat16. */
#define FMA8(w, off, c) do {                                                                     \
        if (T > 0) { FOR_T acc[t][c] = _mm256_fmadd_ps((w), _mm256_loadu_ps(X + t * cols + (off)), acc[t][c]); } \
        else store8(Y, r * cols + (off), (w), T < 0);                                           \
    } while (0)

static inline __m256i bytes8(const u8 *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256i sbytes8(const u8 *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256 flt(__m256i v) { return _mm256_cvtepi32_ps(v); }
static inline float half(const u8 *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }
/* 8 floats to out[o..] as float32, or as bfloat16 rounded to nearest even (as torch's .to(bfloat16)) */
static inline void store8(void *out, int64_t o, __m256 v, const int bf16) {
    if (!bf16) { _mm256_storeu_ps((float *)out + o, v); return; }
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)out + o), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

KFN q8_0_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 32; b++) {
        const u8 *blk = row + 34 * b; const __m256 d = _mm256_set1_ps(half(blk));
        PREFETCH(blk, 64);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            FMA8(_mm256_mul_ps(d, flt(sbytes8(blk + 2 + 8 * k))), 32 * b + 8 * k, k);
    }
    ROW_END
}

KFN f16_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 32; b++) {
        const u8 *blk = row + 64 * b;
        PREFETCH(blk, 64);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            FMA8(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * k))), 32 * b + 8 * k, k);
    }
    ROW_END
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1: the block's values as bytes (q4_block_bytes), widened 8 at a time from a
 * stack copy; w = d (q - 8 | 16), or d q + m */
KFN q4_rows(ROW_ARGS, const int T, const int bs, const int five, const int has_min) {
    u8 qb[32] __attribute__((aligned(32)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 32; b++) {
        const u8 *blk = row + bs * b, *qh = blk + (has_min ? 4 : 2);
        const __m256 d = _mm256_set1_ps(half(blk));
        /* has_min: w = d q + m; else w = d q - off d (off d exact: off is a power of two) */
        const __m256 m = _mm256_set1_ps(has_min ? half(blk + 2) : -(five ? 16.f : 8.f) * half(blk));
        PREFETCH(blk, 64);
        _mm256_store_si256((__m256i *)qb, q4_block_bytes(qh + (five ? 4 : 0), five ? qh : NULL));
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            FMA8(_mm256_fmadd_ps(d, flt(bytes8(qb + 8 * k)), m), 32 * b + 8 * k, k);
    }
    ROW_END
}

/* Q4_K / Q5_K: 32 bytes of qs per pair of sub-blocks (low nibbles: sub-block 2c, high: 2c + 1);
 * Q5_K's fifth bit of weight l of sub-block s is bit s of qh[l]. w = sc q - mn (k4_scales). */
KFN k4_rows(ROW_ARGS, const int T, const int five) {
    const __m256i low4 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1);
    float sm[16] __attribute__((aligned(32)));  /* d * scale (0-7), dmin * min (8-15), as k4_scales */
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + (five ? 176 : 144) * b, *qs = blk + (five ? 48 : 16);
        PREFETCH(blk, 192);
        const __m128i ints = k4_scales_mins(blk);
        _mm256_store_ps(sm, _mm256_mul_ps(_mm256_set1_ps(half(blk)), flt(_mm256_cvtepu8_epi32(ints))));
        _mm256_store_ps(sm + 8, _mm256_mul_ps(_mm256_set1_ps(half(blk + 2)), flt(_mm256_cvtepu8_epi32(_mm_srli_si128(ints, 8)))));
        __asm__ volatile("" ::: "memory");  /* broadcast the scales from memory, not by shuffles */
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
            const __m256 sl = _mm256_set1_ps(sm[2 * c]), ml = _mm256_set1_ps(sm[8 + 2 * c]);
            const __m256 sh = _mm256_set1_ps(sm[2 * c + 1]), mh = _mm256_set1_ps(sm[9 + 2 * c]);
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                __m256i v = bytes8(qs + 32 * c + 8 * k), lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi32(v, 4);
                if (five) {
                    __m256i h = bytes8(blk + 16 + 8 * k);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * c + 1), one), 4));
                }
                FMA8(_mm256_fmsub_ps(sl, flt(lo), ml), 256 * b + 64 * c + 8 * k, 2 * (k & 1));
                FMA8(_mm256_fmsub_ps(sh, flt(hi), mh), 256 * b + 64 * c + 32 + 8 * k, 2 * (k & 1) + 1);
            }
        }
    }
    ROW_END
}

/* Q6_K: the 6-bit values of 32 weights 128h + 32p + j (nibble p / 2 of ql[64h + 32(p % 2) + j], bits 2p
 * of qh[32h + j], as dq_q6_k) are put together as bytes, 32 at a time, then widened 8 at a time from a
 * stack copy; w = D q - 32 D with D = d * scale[g] per 16 (32 D exact: one rounding, as D (q - 32)). */
KFN q6_k_rows(ROW_ARGS, const int T) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), pair = _mm256_set1_epi8(0x30);
    u8 qb[32] __attribute__((aligned(32)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + 210 * b; const int8_t *scale = (const int8_t *)(blk + 192);
        const float d = half(blk + 208);
        PREFETCH(blk, 256);
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
                __m256i l = p & 1 ? l1 : l0;
                __m256i lo = p >> 1 ? _mm256_and_si256(_mm256_srli_epi16(l, 4), low4) : _mm256_and_si256(l, low4);
                __m256i hi = _mm256_and_si256(p < 2 ? _mm256_slli_epi16(qh, 4 - 2 * p) : _mm256_srli_epi16(qh, 2 * p - 4), pair);
                _mm256_store_si256((__m256i *)qb, _mm256_or_si256(lo, hi));
                _Pragma("GCC unroll 2") for (int k = 0; k < 2; k++) {
                    const float D = d * (float)scale[8 * h + 2 * p + k];
                    const __m256 vd = _mm256_set1_ps(D), v32 = _mm256_set1_ps(32.f * D);
                    _Pragma("GCC unroll 2") for (int i = 0; i < 16; i += 8)
                        FMA8(_mm256_fmsub_ps(vd, flt(bytes8(qb + 16 * k + i)), v32),
                             256 * b + 128 * h + 32 * p + 16 * k + i, 2 * k + (i >> 3));
                }
            }
        }
    }
    ROW_END
}

/* rows of x in pairs; with more than two, 16 rows of W at a time go through every pair while they
 * are in L2, so W is read from memory once */
#define FAST_MM(NAME, CALL)                                                                       \
static void fmm_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                       const float *X, int64_t T, float *Y) {                                      \
    if (T == 1) { CALL(W, rb, cols, rows, r0, r1, X, Y, 1); return; }                             \
    for (int64_t a = r0; a < r1; a += 16) {                                                      \
        int64_t z = a + 16 < r1 ? a + 16 : r1;                                                   \
        for (int64_t t0 = 0; t0 < T; t0 += 2) {                                                  \
            if (T - t0 == 1) CALL(W, rb, cols, rows, a, z, X + t0 * cols, Y + t0 * rows, 1);     \
            else CALL(W, rb, cols, rows, a, z, X + t0 * cols, Y + t0 * rows, 2);                 \
        }                                                                                        \
    }                                                                                            \
}
#define Q40(...) q4_rows(__VA_ARGS__, 18, 0, 0)
#define Q41(...) q4_rows(__VA_ARGS__, 20, 0, 1)
#define Q50(...) q4_rows(__VA_ARGS__, 22, 1, 0)
#define Q51(...) q4_rows(__VA_ARGS__, 24, 1, 1)
#define Q4K(...) k4_rows(__VA_ARGS__, 0)
#define Q5K(...) k4_rows(__VA_ARGS__, 1)
FAST_MM(q4_k, Q4K) FAST_MM(q5_k, Q5K) FAST_MM(q6_k, q6_k_rows) FAST_MM(q8_0, q8_0_rows)
FAST_MM(f16, f16_rows) FAST_MM(q4_0, Q40) FAST_MM(q4_1, Q41) FAST_MM(q5_0, Q50) FAST_MM(q5_1, Q51)

/* rows [r0, r1) of W decoded to out (the same decoders, T = 0 / -1: see FMA8); ~4x the generic ones */
#define FAST_DQ(NAME, CALL)                                                                       \
static void fdq_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t r0, int64_t r1, void *out, int bf16) { \
    if (bf16) CALL(W, rb, cols, 0, r0, r1, NULL, (float *)out, -1);                               \
    else CALL(W, rb, cols, 0, r0, r1, NULL, (float *)out, 0);                                     \
}
#define FAST_DEQUANT 1
FAST_DQ(q4_k, Q4K) FAST_DQ(q5_k, Q5K) FAST_DQ(q6_k, q6_k_rows) FAST_DQ(q8_0, q8_0_rows)
FAST_DQ(f16, f16_rows) FAST_DQ(q4_0, Q40) FAST_DQ(q4_1, Q41) FAST_DQ(q5_0, Q50) FAST_DQ(q5_1, Q51)
#endif /* AVX2 */

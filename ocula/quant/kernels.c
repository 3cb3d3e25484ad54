/* ocula's native matmul kernels: built by ocula/quant/kernels.py (native_lib) at first use. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXT 64
typedef uint8_t u8;
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

static inline u8x16 ld8(const u8 *p) { u8x16 v; memcpy(&v, p, 16); return v; }
/* per-byte v >> s through 16-bit lanes (x86 has no byte shifts; GCC's emulation is slow) */
static inline u8x16 shr(u8x16 v, int s) { return (u8x16)((u16x8)v >> s) & (u8)(0xFF >> s); }
static inline f32x16 ldf(const float *p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline void stf(float *p, f32x16 v) { memcpy(p, &v, 64); }
/* byte vectors -> float (unsigned; signed bytes are flipped to unsigned and shifted back, exact) */
#ifdef __AVX2__
#include <immintrin.h>
/* GCC lowers 16-lane conversions to scalar code without AVX-512: two 8-lane halves by hand */
static inline f32x16 join8(__m256 lo, __m256 hi) { f32x16 r; memcpy(&r, &lo, 32); memcpy((char *)&r + 32, &hi, 32); return r; }
static inline f32x16 fu(u8x16 v) {
    __m128i b; memcpy(&b, &v, 16);
    return join8(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
}
/* Q4_0 / Q4_1 / Q5_0 / Q5_1: a block's 32 unsigned values as bytes: weight j is the low nibble of
 * qs[j], weight 16 + j the high one; with qh (Q5), bit j of it is bit 4 of weight j */
static inline __m256i q4_block_bytes(const u8 *qs, const u8 *qh) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_and_si256(_mm256_setr_m128i(q, _mm_srli_epi16(q, 4)), _mm256_set1_epi8(0x0F));
    if (!qh) return v;
    /* byte j takes qh's byte j / 8 and tests its bit j % 8 */
    uint32_t h; memcpy(&h, qh, 4);
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)h), pick), bit), bit);
    return _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}
/* Q4_K / Q5_K: the 8 6-bit sub-block scales (bytes 0-7) and mins (8-15) of a block's 12 scale bytes:
 * j < 4: scale s[j] & 63, min s[j + 4] & 63; j >= 4: scale s[j + 4] & 15 | (s[j - 4] >> 6) << 4,
 * min s[j + 4] >> 4 | (s[j] >> 6) << 4, worked 4 bytes at a time in 32-bit words */
static inline __m128i k4_scales_mins(const u8 *b) {
    uint32_t w[3], out[4];
    memcpy(w, b + 4, 12);
    const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, top2 = 0x03030303u;
    out[0] = w[0] & low6;
    out[1] = (w[2] & low4) | ((w[0] >> 6) & top2) << 4;
    out[2] = w[1] & low6;
    out[3] = ((w[2] >> 4) & low4) | ((w[1] >> 6) & top2) << 4;
    return _mm_loadu_si128((const __m128i *)out);
}
#else
static inline f32x16 fu(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
#endif
static inline f32x16 fi(u8x16 v) { return fu(v ^ 0x80) - 128; }
static inline f32x16 bc(float s) { return (f32x16){0} + s; }

/* IEEE half -> float, exact (the FP16 library's method, as in ggml), scalar and 16-wide. */
static inline float f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float norm = f32_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denorm = f32_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_bits(sign | (two_w < (1u << 27) ? bits_f32(denorm) : bits_f32(norm)));
}
#endif
#if defined(__AVX2__) && defined(__F16C__)
static inline f32x16 h2f16(u16x16 h) {
    __m128i a, b; memcpy(&a, &h, 16); memcpy(&b, (char *)&h + 16, 16);
    return join8(_mm256_cvtph_ps(a), _mm256_cvtph_ps(b));
}
static inline f32x16 bf2f16(u16x16 h) {
    __m128i a, b; memcpy(&a, &h, 16); memcpy(&b, (char *)&h + 16, 16);
    return join8(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16)),
                 _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)));
}
#else
static inline f32x16 bf2f16(u16x16 h) { return (f32x16)(__builtin_convertvector(h, u32x16) << 16); }
static inline f32x16 h2f16(u16x16 h) {
    u32x16 w = __builtin_convertvector(h, u32x16) << 16, sign = w & 0x80000000u, two_w = w + w;
    f32x16 norm = (f32x16)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    f32x16 denorm = (f32x16)((two_w >> 17) | (126u << 23)) - 0.5f;
    u32x16 small = (u32x16)(two_w < (1u << 27));
    return (f32x16)(sign | (small & (u32x16)denorm) | (~small & (u32x16)norm));
}
#endif
static inline float rdh(const u8 *p) { uint16_t h; memcpy(&h, p, 2); return h2f(h); }

/* byte -> 8 bytes; byte i is 16 when bit i is set: the fifth bit of Q5_0 / Q5_1 values */
static uint64_t HI16[256];
static void init_tables(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t x = 0;
        for (int i = 0; i < 8; i++) if ((v >> i) & 1) x |= (uint64_t)16 << (8 * i);
        HI16[v] = x;
    }
}

/* ---- one block -> QK floats; same formulas and operation order as ocula.quant.dequant ---- */
static inline void dq_q4_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)); u8x16 q = ld8(b + 2);
    stf(y, d * (fu(q & 15) - 8)); stf(y + 16, d * (fu(shr(q, 4)) - 8));
}
static inline void dq_q4_1(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)), m = bc(rdh(b + 2)); u8x16 q = ld8(b + 4);
    stf(y, d * fu(q & 15) + m); stf(y + 16, d * fu(shr(q, 4)) + m);
}
static inline void five_bit(const u8 *qh, const u8 *qs, u8x16 *lo, u8x16 *hi) {
    uint64_t h[4]; for (int i = 0; i < 4; i++) h[i] = HI16[qh[i]];
    u8x16 h0, h1, q = ld8(qs); memcpy(&h0, h, 16); memcpy(&h1, h + 2, 16);
    *lo = (q & 15) | h0; *hi = shr(q, 4) | h1;
}
static inline void dq_q5_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)); u8x16 lo, hi; five_bit(b + 2, b + 6, &lo, &hi);
    stf(y, d * (fu(lo) - 16)); stf(y + 16, d * (fu(hi) - 16));
}
static inline void dq_q5_1(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)), m = bc(rdh(b + 2)); u8x16 lo, hi; five_bit(b + 4, b + 8, &lo, &hi);
    stf(y, d * fu(lo) + m); stf(y + 16, d * fu(hi) + m);
}
static inline void dq_q8_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b));
    stf(y, d * fi(ld8(b + 2))); stf(y + 16, d * fi(ld8(b + 18)));
}
static inline void dq_q2_k(const u8 *b, float *y) {
    const u8 *sc = b, *qs = b + 16; float d = rdh(b + 80), dmin = rdh(b + 82);
    for (int g = 0; g < 16; g++) {  /* group g: bits 2i of qs[32h + 16k + l], g = 8h + 2i + k */
        int h = g >> 3, i = (g >> 1) & 3, k = g & 1;
        u8x16 q = shr(ld8(qs + 32 * h + 16 * k), 2 * i) & 3;
        stf(y + 16 * g, bc(d * (float)(sc[g] & 15)) * fu(q) - bc(dmin * (float)(sc[g] >> 4)));
    }
}
static inline void dq_q3_k(const u8 *b, float *y) {
    const u8 *hm = b, *qs = b + 32, *sc = b + 96; float d = rdh(b + 108);
    for (int g = 0; g < 16; g++) {  /* like Q2_K; a clear bit (g >> 1) of hmask subtracts 4 */
        int h = g >> 3, i = (g >> 1) & 3, k = g & 1;
        int s = (g < 8 ? sc[g] & 15 : sc[g - 8] >> 4) | (((sc[8 + (g & 3)] >> (2 * (g >> 2))) & 3) << 4);
        u8x16 ql = shr(ld8(qs + 32 * h + 16 * k), 2 * i) & 3;
        u8x16 miss = ((shr(ld8(hm + 16 * k), g >> 1) & 1) ^ 1) << 2;
        stf(y + 16 * g, bc(d * (float)(s - 32)) * (fu(ql + 4 - miss) - 4));
    }
}
static inline void k4_scales(const u8 *b, float *sc, float *mn) {
    float d = rdh(b), dmin = rdh(b + 2); const u8 *s = b + 4;
    for (int j = 0; j < 4; j++) {
        sc[j] = d * (float)(s[j] & 63); mn[j] = dmin * (float)(s[j + 4] & 63);
        sc[j + 4] = d * (float)((s[j + 8] & 15) | ((s[j] >> 2) & 0x30));
        mn[j + 4] = dmin * (float)((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
    }
}
static inline void dq_q4_k(const u8 *b, float *y) {
    float sc[8], mn[8]; k4_scales(b, sc, mn);
    for (int c = 0; c < 4; c++) for (int k = 0; k < 2; k++) {
        u8x16 q = ld8(b + 16 + 32 * c + 16 * k);
        stf(y + 64 * c + 16 * k, bc(sc[2 * c]) * fu(q & 15) - bc(mn[2 * c]));
        stf(y + 64 * c + 32 + 16 * k, bc(sc[2 * c + 1]) * fu(shr(q, 4)) - bc(mn[2 * c + 1]));
    }
}
static inline void dq_q5_k(const u8 *b, float *y) {
    float sc[8], mn[8]; k4_scales(b, sc, mn);
    for (int c = 0; c < 4; c++) for (int k = 0; k < 2; k++) {
        u8x16 q = ld8(b + 48 + 32 * c + 16 * k), h = ld8(b + 16 + 16 * k);
        u8x16 lo = (q & 15) | ((shr(h, 2 * c) & 1) << 4), hi = shr(q, 4) | ((shr(h, 2 * c + 1) & 1) << 4);
        stf(y + 64 * c + 16 * k, bc(sc[2 * c]) * fu(lo) - bc(mn[2 * c]));
        stf(y + 64 * c + 32 + 16 * k, bc(sc[2 * c + 1]) * fu(hi) - bc(mn[2 * c + 1]));
    }
}
static inline void dq_q6_k(const u8 *b, float *y) {
    const int8_t *sc = (const int8_t *)(b + 192); float d = rdh(b + 208);
    for (int g = 0; g < 16; g++) {  /* 16 values of quarter p of half h: nibble p >> 1 of ql, bits 2p of qh */
        int h = g >> 3, p = (g >> 1) & 3, k = g & 1;
        u8x16 lo = shr(ld8(b + 64 * h + 32 * (p & 1) + 16 * k), 4 * (p >> 1)) & 15;
        u8x16 hi = shr(ld8(b + 128 + 32 * h + 16 * k), 2 * p) & 3;
        stf(y + 16 * g, bc(d * (float)sc[g]) * (fu(lo | (hi << 4)) - 32));
    }
}
static inline void dq_f32(const u8 *b, float *y) { memcpy(y, b, 32 * 4); }
static inline void dq_f16(const u8 *b, float *y) {
    u16x16 h0, h1; memcpy(&h0, b, 32); memcpy(&h1, b + 32, 32);
    stf(y, h2f16(h0)); stf(y + 16, h2f16(h1));
}
static inline void dq_bf16(const u8 *b, float *y) {
    u16x16 h0, h1; memcpy(&h0, b, 32); memcpy(&h1, b + 32, 32);
    stf(y, bf2f16(h0)); stf(y + 16, bf2f16(h1));
}

/* ---- rows [r0, r1) of Y[t, r] = sum_k X[t, k] W[r, k]; two 16-lane accumulators per t ---- */
#define KERNELS(NAME, QK, BS)                                                                      \
static inline __attribute__((always_inline)) void rows_##NAME(                                     \
        const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1,                \
        const float *X, int64_t T, float *Y) {                                                     \
    float buf[QK] __attribute__((aligned(64))); f32x16 acc[MAXT][2]; int64_t nb = cols / QK;       \
    for (int64_t r = r0; r < r1; r++) {                                                            \
        const u8 *row = W + r * rb;                                                                \
        for (int64_t t = 0; t < T; t++) acc[t][0] = acc[t][1] = (f32x16){0};                       \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            dq_##NAME(row + b * BS, buf);                                                          \
            for (int64_t t = 0; t < T; t++) {                                                      \
                const float *x = X + t * cols + b * QK;                                            \
                for (int c = 0; c < QK; c += 32) {                                                 \
                    acc[t][0] += ldf(buf + c) * ldf(x + c);                                        \
                    acc[t][1] += ldf(buf + c + 16) * ldf(x + c + 16);                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int64_t t = 0; t < T; t++) {                                                          \
            f32x16 a = acc[t][0] + acc[t][1]; float s = 0.f;                                       \
            for (int j = 0; j < 16; j++) s += a[j];                                                \
            Y[t * rows + r] = s;                                                                   \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
static void mm_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                      const float *X, int64_t T, float *Y) {                                       \
    if (T == 1) rows_##NAME(W, rb, cols, rows, r0, r1, X, 1, Y);                                   \
    else rows_##NAME(W, rb, cols, rows, r0, r1, X, T, Y);                                          \
}                                                                                                  \
static void dq_rows_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t r0, int64_t r1,         \
                           void *out, int bf16) {                                                  \
    float buf[QK] __attribute__((aligned(64))); int64_t nb = cols / QK;                            \
    for (int64_t r = r0; r < r1; r++) for (int64_t b = 0; b < nb; b++) {                          \
        int64_t o = r * cols + b * QK;                                                             \
        dq_##NAME(W + r * rb + b * BS, buf);                                                       \
        if (!bf16) { memcpy((float *)out + o, buf, sizeof buf); continue; }                        \
        uint16_t *d = (uint16_t *)out + o;  /* round to nearest even, as torch's .to(bfloat16) */  \
        for (int j = 0; j < QK; j++) { uint32_t u = bits_f32(buf[j]);                              \
            d[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16); }                            \
    }                                                                                              \
}

KERNELS(q4_0, 32, 18) KERNELS(q4_1, 32, 20) KERNELS(q5_0, 32, 22) KERNELS(q5_1, 32, 24)
KERNELS(q8_0, 32, 34) KERNELS(q2_k, 256, 84) KERNELS(q3_k, 256, 110) KERNELS(q4_k, 256, 144)
KERNELS(q5_k, 256, 176) KERNELS(q6_k, 256, 210) KERNELS(f32, 32, 128) KERNELS(f16, 32, 64)
KERNELS(bf16, 32, 64)

/* ==== AVX-512 fused mat-vec: blocks are unpacked in 32-bit lanes straight from the bytes ====
 * A vector takes its fields from the dword lanes of a broadcast block slice with per-lane shifts or
 * rotates, so it holds weights in an interleaved order (X_P32: lane m of a 32-group is weight
 * 4 (m % 8) + m / 8; X_P16: lane m of a 16-group is 4 (m % 4) + m / 4). x is copied into the same
 * order once per call and shared by every row. 4-/5-bit weights become floats through vpermps
 * tables of their exact values (d * (q - 8), sc * q - mn, ...: the dequantizer's formulas, built
 * per block or sub-block); 6-/8-bit and F16 weights through integer/half -> float conversion. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__) && defined(__F16C__)
#define FAST 1
enum { X_NAT, X_P32, X_P16 };
#define KFN static inline __attribute__((always_inline)) void
/* Prefetch into L2 the n bytes PF_AHEAD past p. The hardware prefetchers alone leave DRAM idle (they
 * stop at 4 KiB pages): ~15% on Q4_K on Zen 4; on an Intel Xeon (AMX), L2 (T1) streams 15-60% faster than
 * L1 (T0) or none. */
#ifndef PF_AHEAD
#define PF_AHEAD 4096
#endif
#define PREFETCH(p, n) _Pragma("GCC unroll 4") for (int pf_ = 0; pf_ < (n); pf_ += 64) \
    _mm_prefetch((const char *)(p) + PF_AHEAD + pf_, _MM_HINT_T1)
#define ROW_ARGS const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                 const float *X, float *Y
/* Two independent FMA chains per row of x, whatever the number of rows: a row's sums then come out
 * bit-identical alone or with others (a batch of sequences decodes as each would alone). Measured on
 * Zen 5: the same speed as 4 chains for 1-2 rows and 1 chain for 5-8. */
#define CH(T) 2
#define FOR_T _Pragma("GCC unroll 8") for (int t = 0; t < T; t++)
#define ACC(t, i) acc[t][(i) % CH(T)]
#define ROW_BEGIN                                                                                \
    for (int64_t r = r0; r < r1; r++) {                                                          \
        const u8 *row = W + r * rb; __m512 acc[8][2];                                            \
        FOR_T for (int i = 0; i < 2; i++) acc[t][i] = _mm512_setzero_ps();
#define ROW_END                                                                                  \
        FOR_T { __m512 a = acc[t][0];                                                            \
            for (int i = 1; i < CH(T); i++) a = _mm512_add_ps(a, acc[t][i]);                     \
            Y[t * rows + r] = _mm512_reduce_add_ps(a); }                                         \
    }
#define XT(off) _mm512_loadu_ps(X + t * cols + (off))
/* the 64 weights w0..w3 (16 each) times x[off .. off + 64) of every row of x */
#define FMA64(off)                                                                               \
    FOR_T {                                                                                      \
        ACC(t, 0) = _mm512_fmadd_ps(w0, XT(off), ACC(t, 0));                                     \
        ACC(t, 1) = _mm512_fmadd_ps(w1, XT((off) + 16), ACC(t, 1));                              \
        ACC(t, 2) = _mm512_fmadd_ps(w2, XT((off) + 32), ACC(t, 2));                              \
        ACC(t, 3) = _mm512_fmadd_ps(w3, XT((off) + 48), ACC(t, 3));                              \
    }

static inline __m512i bcast16(const u8 *p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p)); }
static inline __m512i bcast32(const u8 *p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p)); }
static inline float half(const u8 *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }
static inline __m512 iota(float base) {
    return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(base));
}
/* per-lane shift of the byte/nibble each lane of a vector takes from its dword */
#define P32_SHIFTS(a, b) _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
#define P16_SHIFTS(a, b, c, d) _mm512_setr_epi32(a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d)
#define SELECT(mask, a, b) _mm512_ternarylogic_epi32(mask, a, b, 0xCA)  /* mask ? a : b, bitwise */

static void permute_x(const float *x, float *xp, int64_t n, int layout) {
    const __m512i p16 = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i lo = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(2));
    for (int64_t i = 0; i < n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        if (layout == X_P32) {
            _mm512_storeu_ps(xp + i, _mm512_permutex2var_ps(a, lo, b));
            _mm512_storeu_ps(xp + i + 16, _mm512_permutex2var_ps(a, hi, b));
        } else {
            _mm512_storeu_ps(xp + i, _mm512_permutexvar_ps(p16, a));
            _mm512_storeu_ps(xp + i + 16, _mm512_permutexvar_ps(p16, b));
        }
    }
}

/* Q4_K/Q5_K: the 8 6-bit sub-block scales (lanes 0-7) and mins (lanes 8-15) */
static inline __m512i k4_scale_ints(const u8 *b) {
    const __m128i s = _mm_loadu_si128((const __m128i *)(b + 4));
    __m512i a = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
    __m512i h = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)));
    a = _mm512_and_si512(_mm512_srlv_epi32(a, P16_SHIFTS(0, 0, 0, 4)), P16_SHIFTS(63, 15, 63, 15));
    h = _mm512_and_si512(_mm512_srli_epi32(h, 2), _mm512_set1_epi32(0x30));
    return _mm512_or_si512(a, h);
}
/* ... times d (scales) and dmin (mins), as k4_scales computes them */
static inline __m512 k4_scale_vec(const u8 *b) {
    int32_t dd; memcpy(&dd, b, 4);
    __m512 dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dd)));
    dm = _mm512_permutexvar_ps(P32_SHIFTS(0, 1), dm);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(k4_scale_ints(b)), dm);
}

KFN q4_k_rows(ROW_ARGS, const int T) {
    const __m512i s0 = P32_SHIFTS(0, 8), s1 = P32_SHIFTS(16, 24), s2 = P32_SHIFTS(4, 12), s3 = P32_SHIFTS(20, 28);
    float sm[16] __attribute__((aligned(64)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + 144 * b;
        PREFETCH(blk, 192);
        _mm512_store_ps(sm, k4_scale_vec(blk));
        __asm__ volatile("" ::: "memory");  /* broadcast the scales from memory, not by shuffles */
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
            __m512 tlo = _mm512_fmsub_ps(_mm512_set1_ps(sm[2 * c]), iota(0), _mm512_set1_ps(sm[8 + 2 * c]));
            __m512 thi = _mm512_fmsub_ps(_mm512_set1_ps(sm[2 * c + 1]), iota(0), _mm512_set1_ps(sm[9 + 2 * c]));
            __m512i v = bcast32(blk + 16 + 32 * c);
            __m512 w0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, s0), tlo);
            __m512 w1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, s1), tlo);
            __m512 w2 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, s2), thi);
            __m512 w3 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, s3), thi);
            FMA64(256 * b + 64 * c)
        }
    }
    ROW_END
}

KFN q5_k_rows(ROW_ARGS, const int T) {
    const __m512i s0 = P32_SHIFTS(0, 8), s1 = P32_SHIFTS(16, 24), s2 = P32_SHIFTS(4, 12), s3 = P32_SHIFTS(20, 28);
    /* the fifth bit of weight l of sub-block s is bit s of qh[l]: rotate it to bit 4 of the lane */
    const __m512i ra = P32_SHIFTS(4, 28), rb_ = P32_SHIFTS(20, 12), low4 = _mm512_set1_epi32(15);
    float sm[16] __attribute__((aligned(64)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + 176 * b;
        PREFETCH(blk, 192);
        _mm512_store_ps(sm, k4_scale_vec(blk));
        __m512i hb = bcast32(blk + 16);
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
            __m512 sl = _mm512_set1_ps(sm[2 * c]), ml = _mm512_set1_ps(sm[8 + 2 * c]);
            __m512 sh = _mm512_set1_ps(sm[2 * c + 1]), mh = _mm512_set1_ps(sm[9 + 2 * c]);
            __m512 tl0 = _mm512_fmsub_ps(sl, iota(0), ml), tl1 = _mm512_fmsub_ps(sl, iota(16), ml);
            __m512 th0 = _mm512_fmsub_ps(sh, iota(0), mh), th1 = _mm512_fmsub_ps(sh, iota(16), mh);
            __m512i v = bcast32(blk + 48 + 32 * c), s = _mm512_set1_epi32(2 * c), s_1 = _mm512_set1_epi32(2 * c + 1);
            __m512i i0 = SELECT(low4, _mm512_srlv_epi32(v, s0), _mm512_rolv_epi32(hb, _mm512_sub_epi32(ra, s)));
            __m512i i1 = SELECT(low4, _mm512_srlv_epi32(v, s1), _mm512_rolv_epi32(hb, _mm512_sub_epi32(rb_, s)));
            __m512i i2 = SELECT(low4, _mm512_srlv_epi32(v, s2), _mm512_rolv_epi32(hb, _mm512_sub_epi32(ra, s_1)));
            __m512i i3 = SELECT(low4, _mm512_srlv_epi32(v, s3), _mm512_rolv_epi32(hb, _mm512_sub_epi32(rb_, s_1)));
            __m512 w0 = _mm512_permutex2var_ps(tl0, i0, tl1), w1 = _mm512_permutex2var_ps(tl0, i1, tl1);
            __m512 w2 = _mm512_permutex2var_ps(th0, i2, th1), w3 = _mm512_permutex2var_ps(th0, i3, th1);
            FMA64(256 * b + 64 * c)
        }
    }
    ROW_END
}

/* Q6_K (X_NAT): the 6-bit values are assembled as bytes, 128 at a time, then spread to dword lanes;
 * w = D q - 32 D in one FMA (exactly the dequantizer's D (q - 32): 32 D is exact, one rounding). */
KFN q6_k_rows(ROW_ARGS, const int T) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), pair = _mm512_set1_epi8(0x30);
    /* 16-bit lanes: the low 256 bits take pair 0 (2), the high 256 bits pair 1 (3) of each qh byte */
    const __m512i sh01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sh23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i spread = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float ds[32] __attribute__((aligned(64)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + 210 * b;
        PREFETCH(blk, 256);
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192))));
        __m512 d = _mm512_mul_ps(_mm512_set1_ps(half(blk + 208)), sc);
        _mm512_store_ps(ds, d); _mm512_store_ps(ds + 16, _mm512_mul_ps(d, _mm512_set1_ps(32.f)));
        __asm__ volatile("" ::: "memory");  /* broadcast the scales from memory, not by shuffles */
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
            __m512i l = _mm512_loadu_si512(blk + 64 * h), hb = bcast32(blk + 128 + 32 * h);
            __m512i q01 = SELECT(low4, l, _mm512_and_si512(_mm512_sllv_epi16(hb, sh01), pair));
            __m512i q23 = SELECT(low4, _mm512_srli_epi16(l, 4), _mm512_and_si512(_mm512_srlv_epi16(hb, sh23), pair));
            _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) {
                __m512i idx = _mm512_add_epi32(spread, _mm512_set1_epi32(16 * (g & 3)));
                __m512 q = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(0x1111111111111111ull, idx, g < 4 ? q01 : q23));
                __m512 w = _mm512_fmsub_ps(_mm512_set1_ps(ds[8 * h + g]), q, _mm512_set1_ps(ds[16 + 8 * h + g]));
                int64_t o = 256 * b + 128 * h + 16 * g;
                FOR_T ACC(t, g) = _mm512_fmadd_ps(w, XT(o), ACC(t, g));
            }
        }
    }
    ROW_END
}

/* Q8_0 (X_NAT): the weights d * q (exact in float32) once, then one FMA per row of x. */
KFN q8_0_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b2 = 0; b2 < cols / 32; b2 += 2) _Pragma("GCC unroll 2") for (int u = 0; u < 2; u++) {
        const int64_t b = b2 + u; if (b >= cols / 32) break;
        const u8 *blk = row + 34 * b; __m512 d = _mm512_set1_ps(half(blk));
        PREFETCH(blk, 64);
        __m512 w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))));
        __m512 w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))));
        FOR_T {
            ACC(t, 0) = _mm512_fmadd_ps(w0, XT(32 * b), ACC(t, 0));
            ACC(t, 1) = _mm512_fmadd_ps(w1, XT(32 * b + 16), ACC(t, 1));
        }
    }
    ROW_END
}

KFN f16_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 32; b++) {
        const u8 *blk = row + 64 * b;
        PREFETCH(blk, 64);
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
        FOR_T {
            ACC(t, 0) = _mm512_fmadd_ps(w0, XT(32 * b), ACC(t, 0));
            ACC(t, 1) = _mm512_fmadd_ps(w1, XT(32 * b + 16), ACC(t, 1));
        }
    }
    ROW_END
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 (X_P16): one 16- or 32-entry table per block */
KFN q4_rows(ROW_ARGS, const int T, const int bs, const int has_min) {
    const __m512i sl = P16_SHIFTS(0, 8, 16, 24), sh = P16_SHIFTS(4, 12, 20, 28);
    ROW_BEGIN
    for (int64_t b2 = 0; b2 < cols / 32; b2 += 2) _Pragma("GCC unroll 2") for (int u = 0; u < 2; u++) {
        const int64_t b = b2 + u; if (b >= cols / 32) break;
        const u8 *blk = row + bs * b; __m512 d = _mm512_set1_ps(half(blk)), tbl;
        PREFETCH(blk, 64);
        if (has_min) tbl = _mm512_fmadd_ps(d, iota(0), _mm512_set1_ps(half(blk + 2)));
        else tbl = _mm512_mul_ps(d, iota(-8));
        __m512i v = bcast16(blk + (has_min ? 4 : 2));
        __m512 w0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, sl), tbl);
        __m512 w1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, sh), tbl);
        FOR_T {
            ACC(t, 2 * u) = _mm512_fmadd_ps(w0, XT(32 * b), ACC(t, 2 * u));
            ACC(t, 2 * u + 1) = _mm512_fmadd_ps(w1, XT(32 * b + 16), ACC(t, 2 * u + 1));
        }
    }
    ROW_END
}
KFN q5_rows(ROW_ARGS, const int T, const int bs, const int has_min) {
    const __m512i sl = P16_SHIFTS(0, 8, 16, 24), sh = P16_SHIFTS(4, 12, 20, 28), low4 = _mm512_set1_epi32(15);
    /* bit 4j + k (low half) / 16 + 4j + k (high half) of qh, rotated to bit 4 of lane 4k + j */
    const __m512i rl = _mm512_setr_epi32(4, 0, 28, 24, 3, 31, 27, 23, 2, 30, 26, 22, 1, 29, 25, 21);
    const __m512i rh = _mm512_add_epi32(rl, _mm512_set1_epi32(16));
    ROW_BEGIN
    for (int64_t b2 = 0; b2 < cols / 32; b2 += 2) _Pragma("GCC unroll 2") for (int u = 0; u < 2; u++) {
        const int64_t b = b2 + u; if (b >= cols / 32) break;
        const u8 *blk = row + bs * b; __m512 d = _mm512_set1_ps(half(blk)), t0, t1;
        PREFETCH(blk, 64);
        if (has_min) {
            __m512 m = _mm512_set1_ps(half(blk + 2));
            t0 = _mm512_fmadd_ps(d, iota(0), m); t1 = _mm512_fmadd_ps(d, iota(16), m);
        } else {
            t0 = _mm512_mul_ps(d, iota(-16)); t1 = _mm512_mul_ps(d, iota(0));
        }
        int32_t qh; memcpy(&qh, blk + (has_min ? 4 : 2), 4);
        __m512i v = bcast16(blk + (has_min ? 8 : 6)), h = _mm512_set1_epi32(qh);
        __m512i i0 = SELECT(low4, _mm512_srlv_epi32(v, sl), _mm512_rolv_epi32(h, rl));
        __m512i i1 = SELECT(low4, _mm512_srlv_epi32(v, sh), _mm512_rolv_epi32(h, rh));
        __m512 w0 = _mm512_permutex2var_ps(t0, i0, t1), w1 = _mm512_permutex2var_ps(t0, i1, t1);
        FOR_T {
            ACC(t, 2 * u) = _mm512_fmadd_ps(w0, XT(32 * b), ACC(t, 2 * u));
            ACC(t, 2 * u + 1) = _mm512_fmadd_ps(w1, XT(32 * b + 16), ACC(t, 2 * u + 1));
        }
    }
    ROW_END
}

/* CALL(args..., T) for the T = n rows of x of a chunk (1..8), so each T is compiled separately */
#define WITH_T(n, CALL, ...)                                                                      \
    switch (n) {                                                                                  \
        case 1: CALL(__VA_ARGS__, 1); break;                                                      \
        case 2: CALL(__VA_ARGS__, 2); break;                                                      \
        case 3: CALL(__VA_ARGS__, 3); break;                                                      \
        case 4: CALL(__VA_ARGS__, 4); break;                                                      \
        case 5: CALL(__VA_ARGS__, 5); break;                                                      \
        case 6: CALL(__VA_ARGS__, 6); break;                                                      \
        case 7: CALL(__VA_ARGS__, 7); break;                                                      \
        default: CALL(__VA_ARGS__, 8); break;                                                     \
    }

/* one function per type: rows of x in chunks of up to 8, each chunk with T known at compile time */
#define FAST_MM(NAME, CALL)                                                                       \
static void fmm_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                       const float *X, int64_t T, float *Y) {                                      \
    for (int64_t t0 = 0; t0 < T; t0 += 8)                                                        \
        WITH_T(T - t0 < 8 ? T - t0 : 8, CALL, W, rb, cols, rows, r0, r1, X + t0 * cols, Y + t0 * rows) \
}
#define Q40(...) q4_rows(__VA_ARGS__, 18, 0)
#define Q41(...) q4_rows(__VA_ARGS__, 20, 1)
#define Q50(...) q5_rows(__VA_ARGS__, 22, 0)
#define Q51(...) q5_rows(__VA_ARGS__, 24, 1)
FAST_MM(q4_k, q4_k_rows) FAST_MM(q5_k, q5_k_rows) FAST_MM(q6_k, q6_k_rows) FAST_MM(q8_0, q8_0_rows)
FAST_MM(f16, f16_rows) FAST_MM(q4_0, Q40) FAST_MM(q4_1, Q41) FAST_MM(q5_0, Q50) FAST_MM(q5_1, Q51)

/* ==== int8-activation mat-vec (lossy, the llama.cpp approach) ====
 * Each row of x is quantized once per call to int8 with a float scale per block of x, then the
 * weight blocks are multiplied as integers (VNNI) and the block scales are applied in float.
 * K types: one scale per 256 values (so a super-block's integer sums accumulate before any float
 * work), int16 sums per 16 values for the min / offset terms; vpmaddubsw (unsigned weight x signed
 * x, at most 2 * 63 * 127 per pair: no saturation) then vpdpwssd with the sub-block scales.
 * 32-value block types: one scale per block, blocks taken in pairs per 512-bit vector; x is stored
 * as x + 128 (unsigned) and the weights signed (q - 8, q - 16, q), so vpdpbusd's sums carry
 * 128 * sum(w), a per-row term that is subtracted once for all rows of x. */
#ifdef __AVX512VNNI__
#define Q8 1
typedef struct {
    int64_t cols;
    int8_t *q;       /* row t at q + t * qstride; Q4_K: sub-blocks of each 256 stored 0,2,1,3,4,6,5,7;
                        32: x + 128 as unsigned bytes, rows padded to pairs of blocks */
    int64_t qstride, dstride;
    float *d;        /* scale per 256 (K) or per 32 values (32: a zero one pads odd block counts) */
    int16_t *bsum;   /* K: sums of 16 quantized values */
} xq8;

static inline float hmax_abs(__m512 a, __m512 b) {
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
}

static const int Q4K_SLOT[8] = {0, 2, 1, 3, 4, 6, 5, 7};
static void quant_k(const float *x, int64_t cols, int8_t *q, float *d, int16_t *bsum, int q4k) {
    for (int64_t b = 0; b < cols / 256; b++) {
        const float *xb = x + 256 * b;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)));
        float amax = _mm512_reduce_max_ps(m);
        __m512 id = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        d[b] = amax / 127.f;
        for (int i = 0; i < 16; i++) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * i), id));
            int slot = q4k ? Q4K_SLOT[i >> 1] : i >> 1;
            bsum[16 * b + i] = (int16_t)_mm512_reduce_add_epi32(v);
            _mm_storeu_si128((__m128i *)(q + 256 * b + 32 * slot + 16 * (i & 1)), _mm512_cvtepi32_epi8(v));
        }
    }
}

static void quant_32(const float *x, int64_t cols, int8_t *q, float *d) {
    int64_t nb = cols / 32;
    for (int64_t b = 0; b < nb; b++) {
        __m512 a0 = _mm512_loadu_ps(x + 32 * b), a1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = hmax_abs(a0, a1);
        __m512 id = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, id)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, id));
        const __m128i bias = _mm_set1_epi8((char)0x80);
        _mm_storeu_si128((__m128i *)(q + 32 * b), _mm_xor_si128(_mm512_cvtepi32_epi8(v0), bias));
        _mm_storeu_si128((__m128i *)(q + 32 * b + 16), _mm_xor_si128(_mm512_cvtepi32_epi8(v1), bias));
        d[b] = amax / 127.f;
    }
    if (nb & 1) { memset(q + 32 * nb, 0, 32); d[nb] = 0.f; }  /* a zero block completes the last pair */
}

#define Q8_ARGS const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1, const xq8 *X, int64_t t0, float *Y
#define XQ(t) (X->q + (t0 + (t)) * X->qstride)

/* Both K kernels take 4 vpdpbusd per 256 weights: dword lane j of each holds the sum of 4 products
 * (|sum| <= 4 * 63 * 127, so it fits in 16 bits), then two vectors of such sums are packed into the
 * word halves of one and multiplied by their scales in a single vpmaddwd / vpdpwssd. */
static inline __m512i pack_words(__m512i lo, __m512i hi) {
    return _mm512_mask_blend_epi16(0xAAAAAAAAu, lo, _mm512_slli_epi32(hi, 16));
}
/* word pairs (a, b) in dwords 0-7 and (c, d) in dwords 8-15: scale indices for pack_words(q_a|c, q_b|d) */
#define WORD_PAIRS(a, b, c, d) _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi32((a) | (b) << 16), _mm512_set1_epi32((c) | (d) << 16))

/* Q4_K/Q5_K: the 8 6-bit sub-block scales (words 0-7) and mins (8-15), as k4_scale_ints */
static inline __m256i k4_scale_words(const u8 *b) {
    const __m128i s = _mm_loadu_si128((const __m128i *)(b + 4));
    __m256i a = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
    __m256i h = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)));
    a = _mm256_and_si256(_mm256_srlv_epi16(a, _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4)),
                         _mm256_setr_epi16(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    h = _mm256_and_si256(_mm256_srli_epi16(h, 2), _mm256_set1_epi16(0x30));
    return _mm256_or_si256(a, h);
}

/* Q4_K / Q5_K: 64 bytes of nibbles = low nibbles of sub-blocks (2c, 2c + 2), high ones of (2c + 1, 2c + 3) */
KFN k4_q8_rows(Q8_ARGS, const int T, const int five) {
    const int64_t cols = X->cols, nb = cols / 256, bs = five ? 176 : 144;
    const __m512i low4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    /* w0 (sub-blocks 0, 2) with w1 (1, 3), w2 (4, 6) with w3 (5, 7) */
    const __m512i i01 = WORD_PAIRS(0, 1, 2, 3), i23 = WORD_PAIRS(4, 5, 6, 7);
    const __m256i imin = _mm256_setr_epi16(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    /* Q5_K: bit s of qh[l] is the fifth bit of weight l of sub-block s */
#define BIT_PAIR(a, b) _mm512_mask_blend_epi8(0xFFFFFFFF00000000ull, _mm512_set1_epi8(1 << (a)), _mm512_set1_epi8((char)(1 << (b))))
    const __m512i h0 = BIT_PAIR(0, 2), h1 = BIT_PAIR(1, 3), h2 = BIT_PAIR(4, 6), h3 = BIT_PAIR(5, 7);
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m512 acc[8]; __m256 accm[8];
        FOR_T { acc[t] = _mm512_setzero_ps(); accm[t] = _mm256_setzero_ps(); }
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + bs * b, *qs = blk + (five ? 48 : 16);
            PREFETCH(blk, 192);
            __m256i sm = k4_scale_words(blk);
            __m512i sm5 = _mm512_castsi256_si512(sm);
            __m512i s01 = _mm512_permutexvar_epi16(i01, sm5), s23 = _mm512_permutexvar_epi16(i23, sm5);
            __m256i mn = _mm256_permutexvar_epi16(imin, sm);
            __m512i v0 = _mm512_loadu_si512(qs), v1 = _mm512_loadu_si512(qs + 64);
            __m512i w0 = _mm512_and_si512(v0, low4), w1 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
            __m512i w2 = _mm512_and_si512(v1, low4), w3 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
            if (five) {
                __m512i qh = bcast32(blk + 16);
                w0 = _mm512_mask_add_epi8(w0, _mm512_test_epi8_mask(qh, h0), w0, sixteen);
                w1 = _mm512_mask_add_epi8(w1, _mm512_test_epi8_mask(qh, h1), w1, sixteen);
                w2 = _mm512_mask_add_epi8(w2, _mm512_test_epi8_mask(qh, h2), w2, sixteen);
                w3 = _mm512_mask_add_epi8(w3, _mm512_test_epi8_mask(qh, h3), w3, sixteen);
            }
            float d = half(blk), dmin = half(blk + 2);
            FOR_T {
                const int8_t *x = XQ(t) + 256 * b;
                __m512i q0 = _mm512_dpbusd_epi32(zero, w0, _mm512_loadu_si512(x));
                __m512i q1 = _mm512_dpbusd_epi32(zero, w1, _mm512_loadu_si512(x + 64));
                __m512i q2 = _mm512_dpbusd_epi32(zero, w2, _mm512_loadu_si512(x + 128));
                __m512i q3 = _mm512_dpbusd_epi32(zero, w3, _mm512_loadu_si512(x + 192));
                __m512i p = _mm512_madd_epi16(pack_words(q0, q1), s01);
                p = _mm512_dpwssd_epi32(p, pack_words(q2, q3), s23);
                __m256i m = _mm256_madd_epi16(mn, _mm256_loadu_si256((const __m256i *)(X->bsum + (t0 + t) * (cols / 16) + 16 * b)));
                float dx = X->d[(t0 + t) * X->dstride + b];
                acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(p), acc[t]);
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(m), accm[t]);
            }
        }
        FOR_T {
            __m256 m = accm[t]; __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4)); m4 = _mm_add_ss(m4, _mm_movehdup_ps(m4));
            Y[t * rows + r] = _mm512_reduce_add_ps(acc[t]) - _mm_cvtss_f32(m4);
        }
    }
}

/* Q6_K: q = 0..63 unsigned (the dequantizer's q - 32 with 32 * sum(x) subtracted per group of 16) */
KFN q6_k_q8_rows(Q8_ARGS, const int T) {
    const int64_t cols = X->cols, nb = cols / 256;
    const __m512i low4 = _mm512_set1_epi8(0x0F), pair = _mm512_set1_epi8(0x30), zero = _mm512_setzero_si512();
    const __m512i sh01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sh23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    /* dword j of the sums of 64 weights 64k.. belongs to group 4k + j / 4; w[0] pairs with w[1], w[2] with w[3] */
    const __m512i ramp = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                            15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
    const __m512i g01 = _mm512_add_epi16(ramp, _mm512_set1_epi32(0 | 4 << 16));
    const __m512i g23 = _mm512_add_epi16(ramp, _mm512_set1_epi32(8 | 12 << 16));
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m512 acc[8];
        FOR_T acc[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + 210 * b;
            PREFETCH(blk, 256);
            __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
            __m512i sc5 = _mm512_castsi256_si512(sc);
            __m256i sc32 = _mm256_slli_epi16(sc, 5);
            __m512i s01 = _mm512_permutexvar_epi16(g01, sc5), s23 = _mm512_permutexvar_epi16(g23, sc5);
            __m512i w[4];
            for (int h = 0; h < 2; h++) {  /* weights 128h.. (low nibbles) and 128h + 64.. (high) */
                __m512i l = _mm512_loadu_si512(blk + 64 * h), hb = bcast32(blk + 128 + 32 * h);
                w[2 * h] = SELECT(low4, l, _mm512_and_si512(_mm512_sllv_epi16(hb, sh01), pair));
                w[2 * h + 1] = SELECT(low4, _mm512_srli_epi16(l, 4), _mm512_and_si512(_mm512_srlv_epi16(hb, sh23), pair));
            }
            float d = half(blk + 208);
            FOR_T {
                const int8_t *x = XQ(t) + 256 * b;
                __m512i q0 = _mm512_dpbusd_epi32(zero, w[0], _mm512_loadu_si512(x));
                __m512i q1 = _mm512_dpbusd_epi32(zero, w[1], _mm512_loadu_si512(x + 64));
                __m512i q2 = _mm512_dpbusd_epi32(zero, w[2], _mm512_loadu_si512(x + 128));
                __m512i q3 = _mm512_dpbusd_epi32(zero, w[3], _mm512_loadu_si512(x + 192));
                __m512i p = _mm512_madd_epi16(pack_words(q0, q1), s01);
                p = _mm512_dpwssd_epi32(p, pack_words(q2, q3), s23);
                __m256i o = _mm256_madd_epi16(sc32, _mm256_loadu_si256((const __m256i *)(X->bsum + (t0 + t) * (cols / 16) + 16 * b)));
                p = _mm512_sub_epi32(p, _mm512_zextsi256_si512(o));
                acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * X->d[(t0 + t) * X->dstride + b]), _mm512_cvtepi32_ps(p), acc[t]);
            }
        }
        FOR_T Y[t * rows + r] = _mm512_reduce_add_ps(acc[t]);
    }
}

/* Q4_0 / Q5_0 / Q8_0 (bs 18 / 22 / 34): the signed weights of blocks b0 (low 256 bits) and b0 + bs */
static inline __m512i w32_pair(const u8 *b0, const int bs, const int two) {
    const u8 *b1 = b0 + bs;
    if (bs == 34) {
        __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2)));
        return two ? _mm512_inserti64x4(v, _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1) : v;
    }
    const int o = bs == 22 ? 6 : 2;
    __m128i q0 = _mm_loadu_si128((const __m128i *)(b0 + o));
    __m512i v = two ? _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(q0), 0xFF00, _mm_loadu_si128((const __m128i *)(b1 + o)))
                    : _mm512_broadcast_i32x4(q0);
    v = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4), _mm512_set1_epi8(0x0F));
    if (bs == 22) {
        uint32_t h0, h1 = 0; memcpy(&h0, b0 + 2, 4); if (two) memcpy(&h1, b1 + 2, 4);
        v = _mm512_mask_add_epi8(v, _cvtu64_mask64(h0 | (uint64_t)h1 << 32), v, _mm512_set1_epi8(16));
    }
    return _mm512_sub_epi8(v, _mm512_set1_epi8(bs == 22 ? 16 : 8));
}

/* blocks 2p, 2p + 1 of a row (the second only when two: odd block counts end with a half pair) */
KFN q32_pair(const u8 *row, int64_t p, const xq8 *X, int64_t t0, __m512 *acc, const int T, const int bs, const int two) {
    const __m512i lo8 = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(0), _mm512_set1_epi32(1));
    const u8 *b0 = row + 2 * p * bs;
    __m512i w = w32_pair(b0, bs, two);
    if (!two) w = _mm512_maskz_mov_epi8(0xFFFFFFFFull, w);
    /* x is stored + 128: each lane's sum gets 128 * (its 4 weights' sum) back off */
    __m512i neg = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), w));
    uint16_t h0, h1 = 0; memcpy(&h0, b0, 2); if (two) memcpy(&h1, b0 + bs, 2);
    __m128 dw = _mm_cvtph_ps(_mm_cvtsi32_si128(h0 | (int)h1 << 16));
    FOR_T {
        __m128 dd = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd((const double *)(X->d + (t0 + t) * X->dstride + 2 * p))));
        __m512i s = _mm512_dpbusd_epi32(neg, _mm512_loadu_si512(XQ(t) + 64 * p), w);
        acc[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo8, _mm512_castps128_ps512(dd)), _mm512_cvtepi32_ps(s), acc[t]);
    }
}

KFN q32_q8_rows(Q8_ARGS, const int T, const int bs) {
    const int64_t nb = X->cols / 32;
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m512 acc[2][8];
        FOR_T acc[0][t] = acc[1][t] = _mm512_setzero_ps();
        int64_t p = 0;
        for (; p + 1 < nb / 2; p += 2) {
            PREFETCH(row + 2 * p * bs, 4 * bs);
            q32_pair(row, p, X, t0, acc[0], T, bs, 1);
            q32_pair(row, p + 1, X, t0, acc[1], T, bs, 1);
        }
        if (p < nb / 2) q32_pair(row, p++, X, t0, acc[0], T, bs, 1);
        if (nb & 1) q32_pair(row, p, X, t0, acc[1], T, bs, 0);
        FOR_T Y[t * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]));
    }
}

/* rows of x in chunks of up to 8, each chunk with T known at compile time */
#define Q8_MM(NAME, CALL)                                                                          \
static void q8mm_##NAME(const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1,            \
                        const xq8 *X, int64_t T, float *Y) {                                       \
    for (int64_t t0 = 0; t0 < T; t0 += 8)                                                        \
        WITH_T(T - t0 < 8 ? T - t0 : 8, CALL, W, rb, rows, r0, r1, X, t0, Y + t0 * rows)          \
}
#define Q4K8(...) k4_q8_rows(__VA_ARGS__, 0)
#define Q5K8(...) k4_q8_rows(__VA_ARGS__, 1)
#define Q408(...) q32_q8_rows(__VA_ARGS__, 18)
#define Q508(...) q32_q8_rows(__VA_ARGS__, 22)
#define Q808(...) q32_q8_rows(__VA_ARGS__, 34)
Q8_MM(q4_k, Q4K8) Q8_MM(q5_k, Q5K8) Q8_MM(q6_k, q6_k_q8_rows) Q8_MM(q4_0, Q408) Q8_MM(q5_0, Q508)
Q8_MM(q8_0, Q808)

typedef void (*q8_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, const xq8 *, int64_t, float *);
/* xfmt: 0 = per 32, 1 = per 256, 2 = per 256 in Q4_K order */
static const struct { int type; q8_fn mm; int xfmt; } Q8_TABLE[] = {
    {2, q8mm_q4_0, 0}, {6, q8mm_q5_0, 0}, {8, q8mm_q8_0, 0}, {12, q8mm_q4_k, 2}, {13, q8mm_q5_k, 2}, {14, q8mm_q6_k, 1},
};
static int q8_find(int type) {
    for (unsigned i = 0; i < sizeof Q8_TABLE / sizeof Q8_TABLE[0]; i++) if (Q8_TABLE[i].type == type) return (int)i;
    return -1;
}
/* the quantized x in a per-thread buffer that only grows */
static __thread void *qbuf; static __thread size_t qcap;
static int quantize_x(const float *X, int64_t T, int64_t cols, int xfmt, xq8 *x) {
    int64_t np = (cols / 32 + 1) / 2;  /* 32: pairs of blocks, 64 values each */
    x->cols = cols;
    x->qstride = xfmt ? cols : 64 * np;
    x->dstride = xfmt ? cols / 256 : 2 * np;
    size_t nq = (size_t)(T * x->qstride + 63) & ~(size_t)63;
    size_t nd = (size_t)(T * x->dstride * 4 + 63) & ~(size_t)63;
    size_t need = nq + nd + (size_t)T * (cols / 16) * 2;
    if (need > qcap) {
        free(qbuf); qcap = 0;
        if (!(qbuf = aligned_alloc(64, (need + 63) & ~(size_t)63))) return -1;
        qcap = need;
    }
    x->q = qbuf; x->d = (float *)((char *)qbuf + nq);
    x->bsum = (int16_t *)((char *)qbuf + nq + nd);
    for (int64_t t = 0; t < T; t++) {
        int8_t *q = x->q + t * x->qstride; float *d = x->d + t * x->dstride;
        if (xfmt) quant_k(X + t * cols, cols, q, d, x->bsum + t * (cols / 16), xfmt == 2);
        else quant_32(X + t * cols, cols, q, d);
    }
    return 0;
}
#endif /* __AVX512VNNI__ */
#define PERMUTED_X 1
#endif /* AVX-512 */

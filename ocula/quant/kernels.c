/* ocula's native matmul kernels, the generic part (every CPU): block decoders, the mat-vec and row
 * decoding built on them. kernels.py appends the ISA-specific mat-vecs, the dispatch (dispatch.c) and the
 * rest of the library to this file and compiles it once at first use (native_lib). */
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
#ifdef __AVX2__
#include <immintrin.h>
/* without AVX-512 GCC lowers 16-lane conversions to scalar code: fu and h2f16 go by 8-lane halves */
static inline f32x16 join8(__m256 lo, __m256 hi) { f32x16 r; memcpy(&r, &lo, 32); memcpy((char *)&r + 32, &hi, 32); return r; }
/* Q4_0 / Q4_1 / Q5_0 / Q5_1: a block's 32 unsigned values as bytes: weight j is the low nibble of
 * qs[j], weight 16 + j the high one; with qh (Q5), bit j of it is bit 4 of weight j */
static inline __m256i nibble_bytes(const u8 *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_setr_m128i(q, _mm_srli_epi16(q, 4)), _mm256_set1_epi8(0x0F));
}
/* the 32 bits of qh as bytes: 0xFF where bit j is set (byte j takes qh's byte j / 8, tests bit j % 8) */
static inline __m256i bit_bytes(const u8 *qh) {
    uint32_t h; memcpy(&h, qh, 4);
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
    return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)h), pick), bit), bit);
}
static inline __m256i q4_block_bytes(const u8 *qs, const u8 *qh) {
    __m256i v = nibble_bytes(qs);
    return qh ? _mm256_or_si256(v, _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10))) : v;
}
/* Q4_K / Q5_K: the 8 6-bit sub-block scales (bytes 0-7) and mins (8-15) of a block's 12 scale bytes s:
 * j < 4: scale s[j] & 63, min s[j + 4] & 63; j >= 4: scale s[j + 4] & 15 | (s[j - 4] >> 6) << 4,
 * min s[j + 4] >> 4 | (s[j] >> 6) << 4. In one register (assembling it from scalar words stalls the
 * load that reads them back). */
static inline __m128i k4_scales_mins(const u8 *b) {
    const __m128i s = _mm_loadu_si128((const __m128i *)(b + 4));  /* 12 scale bytes + 4 of qs */
    const __m128i low = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i top = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i lo_mask = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0);
    const __m128i hi_mask = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15);
    const __m128i v = _mm_or_si128(_mm_and_si128(low, lo_mask), _mm_and_si128(_mm_srli_epi16(low, 4), hi_mask));
    return _mm_or_si128(v, _mm_and_si128(_mm_srli_epi16(top, 2), _mm_set1_epi8(0x30)));
}
#endif
/* byte vectors -> float (unsigned; signed bytes are flipped to unsigned and shifted back, exact) */
#if defined(__AVX2__) && !defined(__AVX512F__)
static inline f32x16 fu(u8x16 v) {
    __m128i b; memcpy(&b, &v, 16);
    return join8(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
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
#if defined(__AVX2__) && defined(__F16C__) && !defined(__AVX512F__)
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

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
static inline f32x16 fu(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
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
static inline f32x16 h2f16(u16x16 h) {
    u32x16 w = __builtin_convertvector(h, u32x16) << 16, sign = w & 0x80000000u, two_w = w + w;
    f32x16 norm = (f32x16)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    f32x16 denorm = (f32x16)((two_w >> 17) | (126u << 23)) - 0.5f;
    u32x16 small = (u32x16)(two_w < (1u << 27));
    return (f32x16)(sign | (small & (u32x16)denorm) | (~small & (u32x16)norm));
}
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
    stf(y, (f32x16)(__builtin_convertvector(h0, u32x16) << 16));
    stf(y + 16, (f32x16)(__builtin_convertvector(h1, u32x16) << 16));
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
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define FAST 1
enum { X_NAT, X_P32, X_P16 };
#define KFN static inline __attribute__((always_inline)) void
#define ROW_ARGS const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                 const float *X, float *Y
#define CH(T) ((T) <= 2 ? 4 : (T) <= 4 ? 2 : 1)  /* independent FMA chains per row of x */
#define FOR_T _Pragma("GCC unroll 8") for (int t = 0; t < T; t++)
#define ACC(t, i) acc[t][(i) % CH(T)]
#define ROW_BEGIN                                                                                \
    for (int64_t r = r0; r < r1; r++) {                                                          \
        const u8 *row = W + r * rb; __m512 acc[8][4];                                            \
        FOR_T for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
#define ROW_END                                                                                  \
        FOR_T { __m512 a = acc[t][0];                                                            \
            for (int i = 1; i < CH(T); i++) a = _mm512_add_ps(a, acc[t][i]);                     \
            Y[t * rows + r] = _mm512_reduce_add_ps(a); }                                         \
    }
#define XT(off) _mm512_loadu_ps(X + t * cols + (off))

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

/* Q4_K/Q5_K: the 8 sub-block scales (lanes 0-7) and mins (lanes 8-15) as k4_scales computes them */
static inline __m512 k4_scale_vec(const u8 *b) {
    const __m128i s = _mm_loadu_si128((const __m128i *)(b + 4));
    __m512i a = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
    __m512i h = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)));
    a = _mm512_and_si512(_mm512_srlv_epi32(a, P16_SHIFTS(0, 0, 0, 4)), P16_SHIFTS(63, 15, 63, 15));
    h = _mm512_and_si512(_mm512_srli_epi32(h, 2), _mm512_set1_epi32(0x30));
    int32_t dd; memcpy(&dd, b, 4);
    __m512 dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dd)));
    dm = _mm512_permutexvar_ps(P32_SHIFTS(0, 1), dm);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_or_si512(a, h)), dm);
}

KFN q4_k_rows(ROW_ARGS, const int T) {
    const __m512i s0 = P32_SHIFTS(0, 8), s1 = P32_SHIFTS(16, 24), s2 = P32_SHIFTS(4, 12), s3 = P32_SHIFTS(20, 28);
    float sm[16] __attribute__((aligned(64)));
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 256; b++) {
        const u8 *blk = row + 144 * b;
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
            int64_t o = 256 * b + 64 * c;
            FOR_T {
                ACC(t, 0) = _mm512_fmadd_ps(w0, XT(o), ACC(t, 0));
                ACC(t, 1) = _mm512_fmadd_ps(w1, XT(o + 16), ACC(t, 1));
                ACC(t, 2) = _mm512_fmadd_ps(w2, XT(o + 32), ACC(t, 2));
                ACC(t, 3) = _mm512_fmadd_ps(w3, XT(o + 48), ACC(t, 3));
            }
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
            int64_t o = 256 * b + 64 * c;
            FOR_T {
                ACC(t, 0) = _mm512_fmadd_ps(w0, XT(o), ACC(t, 0));
                ACC(t, 1) = _mm512_fmadd_ps(w1, XT(o + 16), ACC(t, 1));
                ACC(t, 2) = _mm512_fmadd_ps(w2, XT(o + 32), ACC(t, 2));
                ACC(t, 3) = _mm512_fmadd_ps(w3, XT(o + 48), ACC(t, 3));
            }
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

/* Q8_0 (X_NAT): one row of x: d * sum(q x) per block (d * q is exact, only the order changes);
 * several: the weights d * q once, then one FMA per row of x. */
KFN q8_0_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b2 = 0; b2 < cols / 32; b2 += 2) _Pragma("GCC unroll 2") for (int u = 0; u < 2; u++) {
        const int64_t b = b2 + u; if (b >= cols / 32) break;
        const u8 *blk = row + 34 * b; __m512 d = _mm512_set1_ps(half(blk));
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        if (T == 1) {
            const int t = 0;
            __m512 s = _mm512_fmadd_ps(q1, XT(32 * b + 16), _mm512_mul_ps(q0, XT(32 * b)));
            acc[0][u] = _mm512_fmadd_ps(d, s, acc[0][u]);
        } else {
            __m512 w0 = _mm512_mul_ps(d, q0), w1 = _mm512_mul_ps(d, q1);
            FOR_T {
                ACC(t, 0) = _mm512_fmadd_ps(w0, XT(32 * b), ACC(t, 0));
                ACC(t, 1) = _mm512_fmadd_ps(w1, XT(32 * b + 16), ACC(t, 1));
            }
        }
    }
    ROW_END
}

KFN f16_rows(ROW_ARGS, const int T) {
    ROW_BEGIN
    for (int64_t b = 0; b < cols / 32; b++) {
        const u8 *blk = row + 64 * b;
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

/* one function per type: rows of x in chunks of up to 8, each chunk with T known at compile time */
#define FAST_MM(NAME, CALL)                                                                       \
static void fmm_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                       const float *X, int64_t T, float *Y) {                                      \
    for (int64_t t0 = 0; t0 < T; t0 += 8) {                                                      \
        const float *Xc = X + t0 * cols; float *Yc = Y + t0 * rows;                              \
        switch (T - t0 < 8 ? T - t0 : 8) {                                                       \
            case 1: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 1); break;                           \
            case 2: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 2); break;                           \
            case 3: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 3); break;                           \
            case 4: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 4); break;                           \
            case 5: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 5); break;                           \
            case 6: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 6); break;                           \
            case 7: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 7); break;                           \
            default: CALL(W, rb, cols, rows, r0, r1, Xc, Yc, 8); break;                          \
        }                                                                                         \
    }                                                                                             \
}
#define Q40(...) q4_rows(__VA_ARGS__, 18, 0)
#define Q41(...) q4_rows(__VA_ARGS__, 20, 1)
#define Q50(...) q5_rows(__VA_ARGS__, 22, 0)
#define Q51(...) q5_rows(__VA_ARGS__, 24, 1)
FAST_MM(q4_k, q4_k_rows) FAST_MM(q5_k, q5_k_rows) FAST_MM(q6_k, q6_k_rows) FAST_MM(q8_0, q8_0_rows)
FAST_MM(f16, f16_rows) FAST_MM(q4_0, Q40) FAST_MM(q4_1, Q41) FAST_MM(q5_0, Q50) FAST_MM(q5_1, Q51)
#define FASTFN(NAME, LAYOUT) , fmm_##NAME, LAYOUT
#else
#define FASTFN(NAME, LAYOUT) , 0, 0
#endif

typedef void (*mm_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *);
typedef void (*dq_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, void *, int);
#define NOFAST , 0, 0
static const struct { int type; mm_fn mm; dq_fn dq; mm_fn fast; int layout; } TABLE[] = {  /* GGML type ids */
    {0, mm_f32, dq_rows_f32 NOFAST}, {1, mm_f16, dq_rows_f16 FASTFN(f16, X_NAT)},
    {2, mm_q4_0, dq_rows_q4_0 FASTFN(q4_0, X_P16)}, {3, mm_q4_1, dq_rows_q4_1 FASTFN(q4_1, X_P16)},
    {6, mm_q5_0, dq_rows_q5_0 FASTFN(q5_0, X_P16)}, {7, mm_q5_1, dq_rows_q5_1 FASTFN(q5_1, X_P16)},
    {8, mm_q8_0, dq_rows_q8_0 FASTFN(q8_0, X_NAT)}, {10, mm_q2_k, dq_rows_q2_k NOFAST},
    {11, mm_q3_k, dq_rows_q3_k NOFAST}, {12, mm_q4_k, dq_rows_q4_k FASTFN(q4_k, X_P32)},
    {13, mm_q5_k, dq_rows_q5_k FASTFN(q5_k, X_P32)}, {14, mm_q6_k, dq_rows_q6_k FASTFN(q6_k, X_NAT)},
    {30, mm_bf16, dq_rows_bf16 NOFAST},
};
static int find(int type) {
    for (unsigned i = 0; i < sizeof TABLE / sizeof TABLE[0]; i++) if (TABLE[i].type == type) return (int)i;
    return -1;
}
#ifdef FAST
/* x in a kernel's lane order, in a per-thread buffer that only grows */
static __thread float *xbuf; static __thread int64_t xcap;
static const float *x_in_layout(const float *X, int64_t n, int layout) {
    if (layout == X_NAT) return X;
    if (n > xcap) {
        free(xbuf); xcap = 0;
        if (!(xbuf = aligned_alloc(64, (size_t)(n + 15) / 16 * 64))) return NULL;
        xcap = n;
    }
    permute_x(X, xbuf, n, layout);
    return xbuf;
}
#endif
int ocula_init(void) { init_tables(); return MAXT; }
int ocula_supports(int type) { return find(type) >= 0; }

/* Y[T, rows] = X[T, cols] @ W^T, W = `rows` rows of `rb` bytes of GGUF blocks; T <= MAXT. */
int ocula_matmul(int type, const u8 *W, int64_t rows, int64_t cols, int64_t rb,
                 const float *X, int64_t T, float *Y, int nthreads) {
    int i = find(type);
    if (i < 0 || T < 1 || T > MAXT) return -1;
    mm_fn mm = TABLE[i].mm;
#ifdef FAST
    const float *Xl = TABLE[i].fast ? x_in_layout(X, T * cols, TABLE[i].layout) : NULL;
    if (Xl) { mm = TABLE[i].fast; X = Xl; }
#endif
#ifdef _OPENMP
    if (nthreads > 1) {  /* ~8 chunks of rows per thread, taken in turn: a thread slowed down by
                            another process on its core gets fewer; multiples of 16 rows of Y */
        int64_t chunk = ((rows + 8 * nthreads - 1) / (8 * nthreads) + 15) & ~(int64_t)15;
        #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int64_t a = 0; a < rows; a += chunk)
            mm(W, rb, cols, rows, a, a + chunk < rows ? a + chunk : rows, X, T, Y);
        return 0;
    }
#endif
    mm(W, rb, cols, rows, 0, rows, X, T, Y);
    return 0;
}

/* out[r - r0, :] = rows [r0, r1) of W dequantized to float32 (bf16 = 0) or bfloat16 (bf16 = 1). */
int ocula_dequant(int type, const u8 *W, int64_t r0, int64_t r1, int64_t cols, int64_t rb,
                  void *out, int bf16, int nthreads) {
    int i = find(type);
    if (i < 0) return -1;
    dq_fn dq = TABLE[i].dq; const u8 *base = W + r0 * rb; int64_t rows = r1 - r0;
#ifdef _OPENMP
    if (nthreads > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            int64_t n = omp_get_num_threads(), k = omp_get_thread_num(), step = (rows + n - 1) / n;
            int64_t a = k * step, z = a + step < rows ? a + step : rows;
            if (a < z) dq(base, rb, cols, a, z, out, bf16);
        }
        return 0;
    }
#endif
    dq(base, rb, cols, 0, rows, out, bf16);
    return 0;
}

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
#define PERMUTED_X 1  /* x goes to the kernels in their lane order (dispatch.c: x_in_layout) */
#endif /* AVX-512 */

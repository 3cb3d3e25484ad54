/* ==== AVX2 int8-activation mat-vec (lossy), for x86 CPUs without AVX-512 VNNI ====
 * The same contract as the VNNI kernels: each row of x is quantized alone to int8 (scale amax / 127
 * per 256 values for K types, per 32 for Q4_0 / Q5_0 / Q8_0, round half to even), products and their
 * sums are exact integers, and only the block scales are applied in float. Integer products by
 * vpmaddubsw (unsigned x signed bytes, pairs summed to int16) and vpmaddwd (int16 pairs times int16
 * scales, or ones, to int32):
 * K types: weights unsigned (Q4_K 0..15, Q6_K 0..63: |pair| <= 2 * 63 * 127 fits in int16), x signed;
 *          the mins (Q4_K) and Q6_K's - 32 come off through the sums of x per 16 values.
 * 32-value blocks: weights signed (q - 8, q - 16, q); vpmaddubsw takes |w| and x with w's sign
 *          (x is never -128, so the sign flip cannot overflow). */
#if !defined(Q8) && defined(FAST) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define Q8 1
typedef struct {
    int64_t cols;
    int8_t *q;       /* row t at q + t * qstride, in x's order */
    int64_t qstride, dstride;
    float *d;        /* scale per 256 (K) or per 32 values */
    int16_t *bsum;   /* K: sums of 16 quantized values */
} xq8;

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
static inline float hsum_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hsum_max(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* n (a multiple of 32) values of x -> int8 with one scale per `group` values; bsum: sums per 16 */
static void quant_x(const float *x, int64_t n, int group, int8_t *q, float *d, int16_t *bsum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < n; g += group) {
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < group; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + g + i)));
        const float amax = hsum_max(m);
        const __m256 id = _mm256_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        d[g / group] = amax / 127.f;
        for (int i = 0; i < group; i += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g + i + 8 * k), id));
            if (bsum) {
                bsum[(g + i) / 16] = (int16_t)hsum_i32(_mm256_add_epi32(v[0], v[1]));
                bsum[(g + i) / 16 + 1] = (int16_t)hsum_i32(_mm256_add_epi32(v[2], v[3]));
            }
            /* packs work per 128-bit lane: the dwords come out in order 0 4 1 5 2 6 3 7 */
            __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256((__m256i *)(q + g + i), _mm256_permutevar8x32_epi32(b, order));
        }
    }
}

#define Q8_ARGS const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1, const xq8 *X, int64_t t0, float *Y
#define XQ(t) (X->q + (t0 + (t)) * X->qstride)
#define XD(t, b) (X->d[(t0 + (t)) * X->dstride + (b)])
#define XB(t, b) ((const __m256i *)(X->bsum + (t0 + (t)) * (X->cols / 16) + 16 * (b)))
#define FOR_T4 _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
static inline __m256i ld32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* Q6_K's 16 int8 scales as words: scales 8h .. 8h + 7 in both 128-bit lanes of out[h] */
static inline void q6_scale_words(const int8_t *sc, __m256i out[2]) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
    out[0] = _mm256_permute2x128_si256(w, w, 0x00);
    out[1] = _mm256_permute2x128_si256(w, w, 0x11);
}
/* from q6_scale_words' out[h]: words 0-7 = scale 8h + 2p, 8-15 = scale 8h + 2p + 1 (p constant) */
static inline __m256i q6_scale_pair(__m256i s, const int p) {
    return _mm256_shuffle_epi8(s, _mm256_setr_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * (2 * p))),
                                                    _mm_set1_epi16((short)(0x0100 + 0x0202 * (2 * p + 1)))));
}

/* Q4_K / Q5_K: weights 64c .. 64c + 63 of a block as bytes, sub-block 2c in *lo and 2c + 1 in *hi, from
 * the block's qs and (Q5_K) its 32 fifth-bit bytes qh: bit s of qh[l] is bit 4 of weight l of sub-block s */
static inline __attribute__((always_inline)) void k4_bytes(const u8 *qs, __m256i qh, const int c, const int five,
                                                            __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10), v = ld32(qs + 32 * c);
    *lo = _mm256_and_si256(v, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if (five) {
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c), 4), bit4));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c + 1), 4), bit4));
    }
}
/* Q6_K: q (0..63) of weights 128h + 32p .. + 31 as bytes: nibble p / 2 of l0 (p even) or l1 (p odd), the
 * two bits 2p of qh (l0, l1, qh: the half h's ql + 64h, ql + 64h + 32, qh + 32h) */
static inline __attribute__((always_inline)) __m256i q6_bytes(__m256i l0, __m256i l1, __m256i qh, const int p) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), l = p & 1 ? l1 : l0;
    const __m256i lo = p >> 1 ? _mm256_and_si256(_mm256_srli_epi16(l, 4), low4) : _mm256_and_si256(l, low4);
    return _mm256_or_si256(lo, _mm256_and_si256(p < 2 ? _mm256_slli_epi16(qh, 4 - 2 * p) : _mm256_srli_epi16(qh, 2 * p - 4),
                                                _mm256_set1_epi8(0x30)));
}

/* Q4_K / Q5_K: 32 bytes of qs per pair of sub-blocks: low nibbles sub-block 2c, high 2c + 1 */
KFN k4_q8_rows(Q8_ARGS, const int T, const int five) {
    const int64_t nb = X->cols / 256, bs = five ? 176 : 144;
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m256 acc[4], accm[4];
        FOR_T4 acc[t] = accm[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + bs * b, *qs = blk + (five ? 48 : 16);
            PREFETCH(blk, 192);
            const __m128i sm = k4_scales_mins(blk);
            /* int16 sub-block scales in both 128-bit lanes; mins doubled per 16 values of x */
            const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            const __m256i mn = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            const __m256i qh = five ? ld32(blk + 16) : _mm256_setzero_si256();
            __m256i isum[4];
            FOR_T4 isum[t] = _mm256_setzero_si256();
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
                __m256i lo, hi;
                k4_bytes(qs, qh, c, five, &lo, &hi);
                /* every word = scale 2c (2c + 1): its two bytes picked from both lanes' copy */
                const __m256i sl = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c))));
                const __m256i sh = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + 1))));
                FOR_T4 {
                    const int8_t *x = XQ(t) + 256 * b + 64 * c;
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ld32(x)), sl);
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ld32(x + 32)), sh));
                    isum[t] = _mm256_add_epi32(isum[t], p);
                }
            }
            const float d = half(blk), dmin = half(blk + 2);
            FOR_T4 {
                const float dx = XD(t, b);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_madd_epi16(mn, _mm256_loadu_si256(XB(t, b)))), accm[t]);
            }
        }
        FOR_T4 Y[t * rows + r] = hsum_f32(acc[t]) - hsum_f32(accm[t]);
    }
}

/* Q6_K: 32 weights 128h + 32p + j: nibble p / 2 of ql[64h + 32(p % 2) + j], bits 2p of qh[32h + j];
 * groups of 16 (scale index 8h + 2p + j / 16); q 0..63 unsigned, the - 32 through the sums of x */
KFN q6_k_q8_rows(Q8_ARGS, const int T) {
    const int64_t nb = X->cols / 256;
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m256 acc[4];
        FOR_T4 acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + 210 * b; const int8_t *sc = (const int8_t *)(blk + 192);
            PREFETCH(blk, 256);
            const __m256i sc32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)), 5);
            __m256i scw[2];
            q6_scale_words(sc, scw);
            __m256i isum[4];
            FOR_T4 isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(sc32, _mm256_loadu_si256(XB(t, b))));
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                const __m256i l0 = ld32(blk + 64 * h), l1 = ld32(blk + 64 * h + 32), qh = ld32(blk + 128 + 32 * h);
                _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
                    const __m256i q = q6_bytes(l0, l1, qh, p);
                    const __m256i s = q6_scale_pair(scw[h], p);
                    FOR_T4 isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(q, ld32(XQ(t) + 256 * b + 128 * h + 32 * p)), s));
                }
            }
            const float d = half(blk + 208);
            FOR_T4 acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * XD(t, b)), _mm256_cvtepi32_ps(isum[t]), acc[t]);
        }
        FOR_T4 Y[t * rows + r] = hsum_f32(acc[t]);
    }
}

/* Q4_0 / Q5_0 / Q8_0 (bs 18 / 22 / 34): the 32 signed weights of a block */
static inline __m256i w32(const u8 *blk, const int bs) {
    if (bs == 34) return ld32(blk + 2);
    if (bs == 18) return _mm256_sub_epi8(nibble_bytes(blk + 2), _mm256_set1_epi8(8));
    /* Q5_0: q - 16 is the nibble with the fifth bit clear, the nibble - 16 (its bits | 0xF0) without */
    return _mm256_or_si256(nibble_bytes(blk + 6), _mm256_andnot_si256(bit_bytes(blk + 2), _mm256_set1_epi8((char)0xF0)));
}

KFN q32_q8_rows(Q8_ARGS, const int T, const int bs) {
    const int64_t nb = X->cols / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m256 acc[4];
        FOR_T4 acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + bs * b;
            PREFETCH(blk, 64);
            const __m256i w = w32(blk, bs), aw = _mm256_sign_epi8(w, w);
            const float d = half(blk);
            FOR_T4 {
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(ld32(XQ(t) + 32 * b), w)), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * XD(t, b)), _mm256_cvtepi32_ps(p), acc[t]);
            }
        }
        FOR_T4 Y[t * rows + r] = hsum_f32(acc[t]);
    }
}

/* FN(W, rb, rows, r0, r1, X, T, Y) over rows of x in chunks of up to 4, CALL taking T as a constant; with
 * more, 16 rows of W at a time go through every chunk while they are in L2. XT: the quantized x's type
 * (xq8 here, xq16 in matvec_q16_avx2.c). */
#define XQ_MM(FN, XT, CALL)                                                                        \
static void FN(const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1,                     \
               const XT *X, int64_t T, float *Y) {                                                 \
    for (int64_t a = r0; a < r1; a += 16) {                                                      \
        int64_t z = a + 16 < r1 ? a + 16 : r1;                                                   \
        for (int64_t t0 = 0; t0 < T; t0 += 4) switch (T - t0 < 4 ? T - t0 : 4) {                 \
            case 1: CALL(W, rb, rows, a, z, X, t0, Y + t0 * rows, 1); break;                     \
            case 2: CALL(W, rb, rows, a, z, X, t0, Y + t0 * rows, 2); break;                     \
            case 3: CALL(W, rb, rows, a, z, X, t0, Y + t0 * rows, 3); break;                     \
            default: CALL(W, rb, rows, a, z, X, t0, Y + t0 * rows, 4); break;                    \
        }                                                                                        \
    }                                                                                            \
}
#define Q8_MM(NAME, CALL) XQ_MM(q8mm_##NAME, xq8, CALL)
#define Q4K_XFMT 1  /* quantize_x's format for Q4_K / Q5_K rows (dispatch.c: Q8_TABLE) */
static __thread void *qbuf; static __thread size_t qcap;
static int quantize_x(const float *X, int64_t T, int64_t cols, int xfmt, xq8 *x) {
    x->cols = cols; x->qstride = cols; x->dstride = cols / (xfmt ? 256 : 32);
    size_t nq = (size_t)(T * cols + 63) & ~(size_t)63, nd = (size_t)(T * x->dstride * 4 + 63) & ~(size_t)63;
    size_t need = nq + nd + (size_t)T * (cols / 16) * 2;
    if (need > qcap) {
        free(qbuf); qcap = 0;
        if (!(qbuf = aligned_alloc(64, (need + 63) & ~(size_t)63))) return -1;
        qcap = need;
    }
    x->q = qbuf; x->d = (float *)((char *)qbuf + nq); x->bsum = (int16_t *)((char *)qbuf + nq + nd);
    for (int64_t t = 0; t < T; t++)
        quant_x(X + t * cols, cols, xfmt ? 256 : 32, x->q + t * cols, x->d + t * x->dstride,
                xfmt ? x->bsum + t * (cols / 16) : NULL);
    return 0;
}
#endif /* AVX2 int8 */

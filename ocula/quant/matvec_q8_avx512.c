/* ==== AVX-512 VNNI int8-activation mat-vec (lossy, the llama.cpp approach) ====
 * Each row of x is quantized once per call to int8 with a float scale per block of x, then the
 * weight blocks are multiplied as integers (VNNI) and the block scales are applied in float.
 * K types: one scale per 256 values (so a super-block's integer sums accumulate before any float
 * work), int16 sums per 16 values for the min / offset terms; vpmaddubsw (unsigned weight x signed
 * x, at most 2 * 63 * 127 per pair: no saturation) then vpdpwssd with the sub-block scales.
 * 32-value block types: one scale per block, blocks taken in pairs per 512-bit vector; x is stored
 * as x + 128 (unsigned) and the weights signed (q - 8, q - 16, q), so vpdpbusd's sums carry
 * 128 * sum(w), a per-row term that is subtracted once for all rows of x. */
#if defined(PERMUTED_X) && defined(__AVX512VNNI__)  /* with matvec_avx512.c's helpers */
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
#define Q4K_XFMT 2  /* quantize_x's format for Q4_K / Q5_K rows (dispatch.c: Q8_TABLE) */
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
#endif /* AVX-512 VNNI */

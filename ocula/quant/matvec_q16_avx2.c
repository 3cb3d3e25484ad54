/* ==== AVX2 int16-activation mat-vec, for the layers whose activations int8 rounds too coarsely ====
 * Each row of x is quantized alone to int16, one scale per 256 values (amax / 16383, round half to
 * even): the rounding error is amax / 32766 per value, about what rounding x to bfloat16 costs, and
 * 129x less than int8's. The weights are widened to int16 and vpmaddwd multiplies them by x; all
 * integer sums are exact:
 * Q4_K / Q5_K: a sub-block's 32 products (<= 31 * 16383 each) summed in int32, then scaled in float.
 * Q6_K: q - 32 times its sub-block scale first (|(q - 32) * scale| <= 4096 fits a word); a lane sums
 *       32 products per 256 values, at most 32 * 4096 * 16383 < 2^31, then d and x's scale in float.
 * The exact AVX2 kernels convert every weight to float; this takes about a third fewer instructions
 * per weight (benchmarks/kernels.py --kernel exact,q16). x is stored per 32 values in the order the
 * byte -> word unpacks leave the weights in: 0-7, 16-23, 8-15, 24-31. */
#if defined(Q8) && !defined(PERMUTED_X)
#define Q16 1
#define Q16_MAX 16383
typedef struct {
    int64_t cols;
    int16_t *q;      /* row t at q + t * cols, in the unpack order */
    float *d;        /* scale per 256 values (the last group may be shorter) */
    int32_t *sum32;  /* sums of 32 quantized values (the Q4_K / Q5_K mins) */
} xq16;

/* a row of n values (a multiple of 32): groups of 256, the last one shorter when 256 does not divide n */
static void quant_x16(const float *x, int64_t n, int16_t *q, float *d, int32_t *sum32) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t g = 0; g < n; g += 256) {
        const int64_t len = n - g < 256 ? n - g : 256;
        __m256 m = _mm256_setzero_ps();
        for (int64_t i = 0; i < len; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + g + i)));
        const float amax = hsum_max(m);
        const __m256 id = _mm256_set1_ps(amax > 0 ? Q16_MAX / amax : 0.f);
        d[g / 256] = amax / Q16_MAX;
        for (int64_t i = 0; i < len; i += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g + i + 8 * k), id));
            sum32[(g + i) / 32] = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
            /* packs per 128-bit lane: qwords (0-3, 16-19, 4-7, 20-23) -> (0-3, 4-7, 16-19, 20-23) */
            _mm256_storeu_si256((__m256i *)(q + g + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[2]), 0xD8));
            _mm256_storeu_si256((__m256i *)(q + g + i + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(v[1], v[3]), 0xD8));
        }
    }
}

#define Q16_ARGS const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1, const xq16 *X, int64_t t0, float *Y
#define X16(t) (X->q + (t0 + (t)) * X->cols)
#define XD16(t, b) (X->d[(t0 + (t)) * ((X->cols + 255) / 256) + (b)])
/* the products of 32 widened weights (lo: words of bytes 0-7 / 16-23, hi: 8-15 / 24-31) with x */
#define MADD32(acc, lo, hi, x) (acc) = _mm256_add_epi32((acc), _mm256_add_epi32(                  \
    _mm256_madd_epi16((lo), _mm256_loadu_si256((const __m256i *)(x))),                             \
    _mm256_madd_epi16((hi), _mm256_loadu_si256((const __m256i *)((x) + 16)))))

/* Q4_K / Q5_K: 32 bytes of qs per pair of sub-blocks: low nibbles sub-block 2c, high 2c + 1. Each
 * sub-block's integer sum is scaled in float (d * scale * x's scale), two FMA chains per row of x. */
KFN k4_q16_rows(Q16_ARGS, const int T, const int five) {
    const int64_t nb = X->cols / 256, bs = five ? 176 : 144;
    const __m256i zero = _mm256_setzero_si256();
    float dsc[4][8] __attribute__((aligned(32)));  /* per row of x: d * scale_j * x's scale */
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m256 acc[4][2];
        FOR_T4 acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + bs * b, *qs = blk + (five ? 48 : 16);
            PREFETCH(blk, 192);
            const __m128i sm = k4_scales_mins(blk);
            const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(half(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
            const __m256i mn = _mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8));
            const float dmin = half(blk + 2);
            FOR_T4 {  /* the mins: - dmin * m_j * (sum of x over sub-block j) */
                const float dx = XD16(t, b);
                const __m256i xs = _mm256_loadu_si256((const __m256i *)(X->sum32 + (t0 + t) * (X->cols / 32) + 8 * b));
                _mm256_store_ps(dsc[t], _mm256_mul_ps(sc, _mm256_set1_ps(dx)));
                acc[t][1] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_mullo_epi32(mn, xs)), acc[t][1]);
            }
            __asm__ volatile("" ::: "memory");  /* broadcast the scales from memory */
            const __m256i qh = five ? ld32(blk + 16) : zero;
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
                __m256i lo, hi;
                k4_bytes(qs, qh, c, five, &lo, &hi);
                const __m256i w0 = _mm256_unpacklo_epi8(lo, zero), w1 = _mm256_unpackhi_epi8(lo, zero);
                const __m256i w2 = _mm256_unpacklo_epi8(hi, zero), w3 = _mm256_unpackhi_epi8(hi, zero);
                FOR_T4 {
                    const int16_t *x = X16(t) + 256 * b + 64 * c;
                    __m256i sl = zero, sh = zero;
                    MADD32(sl, w0, w1, x);
                    MADD32(sh, w2, w3, x + 32);
                    acc[t][0] = _mm256_fmadd_ps(_mm256_set1_ps(dsc[t][2 * c]), _mm256_cvtepi32_ps(sl), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(_mm256_set1_ps(dsc[t][2 * c + 1]), _mm256_cvtepi32_ps(sh), acc[t][1]);
                }
            }
        }
        FOR_T4 Y[t * rows + r] = hsum_f32(_mm256_add_ps(acc[t][0], acc[t][1]));
    }
}

/* Q6_K: q - 32 as signed bytes (assembled as in q6_k_q8_rows), widened with their sign */
KFN q6_k_q16_rows(Q16_ARGS, const int T) {
    const int64_t nb = X->cols / 256;
    const __m256i off = _mm256_set1_epi8(32), zero = _mm256_setzero_si256();
    for (int64_t r = r0; r < r1; r++) {
        const u8 *row = W + r * rb;
        __m256 acc[4];
        FOR_T4 acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const u8 *blk = row + 210 * b; const int8_t *sc = (const int8_t *)(blk + 192);
            PREFETCH(blk, 256);
            __m256i isum[4], scw[2];
            q6_scale_words(sc, scw);
            FOR_T4 isum[t] = zero;
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                const __m256i l0 = ld32(blk + 64 * h), l1 = ld32(blk + 64 * h + 32), qh = ld32(blk + 128 + 32 * h);
                _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
                    const __m256i q = _mm256_sub_epi8(q6_bytes(l0, l1, qh, p), off), neg = _mm256_cmpgt_epi8(zero, q);
                    const __m256i s = q6_scale_pair(scw[h], p);
                    const __m256i w0 = _mm256_mullo_epi16(_mm256_unpacklo_epi8(q, neg), s);
                    const __m256i w1 = _mm256_mullo_epi16(_mm256_unpackhi_epi8(q, neg), s);
                    FOR_T4 MADD32(isum[t], w0, w1, X16(t) + 256 * b + 128 * h + 32 * p);
                }
            }
            const float d = half(blk + 208);
            FOR_T4 acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * XD16(t, b)), _mm256_cvtepi32_ps(isum[t]), acc[t]);
        }
        FOR_T4 Y[t * rows + r] = hsum_f32(acc[t]);
    }
}

#define Q16_MM(NAME, CALL) XQ_MM(q16mm_##NAME, xq16, CALL)
#define Q4K16(...) k4_q16_rows(__VA_ARGS__, 0)
#define Q5K16(...) k4_q16_rows(__VA_ARGS__, 1)
Q16_MM(q4_k, Q4K16) Q16_MM(q5_k, Q5K16) Q16_MM(q6_k, q6_k_q16_rows)

static __thread void *q16buf; static __thread size_t q16cap;
static int quantize_x16(const float *X, int64_t T, int64_t cols, xq16 *x) {
    const int64_t groups = (cols + 255) / 256;  /* cols: a multiple of 32 */
    const size_t nq = (size_t)T * cols * 2, nd = (size_t)T * groups * 4, need = nq + nd + (size_t)T * (cols / 32) * 4;
    if (need > q16cap) {
        free(q16buf); q16cap = 0;
        if (!(q16buf = aligned_alloc(64, (need + 63) & ~(size_t)63))) return -1;
        q16cap = need;
    }
    x->cols = cols; x->q = q16buf; x->d = (float *)((char *)q16buf + nq); x->sum32 = (int32_t *)((char *)q16buf + nq + nd);
    for (int64_t t = 0; t < T; t++)
        quant_x16(X + t * cols, cols, x->q + t * cols, x->d + t * groups, x->sum32 + t * (cols / 32));
    return 0;
}
#endif /* AVX2 int16 */

/* ==== AVX2 int16-activation GEMM for prefill: K-quants and Q4_0 / Q5_0 / Q8_0 times many rows of x ====
 * x is quantized as for ocula_matmul_q16 (int16, one scale per 256 values: about bfloat16's rounding).
 * 16 rows of W at a time are decoded once into a per-thread tile of int16 weights already multiplied by
 * their sub-block scale (Q4_K q * s <= 945, Q5_K <= 1953, Q6_K |(q - 32) * s| <= 4096), so one vpmaddwd
 * does 16 multiply-adds with nothing to unpack: on the AVX2-only Zen 4 we measured, vpmaddwd + vpaddd
 * run at 62-69 G multiply-adds/s per core against 42 for float32 FMAs. Rows of x then go through the
 * tile 3 at a time, two rows of W at a time (loads shared). Integer sums per 256 values are exact (a lane
 * adds 32 products: Q6_K at most 32 * 4096 * 16383 < 2^31); d, x's scale and the mins are applied in
 * float. Q4_0 / Q5_0 / Q8_0 weights are widened as they are and their float scale is applied to each
 * block of 32's integer sum (gemm16_block32: about 0.85x the K types' rate). No whole-weight float
 * copy: the float32 prefill path decodes every weight to float32 first. */
#if defined(Q16)
#define GEMM_Q16 1
/* the types the GEMM takes and how its rows divide: K types into blocks of 256, the others of 32 (0: not taken) */
static int gemm16_row_unit(int type) {
    return type == 12 || type == 13 || type == 14 ? 256 : type == 2 || type == 6 || type == 8 ? 32 : 0;
}
typedef struct {
    int16_t w[256];   /* scaled weights, each 32 in x's int16 order (0-7, 16-23, 8-15, 24-31) */
    float fm[8];      /* Q4_K / Q5_K: dmin * min of sub-block j (Q6_K: unused) */
    float d, pad[7];
} wtile16;

static void tile_k4(const u8 *blk, wtile16 *u, const int five) {
    const __m256i zero = _mm256_setzero_si256();
    const u8 *qs = blk + (five ? 48 : 16);
    const __m128i sm = k4_scales_mins(blk);
    const __m256i qh = five ? ld32(blk + 16) : zero;
    uint8_t s[16];
    _mm_storeu_si128((__m128i *)s, sm);
    for (int c = 0; c < 4; c++) {
        __m256i lo, hi;
        k4_bytes(qs, qh, c, five, &lo, &hi);
        const __m256i sl = _mm256_set1_epi16(s[2 * c]), sh = _mm256_set1_epi16(s[2 * c + 1]);
        __m256i *w = (__m256i *)(u->w + 64 * c);
        _mm256_store_si256(w, _mm256_mullo_epi16(_mm256_unpacklo_epi8(lo, zero), sl));
        _mm256_store_si256(w + 1, _mm256_mullo_epi16(_mm256_unpackhi_epi8(lo, zero), sl));
        _mm256_store_si256(w + 2, _mm256_mullo_epi16(_mm256_unpacklo_epi8(hi, zero), sh));
        _mm256_store_si256(w + 3, _mm256_mullo_epi16(_mm256_unpackhi_epi8(hi, zero), sh));
    }
    const float dmin = half(blk + 2);
    _mm256_store_ps(u->fm, _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)))));
    u->d = half(blk);
}

static void tile_q6_k(const u8 *blk, wtile16 *u) {
    const __m256i off = _mm256_set1_epi8(32), zero = _mm256_setzero_si256();
    __m256i scw[2];
    q6_scale_words((const int8_t *)(blk + 192), scw);
    for (int h = 0; h < 2; h++) {
        const __m256i l0 = ld32(blk + 64 * h), l1 = ld32(blk + 64 * h + 32), qh = ld32(blk + 128 + 32 * h);
        for (int p = 0; p < 4; p++) {
            const __m256i q = _mm256_sub_epi8(q6_bytes(l0, l1, qh, p), off), neg = _mm256_cmpgt_epi8(zero, q);
            const __m256i s = q6_scale_pair(scw[h], p);
            __m256i *w = (__m256i *)(u->w + 128 * h + 32 * p);
            _mm256_store_si256(w, _mm256_mullo_epi16(_mm256_unpacklo_epi8(q, neg), s));
            _mm256_store_si256(w + 1, _mm256_mullo_epi16(_mm256_unpackhi_epi8(q, neg), s));
        }
    }
    u->d = half(blk + 208);
}

/* Q4_0 / Q5_0 / Q8_0 (bs 18 / 22 / 34): nj <= 8 blocks of 32 weights, each widened exactly (q - 8,
 * q - 16, q) in x's int16 order; their scales d_j in fm (gemm16_block32 applies them per 32 values) */
static void tile_q32(const u8 *blk, int bs, int nj, wtile16 *u) {
    const __m256i zero = _mm256_setzero_si256();
    for (int j = 0; j < nj; j++) {
        const __m256i q = w32(blk + bs * j, bs), neg = _mm256_cmpgt_epi8(zero, q);
        _mm256_store_si256((__m256i *)(u->w + 32 * j), _mm256_unpacklo_epi8(q, neg));
        _mm256_store_si256((__m256i *)(u->w + 32 * j + 16), _mm256_unpackhi_epi8(q, neg));
        u->fm[j] = half(blk + bs * j);
    }
    u->d = 1.f;
}

/* gemm16_block for the 32-value types: a float scale per 32 weights, applied to each block's integer
 * sum; the last group of 256 values has `last` blocks of 32 (rows that 256 does not divide) */
KFN gemm16_block32(const wtile16 *const *u, const int64_t *i, const int R, int64_t nb, const int last,
                   const xq16 *X, int64_t t0, const int T, float *Y, int64_t rows) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++) FOR_T4 acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 blk[4][4];  /* sum over this 256 of d_j * (block j's integer sum), per lane */
        for (int r = 0; r < R; r++) FOR_T4 blk[r][t] = _mm256_setzero_ps();
        const int nj = b == nb - 1 ? last : 8;
        _Pragma("GCC unroll 2") for (int j = 0; j < nj; j++) {
            __m256i w0[4], w1[4];
            __m256 d[4];
            for (int r = 0; r < R; r++) {
                w0[r] = _mm256_load_si256((const __m256i *)(u[r][b].w + 32 * j));
                w1[r] = _mm256_load_si256((const __m256i *)(u[r][b].w + 32 * j + 16));
                d[r] = _mm256_broadcast_ss(&u[r][b].fm[j]);
            }
            FOR_T4 {
                const int16_t *x = X16(t) + 256 * b + 32 * j;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 16));
                for (int r = 0; r < R; r++) {
                    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0[r], x0), _mm256_madd_epi16(w1[r], x1));
                    blk[r][t] = _mm256_fmadd_ps(d[r], _mm256_cvtepi32_ps(s), blk[r][t]);
                }
            }
        }
        FOR_T4 {
            const __m256 dx = _mm256_set1_ps(XD16(t, b));
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(dx, blk[r][t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++) FOR_T4 Y[(t0 + t) * rows + i[r]] = hsum_f32(acc[r][t]);
}

/* Y[t0 + t, i[r]] for R decoded rows of W (u[r]: nb blocks each) and T rows of x from t0; the loads
 * of each x vector are shared by the R rows, those of each weight vector by the T rows */
KFN gemm16_block(const wtile16 *const *u, const int64_t *i, const int R, int64_t nb, const xq16 *X,
                 int64_t t0, const int T, float *Y, int64_t rows, const int mins) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++) FOR_T4 acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i is[4][4];
        for (int r = 0; r < R; r++) FOR_T4 is[r][t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 2") for (int k = 0; k < 16; k++) {
            __m256i w[4];
            for (int r = 0; r < R; r++) w[r] = _mm256_load_si256((const __m256i *)(u[r][b].w + 16 * k));
            FOR_T4 {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(X16(t) + 256 * b + 16 * k));
                for (int r = 0; r < R; r++) is[r][t] = _mm256_add_epi32(is[r][t], _mm256_madd_epi16(w[r], x));
            }
        }
        FOR_T4 {
            const float dx = XD16(t, b);
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(u[r][b].d * dx), _mm256_cvtepi32_ps(is[r][t]), acc[r][t]);
            if (mins) {  /* - dmin * m_j * (sum of x over sub-block j) */
                const __m256i s32 = _mm256_loadu_si256((const __m256i *)(X->sum32 + (t0 + t) * (X->cols / 32) + 8 * b));
                const __m256 sx = _mm256_mul_ps(_mm256_set1_ps(dx), _mm256_cvtepi32_ps(s32));
                for (int r = 0; r < R; r++) acc[r][t] = _mm256_fnmadd_ps(_mm256_load_ps(u[r][b].fm), sx, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++) FOR_T4 Y[(t0 + t) * rows + i[r]] = hsum_f32(acc[r][t]);
}

#define GEMM16_R 2     /* rows of W per pass, and of x: 2 x 3 accumulators and the operands fit */
#define GEMM16_TB 3   /* the 16 registers (measured at 512 rows: 2 x 3 beat 2 x 4, 3 x 3, 4 x 2) */
#define GEMM_ROWS 16    /* rows of W decoded at a time: 16 x 11008 values are 352 KiB, in L2 */
#define GEMM_XBYTES (512 << 10)  /* rows of x at a time: as many as fit this (L2, with the tile) */
static __thread wtile16 *gtile; static __thread size_t gtcap;

/* rows [r0, r1) of Y = X W^T; `type` 12 (Q4_K), 13 (Q5_K), 14 (Q6_K), 2 (Q4_0), 6 (Q5_0) or 8 (Q8_0).
 * For each group of rows of x that fits L2, every 16 rows of W are decoded once and go through it.
 * Rows of the 32-value types may end in a group of fewer than 256 values (SmolVLM's 576, 896). */
static int gemm16_rows(int type, const u8 *W, int64_t rb, int64_t rows, int64_t r0, int64_t r1,
                       const xq16 *X, int64_t T, float *Y) {
    const int64_t nb = (X->cols + 255) / 256;
    const int last = (int)(X->cols - 256 * (nb - 1)) / 32;  /* blocks of 32 in the last group */
    const int bs = type == 12 ? 144 : type == 13 ? 176 : type == 14 ? 210 : type == 2 ? 18 : type == 6 ? 22 : 34;
    const int mins = type == 12 || type == 13, k_type = gemm16_row_unit(type) == 256;  /* else blocks of 32 */
    int64_t tc = GEMM_XBYTES / (X->cols * 2) / GEMM16_TB * GEMM16_TB;
    if (tc < GEMM16_TB) tc = GEMM16_TB;
    if ((size_t)(GEMM_ROWS * nb) > gtcap) {
        free(gtile); gtcap = 0;
        if (!(gtile = aligned_alloc(64, (size_t)(GEMM_ROWS * nb) * sizeof(wtile16)))) return -1;
        gtcap = (size_t)(GEMM_ROWS * nb);
    }
    for (int64_t c0 = 0; c0 < T; c0 += tc) {
        const int64_t c1 = T - c0 < tc ? T : c0 + tc;
        for (int64_t a = r0; a < r1; a += GEMM_ROWS) {
            const int64_t n = r1 - a < GEMM_ROWS ? r1 - a : GEMM_ROWS;
            for (int64_t i = 0; i < n; i++)
                for (int64_t b = 0; b < nb; b++) {
                    const u8 *blk = W + (a + i) * rb + (k_type ? bs : 8 * bs) * b;
                    if (type == 14) tile_q6_k(blk, gtile + i * nb + b);
                    else if (k_type) tile_k4(blk, gtile + i * nb + b, type == 13);
                    else tile_q32(blk, bs, b == nb - 1 ? last : 8, gtile + i * nb + b);
                }
            for (int64_t t0 = c0; t0 < c1; t0 += GEMM16_TB)
                for (int64_t i = 0; i < n; i += GEMM16_R) {
                    const wtile16 *u[GEMM16_R]; int64_t at[GEMM16_R];
                    for (int r = 0; r < GEMM16_R; r++) {  /* past the last row: the last row again */
                        const int64_t k = i + r < n ? i + r : n - 1;
                        u[r] = gtile + k * nb; at[r] = a + k;
                    }
#define GEMM16_CALL(TT) !k_type ? gemm16_block32(u, at, GEMM16_R, nb, last, X, t0, TT, Y, rows) \
                        : mins ? gemm16_block(u, at, GEMM16_R, nb, X, t0, TT, Y, rows, 1) \
                               : gemm16_block(u, at, GEMM16_R, nb, X, t0, TT, Y, rows, 0)
                    switch (c1 - t0 < GEMM16_TB ? c1 - t0 : GEMM16_TB) {
                        case 1: GEMM16_CALL(1); break;
                        case 2: GEMM16_CALL(2); break;
                        default: GEMM16_CALL(3); break;
                    }
#undef GEMM16_CALL
                }
        }
    }
    return 0;
}
#endif /* AVX2 int16 GEMM */

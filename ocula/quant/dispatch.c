/* The dispatch: per GGML type the generic kernels (kernels.c), the fused mat-vec and row decoder of this
 * build's vector ISA (matvec_avx512.c, else matvec_avx2.c) and the layout it wants x in. */
#ifdef FAST
#define FASTFN(NAME, LAYOUT) , fmm_##NAME, LAYOUT
#else
#define FASTFN(NAME, LAYOUT) , 0, 0
#endif

#ifdef Q8
/* the int8-activation kernels of matvec_q8_avx512.c or matvec_q8_avx2.c, one function per type */
#define Q4K8(...) k4_q8_rows(__VA_ARGS__, 0)
#define Q5K8(...) k4_q8_rows(__VA_ARGS__, 1)
#define Q408(...) q32_q8_rows(__VA_ARGS__, 18)
#define Q508(...) q32_q8_rows(__VA_ARGS__, 22)
#define Q808(...) q32_q8_rows(__VA_ARGS__, 34)
Q8_MM(q4_k, Q4K8) Q8_MM(q5_k, Q5K8) Q8_MM(q6_k, q6_k_q8_rows) Q8_MM(q4_0, Q408) Q8_MM(q5_0, Q508)
Q8_MM(q8_0, Q808)

typedef void (*q8_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, const xq8 *, int64_t, float *);
/* xfmt: how quantize_x lays out x: 0 = a scale per 32 values, 1 = per 256, Q4K_XFMT = the kernel's
 * choice for Q4_K / Q5_K */
static const struct { int type; q8_fn mm; int xfmt; } Q8_TABLE[] = {
    {2, q8mm_q4_0, 0}, {6, q8mm_q5_0, 0}, {8, q8mm_q8_0, 0}, {12, q8mm_q4_k, Q4K_XFMT}, {13, q8mm_q5_k, Q4K_XFMT},
    {14, q8mm_q6_k, 1},
};
static int q8_find(int type) {
    for (unsigned i = 0; i < sizeof Q8_TABLE / sizeof Q8_TABLE[0]; i++) if (Q8_TABLE[i].type == type) return (int)i;
    return -1;
}
#endif
#ifdef Q16
typedef void (*q16_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, const xq16 *, int64_t, float *);
static q16_fn q16_find(int type) { return type == 12 ? q16mm_q4_k : type == 13 ? q16mm_q5_k : type == 14 ? q16mm_q6_k : 0; }
#endif

typedef void (*mm_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *);
typedef void (*dq_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, void *, int);
#define NOFAST , 0, 0
#ifdef FAST_DEQUANT  /* matvec_avx2.c's row decoders, for the types it has */
#define DQ(NAME) fdq_##NAME
#else
#define DQ(NAME) dq_rows_##NAME
#endif
static const struct { int type; mm_fn mm; dq_fn dq; mm_fn fast; int layout; } TABLE[] = {  /* GGML type ids */
    {0, mm_f32, dq_rows_f32 NOFAST}, {1, mm_f16, DQ(f16) FASTFN(f16, X_NAT)},
    {2, mm_q4_0, DQ(q4_0) FASTFN(q4_0, X_P16)}, {3, mm_q4_1, DQ(q4_1) FASTFN(q4_1, X_P16)},
    {6, mm_q5_0, DQ(q5_0) FASTFN(q5_0, X_P16)}, {7, mm_q5_1, DQ(q5_1) FASTFN(q5_1, X_P16)},
    {8, mm_q8_0, DQ(q8_0) FASTFN(q8_0, X_NAT)}, {10, mm_q2_k, dq_rows_q2_k NOFAST},
    {11, mm_q3_k, dq_rows_q3_k NOFAST}, {12, mm_q4_k, DQ(q4_k) FASTFN(q4_k, X_P32)},
    {13, mm_q5_k, DQ(q5_k) FASTFN(q5_k, X_P32)}, {14, mm_q6_k, DQ(q6_k) FASTFN(q6_k, X_NAT)},
    {30, mm_bf16, dq_rows_bf16 NOFAST},
};
static int find(int type) {
    for (unsigned i = 0; i < sizeof TABLE / sizeof TABLE[0]; i++) if (TABLE[i].type == type) return (int)i;
    return -1;
}
/* CALL for rows [a, z) of Y covering [0, rows): with nthreads > 1, ~8 chunks of rows per thread,
 * taken in turn (a thread slowed down by another process on its core gets fewer), multiples of 16 rows */
#ifdef _OPENMP
#define ROW_CHUNKS(rows, nthreads, CALL) do {                                                     \
        if ((nthreads) > 1) {                                                                    \
            int64_t chunk_ = (((rows) + 8 * (nthreads) - 1) / (8 * (nthreads)) + 15) & ~(int64_t)15; \
            _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")               \
            for (int64_t a = 0; a < (rows); a += chunk_) {                                       \
                int64_t z = a + chunk_ < (rows) ? a + chunk_ : (rows); CALL;                      \
            }                                                                                    \
        } else { int64_t a = 0, z = (rows); CALL; }                                              \
    } while (0)
#else
#define ROW_CHUNKS(rows, nthreads, CALL) do { int64_t a = 0, z = (rows); (void)(nthreads); CALL; } while (0)
#endif
#ifdef PERMUTED_X
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
#elif defined(FAST)
static const float *x_in_layout(const float *X, int64_t n, int layout) { (void)n; (void)layout; return X; }
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
    ROW_CHUNKS(rows, nthreads, mm(W, rb, cols, rows, a, z, X, T, Y));
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

/* the body of an entry point this build has no kernel for: every argument unused, -1 */
#define NO_KERNEL do { (void)type; (void)W; (void)rows; (void)cols; (void)rb; (void)X; (void)T; (void)Y; \
                       (void)nthreads; return -1; } while (0)

/* Y[T, rows] ~= X[T, cols] @ W^T with x quantized to int8 (lossy, ~1e-2 relative: see kernels.py);
 * nonzero when this build or type has no such kernel (the caller falls back to ocula_matmul). */
int ocula_matmul_q8(int type, const u8 *W, int64_t rows, int64_t cols, int64_t rb,
                    const float *X, int64_t T, float *Y, int nthreads) {
#ifdef Q8
    int i = q8_find(type); xq8 x;
    if (i < 0 || T < 1 || T > MAXT || quantize_x(X, T, cols, Q8_TABLE[i].xfmt, &x)) return -1;
    q8_fn mm = Q8_TABLE[i].mm;
    ROW_CHUNKS(rows, nthreads, mm(W, rb, rows, a, z, &x, T, Y));
    return 0;
#else
    NO_KERNEL;
#endif
}
int ocula_q8_supports(int type) {
#ifdef Q8
    return q8_find(type) >= 0;
#else
    (void)type; return 0;
#endif
}

/* Y[T, rows] ~= X[T, cols] @ W^T with x quantized to int16 per 256 values (matvec_q16_avx2.c); nonzero
 * when this build or type has no such kernel (the caller falls back to ocula_matmul). */
int ocula_matmul_q16(int type, const u8 *W, int64_t rows, int64_t cols, int64_t rb,
                     const float *X, int64_t T, float *Y, int nthreads) {
#ifdef Q16
    xq16 x;
    q16_fn mm = q16_find(type);
    if (!mm || T < 1 || T > MAXT || cols % 256 || quantize_x16(X, T, cols, &x)) return -1;
    ROW_CHUNKS(rows, nthreads, mm(W, rb, rows, a, z, &x, T, Y));
    return 0;
#else
    NO_KERNEL;
#endif
}
int ocula_gemm_q16_supports(int type) {
#ifdef GEMM_Q16
    return gemm16_row_unit(type) != 0;
#else
    (void)type; return 0;
#endif
}
/* Y[T, rows] ~= X[T, cols] @ W^T with x quantized as for ocula_matmul_q16, for many rows of x (prefill):
 * Q4_K / Q5_K / Q6_K / Q4_0 / Q5_0 / Q8_0 in AVX2 builds (gemm_q16_avx2.c); nonzero otherwise. */
int ocula_gemm_q16(int type, const u8 *W, int64_t rows, int64_t cols, int64_t rb,
                   const float *X, int64_t T, float *Y, int nthreads) {
#ifdef GEMM_Q16
    xq16 x; int rc = 0;
    const int unit = gemm16_row_unit(type);
    if (!unit || T < 1 || cols % unit || quantize_x16(X, T, cols, &x)) return -1;
    ROW_CHUNKS(rows, nthreads, if (gemm16_rows(type, W, rb, rows, a, z, &x, T, Y)) rc = -1);
    return rc;
#else
    NO_KERNEL;
#endif
}
int ocula_q16_supports(int type) {
#ifdef Q16
    return q16_find(type) != 0;
#else
    (void)type; return 0;
#endif
}

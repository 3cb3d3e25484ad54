/* Attention for prefill and image encoding (many queries): softmax(q k^T * scale) v, computed block by
 * block with a running softmax (the "flash" scheme), float32 arithmetic on float32 or bfloat16
 * inputs. Appended to kernels.c and pointwise.c (exp_f32) by kernels.py; ocula.models.layers.sdpa
 * calls it. torch's CPU SDPA reached ~35 GFLOP/s on 2 cores of the Zen 5 machine we measured. */

#define AQ 64   /* query rows per task */
#define AK 64   /* keys per block: four 16-lane vectors of scores per query row */
/* The 4-row micro-kernels take ACW vectors of VL floats (keys, or columns of O) per pass: 4 x ACW
 * accumulators that stay in registers (32 zmm with AVX-512, 16 ymm without; GCC lowers vectors wider
 * than the machine's through memory). */
#ifdef __AVX512F__
#define VL 16
#define ACW 4
#else
#define VL 8
#define ACW 2
#endif
typedef float fvec __attribute__((vector_size(4 * VL)));
static inline fvec ldv(const float *p) { fvec v; memcpy(&v, p, sizeof v); return v; }
static inline void stv(float *p, fvec v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__)
static inline fvec bcv(float s) { __m512 v = _mm512_set1_ps(s); fvec r; memcpy(&r, &v, sizeof r); return r; }
#elif defined(__AVX2__)
static inline fvec bcv(float s) { __m256 v = _mm256_set1_ps(s); fvec r; memcpy(&r, &v, sizeof r); return r; }
#else
static inline fvec bcv(float s) { return (fvec){0} + s; }
#endif

typedef struct {
    const void *q, *k, *v;
    void *o;
    int64_t H, Hk, T, S, D;
    int64_t sq[3], sk[3], sv[3], so[3];  /* element strides of batch, head, row; the last dim is contiguous */
    float scale;
    int causal;   /* query t sees keys s <= t + S - T */
    int bf16;     /* inputs and output are bfloat16, else float32 */
} ocula_attn;

static inline float ld_elem(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* one task: query rows [t0, t0 + AQ) of head h of batch b, against every visible key */
static void attn_task(const ocula_attn *a, int64_t b, int64_t h, int64_t t0, float *buf) {
    const int64_t D = a->D, Dp = (D + 15) & ~(int64_t)15, T = a->T, S = a->S, off = S - T;
    const int64_t nq = T - t0 < AQ ? T - t0 : AQ, hk = h / (a->H / a->Hk);
    const int bf = a->bf16;
    float *Q = buf, *Kt = Q + AQ * Dp, *V = Kt + Dp * AK, *P = V + AK * Dp, *O = P + AQ * AK;
    float *m = O + AQ * Dp, *l = m + AQ;
    const int64_t qb = b * a->sq[0] + h * a->sq[1], kb = b * a->sk[0] + hk * a->sk[1], vb = b * a->sv[0] + hk * a->sv[1];
    for (int64_t i = 0; i < AQ; i++) {
        for (int64_t d = 0; d < Dp; d++)
            Q[i * Dp + d] = i < nq && d < D ? ld_elem(a->q, qb + (t0 + i) * a->sq[2] + d, bf) * a->scale : 0.f;
        m[i] = -INFINITY; l[i] = 0.f;
    }
    memset(O, 0, sizeof(float) * AQ * Dp);
    int64_t end = a->causal ? t0 + nq + off : S;
    if (end > S) end = S;
    for (int64_t s0 = 0; s0 < end; s0 += AK) {
        const int64_t nk = end - s0 < AK ? end - s0 : AK;
        for (int64_t j = 0; j < AK; j++) {
            for (int64_t d = 0; d < D; d++) {
                Kt[d * AK + j] = j < nk ? ld_elem(a->k, kb + (s0 + j) * a->sk[2] + d, bf) : 0.f;
                V[j * Dp + d] = j < nk ? ld_elem(a->v, vb + (s0 + j) * a->sv[2] + d, bf) : 0.f;
            }
            for (int64_t d = D; d < Dp; d++) V[j * Dp + d] = 0.f;
        }
        /* P = Q Kt: four query rows at a time, 64 keys as four vectors per row */
        for (int64_t i = 0; i < nq; i += 4) for (int c0 = 0; c0 < AK / VL; c0 += ACW) {
            fvec acc[4][ACW] = {{{0}}};
            for (int64_t d = 0; d < D; d++) {
                fvec kc[ACW];
                _Pragma("GCC unroll 4") for (int c = 0; c < ACW; c++) kc[c] = ldv(Kt + d * AK + VL * (c0 + c));
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                    fvec qv = bcv(Q[(i + r) * Dp + d]);
                    _Pragma("GCC unroll 4") for (int c = 0; c < ACW; c++) acc[r][c] += qv * kc[c];
                }
            }
            for (int r = 0; r < 4; r++) for (int c = 0; c < ACW; c++) stv(P + (i + r) * AK + VL * (c0 + c), acc[r][c]);
        }
        /* running softmax: rescale what each row has so far when its maximum grows */
        for (int64_t i = 0; i < nq; i++) {
            float *p = P + i * AK;
            int64_t valid = a->causal ? t0 + i + off - s0 + 1 : nk;
            if (valid > nk) valid = nk;
            if (valid <= 0) { memset(p, 0, sizeof(float) * AK); continue; }
            float mx = m[i];
            for (int64_t j = 0; j < valid; j++) mx = p[j] > mx ? p[j] : mx;
            float corr = m[i] == -INFINITY ? 0.f : exp_f32(m[i] - mx), sum = 0.f;
            for (int64_t j = 0; j < AK; j++) p[j] = exp_f32(p[j] - mx);  /* all 64: vectorized */
            for (int64_t j = valid; j < AK; j++) p[j] = 0.f;
            for (int64_t j = 0; j < valid; j++) sum += p[j];
            l[i] = l[i] * corr + sum;
            m[i] = mx;
            if (corr != 1.f) for (int64_t d = 0; d < Dp; d++) O[i * Dp + d] *= corr;
        }
        for (int64_t i = nq; i < ((nq + 3) & ~(int64_t)3); i++) memset(P + i * AK, 0, sizeof(float) * AK);
        /* O += P V: four rows, up to 64 columns of O at a time */
        for (int64_t i = 0; i < nq; i += 4) {
            for (int64_t dc = 0; dc < Dp; dc += VL * ACW) {
                const int nv = Dp - dc >= VL * ACW ? ACW : (int)((Dp - dc) / VL);
                fvec acc[4][ACW];
                for (int r = 0; r < 4; r++) for (int c = 0; c < nv; c++) acc[r][c] = ldv(O + (i + r) * Dp + dc + VL * c);
                for (int64_t j = 0; j < nk; j++) {
                    const float *vj = V + j * Dp + dc;
                    if (nv == ACW) {
                        fvec vc[ACW];
                        _Pragma("GCC unroll 4") for (int c = 0; c < ACW; c++) vc[c] = ldv(vj + VL * c);
                        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                            fvec pv = bcv(P[(i + r) * AK + j]);
                            _Pragma("GCC unroll 4") for (int c = 0; c < ACW; c++) acc[r][c] += pv * vc[c];
                        }
                    } else {
                        for (int c = 0; c < nv; c++) {
                            fvec vc = ldv(vj + VL * c);
                            for (int r = 0; r < 4; r++) acc[r][c] += bcv(P[(i + r) * AK + j]) * vc;
                        }
                    }
                }
                for (int r = 0; r < 4; r++) for (int c = 0; c < nv; c++) stv(O + (i + r) * Dp + dc + VL * c, acc[r][c]);
            }
        }
    }
    const int64_t ob = b * a->so[0] + h * a->so[1];
    for (int64_t i = 0; i < nq; i++) {
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < D; d++) {
            float y = O[i * Dp + d] * inv;
            int64_t at = ob + (t0 + i) * a->so[2] + d;
            if (bf) ((uint16_t *)a->o)[at] = f32_bf16(y);
            else ((float *)a->o)[at] = y;
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* bfloat16 inputs with AVX512-BF16: the products in pairs (vdpbf16ps: 32 per instruction, float32
 * sums) on transposed blocks. Scores are S^T [keys][queries], so 16 queries' running softmax is one
 * vector; keys are read in place (a pair of adjacent head dims broadcast); O^T is [dims][queries].
 * The probabilities are rounded to bfloat16 for P V (as torch's bf16 SDPA does). */
#define BF16_ATTENTION 1

static inline __m512 exp16(__m512 x) {  /* exp_f32, 16 lanes */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.376259f)), _mm512_set1_ps(-87.336544f));
    const __m512 magic = _mm512_set1_ps(12582912.f);
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
    __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic));
    __m512 nf = _mm512_sub_ps(t, magic);
    __m512 f = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.f)));
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(n, 23)));
}

/* words 0..15 of a and of b interleaved: a0 b0 a1 b1 ... (a in the low 256 bits, b in the high) */
static inline __m512i pair_words(__m512i ab) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, ab);
}
#define DP(acc, a, b) _mm512_dpbf16_ps(acc, (__m512bh)(a), (__m512bh)(b))

static void attn_task_bf16(const ocula_attn *a, int64_t b, int64_t h, int64_t t0, float *buf) {
    const int64_t D = a->D, D2 = D / 2, Dp = (D + 15) & ~(int64_t)15, T = a->T, S = a->S, off = S - T;
    const int64_t nq = T - t0 < AQ ? T - t0 : AQ, hk = h / (a->H / a->Hk);
    uint32_t *Qt = (uint32_t *)buf, *V2 = Qt + D2 * AQ, *P2 = V2 + (AK / 2) * Dp;
    float *St = (float *)(P2 + (AK / 2) * AQ), *Ot = St + AK * AQ, *m = Ot + Dp * AQ, *l = m + AQ;
    const uint16_t *q = (const uint16_t *)a->q + b * a->sq[0] + h * a->sq[1];
    const uint16_t *k = (const uint16_t *)a->k + b * a->sk[0] + hk * a->sk[1];
    const uint16_t *v = (const uint16_t *)a->v + b * a->sv[0] + hk * a->sv[1];
    for (int64_t i = 0; i < AQ; i++) {
        for (int64_t p = 0; p < D2; p++) {
            uint32_t w = 0;
            if (i < nq) memcpy(&w, q + (t0 + i) * a->sq[2] + 2 * p, 4);
            Qt[p * AQ + i] = w;
        }
        m[i] = -INFINITY; l[i] = 0.f;
    }
    memset(Ot, 0, sizeof(float) * Dp * AQ);
    const __m512 scale = _mm512_set1_ps(a->scale), ninf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int64_t end = a->causal ? t0 + nq + off : S;
    if (end > S) end = S;
    for (int64_t s0 = 0; s0 < end; s0 += AK) {
        const int64_t nk = end - s0 < AK ? end - s0 : AK, np = (nk + 1) / 2;
        /* S^T = K Q^T: four keys at a time against the 64 queries (four vectors) */
        for (int64_t j = 0; j < nk; j += 4) {
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) acc[r][c] = zero;
            const uint16_t *kr[4];
            for (int r = 0; r < 4; r++) kr[r] = k + (s0 + (j + r < nk ? j + r : j)) * a->sk[2];
            for (int64_t p = 0; p < D2; p++) {
                __m512i q0 = _mm512_loadu_si512(Qt + p * AQ), q1 = _mm512_loadu_si512(Qt + p * AQ + 16);
                __m512i q2 = _mm512_loadu_si512(Qt + p * AQ + 32), q3 = _mm512_loadu_si512(Qt + p * AQ + 48);
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                    uint32_t w; memcpy(&w, kr[r] + 2 * p, 4);
                    __m512i kb = _mm512_set1_epi32((int)w);
                    acc[r][0] = DP(acc[r][0], kb, q0); acc[r][1] = DP(acc[r][1], kb, q1);
                    acc[r][2] = DP(acc[r][2], kb, q2); acc[r][3] = DP(acc[r][3], kb, q3);
                }
            }
            for (int r = 0; r < 4 && j + r < nk; r++)
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(St + (j + r) * AQ + 16 * c, _mm512_mul_ps(acc[r][c], scale));
        }
        /* running softmax, 16 queries per vector; masked keys get probability 0 */
        for (int c = 0; c < 4; c++) {
            const __m512i t = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(t0 + 16 * c + off - s0)));
            __m512 mold = _mm512_loadu_ps(m + 16 * c), mx = mold;
            for (int64_t j = 0; j < nk; j++) {
                __mmask16 ok = a->causal ? _mm512_cmpge_epi32_mask(t, _mm512_set1_epi32((int)j)) : 0xFFFF;
                mx = _mm512_mask_max_ps(mx, ok, mx, _mm512_loadu_ps(St + j * AQ + 16 * c));
            }
            __mmask16 seen = _mm512_cmp_ps_mask(mold, ninf, _CMP_NEQ_OQ);
            __m512 corr = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(mold, mx)));
            __mmask16 any = _mm512_cmp_ps_mask(mx, ninf, _CMP_NEQ_OQ);
            __m512 sum = zero;
            for (int64_t j = 0; j < nk; j++) {
                __mmask16 ok = any & (a->causal ? _mm512_cmpge_epi32_mask(t, _mm512_set1_epi32((int)j)) : 0xFFFF);
                __m512 p = _mm512_maskz_mov_ps(ok, exp16(_mm512_sub_ps(_mm512_loadu_ps(St + j * AQ + 16 * c), mx)));
                _mm512_storeu_ps(St + j * AQ + 16 * c, p);
                sum = _mm512_add_ps(sum, p);
            }
            if (nk & 1) _mm512_storeu_ps(St + nk * AQ + 16 * c, zero);
            _mm512_storeu_ps(l + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * c), corr, sum));
            _mm512_storeu_ps(m + 16 * c, _mm512_mask_mov_ps(mold, any, mx));
            for (int64_t d = 0; d < Dp; d++)
                _mm512_storeu_ps(Ot + d * AQ + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(Ot + d * AQ + 16 * c), corr));
            for (int64_t jp = 0; jp < np; jp++) {  /* probabilities of keys 2 jp, 2 jp + 1 as bf16 pairs */
                __m512 p0 = _mm512_loadu_ps(St + 2 * jp * AQ + 16 * c), p1 = _mm512_loadu_ps(St + (2 * jp + 1) * AQ + 16 * c);
                _mm512_storeu_si512(P2 + jp * AQ + 16 * c, pair_words((__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
            }
        }
        /* values of keys 2 jp, 2 jp + 1 as bf16 pairs per head dim (zero past D and past the last key) */
        for (int64_t jp = 0; jp < np; jp++) {
            const uint16_t *va = v + (s0 + 2 * jp) * a->sv[2], *vb = v + (s0 + 2 * jp + 1) * a->sv[2];
            const int has_b = 2 * jp + 1 < nk;
            for (int64_t d = 0; d < Dp; d += 16) {
                __mmask16 in = d + 16 <= D ? 0xFFFF : (__mmask16)((1u << (D - d)) - 1);
                __m256i wa = _mm256_maskz_loadu_epi16(in, va + d), wb = has_b ? _mm256_maskz_loadu_epi16(in, vb + d) : _mm256_setzero_si256();
                _mm512_storeu_si512(V2 + jp * Dp + d, pair_words(_mm512_inserti64x4(_mm512_castsi256_si512(wa), wb, 1)));
            }
        }
        /* O^T += V^T P^T: four head dims at a time */
        for (int64_t d = 0; d < Dp; d += 4) {
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(Ot + (d + r) * AQ + 16 * c);
            for (int64_t jp = 0; jp < np; jp++) {
                __m512i p0 = _mm512_loadu_si512(P2 + jp * AQ), p1 = _mm512_loadu_si512(P2 + jp * AQ + 16);
                __m512i p2 = _mm512_loadu_si512(P2 + jp * AQ + 32), p3 = _mm512_loadu_si512(P2 + jp * AQ + 48);
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                    __m512i vv = _mm512_set1_epi32((int)V2[jp * Dp + d + r]);
                    acc[r][0] = DP(acc[r][0], vv, p0); acc[r][1] = DP(acc[r][1], vv, p1);
                    acc[r][2] = DP(acc[r][2], vv, p2); acc[r][3] = DP(acc[r][3], vv, p3);
                }
            }
            for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) _mm512_storeu_ps(Ot + (d + r) * AQ + 16 * c, acc[r][c]);
        }
    }
    uint16_t *o = (uint16_t *)a->o + b * a->so[0] + h * a->so[1];
    for (int64_t i = 0; i < nq; i++) {
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < D; d++) o[(t0 + i) * a->so[2] + d] = f32_bf16(Ot[d * AQ + i] * inv);
    }
}
#endif

/* out[b, h, t, :] = softmax(q[b, h, t] . k[b, h / (H / Hk), s] * scale over visible s) v: B batches. */
/* 1 where this kernel beats torch's CPU SDPA (measured: ~3x on Zen 5 with AVX-512; with AVX2 only,
 * on Zen 4, torch's is ~2x faster), so ocula.models.layers.sdpa calls it only there */
int ocula_attention_preferred(void) { return VL == 16; }

int ocula_attention(const ocula_attn *a, int64_t B, int nthreads) {
    if (a->D < 1 || a->D > 512 || a->Hk < 1 || a->H % a->Hk) return -1;
    const int64_t Dp = (a->D + 15) & ~(int64_t)15, blocks = (a->T + AQ - 1) / AQ, tasks = B * a->H * blocks;
    const size_t floats = (size_t)(AQ * Dp + Dp * AK + AK * Dp + AQ * AK + AQ * Dp + 2 * AQ);
    if (nthreads < 1 || tasks < 2) nthreads = 1;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if(nthreads > 1)
    {
        FLUSH_DENORMALS;
        float *buf = aligned_alloc(64, (floats * 4 + 63) & ~(size_t)63);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!buf) continue;
            int64_t blk = task % blocks, bh = task / blocks;
#ifdef BF16_ATTENTION
            if (a->bf16 && a->D % 2 == 0) { attn_task_bf16(a, bh / a->H, bh % a->H, blk * AQ, buf); continue; }
#endif
            attn_task(a, bh / a->H, bh % a->H, blk * AQ, buf);
        }
        free(buf);
        RESTORE_FP_MODE;
    }
    return failed ? -2 : 0;
}

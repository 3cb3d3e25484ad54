/* Attention for prefill and image encoding (many queries): softmax(q k^T * scale) v, computed block by
 * block with a running softmax (the "flash" scheme), float32 arithmetic on float32 or bfloat16
 * inputs. Appended to kernels.c and pointwise.c (exp_f32) by kernels.py; ocula.models.layers.sdpa
 * calls it. torch's CPU SDPA reached ~35 GFLOP/s on 2 cores of the Zen 5 machine we measured. */

#define AQ 64   /* query rows per task */
#define AK 64   /* keys per block: four 16-lane vectors of scores per query row */

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
    return bf16 ? f32_bits((uint32_t)((const uint16_t *)p)[i] << 16) : ((const float *)p)[i];
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
        for (int64_t i = 0; i < nq; i += 4) {
            f32x16 acc[4][4] = {{{0}}};
            for (int64_t d = 0; d < D; d++) {
                f32x16 k0 = ldf(Kt + d * AK), k1 = ldf(Kt + d * AK + 16), k2 = ldf(Kt + d * AK + 32), k3 = ldf(Kt + d * AK + 48);
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                    f32x16 qv = bc(Q[(i + r) * Dp + d]);
                    acc[r][0] += qv * k0; acc[r][1] += qv * k1; acc[r][2] += qv * k2; acc[r][3] += qv * k3;
                }
            }
            for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) stf(P + (i + r) * AK + 16 * c, acc[r][c]);
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
            for (int64_t j = 0; j < AK; j++) p[j] = j < valid ? exp_f32(p[j] - mx) : 0.f;
            for (int64_t j = 0; j < valid; j++) sum += p[j];
            l[i] = l[i] * corr + sum;
            m[i] = mx;
            if (corr != 1.f) for (int64_t d = 0; d < Dp; d++) O[i * Dp + d] *= corr;
        }
        for (int64_t i = nq; i < ((nq + 3) & ~(int64_t)3); i++) memset(P + i * AK, 0, sizeof(float) * AK);
        /* O += P V: four rows, up to 64 columns of O at a time */
        for (int64_t i = 0; i < nq; i += 4) {
            for (int64_t dc = 0; dc < Dp; dc += 64) {
                const int nv = Dp - dc >= 64 ? 4 : (int)((Dp - dc) / 16);
                f32x16 acc[4][4];
                for (int r = 0; r < 4; r++) for (int c = 0; c < nv; c++) acc[r][c] = ldf(O + (i + r) * Dp + dc + 16 * c);
                for (int64_t j = 0; j < nk; j++) {
                    const float *vj = V + j * Dp + dc;
                    if (nv == 4) {
                        f32x16 v0 = ldf(vj), v1 = ldf(vj + 16), v2 = ldf(vj + 32), v3 = ldf(vj + 48);
                        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
                            f32x16 pv = bc(P[(i + r) * AK + j]);
                            acc[r][0] += pv * v0; acc[r][1] += pv * v1; acc[r][2] += pv * v2; acc[r][3] += pv * v3;
                        }
                    } else {
                        for (int c = 0; c < nv; c++) {
                            f32x16 vc = ldf(vj + 16 * c);
                            for (int r = 0; r < 4; r++) acc[r][c] += bc(P[(i + r) * AK + j]) * vc;
                        }
                    }
                }
                for (int r = 0; r < 4; r++) for (int c = 0; c < nv; c++) stf(O + (i + r) * Dp + dc + 16 * c, acc[r][c]);
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

/* out[b, h, t, :] = softmax(q[b, h, t] . k[b, h / (H / Hk), s] * scale over visible s) v: B batches. */
int ocula_attention(const ocula_attn *a, int64_t B, int nthreads) {
    if (a->D < 1 || a->D > 512 || a->Hk < 1 || a->H % a->Hk) return -1;
    const int64_t Dp = (a->D + 15) & ~(int64_t)15, blocks = (a->T + AQ - 1) / AQ, tasks = B * a->H * blocks;
    const size_t floats = (size_t)(AQ * Dp + Dp * AK + AK * Dp + AQ * AK + AQ * Dp + 2 * AQ);
    if (nthreads < 1 || tasks < 2) nthreads = 1;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if(nthreads > 1)
    {
        float *buf = aligned_alloc(64, (floats * 4 + 63) & ~(size_t)63);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!buf) continue;
            int64_t blk = task % blocks, bh = task / blocks;
            attn_task(a, bh / a->H, bh % a->H, blk * AQ, buf);
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* One decode step of a pre-norm decoder (Llama / Qwen2 / Qwen3 / Gemma 3 blocks, and their sparse
 * Mixture-of-Experts feed-forward) for one new token of each of B sequences, every layer in one call: appended to kernels.c and pointwise.c by kernels.py,
 * driven by ocula/models/text/fused_decode.py. The mat-vecs are ocula_matmul (exact),
 * ocula_matmul_q8 or ocula_matmul_q16 (by each projection's xbits); activations stay float32; keys/values are written to and read from the caller's
 * KV cache in place. */

typedef struct { int type, xbits; const u8 *w; int64_t rows, cols, rb; const float *bias; } ocula_lin;

/* A sparse feed-forward (ocula/models/moe.py): `router` gives n_expert logits; gate, up and down hold every
 * expert's rows back to back (expert e: rows [e * rows / n_expert, (e + 1) * rows / n_expert)); with
 * fused_gate_up, `gate` holds each expert's gate rows then its up rows and `up` is unused. */
typedef struct {
    ocula_lin router, gate, up, down;
    int n_expert, n_used, gating, norm_topk, fused_gate_up;  /* gating: 0 softmax, 1 sigmoid */
    float weights_scale;
} ocula_moe;

typedef struct {
    ocula_lin q, k, v, o, gate, up, down;
    /* float32 norm weights; NULL where the block has none */
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *post_attn_norm, *post_ffw_norm;
    int sliding;    /* attends to the last `window` keys, rotated by the local table */
    ocula_moe moe;  /* n_expert > 0: the feed-forward is sparse and gate/up/down above are unused */
} ocula_layer;

/* one sequence of the batch: its new token's cache index and rotation, and its per-layer caches */
typedef struct {
    int64_t pos;       /* cache index of the new token; keys 0..pos are visible (less a window) */
    const float *cos, *sin, *cos_local, *sin_local;  /* [n_rot / 2] at this token's position */
    void *const *kc, *const *vc;  /* per layer: [n_kv, cap, head_dim] of the step's kv_type */
    const int64_t *cap;           /* per layer */
} ocula_seq;

typedef struct {
    int64_t d, n_head, n_kv, head_dim, n_ff, n_rot;
    int64_t moe_ff, moe_experts;  /* largest expert gate(+up) rows and expert count of any layer (buffers) */
    int64_t window;    /* sliding window of `sliding` layers, 0 = none */
    float eps, scale, softcap;  /* softcap 0 = none */
    int neox, gelu, kv_type, nthreads;   /* kv_type: GGML id 0 (F32), 1 (F16), 30 (BF16) */
    int64_t par_min, attn_par_min;       /* work from which a mat-vec / the attention is threaded */
    int32_t *expert_rows;  /* NULL, or [n_layers, moe_experts]: rows each expert multiplied, added (tests) */
} ocula_step;

int ocula_step_supports_kv(int type) {
#ifdef __F16C__
    if (type == 1) return 1;
#endif
    return type == 0 || type == 30;
}

/* y[B, rows] = x[B, cols] W^T (+ bias) */
static int lin(const ocula_lin *l, const float *x, int64_t B, float *y, const ocula_step *st) {
    int n = l->rows * l->cols * B >= st->par_min ? st->nthreads : 1;
    int rc = (l->xbits == 8 ? ocula_matmul_q8 : l->xbits == 16 ? ocula_matmul_q16 : ocula_matmul)(
        l->type, l->w, l->rows, l->cols, l->rb, x, B, y, n);
    if (!rc && l->bias)
        for (int64_t b = 0; b < B; b++) for (int64_t i = 0; i < l->rows; i++) y[b * l->rows + i] += l->bias[i];
    return rc;
}
/* fvec, VL, ldv, stv, bcv: attention.c's vectors of the machine's width */
static inline float dot(const float *a, const float *b, int64_t n) {
    fvec acc = {0};
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc += ldv(a + i) * ldv(b + i);
    float s = 0.f;
    for (int j = 0; j < VL; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *y) {
    float inv = 1.f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

static void rope(float *x, int64_t heads, int64_t hd, int64_t n_rot, int neox, const float *c, const float *s) {
    int64_t half = n_rot / 2;
    for (int64_t h = 0; h < heads; h++, x += hd) {
        if (neox) {
            for (int64_t i = 0; i < half; i++) {
                float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[i];
                x[i + half] = b * c[i] + a * s[i];
            }
        } else {
            for (int64_t i = 0; i < half; i++) {
                float a = x[2 * i], b = x[2 * i + 1];
                x[2 * i] = a * c[i] - b * s[i];
                x[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

static void kv_store(void *cache, int type, int64_t at, const float *x, int64_t n) {
    if (type == 0) { memcpy((float *)cache + at, x, (size_t)n * 4); return; }
    uint16_t *p = (uint16_t *)cache + at;
#ifdef __F16C__
    if (type == 1) { for (int64_t i = 0; i < n; i++) p[i] = _cvtss_sh(x[i], 0); return; }
#endif
    for (int64_t i = 0; i < n; i++) p[i] = f32_bf16(x[i]);
}

/* one cached row as float32: the cache itself for F32, else converted into buf */
static inline const float *kv_row(const void *cache, int type, int64_t at, int64_t n, float *buf) {
    if (type == 0) return (const float *)cache + at;
    const uint16_t *p = (const uint16_t *)cache + at;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        u16x16 h; memcpy(&h, p + i, 32);
        stf(buf + i, type == 1 ? h2f16(h) : bf2f16(h));
    }
    for (; i < n; i++) buf[i] = type == 1 ? h2f(p[i]) : bf16_f32(p[i]);
    return buf;
}

/* VL cached values from index `at` as float32, converted in registers (F16 needs F16C) */
static inline fvec ld_kv(const void *cache, int type, int64_t at) {
    if (type == 0) return ldv((const float *)cache + at);
    const uint16_t *p = (const uint16_t *)cache + at;
    fvec r;
#if defined(__AVX512F__)
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    __m512 f = type == 1 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    memcpy(&r, &f, sizeof r);
#elif defined(__AVX2__) && defined(__F16C__)
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    __m256 f = type == 1 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    memcpy(&r, &f, sizeof r);
#else
    for (int i = 0; i < VL; i++) r[i] = type == 1 ? h2f(p[i]) : bf16_f32(p[i]);
#endif
    return r;
}

/* out[hd] = softmax(q . K[first..pos] * scale) V, for query head h over its shared key/value head.
 * Head sizes that are a multiple of VL read the cache in registers (ld_kv), others a row at a time
 * through kv_row; the sums are the same either way (dot's VL lanes). */
static void attend_head(const ocula_step *st, const void *kc, const void *vc, int64_t cap, int64_t first,
                        int64_t pos, int64_t kvh, const float *q, float *scores, float *out) {
    int64_t hd = st->head_dim, S = pos - first + 1, base = (kvh * cap + first) * hd;
    const int type = st->kv_type, direct = hd % VL == 0;
    float buf[hd + 16], mx = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < S; s++) {
        float v;
        if (direct) {
            fvec acc = {0};
            for (int64_t i = 0; i < hd; i += VL) acc += ldv(q + i) * ld_kv(kc, type, base + s * hd + i);
            v = 0.f;
            for (int j = 0; j < VL; j++) v += acc[j];
        } else {
            v = dot(q, kv_row(kc, type, base + s * hd, hd, buf), hd);
        }
        v *= st->scale;
        if (st->softcap > 0.f) v = tanhf(v / st->softcap) * st->softcap;
        scores[s] = v;
        if (v > mx) mx = v;
    }
    for (int64_t s = 0; s < S; s++) scores[s] = exp_f32(scores[s] - mx);  /* vectorized */
    for (int64_t s = 0; s < S; s++) sum += scores[s];
    memset(out, 0, (size_t)hd * 4);
    for (int64_t s = 0; s < S; s++) {
        const fvec p = bcv(scores[s]);
        if (direct) {
            for (int64_t i = 0; i < hd; i += VL) stv(out + i, ldv(out + i) + p * ld_kv(vc, type, base + s * hd + i));
            continue;
        }
        const float *v = kv_row(vc, type, base + s * hd, hd, buf);
        int64_t i = 0;
        for (; i + VL <= hd; i += VL) stv(out + i, ldv(out + i) + p * ldv(v + i));
        for (; i < hd; i++) out[i] += scores[s] * v[i];
    }
    for (int64_t i = 0; i < hd; i++) out[i] /= sum;
}

static __thread float *step_buf; static __thread size_t step_cap;

typedef struct { float *h, *q, *k, *v, *att, *o, *g, *u, *scores, *xe, *ye, *router; int64_t scores_stride; } bufs;

/* rows [e * n, (e + 1) * n) of a stacked expert tensor, n = rows / n_expert */
static ocula_lin expert_rows(const ocula_lin *l, int e, int n_expert) {
    ocula_lin r = *l;
    r.rows = l->rows / n_expert;
    r.w = l->w + (int64_t)e * r.rows * l->rb;
    return r;
}

/* per token: the n_used experts with the largest gate probabilities (descending) and their weights */
static void moe_route(const ocula_moe *M, const float *logits, int *ids, float *weights) {
    int E = M->n_expert, k = M->n_used;
    float p[E], mx = -INFINITY, sum = 0.f;
    if (M->gating == 0) {  /* softmax in float32 over all experts, as the reference model does */
        for (int e = 0; e < E; e++) if (logits[e] > mx) mx = logits[e];
        for (int e = 0; e < E; e++) { p[e] = expf(logits[e] - mx); sum += p[e]; }
        for (int e = 0; e < E; e++) p[e] /= sum;
    } else {
        for (int e = 0; e < E; e++) p[e] = 1.f / (1.f + expf(-logits[e]));
    }
    float total = 0.f;
    for (int j = 0; j < k; j++) {  /* k passes of a max: k is small; ties go to the lower expert id */
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best; weights[j] = p[best]; total += p[best];
    }
    for (int j = 0; j < k; j++) weights[j] = (M->norm_topk ? weights[j] / total : weights[j]) * M->weights_scale;
}

/* Expert e's down(act(gate(x)) * up(x)) for the n rows of xe into ye [n, d]; g, u: [n, 2 ff] of scratch */
static int expert_ffn(const ocula_step *st, const ocula_moe *M, int e, int64_t n, const float *xe, float *g,
                      float *u, float *ye) {
    int64_t E = M->n_expert, ff = (M->fused_gate_up ? M->gate.rows / 2 : M->gate.rows) / E;
    ocula_lin gate = expert_rows(&M->gate, e, (int)E), down = expert_rows(&M->down, e, (int)E);
    int rc;
    if (M->fused_gate_up) {
        if ((rc = lin(&gate, xe, n, g, st))) return rc;  /* [n, 2 ff]: gate then up per row */
        for (int64_t i = 0; i < n; i++) {
            memcpy(u + i * ff, g + i * 2 * ff + ff, (size_t)ff * 4);
            memmove(g + i * ff, g + i * 2 * ff, (size_t)ff * 4);
        }
    } else {
        ocula_lin up = expert_rows(&M->up, e, (int)E);
        if ((rc = lin(&gate, xe, n, g, st)) || (rc = lin(&up, xe, n, u, st))) return rc;
    }
    for (int64_t i = 0; i < n * ff; i++) g[i] = act_f32(g[i], 0) * u[i];
    return lin(&down, g, n, ye, st);
}

/* out[B, d] = sum over each token's chosen experts of weight * expert(h), tokens grouped by expert: each
 * active expert's rows are read once for all the tokens that chose it; sums in expert order. */
static int moe_ffn(const ocula_step *st, const ocula_moe *M, int li, int64_t B, const bufs *m, float *out) {
    int64_t d = st->d, E = M->n_expert, k = M->n_used;
    int ids[B * k]; float w[B * k];
    int rc = lin(&M->router, m->h, B, m->router, st);
    if (rc) return rc;
    for (int64_t b = 0; b < B; b++) moe_route(M, m->router + b * E, ids + b * k, w + b * k);
    memset(out, 0, (size_t)(B * d) * 4);
    int64_t rows[B]; float rw[B];
    for (int e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t i = 0; i < B * k; i++)
            if (ids[i] == e) { rows[n] = i / k; rw[n] = w[i]; n++; }
        if (!n) continue;
        if (st->expert_rows) st->expert_rows[li * st->moe_experts + e] += (int32_t)n;
        for (int64_t i = 0; i < n; i++) memcpy(m->xe + i * d, m->h + rows[i] * d, (size_t)d * 4);
        if ((rc = expert_ffn(st, M, e, n, m->xe, m->g, m->u, m->ye))) return rc;
        for (int64_t i = 0; i < n; i++) {
            float *o = out + rows[i] * d; const float *y = m->ye + i * d;
            for (int64_t j = 0; j < d; j++) o[j] += rw[i] * y[j];
        }
    }
    return 0;
}

/* Prefill: out[N, d] += the weighted outputs of the experts that at most max_rows (<= MAXT) of the N tokens
 * chose (ids, w: [N, k], from the caller's routing); the other experts are left to the caller's GEMMs. The
 * threads take whole experts (each multiplies its own single-threaded: no fork/join per mat-vec), and each
 * token's results are added in the order of its k choices. Nonzero on failure. */
int ocula_moe_experts(const ocula_step *st, const ocula_moe *M, const float *h, int64_t N, const int32_t *ids,
                      const float *w, int64_t max_rows, float *out) {
    int64_t d = st->d, E = M->n_expert, k = M->n_used, NK = N * k;
    int64_t ff2 = (M->fused_gate_up ? M->gate.rows : 2 * M->gate.rows) / E;
    if (max_rows < 1 || max_rows > MAXT) return -1;
    int64_t *count = calloc((size_t)(2 * E + 1), 8), *order = malloc((size_t)NK * 8);
    int64_t *first = count + E, *small = NULL, *slot = malloc((size_t)NK * 8);
    float *slots = NULL;  /* one row per (token, choice) of a light expert: at most E * max_rows rows */
    int failed = !count || !order || !slot;
    for (int64_t i = 0; i < NK && !failed; i++) {
        if (ids[i] < 0 || ids[i] >= E) failed = 1; else count[ids[i]]++;
    }
    int64_t n_small = 0;
    if (!failed) {
        for (int64_t e = 0, at = 0; e < E; e++) { first[e] = at; at += count[e]; }
        int64_t fill[E];
        memcpy(fill, first, (size_t)E * 8);
        for (int64_t i = 0; i < NK; i++) order[fill[ids[i]]++] = i;
        small = malloc((size_t)E * 8);
        failed = !small;
        int64_t n_slots = 0;
        for (int64_t i = 0; i < NK; i++) slot[i] = -1;
        for (int64_t e = 0; e < E && !failed; e++)
            if (count[e] && count[e] <= max_rows) {
                small[n_small++] = e;
                for (int64_t i = 0; i < count[e]; i++) slot[order[first[e] + i]] = n_slots++;
            }
        if (!failed && n_slots && !(slots = malloc((size_t)(n_slots * d) * 4))) failed = 1;
    }
    ocula_step one = *st;
    one.nthreads = 1;
    int bad = failed;  /* each thread's own failure, or-ed together at the end of the region */
    #pragma omp parallel if(!failed && st->nthreads > 1 && n_small > 1) num_threads(st->nthreads) reduction(|:bad)
    {
        FLUSH_DENORMALS;
        float *buf = bad ? NULL : aligned_alloc(64, (size_t)(max_rows * (2 * d + 2 * ff2) + 16) * 4);
        bad |= !buf;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < n_small; j++) {
            if (bad) continue;
            int64_t e = small[j], n = count[e];
            const int64_t *pairs = order + first[e];
            float *xe = buf, *ye = xe + max_rows * d, *g = ye + max_rows * d, *u = g + max_rows * ff2;
            for (int64_t i = 0; i < n; i++) memcpy(xe + i * d, h + pairs[i] / k * d, (size_t)d * 4);
            if (expert_ffn(&one, M, (int)e, n, xe, g, u, ye)) { bad = 1; continue; }
            for (int64_t i = 0; i < n; i++) {
                float *o = slots + slot[pairs[i]] * d, wi = w[pairs[i]];
                const float *y = ye + i * d;
                for (int64_t c = 0; c < d; c++) o[c] = wi * y[c];
            }
        }
        free(buf);
        RESTORE_FP_MODE;
    }
    failed |= bad;
    if (!failed)  /* each token's results in the order of its choices */
        for (int64_t i = 0; i < NK; i++)
            if (slot[i] >= 0) {
                float *o = out + i / k * d; const float *y = slots + slot[i] * d;
                for (int64_t c = 0; c < d; c++) o[c] += y[c];
            }
    free(count); free(order); free(slots); free(slot); free(small);
    return failed ? -2 : 0;
}

static int dense_act_down(const ocula_step *st, const ocula_layer *L, int64_t B, const bufs *m);

static int layer_step(const ocula_step *st, const ocula_layer *L, int li, const ocula_seq *seqs, int64_t B,
                      float *x, const bufs *m) {
    int64_t d = st->d, hd = st->head_dim, H = st->n_head, Hk = st->n_kv, rep = H / Hk;
    int64_t qn = H * hd, kn = Hk * hd;
    int rc = 0;
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * d, L->attn_norm, d, st->eps, m->h + b * d);
    if ((rc = lin(&L->q, m->h, B, m->q, st)) || (rc = lin(&L->k, m->h, B, m->k, st)) ||
        (rc = lin(&L->v, m->h, B, m->v, st))) return rc;
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) {
        const ocula_seq *sq = &seqs[b];
        float *q = m->q + b * qn, *k = m->k + b * kn, *v = m->v + b * kn;
        if (L->q_norm) {
            for (int64_t i = 0; i < H; i++) rms_norm(q + i * hd, L->q_norm, hd, st->eps, q + i * hd);
            for (int64_t i = 0; i < Hk; i++) rms_norm(k + i * hd, L->k_norm, hd, st->eps, k + i * hd);
        }
        const float *c = L->sliding && sq->cos_local ? sq->cos_local : sq->cos;
        const float *s = L->sliding && sq->sin_local ? sq->sin_local : sq->sin;
        rope(q, H, hd, st->n_rot, st->neox, c, s);
        rope(k, Hk, hd, st->n_rot, st->neox, c, s);
        for (int64_t i = 0; i < Hk; i++) {
            kv_store(sq->kc[li], st->kv_type, (i * sq->cap[li] + sq->pos) * hd, k + i * hd, hd);
            kv_store(sq->vc[li], st->kv_type, (i * sq->cap[li] + sq->pos) * hd, v + i * hd, hd);
        }
        work += H * (sq->pos + 1) * hd;
    }
    int par = st->nthreads > 1 && work >= st->attn_par_min;
    #pragma omp parallel if(par) num_threads(st->nthreads)
    {
        FLUSH_DENORMALS;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, i = bh % H;
            const ocula_seq *sq = &seqs[b];
            int64_t first = L->sliding && st->window > 0 && sq->pos >= st->window ? sq->pos - st->window + 1 : 0;
            attend_head(st, sq->kc[li], sq->vc[li], sq->cap[li], first, sq->pos, i / rep, m->q + b * qn + i * hd,
                        m->scores + bh * m->scores_stride, m->att + b * qn + i * hd);
        }
        RESTORE_FP_MODE;
    }
    if ((rc = lin(&L->o, m->att, B, m->o, st))) return rc;
    for (int64_t b = 0; b < B; b++) {
        float *o = m->o + b * d, *xb = x + b * d;
        if (L->post_attn_norm) rms_norm(o, L->post_attn_norm, d, st->eps, o);
        for (int64_t i = 0; i < d; i++) xb[i] += o[i];
        rms_norm(xb, L->ffn_norm, d, st->eps, m->h + b * d);
    }
    if (L->moe.n_expert) {
        if ((rc = moe_ffn(st, &L->moe, li, B, m, m->o))) return rc;
    } else {
        if ((rc = lin(&L->gate, m->h, B, m->g, st)) || (rc = lin(&L->up, m->h, B, m->u, st))) return rc;
        if ((rc = dense_act_down(st, L, B, m))) return rc;
    }
    for (int64_t b = 0; b < B; b++) {
        float *o = m->o + b * d, *xb = x + b * d;
        if (L->post_ffw_norm) rms_norm(o, L->post_ffw_norm, d, st->eps, o);
        for (int64_t i = 0; i < d; i++) xb[i] += o[i];
    }
    return 0;
}

static int dense_act_down(const ocula_step *st, const ocula_layer *L, int64_t B, const bufs *m) {
    int64_t ff = st->n_ff;
    int64_t n_act = B * ff;
    float *g = m->g, *u = m->u;
    #pragma omp parallel if(st->nthreads > 1 && n_act >= 4096) num_threads(st->nthreads)
    {
        FLUSH_DENORMALS;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n_act; i++) g[i] = act_f32(g[i], st->gelu) * u[i];
        RESTORE_FP_MODE;
    }
    return lin(&L->down, m->g, B, m->o, st);
}

/* x[B, d] (float32, updated in place) through layers[0..n) for B sequences of one new token each (B <=
 * MAXT): each token's keys/values are written at index pos of its sequence's caches. Nonzero if a
 * weight type has no kernel or memory runs out (the caches may then hold a partial step). */
int ocula_decode_step(const ocula_step *st, const ocula_layer *layers, int n, const ocula_seq *seqs, int64_t B,
                      float *x) {
    if (B < 1 || B > MAXT) return -1;
    int64_t d = st->d, hd = st->head_dim, qn = st->n_head * hd, kn = st->n_kv * hd, S = 0;
    int64_t ff = st->n_ff > st->moe_ff ? st->n_ff : st->moe_ff;
    for (int64_t b = 0; b < B; b++) if (seqs[b].pos + 1 > S) S = seqs[b].pos + 1;
    S = (S + 15) & ~(int64_t)15;
    int64_t sizes[12] = {B * d, B * qn, B * kn, B * kn, B * qn, B * d, B * ff, B * ff, B * st->n_head * S,
                         st->moe_experts ? B * d : 0, st->moe_experts ? B * d : 0, B * st->moe_experts};
    size_t need = 0;
    for (int i = 0; i < 12; i++) need += (size_t)((sizes[i] + 15) & ~(int64_t)15);
    if (need > step_cap) {
        free(step_buf); step_cap = 0;
        if (!(step_buf = aligned_alloc(64, need * 4))) return -2;
        step_cap = need;
    }
    float *p = step_buf;  /* each buffer starts on a 64-byte boundary */
    bufs m = {.scores_stride = S};
    float **order[12] = {&m.h, &m.q, &m.k, &m.v, &m.att, &m.o, &m.g, &m.u, &m.scores, &m.xe, &m.ye, &m.router};
    for (int i = 0; i < 12; i++) { *order[i] = p; p += (sizes[i] + 15) & ~(int64_t)15; }
    FLUSH_DENORMALS;  /* this thread's norms and residual sums too */
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) rc = layer_step(st, &layers[i], i, seqs, B, x, &m);
    RESTORE_FP_MODE;
    return rc;
}

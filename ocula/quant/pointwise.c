/* Element-wise kernels of the decoders' MLPs, appended to kernels.c by kernels.py, with the exp and
 * bfloat16 conversions that attention.c and decode_step.c (appended after it) use too. Plain loops
 * that the compiler vectorizes (no library calls inside). */
#include <math.h>

/* Denormal floats (below 1.2e-38) cost x86 CPUs a microcode assist per operation. A softmax's smallest
 * probabilities times values (e^-87 x 0.5) are denormal: decode steps of Gemma-3-4B took 110-130 ms
 * instead of 75-85 from some positions on. The softmax and activation kernels set MXCSR's
 * flush-to-zero and denormals-are-zero bits in each thread while they run and give the caller's back. */
#if defined(__SSE2__)
#include <xmmintrin.h>
#define FLUSH_DENORMALS const unsigned int fp_mode_ = _mm_getcsr(); _mm_setcsr(fp_mode_ | 0x8040)
#define RESTORE_FP_MODE _mm_setcsr(fp_mode_)
#else
#define FLUSH_DENORMALS do {} while (0)
#define RESTORE_FP_MODE do {} while (0)
#endif

/* e^x for float32, Cephes' expf method: x = n ln2 + f with |f| <= ln2 / 2, e^f by a degree-7
 * polynomial, 2^n put into the exponent bits; ~1 ulp. x is clamped to [-87.34, 88.38], where both
 * e^x and 2^n stay normal numbers. */
static inline float exp_f32(float x) {
    x = x < -87.336544f ? -87.336544f : x;  /* two selects, not one nested: GCC if-converts (vectorizes) these */
    x = x > 88.376259f ? 88.376259f : x;
    float t = x * 1.44269504088896341f + 12582912.f;  /* 1.5 * 2^23: rounds x log2(e) to an integer */
    int32_t n = (int32_t)(bits_f32(t) - bits_f32(12582912.f));
    float nf = t - 12582912.f;
    float f = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    return f32_bits(bits_f32(p) + ((uint32_t)n << 23));
}

/* act 0: SiLU, x sigmoid(x); 1: GELU with the tanh approximation, 0.5 x (1 + tanh(z)) = x sigmoid(2 z)
 * with z = sqrt(2 / pi) (x + 0.044715 x^3); 2: quick GELU, x sigmoid(1.702 x); 3: GELU,
 * 0.5 x (1 + erf(x / sqrt(2))), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7). */
static inline float act_f32(float x, int act) {
    if (act == 3) {
        float z = x * 0.70710678118654752f, az = fabsf(z), t = 1.f / (1.f + 0.3275911f * az);
        float e = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f)
                  * t * exp_f32(-az * az);  /* erfc(|z|): 1 + erf(z) is 2 - e above 0, e below */
        return 0.5f * x * (z >= 0.f ? 2.f - e : e);
    }
    float z = act == 1 ? 1.5957691216057308f * (x + 0.044715f * x * x * x) : act == 2 ? 1.702f * x : x;
    return x / (1.f + exp_f32(-z));
}

static inline float bf16_f32(uint16_t h) { return f32_bits((uint32_t)h << 16); }
static inline uint16_t f32_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t u = bits_f32(f);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                          : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* y[i] = act(x[i]) * u[i] (u NULL: act(x[i])) for i in [a, z); one loop per activation, with the
 * activation a constant, so that each vectorizes */
#define ACT_LOOPS(LOAD, STORE)                                                                        \
    switch (act) {                                                                                \
    case 0: if (u) for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 0) * LOAD(u[i])); \
            else for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 0)); break;          \
    case 1: if (u) for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 1) * LOAD(u[i])); \
            else for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 1)); break;          \
    case 2: for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 2)); break;               \
    default: for (int64_t i = a; i < z; i++) y[i] = STORE(act_f32(LOAD(x[i]), 3)); break;              \
    }
#define SAME(v) (v)
static void act_f32s(const float *x, const float *u, float *y, int64_t a, int64_t z, int act) { ACT_LOOPS(SAME, SAME) }
static void act_bf16s(const uint16_t *x, const uint16_t *u, uint16_t *y, int64_t a, int64_t z, int act) {
    ACT_LOOPS(bf16_f32, f32_bf16)
}
#undef SAME

/* y[i] = act(x[i]) * u[i] (u NULL: act(x[i]); gated only for SiLU and tanh-GELU) for n float32 (bf16 =
 * 0) or bfloat16 values, computed in float32 and rounded once; y may be x. */
void ocula_act(const void *x, const void *u, void *y, int64_t n, int bf16, int act, int nthreads) {
    if (nthreads < 1 || n < (1 << 15)) nthreads = 1;
    #pragma omp parallel num_threads(nthreads) if(nthreads > 1)
    {
        FLUSH_DENORMALS;
        int64_t parts = 1, k = 0;
#ifdef _OPENMP
        parts = omp_get_num_threads(); k = omp_get_thread_num();
#endif
        int64_t step = ((n + parts - 1) / parts + 63) & ~(int64_t)63;
        int64_t a = k * step, z = a + step < n ? a + step : n;
        if (a < z) {
            if (bf16) act_bf16s((const uint16_t *)x, (const uint16_t *)u, (uint16_t *)y, a, z, act);
            else act_f32s((const float *)x, (const float *)u, (float *)y, a, z, act);
        }
        RESTORE_FP_MODE;
    }
}

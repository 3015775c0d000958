/* The activations the fused kernels apply in their epilogues, fp32, AVX-512, by code (one
 * list, mirrored by convgap.kernels.cpu.common.ACTIVATIONS: keep both in the same order):
 *
 *   ACT_NONE   x
 *   ACT_RELU   max(x, 0)
 *   ACT_RELU6  min(max(x, 0), 6)
 *   ACT_SILU   x * sigmoid(x) = x / (1 + exp(-x))   (about 2e-7 relative error)
 *   ACT_SIGMOID 1 / (1 + exp(-x))                    (about 2e-7 relative error)
 */
#ifndef CONVGAP_ACT_H
#define CONVGAP_ACT_H
#include <immintrin.h>

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_RELU6 2
#define ACT_SILU 3
#define ACT_SIGMOID 4

/* exp(x) for x in [-80, 80] (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, ln2 in two parts so
 * n ln2 is exact; exp(r) a degree-5 polynomial, about 1 ulp; 2^n by vscalefps) */
static inline __attribute__((always_inline)) __m512 exp_ps(__m512 x)
{
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 1 / (1 + exp(-x)), the exponent clamped to [-80, 80] (the result is 0 or 1 to float
 * precision past that), so no input makes an inf, nor a denormal; a NaN stays NaN (vminps
 * and vmaxps return their second operand where either is NaN). The division is a
 * reciprocal estimate (14 bits) and one Newton step. */
static inline __attribute__((always_inline)) __m512 sigmoid_ps(__m512 x)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(-80.0f),
                                   _mm512_min_ps(_mm512_set1_ps(80.0f), x));
    const __m512 den = _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), t)));
    const __m512 inv = _mm512_rcp14_ps(den);
    return _mm512_fmadd_ps(inv, _mm512_fnmadd_ps(den, inv, one), inv);
}

/* x * sigmoid(x): 0 below -80 (where the result is under 2e-33 in magnitude), x past 80; a
 * NaN is kept */
static inline __attribute__((always_inline)) __m512 silu_ps(__m512 x)
{
    const __m512 low = _mm512_set1_ps(-80.0f);
    /* lanes not below -80 (a NaN is kept) */
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, low, _CMP_NLT_UQ), x, sigmoid_ps(x));
}

/* act (an ACT_ code) of 16 floats; a NaN stays NaN (vmaxps and vminps return their second
 * operand where either is NaN) */
static inline __attribute__((always_inline)) __m512 activate(int act, __m512 x)
{
    switch (act) {
    case ACT_RELU: return _mm512_max_ps(_mm512_setzero_ps(), x);
    case ACT_RELU6:
        return _mm512_min_ps(_mm512_set1_ps(6.0f), _mm512_max_ps(_mm512_setzero_ps(), x));
    case ACT_SILU: return silu_ps(x);
    case ACT_SIGMOID: return sigmoid_ps(x);
    default: return x;
    }
}

/* p[0, n) = act(p[0, n)), n a multiple of 16 (one loop per code) */
#define ACT_LOOP(A) \
    for (long i = 0; i < n; i += 16) _mm512_storeu_ps(p + i, activate(A, _mm512_loadu_ps(p + i)))
__attribute__((unused)) static void activate_floats(int act, float *p, long n)
{
    switch (act) {
    case ACT_RELU: ACT_LOOP(ACT_RELU); break;
    case ACT_RELU6: ACT_LOOP(ACT_RELU6); break;
    case ACT_SILU: ACT_LOOP(ACT_SILU); break;
    case ACT_SIGMOID: ACT_LOOP(ACT_SIGMOID); break;
    default: break;
    }
}
#undef ACT_LOOP
#endif

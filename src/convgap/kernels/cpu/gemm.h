/* The GEMM core shared by convgap's C kernels: fp32, AVX-512, a packed right operand.
 *
 *   C (M x N, row stride ldc) [=|+=] sum over taps t of A_t (M x K, row stride lda) @ B_t
 *
 * A_t is A shifted by offs[t] floats: a convolution's filter taps over a zero-padded window
 * of a channels-innermost map are such shifted views, so one call is an implicit-GEMM
 * convolution (taps = 1, offs = {0}: a plain GEMM). B is packed by pack_b: panels of 64
 * columns (the last rounded up to 16), each holding, tap after tap, K rows of its width.
 * Register blocks: 6 rows x 4 vectors, or 12 rows x 2 vectors for panels up to 32 wide
 * (24 accumulators either way). */
#ifndef CONVGAP_GEMM_H
#define CONVGAP_GEMM_H
#include <immintrin.h>

#define PANEL 64

static inline __attribute__((always_inline)) void ukr(const int mr, const int nv, int K,
        int taps, const long *offs, const float *A, long lda, const float *P, float *C,
        long ldc, const float *bias, __mmask16 last)
{
    __m512 acc[12][4];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++)
            acc[i][v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int t = 0; t < taps; t++) {
        const float *At = A + offs[t], *Pt = P + (long)t * K * nv * 16;
        for (int k = 0; k < K; k++) {
            __m512 b[4];
            for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_ps(Pt + (long)k * nv * 16 + 16 * v);
            for (int i = 0; i < mr; i++) {
                __m512 a = _mm512_set1_ps(At[i * lda + k]);
                for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        for (int v = 0; v < nv - 1; v++) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
        _mm512_mask_storeu_ps(C + i * ldc + 16 * (nv - 1), last, acc[i][nv - 1]);
    }
}

typedef void (*ukr_fn)(int, int, const long *, const float *, long, const float *, float *,
                       long, const float *, __mmask16);
#define UKR(m, n) static void ukr_##m##_##n(int K, int taps, const long *offs, \
        const float *A, long lda, const float *P, float *C, long ldc, const float *bias, \
        __mmask16 last) { ukr(m, n, K, taps, offs, A, lda, P, C, ldc, bias, last); }
#define UKR4(m) UKR(m, 1) UKR(m, 2) UKR(m, 3) UKR(m, 4)
#define UKR2(m) UKR(m, 1) UKR(m, 2)
UKR4(1) UKR4(2) UKR4(3) UKR4(4) UKR4(5) UKR4(6)
UKR2(7) UKR2(8) UKR2(9) UKR2(10) UKR2(11) UKR2(12)
#define ROW4(m) {ukr_##m##_1, ukr_##m##_2, ukr_##m##_3, ukr_##m##_4}
#define ROW2(m) {ukr_##m##_1, ukr_##m##_2, 0, 0}
static const ukr_fn UKRS[12][4] = {ROW4(1), ROW4(2), ROW4(3), ROW4(4), ROW4(5), ROW4(6),
                                   ROW2(7), ROW2(8), ROW2(9), ROW2(10), ROW2(11), ROW2(12)};

/* Floats of a packed (taps x K x N) operand. */
long packed_floats(int taps, int K, int N) { return (long)taps * K * ((N + 15) / 16 * 16); }

/* out <- B (taps x K x N; element (t, k, n) at B[t * st + k * sk + n * sn]) in panels of
 * 64 columns, each panel taps x K rows of its width, zeros past N. */
void pack_b(const float *B, int taps, int K, int N, long st, long sk, long sn, float *out)
{
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        int nw = N - n0 < PANEL ? N - n0 : PANEL, width = (nw + 15) / 16 * 16;
        float *p = out + (long)n0 * K * taps;
        for (int t = 0; t < taps; t++)
            for (int k = 0; k < K; k++)
                for (int n = 0; n < width; n++)
                    p[((long)t * K + k) * width + n] =
                        n < nw ? B[t * st + k * sk + (n0 + n) * sn] : 0.0f;
    }
}

/* C (M x N) = sum_t A_t @ B_t (+ bias, padded to 16; NULL: none); see the top. */
static void gemm_taps(int M, int N, int K, int taps, const long *offs, const float *A,
                      long lda, const float *Bp, const float *bias, float *C, long ldc)
{
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        int nw = N - n0 < PANEL ? N - n0 : PANEL, nv = (nw + 15) / 16;
        int mr_max = nv <= 2 ? 12 : 6;
        __mmask16 last = (nw % 16) ? (__mmask16)((1u << (nw % 16)) - 1) : (__mmask16)0xFFFF;
        const float *P = Bp + (long)n0 * K * taps, *bb = bias ? bias + n0 : 0;
        for (int m0 = 0; m0 < M; m0 += mr_max) {
            int mr = M - m0 < mr_max ? M - m0 : mr_max;
            UKRS[mr - 1][nv - 1](K, taps, offs, A + m0 * lda, lda, P, C + m0 * ldc + n0,
                                 ldc, bb, last);
        }
    }
}

static const long NO_OFFSET[1] = {0};

/* C (M x N) = A (M x K) @ packed B (+ bias) */
static void gemm(int M, int N, int K, const float *A, long lda, const float *Bp,
                 const float *bias, float *C, long ldc)
{
    gemm_taps(M, N, K, 1, NO_OFFSET, A, lda, Bp, bias, C, ldc);
}
#endif

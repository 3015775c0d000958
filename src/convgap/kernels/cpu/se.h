/* A squeeze-excitation's gate, shared by the kernels that run one (pdp.c's MBConv, stem.c's
 * stem block): from an image's channel means, gate = gate_act(se_act(mean @ wr^T + br) @ wu
 * + bu), fp32, AVX-512. */
#ifndef CONVGAP_SE_H
#define CONVGAP_SE_H
#include "act.h"

/* mean (Rp floats) = the sum over nt threads' channel sums (image n's Rp floats at
 * sums + t * each + n * Rp) / pixels; lanes past the R real channels 0. */
static inline void se_mean(const float *sums, int nt, long each, int n, int R, int Rp,
                           float pixels, float *mean)
{
    const __m512 inv = _mm512_set1_ps(1.0f / pixels);
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int t = 0; t < nt; t++)
            acc = _mm512_add_ps(acc, _mm512_loadu_ps(sums + t * each + (long)n * Rp + c0));
        const __mmask16 keep = R - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (R - c0)) - 1);
        _mm512_storeu_ps(mean + c0, _mm512_maskz_mul_ps(keep, acc, inv));
    }
}

/* mean: Rp floats (Rp a multiple of 16; lanes past the real channels multiply zero
 * weights); wr, wu: S x Rp row-major; br: S floats rounded up to 16; bu: Rp floats;
 * s: S rounded up to 16 floats of scratch; gate: Rp floats out (may be mean itself: mean
 * is read whole before gate is written). */
static inline void se_gate(const float *mean, const float *wr, const float *br,
                           const float *wu, const float *bu, int S, int Rp, int se_act,
                           int gate_act, float *s, float *gate)
{
    for (int j = 0; j < S; j++) {
        __m512 acc = _mm512_setzero_ps();
        for (int c0 = 0; c0 < Rp; c0 += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(mean + c0),
                                  _mm512_loadu_ps(wr + (long)j * Rp + c0), acc);
        s[j] = _mm512_reduce_add_ps(acc) + br[j];
    }
    for (int j = S; j < (S + 15) / 16 * 16; j++) s[j] = 0.0f;
    activate_floats(se_act, s, (S + 15) / 16 * 16);
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        __m512 acc = _mm512_loadu_ps(bu + c0);
        for (int j = 0; j < S; j++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(wu + (long)j * Rp + c0),
                                  acc);
        _mm512_storeu_ps(gate + c0, activate(gate_act, acc));
    }
}
#endif

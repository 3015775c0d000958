/* Fused pointwise -> convolution(s) -> pointwise, fp32, NHWC, AVX-512: the shape of Tucker-2
 * and tensor-train factorized convolutions.
 *
 *   u  = x @ A                         (1x1 conv, C -> R1 channels)
 *   v1 = conv(u, K1)                   (kh1 x kw1, R1 -> R2; stride, dilation, zero padding)
 *   v2 = conv(v1, K2), or v2 = v1      (1 x kw2 along rows, R2 -> R3; stride, dilation, pad)
 *   y  = v2 @ B + bias                 (1x1 conv, R3 -> O channels)
 *
 * With Z > 1 (tensor ring), each map holds Z groups of channels (u: Z x R1 per pixel) and
 * both convolutions apply one filter to every group (the ring bond): the GEMM rows are
 * (pixel, group) pairs, which sit at a uniform stride when the groups are packed tightly
 * and the convolution's stride along the width is 1.
 *
 * As in pdp.c, each thread walks a contiguous range of output rows in bands and keeps a
 * sliding window of u rows in its scratch. Here the window is stored zero-padded (rows above
 * and below the image, columns left and right), so each convolution is an implicit GEMM: its
 * taps are shifted views of the window (gemm.h), with no border tests. NCHW maps are read and
 * written in place as in pdp.c. */
#include <string.h>
#include <omp.h>

#include "args.h"
#include "bands.h"
#include "gemm.h"

ARGS_LAYOUT(PcpArgs, PCP_ARGS)

typedef struct {
    int w1;              /* width after the first convolution */
    int r1p, r2p, r3p;   /* floats per pixel of u, v1, v2: channels rounded up to 16; with
                            groups, Z x channels exactly */
    int wp1, wp2;        /* padded widths of the u window and of the v1 band */
    int rows1;           /* rows of the u window */
    long u, v1, v2, t;   /* floats of each buffer (t: the output band, for NCHW) */
} Sizes;

static int r16(int n) { return (n + 15) / 16 * 16; }

static Sizes sizes(const PcpArgs *g)
{
    Sizes s;
    s.w1 = (g->w + 2 * g->pw1 - g->dw1 * (g->kw1 - 1) - 1) / g->sw1 + 1;
    const int z = g->z;
    s.r1p = z > 1 ? z * g->r1 : r16(g->r1);
    s.r2p = z > 1 ? z * g->r2 : r16(g->r2);
    s.r3p = z > 1 ? z * g->r3 : r16(g->r3);
    int right1 = (s.w1 - 1) * g->sw1 + (g->kw1 - 1) * g->dw1 + 1 - g->pw1 - g->w;
    s.wp1 = g->pw1 + g->w + (right1 > 0 ? right1 : 0);
    s.rows1 = (g->th - 1) * g->sh1 + (g->kh1 - 1) * g->dh1 + 1;
    s.wp2 = 0;
    if (g->kw2) {
        int right2 = (g->ow - 1) * g->sw2 + (g->kw2 - 1) * g->dw2 + 1 - g->pw2 - s.w1;
        s.wp2 = g->pw2 + s.w1 + (right2 > 0 ? right2 : 0);
    }
    s.u = (long)s.rows1 * s.wp1 * s.r1p;
    s.v1 = g->kw2 ? (long)g->th * s.wp2 * s.r2p : 0;
    s.v2 = (long)g->th * g->ow * s.r3p;
    s.t = g->nchw ? (long)g->th * g->ow * g->o : 0;
    return s;
}

/* Floats of scratch one thread needs, in whole cache lines (bands.h). */
long scratch_floats(const PcpArgs *g)
{
    Sizes s = sizes(g);
    return whole_lines(s.u + s.v1 + s.v2 + s.t);
}

/* g: the weights and the geometry (args.h's PcpArgs). x: (N, H, W, C) contiguous, or (N, C, H,
 * W) with g->nchw (y alike); g->a: pack_b of A (C x Z R1, group-major); g->k1: pack_b of the
 * first filter (kh1 * kw1 taps x R1 x R2); g->k2: pack_b of the second (kw2 taps x R2 x R3) or
 * NULL (g->kw2 = 0); g->b: pack_b of B (Z R3 x O, group-major); with Z > 1 both width strides
 * must be 1; g->bias: O rounded up to 16 floats, or NULL; y: (N, OH, OW, O) contiguous;
 * scratch: threads x scratch_floats(g). */
void pcp_forward(const PcpArgs *g, const float *x, float *y, float *scratch, int threads)
{
    const float *Ap = g->a, *K1p = g->k1, *K2p = g->k2, *Bp = g->b, *bias = g->bias;
    const Sizes s = sizes(g);
    const int N = g->n, H = g->h, W = g->w, C = g->c, O = g->o;
    const int OH = g->oh, OW = g->ow, TH = g->th;
    const int sh1 = g->sh1, ph1 = g->ph1, pw1 = g->pw1;
    const int taps1 = g->kh1 * g->kw1, kw2 = g->kw2, Z = g->z, nchw = g->nchw;
    /* GEMM rows of each convolution: output pixels (x groups), at a uniform stride */
    const long lda1 = Z > 1 ? g->r1 : (long)g->sw1 * s.r1p;
    const long ldc1 = Z > 1 ? (kw2 ? g->r2 : g->r3) : (kw2 ? s.r2p : s.r3p);
    const long lda2 = Z > 1 ? g->r2 : (long)g->sw2 * s.r2p;
    const long ldc2 = Z > 1 ? g->r3 : s.r3p;
    const long per = scratch_floats(g), row1 = (long)s.wp1 * s.r1p;
    long offs1[taps1], offs2[kw2 > 0 ? kw2 : 1];
    for (int i = 0; i < g->kh1; i++)
        for (int j = 0; j < g->kw1; j++)
            offs1[i * g->kw1 + j] = (long)i * g->dh1 * row1 + (long)j * g->dw1 * s.r1p;
    for (int j = 0; j < kw2; j++) offs2[j] = (long)j * g->dw2 * s.r2p;
    const long total = (long)N * OH;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *u = scratch + per * t, *v1 = u + s.u, *v2 = v1 + s.v1, *tile = v2 + s.v2;
        memset(u, 0, sizeof(float) * (s.u + s.v1));  /* the zero padding */
        Walk wk = walk_start(total, t, nt);
        int n, oh, th;
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            int lo = oh * sh1, hi = (oh + th - 1) * sh1 + (g->kh1 - 1) * g->dh1 + 1;
            int drop = slide(&wk, n, lo);  /* the window: padded rows [ulo, uhi) */
            if (drop) memmove(u, u + drop * row1, sizeof(float) * (wk.hi - wk.lo) * row1);
            const int ulo = wk.lo, uhi = wk.hi;
            for (int ip = uhi; ip < hi; ip++) {  /* new window rows: padded row ip */
                float *row = u + (ip - ulo) * row1;
                int ih = ip - ph1;
                if (ih >= 0 && ih < H && nchw)
                    gemm_kmajor(W, Z * g->r1, C, x + ((long)n * C * H + ih) * W, (long)H * W,
                                Ap, 0, row + (long)pw1 * s.r1p, s.r1p, PF_X);
                else if (ih >= 0 && ih < H)
                    gemm(W, Z * g->r1, C, x + ((long)n * H + ih) * W * C, C, Ap, 0,
                         row + (long)pw1 * s.r1p, s.r1p, PF_X);
                else
                    memset(row, 0, sizeof(float) * row1);
            }
            if (hi > uhi) wk.hi = hi;
            for (int r = 0; r < th; r++) {  /* first convolution, one output row at a time */
                const float *a = u + ((long)(oh + r) * sh1 - ulo) * row1;
                float *dst = kw2 ? v1 + ((long)r * s.wp2 + g->pw2) * s.r2p
                                 : v2 + (long)r * OW * s.r3p;
                gemm_taps(s.w1 * Z, g->r2, g->r1, taps1, offs1, a, lda1, K1p, 0, dst, ldc1, 0);
            }
            for (int r = 0; kw2 && r < th; r++)  /* second convolution, along rows */
                gemm_taps(OW * Z, g->r3, g->r2, kw2, offs2, v1 + (long)r * s.wp2 * s.r2p,
                          lda2, K2p, 0, v2 + (long)r * OW * s.r3p, ldc2, 0);
            if (nchw) {  /* the band in NHWC, then into the output's planes */
                gemm(th * OW, O, Z * g->r3, v2, s.r3p, Bp, bias, tile, O, 0);
                store_planes(th * OW, O, tile, O, y + ((long)n * O * OH + oh) * OW,
                             (long)OH * OW);
            } else
                gemm(th * OW, O, Z * g->r3, v2, s.r3p, Bp, bias,
                     y + ((long)n * OH + oh) * OW * O, O, PF_C);
        }
    }
}

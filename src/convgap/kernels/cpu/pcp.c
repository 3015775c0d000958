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

#include "bands.h"
#include "gemm.h"

/* the integer arguments, in this order */
enum { G_N, G_H, G_W, G_C, G_R1, G_R2, G_R3, G_KH1, G_KW1, G_SH1, G_SW1, G_PH1, G_PW1,
       G_DH1, G_DW1, G_KW2, G_SW2, G_PW2, G_DW2, G_O, G_OH, G_OW, G_TH, G_Z, G_NCHW,
       G_COUNT };

typedef struct {
    int w1;              /* width after the first convolution */
    int r1p, r2p, r3p;   /* floats per pixel of u, v1, v2: channels rounded up to 16; with
                            groups, Z x channels exactly */
    int wp1, wp2;        /* padded widths of the u window and of the v1 band */
    int rows1;           /* rows of the u window */
    long u, v1, v2, t;   /* floats of each buffer (t: the output band, for NCHW) */
} Sizes;

static int r16(int n) { return (n + 15) / 16 * 16; }

static Sizes sizes(const int *g)
{
    Sizes s;
    s.w1 = (g[G_W] + 2 * g[G_PW1] - g[G_DW1] * (g[G_KW1] - 1) - 1) / g[G_SW1] + 1;
    const int z = g[G_Z];
    s.r1p = z > 1 ? z * g[G_R1] : r16(g[G_R1]);
    s.r2p = z > 1 ? z * g[G_R2] : r16(g[G_R2]);
    s.r3p = z > 1 ? z * g[G_R3] : r16(g[G_R3]);
    int right1 = (s.w1 - 1) * g[G_SW1] + (g[G_KW1] - 1) * g[G_DW1] + 1 - g[G_PW1] - g[G_W];
    s.wp1 = g[G_PW1] + g[G_W] + (right1 > 0 ? right1 : 0);
    s.rows1 = (g[G_TH] - 1) * g[G_SH1] + (g[G_KH1] - 1) * g[G_DH1] + 1;
    s.wp2 = 0;
    if (g[G_KW2]) {
        int right2 = (g[G_OW] - 1) * g[G_SW2] + (g[G_KW2] - 1) * g[G_DW2] + 1 - g[G_PW2] - s.w1;
        s.wp2 = g[G_PW2] + s.w1 + (right2 > 0 ? right2 : 0);
    }
    s.u = (long)s.rows1 * s.wp1 * s.r1p;
    s.v1 = g[G_KW2] ? (long)g[G_TH] * s.wp2 * s.r2p : 0;
    s.v2 = (long)g[G_TH] * g[G_OW] * s.r3p;
    s.t = g[G_NCHW] ? (long)g[G_TH] * g[G_OW] * g[G_O] : 0;
    return s;
}

/* Floats of scratch one thread needs. */
long scratch_floats(const int *g)
{
    Sizes s = sizes(g);
    return s.u + s.v1 + s.v2 + s.t + 64;
}

/* w: Ap, K1p, K2p, Bp, bias. x: (N, H, W, C) contiguous, or (N, C, H, W) with g[G_NCHW] (y alike);
 * Ap: pack_b of A (C x Z R1, group-major); K1p: pack_b of the first filter (kh1 * kw1 taps x R1 x
 * R2); K2p: pack_b of the second (kw2 taps x R2 x R3) or NULL (g[G_KW2] = 0); Bp: pack_b of B (Z
 * R3 x O, group-major); with Z > 1 both width strides must be 1; bias: O rounded up to 16 floats,
 * or NULL; y: (N, OH, OW, O) contiguous; scratch: threads x scratch_floats(g). */
void pcp_forward(const int *g, const float *x, const float *const *w, float *y,
                 float *scratch, int threads)
{
    /* the weights, one array (ctypes converts 4 fewer arguments a call) */
    const float *Ap = w[0], *K1p = w[1], *K2p = w[2], *Bp = w[3], *bias = w[4];
    const Sizes s = sizes(g);
    const int N = g[G_N], H = g[G_H], W = g[G_W], C = g[G_C], O = g[G_O];
    const int OH = g[G_OH], OW = g[G_OW], TH = g[G_TH];
    const int sh1 = g[G_SH1], ph1 = g[G_PH1], pw1 = g[G_PW1];
    const int taps1 = g[G_KH1] * g[G_KW1], kw2 = g[G_KW2], Z = g[G_Z], nchw = g[G_NCHW];
    /* GEMM rows of each convolution: output pixels (x groups), at a uniform stride */
    const long lda1 = Z > 1 ? g[G_R1] : (long)g[G_SW1] * s.r1p;
    const long ldc1 = Z > 1 ? (kw2 ? g[G_R2] : g[G_R3]) : (kw2 ? s.r2p : s.r3p);
    const long lda2 = Z > 1 ? g[G_R2] : (long)g[G_SW2] * s.r2p;
    const long ldc2 = Z > 1 ? g[G_R3] : s.r3p;
    const long per = scratch_floats(g), row1 = (long)s.wp1 * s.r1p;
    long offs1[taps1], offs2[kw2 > 0 ? kw2 : 1];
    for (int i = 0; i < g[G_KH1]; i++)
        for (int j = 0; j < g[G_KW1]; j++)
            offs1[i * g[G_KW1] + j] = (long)i * g[G_DH1] * row1 + (long)j * g[G_DW1] * s.r1p;
    for (int j = 0; j < kw2; j++) offs2[j] = (long)j * g[G_DW2] * s.r2p;
    const long total = (long)N * OH;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *u = scratch + per * t, *v1 = u + s.u, *v2 = v1 + s.v1, *tile = v2 + s.v2;
        memset(u, 0, sizeof(float) * (s.u + s.v1));  /* the zero padding */
        Walk wk = walk_start(total, t, nt);
        int n, oh, th;
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            int lo = oh * sh1, hi = (oh + th - 1) * sh1 + (g[G_KH1] - 1) * g[G_DH1] + 1;
            int drop = slide(&wk, n, lo);  /* the window: padded rows [ulo, uhi) */
            if (drop) memmove(u, u + drop * row1, sizeof(float) * (wk.hi - wk.lo) * row1);
            const int ulo = wk.lo, uhi = wk.hi;
            for (int ip = uhi; ip < hi; ip++) {  /* new window rows: padded row ip */
                float *row = u + (ip - ulo) * row1;
                int ih = ip - ph1;
                if (ih >= 0 && ih < H && nchw)
                    gemm_kmajor(W, Z * g[G_R1], C, x + ((long)n * C * H + ih) * W, (long)H * W,
                                Ap, 0, row + (long)pw1 * s.r1p, s.r1p, PF_X);
                else if (ih >= 0 && ih < H)
                    gemm(W, Z * g[G_R1], C, x + ((long)n * H + ih) * W * C, C, Ap, 0,
                         row + (long)pw1 * s.r1p, s.r1p, PF_X);
                else
                    memset(row, 0, sizeof(float) * row1);
            }
            if (hi > uhi) wk.hi = hi;
            for (int r = 0; r < th; r++) {  /* first convolution, one output row at a time */
                const float *a = u + ((long)(oh + r) * sh1 - ulo) * row1;
                float *dst = kw2 ? v1 + ((long)r * s.wp2 + g[G_PW2]) * s.r2p
                                 : v2 + (long)r * OW * s.r3p;
                gemm_taps(s.w1 * Z, g[G_R2], g[G_R1], taps1, offs1, a, lda1, K1p, 0, dst, ldc1, 0);
            }
            for (int r = 0; kw2 && r < th; r++)  /* second convolution, along rows */
                gemm_taps(OW * Z, g[G_R3], g[G_R2], kw2, offs2, v1 + (long)r * s.wp2 * s.r2p,
                          lda2, K2p, 0, v2 + (long)r * OW * s.r3p, ldc2, 0);
            if (nchw) {  /* the band in NHWC, then into the output's planes */
                gemm(th * OW, O, Z * g[G_R3], v2, s.r3p, Bp, bias, tile, O, 0);
                store_planes(th * OW, O, tile, O, y + ((long)n * O * OH + oh) * OW,
                             (long)OH * OW);
            } else
                gemm(th * OW, O, Z * g[G_R3], v2, s.r3p, Bp, bias,
                     y + ((long)n * OH + oh) * OW * O, O, PF_C);
        }
    }
}

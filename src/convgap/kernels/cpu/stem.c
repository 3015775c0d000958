/* A network's stem and the block after it in one pass: fp32, AVX-512.
 *
 *   u = act1(conv(x, A) + bias1)     (k1 x k1, stride st1, zero padding k1 / 2, C -> R:
 *                                     the stem, C small: 3 for an RGB image)
 *   v = act2(dw(u, D) + bias2)       (depthwise k x k, stride 1, zero padding k / 2)
 *   y = v @ B + bias                 (1x1, R -> O), written NHWC
 *
 * MobileNetV2's stem and first inverted residual (no expansion, no residual) are this. Run
 * layer by layer, u (R channels at half the image's side: 1.6 MB an image for 32 x 112 x
 * 112) is written to memory and read back, and a stem conv over 3 channels runs poorly as a
 * GEMM (27-long dot products); here u never leaves the thread's cache. Each of the threads
 * takes a contiguous range of the N x OH output rows in bands of at most TH rows, keeping a
 * window of u's rows that slides down the image (bands.h: each row of u is computed once
 * per thread and image). A row of u: per group of PX pixels, every tap's input value
 * (x read in place through its strides: NCHW or NHWC) broadcast and multiplied into the
 * pixels' R channels (RV vectors of 16 lanes, the weights' rows loaded once per group).
 * The depthwise step per group of 4 pixels, the taps' vectors in registers; the 1x1 per
 * group of 8 pixels and 16 output channels (R broadcast-FMAs). R is padded to Rp (a
 * multiple of 16, at most 64) with zero weights and biases, so the padded lanes never
 * reach y. Compiled at first use by convgap.kernels.cpu.build. */
#include <string.h>
#include <omp.h>

#include "act.h"
#include "args.h"
#include "bands.h"

ARGS_LAYOUT(StemArgs, STEM_ARGS)

#define MAX_RV 4

static inline int rp_of(const StemArgs *g) { return (g->r + 15) / 16 * 16; }
static inline int op_of(const StemArgs *g) { return (g->o + 15) / 16 * 16; }

/* One thread's scratch: the window of u ((TH + k - 1) rows of OW + k - 1 pixels, zero
 * columns on both sides) and one row of v (OW pixels), Rp floats a pixel. */
long scratch_floats(const StemArgs *g)
{
    const long rp = rp_of(g), pad = g->k - 1;
    return whole_lines((g->th + pad) * (g->ow + pad) * rp + (long)g->ow * rp);
}

/* u's row uy (0 <= uy < OH) of image n into dst (OW pixels, Rp floats each), PX pixels a
 * group: RV and PX are constants where it is inlined. */
static inline __attribute__((always_inline)) void stem_row(
    const StemArgs *g, const float *x, int n, int uy, float *dst, const int RV, const int PX)
{
    const int k1 = g->k1, st = g->st1, p1 = k1 / 2, C = g->c, H = g->h, W = g->w;
    const int rp = RV * 16;
    const float *xn = x + (long)n * g->xsn;
    const long sc = g->xsc, sh = g->xsh, sw = g->xsw;
    const int iy0 = uy * st - p1;
    const int rows_in = iy0 >= 0 && iy0 + k1 <= H;
    __m512 bias[MAX_RV];
    for (int v = 0; v < RV; v++) bias[v] = _mm512_loadu_ps(g->bias1 + 16 * v);
    for (int ox = 0; ox < g->ow; ox += PX) {
        const int np = g->ow - ox < PX ? g->ow - ox : PX;
        const int ix0 = ox * st - p1;
        const int inside = rows_in && np == PX && ix0 >= 0 && ix0 + (PX - 1) * st + k1 <= W;
        __m512 acc[8][MAX_RV];
        for (int p = 0; p < PX; p++)
            for (int v = 0; v < RV; v++) acc[p][v] = bias[v];
        for (int c = 0; c < C; c++)
            for (int ky = 0; ky < k1; ky++) {
                const int iy = iy0 + ky;
                if (!inside && (iy < 0 || iy >= H)) continue;   /* zero padding */
                const float *xr = xn + c * sc + iy * sh;
                const float *wt = g->a + (long)(c * k1 + ky) * k1 * rp;
                if (inside) {
                    const long step = st * sw;
                    for (int kx = 0; kx < k1; kx++, wt += rp) {
                        const float *xp = xr + (ix0 + kx) * sw;
                        __m512 wv[MAX_RV];
                        for (int v = 0; v < RV; v++) wv[v] = _mm512_loadu_ps(wt + 16 * v);
                        for (int p = 0; p < PX; p++) {
                            const __m512 b = _mm512_set1_ps(xp[p * step]);
                            for (int v = 0; v < RV; v++)
                                acc[p][v] = _mm512_fmadd_ps(b, wv[v], acc[p][v]);
                        }
                    }
                    continue;
                }
                for (int kx = 0; kx < k1; kx++, wt += rp) {
                    __m512 wv[MAX_RV];
                    for (int v = 0; v < RV; v++) wv[v] = _mm512_loadu_ps(wt + 16 * v);
                    for (int p = 0; p < PX; p++) {
                        const int ix = ix0 + p * st + kx;
                        const float val = (p < np && ix >= 0 && ix < W) ? xr[ix * sw] : 0.0f;
                        const __m512 b = _mm512_set1_ps(val);
                        for (int v = 0; v < RV; v++)
                            acc[p][v] = _mm512_fmadd_ps(b, wv[v], acc[p][v]);
                    }
                }
            }
        for (int p = 0; p < np; p++)
            for (int v = 0; v < RV; v++)
                _mm512_storeu_ps(dst + (long)(ox + p) * rp + 16 * v,
                                 activate(g->act1, acc[p][v]));
    }
}

/* One output row: the depthwise step over the window rows win[0 .. k) (each OW + k - 1
 * pixels, u's first pixel at column k / 2) into t, then the 1x1 into y's row yr. */
static inline __attribute__((always_inline)) void out_row(
    const StemArgs *g, float *const *win, float *t, float *yr, const int RV)
{
    const int k = g->k, rp = RV * 16, OW = g->ow, O = g->o, op = op_of(g), R = g->r;
    __m512 bias[MAX_RV];
    for (int v = 0; v < RV; v++) bias[v] = _mm512_loadu_ps(g->bias2 + 16 * v);
    int ox = 0;
    for (; ox + 4 <= OW; ox += 4) {
        __m512 acc[4][MAX_RV];
        for (int p = 0; p < 4; p++)
            for (int v = 0; v < RV; v++) acc[p][v] = bias[v];
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                const float *tap = g->d + (long)(ky * k + kx) * rp;
                const float *src = win[ky] + (long)(ox + kx) * rp;
                for (int v = 0; v < RV; v++) {
                    const __m512 dv = _mm512_loadu_ps(tap + 16 * v);
                    for (int p = 0; p < 4; p++)
                        acc[p][v] = _mm512_fmadd_ps(_mm512_loadu_ps(src + p * rp + 16 * v),
                                                    dv, acc[p][v]);
                }
            }
        for (int p = 0; p < 4; p++)
            for (int v = 0; v < RV; v++)
                _mm512_storeu_ps(t + (long)(ox + p) * rp + 16 * v,
                                 activate(g->act2, acc[p][v]));
    }
    for (; ox < OW; ox++) {
        __m512 acc[MAX_RV];
        for (int v = 0; v < RV; v++) acc[v] = bias[v];
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                const float *tap = g->d + (long)(ky * k + kx) * rp;
                const float *src = win[ky] + (long)(ox + kx) * rp;
                for (int v = 0; v < RV; v++)
                    acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(src + 16 * v),
                                             _mm512_loadu_ps(tap + 16 * v), acc[v]);
            }
        for (int v = 0; v < RV; v++)
            _mm512_storeu_ps(t + (long)ox * rp + 16 * v, activate(g->act2, acc[v]));
    }
    for (int ob = 0; ob < op; ob += 16) {
        const __m512 bo = _mm512_loadu_ps(g->bias + ob);
        const __mmask16 keep = O - ob >= 16 ? 0xFFFF : (__mmask16)((1u << (O - ob)) - 1);
        for (ox = 0; ox + 8 <= OW; ox += 8) {
            __m512 acc[8];
            for (int p = 0; p < 8; p++) acc[p] = bo;
            for (int kk = 0; kk < R; kk++) {
                const __m512 wv = _mm512_loadu_ps(g->b + (long)kk * op + ob);
                for (int p = 0; p < 8; p++)
                    acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(t[(long)(ox + p) * rp + kk]), wv,
                                             acc[p]);
            }
            for (int p = 0; p < 8; p++)
                _mm512_mask_storeu_ps(yr + (long)(ox + p) * O + ob, keep, acc[p]);
        }
        for (; ox < OW; ox++) {
            __m512 acc = bo;
            for (int kk = 0; kk < R; kk++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(t[(long)ox * rp + kk]),
                                      _mm512_loadu_ps(g->b + (long)kk * op + ob), acc);
            _mm512_mask_storeu_ps(yr + (long)ox * O + ob, keep, acc);
        }
    }
}

/* The thread's range of output rows (see the top). */
static inline __attribute__((always_inline)) void run_range(
    const StemArgs *g, const float *x, float *y, float *buf, int t, int nt, const int RV,
    const int PX)
{
    const int k = g->k, pad = k / 2, rp = RV * 16, OH = g->oh, OW = g->ow;
    const long row = (long)(OW + k - 1) * rp;   /* one window row, zero columns included */
    float *t_row = buf + (g->th + k - 1) * row;
    float *win[16];
    Walk w = walk_start((long)g->n * OH, t, nt);
    int n, oy, th;
    while (next_band(&w, OH, g->th, &n, &oy, &th)) {
        const int lo = oy - pad, hi = oy + th + pad;   /* u's rows the band reads */
        const int drop = slide(&w, n, lo);
        if (drop > 0 && w.hi > w.lo)
            memmove(buf, buf + drop * row, sizeof(float) * (size_t)(w.hi - w.lo) * row);
        for (int uy = w.hi; uy < hi; uy++) {
            float *dst = buf + (long)(uy - lo) * row;
            if (uy < 0 || uy >= OH) {
                memset(dst, 0, sizeof(float) * row);
                continue;
            }
            memset(dst, 0, sizeof(float) * pad * rp);
            memset(dst + (long)(pad + OW) * rp, 0, sizeof(float) * pad * rp);
            stem_row(g, x, n, uy, dst + (long)pad * rp, RV, PX);
        }
        w.hi = hi;
        for (int r = 0; r < th; r++) {
            for (int ky = 0; ky < k; ky++) win[ky] = buf + (long)(r + ky) * row;
            out_row(g, win, t_row, y + (((long)n * OH + oy + r) * OW) * g->o, RV);
        }
    }
}

/* x: (N, C, H, W) through its strides; y: (N, O, OH, OW) NHWC; scratch: threads x
 * scratch_floats(g). */
void stem_forward(const StemArgs *g, const float *x, float *y, float *scratch, int threads)
{
    const long per = scratch_floats(g);
    const int rv = rp_of(g) / 16;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *buf = scratch + per * t;
        switch (rv) {
        case 1: run_range(g, x, y, buf, t, nt, 1, 8); break;
        case 2: run_range(g, x, y, buf, t, nt, 2, 8); break;
        case 3: run_range(g, x, y, buf, t, nt, 3, 4); break;
        default: run_range(g, x, y, buf, t, nt, 4, 4); break;
        }
    }
}

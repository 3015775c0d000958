/* A residual block's body on kept output tiles, added into the output: fp32, AVX-512.
 *
 *   u = act1(conv(x, A) + bias1)         (k1 x k1, stride st1, zero padding k1 / 2, C -> R:
 *                                         a 1x1 in a bottleneck or inverted residual, the
 *                                         first 3x3 of a basic block; absent: u = x, C = R)
 *   v = act2(conv(u, K) + bias2)         (k x k, dense or depthwise, stride st, zero
 *                                         padding k / 2 around u)
 *   y += v @ B + bias                    (1x1 conv, R -> O; absent: y += v, O = R), at the
 *                                         kept tiles' pixels only
 *
 * y holds the shortcut's output; a tile (n, ty, tx) is the S x S output pixels from (ty S,
 * tx S) of image n (clipped at the output's bottom and right edges). Batch norms are folded
 * into the weights; the caller applies the activations after the residual add.
 *
 * Two steps in one parallel region. First (with a first conv) the u pixels that some kept
 * tile's window reads are marked, and the first conv runs on each run of marked pixels
 * (in flat order, within an image) straight from x into a shared u map (N x H x W x Rp):
 * each u pixel is computed once, however many windows share it (a k1 x k1 or strided first
 * conv gathers the run's windows of x as im2col rows first, x NHWC). Then the tiles, in groups
 * of up to ``group`` (a few tiles per GEMM call, so that 1x1 and 2x2 tiles still give the
 * micro-kernel rows): a dense middle conv gathers its tiles' k x k windows (im2col, zeros
 * outside the image) and runs one GEMM, a depthwise one runs per pixel in registers; the last
 * 1x1 conv is one GEMM into the thread's scratch, added into y at the pixels inside the
 * output. x and y are NHWC or NCHW (g->xnchw, g->ynchw; without a first conv x is NHWC).
 * Compiled at first use by convgap.kernels.cpu.build. */
#include <string.h>
#include <omp.h>

#include "act.h"
#include "args.h"
#include "bands.h"
#include "gemm.h"

ARGS_LAYOUT(TilesArgs, TILES_ARGS)

#define CHUNK 64  /* pixels of u per work item of the first step */

static int round16i(int n) { return (n + 15) / 16 * 16; }

/* Floats of the byte mask of needed u pixels (N x H x W bytes) */
static long mark_floats(const TilesArgs *g)
{
    return g->a ? whole_lines(((long)g->n * g->h * g->w + 3) / 4) : 0;
}

/* Floats of the scratch all threads share: the mask and the u map (with a first conv) */
long shared_floats(const TilesArgs *g)
{
    return g->a ? mark_floats(g) + whole_lines((long)g->n * g->h * g->w * round16i(g->r)) : 0;
}

/* Whether the first conv reads windows of x (k1 x k1 or strided) rather than its pixels */
static int windowed(const TilesArgs *g) { return g->a && (g->k1 > 1 || g->st1 > 1); }

/* Floats of a thread's im2col rows: a group's windows (dense middle conv), or a run's
 * (windowed first conv: the first step, before the tiles, uses the same rows) */
static long col_floats(const TilesArgs *g)
{
    const long rows = (long)g->group * g->s * g->s;
    const long mid = g->depthwise ? 0 : rows * g->ks * g->ks * g->r;
    const long first = windowed(g) ? (long)CHUNK * g->k1 * g->k1 * g->c : 0;
    return whole_lines(mid > first ? mid : first);
}

/* Floats of one thread's scratch: its im2col rows, a group's v rows and its output rows
 * (none without a last conv) */
long scratch_floats(const TilesArgs *g)
{
    const long rows = (long)g->group * g->s * g->s;
    return col_floats(g) + whole_lines(rows * round16i(g->r))
           + (g->b ? whole_lines(rows * round16i(g->o)) : 0);
}

/* Whether tile i is inside the output (others are skipped) */
static int valid_tile(const TilesArgs *g, const long *t)
{
    return t[0] >= 0 && t[0] < g->n && t[1] >= 0 && t[1] * g->s < g->oh && t[2] >= 0
           && t[2] * g->s < g->ow;
}

/* mark[n][iy][ix] = 1 where a kept tile's window reads u (inside the image) */
static void mark_needed(const TilesArgs *g, const long *tiles, int T, unsigned char *mark)
{
    const int H = g->h, W = g->w, S = g->s, st = g->st, pad = g->ks / 2;
    const int side = (S - 1) * st + g->ks;
    memset(mark, 0, (size_t)g->n * H * W);
    for (int i = 0; i < T; i++) {
        const long *t = tiles + 3L * i;
        if (!valid_tile(g, t)) continue;
        int y0 = (int)t[1] * S * st - pad, x0 = (int)t[2] * S * st - pad;
        int y1 = y0 + side, x1 = x0 + side;
        if (y0 < 0) y0 = 0;
        if (x0 < 0) x0 = 0;
        if (y1 > H) y1 = H;
        if (x1 > W) x1 = W;
        for (int iy = y0; iy < y1; iy++)
            memset(mark + (t[0] * H + iy) * W + x0, 1, (size_t)(x1 - x0));
    }
}

/* The k1 x k1 windows of x (NHWC) at u pixels [p, q) of image n as im2col rows (k1 k1 C
 * floats: tap-major, zeros outside the image) */
static void first_windows(const TilesArgs *g, const float *x, int n, long p, long q,
                          float *col)
{
    const int C = g->c, k1 = g->k1, pad = k1 / 2;
    const long K = (long)k1 * k1 * C;
    const float *img = x + (long)n * g->xh * g->xw * C;
    for (long e = p; e < q; e++, col += K) {
        const int uy = (int)(e / g->w), ux = (int)(e % g->w);
        for (int dy = 0; dy < k1; dy++) {
            const int iy = uy * g->st1 - pad + dy;
            for (int dx = 0; dx < k1; dx++) {
                const int ix = ux * g->st1 - pad + dx;
                float *dst = col + (long)(dy * k1 + dx) * C;
                if (iy < 0 || iy >= g->xh || ix < 0 || ix >= g->xw)
                    memset(dst, 0, sizeof(float) * C);
                else
                    memcpy(dst, img + ((long)iy * g->xw + ix) * C, sizeof(float) * C);
            }
        }
    }
}

/* u's marked pixels among [p0, p1) of image n (flat within the image): the first conv on
 * each run of them, then act1; ``col``: the thread's im2col rows (windowed first conv) */
static void first_conv(const TilesArgs *g, const float *x, const unsigned char *mark,
                       float *u, int n, long p0, long p1, float *col)
{
    const long HW = (long)g->h * g->w;
    const int C = g->c, R = g->r, Rp = round16i(R);
    const unsigned char *m = mark + n * HW;
    long p = p0;
    while (p < p1) {
        while (p < p1 && !m[p]) p++;
        long q = p;
        while (q < p1 && m[q]) q++;
        if (q > p) {
            float *rows = u + (n * HW + p) * Rp;
            if (windowed(g)) {
                const int K = g->k1 * g->k1 * C;
                first_windows(g, x, n, p, q, col);
                gemm((int)(q - p), R, K, col, K, g->a, g->bias1, rows, Rp, PF_X);
            } else if (g->xnchw)
                gemm_kmajor((int)(q - p), R, C, x + (long)n * C * HW + p, HW, g->a, g->bias1,
                            rows, Rp, PF_X);
            else
                gemm((int)(q - p), R, C, x + (n * HW + p) * C, C, g->a, g->bias1, rows, Rp,
                     PF_X);
            activate_floats(g->act1, rows, (q - p) * Rp);
        }
        p = q;
    }
}

/* The input pixel (image-flat index, or -1: outside the image) that row m of a group reads
 * at tap (dy, dx): row m is pixel (i, j) of tile m / (S S) */
static inline long tap_pixel(const TilesArgs *g, const long *t, int i, int j, int dy, int dx)
{
    const int pad = g->ks / 2;
    const int iy = ((int)t[1] * g->s + i) * g->st - pad + dy;
    const int ix = ((int)t[2] * g->s + j) * g->st - pad + dx;
    if (iy < 0 || iy >= g->h || ix < 0 || ix >= g->w) return -1;
    return (long)iy * g->w + ix;
}

/* v (rows of Rp floats) = act2(dense middle conv + bias2) of the group's tiles: their
 * windows gathered as im2col rows (k k R floats: tap-major, zeros outside the image), one
 * GEMM */
static void middle_dense(const TilesArgs *g, const long *tiles, int count, const float *src,
                         long sp, float *col, float *v)
{
    const int S = g->s, ks = g->ks, R = g->r, Rp = round16i(R);
    const long K = (long)ks * ks * R, HW = (long)g->h * g->w;
    float *row = col;
    for (int e = 0; e < count; e++) {
        const long *t = tiles + 3L * e;
        const float *img = src + t[0] * HW * sp;
        for (int i = 0; i < S; i++)
            for (int j = 0; j < S; j++, row += K)
                for (int dy = 0; dy < ks; dy++)
                    for (int dx = 0; dx < ks; dx++) {
                        const long q = tap_pixel(g, t, i, j, dy, dx);
                        float *dst = row + (long)(dy * ks + dx) * R;
                        if (q < 0) memset(dst, 0, sizeof(float) * R);
                        else memcpy(dst, img + q * sp, sizeof(float) * R);
                    }
    }
    const int M = count * S * S;
    gemm(M, R, (int)K, col, K, g->k, g->bias2, v, Rp, 0);
    activate_floats(g->act2, v, (long)M * Rp);
}

/* One 16-channel slice's depthwise taps at each row of the group, act applied (an ACT_
 * code, fixed per instance); src rows sp floats apart, ``m`` their lanes within R */
static inline __attribute__((always_inline)) void dw_rows(const int act,
        const TilesArgs *g, const long *tiles, int count, const float *src, long sp,
        __mmask16 m, const float *D, const float *bias2, float *v)
{
    const int S = g->s, ks = g->ks, Rp = round16i(g->r);
    const long HW = (long)g->h * g->w;
    const __m512 b0 = bias2 ? _mm512_loadu_ps(bias2) : _mm512_setzero_ps();
    for (int e = 0; e < count; e++) {
        const long *t = tiles + 3L * e;
        const float *img = src + t[0] * HW * sp;
        for (int i = 0; i < S; i++)
            for (int j = 0; j < S; j++, v += Rp) {
                __m512 acc = b0;
                for (int dy = 0; dy < ks; dy++)
                    for (int dx = 0; dx < ks; dx++) {
                        const long q = tap_pixel(g, t, i, j, dy, dx);
                        if (q >= 0)
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, img + q * sp),
                                                  _mm512_loadu_ps(D + (long)(dy * ks + dx) * Rp),
                                                  acc);
                    }
                _mm512_storeu_ps(v, activate(act, acc));
            }
    }
}

/* v (rows of Rp floats) = act2(depthwise middle conv + bias2) of the group's tiles */
static void middle_depthwise(const TilesArgs *g, const long *tiles, int count,
                             const float *src, long sp, float *v)
{
    const int R = g->r, Rp = round16i(R);
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        const float *s = src + c0, *D = g->k + c0, *b2 = g->bias2 ? g->bias2 + c0 : 0;
        const __mmask16 m = lanes(R - c0);
        float *vc = v + c0;
        switch (g->act2) {
        case ACT_RELU: dw_rows(ACT_RELU, g, tiles, count, s, sp, m, D, b2, vc); break;
        case ACT_RELU6: dw_rows(ACT_RELU6, g, tiles, count, s, sp, m, D, b2, vc); break;
        case ACT_SILU: dw_rows(ACT_SILU, g, tiles, count, s, sp, m, D, b2, vc); break;
        case ACT_SIGMOID: dw_rows(ACT_SIGMOID, g, tiles, count, s, sp, m, D, b2, vc); break;
        default: dw_rows(ACT_NONE, g, tiles, count, s, sp, m, D, b2, vc);
        }
    }
}

/* y += the group's output rows (rows of Op floats) at its tiles' pixels inside the output:
 * NHWC a vector add per pixel, NCHW a scalar one per pixel and plane (measured: a vector
 * gathered per channel over runs of a plane's pixels took 35% longer at S = 1 and density
 * 1, channels in blocks of 16 over the group's pixels no less) */
static void add_tiles(const TilesArgs *g, const long *tiles, int count, const float *rows,
                      float *y)
{
    const int S = g->s, O = g->o, OH = g->oh, OW = g->ow, Op = round16i(O);
    const long plane = (long)OH * OW;
    for (int e = 0; e < count; e++) {
        const long *t = tiles + 3L * e;
        const int X0 = (int)t[2] * S, cols = OW - X0 < S ? OW - X0 : S;
        float *img = y + t[0] * O * plane;
        for (int i = 0; i < S && (int)t[1] * S + i < OH; i++) {
            const long p0 = (long)((int)t[1] * S + i) * OW + X0;
            const float *r = rows + (long)(e * S + i) * S * Op;
            for (int j = 0; j < cols; j++, r += Op) {
                if (g->ynchw) {
                    for (int o = 0; o < O; o++) img[o * plane + p0 + j] += r[o];
                    continue;
                }
                float *d = img + (p0 + j) * O;
                for (int o = 0; o < O; o += 16) {
                    const __mmask16 m = lanes(O - o);
                    _mm512_mask_storeu_ps(d + o, m, _mm512_add_ps(
                        _mm512_maskz_loadu_ps(m, d + o), _mm512_loadu_ps(r + o)));
                }
            }
        }
    }
}

/* g: the weights and geometry (args.h's TilesArgs). x: (N, C, XH, XW) float32, NCHW
 * (g->xnchw, a 1x1 stride-1 first conv only) or NHWC in memory; y: (N, O, OH, OW), NCHW (g->ynchw) or NHWC, holding the
 * shortcut, the body added at the kept tiles; tiles: T rows (n, ty, tx) (rows outside the
 * output are skipped); scratch: shared_floats(g) + threads x scratch_floats(g) floats. */
void tiles_forward(const TilesArgs *g, const float *x, float *y, const long *tiles, int T,
                   float *scratch, int threads)
{
    if (T <= 0) return;
    const int Rp = round16i(g->r);
    const long HW = (long)g->h * g->w, per = scratch_floats(g);
    const long rows = (long)g->group * g->s * g->s;
    const int Op = g->b ? round16i(g->o) : Rp;
    unsigned char *mark = (unsigned char *)scratch;
    float *u = scratch + mark_floats(g), *own = scratch + shared_floats(g);
    const float *src = g->a ? u : x;  /* what the middle conv reads, pixels sp floats apart */
    const long sp = g->a ? Rp : g->c;
    /* tiles per group: up to g->group, fewer where that leaves threads idle */
    int G = (T + threads - 1) / threads;
    if (G > g->group) G = g->group;
    const int groups = (T + G - 1) / G;
    const long chunks = (HW + CHUNK - 1) / CHUNK;
    if (g->a) mark_needed(g, tiles, T, mark);
    #pragma omp parallel num_threads(threads)
    {
        float *col = own + per * omp_get_thread_num();
        float *v = col + col_floats(g);
        float *out = g->b ? v + whole_lines(rows * Rp) : v;
        if (g->a) {
            #pragma omp for schedule(dynamic, 1)  /* chunks hold unequal runs */
            for (long w = 0; w < g->n * chunks; w++) {
                const long p0 = w % chunks * CHUNK, p1 = p0 + CHUNK < HW ? p0 + CHUNK : HW;
                first_conv(g, x, mark, u, (int)(w / chunks), p0, p1, col);
            }
        }
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < groups; i++) {
            /* the group's valid tiles, packed at its front (rows outside are skipped) */
            long kept[3 * G];
            int count = 0;
            for (int e = i * G; e < T && e < (i + 1) * G; e++)
                if (valid_tile(g, tiles + 3L * e)) {
                    memcpy(kept + 3 * count, tiles + 3L * e, sizeof(long) * 3);
                    count++;
                }
            if (!count) continue;
            if (g->depthwise) middle_depthwise(g, kept, count, src, sp, v);
            else middle_dense(g, kept, count, src, sp, col, v);
            if (g->b)
                gemm(count * g->s * g->s, g->o, g->r, v, Rp, g->b, g->bias, out, Op, 0);
            add_tiles(g, kept, count, out, y);
        }
    }
}

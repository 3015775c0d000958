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
 * The tiles kept are the cells of a mask over the output's grid of tiles: given, or the
 * block's spatial masker decided here first (average pool of x to the grid, a dot product
 * with the masker's weights, a comparison: one pass over x instead of three torch calls).
 * Then the schedule of pdp.c, on the kept tiles: in order (image, tile row, tile column),
 * each thread takes an equal contiguous share of them and walks it one tile row
 * (a segment of its tiles sharing image and tile row) at a time, keeping a window of u's
 * rows in its own scratch that slides down the image. For a segment, the first conv runs
 * on the window's pixels the segment's windows read and that are not there yet (a byte
 * per window pixel says which are: each u pixel is computed once per thread and image,
 * and stays in cache); then, a few tiles per call (``group``), the middle conv (dense:
 * the tiles' k x k windows gathered as im2col rows, one GEMM; depthwise: per pixel, the
 * taps in registers) and the last 1x1 (one GEMM into the thread's scratch, added into y
 * at the pixels inside the output). A first conv of k1 x k1 or stride > 1 gathers its
 * run's windows of x as im2col rows first (x NHWC). x and y are NHWC or NCHW (g->xnchw,
 * g->ynchw; without a first conv x is NHWC and the middle conv reads it in place).
 * Compiled at first use by convgap.kernels.cpu.build. */
#include <string.h>
#include <omp.h>

#include "act.h"
#include "args.h"
#include "bands.h"
#include "gemm.h"

ARGS_LAYOUT(TilesArgs, TILES_ARGS)

#define CHUNK 64  /* pixels per im2col call of a windowed first conv */

static int round16i(int n) { return (n + 15) / 16 * 16; }

/* Whether the first conv reads windows of x (k1 x k1 or strided) rather than its pixels */
static int windowed(const TilesArgs *g) { return g->a && (g->k1 > 1 || g->st1 > 1); }

/* Rows of u a tile row reads (the window's capacity) */
static int window_rows(const TilesArgs *g) { return (g->s - 1) * g->st + g->ks; }

/* Floats of a thread's im2col rows: a group's windows (dense middle conv), or a run's
 * (windowed first conv) */
static long col_floats(const TilesArgs *g)
{
    const long rows = (long)g->group * g->s * g->s;
    const long mid = g->depthwise ? 0 : rows * g->ks * g->ks * g->r;
    const long first = windowed(g) ? (long)CHUNK * g->k1 * g->k1 * g->c : 0;
    return whole_lines(mid > first ? mid : first);
}

/* Floats of a thread's u window and its bytes (which pixels are computed, which columns a
 * segment reads), with a first conv */
static long window_floats(const TilesArgs *g)
{
    if (!g->a) return 0;
    const long px = (long)window_rows(g) * g->w;
    return whole_lines(px * round16i(g->r)) + whole_lines((px + g->w + 3) / 4);
}

/* Floats of one thread's scratch: its im2col rows, a group's v rows, its output rows (none
 * without a last conv), its u window */
long scratch_floats(const TilesArgs *g)
{
    const long rows = (long)g->group * g->s * g->s;
    return col_floats(g) + whole_lines(rows * round16i(g->r))
           + (g->b ? whole_lines(rows * round16i(g->o)) : 0) + window_floats(g);
}

/* The mask's grid: rows and columns of S x S tiles over the output */
static int grid_rows(const TilesArgs *g) { return (g->oh + g->s - 1) / g->s; }
static int grid_cols(const TilesArgs *g) { return (g->ow + g->s - 1) / g->s; }

/* The masker's decisions for the cells of rows [r0, r1) of the batch's grid (row r: image
 * r / gh, tile row r % gh): mask = 1 where mb + mw . (x's mean over the cell's
 * adaptive-pooling bin of the input: rows [floor(i XH / gh), ceil((i + 1) XH / gh)),
 * columns alike) > 0, else 0. A spatial masker (average pool to the grid, a 1x1 conv to
 * one keep logit, eval's comparison) in one pass over x, NHWC or NCHW (g->xnchw). */
static void decide(const TilesArgs *g, const float *x, const float *mw, const float *mb,
                   float *mask, int r0, int r1)
{
    const int gh = grid_rows(g), gw = grid_cols(g), XH = g->xh, XW = g->xw, C = g->c;
    for (int r = r0; r < r1; r++) {
        const int n = r / gh, i = r % gh;
        const int y0 = i * XH / gh, y1 = ((i + 1) * XH + gh - 1) / gh;
        for (int j = 0; j < gw; j++) {
            const int x0 = j * XW / gw, x1 = ((j + 1) * XW + gw - 1) / gw;
            __m512 acc = _mm512_setzero_ps();
            if (g->xnchw) {  /* each channel's plane: its weight times the bin's rows */
                for (int c = 0; c < C; c++) {
                    const __m512 wc = _mm512_set1_ps(mw[c]);
                    const float *plane = x + ((long)n * C + c) * XH * XW;
                    for (int yy = y0; yy < y1; yy++)
                        for (int xx = x0; xx < x1; xx += 16)
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(
                                lanes(x1 - xx), plane + (long)yy * XW + xx), wc, acc);
                }
            } else {  /* each pixel's channels against the weights */
                for (int yy = y0; yy < y1; yy++)
                    for (int xx = x0; xx < x1; xx++) {
                        const float *px = x + (((long)n * XH + yy) * XW + xx) * C;
                        for (int c = 0; c < C; c += 16) {
                            const __mmask16 m = lanes(C - c);
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, px + c),
                                                  _mm512_maskz_loadu_ps(m, mw + c), acc);
                        }
                    }
            }
            const float logit = _mm512_reduce_add_ps(acc) / (float)((y1 - y0) * (x1 - x0))
                                + mb[0];
            mask[(long)r * gw + j] = logit > 0.0f ? 1.0f : 0.0f;
        }
    }
}

/* The kept cells of the mask (N x gh x gw floats, > 0: kept) as tile rows (n, ty, tx), in
 * order; returns their count */
static int kept_tiles(const TilesArgs *g, const float *mask, long *tiles)
{
    const int gh = grid_rows(g), gw = grid_cols(g);
    int T = 0;
    for (long q = 0; q < (long)g->n * gh * gw; q++)
        if (mask[q] > 0.0f) {
            tiles[3L * T] = q / ((long)gh * gw);
            tiles[3L * T + 1] = q / gw % gh;
            tiles[3L * T + 2] = q % gw;
            T++;
        }
    return T;
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

/* u at pixels [p, q) of image n (flat within the image) into rows (Rp floats apart): the
 * first conv, then act1; ``col``: the thread's im2col rows (windowed first conv) */
static void first_conv(const TilesArgs *g, const float *x, int n, long p, long q,
                       float *rows, float *col)
{
    const long HW = (long)g->h * g->w;
    const int C = g->c, R = g->r, Rp = round16i(R);
    if (windowed(g)) {
        const int K = g->k1 * g->k1 * C;
        for (long e = p; e < q; e += CHUNK) {
            const long f = q - e < CHUNK ? q : e + CHUNK;
            first_windows(g, x, n, e, f, col);
            gemm((int)(f - e), R, K, col, K, g->a, g->bias1, rows + (e - p) * Rp, Rp, PF_X);
        }
    } else if (g->xnchw)
        gemm_kmajor((int)(q - p), R, C, x + (long)n * C * HW + p, HW, g->a, g->bias1, rows,
                    Rp, PF_X);
    else
        gemm((int)(q - p), R, C, x + (n * HW + p) * C, C, g->a, g->bias1, rows, Rp, PF_X);
    activate_floats(g->act1, rows, (q - p) * Rp);
}

/* A thread's u window: rows [lo, hi) of image cur (u: W x Rp floats per row; done: a byte
 * per pixel, 1 where computed; need: a byte per column) */
typedef struct {
    int cur, lo, hi;
    float *u;
    unsigned char *done, *need;
} Window;

/* Make the window hold the u pixels the segment's tiles read (count rows of one image and
 * tile row): slide it down to their rows (keeping the rows it shares), then run the first
 * conv on each run of needed pixels not yet computed. */
static void fill_window(const TilesArgs *g, const float *x, const long *tiles, int count,
                        Window *wn, float *col)
{
    const int H = g->h, W = g->w, S = g->s, st = g->st, pad = g->ks / 2, Rp = round16i(g->r);
    const int n = (int)tiles[0], oy0 = (int)tiles[1] * S;
    const int oy1 = g->oh - oy0 < S ? g->oh : oy0 + S;
    int lo = oy0 * st - pad, hi = (oy1 - 1) * st - pad + g->ks;
    if (lo < 0) lo = 0;
    if (hi > H) hi = H;
    if (n != wn->cur || lo >= wn->hi || lo < wn->lo) {  /* nothing to keep */
        wn->cur = n;
        wn->lo = wn->hi = lo;
    } else if (lo > wn->lo) {
        const int drop = lo - wn->lo, keep = wn->hi - lo;
        memmove(wn->u, wn->u + (long)drop * W * Rp, sizeof(float) * keep * W * Rp);
        memmove(wn->done, wn->done + (long)drop * W, (size_t)keep * W);
        wn->lo = lo;
    }
    if (hi > wn->hi) {
        memset(wn->done + (long)(wn->hi - wn->lo) * W, 0, (size_t)(hi - wn->hi) * W);
        wn->hi = hi;
    }
    memset(wn->need, 0, (size_t)W);
    for (int e = 0; e < count; e++) {
        const int ox0 = (int)tiles[3L * e + 2] * S, ox1 = g->ow - ox0 < S ? g->ow : ox0 + S;
        int c0 = ox0 * st - pad, c1 = (ox1 - 1) * st - pad + g->ks;
        if (c0 < 0) c0 = 0;
        if (c1 > W) c1 = W;
        if (c1 > c0) memset(wn->need + c0, 1, (size_t)(c1 - c0));
    }
    for (int iy = lo; iy < hi; iy++) {
        unsigned char *d = wn->done + (long)(iy - wn->lo) * W;
        int c = 0;
        while (c < W) {
            while (c < W && !(wn->need[c] && !d[c])) c++;
            int e = c;
            while (e < W && wn->need[e] && !d[e]) e++;
            if (e > c) {
                first_conv(g, x, n, (long)iy * W + c, (long)iy * W + e,
                           wn->u + ((long)(iy - wn->lo) * W + c) * Rp, col);
                memset(d + c, 1, (size_t)(e - c));
            }
            c = e;
        }
    }
}

/* The input pixel (flat from the source's row ulo, or -1: outside the image) that output
 * pixel (i, j) of tile t reads at tap (dy, dx) */
static inline long tap_pixel(const TilesArgs *g, const long *t, int ulo, int i, int j,
                             int dy, int dx)
{
    const int pad = g->ks / 2;
    const int iy = ((int)t[1] * g->s + i) * g->st - pad + dy;
    const int ix = ((int)t[2] * g->s + j) * g->st - pad + dx;
    if (iy < 0 || iy >= g->h || ix < 0 || ix >= g->w) return -1;
    return (long)(iy - ulo) * g->w + ix;
}

/* Whether output pixel (i, j) of tile t is inside the output */
static inline int inside(const TilesArgs *g, const long *t, int i, int j)
{
    return (int)t[1] * g->s + i < g->oh && (int)t[2] * g->s + j < g->ow;
}

/* v (rows of Rp floats, S x S per tile) = act2(dense middle conv + bias2) of the group's
 * tiles, read from src (rows of W pixels sp floats apart, from u's row ulo): their windows
 * gathered as im2col rows (k k R floats: tap-major, zeros outside the image and for pixels
 * outside the output), one GEMM */
static void middle_dense(const TilesArgs *g, const long *tiles, int count, const float *src,
                         int ulo, long sp, float *col, float *v)
{
    const int S = g->s, ks = g->ks, R = g->r, Rp = round16i(R);
    const long K = (long)ks * ks * R;
    float *row = col;
    for (int e = 0; e < count; e++) {
        const long *t = tiles + 3L * e;
        for (int i = 0; i < S; i++)
            for (int j = 0; j < S; j++, row += K) {
                if (!inside(g, t, i, j)) {
                    memset(row, 0, sizeof(float) * K);
                    continue;
                }
                for (int dy = 0; dy < ks; dy++)
                    for (int dx = 0; dx < ks; dx++) {
                        const long q = tap_pixel(g, t, ulo, i, j, dy, dx);
                        float *dst = row + (long)(dy * ks + dx) * R;
                        if (q < 0) memset(dst, 0, sizeof(float) * R);
                        else memcpy(dst, src + q * sp, sizeof(float) * R);
                    }
            }
    }
    const int M = count * S * S;
    gemm(M, R, (int)K, col, K, g->k, g->bias2, v, Rp, 0);
    activate_floats(g->act2, v, (long)M * Rp);
}

/* One 16-channel slice (lanes m) of the depthwise step at the group's pixels, act applied
 * (ks and act fixed per instance: the ks x ks taps in registers, no branch per pixel but
 * at the image's borders); src rows of W pixels sp floats apart from u's row ulo; pixels
 * outside the output get zeros */
static inline __attribute__((always_inline)) void dw_rows(const int ks, const int act,
        const TilesArgs *g, const long *tiles, int count, const float *src, int ulo, long sp,
        __mmask16 m, const float *D, const float *bias2, float *v)
{
    const int S = g->s, st = g->st, pad = ks / 2, H = g->h, W = g->w, Rp = round16i(g->r);
    const __m512 b0 = bias2 ? _mm512_loadu_ps(bias2) : _mm512_setzero_ps();
    __m512 d[ks * ks];
    for (int t = 0; t < ks * ks; t++) d[t] = _mm512_loadu_ps(D + (long)t * Rp);
    for (int e = 0; e < count; e++) {
        const long *t = tiles + 3L * e;
        const int oy0 = (int)t[1] * S, ox0 = (int)t[2] * S;
        for (int i = 0; i < S; i++) {
            const int iy0 = (oy0 + i) * st - pad;
            const int full = iy0 >= 0 && iy0 + ks <= H;
            const float *base = src + (long)(iy0 - ulo) * W * sp;
            for (int j = 0; j < S; j++, v += Rp) {
                if (oy0 + i >= g->oh || ox0 + j >= g->ow) {
                    _mm512_storeu_ps(v, _mm512_setzero_ps());
                    continue;
                }
                const int ix0 = (ox0 + j) * st - pad;
                __m512 acc = b0;
                if (full && ix0 >= 0 && ix0 + ks <= W) {
                    for (int a = 0; a < ks; a++)
                        for (int b = 0; b < ks; b++)
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(
                                m, base + ((long)a * W + ix0 + b) * sp), d[a * ks + b], acc);
                } else {
                    for (int a = 0; a < ks; a++) {
                        if (iy0 + a < 0 || iy0 + a >= H) continue;
                        for (int b = 0; b < ks; b++) {
                            if (ix0 + b < 0 || ix0 + b >= W) continue;
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(
                                m, base + ((long)a * W + ix0 + b) * sp), d[a * ks + b], acc);
                        }
                    }
                }
                _mm512_storeu_ps(v, activate(act, acc));
            }
        }
    }
}

typedef void (*dw_fn)(int, const TilesArgs *, const long *, int, const float *, int, long,
                      __mmask16, const float *, const float *, float *);
/* one instance per filter size, each compiled once per activation (no branch per pixel) */
#define DW_ACT(K, A) dw_rows(K, A, g, tiles, count, src, ulo, sp, m, D, bias2, v)
#define DW_FIXED(K) static void dw_##K(int act, const TilesArgs *g, const long *tiles, \
        int count, const float *src, int ulo, long sp, __mmask16 m, const float *D, \
        const float *bias2, float *v) \
        { \
            switch (act) { \
            case ACT_RELU: DW_ACT(K, ACT_RELU); break; \
            case ACT_RELU6: DW_ACT(K, ACT_RELU6); break; \
            case ACT_SILU: DW_ACT(K, ACT_SILU); break; \
            case ACT_SIGMOID: DW_ACT(K, ACT_SIGMOID); break; \
            default: DW_ACT(K, ACT_NONE); \
            } \
        }
DW_FIXED(3) DW_FIXED(5) DW_FIXED(7)

/* Any other filter size: the taps' count at run time */
static void dw_any(int act, const TilesArgs *g, const long *tiles, int count,
                   const float *src, int ulo, long sp, __mmask16 m, const float *D,
                   const float *bias2, float *v)
{
    const int ks = g->ks;
    switch (act) {
    case ACT_RELU: DW_ACT(ks, ACT_RELU); break;
    case ACT_RELU6: DW_ACT(ks, ACT_RELU6); break;
    case ACT_SILU: DW_ACT(ks, ACT_SILU); break;
    case ACT_SIGMOID: DW_ACT(ks, ACT_SIGMOID); break;
    default: DW_ACT(ks, ACT_NONE);
    }
}

/* v (rows of Rp floats) = act2(depthwise middle conv + bias2) of the group's tiles */
static void middle_depthwise(const TilesArgs *g, const long *tiles, int count,
                             const float *src, int ulo, long sp, float *v)
{
    const int R = g->r, Rp = round16i(R);
    const dw_fn fn = g->ks == 3 ? dw_3 : g->ks == 5 ? dw_5 : g->ks == 7 ? dw_7 : dw_any;
    for (int c0 = 0; c0 < Rp; c0 += 16)
        fn(g->act2, g, tiles, count, src + c0, ulo, sp, lanes(R - c0), g->k + c0,
           g->bias2 ? g->bias2 + c0 : 0, v + c0);
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

/* Whether tile rows a and b share image and tile row */
static int same_row(const long *a, const long *b) { return a[0] == b[0] && a[1] == b[1]; }

/* Threads' share of the work before the tiles: the masker's rows of cells */
static void share(long total, int t, int nt, int *lo, int *hi)
{
    *lo = (int)(total * t / nt);
    *hi = (int)(total * (t + 1) / nt);
}

/* g: the weights and geometry (args.h's TilesArgs). x: (N, C, XH, XW) float32, NCHW
 * (g->xnchw) or NHWC in memory (NHWC where there is no first conv, or a k1 x k1 or strided
 * one); y: (N, O, OH, OW), NCHW (g->ynchw) or NHWC, holding the shortcut, the body added
 * at the kept tiles; mask: N x gh x gw floats (gh, gw: the output's rows and columns of S
 * x S tiles, the last ones clipped), > 0 where a tile is kept: read, or with mw the
 * masker's decisions written there (decide: mw its C weights, mb its bias); tiles: room
 * for 3 N gh gw longs (the kept tiles, in order); scratch: threads x scratch_floats(g)
 * floats. Returns the kept tiles' count. */
int tiles_forward(const TilesArgs *g, const float *x, float *y, float *mask, const float *mw,
                  const float *mb, long *tiles, float *scratch, int threads)
{
    const int Rp = round16i(g->r), G = g->group;
    const long per = scratch_floats(g), rows = (long)G * g->s * g->s;
    const long HW = (long)g->h * g->w;
    int T = 0;
    #pragma omp parallel num_threads(threads)
    {
        const int th = omp_get_thread_num(), nt = omp_get_num_threads();
        if (mw) {
            int r0, r1;
            share((long)g->n * grid_rows(g), th, nt, &r0, &r1);
            decide(g, x, mw, mb, mask, r0, r1);
            #pragma omp barrier
        }
        #pragma omp single
        T = kept_tiles(g, mask, tiles);
        float *col = scratch + per * th;
        float *v = col + col_floats(g);
        float *out = g->b ? v + whole_lines(rows * Rp) : v;
        Window wn = {-1, 0, 0, 0, 0, 0};
        if (g->a) {
            wn.u = out + whole_lines(rows * (g->b ? round16i(g->o) : Rp));
            wn.done = (unsigned char *)(wn.u + whole_lines((long)window_rows(g) * g->w * Rp));
            wn.need = wn.done + (long)window_rows(g) * g->w;
        }
        int e, end;
        share(T, th, nt, &e, &end);
        while (e < end) {
            /* the segment: this share's next tiles in one tile row [e, f) */
            int f = e + 1;
            while (f < end && same_row(tiles + 3L * f, tiles + 3L * e)) f++;
            const float *src;
            long sp;
            int ulo;
            if (g->a) {
                fill_window(g, x, tiles + 3L * e, f - e, &wn, col);
                src = wn.u, sp = Rp, ulo = wn.lo;
            } else
                src = x + tiles[3L * e] * HW * g->c, sp = g->c, ulo = 0;
            for (int c; e < f; e += c) {  /* up to G of its tiles per call */
                c = f - e < G ? f - e : G;
                const long *kept = tiles + 3L * e;
                if (g->depthwise) middle_depthwise(g, kept, c, src, ulo, sp, v);
                else middle_dense(g, kept, c, src, ulo, sp, col, v);
                if (g->b)
                    gemm(c * g->s * g->s, g->o, g->r, v, Rp, g->b, g->bias, out,
                         round16i(g->o), 0);
                add_tiles(g, kept, c, out, y);
            }
        }
    }
    return T;
}

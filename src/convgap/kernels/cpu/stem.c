/* A network's stem and the block after it in one pass: fp32, AVX-512.
 *
 *   u = act1(conv(x, A) + bias1)     (k1 x k1, stride st1, zero padding k1 / 2, C -> R:
 *                                     the stem, C small: 3 for an RGB image)
 *   v = act2(dw(u, D) + bias2)       (depthwise k x k, stride 1, zero padding k / 2)
 *   [v *= gate(v)]                   (squeeze-excitation: per image and channel, from v's
 *                                     mean through two small layers)
 *   y = v @ B + bias                 (1x1, R -> O), written NHWC
 *
 * MobileNetV2's stem and first inverted residual (no expansion, no residual) are this, and
 * EfficientNet's stem and first MBConv (with the squeeze-excitation). Run
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
 * reach y. With squeeze-excitation v is written once (the rows each thread writes are the
 * ones it reads back, scaled, in the second pass). Compiled at first use by
 * convgap.kernels.cpu.build. */
#include <string.h>
#include <omp.h>

#include "act.h"
#include "args.h"
#include "bands.h"
#include "se.h"

ARGS_LAYOUT(StemArgs, STEM_ARGS)

#define MAX_RV 4

static inline int rp_of(const StemArgs *g) { return (g->r + 15) / 16 * 16; }
static inline int op_of(const StemArgs *g) { return (g->o + 15) / 16 * 16; }

/* One thread's window of u ((TH + k - 1) rows of OW + k - 1 pixels, zero columns on both
 * sides) and one row of v (OW pixels), Rp floats a pixel. */
static long band_floats(const StemArgs *g)
{
    const long rp = rp_of(g), pad = g->k - 1;
    return whole_lines((g->th + pad) * (g->ow + pad) * rp + (long)g->ow * rp);
}

/* Floats of scratch one thread needs. With squeeze-excitation the batch's v (the map), the
 * per-thread channel sums, the gates and the squeeze's S values follow the threads' band
 * scratch in one buffer: each thread's share counts them whole, so that threads x this
 * covers them for any thread count (as pdp.c's). */
long scratch_floats(const StemArgs *g)
{
    const long rp = rp_of(g);
    if (!g->se) return band_floats(g);
    return band_floats(g) + whole_lines((long)g->n * g->oh * g->ow * rp + 2L * g->n * rp
                                        + whole_lines(g->se));
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

/* One row of v: the depthwise step over the window rows win[0 .. k) (each OW + k - 1
 * pixels, u's first pixel at column k / 2) into t (OW pixels of Rp floats). */
static inline __attribute__((always_inline)) void dw_row(
    const StemArgs *g, float *const *win, float *t, const int RV)
{
    const int k = g->k, rp = RV * 16, OW = g->ow;
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
}

/* One output row: the 1x1 of v's row t into y's row yr (OW pixels of O floats). */
static inline __attribute__((always_inline)) void pw_row(
    const StemArgs *g, const float *t, float *yr, const int RV)
{
    const int rp = RV * 16, OW = g->ow, O = g->o, op = op_of(g), R = g->r;
    int ox;
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

/* The squeeze-excitation gate of image n (Rp floats into gate): the mean of v (the nt
 * threads' sums, each Rp floats per image), s = se_act(mean @ wr^T + br) (S values, in
 * s), gate = gate_act(s @ wu + bu). Lanes past R have zero weights. */
static void squeeze(const StemArgs *g, const float *sums, int nt, int n, float *s,
                    float *gate)
{
    const int rp = rp_of(g), S = g->se;
    se_mean(sums, nt, (long)g->n * rp, n, g->r, rp, (float)g->oh * g->ow, gate);
    se_gate(gate, g->wr, g->br, g->wu, g->bu, S, rp, g->se_act, g->gate, s, gate);
}

/* The thread's range of output rows (see the top). With squeeze-excitation (sums not
 * NULL) each row of v goes into map (the batch's v, NHWC) and into the thread's channel
 * sums (Rp floats an image) instead of through the 1x1. */
static inline __attribute__((always_inline)) void run_range(
    const StemArgs *g, const float *x, float *y, float *buf, int t, int nt, float *map,
    float *sums, const int RV, const int PX)
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
            if (sums) {
                float *v = map + ((long)n * OH + oy + r) * OW * rp;
                dw_row(g, win, v, RV);
                for (int v0 = 0; v0 < rp; v0 += 16) {
                    __m512 acc = _mm512_loadu_ps(sums + (long)n * rp + v0);
                    for (int ox = 0; ox < OW; ox++)
                        acc = _mm512_add_ps(acc, _mm512_loadu_ps(v + (long)ox * rp + v0));
                    _mm512_storeu_ps(sums + (long)n * rp + v0, acc);
                }
                continue;
            }
            dw_row(g, win, t_row, RV);
            pw_row(g, t_row, y + (((long)n * OH + oy + r) * OW) * g->o, RV);
        }
    }
}

/* Pass 2 of the squeeze-excitation: the thread's range of rows of map scaled by their
 * image's gate and run through the 1x1 (the rows each thread reads are the ones it wrote). */
static inline __attribute__((always_inline)) void scale_range(
    const StemArgs *g, float *y, int t, int nt, float *map, const float *gates, const int RV)
{
    const int rp = RV * 16, OH = g->oh, OW = g->ow;
    const long total = (long)g->n * OH;
    for (long i = total * t / nt; i < total * (t + 1) / nt; i++) {
        const int n = (int)(i / OH);
        float *v = map + i * OW * rp;
        for (int v0 = 0; v0 < rp; v0 += 16) {
            const __m512 s = _mm512_loadu_ps(gates + (long)n * rp + v0);
            for (int ox = 0; ox < OW; ox++)
                _mm512_storeu_ps(v + (long)ox * rp + v0,
                                 _mm512_mul_ps(s, _mm512_loadu_ps(v + (long)ox * rp + v0)));
        }
        pw_row(g, v, y + i * OW * g->o, RV);
    }
}

#define RUN(body) \
    switch (rv) { \
    case 1: { const int RV = 1, PX = 8; (void)PX; body; break; } \
    case 2: { const int RV = 2, PX = 8; (void)PX; body; break; } \
    case 3: { const int RV = 3, PX = 4; (void)PX; body; break; } \
    default: { const int RV = 4, PX = 4; (void)PX; body; break; } \
    }

/* x: (N, C, H, W) through its strides; y: (N, O, OH, OW) NHWC; scratch: threads x
 * scratch_floats(g). With squeeze-excitation (g->se > 0), whose gate needs the whole v of
 * an image before the 1x1: two passes in one parallel region, a barrier and the gates
 * between them (as pdp.c's se_forward). */
void stem_forward(const StemArgs *g, const float *x, float *y, float *scratch, int threads)
{
    const long band = band_floats(g);
    const int rv = rp_of(g) / 16;
    const long rp = rp_of(g);
    float *map = scratch + band * threads;   /* the layout scratch_floats counts */
    float *sums = map + (long)g->n * g->oh * g->ow * rp;
    float *gates = sums + (long)threads * g->n * rp;
    float *svals = gates + (long)g->n * rp;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *buf = scratch + band * t;
        if (!g->se) {
            RUN(run_range(g, x, y, buf, t, nt, NULL, NULL, RV, PX))
        } else {
            float *sum = sums + (long)t * g->n * rp;
            memset(sum, 0, sizeof(float) * g->n * rp);
            RUN(run_range(g, x, y, buf, t, nt, map, sum, RV, PX))
            #pragma omp barrier
            for (int i = t; i < g->n; i += nt)
                squeeze(g, sums, nt, i, svals + t * whole_lines(g->se), gates + (long)i * rp);
            #pragma omp barrier
            RUN(scale_range(g, y, t, nt, map, gates, RV))
        }
    }
}

/* Fused pointwise -> depthwise -> pointwise convolution, fp32, AVX-512, channels innermost.
 *
 *   u = act1(x @ A + bias1)            (1x1 conv, C -> R channels)
 *   v = act2(depthwise(u, D) + bias2)  (kh x kw, one filter per channel; stride, dilation,
 *                                       zero padding)
 *   y = v @ B + bias (+ x: residual)   (1x1 conv, R -> O channels)
 *
 * With the activations (act.h) and the residual add this is a MobileNetV2 inverted residual
 * block (batch norms folded into the weights and biases); each epilogue runs where its data
 * is in cache: act1 on the u rows the first GEMM just wrote, bias2 and act2 in the depthwise
 * step's registers, the residual add on the output band just stored.
 *
 * Each thread walks a contiguous range of output rows and keeps a sliding window of u rows
 * (and one band of v rows) in its own scratch, so u and v never travel to memory: every u row
 * is computed once per image and range. The maps are NHWC; an NCHW x is read in place (the
 * first GEMM's A operand k-major) and the output band stored into y's planes. Compiled at
 * first use by convgap.kernels.cpu.build. */
#include <string.h>
#include <omp.h>

#include "act.h"
#include "args.h"
#include "bands.h"
#include "se.h"
#include "gemm.h"

ARGS_LAYOUT(PdpArgs, PDP_ARGS)

/* One 16-channel slice of the depthwise step: rows [0, th) of v from output rows oh.. of the
 * u window holding input rows [ulo, ...), plus the slice's bias2 (16 floats, or NULL), then
 * act (an ACT_ code). The slice's kh x kw taps stay in registers; taps that fall in the zero
 * padding are skipped (checked only at the borders). */
static inline __attribute__((always_inline)) void dw_slice(const int kh, const int kw,
        const int act, const float *u, int ulo, int H, int W, int Rp, const float *D,
        const float *bias2, int sh, int sw, int ph, int pw, int dh, int dw, int oh, int th,
        int OW, float *v)
{
    const __m512 b0 = bias2 ? _mm512_loadu_ps(bias2) : _mm512_setzero_ps();
    __m512 d[kh * kw];
    for (int t = 0; t < kh * kw; t++) d[t] = _mm512_loadu_ps(D + (long)t * Rp);
    for (int r = 0; r < th; r++) {
        const int ih0 = (oh + r) * sh - ph;
        const int full = ih0 >= 0 && ih0 + (kh - 1) * dh < H;
        const float *base = u + (long)(ih0 - ulo) * W * Rp;
        float *out = v + (long)r * OW * Rp;
        for (int ow = 0; ow < OW; ow++) {
            __m512 acc = b0;
            const int iw0 = ow * sw - pw;
            if (full && iw0 >= 0 && iw0 + (kw - 1) * dw < W) {
                for (int i = 0; i < kh; i++)
                    for (int j = 0; j < kw; j++)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(
                            base + ((long)i * dh * W + iw0 + j * dw) * Rp), d[i * kw + j], acc);
            } else {
                for (int i = 0; i < kh; i++) {
                    if (ih0 + i * dh < 0 || ih0 + i * dh >= H) continue;
                    for (int j = 0; j < kw; j++) {
                        if (iw0 + j * dw < 0 || iw0 + j * dw >= W) continue;
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(
                            base + ((long)i * dh * W + iw0 + j * dw) * Rp), d[i * kw + j], acc);
                    }
                }
            }
            _mm512_storeu_ps(out + (long)ow * Rp, activate(act, acc));
        }
    }
}

typedef void (*dw_fn)(int, const float *, int, int, int, int, const float *, const float *,
                      int, int, int, int, int, int, int, int, int, float *);
/* one instance per filter size, each compiled once per activation (no branch per pixel) */
#define DW_ACT(a, b, A) dw_slice(a, b, A, u, ulo, H, W, Rp, D, bias2, sh, sw, ph, pw, dh, dw, \
                                 oh, th, OW, v)
#define DW_FIXED(a, b) static void dw_##a##x##b(int act, const float *u, int ulo, int H, \
        int W, int Rp, const float *D, const float *bias2, int sh, int sw, int ph, int pw, \
        int dh, int dw, int oh, int th, int OW, float *v) \
        { \
            switch (act) { \
            case ACT_RELU: DW_ACT(a, b, ACT_RELU); break; \
            case ACT_RELU6: DW_ACT(a, b, ACT_RELU6); break; \
            case ACT_SILU: DW_ACT(a, b, ACT_SILU); break; \
            case ACT_SIGMOID: DW_ACT(a, b, ACT_SIGMOID); break; \
            default: DW_ACT(a, b, ACT_NONE); \
            } \
        }
DW_FIXED(3, 3) DW_FIXED(5, 5) DW_FIXED(7, 7) DW_FIXED(3, 1) DW_FIXED(1, 3)

/* v = act(depthwise(u window) + bias2), all Rp channels, 16 at a time (bias2: Rp floats or
 * NULL; act: an ACT_ code; common filter sizes keep their taps in registers, any other size
 * reads them from memory) */
static void depthwise(const float *u, int ulo, int H, int W, int Rp, const float *D,
                      const float *bias2, int act, int kh, int kw, int sh, int sw, int ph,
                      int pw, int dh, int dw, int oh, int th, int OW, float *v)
{
    dw_fn fixed = kh == 3 && kw == 3 ? dw_3x3 : kh == 5 && kw == 5 ? dw_5x5
                : kh == 7 && kw == 7 ? dw_7x7 : kh == 3 && kw == 1 ? dw_3x1
                : kh == 1 && kw == 3 ? dw_1x3 : 0;
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        const float *uc = u + c0, *Dc = D + c0, *bc = bias2 ? bias2 + c0 : 0;
        float *vc = v + c0;
        if (fixed) {
            fixed(act, uc, ulo, H, W, Rp, Dc, bc, sh, sw, ph, pw, dh, dw, oh, th, OW, vc);
            continue;
        }
        const __m512 b0 = bc ? _mm512_loadu_ps(bc) : _mm512_setzero_ps();
        for (int r = 0; r < th; r++)
            for (int ow = 0; ow < OW; ow++) {
                __m512 acc = b0;
                for (int i = 0; i < kh; i++) {
                    int ih = (oh + r) * sh - ph + i * dh;
                    if (ih < 0 || ih >= H) continue;
                    for (int j = 0; j < kw; j++) {
                        int iw = ow * sw - pw + j * dw;
                        if (iw < 0 || iw >= W) continue;
                        acc = _mm512_fmadd_ps(
                            _mm512_loadu_ps(uc + ((long)(ih - ulo) * W + iw) * Rp),
                            _mm512_loadu_ps(Dc + (long)(i * kw + j) * Rp), acc);
                    }
                }
                _mm512_storeu_ps(vc + ((long)r * OW + ow) * Rp, activate(act, acc));
            }
    }
}

/* y += x over ``runs`` runs of len floats, ``apart`` floats from one run to the next: the
 * residual add on an output band whose pixels are the input's (C = O, same rows and
 * columns), one run for NHWC, one per channel plane for NCHW */
static void add_runs(float *y, const float *x, int runs, long len, long apart)
{
    for (int p = 0; p < runs; p++) {
        float *yp = y + p * apart;
        const float *xp = x + p * apart;
        long i = 0;
        for (; i + 16 <= len; i += 16)
            _mm512_storeu_ps(yp + i, _mm512_add_ps(_mm512_loadu_ps(yp + i),
                                                   _mm512_loadu_ps(xp + i)));
        if (i < len) {
            const __mmask16 m = lanes((int)(len - i));
            _mm512_mask_storeu_ps(yp + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yp + i),
                                                           _mm512_maskz_loadu_ps(m, xp + i)));
        }
    }
}

/* Rows of the u window a band of TH output rows needs */
static int window_rows(int TH, int kh, int sh, int dh) { return (TH - 1) * sh + (kh - 1) * dh + 1; }

/* Floats of one thread's band scratch: the u window, one band of v (and of y, for NCHW), in
 * whole cache lines (bands.h). */
static long band_floats(const PdpArgs *g)
{
    const int Rp = (g->r + 15) / 16 * 16;
    return whole_lines((long)window_rows(g->th, g->kh, g->sh, g->dh) * g->w * Rp
                       + (long)g->th * g->ow * Rp + (g->nchw ? (long)g->th * g->ow * g->o : 0));
}

/* Floats of scratch one thread needs. With squeeze-excitation the depthwise output of the
 * whole batch (the map), the per-thread channel sums, the gates and the squeeze's S values
 * follow the threads' band scratch in one buffer: each thread's share counts them whole, so
 * that threads x this covers them for any thread count. */
long scratch_floats(const PdpArgs *g)
{
    const long Rp = (g->r + 15) / 16 * 16;
    if (!g->se) return band_floats(g);
    return band_floats(g) + (long)g->n * g->oh * g->ow * Rp + 2L * g->n * Rp
           + whole_lines(g->se);
}

/* The first part of a band (image n, output rows [oh, oh + th)): slide the thread's window
 * of u rows (u: its buffer) down to the rows the band needs, computing the new ones (the
 * first 1x1 conv, bias1 and act1, still in cache; without a first conv, g->a NULL, x's rows
 * copied), then the depthwise step into v (rows of OW x Rp floats). */
static void band_v(const PdpArgs *g, Walk *wk, const float *x, float *u, int n, int oh,
                   int th, float *v)
{
    const int H = g->h, W = g->w, C = g->c, R = g->r, kh = g->kh, sh = g->sh, ph = g->ph;
    const int dh = g->dh, Rp = (R + 15) / 16 * 16;
    int lo = oh * sh - ph, hi = (oh + th - 1) * sh - ph + (kh - 1) * dh + 1;
    if (lo < 0) lo = 0;
    if (hi > H) hi = H;
    int drop = slide(wk, n, lo);  /* the window: input rows [ulo, uhi) */
    if (drop)
        memmove(u, u + (long)drop * W * Rp, sizeof(float) * (wk->hi - wk->lo) * W * Rp);
    const int ulo = wk->lo, uhi = wk->hi;
    if (hi > uhi) {
        float *rows = u + (long)(uhi - ulo) * W * Rp;
        const long pixels = (long)(hi - uhi) * W;
        if (!g->a && g->nchw)  /* no first 1x1 (C = R): x's rows themselves, transposed */
            for (int c = 0; c < C; c++) {
                const float *plane = x + ((long)n * C + c) * H * W + (long)uhi * W;
                for (long p = 0; p < pixels; p++) rows[p * Rp + c] = plane[p];
            }
        else if (!g->a)
            for (long p = 0; p < pixels; p++)
                memcpy(rows + p * Rp, x + ((long)n * H + uhi) * W * C + p * C,
                       sizeof(float) * C);
        else if (g->nchw)
            gemm_kmajor((int)pixels, R, C, x + ((long)n * C * H + uhi) * W, (long)H * W,
                        g->a, g->bias1, rows, Rp, PF_X);
        else
            gemm((int)pixels, R, C, x + ((long)n * H + uhi) * W * C, C, g->a, g->bias1,
                 rows, Rp, PF_X);
        activate_floats(g->act1, rows, pixels * Rp);  /* the new rows, still in cache */
        wk->hi = hi;
    }
    depthwise(u, ulo, H, W, Rp, g->d, g->bias2, g->act2, kh, g->kw, sh, g->sw, ph, g->pw, dh,
              g->dw, oh, th, g->ow, v);
}

/* The last part of a band: y's rows [oh, oh + th) of image n from the band's v (rows of OW x
 * Rp floats): the last 1x1 conv with its bias (through tile, th x OW x O floats, for NCHW),
 * or without one v itself (plus the map); then the residual add. */
static void band_y(const PdpArgs *g, const float *x, float *y, float *v, float *tile, int n,
                   int oh, int th)
{
    const int O = g->o, OH = g->oh, OW = g->ow, R = g->r, nchw = g->nchw;
    const int Rp = (R + 15) / 16 * 16;
    float *yb = nchw ? y + ((long)n * O * OH + oh) * OW : y + ((long)n * OH + oh) * OW * O;
    if (!g->b) {  /* no second 1x1 conv: v (+ the per-column map) is the output */
        for (int r = 0; r < th; r++)
            for (int ow = 0; ow < OW; ow++) {
                float *vp = v + ((long)r * OW + ow) * Rp;
                if (g->map)
                    for (int c = 0; c < R; c++) vp[c] += g->map[(long)ow * Rp + c];
                if (!nchw) memcpy(yb + ((long)r * OW + ow) * O, vp, sizeof(float) * R);
            }
        if (nchw) store_planes(th * OW, O, v, Rp, yb, (long)OH * OW);
    } else if (nchw) {  /* the band in NHWC, then into the output's planes */
        gemm(th * OW, O, R, v, Rp, g->b, g->bias, tile, O, 0);
        store_planes(th * OW, O, tile, O, yb, (long)OH * OW);
    } else
        gemm(th * OW, O, R, v, Rp, g->b, g->bias, yb, O, PF_C);
    if (g->residual) {  /* x's pixels at the band's offset in y */
        const float *xb = x + (yb - y);
        if (nchw) add_runs(yb, xb, O, (long)th * OW, (long)OH * OW);
        else add_runs(yb, xb, 1, (long)th * OW * O, 0);
    }
}

/* sum[c] += v[p][c] over the band's pixels (rows of Rp floats), while the band is in cache */
static void add_channels(float *sum, const float *v, long pixels, int Rp)
{
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        __m512 acc = _mm512_loadu_ps(sum + c0);
        for (long p = 0; p < pixels; p++)
            acc = _mm512_add_ps(acc, _mm512_loadu_ps(v + p * Rp + c0));
        _mm512_storeu_ps(sum + c0, acc);
    }
}

/* The squeeze-excitation gate of image n (Rp floats into gate): the mean of the depthwise
 * output (the nt threads' sums, each Rp floats per image), s = se_act(mean @ wr^T + br) (S
 * values, in s), gate = gate_act(s @ wu + bu). */
static void squeeze(const PdpArgs *g, const float *sums, int nt, int n, float *s, float *gate)
{
    const int Rp = (g->r + 15) / 16 * 16, S = g->se;
    /* the mean, kept in gate until the last step; channels past R (whatever the first
     * GEMM left in u's padding columns, never written) as zeros */
    se_mean(sums, nt, (long)g->n * Rp, n, g->r, Rp, (float)g->oh * g->ow, gate);
    se_gate(gate, g->wr, g->br, g->wu, g->bu, S, Rp, g->se_act, g->gate, s, gate);
}

/* v[p][c] *= gate[c] over the band's pixels (rows of Rp floats) */
static void scale_channels(float *v, const float *gate, long pixels, int Rp)
{
    for (int c0 = 0; c0 < Rp; c0 += 16) {
        const __m512 s = _mm512_loadu_ps(gate + c0);
        for (long p = 0; p < pixels; p++)
            _mm512_storeu_ps(v + p * Rp + c0, _mm512_mul_ps(s, _mm512_loadu_ps(v + p * Rp + c0)));
    }
}

/* The block with squeeze-excitation (g->se > 0), whose gate needs the whole depthwise
 * output of an image before the last 1x1 conv: two passes in one parallel region. Pass 1
 * walks each thread's range of output rows as pdp_forward does, writing v into the map (the
 * batch's depthwise output, NHWC) and adding each band into the thread's channel sums while
 * it is in cache; after a barrier the threads compute the images' gates; after another, pass
 * 2 walks the same range again, scaling each band of the map by its gate and running the
 * last 1x1 conv and the residual add on it (the band each thread reads is the one it wrote).
 * One call, where the block as torch ops is twelve. */
static void se_forward(const PdpArgs *g, const float *x, float *y, float *scratch, int threads)
{
    const int N = g->n, OH = g->oh, OW = g->ow, TH = g->th;
    const int Rp = (g->r + 15) / 16 * 16;
    const long band = band_floats(g), total = (long)N * OH;
    float *map = scratch + band * threads;  /* the layout scratch_floats counts */
    float *sums = map + total * OW * Rp;
    float *gates = sums + (long)threads * N * Rp;
    float *svals = gates + (long)N * Rp;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *u = scratch + band * t;
        float *tile = u + (long)window_rows(TH, g->kh, g->sh, g->dh) * g->w * Rp
                      + (long)TH * OW * Rp;
        float *sum = sums + (long)t * N * Rp;
        memset(sum, 0, sizeof(float) * N * Rp);
        Walk wk = walk_start(total, t, nt);
        int n, oh, th;
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            float *v = map + ((long)n * OH + oh) * OW * Rp;
            band_v(g, &wk, x, u, n, oh, th, v);
            add_channels(sum + (long)n * Rp, v, (long)th * OW, Rp);
        }
        #pragma omp barrier
        for (int i = t; i < N; i += nt)
            squeeze(g, sums, nt, i, svals + t * whole_lines(g->se), gates + (long)i * Rp);
        #pragma omp barrier
        wk = walk_start(total, t, nt);
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            float *v = map + ((long)n * OH + oh) * OW * Rp;
            scale_channels(v, gates + (long)n * Rp, (long)th * OW, Rp);
            band_y(g, x, y, v, tile, n, oh, th);
        }
    }
}

/* g: the weights and the geometry (args.h's PdpArgs). x: (N, H, W, C) contiguous, or (N, C, H,
 * W) with g->nchw (y alike); g->a: pack_b of the (C x R) pointwise weight, or NULL for none
 * (C = R: the depthwise step reads x, after act1); g->bias1: its bias
 * (R rounded up to 16 floats) or NULL; g->act1: the activation on u (act.h's ACT_ codes);
 * g->d: (kh * kw) x Rp depthwise taps, Rp = R rounded up to 16 (columns past R are never read
 * back); g->bias2: their bias (Rp floats) or NULL; g->act2: the activation on v; g->b: pack_b
 * of the (R x O) pointwise weight, or NULL for none (O = R: the depthwise result plus g->map,
 * OW x Rp floats added per output column, or NULL, is the output: a flattened convolution);
 * g->bias: O rounded up to 16 floats, or NULL; g->residual: 1 to add x to the output (only
 * where C = O, OH = H and OW = W with stride 1: the wrapper checks); g->se > 0: a
 * squeeze-excitation between the depthwise step and the last 1x1 conv (se_forward); y: (N,
 * OH, OW, O) contiguous; scratch: threads x scratch_floats(g) floats. Output rows are split
 * evenly over the threads; each walks its rows in bands of TH. */
void pdp_forward(const PdpArgs *g, const float *x, float *y, float *scratch, int threads)
{
    if (g->se) {
        se_forward(g, x, y, scratch, threads);
        return;
    }
    const int OH = g->oh, OW = g->ow, TH = g->th;
    const int Rp = (g->r + 15) / 16 * 16;
    const long per = scratch_floats(g);
    const long total = (long)g->n * OH;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *u = scratch + per * t;
        float *v = u + (long)window_rows(TH, g->kh, g->sh, g->dh) * g->w * Rp;
        float *tile = v + (long)TH * OW * Rp;  /* the output band, for NCHW */
        Walk wk = walk_start(total, t, nt);
        int n, oh, th;
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            band_v(g, &wk, x, u, n, oh, th, v);
            band_y(g, x, y, v, tile, n, oh, th);
        }
    }
}

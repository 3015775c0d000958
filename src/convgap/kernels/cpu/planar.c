/* The fused factorized convolutions on channel-major (NCHW) maps, fp32, AVX-512:
 *
 *   u  = A x                            (1x1 conv, C -> Z R1 channels)
 *   v1 = conv(u, K1)  or depthwise      (kh1 x kw1; stride (sh1, 1), dilation, zero padding)
 *   v2 = conv(v1, K2) or v2 = v1        (1 x kw2 along rows, width stride 1)
 *   y  = B v2 + bias                    (1x1 conv, Z R3 -> O channels)
 *
 * pcp.c and pdp.c hold output channels in their vectors (NHWC maps; NCHW read in place and
 * each output band transposed into planes). Here every map stays channel-major: pixels fill
 * the vectors and weights are broadcast (gemm.h's gemm_planar), which also keeps the vectors
 * full where the ranks are narrow (a 24-channel Tucker core, a tensor ring's 7-channel
 * groups). Each thread walks a contiguous range of output rows in bands (bands.h), keeping a
 * window of u's rows per channel plane, zero-padded (the first 1x1 conv stores its rows
 * there, gemm.h's RowMap), so each convolution runs over the band's rows as one flat range
 * of pixels: the pixels in the padding columns are computed and dropped as the last
 * convolution writes the band compacted for the last GEMM. With a second convolution the
 * first must run along columns only (kw1 = 1), so its output lands in the second's padded
 * layout with zeros in the padding. Z > 1: groups of channels sharing both filters (a
 * tensor ring's bond). With g->nhwc the input and output maps are channels-innermost (a
 * channels_last tensor) while the intermediates stay channel-major: the first 1x1 conv runs
 * in the packed orientation (pixels as rows) and its rows are transposed into the window's
 * planes (16 x 16 blocks through registers), and the last reads the band's planes as a
 * k-major operand (gemm_kmajor), writing pixel rows of the output. g->wino: the first
 * convolution (3 x 3, stride and dilation 1, no second one) runs as Winograd F(2x2, 3x3),
 * chunks of tile rows at a time (see wino_input). */
#include <limits.h>
#include <string.h>
#include <omp.h>

#include "args.h"
#include "bands.h"
#include "gemm.h"

ARGS_LAYOUT(PlanarArgs, PLANAR_ARGS)

#define SLACK 80  /* floats after each plane: flat ranges read up to a row's padding and a
                     vector's remainder past it */
#define ROW_LANES 115  /* see rowwise in planar_forward */
#define WINO_TILES 64  /* g->wino: tiles per chunk (each of its 16 GEMMs: a 64-pixel block) */
/* out[p * ldo] = X row p . w (K floats) for p < M (X rows ldx apart): 16 rows at a time,
 * each summed in its own vector and reduced at the end. */
static void dot_rows(int M, int K, const float *X, long ldx, const float *w, float *out,
                     long ldo)
{
    for (int p0 = 0; p0 < M; p0 += 16) {
        const float *rows[16];
        for (int i = 0; i < 16; i++)  /* rows past M repeat the last (their sums dropped) */
            rows[i] = X + (long)(p0 + i < M ? p0 + i : M - 1) * ldx;
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __mmask16 m = lanes(K - k);
            const __m512 wv = load_masked(m, w + k);
            for (int i = 0; i < 16; i++)
                acc[i] = _mm512_fmadd_ps(load_masked(m, rows[i] + k), wv, acc[i]);
        }
        for (int i = 0; i < 16 && p0 + i < M; i++)
            out[(long)(p0 + i) * ldo] = _mm512_reduce_add_ps(acc[i]);
    }
}

typedef struct {
    int w1;         /* width after the first convolution */
    int pl, wp;     /* interior column offset and padded width of the window (and of v1) */
    int ld1;        /* g->nhwc: floats per pixel row of t1 (Z R1, rounded up to 16 unless
                       g->pairs) */
    int rows1;      /* rows of the window */
    long pu, pv;    /* plane strides of the window and of the band buffers v1, v2 */
    int tc, trc;    /* g->wino: 2 x 2 tiles per row of the output, tile rows per chunk */
    long ldw;       /* g->wino: floats per channel of a chunk's transformed tiles */
    long t1, u, v1, v2, vc, wv, wm;  /* floats of each buffer */
} Sizes;

static Sizes sizes(const PlanarArgs *g)
{
    Sizes s;
    const int W = g->w, kw2 = g->kw2, TH = g->th;
    s.w1 = W + 2 * g->pw1 - g->dw1 * (g->kw1 - 1);
    if (kw2) {  /* the first convolution is vertical: the window takes the second's padding */
        int right = (g->ow - 1) + (kw2 - 1) * g->dw2 + 1 - g->pw2 - s.w1;
        s.pl = g->pw2;
        s.wp = s.pl + W + (right > 0 ? right : 0);
    } else {
        int right = (s.w1 - 1) + (g->kw1 - 1) * g->dw1 + 1 - g->pw1 - W;
        s.pl = g->pw1;
        s.wp = s.pl + W + (right > 0 ? right : 0);
    }
    /* (Winograd: one more row, read by a last tile row that is half past the band) */
    s.rows1 = (TH - 1) * g->sh1 + (g->kh1 - 1) * g->dh1 + 1 + (g->wino ? 1 : 0);
    const long z = g->z;
    s.pu = (long)s.rows1 * s.wp + SLACK;
    s.pv = (long)TH * s.wp + SLACK;
    s.ld1 = (int)(g->pairs ? z * g->r1 : (z * g->r1 + 15) / 16 * 16);
    /* g->nhwc: the first 1x1's pixel rows (and a pair's); NCHW ones go straight to u */
    s.t1 = g->nhwc ? ((long)s.rows1 * W + 1) * s.ld1 : 0;
    s.u = z * g->r1 * s.pu;
    s.v1 = kw2 ? z * g->r2 * s.pv : 0;
    /* v2: only an unstrided depthwise filter's padded rows (see rowwise in planar_forward) */
    s.v2 = g->depthwise && g->sh1 == 1 ? z * g->r3 * s.pv : 0;
    s.vc = z * g->r3 * ((long)TH * g->ow + SLACK);
    /* Winograd chunks: about WINO_TILES tiles, whole tile rows, at most the band's */
    s.tc = (g->ow + 1) / 2;
    const int trc = (WINO_TILES + s.tc / 2) / s.tc, tr_max = (TH + 1) / 2;
    s.trc = trc < 1 ? 1 : trc > tr_max ? tr_max : trc;
    s.ldw = ((long)s.trc * s.tc + 15) / 16 * 16;
    s.wv = g->wino ? 16L * g->r1 * s.ldw : 0;
    s.wm = g->wino ? 16L * g->r2 * s.ldw + 16 : 0;  /* (16: reads past the last row) */
    return s;
}

/* Batch 1 (g->n = 1), each thread one band of at least ext rows: the threads compute the
 * window rows where their bands meet once, and copy them from each other after a barrier
 * (banded, both computed them: at 128@28 with 2 threads, 15 rows of the first 1x1 conv
 * each instead of 14). The bound between threads t - 1 and t, the first padded row that
 * t computes, for t's first output row g: the input row at its filter's centre, clamped
 * into the rows both windows hold [g sh1, (g - 1) sh1 + ext). */
static long shared_bound(long g, int sh1, int ph1, int ext)
{
    const long lo = g * sh1, hi_prev = (g - 1) * sh1 + ext;
    const long b = lo + ph1 < hi_prev ? lo + ph1 : hi_prev;
    return b > lo ? b : lo;
}

/* Floats of scratch one thread needs, in whole cache lines (bands.h). */
long scratch_floats(const PlanarArgs *g)
{
    Sizes s = sizes(g);
    return whole_lines(s.t1 + s.u + s.v1 + s.v2 + s.vc + s.wv + s.wm);
}

/* d[0, n) <- s[0, n): the short rows the kernel moves between its buffers (an image row,
 * 7 to 56 floats in resnets), inline, sparing memcpy's call and size dispatch per row (the
 * window fill and band compaction of a 10x tensor ring at 128@28, batch 8: 32 -> 27 us of
 * 480 per thread) */
static inline void copy_row(float *d, const float *s, int n)
{
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    if (i < n) {
        const __mmask16 m = lanes(n - i);
        _mm512_mask_storeu_ps(d + i, m, load_masked(m, s + i));
    }
}

/* d (nc rows ldd apart, np floats each) <- the transpose of s (np rows lds apart, nc floats
 * each), for np, nc <= 16: one 16 x 16 block through registers (unpacks of 32- then 64-bit
 * pairs, then two rounds of 128-bit lane shuffles), 2.5x faster than copying by element. */
static void transpose16(const float *s, long lds, int np, int nc, float *d, long ldd)
{
    __m512 r[16], a[16], b[16];
    const __mmask16 cm = lanes(nc), pm = lanes(np);
    for (int i = 0; i < 16; i++)
        r[i] = i >= np ? _mm512_setzero_ps() : nc == 16 ? _mm512_loadu_ps(s + i * lds)
             : load_masked(cm, s + i * lds);
    for (int i = 0; i < 16; i += 2) {  /* per 128-bit lane: rows i, i+1 interleaved */
        a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)  /* b[i + c], lane L: element 4L + c of rows i..i+3 */
        for (int h = 0; h < 2; h++) {
            __m512d lo = _mm512_castps_pd(a[i + h]), hi = _mm512_castps_pd(a[i + h + 2]);
            b[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
            b[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
        }
    for (int c = 0; c < 4; c++) {  /* gather lane L of b[c], b[4 + c], b[8 + c], b[12 + c] */
        __m512 e0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88);
        __m512 e1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);
        __m512 e2 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88);
        __m512 e3 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
        const __m512 col[4] = {_mm512_shuffle_f32x4(e0, e2, 0x88),
                               _mm512_shuffle_f32x4(e1, e3, 0x88),
                               _mm512_shuffle_f32x4(e0, e2, 0xDD),
                               _mm512_shuffle_f32x4(e1, e3, 0xDD)};
        for (int L = 0; L < 4; L++)
            if (4 * L + c < nc) _mm512_mask_storeu_ps(d + (4 * L + c) * ldd, pm, col[L]);
    }
}

/* v[ch][q] = sum_t u[ch][q + offs[t]] * d[ch][t] over Npix pixels, for nch channel planes:
 * four vectors of pixels at a time (independent sums), each tap's weight broadcast once */
static void depthwise_planar(int nch, int taps, const long *offs, const float *d,
                             const float *u, long pu, int Npix, float *v, long pv)
{
    for (int ch = 0; ch < nch; ch++) {
        const float *uc = u + ch * pu, *dc = d + (long)ch * taps;
        float *vc = v + ch * pv;
        int q = 0;
        for (; q + 64 <= Npix; q += 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int t = 0; t < taps; t++) {
                const float *p = uc + q + offs[t];
                const __m512 w = _mm512_set1_ps(dc[t]);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p), w, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16), w, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 32), w, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 48), w, a3);
            }
            _mm512_storeu_ps(vc + q, a0);
            _mm512_storeu_ps(vc + q + 16, a1);
            _mm512_storeu_ps(vc + q + 32, a2);
            _mm512_storeu_ps(vc + q + 48, a3);
        }
        for (; q < Npix; q += 16) {
            const __mmask16 m = lanes(Npix - q);
            __m512 acc = _mm512_setzero_ps();
            for (int t = 0; t < taps; t++)
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, uc + q + offs[t]),
                                      _mm512_set1_ps(dc[t]), acc);
            _mm512_mask_storeu_ps(vc + q, m, acc);
        }
    }
}

/* Winograd F(2 x 2, 3 x 3) for a 3 x 3 convolution with stride and dilation 1 (g->wino):
 * each 2 x 2 block of outputs from its 4 x 4 block of inputs as Y = A^T [U . V] A, with
 * V = B^T d B per input channel and U = G g G^T per filter (prepared by the caller), so the
 * 9 products per output of a channel pair become 16 per 4 outputs (2.25x fewer), in 16
 * GEMMs over the tiles (pixels in the vectors: 16 tiles, 32 output columns). Tiles are
 * numbered row by row over a chunk of tile rows; V and M hold 16 planes (xi nu) of R
 * channels, ldw floats each. */
static const int EVEN[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const int ODD[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
static const int LO[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const int HI[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* V <- B^T d B for the tiles of trows tile rows, tc per row, whose inputs start at row 0
 * of u (R1 planes pu apart, rows wp apart) */
static void wino_input(int R1, const float *u, long pu, long wp, int tc, int trows, float *V,
                       long ldw)
{
    const __m512i ie = _mm512_loadu_si512(EVEN), io = _mm512_loadu_si512(ODD);
    for (int c = 0; c < R1; c++)
        for (int i = 0; i < trows; i++)
            for (int j0 = 0; j0 < tc; j0 += 16) {
                /* columns 2j .. 2j + 31 (from p) and 2j + 2 .. 2j + 33 of the 4 rows */
                const float *p = u + c * pu + 2L * i * wp + 2 * j0;
                __m512 a[4], b[4], a2[4], b2[4];
                for (int k = 0; k < 4; k++) {
                    a[k] = _mm512_loadu_ps(p + k * wp);
                    b[k] = _mm512_loadu_ps(p + k * wp + 16);
                    a2[k] = _mm512_loadu_ps(p + k * wp + 2);
                    b2[k] = _mm512_loadu_ps(p + k * wp + 18);
                }
                /* B^T down the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3 */
                __m512 sa[4] = {_mm512_sub_ps(a[0], a[2]), _mm512_add_ps(a[1], a[2]),
                                _mm512_sub_ps(a[2], a[1]), _mm512_sub_ps(a[1], a[3])};
                __m512 sb[4] = {_mm512_sub_ps(b[0], b[2]), _mm512_add_ps(b[1], b[2]),
                                _mm512_sub_ps(b[2], b[1]), _mm512_sub_ps(b[1], b[3])};
                __m512 sa2[4] = {_mm512_sub_ps(a2[0], a2[2]), _mm512_add_ps(a2[1], a2[2]),
                                 _mm512_sub_ps(a2[2], a2[1]), _mm512_sub_ps(a2[1], a2[3])};
                __m512 sb2[4] = {_mm512_sub_ps(b2[0], b2[2]), _mm512_add_ps(b2[1], b2[2]),
                                 _mm512_sub_ps(b2[2], b2[1]), _mm512_sub_ps(b2[1], b2[3])};
                const __mmask16 m = lanes(tc - j0);
                float *v = V + (long)c * ldw + (long)i * tc + j0;
                for (int k = 0; k < 4; k++) {  /* then across the columns, per tile */
                    __m512 c0 = _mm512_permutex2var_ps(sa[k], ie, sb[k]);
                    __m512 c1 = _mm512_permutex2var_ps(sa[k], io, sb[k]);
                    __m512 c2 = _mm512_permutex2var_ps(sa2[k], ie, sb2[k]);
                    __m512 c3 = _mm512_permutex2var_ps(sa2[k], io, sb2[k]);
                    const long pl = (long)R1 * ldw;  /* one (xi nu) plane */
                    _mm512_mask_storeu_ps(v + (4 * k + 0) * pl, m, _mm512_sub_ps(c0, c2));
                    _mm512_mask_storeu_ps(v + (4 * k + 1) * pl, m, _mm512_add_ps(c1, c2));
                    _mm512_mask_storeu_ps(v + (4 * k + 2) * pl, m, _mm512_sub_ps(c2, c1));
                    _mm512_mask_storeu_ps(v + (4 * k + 3) * pl, m, _mm512_sub_ps(c1, c3));
                }
            }
}

/* out rows (R2 planes pv apart, rows wp apart, rows_left of them from row 0) <- A^T M A for
 * trows tile rows of tc tiles: output columns 2j, 2j + 1 of tile j, those below OW */
static void wino_output(int R2, const float *M, long ldw, int tc, int trows, int rows_left,
                        int OW, float *out, long pv, long wp)
{
    const __m512i il = _mm512_loadu_si512(LO), ih = _mm512_loadu_si512(HI);
    const long pl = (long)R2 * ldw;
    for (int o = 0; o < R2; o++)
        for (int i = 0; i < trows; i++)
            for (int j0 = 0; j0 < tc; j0 += 16) {
                const float *m = M + (long)o * ldw + (long)i * tc + j0;
                __m512 q0[4], q1[4];
                for (int nu = 0; nu < 4; nu++) {  /* A^T down: m0 + m1 + m2, m1 - m2 - m3 */
                    __m512 m0 = _mm512_loadu_ps(m + nu * pl);
                    __m512 m1 = _mm512_loadu_ps(m + (4 + nu) * pl);
                    __m512 m2 = _mm512_loadu_ps(m + (8 + nu) * pl);
                    __m512 m3 = _mm512_loadu_ps(m + (12 + nu) * pl);
                    q0[nu] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                    q1[nu] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
                }
                const int n = OW - 2 * j0;  /* output columns left from 2 j0 */
                for (int r = 0; r < 2 && 2 * i + r < rows_left; r++) {
                    const __m512 *q = r ? q1 : q0;  /* then across */
                    __m512 y0 = _mm512_add_ps(_mm512_add_ps(q[0], q[1]), q[2]);
                    __m512 y1 = _mm512_sub_ps(_mm512_sub_ps(q[1], q[2]), q[3]);
                    float *dst = out + o * pv + (2L * i + r) * wp + 2 * j0;
                    _mm512_mask_storeu_ps(dst, lanes(n), _mm512_permutex2var_ps(y0, il, y1));
                    _mm512_mask_storeu_ps(dst + 16, lanes(n - 16),
                                          _mm512_permutex2var_ps(y0, ih, y1));
                }
            }
}

/* g: the weights and the geometry (args.h's PlanarArgs). x: (N, C, H, W) contiguous; g->a: A^T,
 * (Z R1) x C row-major; g->k1: taps x R2 x R1 row-major (depthwise: R1 x taps); g->k2: kw2 taps
 * x R3 x R2 or NULL; g->b: B, O x (Z R3) row-major; g->bias: O floats or NULL; y: (N, O, OH, OW)
 * contiguous; g->wino: g->k1 is U = G g G^T, 16 x R2 x R1 row-major (xi nu, out, in); scratch:
 * threads x scratch_floats, zeros when new, and used by this geometry alone: the zero padding of
 * the window's rows is never written (rows are filled between their padding columns and moved
 * whole), so it is zeroed once with the buffer rather than on every call (1.2 us of a 65 us
 * call). g->nhwc: x is (N, H, W, C) and y (N, OH, OW, O) in memory, g->a is pack_b of the (C,
 * Z R1) weight (with g->tail last columns run as dot products, for a tensor ring's 49 = 48 + 1
 * channels: pack_b of the others, then those rows of A^T; planar.py's first_tail; with
 * g->pairs, 8 or 24 channels computed two pixels at a time: pack_b of [A^T | A^T], gemm.h's
 * gemm_pairs), g->b pack_b of the (Z R3, O) one, and g->bias (or NULL) is padded to 16 floats. */
void planar_forward(const PlanarArgs *g, const float *x, float *y, float *scratch, int threads)
{
    const float *At = g->a, *K1t = g->k1, *K2t = g->k2, *Bt = g->b, *bias = g->bias;
    const Sizes s = sizes(g);
    const int N = g->n, H = g->h, W = g->w, C = g->c, O = g->o;
    const int OH = g->oh, OW = g->ow, TH = g->th, Z = g->z;
    const int R1 = g->r1, R2 = g->r2, R3 = g->r3, ZR1 = Z * R1;
    const int sh1 = g->sh1, ph1 = g->ph1, kw2 = g->kw2, dw = g->depthwise;
    const int nhwc = g->nhwc, ld1 = s.ld1, wino = g->wino;
    const int taps1 = g->kh1 * g->kw1;
    const long per = scratch_floats(g), wp = s.wp;
    const long ldvc = (long)TH * OW + SLACK;
    long offs1[taps1], offs2[kw2 > 0 ? kw2 : 1];
    for (int i = 0; i < g->kh1; i++)
        for (int j = 0; j < g->kw1; j++)
            offs1[i * g->kw1 + j] = (long)i * g->dh1 * wp + (long)j * g->dw1;
    for (int j = 0; j < kw2; j++) offs2[j] = (long)j * g->dw2;
    const long total = (long)N * OH;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *t1 = scratch + per * t, *u = t1 + s.t1, *v1 = u + s.u, *v2 = v1 + s.v1;
        float *vc = v2 + s.v2, *wv = vc + s.vc, *wm = wv + s.wv;
        Walk wk = walk_start(total, t, nt);
        int n, oh, th;
        const int ext = (g->kh1 - 1) * g->dh1 + 1;  /* input rows per output row */
        /* shared window rows (see shared_bound): this thread computes padded rows [b0, b1) */
        const int share = N == 1 && nt > 1 && TH >= (total + nt - 1) / nt && total / nt >= ext;
        const long b0 = share && t > 0 ? shared_bound(total * t / nt, sh1, ph1, ext) : LONG_MIN;
        const long b1 = share && t < nt - 1 ? shared_bound(total * (t + 1) / nt, sh1, ph1, ext)
                                             : LONG_MAX;
        while (next_band(&wk, OH, TH, &n, &oh, &th)) {
            int lo = oh * sh1, hi = (oh + th - 1) * sh1 + ext;
            int drop = slide(&wk, n, lo);  /* the window: padded rows [ulo, uhi) per plane */
            for (int ch = 0; drop && ch < ZR1; ch++)
                memmove(u + ch * s.pu, u + ch * s.pu + drop * wp,
                        sizeof(float) * (wk.hi - wk.lo) * wp);
            const int ulo = wk.lo, uhi = wk.hi;
            /* new window rows [uhi, hi): the image's rows among them by one GEMM (shared:
             * those in [b0, b1), the others copied from the neighbours' windows below) */
            int r0 = uhi - ph1, r1 = hi - ph1;
            if (share && r0 < b0 - ph1) r0 = (int)b0 - ph1;
            if (share && r1 > b1 - ph1) r1 = (int)b1 - ph1;
            if (r0 < 0) r0 = 0;
            if (r1 > H) r1 = H;
            if (r1 > r0 && nhwc) {  /* t1: pixel rows of ld1 floats */
                const int tail = g->tail, np = (r1 - r0) * W;
                const float *xs = x + ((long)n * H + r0) * W * C;
                const float *wt = At + packed_floats(1, C, ZR1 - tail);  /* (tail, C) */
                if (g->pairs)
                    gemm_pairs(np, ZR1, C, xs, C, At, t1, PF_X);
                else
                    gemm(np, ZR1 - tail, C, xs, C, At, 0, t1, ld1, PF_X);
                for (int j = 0; j < tail; j++)
                    dot_rows(np, C, xs, C, wt + (long)j * C, t1 + ZR1 - tail + j, ld1);
            } else if (r1 > r0) {  /* straight into the window's padded rows */
                const RowMap into_window = {W, (int)wp, s.pl, W};
                gemm_planar_mapped(ZR1, (r1 - r0) * W, C, 1, NO_OFFSET, At,
                                   x + ((long)n * C * H + r0) * W, (long)H * W, 0,
                                   u + (long)(r0 + ph1 - ulo) * wp, s.pu,
                                   x + (long)N * C * H * W, PF_X, &into_window);
            }
            for (int ip = uhi; ip < hi; ip++) {
                const int ih = ip - ph1;
                float *row = u + (ip - ulo) * wp;  /* of plane 0 */
                if (ih >= 0 && ih < H && (ip < b0 || ip >= b1))
                    continue;  /* a neighbour's (below) */
                if (nhwc && ih >= 0 && ih < H) {  /* t1's pixel rows, transposed */
                    const float *src = t1 + (long)(ih - r0) * W * ld1;
                    for (int w = 0; w < W; w += 16)
                        for (int c = 0; c < ZR1; c += 16)
                            transpose16(src + (long)w * ld1 + c, ld1, W - w < 16 ? W - w : 16,
                                        ZR1 - c < 16 ? ZR1 - c : 16, row + c * s.pu + s.pl + w,
                                        s.pu);
                    continue;
                }
                if (ih < 0 || ih >= H)  /* (the image's rows: the GEMM's, above) */
                    for (int ch = 0; ch < ZR1; ch++)
                        memset(row + ch * s.pu, 0, sizeof(float) * wp);
            }
            if (share) {  /* each thread's one band: its window is final once filled */
                #pragma omp barrier
                for (int ip = uhi; ip < hi; ip++) {
                    const int ih = ip - ph1;
                    if (ih < 0 || ih >= H || (ip >= b0 && ip < b1))
                        continue;
                    /* the row's owner, whose window (one band) starts at its first row */
                    const int o = ip < b0 ? t - 1 : t + 1;
                    const long olo = total * o / nt * sh1;
                    const float *src = scratch + per * o + s.t1 + (ip - olo) * wp;
                    float *row = u + (ip - ulo) * wp;
                    for (int ch = 0; ch < ZR1; ch++)
                        copy_row(row + ch * s.pu, src + ch * s.pu, (int)wp);
                }
            }
            if (hi > uhi) wk.hi = hi;
            /* The last convolution writes the band compacted (vc: OW columns a row, no
             * padding columns), sparing a copy: Winograd's output transform; a second
             * convolution row by row where that takes at most ROW_LANES (in %) of the lanes
             * of the flat range (a tensor ring at 128@28: 28 of 32 lanes against 420 of 432;
             * 2.5% faster than the flat range's mapped stores, whose masked stores weigh on
             * GEMMs this short), else as the first one; a strided first one row by row, an
             * unstrided one flat with gemm_planar's stores mapped from the padded rows
             * (RowMap); only an unstrided depthwise filter (CP) leaves padded rows to copy
             * (row by row it ran 2-4% slower, copy spared or not). */
            const int rowwise = kw2 && 100L * th * ((OW + 15) / 16 * 16) <=
                                ROW_LANES * ((th * wp + 15) / 16 * 16);
            const int last1 = !kw2, by_rows = sh1 != 1;
            const int to_vc = last1 && (by_rows || !dw);  /* the first is last, compacted */
            const RowMap compact = {(int)wp, OW, 0, OW};
            const RowMap *map1 = to_vc && !by_rows ? &compact : 0;
            /* first convolution: the band's rows as one flat range, or row by row (strided) */
            const int rows = by_rows ? th : 1;
            const int npix = !by_rows ? th * (int)wp : to_vc ? OW : (int)wp;
            float *out1 = to_vc ? vc : kw2 ? v1 : v2;
            const long po = to_vc ? ldvc : s.pv, ro = to_vc ? OW : wp;  /* plane, row strides */
            /* Winograd: by chunks of tile rows, as even as s.trc allows */
            const int tr = (th + 1) / 2, chunks = (tr + s.trc - 1) / s.trc;
            const int trc = (tr + chunks - 1) / chunks;
            for (int i0 = 0; wino && i0 < tr; i0 += trc) {
                const int trows = tr - i0 < trc ? tr - i0 : trc;
                const float *a = u + ((long)oh - ulo + 2 * i0) * wp;
                wino_input(R1, a, s.pu, wp, s.tc, trows, wv, s.ldw);
                for (int xn = 0; xn < 16; xn++)
                    gemm_planar(R2, trows * s.tc, R1, 1, NO_OFFSET, K1t + (long)xn * R2 * R1,
                                wv + xn * R1 * s.ldw, s.ldw, 0, wm + xn * R2 * s.ldw, s.ldw,
                                0, 0);
                wino_output(R2, wm, s.ldw, s.tc, trows, th - 2 * i0, OW, vc + 2L * i0 * OW,
                            ldvc, OW);
            }
            for (int r = 0; !wino && r < rows; r++) {
                const float *a = u + ((long)(oh + r) * sh1 - ulo) * wp;
                float *o1 = out1 + r * ro;
                if (dw)
                    depthwise_planar(R1, taps1, offs1, K1t, a, s.pu, npix, o1, po);
                else
                    for (int z = 0; z < Z; z++)
                        gemm_planar_mapped(R2, npix, R1, taps1, offs1, K1t, a + z * R1 * s.pu,
                                           s.pu, 0, o1 + z * (kw2 ? R2 : R3) * po, po, 0, 0,
                                           map1);
            }
            for (int z = 0; kw2 && z < Z; z++)  /* second convolution, along rows */
                if (rowwise)
                    for (int r = 0; r < th; r++)
                        gemm_planar(R3, OW, R2, kw2, offs2, K2t, v1 + z * R2 * s.pv + r * wp,
                                    s.pv, 0, vc + z * R3 * ldvc + (long)r * OW, ldvc, 0, 0);
                else
                    gemm_planar_mapped(R3, th * (int)wp, R2, kw2, offs2, K2t,
                                       v1 + z * R2 * s.pv, s.pv, 0, vc + z * R3 * ldvc, ldvc,
                                       0, 0, &compact);
            /* compact the band (drop the padding columns), then the last 1x1 conv */
            for (int ch = 0; dw && !by_rows && ch < Z * R3; ch++)
                for (int r = 0; r < th; r++)
                    copy_row(vc + ch * ldvc + (long)r * OW, v2 + ch * s.pv + r * wp, OW);
            if (nhwc)  /* the band's pixels are consecutive output rows */
                gemm_kmajor(th * OW, O, Z * R3, vc, ldvc, Bt, bias,
                            y + ((long)n * OH + oh) * OW * O, O, PF_C);
            else
                gemm_planar(O, th * OW, Z * R3, 1, NO_OFFSET, Bt, vc, ldvc, bias,
                            y + ((long)n * O * OH + oh) * OW, (long)OH * OW, 0, PF_C);
        }
    }
}

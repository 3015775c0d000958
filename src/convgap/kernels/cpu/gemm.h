/* The GEMM core shared by convgap's C kernels: fp32, AVX-512.
 *
 *   C (M x N, row stride ldc) [=|+=] sum over taps t of A_t (M x K, row stride lda) @ B_t
 *
 * A_t is A shifted by offs[t] floats: a convolution's filter taps over a zero-padded window
 * of a channels-innermost map are such shifted views, so one call is an implicit-GEMM
 * convolution (taps = 1, offs = {0}: a plain GEMM). B is packed by pack_b: panels of 64
 * columns (the last rounded up to 16), each holding, tap after tap, K rows of its width.
 * Register blocks: 6 rows x 4 vectors, or 12 rows x 2 vectors for panels up to 32 wide
 * (24 accumulators either way). gemm_planar is the transposed orientation for channel-major
 * maps (pixels in the vectors, weights broadcast), whose results may change row width as
 * they are stored (RowMap); gemm_pairs runs rows two at a time where N is 8 or 24. */
#ifndef CONVGAP_GEMM_H
#define CONVGAP_GEMM_H
#include <immintrin.h>

#define PANEL 64

/* A masked load of the 16 floats at p (lanes outside m are zero and never read). An inline
 * vmovups rather than _mm512_maskz_loadu_ps: gcc takes that intrinsic for a read of any
 * memory, the micro-kernel's accumulators included, and then stores all 24 of them back to
 * the stack on every k (about a third of the speed). The asm names no memory, so
 * it must only read what the calling kernel never writes (the GEMM operands). */
static inline __attribute__((always_inline)) __m512 load_masked(__mmask16 m, const float *p)
{
    __m512 r;
    __asm__("vmovups (%1), %0%{%2%}%{z%}" : "=v"(r) : "r"(p), "Yk"(m));
    return r;
}

/* A mask of the first n lanes (all for n >= 16, none for n <= 0) */
static inline __mmask16 lanes(int n)
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* Where the planar orientation's result pixels go when rows change width between the
 * operand and the result: pixel q of the flat range, in rows of sw pixels, lands at
 * q / sw * dw + off + q % sw of its result row; columns from ``valid`` on are dropped. The
 * first 1x1 conv of planar.c writes the image's rows straight into its window's padded
 * ones (sw = the width, dw = the padded width, off = the left padding). */
typedef struct { int sw, dw, off, valid; } RowMap;

/* The mapped stores of one vector column of a block: its pixels from q split at row ends
 * into segments, each a masked store of the vector (its lanes, and where lane 0 goes; one
 * or two segments where rows are 16 pixels or wider), the same for every row block */
typedef struct { int n; __mmask16 m[16]; long at[16]; } Segments;

static inline Segments segments(const RowMap *rm, long q, int lanes_used)
{
    Segments g;
    g.n = 0;
    long row = q / rm->sw;
    int col = (int)(q - row * rm->sw);
    for (int k = 0; k < lanes_used; row++, col = 0) {
        const int seg = rm->sw - col < lanes_used - k ? rm->sw - col : lanes_used - k;
        const int keep = col >= rm->valid ? 0 : rm->valid - col < seg ? rm->valid - col : seg;
        if (keep > 0) {
            g.m[g.n] = (__mmask16)(lanes(keep) << k);
            g.at[g.n++] = row * rm->dw + rm->off + col - k;
        }
        k += seg;
    }
    return g;
}

static inline __attribute__((always_inline)) void ukr(const int mr, const int nv,
        const int planar, int K, int taps, const long *offa, const long *offp, const float *A,
        long lda, const float *P, long ldp, float *C, long ldc, const float *bias,
        __mmask16 last, const Segments *sg)
{
    const int bias_rows = planar == 1 || planar == 2;
    if (planar == 0 || planar == 3) ldp = nv * 16;  /* packed panels: a constant stride */
    __m512 acc[12][4];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++)
            acc[i][v] = !bias ? _mm512_setzero_ps() : bias_rows ? _mm512_set1_ps(bias[i])
                      : _mm512_loadu_ps(bias + 16 * v);
    for (int t = 0; t < taps; t++) {
        const float *At = A + offa[t], *Pt = P + offp[t];
        for (int k = 0; k < K; k++) {
            __m512 b[4];
            const float *pk = Pt + k * ldp;
            for (int v = 0; v < nv - 1; v++) b[v] = _mm512_loadu_ps(pk + 16 * v);
            /* a block that ends its planar operand mid-vector masks its last load */
            b[nv - 1] = planar == 2 ? load_masked(last, pk + 16 * (nv - 1))
                                    : _mm512_loadu_ps(pk + 16 * (nv - 1));
            for (int i = 0; i < mr; i++) {
                /* mode 3: A stored k-major (element (i, k) at A[k * lda + i]: an NCHW map's
                 * pixels x channels) */
                __m512 a = _mm512_set1_ps(At[planar == 3 ? k * lda + i : i * lda + k]);
                for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
            }
        }
    }
    if (sg) {  /* C: the rows' first pixels; each vector's pixels mapped (see RowMap) */
        for (int v = 0; v < nv; v++)
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < sg[v].n; j++)
                    _mm512_mask_storeu_ps(C + i * ldc + sg[v].at[j], sg[v].m[j], acc[i][v]);
        return;
    }
    for (int i = 0; i < mr; i++) {
        for (int v = 0; v < nv - 1; v++) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
        _mm512_mask_storeu_ps(C + i * ldc + 16 * (nv - 1), last, acc[i][nv - 1]);
    }
}

typedef void (*ukr_fn)(int, int, const long *, const long *, const float *, long,
                       const float *, long, float *, long, const float *, __mmask16,
                       const Segments *);
/* one instance per block shape and orientation: packed (ukr_p_*), planar (ukr_q_*),
 * planar ending its operand mid-vector (ukr_m_*), packed with a k-major A (ukr_t_*) */
#define UKR(o, pl, m, n) static void ukr_##o##_##m##_##n(int K, int taps, const long *offa, \
        const long *offp, const float *A, long lda, const float *P, long ldp, float *C, \
        long ldc, const float *bias, __mmask16 last, const Segments *sg) \
        { ukr(m, n, pl, K, taps, offa, offp, A, lda, P, ldp, C, ldc, bias, last, sg); }
#define UKR4(o, pl, m) UKR(o, pl, m, 1) UKR(o, pl, m, 2) UKR(o, pl, m, 3) UKR(o, pl, m, 4)
#define UKR2(o, pl, m) UKR(o, pl, m, 1) UKR(o, pl, m, 2)
#define UKRS_OF(o, pl) UKR4(o, pl, 1) UKR4(o, pl, 2) UKR4(o, pl, 3) UKR4(o, pl, 4) \
        UKR4(o, pl, 5) UKR4(o, pl, 6) UKR2(o, pl, 7) UKR2(o, pl, 8) UKR2(o, pl, 9) \
        UKR2(o, pl, 10) UKR2(o, pl, 11) UKR2(o, pl, 12)
UKRS_OF(p, 0)
UKRS_OF(q, 1)
UKRS_OF(m, 2)
UKRS_OF(t, 3)
#define ROW4(o, m) {ukr_##o##_##m##_1, ukr_##o##_##m##_2, ukr_##o##_##m##_3, ukr_##o##_##m##_4}
#define ROW2(o, m) {ukr_##o##_##m##_1, ukr_##o##_##m##_2, 0, 0}
#define TABLE(o) {ROW4(o, 1), ROW4(o, 2), ROW4(o, 3), ROW4(o, 4), ROW4(o, 5), ROW4(o, 6), \
        ROW2(o, 7), ROW2(o, 8), ROW2(o, 9), ROW2(o, 10), ROW2(o, 11), ROW2(o, 12)}
__attribute__((unused)) static const ukr_fn UKRS[12][4] = TABLE(p);
__attribute__((unused)) static const ukr_fn UKRQ[12][4] = TABLE(q);
__attribute__((unused)) static const ukr_fn UKRM[12][4] = TABLE(m);
__attribute__((unused)) static const ukr_fn UKRT[12][4] = TABLE(t);

static const long NO_OFFSET[1] = {0};

/* The last vector's lanes of a row of n > 0 floats */
static __mmask16 tail_mask(int n)
{
    return lanes(n - (n - 1) / 16 * 16);
}

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

/* ``stream`` arguments: the operands in main memory rather than cache, for the GEMMs to
 * prefetch ahead of use (the layer's input and output maps, read or written in place; the
 * kernels' intermediates stay in cache): PF_X the map operand (gemm_planar's X, the others'
 * A), PF_C the result (with write intent), both, or 0. The packed orientations prefetch
 * the rows PF_AHEAD row blocks ahead, past M too where the caller's next rows follow in
 * memory (prefetches never fault). */
enum { PF_X = 1, PF_C = 2 };
#define PF_AHEAD 4

/* prefetch_rows' targets: read into L1, read into L2 (more misses in flight), write */
enum { PF_L1, PF_L2, PF_W };

/* rows [r0, r0 + rows) of a row-major operand, ``floats`` from ``col`` in each */
static inline __attribute__((always_inline)) void prefetch_rows(const float *base, long ld,
        long r0, int rows, int col, int floats, int hint)
{
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < floats; c += 16) {
            const char *p = (const char *)(base + (r0 + i) * ld + col + c);
            if (hint == PF_W) _mm_prefetch(p, _MM_HINT_ET0);
            else if (hint == PF_L2) _mm_prefetch(p, _MM_HINT_T1);
            else _mm_prefetch(p, _MM_HINT_T0);
        }
}

/* C (M x N) = sum_t A_t @ B_t (+ bias, padded to 16; NULL: none); see the top. ``stream``:
 * see PF_X (with PF_X, taps must be 1). */
__attribute__((unused)) static void gemm_taps(int M, int N, int K, int taps,
        const long *offs, const float *A, long lda, const float *Bp, const float *bias,
        float *C, long ldc, int stream)
{
    long offp[taps];
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        int nw = N - n0 < PANEL ? N - n0 : PANEL, nv = (nw + 15) / 16;
        int mr_max = nv <= 2 ? 12 : 6;
        for (int t = 0; t < taps; t++) offp[t] = (long)t * K * nv * 16;
        const float *P = Bp + (long)n0 * K * taps, *bb = bias ? bias + n0 : 0;
        for (int m0 = 0; m0 < M; m0 += mr_max) {
            int mr = M - m0 < mr_max ? M - m0 : mr_max;
            if (stream & PF_X && n0 == 0)  /* A's rows: read by the first panel's pass */
                prefetch_rows(A, lda, m0 + PF_AHEAD * mr_max, mr_max, 0, K, PF_L1);
            if (stream & PF_C)
                prefetch_rows(C, ldc, m0 + PF_AHEAD * mr_max, mr_max, n0, nw, PF_W);
            UKRS[mr - 1][nv - 1](K, taps, offs, offp, A + m0 * lda, lda, P, nv * 16,
                                 C + m0 * ldc + n0, ldc, bb, tail_mask(nw), 0);
        }
    }
}

/* The planar (channel-major) orientation: C (M channels x Npix pixels, rows ldc apart) =
 * bias (one per row, or NULL) + sum_t W_t (M x K, row-major, taps one after another) @
 * X_t (K rows ldx apart, each Npix pixels), X_t being X shifted by offp[t] floats: pixels
 * are the vector dimension, weights are broadcast. A block ending mid-vector reads whole
 * vectors past pixel Npix (their lanes are dropped) unless that would pass ``end`` (the
 * end of X's memory; NULL: X has slack), where it masks its last vector's loads.
 * ``stream``: see PF_X. While one block of pixels runs, the next block's lines are
 * prefetched, X's rows spread over the row blocks. K planes (or M of C) are K separate
 * streams, more than the hardware prefetchers follow: without this, right after a dense
 * conv (the maps no longer in cache), a 10x tensor-ring layer at 128@28, batch 8, took
 * 680 us instead of 476 (its last 1x1 conv 1.5x slower, its first 1.2x). With ``rm``
 * (see RowMap; NULL: none) the result's pixels are mapped into rows of another width
 * (PF_C then prefetches nothing). */
__attribute__((unused)) static void gemm_planar_mapped(int M, int Npix, int K, int taps,
        const long *offp, const float *Wt, const float *X, long ldx, const float *bias,
        float *C, long ldc, const float *end, int stream, const RowMap *rm)
{
    if (M < 1 || Npix < 1 || taps < 1) return;
    const int nv_max = M > 12 ? 4 : 2, mr_max = nv_max == 4 ? 6 : 12;
    long offa[taps], reach = 0;
    for (int t = 0; t < taps; t++) {
        offa[t] = (long)t * M * K;
        if (offp[t] > reach) reach = offp[t];
    }
    for (int q0 = 0; q0 < Npix; q0 += 16 * nv_max) {
        int nq = Npix - q0 < 16 * nv_max ? Npix - q0 : 16 * nv_max, nv = (nq + 15) / 16;
        int masked = end && X + q0 + reach + (long)(K - 1) * ldx + 16 * nv > end;
        const int blocks = (M + mr_max - 1) / mr_max, qn = q0 + 16 * nv_max;
        const int nqn = Npix - qn < 16 * nv_max ? Npix - qn : 16 * nv_max;
        Segments sg[4];
        for (int v = 0; rm && v < nv; v++)
            sg[v] = segments(rm, q0 + 16 * v, v < nv - 1 ? 16 : nq - 16 * v);
        for (int m0 = 0, b = 0; m0 < M; m0 += mr_max, b++) {
            int mr = M - m0 < mr_max ? M - m0 : mr_max;
            if (stream & PF_C && !rm)
                prefetch_rows(C, ldc, m0, mr, qn, nqn, PF_W);
            if (stream & PF_X) {  /* this row block's share of X's rows */
                const int k0 = K * b / blocks;
                prefetch_rows(X, ldx, k0, K * (b + 1) / blocks - k0, qn, nqn, PF_L2);
            }
            (masked ? UKRM : UKRQ)[mr - 1][nv - 1](K, taps, offa, offp, Wt + (long)m0 * K,
                K, X + q0, ldx, C + m0 * ldc + (rm ? 0 : q0), ldc, bias ? bias + m0 : 0,
                tail_mask(nq), rm ? sg : 0);
        }
    }
}

/* gemm_planar_mapped with the result's pixels as the flat range itself */
__attribute__((unused)) static void gemm_planar(int M, int Npix, int K, int taps,
        const long *offp, const float *Wt, const float *X, long ldx, const float *bias,
        float *C, long ldc, const float *end, int stream)
{
    gemm_planar_mapped(M, Npix, K, taps, offp, Wt, X, ldx, bias, C, ldc, end, stream, 0);
}

/* C (M x N) = A (M x K, k-major: element (i, k) at A[k * lda + i]) @ packed B (+ bias): a 1x1
 * convolution reading an NCHW map in place (rows: pixels of one plane, lda: plane size).
 * ``stream``: see PF_X. */
__attribute__((unused)) static void gemm_kmajor(int M, int N, int K, const float *A,
        long lda, const float *Bp, const float *bias, float *C, long ldc, int stream)
{
    long offp[1];
    for (int n0 = 0; n0 < N; n0 += PANEL) {
        int nw = N - n0 < PANEL ? N - n0 : PANEL, nv = (nw + 15) / 16;
        int mr_max = nv <= 2 ? 12 : 6;
        offp[0] = 0;
        const float *P = Bp + (long)n0 * K;
        for (int m0 = 0; m0 < M; m0 += mr_max) {
            int mr = M - m0 < mr_max ? M - m0 : mr_max;
            if (stream & PF_X && n0 == 0)  /* the K planes' line holding pixel m0 + ahead */
                prefetch_rows(A, lda, 0, K, m0 + PF_AHEAD * mr_max, 1, PF_L1);
            if (stream & PF_C)
                prefetch_rows(C, ldc, m0 + PF_AHEAD * mr_max, mr_max, n0, nw, PF_W);
            UKRT[mr - 1][nv - 1](K, 1, NO_OFFSET, offp, A + m0, lda, P, nv * 16,
                                 C + m0 * ldc + n0, ldc, bias ? bias + n0 : 0, tail_mask(nw),
                                 0);
        }
    }
}

/* Rows in pairs, for N = 8 or 24 (a half vector past a multiple of 16, which the packed
 * orientation would run in 16 or 32 lanes): two rows of C share 2N = 16 or 48 lanes, rows p
 * and p + 1 one after the other. The middle vector takes lanes 0-7 from row p and 8-15 from
 * row p + 1 (a blend of the two rows' broadcasts). P: pack_b of [B | B] (K rows of 2N); a
 * pair's second row is ``next`` floats after its first in A (0: the row paired with itself,
 * an odd M's last). mr pairs x nv = 2N / 16 vectors. */
static inline __attribute__((always_inline)) void pair_ukr(const int mr, const int nv, int K,
        const float *A, long lda, long next, const float *P, float *C)
{
    const int q = nv / 2;  /* the blended vector */
    __m512 acc[12][3];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 w[3];
        for (int v = 0; v < nv; v++) w[v] = _mm512_loadu_ps(P + (long)k * nv * 16 + 16 * v);
        for (int i = 0; i < mr; i++) {
            const float *a = A + 2L * i * lda + k;
            const __m512 b0 = _mm512_set1_ps(a[0]), b1 = _mm512_set1_ps(a[next]);
            for (int v = 0; v < nv; v++)
                acc[i][v] = _mm512_fmadd_ps(w[v], v < q ? b0 : v > q ? b1
                                            : _mm512_mask_blend_ps(0xFF00, b0, b1), acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(C + 16L * (i * nv + v), acc[i][v]);
}

typedef void (*pair_fn)(int, const float *, long, long, const float *, float *);
#define PAIR(m, n) static void pair_##m##_##n(int K, const float *A, long lda, long next, \
        const float *P, float *C) { pair_ukr(m, n, K, A, lda, next, P, C); }
#define PAIR2(m) PAIR(m, 1) PAIR(m, 3)
PAIR2(1) PAIR2(2) PAIR2(3) PAIR2(4) PAIR2(5) PAIR2(6) PAIR2(7) PAIR2(8)
PAIR(9, 1) PAIR(10, 1) PAIR(11, 1) PAIR(12, 1)
__attribute__((unused)) static const pair_fn PAIRS[12][2] = {
    {pair_1_1, pair_1_3}, {pair_2_1, pair_2_3}, {pair_3_1, pair_3_3}, {pair_4_1, pair_4_3},
    {pair_5_1, pair_5_3}, {pair_6_1, pair_6_3}, {pair_7_1, pair_7_3}, {pair_8_1, pair_8_3},
    {pair_9_1, 0}, {pair_10_1, 0}, {pair_11_1, 0}, {pair_12_1, 0}};

/* C (M x N, rows N apart: an odd M's row M, N floats of slack, is written too) = A (M x K)
 * @ B for N = 8 or 24, in row pairs (see pair_ukr; Bp as it says). ``stream``: see PF_X.
 * The first 1x1 conv of a 24-rank Tucker layer on channels_last maps (128 -> 24, one thread,
 * 416 pixels): 13.0 -> 10.6 us, 240 GFLOP/s; in the layer (2 threads, batch 1), 14.6 -> 13.0
 * us per thread. */
__attribute__((unused)) static void gemm_pairs(int M, int N, int K, const float *A, long lda,
        const float *Bp, float *C, int stream)
{
    const int nv = 2 * N / 16, mr_max = nv == 1 ? 12 : 8, pairs = (M + 1) / 2;
    for (int p0 = 0; p0 < pairs; p0 += mr_max) {
        int mr = pairs - p0 < mr_max ? pairs - p0 : mr_max;
        if (stream & PF_X)
            prefetch_rows(A, lda, 2L * (p0 + PF_AHEAD * mr_max), 2 * mr_max, 0, K, PF_L1);
        const int odd = M & 1 && p0 + mr == pairs;  /* the last pair: one row */
        if (mr > odd)
            PAIRS[mr - odd - 1][nv / 2](K, A + 2L * p0 * lda, lda, lda, Bp, C + 2L * p0 * N);
        if (odd)
            PAIRS[0][nv / 2](K, A + (M - 1L) * lda, lda, 0, Bp, C + (M - 1L) * N);
    }
}

/* y (O planes of plane floats, NCHW) <- T (M pixels x O channels, row stride ldt) */
__attribute__((unused)) static void store_planes(int M, int O, const float *T, long ldt,
                                                 float *y, long plane)
{
    for (int o0 = 0; o0 < O; o0 += 16) {  /* 16 channels at a time: T's rows read once */
        int no = O - o0 < 16 ? O - o0 : 16;
        for (int p = 0; p < M; p++) {
            const float *t = T + (long)p * ldt + o0;
            for (int o = 0; o < no; o++) y[(o0 + o) * plane + p] = t[o];
        }
    }
}

/* C (M x N) = A (M x K) @ packed B (+ bias); ``stream``: see PF_X */
__attribute__((unused)) static void gemm(int M, int N, int K, const float *A, long lda,
        const float *Bp, const float *bias, float *C, long ldc, int stream)
{
    gemm_taps(M, N, K, 1, NO_OFFSET, A, lda, Bp, bias, C, ldc, stream);
}
#endif

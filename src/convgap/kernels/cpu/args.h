/* The fused kernels' arguments by name: one struct per kernel (PdpArgs for pdp.c, PcpArgs
 * for pcp.c, PlanarArgs for planar.c, TilesArgs for tiles.c, StemArgs for stem.c) holding
 * its weights and its geometry, built once per bound call by the Python wrapper and passed
 * by pointer:
 *
 *   void <kernel>_forward(const <Kernel>Args *g, const float *x, float *y, float *scratch,
 *                         int threads);
 *   long scratch_floats(const <Kernel>Args *g);   (reads the geometry only)
 *
 * Each struct is written once, as a list of (C type, name) below; the struct and the layout
 * description that args.py checks its ctypes.Structure against (ARGS_LAYOUT) are both
 * generated from that list, so a field added here and not there (or in another order, or of
 * another size) fails when the kernel is loaded rather than shifting its neighbours. Weights
 * first, then ints: no padding between fields. Keep args.py's Structures in the same order.
 * A new field goes in both files; the wrappers build the structs by keyword, and every int
 * field must be given (args.py refuses a struct with one left out). */
#ifndef CONVGAP_ARGS_H
#define CONVGAP_ARGS_H
#include <stddef.h>

/* pdp.c: 1x1 (C -> R) -> depthwise (kh x kw) -> 1x1 (R -> O), with activations and a
 * residual add an inverted residual block, or without the second 1x1 (b NULL) a flattened
 * convolution's lateral, vertical and horizontal filters */
#define PDP_ARGS(F) \
    F(const float *, a)      /* pack_b of the (C x R) first 1x1 weight, or NULL: none */ \
    F(const float *, bias1)  /* its bias, R rounded up to 16 floats, or NULL */ \
    F(const float *, d)      /* (kh * kw) x Rp depthwise taps, Rp = R rounded up to 16 */ \
    F(const float *, bias2)  /* the depthwise step's bias, Rp floats, or NULL */ \
    F(const float *, b)      /* pack_b of the (R x O) last 1x1 weight, or NULL: none */ \
    F(const float *, bias)   /* the output's bias, O rounded up to 16 floats, or NULL */ \
    F(const float *, map)    /* without b: OW x Rp floats added per output column, or NULL */ \
    F(const float *, wr)     /* squeeze-excitation: the (S x Rp) reduce weight, row-major */ \
    F(const float *, br)     /* its bias, S rounded up to 16 floats */ \
    F(const float *, wu)     /* the (S x Rp) expand weight, row-major (gate = s @ wu + bu) */ \
    F(const float *, bu)     /* its bias, Rp floats */ \
    F(int, n) F(int, h) F(int, w) F(int, c)  /* the input (N, C, H, W) */ \
    F(int, r)                /* channels of the intermediates */ \
    F(int, kh) F(int, kw)    /* the depthwise filter's size, */ \
    F(int, sh) F(int, sw)    /* stride, */ \
    F(int, ph) F(int, pw)    /* zero padding (each side) */ \
    F(int, dh) F(int, dw)    /* and dilation */ \
    F(int, o) F(int, oh) F(int, ow)  /* the output (N, O, OH, OW) */ \
    F(int, th)               /* output rows per band */ \
    F(int, nchw)             /* 1: x and y NCHW in memory; 0: NHWC */ \
    F(int, act1) F(int, act2)  /* activations after the first 1x1 and the depthwise step \
                                  (act.h's ACT_ codes; 0: none) */ \
    F(int, residual)         /* 1: y += x (C = O, stride 1, OH = H, OW = W) */ \
    F(int, se)               /* squeeze-excitation's reduced channels S (0: none): v is \
                                scaled per image and channel by gate(se_act(mean(v) @ wr^T \
                                + br) @ wu + bu) before the last 1x1 (needs b) */ \
    F(int, se_act) F(int, gate)  /* its two activations (act.h's ACT_ codes) */

/* pcp.c: 1x1 (C -> Z R1) -> conv (kh1 x kw1, R1 -> R2) [-> conv along rows (1 x kw2,
 * R2 -> R3)] -> 1x1 (Z R3 -> O), Z groups sharing the filters (a tensor ring's bond) */
#define PCP_ARGS(F) \
    F(const float *, a)      /* pack_b of A (C x Z R1, group-major) */ \
    F(const float *, k1)     /* pack_b of the first filter (kh1 * kw1 taps x R1 x R2) */ \
    F(const float *, k2)     /* pack_b of the second (kw2 taps x R2 x R3), or NULL */ \
    F(const float *, b)      /* pack_b of B (Z R3 x O, group-major) */ \
    F(const float *, bias)   /* O rounded up to 16 floats, or NULL */ \
    F(int, n) F(int, h) F(int, w) F(int, c)  /* the input (N, C, H, W) */ \
    F(int, r1) F(int, r2) F(int, r3)  /* channels per group after each step (R3 = R2 \
                                         without a second filter) */ \
    F(int, kh1) F(int, kw1) F(int, sh1) F(int, sw1)  /* the first filter: size, stride, */ \
    F(int, ph1) F(int, pw1) F(int, dh1) F(int, dw1)  /* zero padding, dilation */ \
    F(int, kw2)              /* the second filter's width, 0: none */ \
    F(int, sw2) F(int, pw2) F(int, dw2)  /* its stride, padding and dilation */ \
    F(int, o) F(int, oh) F(int, ow)  /* the output (N, O, OH, OW) */ \
    F(int, th)               /* output rows per band */ \
    F(int, z)                /* groups (1: none); with Z > 1 width strides are 1 */ \
    F(int, nchw)             /* 1: x and y NCHW in memory; 0: NHWC */

/* planar.c: both families' shapes on channel-major intermediates (see planar.c's top) */
#define PLANAR_ARGS(F) \
    F(const float *, a)      /* the first 1x1: A^T (Z R1 x C) row-major; nhwc: packed */ \
    F(const float *, k1)     /* first filter taps x R2 x R1 (depthwise: R1 x taps; wino: \
                                16 x R2 x R1, U = G g G^T) */ \
    F(const float *, k2)     /* kw2 taps x R3 x R2, or NULL */ \
    F(const float *, b)      /* the last 1x1: B (O x Z R3) row-major; nhwc: packed */ \
    F(const float *, bias)   /* O floats (nhwc: rounded up to 16), or NULL */ \
    F(int, n) F(int, h) F(int, w) F(int, c)  /* the input (N, C, H, W) */ \
    F(int, r1) F(int, r2) F(int, r3)  /* channels per group after each step */ \
    F(int, kh1) F(int, kw1)  /* the first filter: size, */ \
    F(int, sh1)              /* row stride (the width stride is 1), */ \
    F(int, ph1) F(int, pw1) F(int, dh1) F(int, dw1)  /* zero padding, dilation */ \
    F(int, kw2) F(int, pw2) F(int, dw2)  /* the second filter along rows (kw2 0: none) */ \
    F(int, o) F(int, oh) F(int, ow)  /* the output (N, O, OH, OW) */ \
    F(int, th)               /* output rows per band */ \
    F(int, z)                /* groups sharing both filters (1: none) */ \
    F(int, depthwise)        /* 1: the first filter is depthwise (R1 = R2 = R3) */ \
    F(int, nhwc)             /* 1: x and y channels-innermost in memory; 0: NCHW */ \
    F(int, wino)             /* 1: the first filter runs as Winograd F(2x2, 3x3) */ \
    F(int, tail)             /* nhwc: the first 1x1's last channels run as dot products */ \
    F(int, pairs)            /* nhwc: the first 1x1 computed two pixels at a time */

/* tiles.c: a residual block's body on kept S x S output tiles, added into the output:
 * [k1 x k1 (C -> R, stride st1, padding k1 / 2)] -> k x k (R -> R, dense or depthwise,
 * stride st, padding k / 2) -> [1x1 (R -> O)] */
#define TILES_ARGS(F) \
    F(const float *, a)      /* pack_b of the (k1 k1 C x R) first weight, rows in window \
                                order (ky, kx, channel), or NULL: none */ \
    F(const float *, bias1)  /* its bias, R rounded up to 16 floats, or NULL */ \
    F(const float *, k)      /* dense: pack_b of the (k k R x R) middle weight, rows in \
                                window order (ky, kx, channel); depthwise: k k x Rp taps */ \
    F(const float *, bias2)  /* the middle conv's bias, Rp floats, or NULL */ \
    F(const float *, b)      /* pack_b of the (R x O) last 1x1 weight, or NULL: none \
                                (O = R, the middle conv's output is the body's) */ \
    F(const float *, bias)   /* its bias, O rounded up to 16 floats, or NULL */ \
    F(int, n) F(int, h) F(int, w)  /* images; the middle conv's input's height, width */ \
    F(int, c) F(int, xh) F(int, xw)  /* the input's channels, height and width */ \
    F(int, k1) F(int, st1)   /* the first conv's size and stride (padding k1 / 2) */ \
    F(int, r)                /* channels of the intermediates */ \
    F(int, ks) F(int, st)    /* the middle conv's size and stride (padding ks / 2) */ \
    F(int, depthwise)        /* 1: the middle conv is depthwise */ \
    F(int, o) F(int, oh) F(int, ow)  /* the output (N, O, OH, OW) */ \
    F(int, s)                /* the tiles' side (granularity) */ \
    F(int, group)            /* tiles per GEMM call, at most */ \
    F(int, act1) F(int, act2)  /* activations after the first and middle convs (ACT_) */ \
    F(int, xnchw) F(int, ynchw)  /* 1: x (y) NCHW in memory; 0: NHWC */

/* stem.c: a network's stem and the block after it: k1 x k1 conv (C -> R, stride st1,
 * padding k1 / 2) + act1 -> depthwise k x k (stride 1, padding k / 2) + act2 -> [squeeze-
 * excitation] -> 1x1 (R -> O) */
#define STEM_ARGS(F) \
    F(const float *, a)      /* the stem's weight, (C k1 k1) x Rp: rows (channel, ky, kx) */ \
    F(const float *, bias1)  /* its bias, Rp floats */ \
    F(const float *, d)      /* the depthwise taps, (k k) x Rp */ \
    F(const float *, bias2)  /* their bias, Rp floats */ \
    F(const float *, b)      /* the 1x1's weight, R x Op row-major (Op = O rounded up to 16) */ \
    F(const float *, bias)   /* its bias, Op floats */ \
    F(const float *, wr)     /* squeeze-excitation: the (S x Rp) reduce weight, row-major */ \
    F(const float *, br)     /* its bias, S rounded up to 16 floats */ \
    F(const float *, wu)     /* the (S x Rp) expand weight, row-major (gate = s @ wu + bu) */ \
    F(const float *, bu)     /* its bias, Rp floats */ \
    F(int, n) F(int, h) F(int, w) F(int, c)  /* the input (N, C, H, W) */ \
    F(int, xsn) F(int, xsc) F(int, xsh) F(int, xsw)  /* its strides, in floats */ \
    F(int, r)                /* the stem's channels (Rp = R rounded up to 16, at most 64) */ \
    F(int, k1) F(int, st1)   /* the stem's filter side and stride */ \
    F(int, k)                /* the depthwise filter's side */ \
    F(int, o) F(int, oh) F(int, ow)  /* the output (N, O, OH, OW), written NHWC */ \
    F(int, th)               /* output rows per band */ \
    F(int, act1) F(int, act2)  /* act.h's ACT_ codes (0: none) */ \
    F(int, se)               /* squeeze-excitation's reduced channels S (0: none): v scaled \
                                per image and channel by gate(se_act(mean(v) @ wr^T + br) \
                                @ wu + bu) before the 1x1 */ \
    F(int, se_act) F(int, gate)  /* its two activations (act.h's ACT_ codes) */

#define ARGS_FIELD(type, name) type name;
typedef struct { PDP_ARGS(ARGS_FIELD) } PdpArgs;
typedef struct { PCP_ARGS(ARGS_FIELD) } PcpArgs;
typedef struct { PLANAR_ARGS(ARGS_FIELD) } PlanarArgs;
typedef struct { TILES_ARGS(ARGS_FIELD) } TilesArgs;
typedef struct { STEM_ARGS(ARGS_FIELD) } StemArgs;

/* The layout check's exports, for one kernel's struct S and its list:
 *   const char *args_names(void): the field names in order, separated by spaces;
 *   long args_layout(long *out, long cap): writes sizeof(S), then each field's offset and
 *     size (as many of these 1 + 2 x fields longs as cap allows); returns the field count. */
#define ARGS_NAME(type, name) #name " "
#define ARGS_PLACE(type, name) \
    if (k + 2 <= cap) { \
        out[k] = (long)offsetof(args_t, name); \
        out[k + 1] = (long)sizeof(((args_t *)0)->name); \
    } \
    k += 2; fields++;
#define ARGS_LAYOUT(S, LIST) \
    const char *args_names(void) { return LIST(ARGS_NAME); } \
    long args_layout(long *out, long cap) \
    { \
        typedef S args_t; \
        long k = 1, fields = 0; \
        if (cap > 0) out[0] = (long)sizeof(args_t); \
        LIST(ARGS_PLACE) \
        return fields; \
    }
#endif

// A whole network as one plan of oneDNN primitives, run by one call.
//
// Python lowers a model's graph step by step (plan.py): each step names its input tensors by
// id and gets its output's id back. Activations are NHWC (or, layout 'any', in the layout
// each primitive picks: blocked nChw16c on AVX-512), reordered only where a consumer wants
// another;
// weights are reordered once, when the step is added; activations and residual adds are
// post-ops; a residual sum accumulates into the shortcut's buffer when Python says it is
// dead after. Buffers are reused by liveness (Python says when a tensor dies); one
// scratchpad serves every primitive. plan_run sets the input and output pointers and runs
// the steps in order on torch's OpenMP threads (libdnnl is linked against the same
// libgomp.so.1 torch loaded).
//
// Every function returns >= 0 on success, -1 on failure with the reason in plan_error().

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAXT 4096
#define MAXS 4096
#define MAXA 16

typedef struct {
    dnnl_memory_desc_t md;
    dnnl_memory_t mem;
    int slot;          // buffer slot (-1: user pointer: the input or the output)
    int external;      // 1: the input, 2: the output
    int last;          // the last step reading or writing it (finalize)
} tensor_t;

typedef struct {
    char impl[48];     // oneDNN's implementation name
    char kind[24];     // the primitive's kind ('convolution', 'reorder', ...)
    dnnl_primitive_t prim;
    int nargs;
    int arg[MAXA];     // DNNL_ARG_*
    int tid[MAXA];     // tensor ids (-1: a constant memory in cmem)
    dnnl_memory_t cmem[MAXA];
    dnnl_memory_t scratch;
} step_t;

typedef struct {
    size_t size;
    void *ptr;
    int busy;
} slot_t;

typedef struct plan {
    dnnl_engine_t eng;
    dnnl_stream_t strm;
    int nt, ns, nslot;
    tensor_t t[MAXT];
    step_t s[MAXS];
    slot_t slot[MAXT];
    size_t scratch_size;
    void *scratch;
    int finalized;
    dnnl_format_tag_t act_tag;  // activations' layout: any (the primitive's pick) or nhwc
    char err[512];
} plan_t;

#define CHECK(p, call, what)                                                   \
    do {                                                                       \
        dnnl_status_t st_ = (call);                                            \
        if (st_ != dnnl_success) {                                             \
            snprintf((p)->err, sizeof((p)->err), "%s failed (oneDNN status %d)", \
                     what, (int)st_);                                          \
            return -1;                                                         \
        }                                                                      \
    } while (0)

const char *plan_error(plan_t *p) { return p->err; }

int plan_version(void) {
    const dnnl_version_t *v = dnnl_version();
    return v->major * 10000 + v->minor * 100 + v->patch;
}

// layout 0: activations in the layout each primitive picks; 1: all NHWC (plain).
plan_t *plan_new(int layout) {
    plan_t *p = calloc(1, sizeof(plan_t));
    if (!p) return NULL;
    p->act_tag = layout == 1 ? dnnl_nhwc : dnnl_format_tag_any;
    if (dnnl_engine_create(&p->eng, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&p->strm, p->eng, dnnl_stream_default_flags) != dnnl_success) {
        free(p);
        return NULL;
    }
    return p;
}

void plan_free(plan_t *p) {
    if (!p) return;
    for (int i = 0; i < p->ns; ++i) {
        step_t *s = &p->s[i];
        if (s->prim) dnnl_primitive_destroy(s->prim);
        for (int a = 0; a < s->nargs; ++a)
            if (s->cmem[a]) {
                void *h = NULL;
                dnnl_memory_get_data_handle(s->cmem[a], &h);
                dnnl_memory_destroy(s->cmem[a]);
                free(h);
            }
        if (s->scratch) dnnl_memory_destroy(s->scratch);
    }
    for (int i = 0; i < p->nt; ++i) {
        if (p->t[i].mem) dnnl_memory_destroy(p->t[i].mem);
        if (p->t[i].md) dnnl_memory_desc_destroy(p->t[i].md);
    }
    for (int i = 0; i < p->nslot; ++i) free(p->slot[i].ptr);
    free(p->scratch);
    dnnl_stream_destroy(p->strm);
    dnnl_engine_destroy(p->eng);
    free(p);
}

static void *aligned(size_t n) {
    void *ptr = NULL;
    if (posix_memalign(&ptr, 64, n ? n : 64) != 0) return NULL;
    return ptr;
}

// A new tensor of layout md (the plan takes md). Its buffer is assigned at finalize.
static int new_tensor(plan_t *p, dnnl_memory_desc_t md, int external) {
    if (p->nt >= MAXT) {
        snprintf(p->err, sizeof(p->err), "more than %d tensors", MAXT);
        dnnl_memory_desc_destroy(md);
        return -1;
    }
    int id = p->nt++;
    p->t[id].md = md;
    p->t[id].external = external;
    p->t[id].slot = -1;
    CHECK(p, dnnl_memory_create(&p->t[id].mem, md, p->eng, DNNL_MEMORY_NONE),
          "memory_create");
    return id;
}

static int clone_md(plan_t *p, const_dnnl_memory_desc_t md, dnnl_memory_desc_t *out) {
    CHECK(p, dnnl_memory_desc_clone(out, md), "memory_desc_clone");
    return 0;
}

// The result of a step: tensor `inplace_of` (>= 0: written in place) or a new tensor of
// layout md.
static int result(plan_t *p, const_dnnl_memory_desc_t md, int inplace_of) {
    if (inplace_of >= 0) return inplace_of;
    dnnl_memory_desc_t own;
    return clone_md(p, md, &own) < 0 ? -1 : new_tensor(p, own, 0);
}

// A plain tensor from dims and strides (elements), float32.
static int plain_md(plan_t *p, int nd, const int64_t *dims, const int64_t *strides,
                    dnnl_memory_desc_t *md) {
    dnnl_dims_t d, s;
    for (int i = 0; i < nd; ++i) d[i] = dims[i], s[i] = strides[i];
    CHECK(p, dnnl_memory_desc_create_with_strides(md, nd, d, dnnl_f32, s),
          "memory_desc_create_with_strides");
    return 0;
}

int plan_input(plan_t *p, int nd, const int64_t *dims, const int64_t *strides) {
    dnnl_memory_desc_t md;
    if (plain_md(p, nd, dims, strides, &md) < 0) return -1;
    return new_tensor(p, md, 1);
}

static step_t *new_step(plan_t *p, const_dnnl_primitive_desc_t pd) {
    if (p->ns >= MAXS) {
        snprintf(p->err, sizeof(p->err), "more than %d steps", MAXS);
        return NULL;
    }
    step_t *s = &p->s[p->ns];
    memset(s, 0, sizeof(*s));
    const char *impl = NULL;
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    snprintf(s->impl, sizeof(s->impl), "%s", impl ? impl : "?");
    dnnl_primitive_kind_t kind = dnnl_undefined_primitive;
    dnnl_primitive_desc_query(pd, dnnl_query_primitive_kind, 0, &kind);
    snprintf(s->kind, sizeof(s->kind), "%s", dnnl_prim_kind2str(kind));
    // oneDNN's reference code is correct but 10-200x slower (a binary post-op whose
    // operand's layout differs from the output's: 60 ms for a 64-channel 32x32 conv)
    if (strncmp(s->impl, "ref", 3) == 0) {
        snprintf(p->err, sizeof(p->err), "oneDNN has only its reference implementation "
                 "(%s) for this step", s->impl);
        return NULL;
    }
    if (dnnl_primitive_create(&s->prim, pd) != dnnl_success) {
        snprintf(p->err, sizeof(p->err), "primitive_create failed");
        return NULL;
    }
    const_dnnl_memory_desc_t smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t ss = smd ? dnnl_memory_desc_get_size(smd) : 0;
    if (ss) {
        if (ss > p->scratch_size) p->scratch_size = ss;
        if (dnnl_memory_create(&s->scratch, smd, p->eng, DNNL_MEMORY_NONE) != dnnl_success) {
            snprintf(p->err, sizeof(p->err), "scratchpad memory_create failed");
            return NULL;
        }
    }
    p->ns++;
    return s;
}

// The step of primitive descriptor pd (created with status st and attributes attr; `what`
// names it in an error), its result tensor into *y (result() of ymd, or of pd's
// destination when ymd is NULL); NULL with the reason in p->err. pd and attr are
// destroyed.
static step_t *step_of(plan_t *p, dnnl_status_t st, dnnl_primitive_desc_t pd,
                       dnnl_primitive_attr_t attr, const char *what,
                       const_dnnl_memory_desc_t ymd, int inplace_of, int *y) {
    dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) {
        snprintf(p->err, sizeof(p->err), "%s failed (oneDNN status %d)", what, (int)st);
        return NULL;
    }
    *y = result(p, ymd ? ymd : dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
                inplace_of);
    step_t *s = *y >= 0 ? new_step(p, pd) : NULL;
    dnnl_primitive_desc_destroy(pd);
    return s;
}

static void add_arg(step_t *s, int arg, int tid, dnnl_memory_t cmem) {
    s->arg[s->nargs] = arg;
    s->tid[s->nargs] = tid;
    s->cmem[s->nargs] = cmem;
    s->nargs++;
}

// A step reading tensor src (as src_arg) and writing its result (as dst_arg): step_of's,
// with those two arguments; the result's id, or -1.
static int unary(plan_t *p, dnnl_status_t st, dnnl_primitive_desc_t pd,
                 dnnl_primitive_attr_t attr, const char *what, const_dnnl_memory_desc_t ymd,
                 int inplace_of, int src, int src_arg, int dst_arg) {
    int y;
    step_t *s = step_of(p, st, pd, attr, what, ymd, inplace_of, &y);
    if (!s) return -1;
    add_arg(s, src_arg, src, NULL);
    add_arg(s, dst_arg, y, NULL);
    return y;
}

static dnnl_primitive_attr_t user_attr(plan_t *p) {
    dnnl_primitive_attr_t attr;
    if (dnnl_primitive_attr_create(&attr) != dnnl_success) return NULL;
    dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    return attr;
}

// A tensor of layout `want` holding tensor `src` (src itself when the layouts agree).
static int as_layout(plan_t *p, int src, const_dnnl_memory_desc_t want) {
    if (dnnl_memory_desc_equal(p->t[src].md, want)) return src;
    dnnl_primitive_desc_t pd;
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_status_t st = dnnl_reorder_primitive_desc_create(&pd, p->t[src].md, p->eng, want,
                                                          p->eng, attr);
    dnnl_primitive_attr_destroy(attr);
    CHECK(p, st, "reorder_primitive_desc_create");
    int dst = result(p, want, -1);
    step_t *s = dst < 0 ? NULL : new_step(p, pd);
    dnnl_primitive_desc_destroy(pd);
    if (!s) return -1;
    add_arg(s, DNNL_ARG_FROM, src, NULL);
    add_arg(s, DNNL_ARG_TO, dst, NULL);
    return dst;
}

// A constant: `data` (plain, dims with tag) reordered once into layout `want`, owned.
static dnnl_memory_t constant(plan_t *p, const float *data, int nd, const int64_t *dims,
                              dnnl_format_tag_t tag, const_dnnl_memory_desc_t want) {
    dnnl_dims_t d;
    for (int i = 0; i < nd; ++i) d[i] = dims[i];
    dnnl_memory_desc_t umd;
    if (dnnl_memory_desc_create_with_tag(&umd, nd, d, dnnl_f32, tag) != dnnl_success)
        return NULL;
    dnnl_memory_t umem = NULL, wmem = NULL;
    void *buf = aligned(dnnl_memory_desc_get_size(want));
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t r = NULL;
    int ok = buf && dnnl_memory_create(&umem, umd, p->eng, (void *)data) == dnnl_success &&
             dnnl_memory_create(&wmem, want, p->eng, buf) == dnnl_success &&
             dnnl_reorder_primitive_desc_create(&pd, umd, p->eng, want, p->eng, NULL) ==
                 dnnl_success &&
             dnnl_primitive_create(&r, pd) == dnnl_success;
    if (ok) {
        dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, umem}, {DNNL_ARG_TO, wmem}};
        ok = dnnl_primitive_execute(r, p->strm, 2, args) == dnnl_success &&
             dnnl_stream_wait(p->strm) == dnnl_success;
    }
    if (r) dnnl_primitive_destroy(r);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (umem) dnnl_memory_destroy(umem);
    dnnl_memory_desc_destroy(umd);
    if (!ok) {
        if (wmem) dnnl_memory_destroy(wmem);
        free(buf);
        snprintf(p->err, sizeof(p->err), "reordering a weight failed");
        return NULL;
    }
    return wmem;
}

// Activation codes (plan.py's ACT): 0 none, else a oneDNN eltwise algorithm with the
// (alpha, beta) it takes (relu6 is clip_v2 on [alpha, beta] = [0, 6]).
static int act_alg(plan_t *p, int act, dnnl_alg_kind_t *alg, float *alpha, float *beta) {
    switch (act) {
    case 1: *alg = dnnl_eltwise_relu; *alpha = 0.f; break;
    case 2: *alg = dnnl_eltwise_clip_v2; break;
    case 3: *alg = dnnl_eltwise_swish; *alpha = 1.f; break;
    case 4: *alg = dnnl_eltwise_gelu_erf; break;
    case 5: *alg = dnnl_eltwise_gelu_tanh; break;
    case 6: *alg = dnnl_eltwise_logistic; break;
    case 7: *alg = dnnl_eltwise_hardswish; *alpha = 1.f / 6.f; *beta = 0.5f; break;
    case 8: *alg = dnnl_eltwise_tanh; break;
    case 9: *alg = dnnl_eltwise_hardsigmoid; *alpha = 1.f / 6.f; *beta = 0.5f; break;
    case 10: *alg = dnnl_eltwise_relu; break;   // leaky: alpha the negative slope
    default:
        snprintf(p->err, sizeof(p->err), "unknown activation code %d", act);
        return -1;
    }
    return 0;
}

static int append_act(plan_t *p, dnnl_post_ops_t ops, int act, float alpha, float beta) {
    dnnl_alg_kind_t alg;
    if (act == 0) return 0;
    if (act_alg(p, act, &alg, &alpha, &beta) < 0) return -1;
    CHECK(p, dnnl_post_ops_append_eltwise(ops, alg, alpha, beta), "post_ops_append_eltwise");
    return 0;
}

// attr with post-ops: [act1], [add: 1 a sum into dst, 2 a binary add of `other`], [act2].
static dnnl_primitive_attr_t post_ops_attr(plan_t *p, int act1, float a1, float b1, int add,
                                           const_dnnl_memory_desc_t other, int act2, float a2,
                                           float b2) {
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_post_ops_t ops;
    if (!attr || dnnl_post_ops_create(&ops) != dnnl_success) return NULL;
    int bad = append_act(p, ops, act1, a1, b1) < 0;
    if (!bad && add == 1)
        bad = dnnl_post_ops_append_sum(ops, 1.f, 0, dnnl_data_type_undef) != dnnl_success;
    if (!bad && add == 2)
        bad = dnnl_post_ops_append_binary(ops, dnnl_binary_add, other) != dnnl_success;
    if (!bad) bad = append_act(p, ops, act2, a2, b2) < 0;
    if (!bad) bad = dnnl_primitive_attr_set_post_ops(attr, ops) != dnnl_success;
    dnnl_post_ops_destroy(ops);
    if (bad) {
        dnnl_primitive_attr_destroy(attr);
        return NULL;
    }
    return attr;
}

// The step of a convolution or inner product pd reading tensor src (reordered to pd's
// layout where it differs) and writing its result (tensor inplace_of, or a new one, into
// *y): its weight w (plain: nd dims, tag) and bias b (O values, or NULL) reordered once into
// pd's layouts, its arguments SRC, WEIGHTS, [BIAS], DST; NULL with the reason in p->err. pd
// is destroyed.
static step_t *weighted_step(plan_t *p, dnnl_primitive_desc_t pd, int src, int inplace_of,
                             const float *w, int nd, const int64_t *wplain,
                             dnnl_format_tag_t tag, const float *b, int64_t O, int *y_out) {
    int x = as_layout(p, src, dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0));
    int y = x < 0 ? -1
                  : result(p, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0), inplace_of);
    *y_out = y;
    dnnl_memory_t wmem = NULL, bmem = NULL;
    if (x >= 0 && y >= 0) {
        wmem = constant(p, w, nd, wplain, tag,
                        dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0));
        if (wmem && b)
            bmem = constant(p, b, 1, &O, dnnl_x,
                            dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 1));
    }
    step_t *s = (x >= 0 && y >= 0 && wmem && (bmem || !b)) ? new_step(p, pd) : NULL;
    dnnl_primitive_desc_destroy(pd);
    if (!s) return NULL;
    add_arg(s, DNNL_ARG_SRC, x, NULL);
    add_arg(s, DNNL_ARG_WEIGHTS, -1, wmem);
    if (bmem) add_arg(s, DNNL_ARG_BIAS, -1, bmem);
    add_arg(s, DNNL_ARG_DST, y, NULL);
    return s;
}

// conv: src (N, C, H, W) -> (N, O, OH, OW); w (O, C/groups, kh, kw) plain, b (O) or NULL;
// geom = {kh, kw, sh, sw, pt, pl, pb, pr, dh, dw} (dilation as torch: 1 = none).
// other >= 0: tensor `other` is added to the result between act1 and act2: in place (add
// 1: the sum written into other's buffer, which is returned) or read (add 2: a binary
// post-op; a new tensor in other's layout).
int plan_conv(plan_t *p, int src, int O, int groups, const int64_t *geom, const float *w,
              const float *b, int act1, float a1, float b1, int add, int other, int act2,
              float a2, float b2) {
    int sum = add == 1 ? other : -1;
    if (add == 2 && other >= 0) {
        // the operand in the output's layout (NHWC): a binary post-op reading another
        // layout has only oneDNN's reference code
        const int64_t *od = NULL;
        CHECK(p, dnnl_memory_desc_query(p->t[other].md, dnnl_query_dims, &od), "query dims");
        dnnl_dims_t d = {od[0], od[1], od[2], od[3]};
        dnnl_memory_desc_t want;
        CHECK(p, dnnl_memory_desc_create_with_tag(&want, 4, d, dnnl_f32, dnnl_nhwc), "md");
        other = as_layout(p, other, want);
        dnnl_memory_desc_destroy(want);
        if (other < 0) return -1;
    }
    int nd = 0;
    dnnl_dims_t in;
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_ndims_s32, &nd), "query ndims");
    const int64_t *dq = NULL;
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_dims, &dq), "query dims");
    if (nd != 4) {
        snprintf(p->err, sizeof(p->err), "conv input of %d dims", nd);
        return -1;
    }
    for (int i = 0; i < 4; ++i) in[i] = dq[i];
    int64_t kh = geom[0], kw = geom[1], sh = geom[2], sw = geom[3];
    int64_t pt = geom[4], pl = geom[5], pb = geom[6], pr = geom[7], dh = geom[8], dw = geom[9];
    int64_t C = in[1];
    int64_t OH = (in[2] + pt + pb - dh * (kh - 1) - 1) / sh + 1;
    int64_t OW = (in[3] + pl + pr - dw * (kw - 1) - 1) / sw + 1;
    dnnl_dims_t xd = {in[0], C, in[2], in[3]}, yd = {in[0], O, OH, OW};
    dnnl_dims_t strides = {sh, sw}, dil = {dh - 1, dw - 1}, padl = {pt, pl}, padr = {pb, pr};
    dnnl_memory_desc_t xmd, wmd, bmd = NULL, ymd;
    dnnl_dims_t bd = {O};
    int wnd = groups > 1 ? 5 : 4;
    dnnl_dims_t wd;
    int64_t wplain[5];
    if (groups > 1) {
        int64_t g[5] = {groups, O / groups, C / groups, kh, kw};
        memcpy(wd, g, sizeof(g));
        memcpy(wplain, g, sizeof(g));
    } else {
        int64_t g[4] = {O, C, kh, kw};
        memcpy(wd, g, sizeof(g));
        memcpy(wplain, g, sizeof(g));
    }
    CHECK(p, dnnl_memory_desc_create_with_tag(&xmd, 4, xd, dnnl_f32, p->act_tag), "md");
    CHECK(p, dnnl_memory_desc_create_with_tag(&wmd, wnd, wd, dnnl_f32, dnnl_format_tag_any), "md");
    if (b) CHECK(p, dnnl_memory_desc_create_with_tag(&bmd, 1, bd, dnnl_f32, dnnl_x), "md");
    if (sum >= 0 || (add == 2 && other >= 0)) {   // the output in the operand's layout
        if (clone_md(p, p->t[other].md, &ymd) < 0) return -1;
    } else {
        CHECK(p, dnnl_memory_desc_create_with_tag(&ymd, 4, yd, dnnl_f32, p->act_tag), "md");
    }
    dnnl_primitive_attr_t attr = post_ops_attr(p, act1, a1, b1, other >= 0 ? add : 0,
                                               other >= 0 ? p->t[other].md : NULL, act2, a2,
                                               b2);
    if (!attr) return -1;
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_convolution_forward_primitive_desc_create(
        &pd, p->eng, dnnl_forward_inference, dnnl_convolution_direct, xmd, wmd, bmd, ymd,
        strides, dil, padl, padr, attr);
    dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(xmd);
    dnnl_memory_desc_destroy(wmd);
    if (bmd) dnnl_memory_desc_destroy(bmd);
    dnnl_memory_desc_destroy(ymd);
    CHECK(p, st, "convolution_forward_primitive_desc_create");
    int y;
    step_t *s = weighted_step(p, pd, src, sum, w, wnd, wplain,
                              groups > 1 ? dnnl_goihw : dnnl_oihw, b, O, &y);
    if (!s) return -1;
    if (add == 2 && other >= 0)
        add_arg(s, DNNL_ARG_ATTR_MULTIPLE_POST_OP(act1 ? 1 : 0) | DNNL_ARG_SRC_1, other, NULL);
    return y;
}

// pooling: kind 0 max, 1 avg (padding excluded), 2 avg (padding included);
// geom = {kh, kw, sh, sw, pt, pl, pb, pr}; kh = 0: over the whole map (a global pool).
int plan_pool(plan_t *p, int src, int kind, const int64_t *geom_in) {
    const int64_t *dq = NULL;
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_dims, &dq), "query dims");
    int64_t geom[8];
    memcpy(geom, geom_in, sizeof(geom));
    if (geom[0] == 0) {
        int64_t g[8] = {dq[2], dq[3], 1, 1, 0, 0, 0, 0};
        memcpy(geom, g, sizeof(g));
    }
    int64_t OH = (dq[2] + geom[4] + geom[6] - geom[0]) / geom[2] + 1;
    int64_t OW = (dq[3] + geom[5] + geom[7] - geom[1]) / geom[3] + 1;
    dnnl_dims_t yd = {dq[0], dq[1], OH, OW};
    dnnl_dims_t k = {geom[0], geom[1]}, st_ = {geom[2], geom[3]}, dil = {0, 0},
                padl = {geom[4], geom[5]}, padr = {geom[6], geom[7]};
    dnnl_memory_desc_t ymd;
    CHECK(p, dnnl_memory_desc_create_with_tag(&ymd, 4, yd, dnnl_f32, dnnl_format_tag_any), "md");
    dnnl_alg_kind_t alg = kind == 0   ? dnnl_pooling_max
                          : kind == 1 ? dnnl_pooling_avg_exclude_padding
                                      : dnnl_pooling_avg_include_padding;
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_pooling_forward_primitive_desc_create(
        &pd, p->eng, dnnl_forward_inference, alg, p->t[src].md, ymd, st_, k, dil, padl, padr,
        attr);
    dnnl_memory_desc_destroy(ymd);
    return unary(p, st, pd, attr, "pooling_forward_primitive_desc_create", NULL, -1, src,
                 DNNL_ARG_SRC, DNNL_ARG_DST);
}

// binary: a (op) b, b broadcast over a's dims where b's are 1 (alg 0 add, 1 mul), then act;
// in place into a when inplace (a dead after).
int plan_binary(plan_t *p, int a, int b, int alg, int act, float alpha, float beta,
                int inplace) {
    dnnl_primitive_attr_t attr = post_ops_attr(p, act, alpha, beta, 0, NULL, 0, 0.f, 0.f);
    if (!attr) return -1;
    const int64_t *ad = NULL, *bd_ = NULL;
    int nd = 0;
    CHECK(p, dnnl_memory_desc_query(p->t[a].md, dnnl_query_ndims_s32, &nd), "query ndims");
    CHECK(p, dnnl_memory_desc_query(p->t[a].md, dnnl_query_dims, &ad), "query dims");
    CHECK(p, dnnl_memory_desc_query(p->t[b].md, dnnl_query_dims, &bd_), "query dims");
    int full = 1;
    for (int i = 0; i < nd; ++i) full &= ad[i] == bd_[i];
    // a broadcast operand in a's layout family is fastest as plain; a full one as a's layout
    int bb = full ? as_layout(p, b, p->t[a].md) : b;
    if (bb < 0) {
        dnnl_primitive_attr_destroy(attr);
        return -1;
    }
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_binary_primitive_desc_create(
        &pd, p->eng, alg == 0 ? dnnl_binary_add : dnnl_binary_mul, p->t[a].md, p->t[bb].md,
        p->t[a].md, attr);
    int y;
    step_t *s = step_of(p, st, pd, attr, "binary_primitive_desc_create", p->t[a].md,
                        inplace ? a : -1, &y);
    if (!s) return -1;
    add_arg(s, DNNL_ARG_SRC_0, a, NULL);
    add_arg(s, DNNL_ARG_SRC_1, bb, NULL);
    add_arg(s, DNNL_ARG_DST, y, NULL);
    return y;
}

// concat: n tensors joined along their channels (dims 1), in the plan's layout.
int plan_concat(plan_t *p, int n, const int *src) {
    if (n < 1 || n > MAXA - 1) {
        snprintf(p->err, sizeof(p->err), "a concat of %d tensors", n);
        return -1;
    }
    const_dnnl_memory_desc_t mds[MAXA];
    int64_t c = 0;
    const int64_t *d0 = NULL;
    CHECK(p, dnnl_memory_desc_query(p->t[src[0]].md, dnnl_query_dims, &d0), "query dims");
    for (int i = 0; i < n; ++i) {
        const int64_t *d = NULL;
        CHECK(p, dnnl_memory_desc_query(p->t[src[i]].md, dnnl_query_dims, &d), "query dims");
        c += d[1];
        mds[i] = p->t[src[i]].md;
    }
    dnnl_dims_t yd = {d0[0], c, d0[2], d0[3]};
    dnnl_memory_desc_t ymd;
    CHECK(p, dnnl_memory_desc_create_with_tag(&ymd, 4, yd, dnnl_f32,
                                              p->act_tag == dnnl_format_tag_any ? dnnl_nhwc
                                                                                : p->act_tag),
          "md");
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_concat_primitive_desc_create(&pd, p->eng, ymd, n, 1, mds, attr);
    dnnl_memory_desc_destroy(ymd);
    int y;
    step_t *s = step_of(p, st, pd, attr, "concat_primitive_desc_create", NULL, -1, &y);
    if (!s) return -1;
    for (int i = 0; i < n; ++i) add_arg(s, DNNL_ARG_MULTIPLE_SRC + i, src[i], NULL);
    add_arg(s, DNNL_ARG_DST, y, NULL);
    return y;
}

// eltwise on its own: y = act(x), in place when inplace.
int plan_eltwise(plan_t *p, int src, int act, float alpha, float beta, int inplace) {
    dnnl_alg_kind_t alg;
    if (act_alg(p, act, &alg, &alpha, &beta) < 0) return -1;
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_eltwise_forward_primitive_desc_create(
        &pd, p->eng, dnnl_forward_inference, alg, p->t[src].md, p->t[src].md, alpha, beta,
        attr);
    return unary(p, st, pd, attr, "eltwise_forward_primitive_desc_create", p->t[src].md,
                 inplace ? src : -1, src, DNNL_ARG_SRC, DNNL_ARG_DST);
}

// inner product: src (N, C[, H, W]) -> (N, O); w (O, C*H*W) plain; then act.
int plan_linear(plan_t *p, int src, int O, const float *w, const float *b, int act,
                float alpha, float beta) {
    int nd = 0;
    const int64_t *dq = NULL;
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_ndims_s32, &nd), "query ndims");
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_dims, &dq), "query dims");
    dnnl_dims_t wd, yd = {dq[0], O}, bd = {O};
    int64_t wplain[4];
    wd[0] = wplain[0] = O;
    for (int i = 1; i < nd; ++i) wd[i] = wplain[i] = dq[i];
    dnnl_memory_desc_t wmd, bmd = NULL, ymd;
    CHECK(p, dnnl_memory_desc_create_with_tag(&wmd, nd, wd, dnnl_f32, dnnl_format_tag_any), "md");
    if (b) CHECK(p, dnnl_memory_desc_create_with_tag(&bmd, 1, bd, dnnl_f32, dnnl_x), "md");
    CHECK(p, dnnl_memory_desc_create_with_tag(&ymd, 2, yd, dnnl_f32, dnnl_nc), "md");
    dnnl_primitive_attr_t attr = post_ops_attr(p, act, alpha, beta, 0, NULL, 0, 0.f, 0.f);
    if (!attr) return -1;
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = dnnl_inner_product_forward_primitive_desc_create(
        &pd, p->eng, dnnl_forward_inference, p->t[src].md, wmd, bmd, ymd, attr);
    dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(wmd);
    if (bmd) dnnl_memory_desc_destroy(bmd);
    dnnl_memory_desc_destroy(ymd);
    CHECK(p, st, "inner_product_forward_primitive_desc_create");
    int y;   // the weight (O, C[, H, W]) plain: oi / oihw
    return weighted_step(p, pd, src, -1, w, nd, wplain, nd == 2 ? dnnl_nc : dnnl_nchw, b, O,
                         &y) ? y : -1;
}

// The plan's output: tensor src reordered into a plain tensor of dims and strides (the
// caller's buffer at run time).
int plan_output(plan_t *p, int src, int nd, const int64_t *dims, const int64_t *strides) {
    dnnl_memory_desc_t md;
    if (plain_md(p, nd, dims, strides, &md) < 0) return -1;
    // a reshape (N, C, 1, 1) -> (N, C) is the same bytes in any layout that keeps C dense
    int snd = 0;
    CHECK(p, dnnl_memory_desc_query(p->t[src].md, dnnl_query_ndims_s32, &snd), "query ndims");
    if (snd != nd) {
        dnnl_memory_desc_t r;
        CHECK(p, dnnl_memory_desc_reshape(&r, p->t[src].md, nd, dims), "memory_desc_reshape");
        dnnl_memory_desc_destroy(p->t[src].md);
        p->t[src].md = r;
        dnnl_memory_destroy(p->t[src].mem);
        CHECK(p, dnnl_memory_create(&p->t[src].mem, r, p->eng, DNNL_MEMORY_NONE),
              "memory_create");
    }
    dnnl_primitive_desc_t pd;
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_status_t st = dnnl_reorder_primitive_desc_create(&pd, p->t[src].md, p->eng, md,
                                                          p->eng, attr);
    dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) dnnl_memory_desc_destroy(md);
    CHECK(p, st, "reorder_primitive_desc_create (output)");
    int y = new_tensor(p, md, 2);
    step_t *s = y >= 0 ? new_step(p, pd) : NULL;
    dnnl_primitive_desc_destroy(pd);
    if (!s) return -1;
    add_arg(s, DNNL_ARG_FROM, src, NULL);
    add_arg(s, DNNL_ARG_TO, y, NULL);
    return y;
}

// A copy of tensor src in its own buffer (to add into without touching src).
int plan_copy(plan_t *p, int src) {
    dnnl_primitive_desc_t pd;
    dnnl_primitive_attr_t attr = user_attr(p);
    dnnl_status_t st = dnnl_reorder_primitive_desc_create(&pd, p->t[src].md, p->eng,
                                                          p->t[src].md, p->eng, attr);
    return unary(p, st, pd, attr, "reorder_primitive_desc_create (copy)", p->t[src].md, -1,
                 src, DNNL_ARG_FROM, DNNL_ARG_TO);
}

int plan_steps(plan_t *p) { return p->ns; }

// Step i's oneDNN implementation name.
const char *plan_impl(plan_t *p, int i) { return i >= 0 && i < p->ns ? p->s[i].impl : ""; }

// Step i's primitive kind (oneDNN's name: 'convolution', 'reorder', 'binary', ...).
const char *plan_kind(plan_t *p, int i) { return i >= 0 && i < p->ns ? p->s[i].kind : ""; }

// Tensor tid's dims into dims (up to 12); returns its number of dims.
int plan_dims(plan_t *p, int tid, int64_t *dims) {
    int nd = 0;
    const int64_t *dq = NULL;
    CHECK(p, dnnl_memory_desc_query(p->t[tid].md, dnnl_query_ndims_s32, &nd), "query ndims");
    CHECK(p, dnnl_memory_desc_query(p->t[tid].md, dnnl_query_dims, &dq), "query dims");
    for (int i = 0; i < nd && i < 12; ++i) dims[i] = dq[i];
    return nd;
}

// Buffers: each internal tensor takes the smallest free slot that fits (or grows the
// largest free one, or a new one) at the first step that names it, and gives it back after
// the last (a residual sum written in place is the same tensor, so it lives on).
int plan_finalize(plan_t *p) {
    for (int t = 0; t < p->nt; ++t) p->t[t].last = -1;
    for (int i = 0; i < p->ns; ++i)
        for (int a = 0; a < p->s[i].nargs; ++a)
            if (p->s[i].tid[a] >= 0) p->t[p->s[i].tid[a]].last = i;
    for (int i = 0; i < p->ns; ++i) {
        step_t *s = &p->s[i];
        for (int a = 0; a < s->nargs; ++a) {
            int t = s->tid[a];
            if (t < 0 || p->t[t].external || p->t[t].slot >= 0) continue;
            size_t need = dnnl_memory_desc_get_size(p->t[t].md);
            int best = -1;
            for (int k = 0; k < p->nslot; ++k)
                if (!p->slot[k].busy && p->slot[k].size >= need &&
                    (best < 0 || p->slot[k].size < p->slot[best].size))
                    best = k;
            if (best < 0) {
                for (int k = 0; k < p->nslot; ++k)
                    if (!p->slot[k].busy && (best < 0 || p->slot[k].size > p->slot[best].size))
                        best = k;
                if (best < 0) best = p->nslot++;
                p->slot[best].size = need;
            }
            p->slot[best].busy = 1;
            p->t[t].slot = best;
        }
        for (int a = 0; a < s->nargs; ++a) {
            int t = s->tid[a];
            if (t >= 0 && p->t[t].slot >= 0 && p->t[t].last == i) p->slot[p->t[t].slot].busy = 0;
        }
    }
    for (int k = 0; k < p->nslot; ++k) {
        p->slot[k].ptr = aligned(p->slot[k].size);
        if (!p->slot[k].ptr) {
            snprintf(p->err, sizeof(p->err), "out of memory");
            return -1;
        }
    }
    for (int t = 0; t < p->nt; ++t)
        if (p->t[t].slot >= 0) dnnl_memory_set_data_handle(p->t[t].mem, p->slot[p->t[t].slot].ptr);
    if (p->scratch_size) {
        p->scratch = aligned(p->scratch_size);
        if (!p->scratch) {
            snprintf(p->err, sizeof(p->err), "out of memory");
            return -1;
        }
        for (int i = 0; i < p->ns; ++i)
            if (p->s[i].scratch) dnnl_memory_set_data_handle(p->s[i].scratch, p->scratch);
    }
    p->finalized = 1;
    return p->nslot;
}

// Bytes of activation buffers (after finalize).
int64_t plan_bytes(plan_t *p) {
    int64_t n = (int64_t)p->scratch_size;
    for (int k = 0; k < p->nslot; ++k) n += (int64_t)p->slot[k].size;
    return n;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Runs every step; seconds (NULL: not timed) gets each step's wall time added (the CPU
// stream runs a primitive to its end before execute returns).
static int run(plan_t *p, void *in, void *out, double *seconds) {
    if (!p->finalized) {
        snprintf(p->err, sizeof(p->err), "plan not finalized");
        return -1;
    }
    for (int t = 0; t < p->nt; ++t)
        if (p->t[t].external)
            dnnl_memory_set_data_handle(p->t[t].mem, p->t[t].external == 1 ? in : out);
    dnnl_exec_arg_t args[MAXA + 1];
    for (int i = 0; i < p->ns; ++i) {
        step_t *s = &p->s[i];
        int n = 0;
        for (int a = 0; a < s->nargs; ++a) {
            args[n].arg = s->arg[a];
            args[n].memory = s->tid[a] >= 0 ? p->t[s->tid[a]].mem : s->cmem[a];
            n++;
        }
        if (s->scratch) {
            args[n].arg = DNNL_ARG_SCRATCHPAD;
            args[n].memory = s->scratch;
            n++;
        }
        double t0 = seconds ? now() : 0.0;
        CHECK(p, dnnl_primitive_execute(s->prim, p->strm, n, args), "primitive_execute");
        if (seconds) {
            CHECK(p, dnnl_stream_wait(p->strm), "stream_wait");
            seconds[i] += now() - t0;
        }
    }
    CHECK(p, dnnl_stream_wait(p->strm), "stream_wait");
    return 0;
}

int plan_run(plan_t *p, void *in, void *out) { return run(p, in, out, NULL); }

// plan_run with each step's seconds added into seconds[0 .. plan_steps).
int plan_run_timed(plan_t *p, void *in, void *out, double *seconds) {
    return run(p, in, out, seconds);
}

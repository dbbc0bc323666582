/* A 2-d convolution's training primitives (forward, backward-data, backward-weights) on
 * the oneDNN that PyTorch ships inside libtorch_cpu, created once per layer and shape and
 * executed on every step. See onednn.py for why and how this stays torch's computation.
 *
 * libtorch_cpu links oneDNN statically and exports none of its symbols; onednn.py reads
 * the C API's addresses from the library's symbol table and passes them to nl_dnnl_init.
 * The declarations below are oneDNN's v3 C API (dnnl.h), written out for the few calls
 * made: opaque handles, and the enum values, which v3 keeps fixed. */
#define _GNU_SOURCE
#include <link.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int st_t; /* dnnl_status_t; 0 is success */
typedef void *hnd; /* engine, stream, memory, memory_desc, primitive(_desc), attr */
typedef int64_t dims_t[12];
typedef struct { int arg; hnd memory; } exec_arg_t;

enum { BF16 = 2, F32 = 3, CPU = 1, FORWARD_TRAINING = 64, DIRECT = 1, SCRATCH_USER = 1,
       TAG_ANY = 1 };
enum { Q_IMPL = 8, Q_WEIGHTS = 131, Q_DIFF_WEIGHTS = 132, Q_SCRATCHPAD = 136 };
enum { A_SRC = 1, A_DST = 17, A_WEIGHTS = 33, A_SCRATCH = 80, A_DIFF_SRC = 129,
       A_DIFF_DST = 145, A_DIFF_WEIGHTS = 161 };

/* The API's functions, in the order onednn.py's NAMES lists them. */
static struct {
    st_t (*engine_create)(hnd *, int, size_t);
    st_t (*stream_create)(hnd *, hnd, unsigned);
    st_t (*md_create_with_strides)(hnd *, int, const int64_t *, int, const int64_t *);
    st_t (*md_create_with_tag)(hnd *, int, const int64_t *, int, int);
    st_t (*md_destroy)(hnd);
    size_t (*md_get_size)(hnd);
    st_t (*memory_create)(hnd *, hnd, hnd, void *);
    st_t (*memory_set_data_handle)(hnd, void *);
    st_t (*attr_create)(hnd *);
    st_t (*attr_set_scratchpad_mode)(hnd, int);
    st_t (*conv_fwd_pd)(hnd *, hnd, int, int, hnd, hnd, hnd, hnd, const int64_t *,
                        const int64_t *, const int64_t *, const int64_t *, hnd);
    st_t (*conv_bwd_data_pd)(hnd *, hnd, int, hnd, hnd, hnd, const int64_t *, const int64_t *,
                             const int64_t *, const int64_t *, hnd, hnd);
    st_t (*conv_bwd_weights_pd)(hnd *, hnd, int, hnd, hnd, hnd, hnd, const int64_t *,
                                const int64_t *, const int64_t *, const int64_t *, hnd, hnd);
    st_t (*reorder_pd)(hnd *, hnd, hnd, hnd, hnd, hnd);
    hnd (*pd_query_md)(hnd, int, int);
    st_t (*pd_query)(hnd, int, int, void *);
    st_t (*pd_destroy)(hnd);
    st_t (*primitive_create)(hnd *, hnd);
    st_t (*primitive_execute)(hnd, hnd, int, const exec_arg_t *);
} api;
static hnd engine, stream, attr;

int nl_dnnl_init(void **fns, int n)
{
    if (n != (int)(sizeof api / sizeof(void *)))
        return -1;
    memcpy(&api, fns, sizeof api);
    if (api.engine_create(&engine, CPU, 0) || api.stream_create(&stream, engine, 1)
        || api.attr_create(&attr) || api.attr_set_scratchpad_mode(attr, SCRATCH_USER))
        return -2;
    return 0;
}

static int find_base(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    uintptr_t *out = data;
    const char *name = info->dlpi_name, *want = (const char *)out[1];
    size_t n = strlen(name), m = strlen(want);
    if (n >= m && strcmp(name + n - m, want) == 0) {
        out[0] = info->dlpi_addr;
        return 1;
    }
    return 0;
}

/* The load address of the shared object whose path ends in `suffix`, or 0. */
uintptr_t nl_dnnl_base(const char *suffix)
{
    uintptr_t out[2] = {0, (uintptr_t)suffix};
    dl_iterate_phdr(find_base, out);
    return out[0];
}

/* One primitive with its arguments: memories whose buffers are set before each run. */
typedef struct {
    hnd prim;
    int n;
    exec_arg_t args[4];
} step_t;

/* One layer at one shape: weights reordered for the forward (and the backward-data), the
 * forward, the backward-data (optional), the backward-weights and the reorder of its
 * blocked gradient to the caller's layout. */
typedef struct {
    step_t wf, fwd, wb, bwd_data, bwd_w, dw;
    hnd user_w, user_dw, src, dst, diff_dst, diff_src, wf_mem, wb_mem, dwb_mem;
    void *wf_buf, *wb_buf, *dwb_buf, *scratch;
    char impl[3][128];
} conv_t;

static void arg(step_t *s, int which, hnd mem)
{
    s->args[s->n].arg = which;
    s->args[s->n++].memory = mem;
}

static int mem(hnd *m, hnd md, void *buf)
{
    return api.memory_create(m, md, engine, buf) ? -1 : 0;
}

static int blocked(hnd *m, hnd md, void **buf)
{
    *buf = aligned_alloc(64, (api.md_get_size(md) + 64) / 64 * 64);
    return !*buf || mem(m, md, *buf);
}

static int reorder_pd(hnd *pd, hnd from_md, hnd to_md)
{
    return api.reorder_pd(pd, from_md, engine, to_md, engine, attr) ? -1 : 0;
}

static void impl_name(hnd pd, char *out)
{
    const char *name = NULL;
    api.pd_query(pd, Q_IMPL, 0, &name);
    strncpy(out, name ? name : "?", 127);
}

/* x: N C H W with strides xs; w: O C KH KW with strides ws (the caller's weights: fp32 if
 * bits is 32, else bf16, as x and y); y: N O OH OW with strides ys; the weights' gradient
 * is fp32 with strides ws. pad: top, left, bottom, right. Returns NULL if oneDNN refuses
 * any of it (or memory runs out). */
void *nl_conv_create(const int64_t *x, const int64_t *xs, const int64_t *w, const int64_t *ws,
                     const int64_t *y, const int64_t *ys, const int64_t *stride,
                     const int64_t *pad, int bits, int data_grad)
{
    int dt = bits == 32 ? F32 : BF16, ok = 0;
    dims_t st = {stride[0], stride[1]}, dil = {0, 0}, pl = {pad[0], pad[1]},
           pr = {pad[2], pad[3]};
    hnd mds[5] = {0}; /* x, w, y, the gradient of w, "any" weights */
    hnd pds[6] = {0}; /* the steps' descriptors, in the order of `steps` below */
    conv_t *c = calloc(1, sizeof *c);
    step_t *steps[6];
    if (!c)
        return NULL;
    steps[0] = &c->wf, steps[1] = &c->fwd, steps[2] = &c->wb, steps[3] = &c->bwd_data;
    steps[4] = &c->bwd_w, steps[5] = &c->dw;
    hnd x_md, w_md, y_md, dw_md, any_w;
    if (api.md_create_with_strides(&mds[0], 4, x, dt, xs)
        || api.md_create_with_strides(&mds[1], 4, w, dt, ws)
        || api.md_create_with_strides(&mds[2], 4, y, dt, ys)
        || api.md_create_with_strides(&mds[3], 4, w, F32, ws)
        || api.md_create_with_tag(&mds[4], 4, w, dt, TAG_ANY))
        goto done;
    x_md = mds[0], w_md = mds[1], y_md = mds[2], dw_md = mds[3], any_w = mds[4];
    /* the weights "any": each primitive picks its blocked layout, as PyTorch (ideep) asks */
    if (api.conv_fwd_pd(&pds[1], engine, FORWARD_TRAINING, DIRECT, x_md, any_w, NULL, y_md,
                        st, dil, pl, pr, attr)
        || api.conv_bwd_weights_pd(&pds[4], engine, DIRECT, x_md, any_w, NULL, y_md, st, dil,
                                   pl, pr, pds[1], attr)
        || (data_grad && api.conv_bwd_data_pd(&pds[3], engine, DIRECT, x_md, any_w, y_md, st,
                                              dil, pl, pr, pds[1], attr)))
        goto done;
    hnd wf_md = api.pd_query_md(pds[1], Q_WEIGHTS, 0);
    hnd dwb_md = api.pd_query_md(pds[4], Q_DIFF_WEIGHTS, 0);
    if (mem(&c->user_w, w_md, NULL) || mem(&c->user_dw, dw_md, NULL) || mem(&c->src, x_md, NULL)
        || mem(&c->dst, y_md, NULL) || mem(&c->diff_dst, y_md, NULL)
        || mem(&c->diff_src, x_md, NULL) || blocked(&c->wf_mem, wf_md, &c->wf_buf)
        || blocked(&c->dwb_mem, dwb_md, &c->dwb_buf) || reorder_pd(&pds[0], w_md, wf_md)
        || reorder_pd(&pds[5], dwb_md, dw_md))
        goto done;
    if (pds[3]) {
        hnd wb_md = api.pd_query_md(pds[3], Q_WEIGHTS, 0);
        if (blocked(&c->wb_mem, wb_md, &c->wb_buf) || reorder_pd(&pds[2], w_md, wb_md))
            goto done;
        arg(&c->wb, A_SRC, c->user_w);
        arg(&c->wb, A_DST, c->wb_mem);
        arg(&c->bwd_data, A_DIFF_DST, c->diff_dst);
        arg(&c->bwd_data, A_WEIGHTS, c->wb_mem);
        arg(&c->bwd_data, A_DIFF_SRC, c->diff_src);
        impl_name(pds[3], c->impl[1]);
    }
    impl_name(pds[1], c->impl[0]);
    impl_name(pds[4], c->impl[2]);
    arg(&c->wf, A_SRC, c->user_w);
    arg(&c->wf, A_DST, c->wf_mem);
    arg(&c->fwd, A_SRC, c->src);
    arg(&c->fwd, A_WEIGHTS, c->wf_mem);
    arg(&c->fwd, A_DST, c->dst);
    arg(&c->bwd_w, A_SRC, c->src);
    arg(&c->bwd_w, A_DIFF_DST, c->diff_dst);
    arg(&c->bwd_w, A_DIFF_WEIGHTS, c->dwb_mem);
    arg(&c->dw, A_SRC, c->dwb_mem);
    arg(&c->dw, A_DST, c->user_dw);
    /* one scratchpad for the layer, as large as its largest step's: they run one at a time */
    size_t scratch = 0;
    for (int i = 0; i < 6; i++)
        if (pds[i]) {
            size_t need = api.md_get_size(api.pd_query_md(pds[i], Q_SCRATCHPAD, 0));
            scratch = need > scratch ? need : scratch;
        }
    c->scratch = aligned_alloc(64, (scratch + 64) / 64 * 64);
    if (!c->scratch)
        goto done;
    for (int i = 0; i < 6; i++) {
        if (!pds[i])
            continue;
        hnd smd = api.pd_query_md(pds[i], Q_SCRATCHPAD, 0), pad_mem;
        if (api.primitive_create(&steps[i]->prim, pds[i]))
            goto done;
        if (api.md_get_size(smd)) {
            if (mem(&pad_mem, smd, c->scratch))
                goto done;
            arg(steps[i], A_SCRATCH, pad_mem);
        }
    }
    ok = 1;
done: /* the primitives and memories keep copies of what they need */
    for (int i = 0; i < 6; i++)
        if (pds[i])
            api.pd_destroy(pds[i]);
    for (int i = 0; i < 5; i++)
        if (mds[i])
            api.md_destroy(mds[i]);
    if (ok)
        return c;
    /* a refused layer: its buffers are freed; the few oneDNN objects made are left (once) */
    free(c->wf_buf), free(c->wb_buf), free(c->dwb_buf), free(c->scratch), free(c);
    return NULL;
}

const char *nl_conv_impl(void *h, int which)
{
    return ((conv_t *)h)->impl[which];
}

static int run(step_t *s)
{
    return api.primitive_execute(s->prim, stream, s->n, s->args);
}

/* y = conv(x, w); w in the caller's layout, reordered on the way (as torch does). */
int nl_conv_forward(void *h, void *x, void *w, void *y)
{
    conv_t *c = h;
    if (api.memory_set_data_handle(c->user_w, w) || api.memory_set_data_handle(c->src, x)
        || api.memory_set_data_handle(c->dst, y))
        return -1;
    return run(&c->wf) || run(&c->fwd);
}

/* dx (if not NULL; the layer was created with data_grad) and dw (fp32, the caller's
 * weights' layout) from dy, x and w. */
int nl_conv_backward(void *h, void *dy, void *x, void *w, void *dx, void *dw)
{
    conv_t *c = h;
    if (api.memory_set_data_handle(c->user_w, w) || api.memory_set_data_handle(c->src, x)
        || api.memory_set_data_handle(c->diff_dst, dy)
        || api.memory_set_data_handle(c->user_dw, dw))
        return -1;
    if (dx) {
        if (!c->bwd_data.prim || api.memory_set_data_handle(c->diff_src, dx))
            return -1;
        if (run(&c->wb) || run(&c->bwd_data))
            return -1;
    }
    return run(&c->bwd_w) || run(&c->dw);
}

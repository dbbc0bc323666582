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
    size_t scratch_size;
    char impl[3][128];
} conv_t;

static int pd_prim(hnd pd, step_t *s, hnd *scratch_md)
{
    *scratch_md = api.pd_query_md(pd, Q_SCRATCHPAD, 0);
    return api.primitive_create(&s->prim, pd) ? -1 : 0;
}

static int arg(step_t *s, int which, hnd mem)
{
    s->args[s->n].arg = which;
    s->args[s->n++].memory = mem;
    return 0;
}

static int mem(hnd *m, hnd md)
{
    return api.memory_create(m, md, engine, NULL) ? -1 : 0;
}

static int blocked(hnd *m, hnd md, void **buf)
{
    *buf = aligned_alloc(64, (api.md_get_size(md) + 63) / 64 * 64);
    return !*buf || api.memory_create(m, md, engine, *buf) ? -1 : 0;
}

static int reorder(step_t *s, hnd from_md, hnd from, hnd to_md, hnd to, hnd *scratch_md)
{
    hnd pd;
    if (api.reorder_pd(&pd, from_md, engine, to_md, engine, attr) || pd_prim(pd, s, scratch_md))
        return -1;
    arg(s, A_SRC, from);
    return arg(s, A_DST, to);
}

static void impl_name(hnd pd, char *out)
{
    const char *name = NULL;
    api.pd_query(pd, Q_IMPL, 0, &name);
    strncpy(out, name ? name : "?", 127);
}

static void attach_scratch(step_t *s, hnd smd, conv_t *c, hnd *holder)
{
    /* every step's scratchpad is the layer's one buffer (the steps run one at a time) */
    if (api.md_get_size(smd) == 0)
        return;
    api.memory_create(holder, smd, engine, c->scratch);
    arg(s, A_SCRATCH, *holder);
}

static int fail(conv_t *c)
{
    free(c);  /* (what oneDNN allocated for a refused layer is left: it happens once) */
    return 0;
}

/* x: N C H W with strides xs; w: O C KH KW with strides ws (the caller's weights, `dtype`);
 * y: N O OH OW with strides ys; dw: the gradient's layout, fp32 with strides ws.
 * pad: top, left, bottom, right. Returns NULL if oneDNN refuses any of it. */
void *nl_conv_create(const int64_t *x, const int64_t *xs, const int64_t *w, const int64_t *ws,
                     const int64_t *y, const int64_t *ys, const int64_t *stride,
                     const int64_t *pad, int bits, int data_grad)
{
    int dt = bits == 32 ? F32 : BF16;
    dims_t st = {stride[0], stride[1]}, dil = {0, 0}, pl = {pad[0], pad[1]},
           pr = {pad[2], pad[3]};
    hnd x_md, w_md, y_md, dw_md, any_w, fwd_pd, bd_pd = NULL, bw_pd, smd[6] = {0};
    hnd holder[6];
    conv_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    if (api.md_create_with_strides(&x_md, 4, x, dt, xs)
        || api.md_create_with_strides(&w_md, 4, w, dt, ws)
        || api.md_create_with_strides(&y_md, 4, y, dt, ys)
        || api.md_create_with_strides(&dw_md, 4, w, F32, ws)
        || api.md_create_with_tag(&any_w, 4, w, dt, TAG_ANY))
        return fail(c), NULL;
    /* the weights "any": each primitive picks its blocked layout, as PyTorch (ideep) asks */
    if (api.conv_fwd_pd(&fwd_pd, engine, FORWARD_TRAINING, DIRECT, x_md, any_w, NULL, y_md,
                        st, dil, pl, pr, attr)
        || api.conv_bwd_weights_pd(&bw_pd, engine, DIRECT, x_md, any_w, NULL, y_md, st, dil,
                                   pl, pr, fwd_pd, attr)
        || (data_grad && api.conv_bwd_data_pd(&bd_pd, engine, DIRECT, x_md, any_w, y_md, st,
                                              dil, pl, pr, fwd_pd, attr)))
        return fail(c), NULL;
    hnd wf_md = api.pd_query_md(fwd_pd, Q_WEIGHTS, 0);
    hnd dwb_md = api.pd_query_md(bw_pd, Q_DIFF_WEIGHTS, 0);
    if (mem(&c->user_w, w_md) || mem(&c->user_dw, dw_md) || mem(&c->src, x_md)
        || mem(&c->dst, y_md) || mem(&c->diff_dst, y_md) || mem(&c->diff_src, x_md)
        || blocked(&c->wf_mem, wf_md, &c->wf_buf) || blocked(&c->dwb_mem, dwb_md, &c->dwb_buf))
        return fail(c), NULL;
    if (pd_prim(fwd_pd, &c->fwd, &smd[1]) || pd_prim(bw_pd, &c->bwd_w, &smd[4])
        || reorder(&c->wf, w_md, c->user_w, wf_md, c->wf_mem, &smd[0])
        || reorder(&c->dw, dwb_md, c->dwb_mem, dw_md, c->user_dw, &smd[5]))
        return fail(c), NULL;
    if (bd_pd) {
        hnd wb_md = api.pd_query_md(bd_pd, Q_WEIGHTS, 0);
        if (blocked(&c->wb_mem, wb_md, &c->wb_buf) || pd_prim(bd_pd, &c->bwd_data, &smd[3])
            || reorder(&c->wb, w_md, c->user_w, wb_md, c->wb_mem, &smd[2]))
            return fail(c), NULL;
        impl_name(bd_pd, c->impl[1]);
        arg(&c->bwd_data, A_DIFF_DST, c->diff_dst);
        arg(&c->bwd_data, A_WEIGHTS, c->wb_mem);
        arg(&c->bwd_data, A_DIFF_SRC, c->diff_src);
    }
    impl_name(fwd_pd, c->impl[0]);
    impl_name(bw_pd, c->impl[2]);
    arg(&c->fwd, A_SRC, c->src);
    arg(&c->fwd, A_WEIGHTS, c->wf_mem);
    arg(&c->fwd, A_DST, c->dst);
    arg(&c->bwd_w, A_SRC, c->src);
    arg(&c->bwd_w, A_DIFF_DST, c->diff_dst);
    arg(&c->bwd_w, A_DIFF_WEIGHTS, c->dwb_mem);
    step_t *steps[6] = {&c->wf, &c->fwd, &c->wb, &c->bwd_data, &c->bwd_w, &c->dw};
    for (int i = 0; i < 6; i++)
        if (smd[i] && api.md_get_size(smd[i]) > c->scratch_size)
            c->scratch_size = api.md_get_size(smd[i]);
    c->scratch = aligned_alloc(64, (c->scratch_size + 64) / 64 * 64);
    if (!c->scratch)
        return fail(c), NULL;
    for (int i = 0; i < 6; i++)
        if (smd[i] && steps[i]->prim)
            attach_scratch(steps[i], smd[i], c, &holder[i]);
    return c;
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

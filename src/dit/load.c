/* dm_model_load / dm_model_free: read a DiT-MoE / ProMoE safetensors file into weights of the
 * model's backend (backend.h: the file's bytes and dtype go in, the backend picks the layout). */
#include "dit/model.h"
#include "io/st_internal.h"

#include <math.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                         \
    do {                                  \
        dm_status st_ = (call);           \
        if (st_ != DM_OK) return st_;     \
    } while (0)
static dm_status own(dm_model *m, dm_weight *w)
{
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? 2 * m->cap_owned : 64;
        dm_weight **q = realloc(m->owned, (size_t)cap * sizeof *q);
        if (!q) {
            m->be->ops->weight_free(m->be->ctx, w);
            return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        }
        m->owned = q;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = w;
    m->weight_bytes += m->be->ops->weight_bytes(w);
    return DM_OK;
}

/* A backend weight from host data of `dtype`, owned by the model. */
static dm_status make(dm_model *m, const char *name, dm_weight_role role, dm_weight_use use,
                      dm_dtype dtype, int rows, int cols, const void *data, dm_weight **out)
{
    dm_weight_desc d = {.name = name, .role = role, .use = use, .dtype = dtype, .rows = rows,
                        .cols = cols, .data = data};
    TRY(m->be->ops->weight(m->be->ctx, &d, out));
    return own(m, *out);
}

/* ---- routed experts stored quantised (docs/format.md "Quantised routed experts") ----------- */

/* A pre-quantised LINEAR weight [rows, cols] (q and scale in the file's layout, desc.quant). */
static dm_status make_q(dm_model *m, const char *name, dm_weight_role role, int bits, int rows,
                        int cols, const void *q, const void *scale, dm_weight **out)
{
    dm_weight_desc d = {.name = name, .role = role, .use = DM_USE_LINEAR,
                        .dtype = bits == 8 ? DM_I8 : DM_U8, .rows = rows, .cols = cols, .data = q,
                        .quant = bits, .scale = scale};
    TRY(m->be->ops->weight(m->be->ctx, &d, out));
    return own(m, *out);
}

/* Does tensor t (name) go through the stored-quantised path? Errors for a quantised dtype where
 * the file or the role does not allow one. *bits = the file's kind (0: a float weight). */
static dm_status stored_kind(const dm_st_file *f, const char *name, const dm_st_tensor *t,
                             dm_weight_role role, int *bits)
{
    const int qb = dm_st_quant_bits(f);
    const char *p = dm_st_path(f);
    *bits = 0;
    if (!t) return DM_OK; /* missing: the shape check names it */
    const int qdt = t->dtype == DM_I8 || t->dtype == DM_U8;
    if (qb < 0)
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"quant_experts\": '%s' (expected int8 or int4)",
                       p, dm_st_meta(f, "quant_experts"));
    if (role != DM_ROLE_EXPERT) {
        if (qdt)
            return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s: only routed experts may be stored "
                           "quantised", p, name, dm_dtype_name(t->dtype));
        return DM_OK;
    }
    if (qb == 0) {
        if (qdt)
            return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s, but the file has no \"quant_experts\" "
                           "metadata (docs/format.md)", p, name, dm_dtype_name(t->dtype));
        return DM_OK;
    }
    const dm_dtype want = qb == 8 ? DM_I8 : DM_U8;
    if (t->dtype != want)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s expected %s (the file's quant_experts is "
                       "int%d)", p, name, dm_dtype_name(t->dtype), dm_dtype_name(want), qb);
    *bits = qb;
    return DM_OK;
}

/* The q and scale tensors of stored expert weight `name`, logical shape [rows, cols], checked:
 * int8 I8 [rows, cols] + F32 [rows]; int4 U8 [rows, cols/2] + BF16 [rows, cols/32]. */
static dm_status stored_parts(const dm_st_file *f, const char *name, int bits, int64_t rows,
                              int64_t cols, const dm_st_tensor **tq, const dm_st_tensor **ts)
{
    const char *p = dm_st_path(f);
    if (bits == 4 && cols % 32)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: int4 needs the input width to be a multiple of 32; "
                       "the weight is [%lld, %lld]", p, name, (long long)rows, (long long)cols);
    const int64_t shape[2] = {rows, cols};
    TRY(dm_st_check_shape(f, name, 2, shape)); /* int4: U8 [rows, cols/2] (safetensors.c) */
    *tq = dm_st_find(f, name);
    char sname[288];
    snprintf(sname, sizeof sname, "%s.scale", name);
    const int64_t s8[1] = {rows}, s4[2] = {rows, cols / 32};
    TRY(dm_st_check_shape(f, sname, bits == 8 ? 1 : 2, bits == 8 ? s8 : s4));
    *ts = dm_st_find(f, sname);
    const dm_dtype want = bits == 8 ? DM_F32 : DM_BF16;
    if ((*ts)->dtype != want)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s expected %s (int%d expert scales)", p,
                       sname, dm_dtype_name((*ts)->dtype), dm_dtype_name(want), bits);
    const unsigned char *sb = (*ts)->data;
    const int64_t ns = bits == 8 ? rows : rows * (cols / 32);
    for (int64_t i = 0; i < ns; i++) { /* a non-finite scale would turn outputs into NaN */
        uint32_t u = 0;
        if (bits == 8) memcpy(&u, sb + 4 * i, 4);
        else u = (uint32_t)sb[2 * i] << 16 | (uint32_t)sb[2 * i + 1] << 24;
        if ((u & 0x7f800000u) == 0x7f800000u)
            return dm_fail(DM_ERR_FORMAT, "%s: %s: scale of row %lld%s is not finite", p, sname,
                           (long long)(bits == 8 ? i : i / (cols / 32)), bits == 8 ? "" : " (a group)");
    }
    const void *m128 = bits == 8 ? memchr((*tq)->data, 0x80, (*tq)->nbytes) : NULL;
    if (m128) { /* int8 experts are symmetric (what the converter writes): -127..127 */
        const size_t off = (size_t)((const unsigned char *)m128 - (const unsigned char *)(*tq)->data);
        return dm_fail(DM_ERR_FORMAT, "%s: %s: value -128 at [%lld, %lld] (expected -127..127)", p,
                       name, (long long)(off / (size_t)cols), (long long)(off % (size_t)cols));
    }
    return DM_OK;
}

/* Float32 tensor `name` of shape [d0] / [d0,d1] / [d0,d1,d2,d3] (ndim 1-4) as a VECTOR weight. */
static dm_status load(dm_model *m, const dm_st_file *f, dm_weight **out, dm_weight_role role,
                      int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 10, 11)));
static dm_status load(dm_model *m, const dm_st_file *f, dm_weight **out, dm_weight_role role,
                      int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const int64_t shape[4] = {d0, d1, d2, d3};
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    float *v;
    TRY(dm_st_load_f32(f, name, ndim, shape, &v));
    dm_status st = make(m, name, role, DM_USE_VECTOR, DM_F32, (int)n, 1, v, out);
    free(v);
    dm_st_release(f, dm_st_find(f, name));
    return st;
}

/* Matrix stored as [out, in] (or [out, a, b, c] with in = a*b*c) as a LINEAR weight: the file's
 * bytes and dtype go to the backend (the CPU keeps BF16/F16 16-bit, same results: widening to
 * float32 is exact). */
static dm_status loadp(dm_model *m, const dm_st_file *f, dm_weight **out, dm_weight_role role,
                       int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 10, 11)));
static dm_status loadp(dm_model *m, const dm_st_file *f, dm_weight **out, dm_weight_role role,
                       int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const int64_t shape[4] = {d0, d1, d2, d3};
    const int64_t in = d1 * (ndim == 4 ? d2 * d3 : 1);
    const dm_st_tensor *t = dm_st_find(f, name);
    int bits;
    TRY(stored_kind(f, name, t, role, &bits));
    if (bits && ndim == 2) { /* stored int8 / int4: straight from the mapping */
        const dm_st_tensor *tq, *ts;
        TRY(stored_parts(f, name, bits, d0, d1, &tq, &ts));
        dm_status st = make_q(m, name, role, bits, (int)d0, (int)d1, tq->data, ts->data, out);
        dm_st_release(f, tq);
        dm_st_release(f, ts);
        return st;
    }
    if (t && (t->dtype == DM_F32 || t->dtype == DM_BF16 || t->dtype == DM_F16)) {
        TRY(dm_st_check_shape(f, name, ndim, shape));
        dm_status st = make(m, name, role, DM_USE_LINEAR, t->dtype, (int)d0, (int)in, t->data, out);
        dm_st_release(f, t);
        return st;
    }
    float *W; /* absent (the error names it) or another dtype: through the float32 loader */
    TRY(dm_st_load_f32(f, name, ndim, shape, &W));
    dm_status st = make(m, name, role, DM_USE_LINEAR, DM_F32, (int)d0, (int)in, W, out);
    free(W);
    return st;
}

#define LOAD1(dst, a, ...) TRY(load(m, f, &(dst), DM_ROLE_NORM, 1, a, 0, 0, 0, __VA_ARGS__))
#define LOAD2(dst, role, a, b, ...) TRY(load(m, f, &(dst), role, 2, a, b, 0, 0, __VA_ARGS__))
#define LOADP(dst, role, a, b, ...) TRY(loadp(m, f, &(dst), role, 2, a, b, 0, 0, __VA_ARGS__))

/* DiT-MoE SwiGLU expert: gate_proj and up_proj [F, D] concatenated into one [2F, D] matrix so
 * one GEMM computes both; down_proj [D, F]; no biases. */
static dm_status load_swiglu(dm_model *m, const dm_st_file *f, const char *prefix, int F, int D,
                             dm_weight_role role, dm_mlp_layer *w)
{
    char gname[160], uname[160], name[176];
    snprintf(gname, sizeof gname, "%s.gate_proj.weight", prefix);
    snprintf(uname, sizeof uname, "%s.up_proj.weight", prefix);
    snprintf(name, sizeof name, "%s.gate_proj+up_proj", prefix);
    *w = (dm_mlp_layer){.act = DM_MLP_SWIGLU, .F = F};
    const int64_t shape[2] = {F, D};
    const dm_st_tensor *tg = dm_st_find(f, gname), *tu = dm_st_find(f, uname);
    dm_weight *w1 = NULL;
    int bits, ubits;
    TRY(stored_kind(f, gname, tg, role, &bits));
    TRY(stored_kind(f, uname, tu, role, &ubits));
    if (bits) { /* stored int8 / int4: q rows and scale rows of gate then up, no float copy */
        const dm_st_tensor *gq, *gs, *uq, *us;
        TRY(stored_parts(f, gname, bits, F, D, &gq, &gs));
        TRY(stored_parts(f, uname, bits, F, D, &uq, &us));
        unsigned char *q = malloc(gq->nbytes + uq->nbytes), *sc = malloc(gs->nbytes + us->nbytes);
        dm_status st = q && sc ? DM_OK : dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        if (st == DM_OK) {
            memcpy(q, gq->data, gq->nbytes);
            memcpy(q + gq->nbytes, uq->data, uq->nbytes);
            memcpy(sc, gs->data, gs->nbytes);
            memcpy(sc + gs->nbytes, us->data, us->nbytes);
            st = make_q(m, name, role, bits, 2 * F, D, q, sc, &w1);
        }
        free(q);
        free(sc);
        dm_st_release(f, gq);
        dm_st_release(f, gs);
        dm_st_release(f, uq);
        dm_st_release(f, us);
        TRY(st);
    } else if (tg && tu && tg->dtype == tu->dtype &&
        (tg->dtype == DM_F32 || tg->dtype == DM_BF16 || tg->dtype == DM_F16)) {
        TRY(dm_st_check_shape(f, gname, 2, shape));
        TRY(dm_st_check_shape(f, uname, 2, shape));
        unsigned char *raw = malloc(2 * tg->nbytes); /* [2F, D]: gate rows then up rows */
        if (!raw) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        memcpy(raw, tg->data, tg->nbytes);
        memcpy(raw + tg->nbytes, tu->data, tu->nbytes);
        dm_status st = make(m, name, role, DM_USE_LINEAR, tg->dtype, 2 * F, D, raw, &w1);
        free(raw);
        dm_st_release(f, tg);
        dm_st_release(f, tu);
        TRY(st);
    } else {
        float *g = NULL, *u = NULL, *gu = NULL;
        dm_status st = dm_st_load_f32(f, gname, 2, shape, &g);
        if (st == DM_OK) st = dm_st_load_f32(f, uname, 2, shape, &u);
        if (st == DM_OK && !(gu = malloc((size_t)2 * F * D * sizeof(float))))
            st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        if (st == DM_OK) {
            memcpy(gu, g, (size_t)F * D * sizeof(float));
            memcpy(gu + (size_t)F * D, u, (size_t)F * D * sizeof(float));
            st = make(m, name, role, DM_USE_LINEAR, DM_F32, 2 * F, D, gu, &w1);
        }
        free(g);
        free(u);
        free(gu);
        TRY(st);
    }
    w->w1 = w1;
    dm_weight *w2;
    LOADP(w2, role, D, F, "%s.down_proj.weight", prefix);
    w->w2 = w2;
    return DM_OK;
}

/* GELU-tanh MLP with biases: <prefix>.<up>.weight [F, D] + bias [F], <prefix>.<down> [D, F] + [D]
 * (ProMoE experts: up_proj/down_proj; dense blocks: fc1/fc2). */
static dm_status load_gelu(dm_model *m, const dm_st_file *f, const char *prefix, const char *up,
                           const char *down, int F, int D, dm_weight_role role, dm_mlp_layer *w)
{
    dm_weight *w1, *b1, *w2, *b2;
    LOADP(w1, role, F, D, "%s.%s.weight", prefix, up);
    LOAD1(b1, F, "%s.%s.bias", prefix, up);
    LOADP(w2, role, D, F, "%s.%s.weight", prefix, down);
    LOAD1(b2, D, "%s.%s.bias", prefix, down);
    *w = (dm_mlp_layer){.act = DM_MLP_GELU_TANH, .F = F, .w1 = w1, .b1 = b1, .w2 = w2, .b2 = b2};
    return DM_OK;
}

static dm_status load_attention(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, hd = D / c->heads;
    /* DiT-MoE XL/G: Wqkv/out_proj + q_norm/k_norm; S/B and ProMoE: timm qkv/proj. */
    const int flash = c->attn == DM_ATTN_QKNORM && c->arch == DM_ARCH_DITMOE;
    LOADP(b->qkv_w, DM_ROLE_ATTN, 3 * D, D, "blocks.%d.attn.%s.weight", i, flash ? "Wqkv" : "qkv");
    LOAD1(b->qkv_b, 3 * D, "blocks.%d.attn.%s.bias", i, flash ? "Wqkv" : "qkv");
    LOADP(b->proj_w, DM_ROLE_ATTN, D, D, "blocks.%d.attn.%s.weight", i, flash ? "out_proj" : "proj");
    LOAD1(b->proj_b, D, "blocks.%d.attn.%s.bias", i, flash ? "out_proj" : "proj");
    if (c->attn == DM_ATTN_QKNORM) {
        LOAD1(b->q_norm_w, hd, "blocks.%d.attn.q_norm.weight", i);
        LOAD1(b->q_norm_b, hd, "blocks.%d.attn.q_norm.bias", i);
        LOAD1(b->k_norm_w, hd, "blocks.%d.attn.k_norm.weight", i);
        LOAD1(b->k_norm_b, hd, "blocks.%d.attn.k_norm.bias", i);
    }
    return DM_OK;
}

static dm_status alloc_experts(dm_model *m, dm_block_w *b)
{
    b->experts = calloc((size_t)b->ffn.d.n_experts, sizeof *b->experts);
    if (!b->experts) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    b->ffn.experts = b->experts;
    return DM_OK;
}

/* Routed experts of DiT-MoE block i: the rows of its router, so a model pruned in some layers
 * only (ditmoe-prune --layers) loads; in [top_k, num_experts] (the config's value is the
 * largest layer's). A missing or mis-shaped router is left to loadp, whose error names it. */
static dm_status ditmoe_block_experts(const dm_model *m, const dm_st_file *f, int i, int *E)
{
    const dm_config *c = &m->cfg;
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.moe.gate.weight", i);
    const dm_st_tensor *t = dm_st_find(f, name);
    *E = c->num_experts;
    if (!t || t->ndim != 2 || t->shape[0] == c->num_experts) return DM_OK;
    if (t->shape[0] < c->top_k || t->shape[0] > c->num_experts)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: shape [%lld,%lld]: %lld experts, expected %d..%d "
                       "(top_k..num_experts)", m->path, name, (long long)t->shape[0],
                       (long long)t->shape[1], (long long)t->shape[0], c->top_k, c->num_experts);
    *E = (int)t->shape[0];
    return DM_OK;
}

static dm_status load_ditmoe_ffn(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden;
    int E;
    TRY(ditmoe_block_experts(m, f, i, &E));
    char prefix[128];
    b->ffn = (dm_ffn_layer){.d = {.kind = DM_ROUTE_SOFTMAX_TOPK, .E = E, .k = c->top_k, .D = D,
                                  .n_experts = E}};
    dm_weight *gate;
    LOADP(gate, DM_ROLE_ROUTER, E, D, "blocks.%d.moe.gate.weight", i);
    b->ffn.gate = gate;
    TRY(alloc_experts(m, b));
    for (int e = 0; e < E; e++) {
        snprintf(prefix, sizeof prefix, "blocks.%d.moe.experts.%d", i, e);
        TRY(load_swiglu(m, f, prefix, c->expert_hidden, D, DM_ROLE_EXPERT, &b->experts[e]));
    }
    if (c->shared_hidden > 0) {
        snprintf(prefix, sizeof prefix, "blocks.%d.moe.shared_experts", i);
        TRY(load_swiglu(m, f, prefix, c->shared_hidden, D, DM_ROLE_SHARED, &b->ffn.shared));
    }
    return DM_OK;
}

/* ProMoE MoE block: prototypes (stored L2-normalised), E routed experts + the unconditional
 * expert (index E), shared expert; all GELU-tanh with biases. */
static dm_status load_promoe_ffn(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, E = c->num_experts;
    char prefix[128], name[128];
    b->ffn = (dm_ffn_layer){.d = {.kind = c->promoe_ec ? DM_ROUTE_PROTO_EC : DM_ROUTE_PROTO_TC,
                                  .E = E, .k = c->top_k, .D = D,
                                  .act = (dm_gate_act)c->router_act, .n_experts = E + 1}};
    snprintf(name, sizeof name, "blocks.%d.mlp.cluster_centers", i);
    const int64_t shape[2] = {E, D};
    float *protos;
    TRY(dm_st_load_f32(f, name, 2, shape, &protos));
    for (int e = 0; e < E; e++) { /* F.normalize(p, eps 1e-12), host-side at load */
        float *p = protos + (size_t)e * D;
        double nn = 0;
        for (int d = 0; d < D; d++) nn += (double)p[d] * p[d];
        float inv = 1.0f / fmaxf((float)sqrt(nn), 1e-12f);
        for (int d = 0; d < D; d++) p[d] *= inv;
    }
    dm_weight *gate = NULL;
    dm_status st = make(m, name, DM_ROLE_ROUTER, DM_USE_LINEAR, DM_F32, E, D, protos, &gate);
    free(protos);
    TRY(st);
    b->ffn.gate = gate;
    TRY(alloc_experts(m, b));
    for (int e = 0; e <= E; e++) {
        snprintf(prefix, sizeof prefix, "blocks.%d.mlp.experts.%d", i, e);
        TRY(load_gelu(m, f, prefix, "up_proj", "down_proj", c->expert_hidden, D, DM_ROLE_EXPERT,
                      &b->experts[e]));
    }
    if (c->shared_hidden > 0) {
        snprintf(prefix, sizeof prefix, "blocks.%d.mlp.shared_expert", i);
        TRY(load_gelu(m, f, prefix, "up_proj", "down_proj", c->shared_hidden, D, DM_ROLE_SHARED,
                      &b->ffn.shared));
    }
    return DM_OK;
}

static dm_status load_block(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden;
    char prefix[128];
    LOADP(b->mod_w, DM_ROLE_MOD, 6 * D, D, "blocks.%d.adaLN_modulation.1.weight", i);
    LOAD1(b->mod_b, 6 * D, "blocks.%d.adaLN_modulation.1.bias", i);
    TRY(load_attention(m, f, i, b));
    b->is_moe = !c->moe_interleave || i % 2 == 1;
    if (c->arch == DM_ARCH_DITMOE) return load_ditmoe_ffn(m, f, i, b);
    if (b->is_moe) return load_promoe_ffn(m, f, i, b);
    snprintf(prefix, sizeof prefix, "blocks.%d.mlp", i);
    b->ffn = (dm_ffn_layer){.d = {.kind = DM_ROUTE_DENSE, .k = 1, .D = D, .n_experts = 1},
                            .experts = &b->mlp};
    return load_gelu(m, f, prefix, "fc1", "fc2", c->mlp_hidden, D, DM_ROLE_MLP, &b->mlp);
}

static dm_status load_all(dm_model *m, const dm_st_file *f)
{
    dm_config *c = &m->cfg;
    TRY(dm_config_from_file(f, c));
    const int D = c->hidden, C = c->in_channels, p = c->patch, Co = c->out_channels;
    if (c->input_size % p != 0 || D % 4 != 0 || c->top_k > 64)
        return dm_fail(DM_ERR_FORMAT, "%s: unsupported config (input %d, patch %d, hidden %d, k %d)",
                       m->path, c->input_size, p, D, c->top_k);
    m->G = c->input_size / p;
    m->T = m->G * m->G;
    if (dm_st_find(f, "pos_embed")) {
        TRY(load(m, f, &m->pos_embed, DM_ROLE_EMBED, 3, 1, m->T, D, 0, "pos_embed"));
    } else {
        float *pe = malloc((size_t)m->T * D * sizeof(float));
        if (!pe) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        dm_pos_embed_2d(D, m->G, pe);
        dm_status st = make(m, "pos_embed (computed)", DM_ROLE_EMBED, DM_USE_VECTOR, DM_F32,
                            m->T * D, 1, pe, &m->pos_embed);
        free(pe);
        TRY(st);
        dm_log(DM_LOG_VERBOSE, "%s: no pos_embed tensor, computed the 2-D sin-cos table", m->path);
    }
    TRY(loadp(m, f, &m->patch_w, DM_ROLE_EMBED, 4, D, C, p, p, "x_embedder.proj.weight"));
    LOAD1(m->patch_b, D, "x_embedder.proj.bias");
    LOADP(m->t_w1, DM_ROLE_EMBED, D, DM_TIME_FREQ_DIM, "t_embedder.mlp.0.weight");
    LOAD1(m->t_b1, D, "t_embedder.mlp.0.bias");
    LOADP(m->t_w2, DM_ROLE_EMBED, D, D, "t_embedder.mlp.2.weight");
    LOAD1(m->t_b2, D, "t_embedder.mlp.2.bias");
    LOAD2(m->y_table, DM_ROLE_EMBED, c->num_classes + 1, D, "y_embedder.embedding_table.weight");
    LOADP(m->final_mod_w, DM_ROLE_FINAL, 2 * D, D, "final_layer.adaLN_modulation.1.weight");
    LOAD1(m->final_mod_b, 2 * D, "final_layer.adaLN_modulation.1.bias");
    LOADP(m->final_w, DM_ROLE_FINAL, p * p * Co, D, "final_layer.linear.weight");
    LOAD1(m->final_b, p * p * Co, "final_layer.linear.bias");
    m->blocks = calloc((size_t)c->depth, sizeof *m->blocks);
    if (!m->blocks) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    for (int i = 0; i < c->depth; i++) {
        TRY(load_block(m, f, i, &m->blocks[i]));
#ifdef __GLIBC__
        /* The per-tensor temporaries (concatenated gate+up, format conversions) leave freed
         * holes between the long-lived packed weights, which glibc keeps resident: +4 GB of RSS
         * over 17 GB of weights on a G/2-shaped model (docs/perf.md). Give them back per block. */
        malloc_trim(0);
#endif
    }
    return DM_OK;
}

dm_status dm_model_load(const char *path, dm_model **out)
{
    dm_load_opts o;
    dm_load_opts_init(&o);
    return dm_model_load_opts(path, &o, out);
}

dm_status dm_model_load_opts(const char *path, const dm_load_opts *o, dm_model **out)
{
    *out = NULL;
    dm_backend *be = NULL;
    dm_status st = dm_backend_open(o, &be);
    if (st != DM_OK) return st;
    st = dm_backend_require(be, "alloc,release,upload,download,sync,weight,weight_free,"
                            "weight_bytes,linear,layernorm_mod,gated_add,silu,timestep_embed,"
                            "patchify,unpatchify,add_rows,embed_add,attention,ffn", path);
    dm_model *m = st == DM_OK ? calloc(1, sizeof *m) : NULL;
    if (m) m->path = strdup(path);
    if (!m || !m->path) {
        if (m) free(m);
        dm_backend_close(be);
        return st != DM_OK ? st : dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    }
    m->be = be;
    dm_st_file *f = NULL;
    st = dm_st_open_opts(path, o->cfg, &f); /* overrides: .pt files (pt_config.c) */
    const int qb = st == DM_OK ? dm_st_quant_bits(f) : 0;
    if (st == DM_OK && qb > 0 && o->quant_experts && o->quant_experts != qb)
        st = dm_fail(DM_ERR_ARG, "%s: the file stores the routed experts as int%d; --quant-experts "
                     "int%d would re-quantise them (use the float file, or int%d)", path, qb,
                     o->quant_experts, qb);
    if (st == DM_OK) st = load_all(m, f);
    if (st == DM_OK && qb > 0)
        dm_log(DM_LOG_INFO, "%s: routed experts stored as int%d, used as stored", path, qb);
    dm_st_close(f);
    if (st != DM_OK) {
        dm_model_free(m);
        return st;
    }
    const dm_config *c = &m->cfg;
    dm_log(DM_LOG_VERBOSE, "%s: %s D=%d L=%d H=%d E=%d k=%d %s attention, %s, %d classes, "
           "%.1f MiB of weights on backend %s", path, dm_arch_name(c->arch), c->hidden, c->depth,
           c->heads, c->num_experts, c->top_k, c->attn == DM_ATTN_QKNORM ? "qknorm" : "timm",
           dm_objective_name(c->objective), c->num_classes, m->weight_bytes / 1048576.0,
           m->be->ops->name);
    *out = m;
    return DM_OK;
}

void dm_model_free(dm_model *m)
{
    if (!m) return;
    dm_model_lab_free(m);
    const dm_backend_ops *ops = m->be->ops;
    for (int i = 0; i < m->n_owned; i++) ops->weight_free(m->be->ctx, m->owned[i]);
    free(m->owned);
    if (m->blocks)
        for (int i = 0; i < m->cfg.depth; i++) free(m->blocks[i].experts);
    free(m->blocks);
    dm_workspace *w = &m->ws;
    dm_buf *bufs[] = {&w->xin, &w->x, &w->h, &w->qkv, &w->att, &w->tmp, &w->patches, &w->outp,
                      &w->out, &w->tfreq, &w->thid, &w->c, &w->mod};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) ops->release(m->be->ctx, bufs[i]);
    dm_backend_close(m->be);
    dm_config_free(&m->cfg);
    free(m->path);
    free(m);
}

const dm_config *dm_model_config(const dm_model *m) { return &m->cfg; }
const char *dm_model_path(const dm_model *m) { return m->path; }

int dm_config_moe_layers(const dm_config *c)
{
    return c->moe_interleave ? c->depth / 2 : c->depth;
}

/* dm_model_load / dm_model_free: read a DiT-MoE safetensors file into float32 weights. */
#include "dit/model.h"
#include "io/st_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                         \
    do {                                  \
        dm_status st_ = (call);           \
        if (st_ != DM_OK) return st_;     \
    } while (0)
static dm_status own(dm_model *m, void *p)
{
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **q = realloc(m->owned, (size_t)cap * sizeof *q);
        if (!q) {
            free(p);
            return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        }
        m->owned = q;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = p;
    return DM_OK;
}

/* Load tensor `name` (printf-style) of shape [d0] / [d0,d1] / [d0,d1,d2,d3] (ndim 1-4) into a
 * new float32 buffer the caller owns. */
static dm_status load_raw(dm_model *m, const dm_st_file *f, float **out, int ndim, int64_t d0,
                          int64_t d1, int64_t d2, int64_t d3, const char *fmt, va_list ap)
{
    char name[256];
    vsnprintf(name, sizeof name, fmt, ap);
    const int64_t shape[4] = {d0, d1, d2, d3};
    (void)m;
    return dm_st_load_f32(f, name, ndim, shape, out);
}

/* As load_raw, the buffer owned by the model. */
static dm_status load(dm_model *m, const dm_st_file *f, float **out, int ndim, int64_t d0,
                      int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));
static dm_status load(dm_model *m, const dm_st_file *f, float **out, int ndim, int64_t d0,
                      int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    dm_status st = load_raw(m, f, out, ndim, d0, d1, d2, d3, fmt, ap);
    va_end(ap);
    return st != DM_OK ? st : own(m, *out);
}

/* Pack W [out, in] for dm_linear_packed (the packed copy owned by the model); frees W. */
static dm_status pack(dm_model *m, float *W, int out, int in, dm_pmat *pm)
{
    int fail = dm_pmat_pack(pm, W, out, in);
    free(W);
    if (fail) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    return own(m, pm->p);
}

/* Load a matrix stored as [out, in] (or [out, a, b, c] with in = a*b*c) and pack it. BF16 and
 * F16 tensors stay 16-bit (half the memory, same results: widening to float32 is exact). */
static dm_status loadp(dm_model *m, const dm_st_file *f, dm_pmat *pm, int ndim, int64_t d0,
                       int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));
static dm_status loadp(dm_model *m, const dm_st_file *f, dm_pmat *pm, int ndim, int64_t d0,
                       int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const int64_t shape[4] = {d0, d1, d2, d3};
    const int64_t in = d1 * (ndim == 4 ? d2 * d3 : 1);
    const dm_st_tensor *t = dm_st_find(f, name);
    if (t && (t->dtype == DM_BF16 || t->dtype == DM_F16)) {
        TRY(dm_st_check_shape(f, name, ndim, shape));
        int r = dm_pmat_pack_half(pm, t->data, t->dtype, (int)d0, (int)in);
        if (r == -1) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        if (r == 0) return own(m, pm->p);
        /* r == -2: this build cannot run the type natively; widen to float32 below */
    }
    float *W;
    TRY(dm_st_load_f32(f, name, ndim, shape, &W));
    return pack(m, W, (int)d0, (int)in, pm);
}

#define LOAD1(dst, a, ...) TRY(load(m, f, &(dst), 1, a, 0, 0, 0, __VA_ARGS__))
#define LOAD2(dst, a, b, ...) TRY(load(m, f, &(dst), 2, a, b, 0, 0, __VA_ARGS__))
#define LOADP(dst, a, b, ...) TRY(loadp(m, f, &(dst), 2, a, b, 0, 0, __VA_ARGS__))

/* DiT-MoE SwiGLU expert: gate_proj and up_proj [F, D] packed into one [2F, D] matrix so one
 * GEMM computes both; down_proj [D, F]; no biases. */
static dm_status load_swiglu(dm_model *m, const dm_st_file *f, const char *prefix, int F, int D,
                             dm_mlp_w *w)
{
    char gname[160], uname[160];
    snprintf(gname, sizeof gname, "%s.gate_proj.weight", prefix);
    snprintf(uname, sizeof uname, "%s.up_proj.weight", prefix);
    *w = (dm_mlp_w){.act = DM_MLP_SWIGLU, .F = F};
    const int64_t shape[2] = {F, D};
    const dm_st_tensor *tg = dm_st_find(f, gname), *tu = dm_st_find(f, uname);
    if (tg && tu && tg->dtype == tu->dtype && (tg->dtype == DM_BF16 || tg->dtype == DM_F16)) {
        TRY(dm_st_check_shape(f, gname, 2, shape));
        TRY(dm_st_check_shape(f, uname, 2, shape));
        unsigned char *raw = malloc(2 * tg->nbytes); /* [2F, D] 16-bit, gate rows then up rows */
        if (!raw) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        memcpy(raw, tg->data, tg->nbytes);
        memcpy(raw + tg->nbytes, tu->data, tu->nbytes);
        int r = dm_pmat_pack_half(&w->w1, raw, tg->dtype, 2 * F, D);
        free(raw);
        if (r == -1) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        if (r == 0) TRY(own(m, w->w1.p));
    }
    if (!w->w1.p) {
        float *g = NULL, *u = NULL, *gu = NULL;
        dm_status st = dm_st_load_f32(f, gname, 2, shape, &g);
        if (st == DM_OK) st = dm_st_load_f32(f, uname, 2, shape, &u);
        if (st == DM_OK && !(gu = malloc((size_t)2 * F * D * sizeof(float))))
            st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        if (st == DM_OK) {
            memcpy(gu, g, (size_t)F * D * sizeof(float));
            memcpy(gu + (size_t)F * D, u, (size_t)F * D * sizeof(float));
        }
        free(g);
        free(u);
        if (st != DM_OK) return st;
        TRY(pack(m, gu, 2 * F, D, &w->w1));
    }
    LOADP(w->w2, D, F, "%s.down_proj.weight", prefix);
    return DM_OK;
}

/* GELU-tanh MLP with biases: <prefix>.<up>.weight [F, D] + bias [F], <prefix>.<down> [D, F] + [D]
 * (ProMoE experts: up_proj/down_proj; dense blocks: fc1/fc2). */
static dm_status load_gelu(dm_model *m, const dm_st_file *f, const char *prefix, const char *up,
                           const char *down, int F, int D, dm_mlp_w *w)
{
    *w = (dm_mlp_w){.act = DM_MLP_GELU_TANH, .F = F};
    LOADP(w->w1, F, D, "%s.%s.weight", prefix, up);
    LOAD1(w->b1, F, "%s.%s.bias", prefix, up);
    LOADP(w->w2, D, F, "%s.%s.weight", prefix, down);
    LOAD1(w->b2, D, "%s.%s.bias", prefix, down);
    return DM_OK;
}

static dm_status load_attention(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, hd = D / c->heads;
    /* DiT-MoE XL/G: Wqkv/out_proj + q_norm/k_norm; S/B and ProMoE: timm qkv/proj. */
    const int flash = c->attn == DM_ATTN_QKNORM && c->arch == DM_ARCH_DITMOE;
    LOADP(b->qkv_w, 3 * D, D, "blocks.%d.attn.%s.weight", i, flash ? "Wqkv" : "qkv");
    LOAD1(b->qkv_b, 3 * D, "blocks.%d.attn.%s.bias", i, flash ? "Wqkv" : "qkv");
    LOADP(b->proj_w, D, D, "blocks.%d.attn.%s.weight", i, flash ? "out_proj" : "proj");
    LOAD1(b->proj_b, D, "blocks.%d.attn.%s.bias", i, flash ? "out_proj" : "proj");
    if (c->attn == DM_ATTN_QKNORM) {
        LOAD1(b->q_norm_w, hd, "blocks.%d.attn.q_norm.weight", i);
        LOAD1(b->q_norm_b, hd, "blocks.%d.attn.q_norm.bias", i);
        LOAD1(b->k_norm_w, hd, "blocks.%d.attn.k_norm.weight", i);
        LOAD1(b->k_norm_b, hd, "blocks.%d.attn.k_norm.bias", i);
    }
    return DM_OK;
}

static dm_status load_ditmoe_ffn(dm_model *m, const dm_st_file *f, int i, dm_moe_w *moe)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden;
    char prefix[128];
    *moe = (dm_moe_w){.kind = DM_ROUTE_SOFTMAX_TOPK, .E = c->num_experts, .k = c->top_k, .D = D,
                      .n_experts = c->num_experts};
    LOADP(moe->gate, moe->E, D, "blocks.%d.moe.gate.weight", i);
    moe->experts = calloc((size_t)moe->n_experts, sizeof *moe->experts);
    if (!moe->experts) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    for (int e = 0; e < moe->E; e++) {
        snprintf(prefix, sizeof prefix, "blocks.%d.moe.experts.%d", i, e);
        TRY(load_swiglu(m, f, prefix, c->expert_hidden, D, &moe->experts[e]));
    }
    if (c->shared_hidden > 0) {
        snprintf(prefix, sizeof prefix, "blocks.%d.moe.shared_experts", i);
        TRY(load_swiglu(m, f, prefix, c->shared_hidden, D, &moe->shared));
    }
    return DM_OK;
}

/* ProMoE MoE block: prototypes (stored L2-normalised), E routed experts + the unconditional
 * expert (index E), shared expert; all GELU-tanh with biases. */
static dm_status load_promoe_ffn(dm_model *m, const dm_st_file *f, int i, dm_moe_w *moe)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, E = c->num_experts;
    char prefix[128];
    *moe = (dm_moe_w){.kind = c->promoe_ec ? DM_ROUTE_PROTO_EC : DM_ROUTE_PROTO_TC, .E = E,
                      .k = c->top_k, .D = D, .act = (dm_gate_act)c->router_act, .n_experts = E + 1};
    float *protos;
    TRY(load(m, f, &protos, 2, E, D, 0, 0, "blocks.%d.mlp.cluster_centers", i));
    for (int e = 0; e < E; e++) { /* F.normalize(p, eps 1e-12) */
        float *p = protos + (size_t)e * D;
        double nn = 0;
        for (int d = 0; d < D; d++) nn += (double)p[d] * p[d];
        float inv = 1.0f / fmaxf((float)sqrt(nn), 1e-12f);
        for (int d = 0; d < D; d++) p[d] *= inv;
    }
    if (dm_pmat_pack(&moe->gate, protos, E, D)) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    TRY(own(m, moe->gate.p));
    moe->experts = calloc((size_t)moe->n_experts, sizeof *moe->experts);
    if (!moe->experts) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    for (int e = 0; e <= E; e++) {
        snprintf(prefix, sizeof prefix, "blocks.%d.mlp.experts.%d", i, e);
        TRY(load_gelu(m, f, prefix, "up_proj", "down_proj", c->expert_hidden, D, &moe->experts[e]));
    }
    if (c->shared_hidden > 0) {
        snprintf(prefix, sizeof prefix, "blocks.%d.mlp.shared_expert", i);
        TRY(load_gelu(m, f, prefix, "up_proj", "down_proj", c->shared_hidden, D, &moe->shared));
    }
    return DM_OK;
}

static dm_status load_block(dm_model *m, const dm_st_file *f, int i, dm_block_w *b)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden;
    char prefix[128];
    LOADP(b->mod_w, 6 * D, D, "blocks.%d.adaLN_modulation.1.weight", i);
    LOAD1(b->mod_b, 6 * D, "blocks.%d.adaLN_modulation.1.bias", i);
    TRY(load_attention(m, f, i, b));
    b->is_moe = !c->moe_interleave || i % 2 == 1;
    if (c->arch == DM_ARCH_DITMOE) return load_ditmoe_ffn(m, f, i, &b->moe);
    if (b->is_moe) return load_promoe_ffn(m, f, i, &b->moe);
    snprintf(prefix, sizeof prefix, "blocks.%d.mlp", i);
    return load_gelu(m, f, prefix, "fc1", "fc2", c->mlp_hidden, D, &b->mlp);
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
        TRY(load(m, f, &m->pos_embed, 3, 1, m->T, D, 0, "pos_embed"));
    } else {
        m->pos_embed = malloc((size_t)m->T * D * sizeof(float));
        if (!m->pos_embed) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
        TRY(own(m, m->pos_embed));
        dm_pos_embed_2d(D, m->G, m->pos_embed);
        dm_log(DM_LOG_VERBOSE, "%s: no pos_embed tensor, computed the 2-D sin-cos table", m->path);
    }
    TRY(loadp(m, f, &m->patch_w, 4, D, C, p, p, "x_embedder.proj.weight"));
    LOAD1(m->patch_b, D, "x_embedder.proj.bias");
    LOADP(m->t_w1, D, DM_TIME_FREQ_DIM, "t_embedder.mlp.0.weight");
    LOAD1(m->t_b1, D, "t_embedder.mlp.0.bias");
    LOADP(m->t_w2, D, D, "t_embedder.mlp.2.weight");
    LOAD1(m->t_b2, D, "t_embedder.mlp.2.bias");
    LOAD2(m->y_table, c->num_classes + 1, D, "y_embedder.embedding_table.weight");
    LOADP(m->final_mod_w, 2 * D, D, "final_layer.adaLN_modulation.1.weight");
    LOAD1(m->final_mod_b, 2 * D, "final_layer.adaLN_modulation.1.bias");
    LOADP(m->final_w, p * p * Co, D, "final_layer.linear.weight");
    LOAD1(m->final_b, p * p * Co, "final_layer.linear.bias");
    m->blocks = calloc((size_t)c->depth, sizeof *m->blocks);
    if (!m->blocks) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", m->path);
    for (int i = 0; i < c->depth; i++) TRY(load_block(m, f, i, &m->blocks[i]));
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
    dm_status bst = dm_backend_check(o->backend);
    if (bst != DM_OK) return bst;
    if (o->backend != DM_BACKEND_CPU)
        return dm_fail(DM_ERR_ARG, "backend %s: not implemented for the transformer yet", dm_backend_name(o->backend));
    *out = NULL;
    dm_model *m = calloc(1, sizeof *m);
    if (!m) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    m->path = strdup(path);
    if (!m->path) {
        free(m);
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    }
    dm_st_file *f = NULL;
    dm_status st = dm_st_open_opts(path, o->cfg, &f); /* overrides: .pt files (pt_config.c) */
    if (st == DM_OK) st = load_all(m, f);
    dm_st_close(f);
    if (st != DM_OK) {
        dm_model_free(m);
        return st;
    }
    const dm_config *c = &m->cfg;
    dm_log(DM_LOG_VERBOSE, "%s: %s D=%d L=%d H=%d E=%d k=%d %s attention, %s, %d classes", path,
           dm_arch_name(c->arch), c->hidden, c->depth, c->heads, c->num_experts, c->top_k,
           c->attn == DM_ATTN_QKNORM ? "qknorm" : "timm", dm_objective_name(c->objective),
           c->num_classes);
    *out = m;
    return DM_OK;
}

void dm_model_free(dm_model *m)
{
    if (!m) return;
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    if (m->blocks)
        for (int i = 0; i < m->cfg.depth; i++) free(m->blocks[i].moe.experts);
    free(m->blocks);
    dm_workspace *w = &m->ws;
    float *bufs[] = {w->x, w->h, w->qkv, w->att, w->tmp, w->patches, w->outp, w->tfreq, w->thid,
                     w->c, w->mod};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    dm_moe_scratch_free(&w->moe);
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

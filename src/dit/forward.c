/* dm_model_forward: the DiT-MoE / ProMoE forward pass, top to bottom as in the papers' figure
 * (docs/spec/ditmoe.md §2, docs/spec/promoe.md §2): patch embedding + position, conditioning,
 * blocks of attention then FFN/MoE, final layer. Every step is one op of the model's backend
 * (backend/backend.h). */
#include "dit/model.h"
#include "dit/finite_check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                     \
    do {                              \
        dm_status st_ = (call);       \
        if (st_ != DM_OK) return st_; \
    } while (0)

/* Backend buffers for a batch of B images (grown, never shrunk). */
static dm_status reserve(dm_model *m, int B)
{
    dm_workspace *w = &m->ws;
    const dm_config *c = &m->cfg;
    const int D = c->hidden, p = c->patch, S = c->input_size;
    const size_t BT = (size_t)B * m->T;
    if (B <= w->cap_B) return DM_OK;
    struct {
        dm_buf *buf;
        size_t n;
    } need[] = {
        {&w->xin, (size_t)B * c->in_channels * S * S},
        {&w->x, BT * D},          {&w->h, BT * D},
        {&w->qkv, BT * 3 * D},    {&w->att, BT * D},
        {&w->tmp, BT * D},        {&w->patches, BT * c->in_channels * p * p},
        {&w->outp, BT * p * p * c->out_channels},
        {&w->out, (size_t)B * c->out_channels * S * S},
        {&w->tfreq, (size_t)B * DM_TIME_FREQ_DIM},
        {&w->thid, (size_t)B * D}, {&w->c, (size_t)B * D},
        {&w->mod, (size_t)B * 6 * D},
    };
    const dm_backend *be = m->be;
    for (size_t i = 0; i < sizeof need / sizeof *need; i++) {
        be->ops->release(be->ctx, need[i].buf);
        dm_status st = be->ops->alloc(be->ctx, need[i].n * sizeof(float), need[i].buf);
        if (st != DM_OK) {
            w->cap_B = 0;
            return dm_fail(st, "%s: out of memory for batch %d", m->path, B);
        }
    }
    w->cap_B = B;
    return DM_OK;
}

static dm_status check_inputs(const dm_model *m, int B, const float *t, const int64_t *y)
{
    for (int b = 0; b < B; b++) {
        if (y[b] < 0 || y[b] > m->cfg.num_classes)
            return dm_fail(DM_ERR_ARG, "label %lld of image %d out of range [0, %d] (%d = null class)",
                           (long long)y[b], b, m->cfg.num_classes, m->cfg.num_classes);
        if (!isfinite(t[b]))
            return dm_fail(DM_ERR_ARG, "timestep of image %d is not finite", b);
    }
    return DM_OK;
}

/* c = TimestepEmbedder(t) + LabelEmbedder(y); leaves SiLU(c) in ws.c (every adaLN layer uses it). */
static dm_status conditioning(dm_model *m, int B, const float *t, const int64_t *y)
{
    const dm_backend_ops *op = m->be->ops;
    void *ctx = m->be->ctx;
    dm_workspace *w = &m->ws;
    const int D = m->cfg.hidden;
    float *tfreq = w->tfreq.p, *thid = w->thid.p, *c = w->c.p;
    TRY(op->timestep_embed(ctx, t, B, tfreq));
    TRY(op->linear(ctx, tfreq, B, m->t_w1, m->t_b1, thid));
    TRY(op->silu(ctx, thid, (size_t)B * D));
    TRY(op->linear(ctx, thid, B, m->t_w2, m->t_b2, c));
    TRY(op->embed_add(ctx, c, B, D, m->y_table, y));
    return op->silu(ctx, c, (size_t)B * D);
}

/* One transformer block. `moe_layer` is the index of this block among the MoE blocks (where its
 * routing goes in `routes`), -1 for a dense block. */
static dm_status block_forward(dm_model *m, const dm_block_w *bw, int block, int B,
                               const int64_t *y, int moe_layer, dm_routes *routes,
                               const dm_forward_rows *rows, int split, int use_cache)
{
    const dm_backend_ops *op = m->be->ops;
    void *ctx = m->be->ctx;
    dm_workspace *w = &m->ws;
    const dm_config *c = &m->cfg;
    const int D = c->hidden, T = m->T, N = B * T, H = c->heads, k = c->top_k;
    float *x = w->x.p, *h = w->h.p, *qkv = w->qkv.p, *att = w->att.p, *tmp = w->tmp.p;
    float *mod = w->mod.p; /* [B, 6D]: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp */
    TRY(op->linear(ctx, w->c.p, B, bw->mod_w, bw->mod_b, mod));

    /* x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa)) */
    TRY(op->layernorm_mod(ctx, x, B, T, D, 1e-6f, mod + 0 * D, mod + 1 * D, 6 * D, h));
    TRY(op->linear(ctx, h, N, bw->qkv_w, bw->qkv_b, qkv));
    const dm_attn_qk qk = {bw->q_norm_w, bw->q_norm_b, bw->k_norm_w, bw->k_norm_b, c->qk_norm_eps};
    TRY(op->attention(ctx, qkv, B, T, H, D / H, bw->q_norm_w ? &qk : NULL, att));
    TRY(op->linear(ctx, att, N, bw->proj_w, bw->proj_b, tmp));
    TRY(op->gated_add(ctx, x, tmp, B, T, D, mod + 2 * D, 6 * D));

    /* x = x + gate_mlp * FFN(modulate(LN(x), shift_mlp, scale_mlp)), FFN = MoE or dense MLP */
    TRY(op->layernorm_mod(ctx, x, B, T, D, 1e-6f, mod + 3 * D, mod + 4 * D, 6 * D, h));
    if (split && moe_layer >= 0) { /* MoE lab: the layer in its parts (lab.c) */
        TRY(dm_lab_moe(m, bw, block, moe_layer, B, y, rows, use_cache, h, tmp, routes));
        return op->gated_add(ctx, x, tmp, B, T, D, mod + 5 * D, 6 * D);
    }
    dm_route_record rec = {0}, *recp = NULL;
    if (routes && moe_layer >= 0) {
        /* records hold dm_model_route_slots slots; the fused op fills the model's k of them */
        size_t at = (size_t)moe_layer * N * k;
        rec.ids = routes->ids + at;
        rec.weights = routes->weights ? routes->weights + at : NULL;
        recp = &rec;
    }
    TRY(op->ffn(ctx, &bw->ffn, h, N, T, y, c->num_classes, tmp, recp));
    return op->gated_add(ctx, x, tmp, B, T, D, mod + 5 * D, 6 * D);
}

dm_status dm_model_forward(dm_model *m, int B, const float *x, const float *t, const int64_t *y,
                           float *out, dm_routes *routes)
{
    return dm_model_forward_rows(m, B, x, t, y, NULL, out, routes);
}

dm_status dm_model_forward_rows(dm_model *m, int B, const float *x, const float *t,
                                const int64_t *y, const dm_forward_rows *rows, float *out,
                                dm_routes *routes)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, T = m->T, N = B * T, p = c->patch, S = c->input_size;
    if (B < 1) return dm_fail(DM_ERR_ARG, "batch size %d must be >= 1", B);
    TRY(check_inputs(m, B, t, y));
    TRY(dm_fwd_check_inputs(m, B, x));
    TRY(reserve(m, B));
    const dm_backend_ops *op = m->be->ops;
    void *ctx = m->be->ctx;
    dm_workspace *w = &m->ws;
    float *xs = w->x.p, *h = w->h.p, *mod = w->mod.p;

    /* Patch embedding + fixed position embedding: tokens [B*T, D]. */
    TRY(op->upload(ctx, w->xin.p, x, (size_t)B * c->in_channels * S * S * sizeof(float)));
    TRY(op->patchify(ctx, w->xin.p, B, c->in_channels, S, p, w->patches.p));
    TRY(op->linear(ctx, w->patches.p, N, m->patch_w, m->patch_b, xs));
    TRY(op->add_rows(ctx, xs, B, (size_t)T * D, m->pos_embed));

    if (dm_fwd_diag) TRY(dm_fwd_check_stage(m, xs, (size_t)N * D, "patch embedding", -1));
    TRY(conditioning(m, B, t, y));
    if (dm_fwd_diag) TRY(dm_fwd_check_stage(m, w->c.p, (size_t)B * D, "conditioning", -1));
    /* MoE lab: split MoE layers when an option is on or weak rows are present */
    const int split = dm_lab_wants_split(m, rows, B);
    int use_cache = 0;
    if (split) TRY(dm_lab_begin_eval(m, B, rows, &use_cache));
    if (rows && rows->token_flags)
        memset(rows->token_flags, 0, (size_t)dm_config_moe_layers(c) * N);
    for (int l = 0, moe_layer = 0; l < c->depth; l++) {
        TRY(block_forward(m, &m->blocks[l], l, B, y, m->blocks[l].is_moe ? moe_layer++ : -1,
                          routes, rows, split, use_cache));
        if (dm_fwd_diag)
            TRY(dm_fwd_check_stage(m, xs, (size_t)N * D, m->blocks[l].is_moe ? "moe" : "dense", l));
    }

    /* Final layer: modulate(LN(x), shift, scale) -> Linear -> unpatchify. */
    TRY(op->linear(ctx, w->c.p, B, m->final_mod_w, m->final_mod_b, mod));
    TRY(op->layernorm_mod(ctx, xs, B, T, D, 1e-6f, mod, mod + D, 2 * D, h));
    TRY(op->linear(ctx, h, N, m->final_w, m->final_b, w->outp.p));
    TRY(op->unpatchify(ctx, w->outp.p, B, c->out_channels, S, p, w->out.p));
    TRY(op->download(ctx, out, w->out.p, (size_t)B * c->out_channels * S * S * sizeof(float)));
    return dm_fwd_check_output(m, B, x, t, y, out, routes);
}

/* dm_model_forward: the DiT-MoE forward pass, top to bottom as in ditmoe.md §2. */
#include "dit/model.h"

#include "backend/cpu/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static dm_status reserve(dm_model *m, int B)
{
    dm_workspace *w = &m->ws;
    const dm_config *c = &m->cfg;
    const int D = c->hidden, p = c->patch;
    const size_t BT = (size_t)B * m->T;
    if (B > w->cap_B) {
        struct {
            float **buf;
            size_t n;
        } need[] = {
            {&w->x, BT * D},          {&w->h, BT * D},
            {&w->qkv, BT * 3 * D},    {&w->att, BT * D},
            {&w->tmp, BT * D},        {&w->patches, BT * c->in_channels * p * p},
            {&w->outp, BT * p * p * c->out_channels},
            {&w->tfreq, (size_t)B * DM_TIME_FREQ_DIM},
            {&w->thid, (size_t)B * D}, {&w->c, (size_t)B * D},
            {&w->mod, (size_t)B * 6 * D},
        };
        for (size_t i = 0; i < sizeof need / sizeof *need; i++) {
            float *q = realloc(*need[i].buf, need[i].n * sizeof(float));
            if (!q) return dm_fail(DM_ERR_NOMEM, "%s: out of memory for batch %d", m->path, B);
            *need[i].buf = q;
        }
        w->cap_B = B;
    }
    int F_max = c->expert_hidden > c->shared_hidden ? c->expert_hidden : c->shared_hidden;
    if (c->mlp_hidden > F_max) F_max = c->mlp_hidden;
    if (dm_moe_scratch_reserve(&w->moe, (int)BT, D, F_max, c->num_experts + 1, c->top_k))
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory for MoE scratch (batch %d)", m->path, B);
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

/* c = TimestepEmbedder(t) + LabelEmbedder(y); returns SiLU(c) in ws.c (all adaLN layers use it). */
static void conditioning(dm_model *m, int B, const float *t, const int64_t *y)
{
    dm_workspace *w = &m->ws;
    const int D = m->cfg.hidden;
    dm_timestep_sinusoid(t, B, w->tfreq);
    dm_linear_packed(w->tfreq, B, &m->t_w1, m->t_b1, w->thid);
    dm_silu(w->thid, (size_t)B * D);
    dm_linear_packed(w->thid, B, &m->t_w2, m->t_b2, w->c);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < D; i++) w->c[(size_t)b * D + i] += m->y_table[(size_t)y[b] * D + i];
    dm_silu(w->c, (size_t)B * D);
}

/* One transformer block. `moe_layer` is the index of this block among the MoE blocks (where its
 * routing goes in `routes`), -1 for a dense block. */
static dm_status block_forward(dm_model *m, const dm_block_w *bw, int B, const int64_t *y,
                               int moe_layer, dm_routes *routes)
{
    dm_workspace *w = &m->ws;
    const dm_config *c = &m->cfg;
    const int D = c->hidden, T = m->T, N = B * T, H = c->heads, k = c->top_k;
    float *mod = w->mod; /* [B, 6D]: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp */
    dm_linear_packed(w->c, B, &bw->mod_w, bw->mod_b, mod);

    /* x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa)) */
    dm_layernorm(w->x, N, D, 1e-6f, NULL, NULL, w->h);
    dm_modulate(w->h, B, T, D, mod + 0 * D, mod + 1 * D, 6 * D);
    dm_linear_packed(w->h, N, &bw->qkv_w, bw->qkv_b, w->qkv);
    dm_qk_norm qk = {bw->q_norm_w, bw->q_norm_b, bw->k_norm_w, bw->k_norm_b, c->qk_norm_eps};
    if (dm_attention(w->qkv, B, T, H, D / H, bw->q_norm_w ? &qk : NULL, w->att))
        return dm_fail(DM_ERR_NOMEM, "out of memory in attention");
    dm_linear_packed(w->att, N, &bw->proj_w, bw->proj_b, w->tmp);
    dm_gated_add(w->x, w->tmp, B, T, D, mod + 2 * D, 6 * D);

    /* x = x + gate_mlp * FFN(modulate(LN(x), shift_mlp, scale_mlp)), FFN = MoE or dense MLP */
    dm_layernorm(w->x, N, D, 1e-6f, NULL, NULL, w->h);
    dm_modulate(w->h, B, T, D, mod + 3 * D, mod + 4 * D, 6 * D);
    if (!bw->is_moe) {
        dm_mlp_forward(&bw->mlp, w->h, N, D, w->moe.a, w->moe.h, w->tmp);
        dm_gated_add(w->x, w->tmp, B, T, D, mod + 5 * D, 6 * D);
        return DM_OK;
    }
    dm_moe_route(&bw->moe, w->h, N, T, y, c->num_classes, &w->moe);
    if (routes) {
        size_t at = (size_t)moe_layer * N * k;
        memcpy(routes->ids + at, w->moe.r.ids, (size_t)N * k * sizeof(int32_t));
        if (routes->weights)
            memcpy(routes->weights + at, w->moe.r.weights, (size_t)N * k * sizeof(float));
    }
    dm_moe_apply(&bw->moe, w->h, N, &w->moe, w->tmp);
    dm_gated_add(w->x, w->tmp, B, T, D, mod + 5 * D, 6 * D);
    return DM_OK;
}

dm_status dm_model_forward(dm_model *m, int B, const float *x, const float *t, const int64_t *y,
                           float *out, dm_routes *routes)
{
    const dm_config *c = &m->cfg;
    const int D = c->hidden, T = m->T, N = B * T, p = c->patch, S = c->input_size;
    if (B < 1) return dm_fail(DM_ERR_ARG, "batch size %d must be >= 1", B);
    dm_status st = check_inputs(m, B, t, y);
    if (st == DM_OK) st = reserve(m, B);
    if (st != DM_OK) return st;
    dm_workspace *w = &m->ws;

    /* Patch embedding + fixed position embedding: tokens [B*T, D]. */
    dm_patchify(x, B, c->in_channels, S, p, w->patches);
    dm_linear_packed(w->patches, N, &m->patch_w, m->patch_b, w->x);
    for (int b = 0; b < B; b++)
        for (size_t i = 0; i < (size_t)T * D; i++) w->x[(size_t)b * T * D + i] += m->pos_embed[i];

    conditioning(m, B, t, y);
    for (int l = 0, moe_layer = 0; l < c->depth; l++) {
        st = block_forward(m, &m->blocks[l], B, y, m->blocks[l].is_moe ? moe_layer++ : -1, routes);
        if (st != DM_OK) return st;
    }

    /* Final layer: modulate(LN(x), shift, scale) -> Linear -> unpatchify. */
    dm_linear_packed(w->c, B, &m->final_mod_w, m->final_mod_b, w->mod);
    dm_layernorm(w->x, N, D, 1e-6f, NULL, NULL, w->h);
    dm_modulate(w->h, B, T, D, w->mod, w->mod + D, 2 * D);
    dm_linear_packed(w->h, N, &m->final_w, m->final_b, w->outp);
    dm_unpatchify(w->outp, B, c->out_channels, S, p, out);
    return DM_OK;
}

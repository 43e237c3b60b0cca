/* The CPU backend: the op table of backend/backend.h over the kernels of backend/cpu/ (ops.h).
 * Memory is host memory; upload/download are copies; every op runs synchronously. */
#include "backend/cpu/cpu.h"
#include "router/moe.h"

#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- the linear dispatch (float packed GEMM or low precision) ---- */

int dm_cpu_tiny_rows(void)
{
    static atomic_int rows = ATOMIC_VAR_INIT(-1);
    int r = atomic_load(&rows);
    if (r >= 0) return r;
    const char *e = getenv("DITMOE_TINY_ROWS");
    r = e && *e ? atoi(e) : 8;
    if (r < 0) r = 0;
    atomic_store(&rows, r);
    return r;
}

dm_status dm_cpu_linear(const float *x, int N, const dm_weight *W, const float *b, float *y)
{
    /* tiny N: one thread, no team barrier per call; same bits (fixed-order sums per element) */
    const int tiny = N <= dm_cpu_tiny_rows() && !omp_in_parallel() && omp_get_max_threads() > 1;
    const int nt = tiny ? omp_get_max_threads() : 0;
    if (tiny) omp_set_num_threads(1);
    dm_status st = DM_OK;
    if (W->is_lp) st = dm_lp_linear(x, N, &W->lp, b, y);
    else dm_linear_packed(x, N, &W->pm, b, y);
    if (tiny) omp_set_num_threads(nt);
    return st;
}

/* ---- memory ---- */

static dm_status cpu_alloc(void *ctx, size_t bytes, dm_buf *out)
{
    (void)ctx;
    out->p = malloc(bytes ? bytes : 1);
    out->bytes = out->p ? bytes : 0;
    return out->p ? DM_OK
                  : dm_fail(DM_ERR_NOMEM, "cpu: out of memory (need %.1f MiB)", bytes / 1048576.0);
}

static void cpu_release(void *ctx, dm_buf *b)
{
    (void)ctx;
    if (!b) return;
    free(b->p);
    b->p = NULL;
    b->bytes = 0;
}

static dm_status cpu_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    if (bytes && dst != src) memmove(dst, src, bytes);
    return DM_OK;
}

static dm_status cpu_sync(void *ctx)
{
    (void)ctx;
    return DM_OK;
}

/* ---- weights ---- */

static dm_status cpu_weight(void *ctx, const dm_weight_desc *d, dm_weight **out)
{
    dm_cpu_ctx *c = ctx;
    *out = NULL;
    const char *name = d->name ? d->name : "weight";
    if (d->rows < 0 || d->cols < 0)
        return dm_fail(DM_ERR_ARG, "cpu: %s: bad shape [%d, %d]", name, d->rows, d->cols);
    dm_weight *w = calloc(1, sizeof *w);
    if (!w) return dm_fail(DM_ERR_NOMEM, "cpu: %s: out of memory", name);
    *w = (dm_weight){.use = d->use, .role = d->role, .rows = d->rows, .cols = d->cols};
    const size_t n = (size_t)d->rows * d->cols;
    dm_status st = dm_lp_pack_desc(c ? &c->lp : NULL, d, &w->lp, &w->is_lp);
    if (st != DM_OK || w->is_lp) goto done; /* low precision: routed experts / bf16 (lowp.h) */
    if (d->use == DM_USE_LINEAR && (d->dtype == DM_BF16 || d->dtype == DM_F16)) {
        /* 16-bit weights stay 16-bit (widening inside the kernel is exact) when this build can */
        int r = dm_pmat_pack_half(&w->pm, d->data, d->dtype, d->rows, d->cols);
        if (r == -1) st = dm_fail(DM_ERR_NOMEM, "cpu: %s: out of memory", name);
        if (r != -2) goto done;
    }
    float *f = malloc((n ? n : 1) * sizeof(float));
    if (!f) {
        st = dm_fail(DM_ERR_NOMEM, "cpu: %s: out of memory", name);
        goto done;
    }
    st = dm_convert_to_f32(d->dtype, d->data, n, f);
    if (st != DM_OK) {
        free(f);
        goto done;
    }
    if (d->use == DM_USE_LINEAR) {
        if (dm_pmat_pack(&w->pm, f, d->rows, d->cols)) st = dm_fail(DM_ERR_NOMEM, "cpu: %s: out of memory", name);
        free(f);
    } else {
        w->f = f;
    }
done:
    if (st != DM_OK) {
        free(w);
        return st;
    }
    *out = w;
    return DM_OK;
}

static void cpu_weight_free(void *ctx, dm_weight *w)
{
    (void)ctx;
    if (!w) return;
    dm_pmat_free(&w->pm);
    dm_lp_free(&w->lp);
    free(w->f);
    free(w);
}

static size_t cpu_weight_bytes(const dm_weight *w)
{
    if (!w) return 0;
    if (w->is_lp) return dm_lp_bytes(&w->lp);
    return w->use == DM_USE_LINEAR ? dm_pmat_bytes(&w->pm)
                                   : (size_t)w->rows * w->cols * sizeof(float);
}

/* ---- DiT ---- */

static dm_status cpu_linear(void *ctx, const float *x, int N, const dm_weight *W, const dm_weight *b,
                            float *y)
{
    (void)ctx;
    return dm_cpu_linear(x, N, W, dm_cpu_f(b), y);
}

static dm_status cpu_layernorm_mod(void *ctx, const float *x, int B, int T, int D, float eps,
                                   const float *shift, const float *scale, int mod_stride, float *y)
{
    (void)ctx;
    dm_layernorm(x, B * T, D, eps, NULL, NULL, y);
    if (shift) dm_modulate(y, B, T, D, shift, scale, mod_stride);
    return DM_OK;
}

static dm_status cpu_gated_add(void *ctx, float *x, const float *y, int B, int T, int D,
                               const float *gate, int mod_stride)
{
    (void)ctx;
    dm_gated_add(x, y, B, T, D, gate, mod_stride);
    return DM_OK;
}

static dm_status cpu_silu(void *ctx, float *x, size_t n)
{
    (void)ctx;
    dm_silu(x, n);
    return DM_OK;
}

static dm_status cpu_timestep_embed(void *ctx, const float *t, int B, float *out)
{
    (void)ctx;
    dm_timestep_sinusoid(t, B, out);
    return DM_OK;
}

static dm_status cpu_patchify(void *ctx, const float *x, int B, int C, int S, int p, float *patches)
{
    (void)ctx;
    dm_patchify(x, B, C, S, p, patches);
    return DM_OK;
}

static dm_status cpu_unpatchify(void *ctx, const float *tok, int B, int Cout, int S, int p,
                                float *out)
{
    (void)ctx;
    dm_unpatchify(tok, B, Cout, S, p, out);
    return DM_OK;
}

static dm_status cpu_add_rows(void *ctx, float *x, int B, size_t n, const dm_weight *table)
{
    (void)ctx;
    const float *r = table->f;
    for (int b = 0; b < B; b++)
        for (size_t i = 0; i < n; i++) x[(size_t)b * n + i] += r[i];
    return DM_OK;
}

static dm_status cpu_embed_add(void *ctx, float *x, int B, int D, const dm_weight *table,
                               const int64_t *labels)
{
    (void)ctx;
    const float *tab = table->f;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < D; i++) x[(size_t)b * D + i] += tab[(size_t)labels[b] * D + i];
    return DM_OK;
}

static dm_status cpu_attention(void *ctx, const float *qkv, int B, int T, int H, int hd,
                               const dm_attn_qk *qk, float *out)
{
    (void)ctx;
    dm_qk_norm q;
    if (qk) q = (dm_qk_norm){dm_cpu_f(qk->q_w), dm_cpu_f(qk->q_b), dm_cpu_f(qk->k_w), dm_cpu_f(qk->k_b), qk->eps};
    if (dm_attention(qkv, B, T, H, hd, qk ? &q : NULL, out))
        return dm_fail(DM_ERR_NOMEM, "cpu: attention: out of memory");
    return DM_OK;
}

static dm_status cpu_ffn(void *ctx, const dm_ffn_layer *L, const float *h, int N, int T,
                         const int64_t *labels, int64_t null_id, float *out, dm_route_record *rec)
{
    dm_cpu_ctx *c = ctx;
    const dm_moe_desc *d = &L->d;
    int F_max = L->shared.F;
    for (int e = 0; e < d->n_experts; e++)
        if (L->experts[e].F > F_max) F_max = L->experts[e].F;
    const int dense = d->kind == DM_ROUTE_DENSE;
    if (dm_moe_scratch_reserve(&c->moe, N, d->D, F_max, dense ? 1 : d->n_experts,
                               dense ? 1 : dm_moe_rows_per_token(d, T)))
        return dm_fail(DM_ERR_NOMEM, "cpu: ffn: out of memory for %d tokens", N);
    if (dense) {
        return dm_mlp_forward(&L->experts[0], h, N, c->moe.a, c->moe.h, out);
    }
    dm_moe_route(L, h, N, T, labels, null_id, &c->moe);
    if (rec && rec->ids) memcpy(rec->ids, c->moe.r.ids, (size_t)N * d->k * sizeof(int32_t));
    if (rec && rec->weights) memcpy(rec->weights, c->moe.r.weights, (size_t)N * d->k * sizeof(float));
    return dm_moe_apply(L, h, N, &c->moe, out);
}

/* ---- VAE ---- */

static dm_status grow_f(float **p, size_t *cap, size_t n, const char *what)
{
    if (n <= *cap && *p) return DM_OK;
    float *q = realloc(*p, (n ? n : 1) * sizeof(float));
    if (!q) return dm_fail(DM_ERR_NOMEM, "cpu: %s: out of memory (need %.1f MiB)", what,
                           n * 4 / 1048576.0);
    *p = q;
    *cap = n;
    return DM_OK;
}

static dm_status cpu_conv2d(void *ctx, const float *x, int Cin, int H, int W, const dm_weight *w,
                            const dm_weight *b, int Cout, int k, int acc, float *out)
{
    dm_cpu_ctx *c = ctx;
    dm_status st = grow_f(&c->col, &c->col_cap, dm_vae_conv_col_size(Cin, H, W, k), "conv2d");
    if (st != DM_OK) return st;
    if (acc)
        dm_vae_conv2d_acc(x, Cin, H, W, w->f, dm_cpu_f(b), Cout, k, c->col, out);
    else
        dm_vae_conv2d(x, Cin, H, W, w->f, dm_cpu_f(b), Cout, k, c->col, out);
    return DM_OK;
}

static dm_status cpu_group_norm(void *ctx, const float *x, int C, size_t HW, int G, float eps,
                                const dm_weight *gamma, const dm_weight *beta, int silu, float *y)
{
    (void)ctx;
    dm_vae_group_norm(x, C, HW, G, eps, dm_cpu_f(gamma), dm_cpu_f(beta), silu, y);
    return DM_OK;
}

static dm_status cpu_upsample2x(void *ctx, const float *x, int C, int H, int W, float *out)
{
    (void)ctx;
    dm_vae_upsample2x(x, C, H, W, out);
    return DM_OK;
}

static dm_status cpu_vae_attention(void *ctx, float *x, int C, int N, int G,
                                   const dm_vae_attn_layer *w)
{
    dm_cpu_ctx *c = ctx;
    dm_status st = grow_f(&c->attn_ws, &c->attn_cap, dm_vae_attn_ws_size(C, N), "vae_attention");
    if (st != DM_OK) return st;
    dm_vae_attn_w aw = {dm_cpu_f(w->gn_g), dm_cpu_f(w->gn_b), dm_cpu_f(w->wq), dm_cpu_f(w->bq),
                        dm_cpu_f(w->wk), dm_cpu_f(w->bk), dm_cpu_f(w->wv), dm_cpu_f(w->bv),
                        dm_cpu_f(w->wo), dm_cpu_f(w->bo)};
    dm_vae_attention(x, C, N, G, &aw, c->attn_ws);
    return DM_OK;
}

static void cpu_close(void *ctx);

static int ffn_f_max(const dm_ffn_layer *L)
{
    int F_max = L->shared.F;
    for (int e = 0; e < L->d.n_experts; e++)
        if (L->experts[e].F > F_max) F_max = L->experts[e].F;
    return F_max;
}

static dm_status cpu_router_scores(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                                   const uint8_t *drop, float *scores)
{
    (void)ctx;
    const dm_moe_desc *d = &L->d;
    const int E = d->E;
    if (!L->gate || E < 1) return dm_fail(DM_ERR_ARG, "cpu: router_scores: layer has no router");
    dm_linear_packed(h, N, &L->gate->pm, NULL, scores);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *s = scores + (size_t)n * E;
        if (drop)
            for (int e = 0; e < E; e++)
                if (drop[e]) s[e] = -INFINITY;
        dm_moe_token_scores(d, h + (size_t)n * d->D, s);
    }
    return DM_OK;
}

static dm_status cpu_moe_grouped(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                                 const int32_t *exp_off, const int32_t *rows, const float *row_w,
                                 float *out)
{
    dm_cpu_ctx *c = ctx;
    const int nE = L->d.n_experts, n_rows = exp_off[nE];
    const int k = n_rows > N ? (n_rows + N - 1) / N : 1; /* rows to reserve per token */
    if (dm_moe_scratch_reserve(&c->moe, N, L->d.D, ffn_f_max(L), nE, k))
        return dm_fail(DM_ERR_NOMEM, "cpu: moe_grouped: out of memory for %d rows", n_rows);
    return dm_moe_apply_grouped(L, h, N, &c->moe, exp_off, rows, row_w, out);
}

static dm_status cpu_mlp_add(void *ctx, const dm_mlp_layer *w, const float *h, int N, float *out)
{
    dm_cpu_ctx *c = ctx;
    const int D = w->w2->rows; /* w2: [D, F] */
    if (dm_moe_scratch_reserve(&c->moe, N, D, w->F, 1, 1))
        return dm_fail(DM_ERR_NOMEM, "cpu: mlp_add: out of memory for %d tokens", N);
    return dm_moe_mlp_add(w, h, N, D, &c->moe, out);
}

static const dm_backend_ops k_cpu_ops = {
    .name = "cpu",
    .close = cpu_close,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight = cpu_weight,
    .weight_free = cpu_weight_free,
    .weight_bytes = cpu_weight_bytes,
    .linear = cpu_linear,
    .layernorm_mod = cpu_layernorm_mod,
    .gated_add = cpu_gated_add,
    .silu = cpu_silu,
    .timestep_embed = cpu_timestep_embed,
    .patchify = cpu_patchify,
    .unpatchify = cpu_unpatchify,
    .add_rows = cpu_add_rows,
    .embed_add = cpu_embed_add,
    .attention = cpu_attention,
    .ffn = cpu_ffn,
    .router_scores = cpu_router_scores,
    .moe_grouped = cpu_moe_grouped,
    .mlp_add = cpu_mlp_add,
    .conv2d = cpu_conv2d,
    .group_norm = cpu_group_norm,
    .upsample2x = cpu_upsample2x,
    .vae_attention = cpu_vae_attention,
};

static void cpu_close(void *ctx)
{
    dm_cpu_ctx *c = ctx;
    if (!c) return;
    dm_moe_scratch_free(&c->moe);
    free(c->col);
    free(c->attn_ws);
    free(c);
}

dm_status dm_backend_cpu_open(dm_backend *be, const dm_load_opts *o)
{
    /* the CPU has no device index; precision / quant_experts choose the weights' storage */
    if (o && o->precision != DM_PREC_F32 && o->precision != DM_PREC_BF16)
        return dm_fail(DM_ERR_ARG, "cpu: unknown precision %d (f32 | bf16)", (int)o->precision);
    if (o && o->quant_experts != 0 && o->quant_experts != 8 && o->quant_experts != 4)
        return dm_fail(DM_ERR_ARG, "cpu: --quant-experts: %d bits is not supported (none | int8 | int4)",
                       o->quant_experts);
    dm_cpu_ctx *c = calloc(1, sizeof *c);
    if (!c) return dm_fail(DM_ERR_NOMEM, "cpu: out of memory");
    if (o) c->lp = (dm_lp_policy){.bf16 = o->precision == DM_PREC_BF16, .expert_bits = o->quant_experts};
    if (c->lp.bf16 || c->lp.expert_bits) {
        static atomic_int said = ATOMIC_VAR_INIT(0);
        const unsigned f = dm_cpu_features();
        if (!atomic_exchange(&said, 1))
            dm_log(DM_LOG_INFO, "cpu: precision %s (%s), routed experts %s (%s); CPU features: %s",
                   c->lp.bf16 ? "bf16" : "f32",
                   !c->lp.bf16                     ? "float GEMM"
                   : (f & DM_CPU_AMX_BF16)         ? "bf16 GEMM on AMX tiles"
                   : (f & DM_CPU_AVX512_BF16)      ? "bf16 GEMM on AVX512-BF16 vdpbf16ps"
                                                   : "bf16 GEMM on the portable path",
                   c->lp.expert_bits == 8 ? "int8" : c->lp.expert_bits == 4 ? "int4" : "as the rest",
                   !c->lp.expert_bits              ? "-"
                   : (f & DM_CPU_AMX_INT8)         ? "int GEMM on AMX tiles"
                   : (f & DM_CPU_AVX512_VNNI)      ? "int GEMM on AVX512-VNNI"
                                                   : "int GEMM on the portable path",
                   dm_cpu_features_string(f));
    }
    be->ops = &k_cpu_ops;
    be->ctx = c;
    return DM_OK;
}

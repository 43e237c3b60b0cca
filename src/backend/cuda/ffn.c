/* The MoE / MLP layer on the GPU, library path P1 of docs/spec/cuda.md §3:
 *   router kernel (fp32 scores, softmax or prototype cosine, top-k; or expert-choice selection)
 *   -> pick matrix sel/pw [N, nE] -> stable grouping (count, scan, compact: rows, slot weights,
 *   inverse map) -> ONE device->host copy of the nE+1 offsets -> gather of the grouped rows to
 *   16 bit -> per expert with rows: GEMM1 (pinned cuBLASLt, fp32 out, bias epilogue for GELU
 *   experts), SwiGLU / GELU-tanh to 16 bit, GEMM2 (fp32 out, + bias) -> shared expert on all
 *   rows -> combine by gather in ascending expert id (no float atomics).
 * The host sync per layer is P1's known cost (spec §3); the own grouped GEMM (P2) removes it
 * once this path has passed the GPU check. Semantics: router/moe.h (dm_moe_*_ref).
 * The MoE lab's split ops (backend.h: router_scores, moe_grouped, mlp_add) are this same path in
 * parts: the router kernel with scores only, the grouped experts + combine over a host CSR
 * (uploaded with its inverse map), and the shared-expert MLP added into out; ffn == moe_grouped
 * + mlp_add bit for bit on the same routing (same kernels, same fp32 adds). */
#include "backend/cuda/cuda_be.h"

#ifdef DMC_HAVE_SEAM
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define A256(x) (((x) + 255) & ~(size_t)255)

/* Expert-choice capacity, the rule of router/moe.c: floor(T / E * k) clamped to [1, T]. */
static int ec_capacity(int T, int E, int k)
{
    int cap = (int)floor((double)T / E * k);
    return cap < 1 ? 1 : cap > T ? T : cap;
}

/* y [n, D] fp32 = MLP(x16 [n, D]) for one expert / the shared expert / a dense block. */
static dm_status mlp(dmc_ctx *c, const dm_mlp_layer *m, int D, const uint16_t *x16, int n,
                     float *y, const char *op)
{
    if (n <= 0) return DM_OK;
    const int F = m->F, swiglu = m->act == DM_MLP_SWIGLU, F1 = swiglu ? 2 * F : F;
    if (m->w1->ab == DMC_GEMM_F32 || m->w2->ab != m->w1->ab)
        return dm_fail(DM_ERR_BACKEND, "cuda: %s: expert weights must share one 16-bit type", op);
    if (m->w1->rows != F1 || m->w1->cols != D || m->w2->rows != D || m->w2->cols != F)
        return dm_fail(DM_ERR_ARG, "cuda: %s: expert shapes [%d,%d]/[%d,%d] do not fit D %d F %d",
                       op, m->w1->rows, m->w1->cols, m->w2->rows, m->w2->cols, D, F);
    const dmc_h16 t = (dmc_h16)m->w1->ab;
    dm_status st;
    float *a = dmc_scratch(c, DMC_SCR_A, (size_t)n * F1 * sizeof(float), op, &st);
    if (!a) return st;
    uint16_t *act = dmc_scratch(c, DMC_SCR_ACT16, (size_t)n * F * 2, op, &st);
    if (!act) return st;
    if ((st = dmc_linear(c, t, m->w1->p, F1, D, x16, n, dmc_vec(m->b1), a, op))) return st;
    st = dmc_err(swiglu ? dmc_swiglu_h16(a, n, F, act, t, c->stream)
                        : dmc_gelu_tanh_h16(a, n, F, act, t, c->stream), op);
    if (st) return st;
    return dmc_linear(c, t, m->w2->p, D, F, act, n, dmc_vec(m->b2), y, op);
}

/* The 16-bit type of a layer's expert GEMMs (DM_ERR_BACKEND when they are not 16-bit). */
static dm_status expert_type(const dm_mlp_layer *m, const char *op, dmc_h16 *t)
{
    if (!m->w1 || m->w1->ab == DMC_GEMM_F32)
        return dm_fail(DM_ERR_BACKEND, "cuda: %s: expert weights are not 16-bit", op);
    *t = (dmc_h16)m->w1->ab;
    return DM_OK;
}

/* Ysh [N, D] fp32 (scratch DMC_SCR_YSH) = MLP(h [N, D]): the shared expert, or a dense block. */
static dm_status shared_mlp(dmc_ctx *c, const dm_mlp_layer *m, int D, const float *h, int N,
                            const char *op, float **Ysh)
{
    dm_status st;
    dmc_h16 t = DMC_BF16;
    if ((st = expert_type(m, op, &t))) return st;
    float *y = dmc_scratch(c, DMC_SCR_YSH, (size_t)N * D * sizeof(float), op, &st);
    if (!y) return st;
    /* X16 may hold the routed rows' copy: their GEMMs are queued before (same stream). */
    uint16_t *x16 = dmc_scratch(c, DMC_SCR_X16, (size_t)N * D * 2, op, &st);
    if (!x16) return st;
    if ((st = dmc_err(dmc_gather_h16(h, D, NULL, N, x16, t, c->stream), op))) return st;
    if ((st = mlp(c, m, D, x16, N, y, op))) return st;
    *Ysh = y;
    return DM_OK;
}

/* Y [n_rows, D] fp32 (scratch DMC_SCR_Y) = Expert_e(h[rows[p]]) for the rows p of each expert's
 * slice [off[e], off[e+1]) (off: HOST [nE+1]; rows: device [n_rows]); one gather to 16 bit, then
 * the pinned per-expert GEMMs of the experts that have rows. */
static dm_status grouped_experts(dmc_ctx *c, const dm_ffn_layer *L, const float *h, int N,
                                 const int32_t *off, const int32_t *rows, const char *op,
                                 float **Yout)
{
    const int D = L->d.D, nE = L->d.n_experts, n_rows = off[nE];
    dm_status st;
    dmc_h16 t = DMC_BF16;
    if ((st = expert_type(&L->experts[0], op, &t))) return st;
    uint16_t *xg = dmc_scratch(c, DMC_SCR_X16, (size_t)(n_rows > N ? n_rows : N) * D * 2, op, &st);
    if (!xg) return st;
    float *Y = dmc_scratch(c, DMC_SCR_Y, (size_t)(n_rows ? n_rows : 1) * D * sizeof(float), op, &st);
    if (!Y) return st;
    if ((st = dmc_err(dmc_gather_h16(h, D, rows, n_rows, xg, t, c->stream), op))) return st;
    for (int e = 0; e < nE; e++) {
        const int ne = off[e + 1] - off[e];
        if (ne > 0 && (st = mlp(c, &L->experts[e], D, xg + (size_t)off[e] * D, ne,
                                Y + (size_t)off[e] * D, op)))
            return st;
    }
    *Yout = Y;
    return DM_OK;
}

static int route_kind(dm_route_kind k)
{
    return k == DM_ROUTE_SOFTMAX_TOPK ? 0 : k == DM_ROUTE_PROTO_TC ? 1 : 2;
}

static dm_status check_router(const dm_ffn_layer *L, const char *op)
{
    const dm_moe_desc *d = &L->d;
    if (!L->gate || L->gate->ab != DMC_GEMM_F32 || L->gate->rows != d->E || L->gate->cols != d->D)
        return dm_fail(DM_ERR_ARG, "cuda: %s: router weight must be fp32 [%d, %d]", op, d->E, d->D);
    if (d->n_experts > 256) return dm_fail(DM_ERR_ARG, "cuda: %s: %d experts (at most 256)", op, d->n_experts);
    return DM_OK;
}

dm_status dmc_be_ffn(void *ctx, const dm_ffn_layer *L, const float *h, int N, int T,
                     const int64_t *labels, int64_t null_id, float *out, dm_route_record *rec)
{
    dmc_ctx *c = ctx;
    const char *op = "ffn";
    const dm_moe_desc *d = &L->d;
    const int D = d->D;
    if (N <= 0) return DM_OK;
    if (T <= 0 || N % T) return dm_fail(DM_ERR_ARG, "cuda: ffn: N %d is not a multiple of T %d", N, T);
    dm_status st;
    dmc_h16 t = DMC_BF16;
    if ((st = expert_type(&L->experts[0], op, &t))) return st;

    if (d->kind == DM_ROUTE_DENSE) { /* experts[0] on every token (as the CPU backend) */
        uint16_t *x16 = dmc_scratch(c, DMC_SCR_X16, (size_t)N * D * 2, op, &st);
        if (!x16) return st;
        if ((st = dmc_err(dmc_gather_h16(h, D, NULL, N, x16, t, c->stream), op))) return st;
        return mlp(c, &L->experts[0], D, x16, N, out, op);
    }

    const int E = d->E, k = d->k, nE = d->n_experts, B = N / T;
    if ((st = check_router(L, op))) return st;
    /* Routing scratch, one allocation: scores [N,E], ids/w [N,k], sel [N,nE] u8, pw [N,nE],
     * inv [N,nE], rows/slot_w [N*nE], counts/offsets [nE+1], uncond [B]. */
    const size_t nn = (size_t)N * nE;
    const size_t o_scores = 0, o_ids = A256(o_scores + (size_t)N * E * 4),
                 o_w = A256(o_ids + (size_t)N * k * 4), o_sel = A256(o_w + (size_t)N * k * 4),
                 o_pw = A256(o_sel + nn), o_inv = A256(o_pw + nn * 4), o_rows = A256(o_inv + nn * 4),
                 o_sw = A256(o_rows + nn * 4), o_cnt = A256(o_sw + nn * 4),
                 o_off = A256(o_cnt + (size_t)nE * 4), o_unc = A256(o_off + (size_t)(nE + 1) * 4),
                 total = A256(o_unc + (size_t)B);
    char *R = dmc_scratch(c, DMC_SCR_ROUTE, total, op, &st);
    if (!R) return st;
    float *scores = (float *)(R + o_scores), *w = (float *)(R + o_w), *pw = (float *)(R + o_pw);
    float *slot_w = (float *)(R + o_sw);
    int32_t *ids = (int32_t *)(R + o_ids), *inv = (int32_t *)(R + o_inv);
    int32_t *rows = (int32_t *)(R + o_rows), *counts = (int32_t *)(R + o_cnt);
    int32_t *offsets = (int32_t *)(R + o_off);
    uint8_t *sel = (uint8_t *)(R + o_sel), *unc = (uint8_t *)(R + o_unc);
    if ((size_t)B > 65536 || (size_t)(nE + 1) * 4 > 65536)
        return dm_fail(DM_ERR_ARG, "cuda: ffn: %d images / %d experts is too many", B, nE);

    /* Null-class images (ProMoE with an unconditional expert): flags through the pinned buffer. */
    const int has_unc = d->kind != DM_ROUTE_SOFTMAX_TOPK && nE > E && labels;
    if (has_unc) {
        if ((st = dmc_sync(c, op))) return st;
        uint8_t *hu = c->host_small;
        for (int b = 0; b < B; b++) hu[b] = labels[b] == null_id;
        if ((st = dmc_upload(c, unc, hu, (size_t)B, op))) return st;
    }
    const int kind = route_kind(d->kind);
    st = dmc_err(dmc_moe_router(h, N, T, D, L->gate->p, E, k, kind, (int)d->act, NULL,
                                has_unc ? unc : NULL, nE, scores, ids, w, sel, pw, c->stream), op);
    if (!st && kind == 2) {
        st = dmc_err(dmc_moe_ec_select(scores, N, T, E, ec_capacity(T, E, k), has_unc ? unc : NULL,
                                       nE, sel, pw, c->stream), op);
        if (!st && rec && rec->ids)
            st = dmc_err(dmc_moe_ec_record(sel, pw, N, nE, k, ids, w, c->stream), op);
    }
    if (!st) st = dmc_err(dmc_moe_count(sel, N, nE, counts, c->stream), op);
    if (!st) st = dmc_err(dmc_moe_scan(counts, nE, offsets, c->stream), op);
    if (!st) st = dmc_err(dmc_moe_compact(sel, pw, N, nE, offsets, rows, slot_w, inv, c->stream), op);
    if (st) return st;
    /* The one host sync of P1: the group sizes decide the per-expert GEMM calls. */
    int32_t off[257];
    if ((st = dmc_download(c, c->host_small, offsets, (size_t)(nE + 1) * 4, op))) return st;
    memcpy(off, c->host_small, (size_t)(nE + 1) * 4);

    float *Y = NULL, *Ysh = NULL;
    if ((st = grouped_experts(c, L, h, N, off, rows, op, &Y))) return st;
    if (L->shared.F > 0 && (st = shared_mlp(c, &L->shared, D, h, N, op, &Ysh))) return st;
    if ((st = dmc_err(dmc_moe_combine(Y, inv, slot_w, N, nE, D, Ysh, out, c->stream), op)))
        return st;
    if (rec && rec->ids) {
        if ((st = dmc_download(c, rec->ids, ids, (size_t)N * k * 4, op))) return st;
        if (rec->weights && (st = dmc_download(c, rec->weights, w, (size_t)N * k * 4, op))) return st;
    }
    return DM_OK;
}

/* ---- the MoE lab's split ops (backend.h; docs/moe-lab.md §7) ---- */

dm_status dmc_be_router_scores(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                               const uint8_t *drop, float *scores)
{
    dmc_ctx *c = ctx;
    const char *op = "router_scores";
    const dm_moe_desc *d = &L->d;
    const int E = d->E, D = d->D;
    if (d->kind == DM_ROUTE_DENSE || E < 1)
        return dm_fail(DM_ERR_ARG, "cuda: router_scores: layer has no router");
    if (N <= 0) return DM_OK;
    dm_status st;
    if ((st = check_router(L, op))) return st;
    const size_t o_drop = A256((size_t)N * E * 4), total = o_drop + A256((size_t)E);
    char *R = dmc_scratch(c, DMC_SCR_ROUTE, total, op, &st);
    if (!R) return st;
    float *dsc = (float *)R;
    uint8_t *ddrop = drop ? (uint8_t *)(R + o_drop) : NULL;
    /* drop: a small HOST array, staged by the copy call itself (pageable source) */
    if (ddrop && (st = dmc_upload(c, ddrop, drop, (size_t)E, op))) return st;
    /* scores only (ids NULL); T = N: the uncond flags are not read */
    st = dmc_err(dmc_moe_router(h, N, N, D, L->gate->p, E, 1, route_kind(d->kind), (int)d->act,
                                ddrop, NULL, d->n_experts, dsc, NULL, NULL, NULL, NULL, c->stream),
                 op);
    if (st) return st;
    return dmc_download(c, scores, dsc, (size_t)N * E * 4, op);
}

/* The host grouping checked and packed for one upload: rows [n_rows], slot weights [n_rows] and
 * the inverse map inv [N * nE] (-1 where a token has no pick of that expert), as the device
 * grouping of ffn builds them. */
static dm_status pack_csr(dmc_ctx *c, int N, int nE, const int32_t *exp_off, const int32_t *rows,
                          const float *row_w, const char *op, size_t *bytes)
{
    if (exp_off[0] != 0) return dm_fail(DM_ERR_ARG, "cuda: %s: grouping offsets start at %d, not 0", op, exp_off[0]);
    for (int e = 0; e < nE; e++)
        if (exp_off[e + 1] < exp_off[e])
            return dm_fail(DM_ERR_ARG, "cuda: %s: grouping offsets decrease at expert %d", op, e);
    const size_t n_rows = (size_t)exp_off[nE], nn = (size_t)N * nE;
    if (n_rows > nn)
        return dm_fail(DM_ERR_ARG, "cuda: %s: %zu grouped rows for %d tokens x %d experts", op,
                       n_rows, N, nE);
    const size_t o_sw = A256(n_rows * 4), o_inv = o_sw + A256(n_rows * 4);
    const size_t need = o_inv + A256(nn * 4);
    if (need > c->host_grp_bytes) {
        void *p = realloc(c->host_grp, need);
        if (!p) return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of host memory for the grouping of %d tokens", op, N);
        c->host_grp = p;
        c->host_grp_bytes = need;
    }
    char *H = c->host_grp;
    int32_t *inv = (int32_t *)(H + o_inv);
    for (size_t i = 0; i < nn; i++) inv[i] = -1;
    for (int e = 0; e < nE; e++)
        for (int32_t p = exp_off[e]; p < exp_off[e + 1]; p++) {
            const int32_t n = rows[p];
            if (n < 0 || n >= N || (p > exp_off[e] && n <= rows[p - 1]))
                return dm_fail(DM_ERR_ARG, "cuda: %s: grouped row %d of expert %d (token %d) is "
                               "out of range or not ascending", op, (int)p, e, (int)n);
            inv[(size_t)n * nE + e] = p;
        }
    memcpy(H, rows, n_rows * 4);
    memcpy(H + o_sw, row_w, n_rows * 4);
    *bytes = need;
    return DM_OK;
}

dm_status dmc_be_moe_grouped(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                             const int32_t *exp_off, const int32_t *rows, const float *row_w,
                             float *out)
{
    dmc_ctx *c = ctx;
    const char *op = "moe_grouped";
    const int nE = L->d.n_experts, D = L->d.D;
    if (N <= 0) return DM_OK;
    if (nE < 1 || nE > 256) return dm_fail(DM_ERR_ARG, "cuda: moe_grouped: %d experts (1..256)", nE);
    dm_status st;
    size_t bytes = 0;
    if ((st = pack_csr(c, N, nE, exp_off, rows, row_w, op, &bytes))) return st;
    const size_t n_rows = (size_t)exp_off[nE];
    char *R = dmc_scratch(c, DMC_SCR_ROUTE, bytes, op, &st);
    if (!R) return st;
    /* one upload from pageable host memory: the call returns once the bytes are staged, so the
     * host buffer may be reused by the next layer */
    if ((st = dmc_upload(c, R, c->host_grp, bytes, op))) return st;
    const int32_t *drows = (const int32_t *)R;
    const float *dsw = (const float *)(R + A256(n_rows * 4));
    const int32_t *dinv = (const int32_t *)(R + A256(n_rows * 4) + A256(n_rows * 4));
    float *Y = NULL;
    if ((st = grouped_experts(c, L, h, N, exp_off, drows, op, &Y))) return st;
    return dmc_err(dmc_moe_combine(Y, dinv, dsw, N, nE, D, NULL, out, c->stream), op);
}

dm_status dmc_be_mlp_add(void *ctx, const dm_mlp_layer *w, const float *h, int N, float *out)
{
    dmc_ctx *c = ctx;
    const char *op = "mlp_add";
    if (N <= 0 || w->F <= 0) return DM_OK;
    if (!w->w2) return dm_fail(DM_ERR_ARG, "cuda: mlp_add: MLP without a second matrix");
    const int D = w->w2->rows; /* w2: [D, F] */
    dm_status st;
    float *Ysh = NULL;
    if ((st = shared_mlp(c, w, D, h, N, op, &Ysh))) return st;
    /* out += Ysh as one row of N*D values: the same fp32 add as the combine's "+ shared" */
    return dmc_err(dmc_add_rows(out, 1, (size_t)N * D, Ysh, c->stream), op);
}
#else
typedef int dmc_ffn_needs_backend_h; /* ISO C: no empty translation unit */
#endif

/* The MoE / MLP layer on the GPU, library path P1 of docs/spec/cuda.md §3:
 *   router kernel (fp32 scores, softmax or prototype cosine, top-k; or expert-choice selection)
 *   -> pick matrix sel/pw [N, nE] -> stable grouping (count, scan, compact: rows, slot weights,
 *   inverse map) -> ONE device->host copy of the nE+1 offsets -> gather of the grouped rows to
 *   16 bit -> per expert with rows: GEMM1 (pinned cuBLASLt, fp32 out, bias epilogue for GELU
 *   experts), SwiGLU / GELU-tanh to 16 bit, GEMM2 (fp32 out, + bias) -> shared expert on all
 *   rows -> combine by gather in ascending expert id (no float atomics).
 * The host sync per layer is P1's known cost (spec §3); the own grouped GEMM (P2) removes it
 * once this path has passed the GPU check. Semantics: router/moe.h (dm_moe_*_ref). */
#include "backend/cuda/cuda_be.h"

#ifdef DMC_HAVE_SEAM
#include <math.h>
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
                     float *y)
{
    const char *op = "ffn";
    if (n <= 0) return DM_OK;
    const int F = m->F, swiglu = m->act == DM_MLP_SWIGLU, F1 = swiglu ? 2 * F : F;
    if (m->w1->ab == DMC_GEMM_F32 || m->w2->ab != m->w1->ab)
        return dm_fail(DM_ERR_BACKEND, "cuda: ffn: expert weights must share one 16-bit type");
    if (m->w1->rows != F1 || m->w1->cols != D || m->w2->rows != D || m->w2->cols != F)
        return dm_fail(DM_ERR_ARG, "cuda: ffn: expert shapes [%d,%d]/[%d,%d] do not fit D %d F %d",
                       m->w1->rows, m->w1->cols, m->w2->rows, m->w2->cols, D, F);
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
    const dmc_h16 t = (dmc_h16)L->experts[0].w1->ab;
    if (L->experts[0].w1->ab == DMC_GEMM_F32)
        return dm_fail(DM_ERR_BACKEND, "cuda: ffn: expert weights are not 16-bit");

    if (d->kind == DM_ROUTE_DENSE) { /* experts[0] on every token (as the CPU backend) */
        uint16_t *x16 = dmc_scratch(c, DMC_SCR_X16, (size_t)N * D * 2, op, &st);
        if (!x16) return st;
        if ((st = dmc_err(dmc_gather_h16(h, D, NULL, N, x16, t, c->stream), op))) return st;
        return mlp(c, &L->experts[0], D, x16, N, out);
    }

    const int E = d->E, k = d->k, nE = d->n_experts, B = N / T;
    if (!L->gate || L->gate->ab != DMC_GEMM_F32 || L->gate->rows != E || L->gate->cols != D)
        return dm_fail(DM_ERR_ARG, "cuda: ffn: router weight must be fp32 [%d, %d]", E, D);
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
    const int kind = d->kind == DM_ROUTE_SOFTMAX_TOPK ? 0 : d->kind == DM_ROUTE_PROTO_TC ? 1 : 2;
    st = dmc_err(dmc_moe_router(h, N, T, D, L->gate->p, E, k, kind, (int)d->act,
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
    if (nE > 256) return dm_fail(DM_ERR_ARG, "cuda: ffn: %d experts (at most 256)", nE);
    if ((st = dmc_download(c, c->host_small, offsets, (size_t)(nE + 1) * 4, op))) return st;
    memcpy(off, c->host_small, (size_t)(nE + 1) * 4);
    const int n_rows = off[nE];

    uint16_t *xg = dmc_scratch(c, DMC_SCR_X16, (size_t)(n_rows > N ? n_rows : N) * D * 2, op, &st);
    if (!xg) return st;
    float *Y = dmc_scratch(c, DMC_SCR_Y, (size_t)(n_rows ? n_rows : 1) * D * sizeof(float), op, &st);
    if (!Y) return st;
    if ((st = dmc_err(dmc_gather_h16(h, D, rows, n_rows, xg, t, c->stream), op))) return st;
    for (int e = 0; e < nE; e++) {
        const int ne = off[e + 1] - off[e];
        if (ne > 0 && (st = mlp(c, &L->experts[e], D, xg + (size_t)off[e] * D, ne,
                                Y + (size_t)off[e] * D)))
            return st;
    }
    float *Ysh = NULL;
    if (L->shared.F > 0) {
        Ysh = dmc_scratch(c, DMC_SCR_YSH, (size_t)N * D * sizeof(float), op, &st);
        if (!Ysh) return st;
        /* xg is free again once the routed GEMMs are queued (same stream): reuse it. */
        if ((st = dmc_err(dmc_gather_h16(h, D, NULL, N, xg, t, c->stream), op))) return st;
        if ((st = mlp(c, &L->shared, D, xg, N, Ysh))) return st;
    }
    if ((st = dmc_err(dmc_moe_combine(Y, inv, slot_w, N, nE, D, Ysh, out, c->stream), op)))
        return st;
    if (rec && rec->ids) {
        if ((st = dmc_download(c, rec->ids, ids, (size_t)N * k * 4, op))) return st;
        if (rec->weights && (st = dmc_download(c, rec->weights, w, (size_t)N * k * 4, op))) return st;
    }
    return DM_OK;
}
#else
typedef int dmc_ffn_needs_backend_h; /* ISO C: no empty translation unit */
#endif

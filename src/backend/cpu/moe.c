/* The CPU backend's feed-forward layer: route tokens (router/moe.h rules), group them by expert
 * (a counting sort), one packed GEMM per expert over all its tokens, combine in ascending expert
 * order, add the shared expert. Moved from src/router/moe.c unchanged in arithmetic. */
#include "backend/cpu/cpu.h"
#include "router/moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int grow(void **p, size_t bytes)
{
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q) return -1;
    *p = q;
    return 0;
}

int dm_moe_rows_per_token(const dm_moe_desc *d, int T)
{
    if (d->kind != DM_ROUTE_PROTO_EC) return d->k;
    /* E * cap rows per image, which exceeds T * k when the capacity is clamped up to 1
     * (T * k < E); an image of the null class has T rows instead */
    const int cap = dm_moe_ec_capacity(T, d->E, d->k);
    const int need = (d->E * cap + T - 1) / T;
    return need > d->k ? need : d->k;
}

int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int n_experts, int k)
{
    if (N <= s->cap_tokens && D == s->D && F_max <= s->F_max && n_experts <= s->E && k <= s->k)
        return 0;
    /* grow monotonically so alternating layer shapes do not reallocate every call */
    if (s->cap_tokens > N) N = s->cap_tokens;
    if (s->F_max > F_max) F_max = s->F_max;
    if (s->E > n_experts) n_experts = s->E;
    if (s->k > k) k = s->k;
    size_t rows = (size_t)N * k;
    if (grow((void **)&s->scores, (size_t)N * n_experts * sizeof(float)) ||
        grow((void **)&s->xg, rows * D * sizeof(float)) ||
        grow((void **)&s->a, rows * 2 * F_max * sizeof(float)) ||
        grow((void **)&s->h, rows * F_max * sizeof(float)) ||
        grow((void **)&s->y, rows * D * sizeof(float)) ||
        grow((void **)&s->r.ids, rows * sizeof(int32_t)) ||
        grow((void **)&s->r.weights, rows * sizeof(float)) ||
        grow((void **)&s->r.offset, (size_t)(n_experts + 1) * sizeof(int32_t)) ||
        grow((void **)&s->r.cursor, (size_t)n_experts * sizeof(int32_t)) ||
        grow((void **)&s->r.rows, rows * sizeof(int32_t)) ||
        grow((void **)&s->r.slot_w, rows * sizeof(float)))
        return -1;
    s->cap_tokens = N;
    s->D = D;
    s->F_max = F_max;
    s->E = n_experts;
    s->k = k;
    return 0;
}

void dm_moe_scratch_free(dm_moe_scratch *s)
{
    void *bufs[] = {s->scores, s->xg, s->a, s->h, s->y, s->r.ids, s->r.weights, s->r.offset,
                    s->r.cursor, s->r.rows, s->r.slot_w};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    memset(s, 0, sizeof *s);
}

/* ---- expert MLPs ---- */

/* 0.5 u (1 + tanh(z)) = u / (1 + exp(-2z)), z = sqrt(2/pi) (u + 0.044715 u^3). */
static inline float gelu_tanh(float u)
{
    const float c = 0.7978845608028654f; /* sqrt(2/pi) */
    return u / (1.0f + dm_exp_fast(-2.0f * c * (u + 0.044715f * u * u * u)));
}

dm_status dm_mlp_forward(const dm_mlp_layer *w, const float *x, int n, float *a, float *h, float *y)
{
    dm_status st;
    if (w->act == DM_MLP_SWIGLU) {
        if ((st = dm_cpu_linear(x, n, w->w1, dm_cpu_f(w->b1), a))) return st;
        dm_swiglu(a, n, w->F, h);
    } else {
        if ((st = dm_cpu_linear(x, n, w->w1, dm_cpu_f(w->b1), h))) return st;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)n * w->F; i++) h[i] = gelu_tanh(h[i]);
    }
    return dm_cpu_linear(h, n, w->w2, dm_cpu_f(w->b2), y);
}

/* ---- routing ---- */

/* The `cap` largest of v[T] (stride E), as token indices ascending; ties to the lower token.
 * Returns how many were written (cap, or T if cap > T). */
static int top_tokens(const float *v, int T, int E, int cap, int32_t *out, uint8_t *taken)
{
    memset(taken, 0, (size_t)T);
    for (int j = 0; j < cap; j++) {
        int best = -1;
        for (int t = 0; t < T; t++)
            if (!taken[t] && (best < 0 || v[(size_t)t * E] > v[(size_t)best * E])) best = t;
        if (best < 0) break; /* only if cap > T, which dm_moe_ec_capacity prevents */
        taken[best] = 1;
    }
    int n = 0;
    for (int t = 0; t < T; t++)
        if (taken[t]) out[n++] = t;
    return n;
}

static void route_expert_choice(const dm_moe_desc *d, int N, int T, const int64_t *y,
                                int64_t null_id, dm_moe_scratch *s)
{
    dm_routing *r = &s->r;
    const int E = d->E, k = d->k, B = N / T, cap = dm_moe_ec_capacity(T, E, k);
    int32_t *picked = malloc((size_t)T * sizeof(int32_t));
    uint8_t *taken = malloc((size_t)T);
    int n = 0;
    for (int e = 0; e < E; e++) {
        r->offset[e] = n;
        for (int b = 0; b < B && picked && taken; b++) {
            if (dm_moe_is_uncond(d, y, null_id, b * T, T)) continue;
            const int got = top_tokens(s->scores + (size_t)b * T * E + e, T, E, cap, picked, taken);
            for (int j = 0; j < got; j++) {
                int tok = b * T + picked[j];
                r->rows[n] = tok;
                r->slot_w[n++] = s->scores[(size_t)tok * E + e];
            }
        }
    }
    free(picked);
    free(taken);
    for (int e = E; e < d->n_experts; e++) { /* the unconditional expert */
        r->offset[e] = n;
        for (int tok = 0; tok < N; tok++)
            if (dm_moe_is_uncond(d, y, null_id, tok, T)) r->rows[n] = tok, r->slot_w[n++] = 1.0f;
    }
    r->offset[d->n_experts] = n;
    r->n_rows = n;
    for (int i = 0; i < N * k; i++) r->ids[i] = -1, r->weights[i] = 0.0f;
    for (int e = 0; e < d->n_experts; e++)
        for (int i = r->offset[e]; i < r->offset[e + 1]; i++)
            dm_moe_record_pick(r->ids + (size_t)r->rows[i] * k, r->weights + (size_t)r->rows[i] * k,
                               k, e, r->slot_w[i]);
}

/* Counting sort of the per-token picks (ids/weights) by expert, tokens ascending within each. */
static void group_token_choice(const dm_moe_desc *d, int N, dm_routing *r)
{
    const int k = d->k, nE = d->n_experts;
    memset(r->offset, 0, (size_t)(nE + 1) * sizeof(int32_t));
    for (int i = 0; i < N * k; i++)
        if (r->ids[i] >= 0) r->offset[r->ids[i] + 1]++;
    for (int e = 0; e < nE; e++) r->offset[e + 1] += r->offset[e];
    memcpy(r->cursor, r->offset, (size_t)nE * sizeof(int32_t));
    for (int n = 0; n < N; n++)
        for (int j = 0; j < k; j++) {
            int e = r->ids[(size_t)n * k + j];
            if (e < 0) continue;
            int at = r->cursor[e]++;
            r->rows[at] = n;
            r->slot_w[at] = r->weights[(size_t)n * k + j];
        }
    r->n_rows = r->offset[nE];
}

void dm_moe_route(const dm_ffn_layer *L, const float *h, int N, int T, const int64_t *y,
                  int64_t null_id, dm_moe_scratch *s)
{
    const dm_moe_desc *d = &L->d;
    const int E = d->E, k = d->k;
    dm_routing *r = &s->r;
    r->N = N;
    r->k = k;
    dm_linear_packed(h, N, &L->gate->pm, NULL, s->scores);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *p = s->scores + (size_t)n * E;
        dm_moe_token_scores(d, h + (size_t)n * d->D, p);
        if (d->kind == DM_ROUTE_PROTO_EC) continue;
        int32_t *ids = r->ids + (size_t)n * k;
        float *ws = r->weights + (size_t)n * k;
        if (dm_moe_is_uncond(d, y, null_id, n, T)) { /* all slots -> uncond expert, (1, 0, ...) */
            ids[0] = E, ws[0] = 1.0f;
            for (int j = 1; j < k; j++) ids[j] = -1, ws[j] = 0.0f;
        } else {
            dm_moe_top_k(p, E, k, ids, ws);
        }
    }
    if (d->kind == DM_ROUTE_PROTO_EC)
        route_expert_choice(d, N, T, y, null_id, s);
    else
        group_token_choice(d, N, r);
}

/* out [N, D] = routed part from a grouping (offset / rows / slot_w over n_rows rows); the
 * scratch must hold n_rows gathered rows. */
static dm_status apply_routed(const dm_ffn_layer *L, const float *h, int N, dm_moe_scratch *s,
                              const int32_t *offset, const int32_t *rows, const float *slot_w,
                              int n_rows, float *out)
{
    dm_status st;
    const int D = L->d.D;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n_rows; i++)
        memcpy(s->xg + (size_t)i * D, h + (size_t)rows[i] * D, (size_t)D * sizeof(float));
    for (int e = 0; e < L->d.n_experts; e++) {
        int off = offset[e], n = offset[e + 1] - off;
        if (n > 0 && (st = dm_mlp_forward(&L->experts[e], s->xg + (size_t)off * D, n, s->a, s->h,
                                          s->y + (size_t)off * D)))
            return st;
    }
    /* Combine in ascending expert order per token (as the reference's scatter-add does). Within
     * an expert a token appears once, so experts run in order and rows in parallel. */
    memset(out, 0, (size_t)N * D * sizeof(float));
    for (int e = 0; e < L->d.n_experts; e++) {
        int off = offset[e], n = offset[e + 1] - off;
#pragma omp parallel for schedule(static)
        for (int i = off; i < off + n; i++) {
            float *o = out + (size_t)rows[i] * D;
            const float *yv = s->y + (size_t)i * D, wt = slot_w[i];
            for (int d = 0; d < D; d++) o[d] += wt * yv[d];
        }
    }
    return DM_OK;
}

dm_status dm_moe_mlp_add(const dm_mlp_layer *w, const float *h, int N, int D, dm_moe_scratch *s,
                         float *out)
{
    dm_status st;
    if ((st = dm_mlp_forward(w, h, N, s->a, s->h, s->y))) return st;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (size_t)N * D; i++) out[i] += s->y[i];
    return DM_OK;
}

dm_status dm_moe_apply_grouped(const dm_ffn_layer *L, const float *h, int N, dm_moe_scratch *s,
                               const int32_t *offset, const int32_t *rows, const float *slot_w,
                               float *out)
{
    return apply_routed(L, h, N, s, offset, rows, slot_w, offset[L->d.n_experts], out);
}

dm_status dm_moe_apply(const dm_ffn_layer *L, const float *h, int N, dm_moe_scratch *s, float *out)
{
    dm_status st;
    const dm_routing *r = &s->r;
    if ((st = apply_routed(L, h, N, s, r->offset, r->rows, r->slot_w, r->n_rows, out))) return st;
    if (L->shared.F > 0) return dm_moe_mlp_add(&L->shared, h, N, L->d.D, s, out);
    return DM_OK;
}

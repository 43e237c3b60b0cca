/* MoE feed-forward: route tokens, group them by expert, one GEMM per expert, combine. */
#include "router/moe.h"

#include "backend/cpu/ops.h"

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

int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int n_experts, int k)
{
    if (N <= s->cap_tokens && D == s->D && F_max <= s->F_max && n_experts <= s->E && k <= s->k)
        return 0;
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

void dm_mlp_forward(const dm_mlp_w *w, const float *x, int n, int D, float *a, float *h, float *y)
{
    (void)D; /* implied by the packed shapes */
    if (w->act == DM_MLP_SWIGLU) {
        dm_linear_packed(x, n, &w->w1, w->b1, a);
        dm_swiglu(a, n, w->F, h);
    } else {
        dm_linear_packed(x, n, &w->w1, w->b1, h);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)n * w->F; i++) h[i] = gelu_tanh(h[i]);
    }
    dm_linear_packed(h, n, &w->w2, w->b2, y);
}

void dm_mlp_forward_ref(const dm_mlp_w *w, const float *x, int n, int D, float *y)
{
    (void)D; /* implied by the packed shapes */
    const int F = w->F, F1 = w->act == DM_MLP_SWIGLU ? 2 * F : F;
    float *a = malloc((size_t)F1 * sizeof(float)), *h = malloc((size_t)F * sizeof(float));
    if (!a || !h) goto done;
    for (int r = 0; r < n; r++) {
        dm_linear_packed_ref(x + (size_t)r * D, 1, &w->w1, w->b1, a);
        for (int i = 0; i < F; i++)
            h[i] = w->act == DM_MLP_SWIGLU ? a[i] / (1.0f + expf(-a[i])) * a[F + i]
                                           : (float)(0.5 * a[i] * (1.0 + tanh(sqrt(2.0 / M_PI) *
                                                     (a[i] + 0.044715 * a[i] * a[i] * a[i]))));
        dm_linear_packed_ref(h, 1, &w->w2, w->b2, y + (size_t)r * D);
    }
done:
    free(a);
    free(h);
}

/* ---- routing ---- */

/* k largest of p[E], descending; ties go to the lower expert id. */
static void top_k(const float *p, int E, int k, int32_t *ids, float *w)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        w[j] = p[best];
    }
}

/* Router scores of one token from its logits (softmax router) or its dot products with the
 * unit prototypes (then divided by the token's norm, as F.normalize does, and activated). */
static void token_scores(const dm_moe_w *w, const float *x, float *s)
{
    const int E = w->E;
    if (w->kind == DM_ROUTE_SOFTMAX_TOPK) {
        dm_softmax_rows(s, 1, E);
        return;
    }
    double nn = 0;
    for (int d = 0; d < w->D; d++) nn += (double)x[d] * x[d];
    float inv = 1.0f / fmaxf((float)sqrt(nn), 1e-12f);
    for (int e = 0; e < E; e++) s[e] *= inv;
    if (w->act == DM_GATE_SOFTMAX) dm_softmax_rows(s, 1, E);
    if (w->act == DM_GATE_SIGMOID)
        for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
}

static int is_uncond(const dm_moe_w *w, const int64_t *y, int64_t null_id, int n, int T)
{
    return w->kind != DM_ROUTE_SOFTMAX_TOPK && w->n_experts > w->E && y && y[n / T] == null_id;
}

/* Expert-choice capacity: each routed expert takes this many tokens of each image. */
static int ec_capacity(int T, int E, int k)
{
    int cap = (int)floor((double)T / E * k);
    return cap < 1 ? 1 : cap > T ? T : cap;
}

/* The `cap` largest of v[T] (stride E), as token indices ascending; ties to the lower token.
 * Returns how many were written (cap, or T if cap > T). */
static int top_tokens(const float *v, int T, int E, int cap, int32_t *out, uint8_t *taken)
{
    memset(taken, 0, (size_t)T);
    for (int j = 0; j < cap; j++) {
        int best = -1;
        for (int t = 0; t < T; t++)
            if (!taken[t] && (best < 0 || v[(size_t)t * E] > v[(size_t)best * E])) best = t;
        if (best < 0) break; /* only if cap > T, which ec_capacity prevents */
        taken[best] = 1;
    }
    int n = 0;
    for (int t = 0; t < T; t++)
        if (taken[t]) out[n++] = t;
    return n;
}

/* Insert (e, wt) into a token's record of k slots kept in descending weight. */
static void record_pick(int32_t *ids, float *ws, int k, int e, float wt)
{
    int at = k;
    for (int j = 0; j < k; j++)
        if (ids[j] < 0 || wt > ws[j]) {
            at = j;
            break;
        }
    if (at == k) return;
    for (int j = k - 1; j > at; j--) ids[j] = ids[j - 1], ws[j] = ws[j - 1];
    ids[at] = e;
    ws[at] = wt;
}

static void route_expert_choice(const dm_moe_w *w, int N, int T, const int64_t *y, int64_t null_id,
                                dm_moe_scratch *s)
{
    dm_routing *r = &s->r;
    const int E = w->E, k = w->k, B = N / T, cap = ec_capacity(T, E, k);
    int32_t *picked = malloc((size_t)T * sizeof(int32_t));
    uint8_t *taken = malloc((size_t)T);
    int n = 0;
    for (int e = 0; e < E; e++) {
        r->offset[e] = n;
        for (int b = 0; b < B && picked && taken; b++) {
            if (is_uncond(w, y, null_id, b * T, T)) continue;
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
    for (int e = E; e < w->n_experts; e++) { /* the unconditional expert */
        r->offset[e] = n;
        for (int tok = 0; tok < N; tok++)
            if (is_uncond(w, y, null_id, tok, T)) r->rows[n] = tok, r->slot_w[n++] = 1.0f;
    }
    r->offset[w->n_experts] = n;
    r->n_rows = n;
    for (int i = 0; i < N * k; i++) r->ids[i] = -1, r->weights[i] = 0.0f;
    for (int e = 0; e < w->n_experts; e++)
        for (int i = r->offset[e]; i < r->offset[e + 1]; i++)
            record_pick(r->ids + (size_t)r->rows[i] * k, r->weights + (size_t)r->rows[i] * k, k, e,
                        r->slot_w[i]);
}

/* Counting sort of the per-token picks (ids/weights) by expert, tokens ascending within each. */
static void group_token_choice(const dm_moe_w *w, int N, dm_routing *r)
{
    const int k = w->k, nE = w->n_experts;
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

void dm_moe_route(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                  int64_t null_id, dm_moe_scratch *s)
{
    const int E = w->E, k = w->k;
    dm_routing *r = &s->r;
    r->N = N;
    r->k = k;
    dm_linear_packed(h, N, &w->gate, NULL, s->scores);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *p = s->scores + (size_t)n * E;
        token_scores(w, h + (size_t)n * w->D, p);
        if (w->kind == DM_ROUTE_PROTO_EC) continue;
        int32_t *ids = r->ids + (size_t)n * k;
        float *ws = r->weights + (size_t)n * k;
        if (is_uncond(w, y, null_id, n, T)) { /* all slots -> uncond expert, weights (1, 0, ...) */
            ids[0] = E, ws[0] = 1.0f;
            for (int j = 1; j < k; j++) ids[j] = -1, ws[j] = 0.0f;
        } else {
            top_k(p, E, k, ids, ws);
        }
    }
    if (w->kind == DM_ROUTE_PROTO_EC)
        route_expert_choice(w, N, T, y, null_id, s);
    else
        group_token_choice(w, N, r);
}

void dm_moe_apply(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s, float *out)
{
    const int D = w->D;
    const dm_routing *r = &s->r;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < r->n_rows; i++)
        memcpy(s->xg + (size_t)i * D, h + (size_t)r->rows[i] * D, (size_t)D * sizeof(float));
    for (int e = 0; e < w->n_experts; e++) {
        int off = r->offset[e], n = r->offset[e + 1] - off;
        if (n > 0)
            dm_mlp_forward(&w->experts[e], s->xg + (size_t)off * D, n, D, s->a, s->h,
                           s->y + (size_t)off * D);
    }
    /* Combine in ascending expert order per token (as the reference's scatter-add does). Within
     * an expert a token appears once, so experts run in order and rows in parallel. */
    memset(out, 0, (size_t)N * D * sizeof(float));
    for (int e = 0; e < w->n_experts; e++) {
        int off = r->offset[e], n = r->offset[e + 1] - off;
#pragma omp parallel for schedule(static)
        for (int i = off; i < off + n; i++) {
            float *o = out + (size_t)r->rows[i] * D;
            const float *yv = s->y + (size_t)i * D, wt = r->slot_w[i];
            for (int d = 0; d < D; d++) o[d] += wt * yv[d];
        }
    }
    if (w->shared.F > 0) {
        dm_mlp_forward(&w->shared, h, N, D, s->a, s->h, s->y);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)N * D; i++) out[i] += s->y[i];
    }
}

/* ---- references ---- */

void dm_moe_route_ref(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                      int64_t null_id, int32_t *ids, float *weights)
{
    const int E = w->E, k = w->k, D = w->D;
    float *sc = malloc((size_t)N * E * sizeof(float));
    if (!sc) return;
    for (int n = 0; n < N; n++) {
        dm_linear_packed_ref(h + (size_t)n * D, 1, &w->gate, NULL, sc + (size_t)n * E);
        token_scores(w, h + (size_t)n * D, sc + (size_t)n * E);
    }
    for (int i = 0; i < N * k; i++) ids[i] = -1, weights[i] = 0.0f;
    for (int n = 0; n < N; n++) {
        if (is_uncond(w, y, null_id, n, T)) {
            ids[(size_t)n * k] = E, weights[(size_t)n * k] = 1.0f;
        } else if (w->kind != DM_ROUTE_PROTO_EC) {
            top_k(sc + (size_t)n * E, E, k, ids + (size_t)n * k, weights + (size_t)n * k);
        }
    }
    if (w->kind == DM_ROUTE_PROTO_EC) { /* expert e keeps token t iff fewer than cap beat it */
        const int cap = ec_capacity(T, E, k);
        for (int e = 0; e < E; e++)
            for (int n = 0; n < N; n++) {
                if (is_uncond(w, y, null_id, n, T)) continue;
                int b0 = n / T * T, better = 0;
                float v = sc[(size_t)n * E + e];
                for (int m = b0; m < b0 + T; m++) {
                    float u = sc[(size_t)m * E + e];
                    better += u > v || (u == v && m < n);
                }
                if (better < cap) record_pick(ids + (size_t)n * k, weights + (size_t)n * k, k, e, v);
            }
    }
    free(sc);
}

void dm_moe_forward_ref(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                        int64_t null_id, float *out)
{
    const int D = w->D, k = w->k;
    int32_t *ids = malloc((size_t)N * k * sizeof(int32_t));
    float *wt = malloc((size_t)N * k * sizeof(float)), *yv = malloc((size_t)D * sizeof(float));
    if (!ids || !wt || !yv) goto done;
    if (w->kind == DM_ROUTE_PROTO_EC) { /* EC may give a token more than k experts: all count */
        const int E = w->E, cap = ec_capacity(T, E, k);
        float *sc = malloc((size_t)N * E * sizeof(float));
        if (!sc) goto done;
        for (int n = 0; n < N; n++) {
            dm_linear_packed_ref(h + (size_t)n * D, 1, &w->gate, NULL, sc + (size_t)n * E);
            token_scores(w, h + (size_t)n * D, sc + (size_t)n * E);
        }
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * D;
            memset(o, 0, (size_t)D * sizeof(float));
            int unc = is_uncond(w, y, null_id, n, T);
            for (int e = 0; e < w->n_experts; e++) {
                float we = 0.0f;
                if (unc) {
                    we = e == E ? 1.0f : 0.0f;
                } else if (e < E) {
                    int b0 = n / T * T, better = 0;
                    float v = sc[(size_t)n * E + e];
                    for (int m = b0; m < b0 + T; m++) {
                        float u = sc[(size_t)m * E + e];
                        better += u > v || (u == v && m < n);
                    }
                    we = better < cap ? v : 0.0f;
                }
                if (we == 0.0f) continue;
                dm_mlp_forward_ref(&w->experts[e], h + (size_t)n * D, 1, D, yv);
                for (int d = 0; d < D; d++) o[d] += we * yv[d];
            }
        }
        free(sc);
    } else {
        dm_moe_route_ref(w, h, N, T, y, null_id, ids, wt);
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * D;
            memset(o, 0, (size_t)D * sizeof(float));
            for (int e = 0; e < w->n_experts; e++)
                for (int j = 0; j < k; j++)
                    if (ids[(size_t)n * k + j] == e && wt[(size_t)n * k + j] != 0.0f) {
                        dm_mlp_forward_ref(&w->experts[e], h + (size_t)n * D, 1, D, yv);
                        for (int d = 0; d < D; d++) o[d] += wt[(size_t)n * k + j] * yv[d];
                    }
        }
    }
    if (w->shared.F > 0)
        for (int n = 0; n < N; n++) {
            dm_mlp_forward_ref(&w->shared, h + (size_t)n * D, 1, D, yv);
            for (int d = 0; d < D; d++) out[(size_t)n * D + d] += yv[d];
        }
done:
    free(ids);
    free(wt);
    free(yv);
}

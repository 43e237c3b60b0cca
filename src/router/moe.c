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

int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int E, int k)
{
    if (N <= s->cap_tokens && D == s->D && F_max <= s->F_max && E == s->E && k == s->k) return 0;
    size_t rows = (size_t)N * k;
    if (grow((void **)&s->logits, (size_t)N * E * sizeof(float)) ||
        grow((void **)&s->xg, rows * D * sizeof(float)) ||
        grow((void **)&s->gu, rows * 2 * F_max * sizeof(float)) ||
        grow((void **)&s->h, rows * F_max * sizeof(float)) ||
        grow((void **)&s->y, rows * D * sizeof(float)) ||
        grow((void **)&s->r.ids, rows * sizeof(int32_t)) ||
        grow((void **)&s->r.weights, rows * sizeof(float)) ||
        grow((void **)&s->r.offset, (size_t)(E + 1) * sizeof(int32_t)) ||
        grow((void **)&s->r.cursor, (size_t)E * sizeof(int32_t)) ||
        grow((void **)&s->r.rows, rows * sizeof(int32_t)) ||
        grow((void **)&s->r.slot_w, rows * sizeof(float)))
        return -1;
    s->cap_tokens = N;
    s->D = D;
    s->F_max = F_max;
    s->E = E;
    s->k = k;
    return 0;
}

void dm_moe_scratch_free(dm_moe_scratch *s)
{
    free(s->logits);
    free(s->xg);
    free(s->gu);
    free(s->h);
    free(s->y);
    free(s->r.ids);
    free(s->r.weights);
    free(s->r.offset);
    free(s->r.cursor);
    free(s->r.rows);
    free(s->r.slot_w);
    memset(s, 0, sizeof *s);
}

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

void dm_moe_route(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s)
{
    const int E = w->E, k = w->k;
    dm_routing *r = &s->r;
    r->N = N;
    r->E = E;
    r->k = k;
    dm_linear(h, N, w->D, w->gate, NULL, E, s->logits);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *p = s->logits + (size_t)n * E;
        dm_softmax_rows(p, 1, E);
        top_k(p, E, k, r->ids + (size_t)n * k, r->weights + (size_t)n * k);
    }
    /* Counting sort of the N*k (token, expert) pairs by expert, tokens ascending within each. */
    memset(r->offset, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int i = 0; i < N * k; i++) r->offset[r->ids[i] + 1]++;
    for (int e = 0; e < E; e++) r->offset[e + 1] += r->offset[e];
    int32_t *cursor = r->cursor;
    memcpy(cursor, r->offset, (size_t)E * sizeof(int32_t));
    for (int n = 0; n < N; n++)
        for (int j = 0; j < k; j++) {
            int e = r->ids[(size_t)n * k + j];
            int at = cursor[e]++;
            r->rows[at] = n;
            r->slot_w[at] = r->weights[(size_t)n * k + j];
        }
}

void dm_moe_route_ref(const dm_moe_w *w, const float *h, int N, int32_t *ids, float *weights)
{
    float *p = malloc((size_t)w->E * sizeof(float));
    if (!p) return;
    for (int n = 0; n < N; n++) {
        dm_linear_ref(h + (size_t)n * w->D, 1, w->D, w->gate, NULL, w->E, p);
        dm_softmax_rows(p, 1, w->E);
        top_k(p, w->E, w->k, ids + (size_t)n * w->k, weights + (size_t)n * w->k);
    }
    free(p);
}

/* y [n, D] = SwiGLU expert applied to x [n, D]. */
static void swiglu_mlp(const dm_swiglu_w *e, const float *x, int n, int D, float *gu, float *h,
                       float *y)
{
    dm_linear(x, n, D, e->gate_up, NULL, 2 * e->F, gu);
    dm_swiglu(gu, n, e->F, h);
    dm_linear(h, n, e->F, e->down, NULL, D, y);
}

void dm_moe_apply(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s, float *out)
{
    const int D = w->D, E = w->E, k = w->k;
    const dm_routing *r = &s->r;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N * k; i++)
        memcpy(s->xg + (size_t)i * D, h + (size_t)r->rows[i] * D, (size_t)D * sizeof(float));
    for (int e = 0; e < E; e++) {
        int off = r->offset[e], n = r->offset[e + 1] - off;
        if (n == 0) continue;
        const dm_swiglu_w *ex = &w->experts[e];
        swiglu_mlp(ex, s->xg + (size_t)off * D, n, D, s->gu, s->h, s->y + (size_t)off * D);
    }
    /* Combine in ascending expert order per token (as the reference's scatter-add does). Within
     * an expert a token appears once, so experts run in order and rows in parallel. */
    memset(out, 0, (size_t)N * D * sizeof(float));
    for (int e = 0; e < E; e++) {
        int off = r->offset[e], n = r->offset[e + 1] - off;
#pragma omp parallel for schedule(static)
        for (int i = off; i < off + n; i++) {
            float *o = out + (size_t)r->rows[i] * D;
            const float *y = s->y + (size_t)i * D, wt = r->slot_w[i];
            for (int d = 0; d < D; d++) o[d] += wt * y[d];
        }
    }
    if (w->shared.F > 0) {
        swiglu_mlp(&w->shared, h, N, D, s->gu, s->h, s->y);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)N * D; i++) out[i] += s->y[i];
    }
}

static void swiglu_ref(const dm_swiglu_w *e, const float *x, int D, float *y)
{
    float *gu = malloc((size_t)2 * e->F * sizeof(float)), *hh = malloc((size_t)e->F * sizeof(float));
    if (!gu || !hh) goto done;
    dm_linear_ref(x, 1, D, e->gate_up, NULL, 2 * e->F, gu);
    for (int i = 0; i < e->F; i++) {
        float g = gu[i];
        hh[i] = g / (1.0f + expf(-g)) * gu[e->F + i];
    }
    dm_linear_ref(hh, 1, e->F, e->down, NULL, D, y);
done:
    free(gu);
    free(hh);
}

void dm_moe_forward_ref(const dm_moe_w *w, const float *h, int N, float *out)
{
    const int D = w->D, k = w->k;
    int32_t ids[64];
    float wt[64];
    float *y = malloc((size_t)D * sizeof(float));
    if (!y || k > 64) goto done;
    for (int n = 0; n < N; n++) {
        const float *x = h + (size_t)n * D;
        float *o = out + (size_t)n * D;
        memset(o, 0, (size_t)D * sizeof(float));
        dm_moe_route_ref(w, x, 1, ids, wt);
        for (int e = 0; e < w->E; e++)
            for (int j = 0; j < k; j++)
                if (ids[j] == e) {
                    swiglu_ref(&w->experts[e], x, D, y);
                    for (int d = 0; d < D; d++) o[d] += wt[j] * y[d];
                }
        if (w->shared.F > 0) {
            swiglu_ref(&w->shared, x, D, y);
            for (int d = 0; d < D; d++) o[d] += y[d];
        }
    }
done:
    free(y);
}

/* MoE routing rules and the plain references (docs/spec/ditmoe.md §2.8, docs/spec/promoe.md §3,
 * docs/traps.md). */
#include "router/moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- rules ---- */

int dm_moe_ec_capacity(int T, int E, int k)
{
    int cap = (int)floor((double)T / E * k);
    return cap < 1 ? 1 : cap > T ? T : cap;
}

void dm_moe_top_k(const float *p, int E, int k, int32_t *ids, float *w)
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

/* Softmax of one row in float32: max, expf(x - max), sum, divide. */
static void softmax_row(float *row, int n)
{
    float m = row[0];
    for (int i = 1; i < n; i++) m = row[i] > m ? row[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        row[i] = expf(row[i] - m);
        s += row[i];
    }
    for (int i = 0; i < n; i++) row[i] /= s;
}

void dm_moe_token_scores(const dm_moe_desc *d, const float *x, float *s)
{
    const int E = d->E;
    if (d->kind == DM_ROUTE_SOFTMAX_TOPK) {
        softmax_row(s, E);
        return;
    }
    double nn = 0;
    for (int i = 0; i < d->D; i++) nn += (double)x[i] * x[i];
    float inv = 1.0f / fmaxf((float)sqrt(nn), 1e-12f);
    for (int e = 0; e < E; e++) s[e] *= inv;
    if (d->act == DM_GATE_SOFTMAX) softmax_row(s, E);
    if (d->act == DM_GATE_SIGMOID)
        for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
}

int dm_moe_is_uncond(const dm_moe_desc *d, const int64_t *y, int64_t null_id, int n, int T)
{
    return (d->kind == DM_ROUTE_PROTO_TC || d->kind == DM_ROUTE_PROTO_EC) && d->n_experts > d->E &&
           y && y[n / T] == null_id;
}

void dm_moe_record_pick(int32_t *ids, float *ws, int k, int e, float wt)
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

/* ---- references ---- */

/* y [out] = W [out, in] x [in] + b, in double. */
static void matvec_ref(const float *W, const float *b, int out, int in, const float *x, float *y)
{
    for (int o = 0; o < out; o++) {
        double acc = b ? b[o] : 0.0;
        for (int i = 0; i < in; i++) acc += (double)x[i] * W[(size_t)o * in + i];
        y[o] = (float)acc;
    }
}

void dm_mlp_forward_ref(const dm_mlp_host *w, const float *x, int n, int D, float *y)
{
    const int F = w->F, F1 = w->act == DM_MLP_SWIGLU ? 2 * F : F;
    float *a = malloc((size_t)F1 * sizeof(float)), *h = malloc((size_t)F * sizeof(float));
    if (!a || !h) goto done;
    for (int r = 0; r < n; r++) {
        matvec_ref(w->w1, w->b1, F1, D, x + (size_t)r * D, a);
        for (int i = 0; i < F; i++)
            h[i] = w->act == DM_MLP_SWIGLU ? a[i] / (1.0f + expf(-a[i])) * a[F + i]
                                           : (float)(0.5 * a[i] * (1.0 + tanh(sqrt(2.0 / M_PI) *
                                                     (a[i] + 0.044715 * a[i] * a[i] * a[i]))));
        matvec_ref(w->w2, w->b2, D, F, h, y + (size_t)r * D);
    }
done:
    free(a);
    free(h);
}

/* Scores [N, E] of every token. */
static float *scores_ref(const dm_ffn_host *w, const float *h, int N)
{
    const int E = w->d.E, D = w->d.D;
    float *sc = malloc((size_t)N * E * sizeof(float) + 1);
    if (!sc) return NULL;
    for (int n = 0; n < N; n++) {
        matvec_ref(w->gate, NULL, E, D, h + (size_t)n * D, sc + (size_t)n * E);
        dm_moe_token_scores(&w->d, h + (size_t)n * D, sc + (size_t)n * E);
    }
    return sc;
}

/* Expert choice: expert e keeps token n iff fewer than `cap` tokens of its image beat it
 * (a higher score, or an equal score and a lower index). */
static int ec_keeps(const float *sc, int E, int T, int cap, int n, int e)
{
    int b0 = n / T * T, better = 0;
    float v = sc[(size_t)n * E + e];
    for (int m = b0; m < b0 + T; m++) {
        float u = sc[(size_t)m * E + e];
        better += u > v || (u == v && m < n);
    }
    return better < cap;
}

void dm_moe_route_ref(const dm_ffn_host *w, const float *h, int N, int T, const int64_t *y,
                      int64_t null_id, int32_t *ids, float *weights)
{
    const int E = w->d.E, k = w->d.k;
    for (int i = 0; i < N * k; i++) ids[i] = -1, weights[i] = 0.0f;
    if (w->d.kind == DM_ROUTE_DENSE) return;
    float *sc = scores_ref(w, h, N);
    if (!sc) return;
    for (int n = 0; n < N; n++) {
        if (dm_moe_is_uncond(&w->d, y, null_id, n, T)) {
            ids[(size_t)n * k] = E, weights[(size_t)n * k] = 1.0f;
        } else if (w->d.kind != DM_ROUTE_PROTO_EC) {
            dm_moe_top_k(sc + (size_t)n * E, E, k, ids + (size_t)n * k, weights + (size_t)n * k);
        }
    }
    if (w->d.kind == DM_ROUTE_PROTO_EC) {
        const int cap = dm_moe_ec_capacity(T, E, k);
        for (int e = 0; e < E; e++)
            for (int n = 0; n < N; n++)
                if (!dm_moe_is_uncond(&w->d, y, null_id, n, T) && ec_keeps(sc, E, T, cap, n, e))
                    dm_moe_record_pick(ids + (size_t)n * k, weights + (size_t)n * k, k, e,
                                       sc[(size_t)n * E + e]);
    }
    free(sc);
}

void dm_ffn_forward_ref(const dm_ffn_host *w, const float *h, int N, int T, const int64_t *y,
                        int64_t null_id, float *out)
{
    const int D = w->d.D, k = w->d.k, E = w->d.E;
    if (w->d.kind == DM_ROUTE_DENSE) {
        dm_mlp_forward_ref(&w->experts[0], h, N, D, out);
        return;
    }
    int32_t *ids = malloc((size_t)N * k * sizeof(int32_t));
    float *wt = malloc((size_t)N * k * sizeof(float)), *yv = malloc((size_t)D * sizeof(float));
    float *sc = w->d.kind == DM_ROUTE_PROTO_EC ? scores_ref(w, h, N) : NULL;
    if (!ids || !wt || !yv || (w->d.kind == DM_ROUTE_PROTO_EC && !sc)) goto done;
    if (w->d.kind != DM_ROUTE_PROTO_EC) dm_moe_route_ref(w, h, N, T, y, null_id, ids, wt);
    const int cap = w->d.kind == DM_ROUTE_PROTO_EC ? dm_moe_ec_capacity(T, E, k) : 0;
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * D;
        memset(o, 0, (size_t)D * sizeof(float));
        const int unc = dm_moe_is_uncond(&w->d, y, null_id, n, T);
        for (int e = 0; e < w->d.n_experts; e++) {
            float we = 0.0f;
            if (w->d.kind == DM_ROUTE_PROTO_EC) {
                if (unc)
                    we = e == E ? 1.0f : 0.0f;
                else if (e < E && ec_keeps(sc, E, T, cap, n, e))
                    we = sc[(size_t)n * E + e];
            } else {
                for (int j = 0; j < k; j++)
                    if (ids[(size_t)n * k + j] == e) we = wt[(size_t)n * k + j];
            }
            if (we == 0.0f) continue;
            dm_mlp_forward_ref(&w->experts[e], h + (size_t)n * D, 1, D, yv);
            for (int d = 0; d < D; d++) o[d] += we * yv[d];
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
    free(sc);
}

/* Routing policies, their CSR output and the lab's spec parsers (router/route_policy.h). */
#include "router/route_policy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parsing helpers ----------------------------------------------------------------------- */

/* Whole-string number; 0 on success. */
static int parse_double(const char *s, size_t len, double *out)
{
    char buf[64];
    if (len == 0 || len >= sizeof buf) return -1;
    memcpy(buf, s, len);
    buf[len] = 0;
    char *end;
    errno = 0;
    double v = strtod(buf, &end);
    if (errno || *end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

static int parse_int(const char *s, size_t len, int *out)
{
    char buf[32];
    if (len == 0 || len >= sizeof buf) return -1;
    memcpy(buf, s, len);
    buf[len] = 0;
    char *end;
    errno = 0;
    long v = strtol(buf, &end, 10);
    if (errno || *end || v < -1000000 || v > 1000000) return -1;
    *out = (int)v;
    return 0;
}

/* Next comma-separated field of *s: [*f, *f + *flen), key length up to '=' in *klen. */
static int next_field(const char **s, const char **f, size_t *flen, size_t *klen)
{
    if (!**s) return 0;
    *f = *s;
    const char *c = strchr(*s, ',');
    *flen = c ? (size_t)(c - *s) : strlen(*s);
    *s = c ? c + 1 : *s + *flen;
    const char *eq = memchr(*f, '=', *flen);
    *klen = eq ? (size_t)(eq - *f) : *flen;
    return 1;
}

static int key_is(const char *f, size_t klen, const char *key)
{
    return strlen(key) == klen && !memcmp(f, key, klen);
}

/* ---- policies ------------------------------------------------------------------------------ */

void dm_route_policy_init(dm_route_policy *p)
{
    memset(p, 0, sizeof *p);
    p->kind = DM_POLICY_TOPK;
    p->margin = -1.0f;
}

dm_status dm_route_policy_parse(const char *s, dm_route_policy *out)
{
    dm_route_policy p;
    dm_route_policy_init(&p);
    if (!s || !*s) return dm_fail(DM_ERR_ARG, "--route: empty value (top-k, top-p=P, threshold=T, rank2=TAU)");
    const char *rest = s, *f;
    size_t flen, klen;
    int first = 1;
    while (next_field(&rest, &f, &flen, &klen)) {
        const char *val = f + klen + 1;
        size_t vlen = klen < flen ? flen - klen - 1 : 0;
        int has_val = klen < flen;
        double d;
        int i;
        if (first) {
            first = 0;
            if (key_is(f, klen, "top-k")) {
                p.kind = DM_POLICY_TOPK;
                if (has_val && (parse_int(val, vlen, &i) || i < 1))
                    return dm_fail(DM_ERR_ARG, "--route %s: K must be an integer >= 1", s);
                p.k = has_val ? i : 0;
            } else if (key_is(f, klen, "top-p") || key_is(f, klen, "threshold")) {
                int topp = key_is(f, klen, "top-p");
                p.kind = topp ? DM_POLICY_TOPP : DM_POLICY_THRESHOLD;
                if (!has_val || parse_double(val, vlen, &d))
                    return dm_fail(DM_ERR_ARG, "--route %s: %s needs a number (%s)", s,
                                   topp ? "top-p" : "threshold", topp ? "top-p=P" : "threshold=T");
                if (!(d > 0.0 && d <= 1.0))
                    return dm_fail(DM_ERR_ARG, "--route %s: %s must be in (0, 1]", s,
                                   topp ? "P" : "T");
                p.p = (float)d;
            } else if (key_is(f, klen, "rank2")) {
                p.kind = DM_POLICY_PROTO2;
                if (!has_val || parse_double(val, vlen, &d) || d < -1.0 || d > 1.0)
                    return dm_fail(DM_ERR_ARG, "--route %s: rank2=TAU needs a cosine TAU in [-1, 1]", s);
                p.p = (float)d;
            } else {
                return dm_fail(DM_ERR_ARG, "--route %s: unknown policy '%.*s' (top-k, top-p=P, "
                               "threshold=T, rank2=TAU)", s, (int)klen, f);
            }
            continue;
        }
        if (key_is(f, klen, "max") && (p.kind == DM_POLICY_TOPP || p.kind == DM_POLICY_THRESHOLD)) {
            if (!has_val || parse_int(val, vlen, &i) || i < 1)
                return dm_fail(DM_ERR_ARG, "--route %s: max=K needs an integer K >= 1", s);
            p.k = i;
        } else if (key_is(f, klen, "renorm") && !has_val &&
                   (p.kind == DM_POLICY_TOPP || p.kind == DM_POLICY_THRESHOLD)) {
            p.renorm = 1;
        } else if (key_is(f, klen, "margin") && p.kind == DM_POLICY_PROTO2) {
            if (!has_val || parse_double(val, vlen, &d) || d < 0.0 || d > 2.0)
                return dm_fail(DM_ERR_ARG, "--route %s: margin=DELTA needs a number in [0, 2]", s);
            p.margin = (float)d;
        } else {
            return dm_fail(DM_ERR_ARG, "--route %s: unexpected field '%.*s'", s, (int)flen, f);
        }
    }
    *out = p;
    return DM_OK;
}

dm_status dm_route_policy_check(const dm_route_policy *p, int prob_router, int E, int model_k)
{
    char b[96];
    dm_route_policy_str(p, b, sizeof b);
    if (prob_router && p->kind == DM_POLICY_PROTO2)
        return dm_fail(DM_ERR_ARG, "--route %s: rank2 is for ProMoE's cosine router; this model's "
                       "router is a softmax (use top-p or threshold)", b);
    if (!prob_router && (p->kind == DM_POLICY_TOPP || p->kind == DM_POLICY_THRESHOLD))
        return dm_fail(DM_ERR_ARG, "--route %s: needs router probabilities; this model's scores "
                       "are cosines (use rank2=TAU[,margin=DELTA])", b);
    if (p->kind == DM_POLICY_TOPK && p->k > E)
        return dm_fail(DM_ERR_ARG, "--route %s: K = %d exceeds the %d experts", b, p->k, E);
    if (p->kind == DM_POLICY_TOPK && !prob_router && p->k && p->k != model_k)
        return dm_fail(DM_ERR_ARG, "--route %s: ProMoE keeps its trained k = %d here (rank2 adds "
                       "the second prototype)", b, model_k);
    if ((p->kind == DM_POLICY_TOPP || p->kind == DM_POLICY_THRESHOLD) && p->k > E)
        return dm_fail(DM_ERR_ARG, "--route %s: max = %d exceeds the %d experts", b, p->k, E);
    if (p->kind == DM_POLICY_PROTO2 && model_k != 1)
        return dm_fail(DM_ERR_ARG, "--route %s: rank2 needs a top-1 router (k = %d)", b, model_k);
    if (model_k < 1 || model_k > E || E > DM_ROUTE_MAX_E)
        return dm_fail(DM_ERR_ARG, "--route: model k = %d with %d experts (at most %d)", model_k, E,
                       DM_ROUTE_MAX_E);
    return DM_OK;
}

/* Shortest %g form of v that reads back as the same float. */
static const char *fmt_float(float v, char *b, size_t n)
{
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(b, n, "%.*g", prec, v);
        if (strtof(b, NULL) == v) break;
    }
    return b;
}

void dm_route_policy_str(const dm_route_policy *p, char *buf, size_t n)
{
    char f[32];
    int w = 0;
    switch (p->kind) {
    case DM_POLICY_TOPK:
        w = p->k ? snprintf(buf, n, "top-k=%d", p->k) : snprintf(buf, n, "top-k");
        break;
    case DM_POLICY_TOPP:
    case DM_POLICY_THRESHOLD:
        w = snprintf(buf, n, "%s=%s", p->kind == DM_POLICY_TOPP ? "top-p" : "threshold",
                     fmt_float(p->p, f, sizeof f));
        if (p->k && w >= 0 && (size_t)w < n) w += snprintf(buf + w, n - w, ",max=%d", p->k);
        if (p->renorm && w >= 0 && (size_t)w < n) w += snprintf(buf + w, n - w, ",renorm");
        break;
    case DM_POLICY_PROTO2:
        w = snprintf(buf, n, "rank2=%s", fmt_float(p->p, f, sizeof f));
        if (p->margin >= 0 && w >= 0 && (size_t)w < n)
            snprintf(buf + w, n - w, ",margin=%s", fmt_float(p->margin, f, sizeof f));
        break;
    }
}

int dm_route_policy_max_picks(const dm_route_policy *p, int E, int model_k)
{
    switch (p->kind) {
    case DM_POLICY_TOPK: return p->k ? p->k : model_k;
    case DM_POLICY_TOPP:
    case DM_POLICY_THRESHOLD: return p->k ? p->k : E;
    case DM_POLICY_PROTO2: return E >= 2 ? 2 : 1;
    }
    return E;
}

/* ---- CSR storage --------------------------------------------------------------------------- */

static int grow(void **p, size_t bytes)
{
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q) return -1;
    *p = q;
    return 0;
}

dm_status dm_route_csr_reserve(dm_route_csr *c, int N, int max_picks, int n_experts)
{
    size_t picks = (size_t)N * (max_picks < 1 ? 1 : max_picks);
    if (N <= c->cap_tokens && picks <= (size_t)c->cap_picks && n_experts <= c->cap_experts)
        return DM_OK;
    if (picks > INT32_MAX) return dm_fail(DM_ERR_NOMEM, "routing: %zu picks", picks);
    if (grow((void **)&c->tok_off, ((size_t)N + 1) * sizeof(int32_t)) ||
        grow((void **)&c->ids, picks * sizeof(int32_t)) ||
        grow((void **)&c->weights, picks * sizeof(float)) ||
        grow((void **)&c->exp_off, ((size_t)n_experts + 1) * sizeof(int32_t)) ||
        grow((void **)&c->rows, picks * sizeof(int32_t)) ||
        grow((void **)&c->row_w, picks * sizeof(float)))
        return dm_fail(DM_ERR_NOMEM, "routing: %zu picks", picks);
    c->cap_tokens = N;
    c->cap_picks = (int)picks;
    c->cap_experts = n_experts;
    return DM_OK;
}

void dm_route_csr_free(dm_route_csr *c)
{
    free(c->tok_off);
    free(c->ids);
    free(c->weights);
    free(c->exp_off);
    free(c->rows);
    free(c->row_w);
    memset(c, 0, sizeof *c);
}

/* ---- selection ----------------------------------------------------------------------------- */

/* order[E] = expert ids by descending score, ties to the lower id (insertion sort; E <= 16). */
static void sort_desc(const float *s, int E, int *order)
{
    for (int e = 0; e < E; e++) {
        int j = e;
        while (j > 0 && s[e] > s[order[j - 1]]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = e;
    }
}

/* How many of the sorted scores the policy keeps (>= 1). */
static int keep_count(const dm_route_policy *p, const float *s, const int *order, int E, int model_k)
{
    int n = 1;
    switch (p->kind) {
    case DM_POLICY_TOPK:
        n = p->k ? p->k : model_k;
        break;
    case DM_POLICY_TOPP: {
        double sum = 0;
        n = E;
        for (int j = 0; j < E; j++) {
            sum += s[order[j]];
            if (sum > (double)p->p) {
                n = j + 1;
                break;
            }
        }
        break;
    }
    case DM_POLICY_THRESHOLD:
        n = 0;
        while (n < E && s[order[n]] >= p->p) n++;
        if (n < 1) n = 1;
        break;
    case DM_POLICY_PROTO2:
        n = 1;
        if (E >= 2) {
            float c1 = s[order[0]], c2 = s[order[1]];
            if (c1 < p->p || (p->margin >= 0 && c1 - c2 < p->margin)) n = 2;
        }
        break;
    }
    if ((p->kind == DM_POLICY_TOPP || p->kind == DM_POLICY_THRESHOLD) && p->k && n > p->k) n = p->k;
    return n > E ? E : n;
}

/* Factor applied to kept weights: 1, or (top-model_k mass) / (kept mass) under renorm. */
static double renorm_scale(const dm_route_policy *p, const float *s, const int *order, int n, int model_k)
{
    if (!p->renorm) return 1.0;
    double kept = 0, ref = 0;
    for (int j = 0; j < n; j++) kept += s[order[j]];
    for (int j = 0; j < model_k; j++) ref += s[order[j]];
    return kept > 0 ? ref / kept : 1.0;
}

static void group_csr(dm_route_csr *c, int N);

/* tok_off/ids/weights filled with each token's picks at stride `slots`; compact and group. */
static void finish_csr(dm_route_csr *c, int N, int slots, const int32_t *count)
{
    int32_t at = 0;
    for (int n = 0; n < N; n++) { /* compaction: destination never passes the source */
        const int32_t src = (int32_t)n * slots;
        c->tok_off[n] = at;
        if (src != at) {
            memmove(c->ids + at, c->ids + src, (size_t)count[n] * sizeof(int32_t));
            memmove(c->weights + at, c->weights + src, (size_t)count[n] * sizeof(float));
        }
        at += count[n];
    }
    c->tok_off[N] = at;
    c->n_picks = at;
    group_csr(c, N);
}

/* exp_off / rows / row_w from tok_off / ids / weights. */
static void group_csr(dm_route_csr *c, int N)
{
    const int32_t at = c->n_picks;
    const int nE = c->n_experts;
    memset(c->exp_off, 0, ((size_t)nE + 1) * sizeof(int32_t));
    for (int32_t i = 0; i < at; i++) c->exp_off[c->ids[i] + 1]++;
    for (int e = 0; e < nE; e++) c->exp_off[e + 1] += c->exp_off[e];
    /* counting sort by expert, tokens ascending within each (rows' own array as cursor space) */
    int32_t cur[DM_ROUTE_MAX_E + 2]; /* n_experts <= E + 1 */
    memcpy(cur, c->exp_off, (size_t)nE * sizeof(int32_t));
    for (int n = 0; n < N; n++)
        for (int32_t i = c->tok_off[n]; i < c->tok_off[n + 1]; i++) {
            int32_t r = cur[c->ids[i]]++;
            c->rows[r] = n;
            c->row_w[r] = c->weights[i];
        }
}

void dm_route_select(const dm_route_policy *p, const float *scores, int N, int E, int model_k,
                     const uint8_t *uncond, int uncond_id, dm_route_csr *c)
{
    const int slots = dm_route_policy_max_picks(p, E, model_k);
    c->N = N;
    c->E = E;
    c->n_experts = uncond ? (uncond_id + 1 > E ? uncond_id + 1 : E) : E;
    /* per-token counts live in rows[] (cap >= N) until finish_csr has compacted the picks */
    int32_t *count = c->rows;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        int32_t *ids = c->ids + (size_t)n * slots;
        float *w = c->weights + (size_t)n * slots;
        if (uncond && uncond[n]) {
            ids[0] = uncond_id;
            w[0] = 1.0f;
            count[n] = 1;
            continue;
        }
        const float *s = scores + (size_t)n * E;
        int order[DM_ROUTE_MAX_E];
        sort_desc(s, E, order);
        int k = keep_count(p, s, order, E, model_k);
        double sc = renorm_scale(p, s, order, k, model_k);
        for (int j = 0; j < k; j++) {
            ids[j] = order[j];
            w[j] = p->renorm ? (float)(s[order[j]] * sc) : s[order[j]];
        }
        count[n] = k;
    }
    finish_csr(c, N, slots, count);
}

void dm_route_select_ref(const dm_route_policy *p, const float *scores, int N, int E, int model_k,
                         const uint8_t *uncond, int uncond_id, int kmax, int32_t *ids,
                         float *weights, int32_t *counts)
{
    for (int n = 0; n < N; n++) {
        int32_t *id = ids + (size_t)n * kmax;
        float *w = weights + (size_t)n * kmax;
        for (int j = 0; j < kmax; j++) id[j] = -1, w[j] = 0.0f;
        if (uncond && uncond[n]) {
            id[0] = uncond_id, w[0] = 1.0f, counts[n] = 1;
            continue;
        }
        const float *s = scores + (size_t)n * E;
        /* rank of e = experts that beat it (higher score, or equal score and lower id) */
        int by_rank[DM_ROUTE_MAX_E];
        for (int e = 0; e < E; e++) {
            int rank = 0;
            for (int f = 0; f < E; f++) rank += s[f] > s[e] || (s[f] == s[e] && f < e);
            by_rank[rank] = e;
        }
        int keep = 0;
        if (p->kind == DM_POLICY_TOPK) {
            keep = p->k ? p->k : model_k;
        } else if (p->kind == DM_POLICY_TOPP) {
            keep = E; /* the shortest prefix whose sum exceeds P */
            for (int len = 1; len <= E; len++) {
                double sum = 0;
                for (int j = 0; j < len; j++) sum += s[by_rank[j]];
                if (sum > (double)p->p) {
                    keep = len;
                    break;
                }
            }
        } else if (p->kind == DM_POLICY_THRESHOLD) {
            for (int e = 0; e < E; e++) keep += s[e] >= p->p;
            if (keep == 0) keep = 1;
        } else {
            keep = 1;
            if (E >= 2) {
                int below = s[by_rank[0]] < p->p;
                int close = p->margin >= 0 && s[by_rank[0]] - s[by_rank[1]] < p->margin;
                keep = below || close ? 2 : 1;
            }
        }
        if ((p->kind == DM_POLICY_TOPP || p->kind == DM_POLICY_THRESHOLD) && p->k && keep > p->k)
            keep = p->k;
        double kept = 0, top = 0;
        for (int j = 0; j < keep; j++) kept += s[by_rank[j]];
        for (int j = 0; j < model_k; j++) top += s[by_rank[j]];
        counts[n] = keep;
        for (int j = 0; j < keep && j < kmax; j++) {
            id[j] = by_rank[j];
            w[j] = p->renorm && kept > 0 ? (float)(s[by_rank[j]] * (top / kept)) : s[by_rank[j]];
        }
    }
}

void dm_route_csr_to_padded(const dm_route_csr *c, int kmax, int32_t *ids, float *weights)
{
    for (int n = 0; n < c->N; n++) {
        int32_t a = c->tok_off[n], cnt = c->tok_off[n + 1] - a;
        for (int j = 0; j < kmax; j++) {
            ids[(size_t)n * kmax + j] = j < cnt ? c->ids[a + j] : -1;
            if (weights) weights[(size_t)n * kmax + j] = j < cnt ? c->weights[a + j] : 0.0f;
        }
    }
}

void dm_route_csr_filter(const dm_route_csr *in, const uint8_t *keep_tok, dm_route_csr *out)
{
    out->N = in->N;
    out->E = in->E;
    out->n_experts = in->n_experts;
    int32_t at = 0;
    for (int n = 0; n < in->N; n++) {
        const int32_t a = in->tok_off[n], c = keep_tok[n] ? in->tok_off[n + 1] - a : 0;
        out->tok_off[n] = at;
        memcpy(out->ids + at, in->ids + a, (size_t)c * sizeof(int32_t));
        memcpy(out->weights + at, in->weights + a, (size_t)c * sizeof(float));
        at += c;
    }
    out->tok_off[in->N] = at;
    out->n_picks = at;
    /* regroup by expert: a stable pass over in's grouping keeps tokens ascending */
    int32_t r = 0;
    for (int e = 0; e < in->n_experts; e++) {
        out->exp_off[e] = r;
        for (int32_t i = in->exp_off[e]; i < in->exp_off[e + 1]; i++)
            if (keep_tok[in->rows[i]]) out->rows[r] = in->rows[i], out->row_w[r++] = in->row_w[i];
    }
    out->exp_off[in->n_experts] = r;
}

void dm_route_csr_mix(const dm_route_csr *a, const dm_route_csr *b, const uint8_t *use_b,
                      dm_route_csr *out)
{
    out->N = a->N;
    out->E = a->E;
    out->n_experts = a->n_experts > b->n_experts ? a->n_experts : b->n_experts;
    int32_t at = 0;
    for (int n = 0; n < a->N; n++) {
        const dm_route_csr *s = use_b[n] ? b : a;
        const int32_t o = s->tok_off[n], cnt = s->tok_off[n + 1] - o;
        out->tok_off[n] = at;
        memcpy(out->ids + at, s->ids + o, (size_t)cnt * sizeof(int32_t));
        memcpy(out->weights + at, s->weights + o, (size_t)cnt * sizeof(float));
        at += cnt;
    }
    out->tok_off[a->N] = at;
    out->n_picks = at;
    group_csr(out, a->N);
}

void dm_self_contrast_combine(const dm_self_contrast *sc, float cfg_scale, size_t n, const float *dc,
                              const float *du, const float *dw, float *out)
{
    const float w = sc->w;
    if (sc->replace_uncond) {
        for (size_t i = 0; i < n; i++) out[i] = dw[i] + w * (dc[i] - dw[i]);
    } else {
        for (size_t i = 0; i < n; i++)
            out[i] = du[i] + cfg_scale * (dc[i] - du[i]) + (w - 1.0f) * (dc[i] - dw[i]);
    }
}

/* ---- weak routing (self-contrast) ---------------------------------------------------------- */

int dm_weak_ranks(dm_weak_kind k, int E, int *ranks)
{
    int r = k == DM_WEAK_RANK2 ? 1 : k == DM_WEAK_RANK3 ? 2 : k == DM_WEAK_TOP1 ? 0 : -1;
    if (r < 0 || r >= E) return 0;
    ranks[0] = r;
    return 1;
}

void dm_route_select_weak(dm_weak_kind k, const float *scores, int N, int E, const uint8_t *uncond,
                          int uncond_id, dm_route_csr *c)
{
    int rank[2];
    const int nr = dm_weak_ranks(k, E, rank);
    c->N = N;
    c->E = E;
    c->n_experts = uncond ? (uncond_id + 1 > E ? uncond_id + 1 : E) : E;
    int32_t *count = c->rows; /* as in dm_route_select */
    for (int n = 0; n < N; n++) {
        count[n] = 0;
        if (uncond && uncond[n]) {
            c->ids[n] = uncond_id, c->weights[n] = 1.0f, count[n] = 1;
            continue;
        }
        if (!nr) continue;
        int order[DM_ROUTE_MAX_E];
        sort_desc(scores + (size_t)n * E, E, order);
        c->ids[n] = order[rank[0]];
        c->weights[n] = scores[(size_t)n * E + order[rank[0]]];
        count[n] = 1;
    }
    finish_csr(c, N, 1, count);
}

/* ---- --skip-routed ------------------------------------------------------------------------- */

dm_status dm_skip_routed_parse(const char *s, int depth, const int *moe_blocks, int n_moe,
                               dm_skip_routed *out)
{
    if (!s || !*s) return dm_fail(DM_ERR_ARG, "--skip-routed: empty value (LAYERS@T0-T1)");
    const char *p = s;
    while (*p) {
        const char *semi = strchr(p, ';');
        size_t len = semi ? (size_t)(semi - p) : strlen(p);
        const char *at = memchr(p, '@', len);
        if (!at) return dm_fail(DM_ERR_ARG, "--skip-routed %s: '%.*s' lacks '@' (LAYERS@T0-T1)", s, (int)len, p);
        if (out->n >= DM_SKIP_MAX_RULES)
            return dm_fail(DM_ERR_ARG, "--skip-routed %s: more than %d rules", s, DM_SKIP_MAX_RULES);
        dm_skip_rule *r = &out->rule[out->n];
        memset(r, 0, sizeof *r);
        size_t llen = (size_t)(at - p);
        if (llen == 3 && !memcmp(p, "all", 3)) {
            for (int i = 0; i < n_moe; i++) r->block[moe_blocks[i]] = 1;
        } else {
            const char *q = p;
            while (q < at) {
                const char *c = memchr(q, ',', (size_t)(at - q));
                size_t fl = c ? (size_t)(c - q) : (size_t)(at - q);
                int b;
                if (parse_int(q, fl, &b))
                    return dm_fail(DM_ERR_ARG, "--skip-routed %s: layer '%.*s' is not an integer", s, (int)fl, q);
                if (b < 0 || b >= depth)
                    return dm_fail(DM_ERR_ARG, "--skip-routed %s: layer %d does not exist (depth %d: 0..%d)",
                                   s, b, depth, depth - 1);
                int moe = 0;
                for (int i = 0; i < n_moe; i++) moe |= moe_blocks[i] == b;
                if (!moe) return dm_fail(DM_ERR_ARG, "--skip-routed %s: block %d has no routed experts", s, b);
                r->block[b] = 1;
                q += fl + (c ? 1 : 0);
                if (c && q == at) return dm_fail(DM_ERR_ARG, "--skip-routed %s: trailing ',' in the layers", s);
            }
            if (llen == 0) return dm_fail(DM_ERR_ARG, "--skip-routed %s: no layers before '@'", s);
        }
        const char *iv = at + 1, *end = p + len;
        const char *dash = iv < end ? memchr(iv + 1, '-', (size_t)(end - iv - 1)) : NULL;
        double t0, t1;
        if (!dash || parse_double(iv, (size_t)(dash - iv), &t0) ||
            parse_double(dash + 1, (size_t)(end - dash - 1), &t1))
            return dm_fail(DM_ERR_ARG, "--skip-routed %s: interval '%.*s' is not T0-T1", s,
                           (int)(end - iv), iv);
        if (!(t0 >= 0 && t1 <= 1 && t0 <= t1))
            return dm_fail(DM_ERR_ARG, "--skip-routed %s: interval %g-%g must satisfy 0 <= T0 <= T1 <= 1",
                           s, t0, t1);
        r->t0 = (float)t0;
        r->t1 = (float)t1;
        out->n++;
        p += len + (semi ? 1 : 0);
        if (semi && !*p) return dm_fail(DM_ERR_ARG, "--skip-routed %s: trailing ';'", s);
    }
    return DM_OK;
}

int dm_skip_routed_active(const dm_skip_routed *s, int block, float t01)
{
    if (!s || block < 0 || block >= DM_TRACE_MAX_LAYERS) return 0;
    for (int i = 0; i < s->n; i++)
        if (s->rule[i].block[block] && t01 >= s->rule[i].t0 && t01 <= s->rule[i].t1) return 1;
    return 0;
}

/* ---- --self-contrast ----------------------------------------------------------------------- */

dm_status dm_self_contrast_parse(const char *s, dm_self_contrast *out)
{
    dm_self_contrast c = {0, DM_WEAK_RANK2, 0};
    if (!s || !*s) return dm_fail(DM_ERR_ARG, "--self-contrast: empty value (W[,weak=rank2|rank3|top1|shared])");
    const char *rest = s, *f;
    size_t flen, klen;
    int first = 1;
    while (next_field(&rest, &f, &flen, &klen)) {
        const char *val = f + klen + 1;
        size_t vlen = klen < flen ? flen - klen - 1 : 0;
        if (first) {
            double w;
            first = 0;
            if (parse_double(f, flen, &w) || !(w > 0))
                return dm_fail(DM_ERR_ARG, "--self-contrast %s: W must be a number > 0", s);
            c.w = (float)w;
        } else if (key_is(f, klen, "weak") && klen < flen) {
            static const char *names[] = {"rank2", "rank3", "top1", "shared"};
            int k = -1;
            for (int i = 0; i < 4; i++)
                if (strlen(names[i]) == vlen && !memcmp(val, names[i], vlen)) k = i;
            if (k < 0)
                return dm_fail(DM_ERR_ARG, "--self-contrast %s: weak='%.*s' (rank2, rank3, top1, shared)",
                               s, (int)vlen, val);
            c.weak = (dm_weak_kind)k;
        } else if (key_is(f, klen, "mode") && klen < flen) {
            if (vlen == 7 && !memcmp(val, "replace", 7)) c.replace_uncond = 1;
            else if (vlen == 3 && !memcmp(val, "add", 3)) c.replace_uncond = 0;
            else return dm_fail(DM_ERR_ARG, "--self-contrast %s: mode='%.*s' (add, replace)", s, (int)vlen, val);
        } else {
            return dm_fail(DM_ERR_ARG, "--self-contrast %s: unexpected field '%.*s'", s, (int)flen, f);
        }
    }
    *out = c;
    return DM_OK;
}

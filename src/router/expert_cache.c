/* Expert-output cache across evaluations (router/expert_cache.h). */
#include "router/expert_cache.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct dm_expert_cache {
    dm_expert_cache_opts o;
    int layers, T, D, E, k, slots;
    int store_probs;      /* route/delta keep the probabilities the output was computed from */
    int64_t *key_image;   /* [slots] -1 = free */
    uint8_t *key_branch;  /* [slots] */
    int64_t *last_used;   /* [slots] evaluation counter of the last use */
    int64_t eval;         /* evaluations begun */
    int R;                /* rows of the current evaluation */
    int *row_slot;        /* [max_rows] entry of each row */
    uint8_t *valid;       /* [slots, layers, T] */
    int32_t *uses;        /* [slots, layers, T] evaluations served since computed (incl. that one) */
    float *out;           /* [slots, layers, T, D] routed outputs */
    float *probs;         /* [slots, layers, T, E] or NULL */
    size_t bytes;
    dm_expert_cache_stats st;
};

void dm_expert_cache_opts_init(dm_expert_cache_opts *o)
{
    memset(o, 0, sizeof *o);
    o->refresh = DM_CACHE_FIXED;
    o->max_bytes = (size_t)1 << 30;
}

dm_status dm_expert_cache_parse(const char *s, dm_expert_cache_opts *out)
{
    dm_expert_cache_opts o;
    dm_expert_cache_opts_init(&o);
    if (!s || !*s) return dm_fail(DM_ERR_ARG, "--expert-cache: empty value (K[,refresh=fixed|route|delta:EPS])");
    char buf[128];
    if (strlen(s) >= sizeof buf) return dm_fail(DM_ERR_ARG, "--expert-cache: value too long");
    strcpy(buf, s);
    char *save = NULL, *f = strtok_r(buf, ",", &save);
    char *end;
    errno = 0;
    long K = f ? strtol(f, &end, 10) : 0;
    if (!f || errno || *end || K < 1 || K > 1000000)
        return dm_fail(DM_ERR_ARG, "--expert-cache %s: K must be an integer >= 1", s);
    o.K = (int)K;
    while ((f = strtok_r(NULL, ",", &save))) {
        if (!strcmp(f, "refresh=fixed")) {
            o.refresh = DM_CACHE_FIXED;
        } else if (!strcmp(f, "refresh=route")) {
            o.refresh = DM_CACHE_ROUTE;
        } else if (!strncmp(f, "refresh=delta:", 14)) {
            errno = 0;
            double e = strtod(f + 14, &end);
            if (errno || *end || end == f + 14 || !(e >= 0 && e <= 2))
                return dm_fail(DM_ERR_ARG, "--expert-cache %s: delta:EPS needs EPS in [0, 2]", s);
            o.refresh = DM_CACHE_DELTA;
            o.eps = (float)e;
        } else if (!strncmp(f, "mem=", 4)) {
            errno = 0;
            long mb = strtol(f + 4, &end, 10);
            if (errno || *end || end == f + 4 || mb < 1 || mb > (1L << 24))
                return dm_fail(DM_ERR_ARG, "--expert-cache %s: mem=MiB needs an integer >= 1", s);
            o.max_bytes = (size_t)mb << 20;
        } else if (!strcmp(f, "ffn")) {
            o.whole = 1;
        } else if (!strncmp(f, "refresh=", 8)) {
            return dm_fail(DM_ERR_ARG, "--expert-cache %s: refresh='%s' (fixed, route, delta:EPS)", s, f + 8);
        } else {
            return dm_fail(DM_ERR_ARG, "--expert-cache %s: unexpected field '%s'", s, f);
        }
    }
    *out = o;
    return DM_OK;
}

void dm_expert_cache_str(const dm_expert_cache_opts *o, char *buf, size_t n)
{
    if (!o->K) {
        snprintf(buf, n, "off");
        return;
    }
    char eps[32] = "";
    for (int digits = 6; digits <= 9; digits++) { /* the shortest form that reads back */
        snprintf(eps, sizeof eps, "%.*g", digits, (double)o->eps);
        if (strtof(eps, NULL) == o->eps) break;
    }
    snprintf(buf, n, "%d,refresh=%s%s%s", o->K,
             o->refresh == DM_CACHE_DELTA ? "delta:" : o->refresh == DM_CACHE_ROUTE ? "route" : "fixed",
             o->refresh == DM_CACHE_DELTA ? eps : "", o->whole ? ",ffn" : "");
}

dm_status dm_expert_cache_create(const dm_expert_cache_opts *o, int layers, int T, int D, int E,
                                 int model_k, int max_rows, dm_expert_cache **out)
{
    *out = NULL;
    if (o->K < 1 || layers < 1 || T < 1 || D < 1 || E < 1 || E > 64 || model_k < 1 || model_k > E ||
        max_rows < 1)
        return dm_fail(DM_ERR_ARG, "expert cache: K %d, layers %d, T %d, D %d, E %d, k %d, rows %d",
                       o->K, layers, T, D, E, model_k, max_rows);
    dm_expert_cache *c = calloc(1, sizeof *c);
    if (!c) return dm_fail(DM_ERR_NOMEM, "expert cache");
    c->o = *o;
    c->layers = layers, c->T = T, c->D = D, c->E = E, c->k = model_k;
    c->slots = o->K > 1 ? max_rows : 0; /* K = 1: always recompute, nothing stored */
    c->store_probs = o->refresh != DM_CACHE_FIXED;
    const size_t cells = (size_t)c->slots * layers * T;
    const size_t need = cells * ((size_t)D * sizeof(float) + (c->store_probs ? (size_t)E * sizeof(float) : 0) +
                                 sizeof(uint8_t) + sizeof(int32_t)) +
                        (size_t)c->slots * (sizeof(int64_t) * 2 + 1) + (size_t)max_rows * sizeof(int);
    if (need > o->max_bytes) {
        free(c);
        return dm_fail(DM_ERR_ARG, "--expert-cache: needs %.1f MiB for %d rows x %d layers x %d tokens "
                       "(bound %.1f MiB; raise mem= or lower the batch)", need / 1048576.0, max_rows,
                       layers, T, o->max_bytes / 1048576.0);
    }
    c->row_slot = calloc((size_t)max_rows, sizeof(int));
    c->key_image = malloc((size_t)(c->slots ? c->slots : 1) * sizeof(int64_t));
    c->key_branch = calloc((size_t)(c->slots ? c->slots : 1), 1);
    c->last_used = calloc((size_t)(c->slots ? c->slots : 1), sizeof(int64_t));
    c->valid = calloc(cells ? cells : 1, 1);
    c->uses = calloc(cells ? cells : 1, sizeof(int32_t));
    c->out = malloc((cells ? cells : 1) * D * sizeof(float));
    c->probs = c->store_probs ? malloc((cells ? cells : 1) * E * sizeof(float)) : NULL;
    if (!c->row_slot || !c->key_image || !c->key_branch || !c->last_used || !c->valid || !c->uses ||
        !c->out || (c->store_probs && !c->probs)) {
        dm_expert_cache_free(c);
        return dm_fail(DM_ERR_NOMEM, "expert cache: %.1f MiB", need / 1048576.0);
    }
    c->bytes = c->slots ? need : (size_t)max_rows * sizeof(int);
    c->R = 0;
    dm_expert_cache_reset(c);
    *out = c;
    return DM_OK;
}

void dm_expert_cache_free(dm_expert_cache *c)
{
    if (!c) return;
    free(c->row_slot);
    free(c->key_image);
    free(c->key_branch);
    free(c->last_used);
    free(c->valid);
    free(c->uses);
    free(c->out);
    free(c->probs);
    free(c);
}

size_t dm_expert_cache_bytes(const dm_expert_cache *c) { return c ? c->bytes : 0; }

void dm_expert_cache_reset(dm_expert_cache *c)
{
    for (int s = 0; s < c->slots; s++) c->key_image[s] = -1, c->last_used[s] = -1;
    memset(c->valid, 0, (size_t)c->slots * c->layers * c->T);
    c->eval = 0;
}

dm_status dm_expert_cache_begin(dm_expert_cache *c, int R, const int64_t *image, const uint8_t *branch)
{
    int max_rows = c->slots ? c->slots : R; /* K = 1 keeps no entries */
    if (R < 1 || (c->slots && R > max_rows))
        return dm_fail(DM_ERR_ARG, "expert cache: %d rows in one evaluation (room for %d)", R, max_rows);
    c->eval++;
    c->R = R;
    if (!c->slots) return DM_OK;
    for (int r = 0; r < R; r++) {
        if (image[r] < 0 || branch[r] > 3)
            return dm_fail(DM_ERR_ARG, "expert cache: row %d has image %lld branch %d", r,
                           (long long)image[r], branch[r]);
        for (int q = 0; q < r; q++)
            if (image[q] == image[r] && branch[q] == branch[r])
                return dm_fail(DM_ERR_ARG, "expert cache: rows %d and %d share image %lld branch %d",
                               q, r, (long long)image[r], branch[r]);
    }
    for (int r = 0; r < R; r++) { /* keys already held */
        c->row_slot[r] = -1;
        for (int s = 0; s < c->slots; s++)
            if (c->key_image[s] == image[r] && c->key_branch[s] == branch[r]) {
                c->row_slot[r] = s;
                c->last_used[s] = c->eval;
                break;
            }
    }
    for (int r = 0; r < R; r++) { /* new keys: a free entry, else the least recently used */
        if (c->row_slot[r] >= 0) continue;
        int best = -1;
        for (int s = 0; s < c->slots; s++) {
            if (c->last_used[s] == c->eval) continue;
            if (best < 0 || c->last_used[s] < c->last_used[best]) best = s;
        }
        if (c->key_image[best] >= 0) c->st.evictions++;
        c->key_image[best] = image[r];
        c->key_branch[best] = branch[r];
        c->last_used[best] = c->eval;
        memset(c->valid + (size_t)best * c->layers * c->T, 0, (size_t)c->layers * c->T);
        c->row_slot[r] = best;
    }
    return DM_OK;
}

/* Top-k set of p[E] as a bit mask (E <= 64; ties to the lower id, as router/moe.c). */
static uint64_t topk_mask(const float *p, int E, int k)
{
    uint64_t m = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!(m >> e & 1u) && (best < 0 || p[e] > p[best])) best = e;
        m |= 1ull << best;
    }
    return m;
}

int dm_expert_cache_decide(dm_expert_cache *c, int layer, const float *probs, uint8_t *recompute)
{
    const int T = c->T, E = c->E, n = c->R * T;
    if (!c->slots) {
        memset(recompute, 1, (size_t)n);
        return n;
    }
    int count = 0;
    for (int i = 0; i < n; i++) {
        const int r = i / T, t = i % T;
        const size_t cell = ((size_t)c->row_slot[r] * c->layers + layer) * T + t;
        int re = !c->valid[cell] || c->uses[cell] >= c->o.K;
        if (!re && probs && c->store_probs) {
            const float *now = probs + (size_t)i * E, *then = c->probs + cell * E;
            if (c->o.refresh == DM_CACHE_ROUTE) {
                re = topk_mask(now, E, c->k) != topk_mask(then, E, c->k);
            } else if (c->o.refresh == DM_CACHE_DELTA) {
                double d = 0;
                for (int e = 0; e < E; e++) d += fabs((double)now[e] - then[e]);
                re = d > c->o.eps;
            }
        } else if (!re && c->store_probs && !probs) {
            re = 1; /* an adaptive rule without probabilities cannot vouch for the entry */
        }
        recompute[i] = (uint8_t)re;
        count += re;
    }
    return count;
}

void dm_expert_cache_update(dm_expert_cache *c, int layer, const float *probs,
                            const uint8_t *recompute, float *routed)
{
    const int T = c->T, D = c->D, E = c->E, n = c->R * T;
    for (int i = 0; i < n; i++) {
        if (!c->slots) {
            c->st.computed += recompute[i] != DM_CACHE_LEAVE;
            continue;
        }
        if (recompute[i] == DM_CACHE_LEAVE) continue; /* neither stored nor served */
        const int r = i / T, t = i % T;
        const size_t cell = ((size_t)c->row_slot[r] * c->layers + layer) * T + t;
        float *o = c->out + cell * D, *x = routed + (size_t)i * D;
        if (recompute[i]) {
            memcpy(o, x, (size_t)D * sizeof(float));
            if (c->store_probs && probs) memcpy(c->probs + cell * E, probs + (size_t)i * E, (size_t)E * sizeof(float));
            c->valid[cell] = 1;
            c->uses[cell] = 1;
            c->st.computed++;
        } else {
            memcpy(x, o, (size_t)D * sizeof(float));
            c->uses[cell]++;
            c->st.reused++;
        }
    }
}

void dm_expert_cache_get_stats(const dm_expert_cache *c, dm_expert_cache_stats *s) { *s = c->st; }

/* MoE lab options of a model (docs/moe-lab.md §7): parsing and checking the run-time options
 * against the model, the expert cache's lifetime, and the split MoE layer the forward calls
 * instead of the backend's fused `ffn` op when any option is on. */
#include "dit/model.h"
#include "router/moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                     \
    do {                              \
        dm_status st_ = (call);       \
        if (st_ != DM_OK) return st_; \
    } while (0)

void dm_lab_opts_init(dm_lab_opts *o) { memset(o, 0, sizeof *o); }

static int has_text(const char *s) { return s && *s; }

static void lab_free_state(dm_lab *L)
{
    dm_expert_cache_free(L->cache);
    dm_route_csr_free(&L->csr);
    dm_route_csr_free(&L->weak);
    dm_route_csr_free(&L->mix);
    dm_route_csr_free(&L->comp);
    free(L->scores);
    free(L->pscores);
    free(L->routed);
    free(L->uncond);
    free(L->is_weak);
    free(L->keep);
    free(L->recompute);
    free(L->drop);
    memset(L, 0, sizeof *L);
}

void dm_model_lab_free(dm_model *m)
{
    if (m) lab_free_state(&m->lab);
}

/* The first MoE layer's routing kind (all MoE layers of a model share it). */
static dm_route_kind moe_kind(const dm_model *m)
{
    for (int l = 0; l < m->cfg.depth; l++)
        if (m->blocks[l].is_moe) return m->blocks[l].ffn.d.kind;
    return DM_ROUTE_DENSE;
}

/* The split MoE ops of the backend (cpu and cuda have them); one line naming the backend. */
static dm_status require_split(const dm_model *m)
{
    const dm_backend *be = m->be;
    if (!dm_backend_has(be, "router_scores") || !dm_backend_has(be, "moe_grouped") ||
        !dm_backend_has(be, "mlp_add"))
        return dm_fail(DM_ERR_BACKEND, "backend %s has no split MoE ops (router_scores, "
                       "moe_grouped, mlp_add): --route/--skip-routed/--expert-cache/"
                       "--self-contrast need --backend cpu or cuda", be->ops->name);
    return DM_OK;
}

dm_status dm_model_set_lab(dm_model *m, const dm_lab_opts *o)
{
    lab_free_state(&m->lab);
    dm_lab *L = &m->lab;
    dm_route_policy_init(&L->policy);
    const dm_config *c = &m->cfg;
    L->slots = c->top_k;
    snprintf(L->route_s, sizeof L->route_s, "top-k");
    if (!o) return DM_OK;
    dm_lab nl = {0};
    dm_route_policy_init(&nl.policy);
    dm_expert_cache_opts_init(&nl.cache_opts);
    const dm_route_kind kind = moe_kind(m);
    const int prob = kind == DM_ROUTE_SOFTMAX_TOPK;
    dm_status st;
    if (has_text(o->route)) {
        if ((st = dm_route_policy_parse(o->route, &nl.policy))) return st;
        if ((st = dm_route_policy_check(&nl.policy, prob, c->num_experts, c->top_k))) return st;
    }
    if (has_text(o->skip_routed)) {
        int blocks[DM_TRACE_MAX_LAYERS], n = 0;
        for (int l = 0; l < c->depth && n < DM_TRACE_MAX_LAYERS; l++)
            if (m->blocks[l].is_moe) blocks[n++] = l;
        if ((st = dm_skip_routed_parse(o->skip_routed, c->depth, blocks, n, &nl.skip))) return st;
    }
    if (has_text(o->expert_cache) && (st = dm_expert_cache_parse(o->expert_cache, &nl.cache_opts)))
        return st;
    const int topk_default = nl.policy.kind == DM_POLICY_TOPK &&
                             (nl.policy.k == 0 || nl.policy.k == c->top_k);
    nl.on = !topk_default || nl.skip.n > 0 || nl.cache_opts.K > 0;
    if (nl.on && kind == DM_ROUTE_PROTO_EC)
        return dm_fail(DM_ERR_ARG, "%s: ProMoE expert-choice routing takes only --route top-k "
                       "(no other policy, --skip-routed or --expert-cache)", m->path);
    if (nl.on) TRY(require_split(m));
    dm_route_policy_str(&nl.policy, nl.route_s, sizeof nl.route_s);
    if (topk_default) snprintf(nl.route_s, sizeof nl.route_s, "top-k");
    if (has_text(o->skip_routed)) snprintf(nl.skip_s, sizeof nl.skip_s, "%s", o->skip_routed);
    if (nl.cache_opts.K > 0) dm_expert_cache_str(&nl.cache_opts, nl.cache_s, sizeof nl.cache_s);
    nl.slots = dm_route_policy_max_picks(&nl.policy, c->num_experts, c->top_k);
    if (nl.slots < c->top_k) nl.slots = c->top_k; /* records keep the model's k slots at least */
    *L = nl;
    return DM_OK;
}

const char *dm_model_lab_string(const dm_model *m, const char *key)
{
    const dm_lab *L = &m->lab;
    if (!strcmp(key, "route")) return L->route_s[0] ? L->route_s : "top-k";
    if (!strcmp(key, "skip_routed")) return L->skip_s;
    if (!strcmp(key, "expert_cache")) return L->cache_s;
    return "";
}

int dm_model_route_slots(const dm_model *m) { return m->lab.slots > 0 ? m->lab.slots : m->cfg.top_k; }

dm_status dm_model_lab_begin(dm_model *m, int max_rows)
{
    dm_lab *L = &m->lab;
    if (L->cache_opts.K < 1) return DM_OK;
    if (L->cache && L->cache_rows >= max_rows) {
        dm_expert_cache_reset(L->cache);
        return DM_OK;
    }
    if (L->cache) {
        dm_expert_cache_stats s;
        dm_expert_cache_get_stats(L->cache, &s);
        L->st_computed += s.computed;
        L->st_reused += s.reused;
        dm_expert_cache_free(L->cache);
        L->cache = NULL;
    }
    const dm_config *c = &m->cfg;
    TRY(dm_expert_cache_create(&L->cache_opts, dm_config_moe_layers(c), m->T, c->hidden,
                               c->num_experts, c->top_k, max_rows, &L->cache));
    L->cache_rows = max_rows;
    dm_log(DM_LOG_VERBOSE, "expert cache %s: %.2f MiB for %d rows x %d layers x %d tokens",
           L->cache_s, dm_expert_cache_bytes(L->cache) / 1048576.0, max_rows,
           dm_config_moe_layers(c), m->T);
    return DM_OK;
}

void dm_model_lab_stats(const dm_model *m, int64_t *computed, int64_t *reused, size_t *bytes)
{
    const dm_lab *L = &m->lab;
    dm_expert_cache_stats s = {0};
    if (L->cache) dm_expert_cache_get_stats(L->cache, &s);
    if (computed) *computed = L->st_computed + s.computed;
    if (reused) *reused = L->st_reused + s.reused;
    if (bytes) *bytes = L->cache ? dm_expert_cache_bytes(L->cache) : 0;
}

static dm_status reserve(dm_model *m, int N)
{
    dm_lab *L = &m->lab;
    const dm_config *c = &m->cfg;
    const int E = c->num_experts, nE = E + 1;
    const int K = dm_model_route_slots(m);
    TRY(dm_route_csr_reserve(&L->csr, N, K, nE));
    TRY(dm_route_csr_reserve(&L->weak, N, K, nE));
    TRY(dm_route_csr_reserve(&L->mix, N, K, nE));
    TRY(dm_route_csr_reserve(&L->comp, N, K, nE));
    if (N <= L->cap_N) return DM_OK;
    free(L->scores), free(L->pscores), free(L->routed), free(L->uncond), free(L->is_weak), free(L->keep),
        free(L->recompute);
    L->scores = malloc((size_t)N * E * sizeof(float));
    L->pscores = malloc((size_t)N * E * sizeof(float));
    L->routed = malloc((size_t)N * c->hidden * sizeof(float));
    L->uncond = malloc((size_t)N);
    L->is_weak = malloc((size_t)N);
    L->keep = malloc((size_t)N);
    L->recompute = malloc((size_t)N);
    L->cap_N = N;
    if (!L->scores || !L->pscores || !L->routed || !L->uncond || !L->is_weak || !L->keep || !L->recompute) {
        L->cap_N = 0;
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory for the routing of %d tokens", m->path, N);
    }
    return DM_OK;
}

dm_status dm_lab_set_drop(dm_model *m, int layer, const uint8_t *drop)
{
    dm_lab *L = &m->lab;
    const int E = m->cfg.num_experts, Lm = dm_config_moe_layers(&m->cfg);
    if (layer < 0 || layer >= Lm)
        return dm_fail(DM_ERR_ARG, "%s: MoE layer %d does not exist (0..%d)", m->path, layer, Lm - 1);
    if (!L->drop) {
        L->drop = calloc((size_t)Lm * E, 1);
        if (!L->drop) return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    int kept = 0;
    for (int e = 0; e < E; e++) {
        L->drop[(size_t)layer * E + e] = (uint8_t)(drop && drop[e]);
        kept += !(drop && drop[e]);
    }
    if (kept < m->cfg.top_k)
        return dm_fail(DM_ERR_ARG, "%s: layer %d keeps %d experts, fewer than k = %d", m->path,
                       layer, kept, m->cfg.top_k);
    if (m->lab.slots < 1) m->lab.slots = m->cfg.top_k;
    L->on = 1;
    return DM_OK;
}

int dm_lab_wants_split(const dm_model *m, const dm_forward_rows *rows, int B)
{
    if (m->lab.on) return 1;
    if (rows && rows->branch)
        for (int b = 0; b < B; b++)
            if (rows->branch[b] == DM_BRANCH_WEAK) return 1;
    return 0;
}

dm_status dm_lab_begin_eval(dm_model *m, int B, const dm_forward_rows *rows, int *use_cache)
{
    dm_lab *L = &m->lab;
    *use_cache = 0;
    if (!L->cache || !rows || !rows->image) return DM_OK;
    uint8_t br[256], *bp = br;
    uint8_t *heap = NULL;
    if (B > (int)sizeof br) {
        heap = malloc((size_t)B);
        if (!heap) return dm_fail(DM_ERR_NOMEM, "out of memory");
        bp = heap;
    }
    for (int b = 0; b < B; b++) bp[b] = rows->branch ? rows->branch[b] : 0;
    dm_status st = dm_expert_cache_begin(L->cache, B, rows->image, bp);
    free(heap);
    if (st == DM_OK) *use_cache = 1;
    return st;
}

/* The MoE layer in its parts (see the file comment): out [N, D] backend memory. */
dm_status dm_lab_moe(dm_model *m, const dm_block_w *bw, int block, int moe_layer, int B,
                     const int64_t *y, const dm_forward_rows *rows, int use_cache,
                     const float *h, float *out, dm_routes *routes)
{
    const dm_backend_ops *op = m->be->ops;
    void *ctx = m->be->ctx;
    const dm_ffn_layer *F = &bw->ffn;
    const dm_moe_desc *d = &F->d;
    const dm_config *c = &m->cfg;
    dm_lab *L = &m->lab;
    const int T = m->T, N = B * T, E = d->E, D = d->D;
    if (d->kind == DM_ROUTE_PROTO_EC)
        return dm_fail(DM_ERR_ARG, "%s: ProMoE expert choice has no weak or run-time routing",
                       m->path);
    TRY(require_split(m)); /* weak rows (--self-contrast) reach here without a lab option */
    TRY(reserve(m, N));
    /* per-layer expert counts (a model pruned in some layers only): E <= Emax, the cache and
     * the drop table use the model-wide stride Emax */
    const int Emax = c->num_experts;
    TRY(op->router_scores(ctx, F, h, N, L->drop ? L->drop + (size_t)moe_layer * Emax : NULL,
                          L->scores));
    const float *cprobs = L->scores; /* [N, Emax] for the cache: zero padded when E < Emax */
    if (use_cache && E < Emax) {
        for (int n = 0; n < N; n++) {
            memcpy(L->pscores + (size_t)n * Emax, L->scores + (size_t)n * E, (size_t)E * sizeof(float));
            memset(L->pscores + (size_t)n * Emax + E, 0, (size_t)(Emax - E) * sizeof(float));
        }
        cprobs = L->pscores;
    }
    int any_weak = 0;
    for (int n = 0; n < N; n++) {
        L->uncond[n] = (uint8_t)dm_moe_is_uncond(d, y, c->num_classes, n, T);
        L->is_weak[n] = rows && rows->branch && rows->branch[n / T] == DM_BRANCH_WEAK;
        any_weak |= L->is_weak[n];
    }
    /* ProMoE: null-class tokens go to the unconditional expert E whatever the policy */
    const uint8_t *unc = d->n_experts > E ? L->uncond : NULL;
    dm_route_select(&L->policy, L->scores, N, E, c->top_k, unc, E, &L->csr);
    const dm_route_csr *rec = &L->csr;
    if (any_weak) {
        dm_route_select_weak(rows->weak, L->scores, N, E, unc, E, &L->weak);
        dm_route_csr_mix(&L->csr, &L->weak, L->is_weak, &L->mix);
        rec = &L->mix;
    }
    const int k = dm_model_route_slots(m);
    if (routes && routes->ids) {
        const size_t at = (size_t)moe_layer * N * k;
        dm_route_csr_to_padded(rec, k, routes->ids + at, routes->weights ? routes->weights + at : NULL);
    }
    /* tokens whose routed part is computed now */
    int any_skip = 0;
    uint8_t *fl = rows && rows->token_flags ? rows->token_flags + (size_t)moe_layer * N : NULL;
    for (int n = 0; n < N; n++) {
        const int skip = rows && rows->t01 && L->skip.n > 0 &&
                         dm_skip_routed_active(&L->skip, block, rows->t01[n / T]);
        L->keep[n] = (uint8_t)!skip;
        any_skip |= skip;
        if (fl && skip) fl[n] |= (uint8_t)DM_TRACE_TOK_SKIPPED;
    }
    int ncomp = N;
    const int whole = use_cache && L->cache_opts.whole; /* the cache holds routed + shared */
    if (use_cache) { /* skipped tokens: left alone by the cache (DM_CACHE_LEAVE) */
        ncomp = dm_expert_cache_decide(L->cache, moe_layer, cprobs, L->recompute);
        for (int n = 0; n < N; n++) {
            if (!L->keep[n]) L->recompute[n] = DM_CACHE_LEAVE;
            L->keep[n] = L->recompute[n] == 1; /* computed now */
        }
    }
    const dm_route_csr *cv = rec;
    if (use_cache || any_skip) { /* the compute view: picks of the tokens computed now */
        dm_route_csr_filter(rec, L->keep, &L->comp);
        cv = &L->comp;
    }
    TRY(op->moe_grouped(ctx, F, h, N, cv->exp_off, cv->rows, cv->row_w, out));
    /* ",ffn": the shared expert before the cache (skipped when every token is served) */
    if (whole && F->shared.F > 0 && (ncomp > 0 || any_skip))
        TRY(op->mlp_add(ctx, &F->shared, h, N, out));
    if (use_cache) {
        TRY(op->download(ctx, L->routed, out, (size_t)N * D * sizeof(float)));
        dm_expert_cache_update(L->cache, moe_layer, cprobs, L->recompute, L->routed);
        TRY(op->upload(ctx, out, L->routed, (size_t)N * D * sizeof(float)));
        if (fl)
            for (int n = 0; n < N; n++)
                fl[n] |= (uint8_t)(L->recompute[n] == 0 ? DM_TRACE_TOK_CACHED : 0);
    }
    if (F->shared.F > 0 && !whole) TRY(op->mlp_add(ctx, &F->shared, h, N, out));
    return DM_OK;
}

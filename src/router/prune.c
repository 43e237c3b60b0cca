/* Expert pruning: STUN-style clustering, exhaustive search, and the model rewrite as data
 * (router/prune.h). */
#include "router/prune.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dm_prune_distance(int E, const int64_t *coact, const float *router, int D, double lambda,
                       double *dist)
{
    double mc = 0, mr = 0;
    int pairs = 0;
    for (int i = 0; i < E; i++)
        for (int j = i + 1; j < E; j++, pairs++) {
            mc += (double)coact[(size_t)i * E + j];
            if (router) {
                double s = 0;
                for (int d = 0; d < D; d++) {
                    double x = (double)router[(size_t)i * D + d] - router[(size_t)j * D + d];
                    s += x * x;
                }
                mr += sqrt(s);
            }
        }
    mc = pairs ? mc / pairs : 0;
    mr = pairs ? mr / pairs : 0;
    for (int i = 0; i < E; i++)
        for (int j = 0; j < E; j++) {
            if (i == j) {
                dist[(size_t)i * E + j] = 0;
                continue;
            }
            /* symmetric: count both directions the same way */
            double c = 0.5 * ((double)coact[(size_t)i * E + j] + coact[(size_t)j * E + i]);
            double v = mc > 0 ? -c / mc : 0;
            if (router && lambda != 0 && mr > 0) {
                double s = 0;
                for (int d = 0; d < D; d++) {
                    double x = (double)router[(size_t)i * D + d] - router[(size_t)j * D + d];
                    s += x * x;
                }
                v += lambda * sqrt(s) / mr;
            }
            dist[(size_t)i * E + j] = v;
        }
}

void dm_prune_cluster(int E, const double *dist, int keep, int *cluster)
{
    int lab[DM_PRUNE_MAX_E]; /* cluster of each item, named by its smallest member */
    for (int e = 0; e < E; e++) lab[e] = e;
    int n = E;
    while (n > keep && n > 1) {
        int ba = -1, bb = -1;
        double best = 0;
        for (int a = 0; a < E; a++) {
            if (lab[a] != a) continue;
            for (int b = a + 1; b < E; b++) {
                if (lab[b] != b) continue;
                double link = -INFINITY; /* complete linkage: the farthest pair */
                for (int i = 0; i < E; i++)
                    for (int j = 0; j < E; j++)
                        if (lab[i] == a && lab[j] == b && dist[(size_t)i * E + j] > link)
                            link = dist[(size_t)i * E + j];
                if (ba < 0 || link < best) best = link, ba = a, bb = b;
            }
        }
        for (int e = 0; e < E; e++)
            if (lab[e] == bb) lab[e] = ba;
        n--;
    }
    int id = 0, map[DM_PRUNE_MAX_E];
    for (int e = 0; e < E; e++) map[e] = -1;
    for (int e = 0; e < E; e++) {
        if (map[lab[e]] < 0) map[lab[e]] = id++;
        cluster[e] = map[lab[e]];
    }
}

void dm_prune_representatives(int E, const int *cluster, int keep, const float *const *weights,
                              size_t n, const double *mass, int *kept)
{
    double *cent = weights ? malloc(n * sizeof(double)) : NULL;
    int nk = 0;
    for (int c = 0; c < keep; c++) {
        int best = -1;
        double bv = 0;
        if (cent) {
            int m = 0;
            memset(cent, 0, n * sizeof(double));
            for (int e = 0; e < E; e++)
                if (cluster[e] == c) {
                    m++;
                    for (size_t i = 0; i < n; i++) cent[i] += weights[e][i];
                }
            for (size_t i = 0; i < n && m; i++) cent[i] /= m;
        }
        for (int e = 0; e < E; e++) {
            if (cluster[e] != c) continue;
            double v;
            if (cent) {
                v = 0;
                for (size_t i = 0; i < n; i++) {
                    double x = weights[e][i] - cent[i];
                    v += x * x;
                }
                v = -v; /* closest = largest -distance */
            } else {
                v = mass ? mass[e] : 0;
            }
            /* a 2-member cluster has both members equally far from its centroid: break such
             * ties (relative 1e-9) by the larger gate mass, then the lower id */
            const double tol = cent ? 1e-9 * (fabs(bv) + fabs(v)) : 0;
            if (best < 0 || v > bv + tol ||
                (cent && fabs(v - bv) <= tol && mass && mass[e] > mass[best]))
                best = e, bv = v;
        }
        if (best >= 0) kept[nk++] = best;
    }
    free(cent);
    for (int i = 1; i < nk; i++) /* ascending */
        for (int j = i; j > 0 && kept[j] < kept[j - 1]; j--) {
            int x = kept[j];
            kept[j] = kept[j - 1], kept[j - 1] = x;
        }
}

dm_status dm_prune_stun(int E, const int64_t *coact, const float *router, int D, double lambda,
                        const float *const *weights, size_t n, const double *mass, int keep,
                        int *kept, int *cluster)
{
    if (E < 1 || E > DM_PRUNE_MAX_E || keep < 1 || keep > E)
        return dm_fail(DM_ERR_ARG, "STUN: keep %d of %d experts (at most %d)", keep, E, DM_PRUNE_MAX_E);
    double *dist = malloc((size_t)E * E * sizeof(double));
    if (!dist) return dm_fail(DM_ERR_NOMEM, "STUN: distance");
    int cl[DM_PRUNE_MAX_E];
    dm_prune_distance(E, coact, router, D, lambda, dist);
    dm_prune_cluster(E, dist, keep, cl);
    dm_prune_representatives(E, cl, keep, weights, n, mass, kept);
    free(dist);
    if (cluster) memcpy(cluster, cl, (size_t)E * sizeof(int));
    return DM_OK;
}

/* Sum of the k largest p[e] with mask[e] (mask NULL = all). */
static double topk_sum(const float *p, int E, int k, const uint8_t *mask)
{
    uint64_t used = 0;
    double s = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if ((!mask || mask[e]) && !(used >> e & 1) && (best < 0 || p[e] > p[best])) best = e;
        if (best < 0) break;
        used |= 1ull << best;
        s += p[best];
    }
    return s;
}

double dm_prune_lost_mass(const float *probs, int64_t M, int E, int k, const uint8_t *mask)
{
    double lost = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *p = probs + (size_t)m * E;
        lost += topk_sum(p, E, k, NULL) - topk_sum(p, E, k, mask);
    }
    return M ? lost / M : 0;
}

double dm_prune_exhaustive(const float *probs, int64_t M, int E, int k, int keep, int *kept)
{
    int c[DM_PRUNE_MAX_E];
    for (int i = 0; i < keep; i++) c[i] = i;
    double best = INFINITY;
    for (;;) {
        uint8_t mask[DM_PRUNE_MAX_E] = {0};
        for (int i = 0; i < keep; i++) mask[c[i]] = 1;
        double v = dm_prune_lost_mass(probs, M, E, k, mask);
        if (v < best) {
            best = v;
            memcpy(kept, c, (size_t)keep * sizeof(int));
        }
        int i = keep - 1; /* next combination in lexicographic order */
        while (i >= 0 && c[i] == E - keep + i) i--;
        if (i < 0) break;
        c[i]++;
        for (int j = i + 1; j < keep; j++) c[j] = c[j - 1] + 1;
    }
    return best;
}

/* ---- rewrite ---------------------------------------------------------------------------------- */

/* Transformer block of MoE layer l: every block (DiT-MoE), the odd ones (ProMoE). */
static int moe_block(const dm_config *cfg, int l) { return cfg->moe_interleave ? 2 * l + 1 : l; }

static dm_status check_plan(const dm_config *cfg, const dm_prune_plan *p, const char *path)
{
    const int promoe = cfg->arch == DM_ARCH_PROMOE;
    if (cfg->arch != DM_ARCH_DITMOE && !promoe)
        return dm_fail(DM_ERR_ARG, "%s: pruning needs a DiT-MoE or ProMoE model", path);
    if (promoe && cfg->promoe_ec)
        return dm_fail(DM_ERR_ARG, "%s: ProMoE expert choice is not pruned (its capacity depends on "
                       "the expert count, so dropping prototypes is not the original with their "
                       "scores at -inf); token choice is", path);
    if (p->E != cfg->num_experts || p->layers != dm_config_moe_layers(cfg) || p->E > DM_PRUNE_MAX_E)
        return dm_fail(DM_ERR_ARG, "%s: prune plan for %d experts x %d layers, model has %d x %d",
                       path, p->E, p->layers, cfg->num_experts, dm_config_moe_layers(cfg));
    for (int l = 0; l < p->layers; l++) {
        if (p->block[l] != moe_block(cfg, l))
            return dm_fail(DM_ERR_ARG, "%s: plan layer %d is block %d, expected %d", path, l,
                           p->block[l], moe_block(cfg, l));
        if (p->keep[l] < cfg->top_k || p->keep[l] > p->E)
            return dm_fail(DM_ERR_ARG, "%s: --keep %d: must be in [top_k = %d, %d]", path, p->keep[l],
                           cfg->top_k, p->E);
        if (promoe && p->keep[l] != p->keep[0])
            return dm_fail(DM_ERR_ARG, "%s: ProMoE layers must keep the same number of experts (the "
                           "unconditional expert's id is the expert count, one for the model)", path);
        for (int j = 0; j < p->keep[l]; j++)
            if (p->kept[l][j] < 0 || p->kept[l][j] >= p->E || (j && p->kept[l][j] <= p->kept[l][j - 1]))
                return dm_fail(DM_ERR_ARG, "%s: plan layer %d: kept ids must ascend in [0, %d)", path, l, p->E);
    }
    return DM_OK;
}

/* Plan layer of transformer block b, or -1. */
static int plan_layer(const dm_prune_plan *p, int b)
{
    for (int l = 0; l < p->layers; l++)
        if (p->block[l] == b) return l;
    return -1;
}

dm_status dm_prune_ops(const dm_st_file *f, const dm_config *cfg, const dm_prune_plan *p,
                       dm_prune_op **ops, int *n_ops)
{
    const char *path = dm_st_path(f);
    dm_status st = check_plan(cfg, p, path);
    if (st) return st;
    /* DiT-MoE: blocks.B.moe.experts.E.*, router blocks.B.moe.gate.weight; ProMoE:
     * blocks.B.mlp.experts.E.* (E = num_experts: the unconditional expert, kept and renumbered
     * to keep), prototypes blocks.B.mlp.cluster_centers */
    const int promoe = cfg->arch == DM_ARCH_PROMOE;
    const char *exp_fmt = promoe ? "blocks.%d.mlp.experts.%d.%n" : "blocks.%d.moe.experts.%d.%n";
    const char *out_fmt = promoe ? "blocks.%d.mlp.experts.%d.%s" : "blocks.%d.moe.experts.%d.%s";
    const char *rt_fmt = promoe ? "blocks.%d.mlp.cluster_center%n" : "blocks.%d.moe.gate.weigh%n";
    const char *rt_end = promoe ? "s" : "t";
    const int n = dm_st_count(f);
    dm_prune_op *o = calloc((size_t)(n ? n : 1), sizeof *o);
    if (!o) return dm_fail(DM_ERR_NOMEM, "%s: prune ops", path);
    for (int i = 0; i < n; i++) {
        const dm_st_tensor *t = dm_st_at(f, i);
        dm_prune_op *op = &o[i];
        if (strlen(t->name) >= sizeof op->src) {
            free(o);
            return dm_fail(DM_ERR_FORMAT, "%s: tensor name too long: %.60s...", path, t->name);
        }
        strcpy(op->src, t->name);
        strcpy(op->dst, t->name);
        op->op = DM_PRUNE_COPY;
        int b, e, used = 0, l;
        if (sscanf(t->name, exp_fmt, &b, &e, &used) == 2 && used > 0) {
            if ((l = plan_layer(p, b)) < 0 || e < 0 || e > p->E || (e == p->E && !promoe)) {
                free(o);
                return dm_fail(DM_ERR_FORMAT, "%s: %s: block or expert out of range", path, t->name);
            }
            int to = e == p->E ? p->keep[l] : -1; /* the unconditional expert follows the kept */
            for (int j = 0; j < p->keep[l]; j++)
                if (p->kept[l][j] == e) to = j;
            if (to < 0) {
                op->op = DM_PRUNE_DROP;
                op->dst[0] = 0;
            } else {
                snprintf(op->dst, sizeof op->dst, out_fmt, b, to, t->name + used);
                op->op = to == e ? DM_PRUNE_COPY : DM_PRUNE_RENAME;
            }
        } else if (sscanf(t->name, rt_fmt, &b, &used) == 1 && used > 0 && !strcmp(t->name + used, rt_end)) {
            if ((l = plan_layer(p, b)) < 0 || t->ndim != 2 || t->shape[0] != p->E) {
                free(o);
                return dm_fail(DM_ERR_FORMAT, "%s: %s: expected [%d, D] in a MoE block", path, t->name, p->E);
            }
            op->op = p->keep[l] == p->E ? DM_PRUNE_COPY : DM_PRUNE_ROWS;
            op->n_rows = p->keep[l];
            for (int j = 0; j < p->keep[l]; j++) op->rows[j] = p->kept[l][j];
        }
    }
    *ops = o;
    *n_ops = n;
    return DM_OK;
}

dm_status dm_prune_apply(const dm_st_file *f, const dm_prune_op *ops, int n_ops, dm_st_tensor **out,
                         int *n_out, void **owned)
{
    size_t extra = 0;
    int n = 0;
    for (int i = 0; i < n_ops; i++) {
        const dm_st_tensor *t = dm_st_find(f, ops[i].src);
        if (!t) return dm_fail(DM_ERR_ARG, "%s: prune op names a missing tensor %s", dm_st_path(f), ops[i].src);
        if (ops[i].op == DM_PRUNE_ROWS) extra += t->nbytes / (size_t)t->shape[0] * ops[i].n_rows;
        n += ops[i].op != DM_PRUNE_DROP;
    }
    dm_st_tensor *o = calloc((size_t)(n ? n : 1), sizeof *o);
    uint8_t *buf = malloc(extra ? extra : 1);
    if (!o || !buf) {
        free(o), free(buf);
        return dm_fail(DM_ERR_NOMEM, "%s: pruned tensors", dm_st_path(f));
    }
    size_t at = 0;
    int k = 0;
    for (int i = 0; i < n_ops; i++) {
        if (ops[i].op == DM_PRUNE_DROP) continue;
        const dm_st_tensor *t = dm_st_find(f, ops[i].src);
        o[k] = *t;
        o[k].name = ops[i].dst;
        if (ops[i].op == DM_PRUNE_ROWS) {
            const size_t row = t->nbytes / (size_t)t->shape[0];
            for (int j = 0; j < ops[i].n_rows; j++)
                memcpy(buf + at + row * j, (const uint8_t *)t->data + row * ops[i].rows[j], row);
            o[k].data = buf + at;
            o[k].shape[0] = ops[i].n_rows;
            o[k].nbytes = row * ops[i].n_rows;
            at += o[k].nbytes;
        }
        k++;
    }
    *out = o;
    *n_out = n;
    *owned = buf;
    return DM_OK;
}

void dm_prune_tensors_free(dm_st_tensor *t, int n, void *owned)
{
    (void)n;
    free(t);
    free(owned);
}

dm_status dm_prune_metadata(const dm_st_file *f, const dm_prune_plan *p, const char *method, char **json)
{
    const char *m = dm_st_meta(f, "ditmoe");
    cJSON *root = m ? cJSON_Parse(m) : cJSON_CreateObject();
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\" is not a JSON object", dm_st_path(f));
    }
    cJSON_DeleteItemFromObject(root, "num_experts");
    cJSON_DeleteItemFromObject(root, "pruned");
    cJSON *pr = cJSON_CreateObject(), *kept = cJSON_CreateArray();
    int most = 0;
    for (int l = 0; l < p->layers; l++) most = p->keep[l] > most ? p->keep[l] : most;
    int ok = cJSON_AddNumberToObject(root, "num_experts", most) && pr && kept;
    for (int l = 0; ok && l < p->layers; l++) {
        cJSON *a = cJSON_CreateIntArray(p->kept[l], p->keep[l]);
        ok &= a && cJSON_AddItemToArray(kept, a);
    }
    ok = ok && cJSON_AddNumberToObject(pr, "from_experts", p->E) && cJSON_AddItemToObject(pr, "kept", kept);
    if (ok) kept = NULL;
    ok = ok && cJSON_AddStringToObject(pr, "method", method ? method : "") && cJSON_AddItemToObject(root, "pruned", pr);
    if (ok) pr = NULL;
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(kept);
    cJSON_Delete(pr);
    cJSON_Delete(root);
    if (!s) return dm_fail(DM_ERR_NOMEM, "pruned metadata");
    *json = s;
    return DM_OK;
}

dm_status dm_prune_write(const dm_st_file *f, const dm_config *cfg, const dm_prune_plan *p,
                         const char *method, const char *path)
{
    dm_prune_op *ops = NULL;
    dm_st_tensor *t = NULL;
    void *owned = NULL;
    char *meta = NULL;
    int n_ops = 0, nt = 0;
    dm_status st = dm_prune_ops(f, cfg, p, &ops, &n_ops);
    if (!st) st = dm_prune_apply(f, ops, n_ops, &t, &nt, &owned);
    if (!st) st = dm_prune_metadata(f, p, method, &meta);
    const char *fmt = dm_st_meta(f, "format");
    const char *kv[] = {"ditmoe", meta, fmt ? "format" : NULL, fmt, NULL};
    if (!st) st = dm_st_write(path, nt, t, kv);
    free(meta);
    if (t) dm_prune_tensors_free(t, nt, owned);
    free(ops);
    return st;
}

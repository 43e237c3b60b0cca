/* ditmoe-prune: structured expert pruning of a DiT-MoE or ProMoE model (docs/moe-lab.md).
 *
 *   ditmoe-prune MODEL --keep N [--method best|stun|exhaustive] [--probs P.npy] [--routes DUMP]...
 *                [--lambda X] [--layers LIST] [--report R.json] [-o OUT.safetensors]
 *
 * Per MoE layer it chooses N experts two ways (ditmoe.h, MoE lab): STUN (complete-linkage
 * clustering of a behaviour + router-row distance, one representative per cluster) and an
 * exhaustive search minimising the lost top-k mass on calibration router probabilities (--probs:
 * [L, M, E] float32, e.g. from tools/moe_lab/router_probs.py); both are scored by that objective
 * and `best` (default) keeps the lower per layer. Co-activation comes from routing dumps
 * (--routes, conditional rows) or, without dumps, from the top-k of --probs. Then it writes the
 * pruned model: dropped experts' tensors removed, kept ones renumbered, router rows kept to
 * match. --layers prunes only some MoE layers (the others keep all E; the loader takes each
 * layer's expert count from its router rows). ProMoE (token choice): prototype rows dropped with
 * their experts, the unconditional expert always kept (renumbered to N), every MoE layer pruned
 * (--probs: cosine scores from tools/moe_lab/promoe_scores.py; its top-1 dumps have no
 * co-activation between experts, so STUN needs --lambda > 0 there). Exit: 0, 2 bad input, 1
 * runtime. */
#include "ditmoe.h"
#include "common.h"
#include "flags.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DUMPS 16
#define PROG "ditmoe-prune"

static struct {
    const char *probs, *out, *report, *method, *layers;
    dm_cli_list dumps, pos;
    int keep;
    float lambda;
    dm_cli_common common;
} A;

static const dm_cli_opt OPTS[] = {
    {'\0', "keep", DM_OPT_INT, &A.keep, 1, DM_PRUNE_MAX_E, "N", "- (required)",
     "experts kept in every pruned MoE layer (top_k <= N <= E)", NULL},
    {'\0', "method", DM_OPT_STR, &A.method, 0, 0, "M", "best",
     "best (per layer the lower lost mass of the two), stun, exhaustive", NULL},
    {'\0', "probs", DM_OPT_STR, &A.probs, 0, 0, "P.npy", "none",
     "calibration router probabilities [L, M, E] float32 (tools/moe_lab/router_probs.py);\n"
     "ProMoE: cosine scores (tools/moe_lab/promoe_scores.py); needed by exhaustive and best", NULL},
    {'\0', "routes", DM_OPT_LIST, &A.dumps, 0, 0, "DUMP", "top-k of --probs",
     "routing dump(s) for co-activation (repeatable)", NULL},
    {'\0', "lambda", DM_OPT_FLOAT, &A.lambda, 0, 1e6, "X", "0",
     "weight of the router-row distance in STUN's distance", NULL},
    {'\0', "report", DM_OPT_STR, &A.report, 0, 0, "R.json", "none",
     "write the per-layer choices and objectives", NULL},
    {'o', NULL, DM_OPT_STR, &A.out, 0, 0, "OUT.safetensors", "none (plan and report only)",
     "the pruned model", NULL},
    {'\0', "layers", DM_OPT_STR, &A.layers, 0, 0, "LIST", "all",
     "comma list of the MoE layers to prune (block indices); the others keep every expert", NULL},
    DM_CLI_LOG_OPTS(A.common),
    DM_CLI_HELP_OPTS,
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "MODEL --keep N [options]",
    "Structured expert pruning from behaviour similarity (docs/moe-lab.md): STUN complete-linkage\n"
    "clustering or an exhaustive search per layer; writes a model the engine loads as any other.",
    OPTS, &A.pos, NULL};

/* --layers LIST ("all" or comma-separated MoE block indices in [0, depth)) into sel [MoE
 * layers]; interleave: only the odd blocks are MoE (ProMoE). */
static dm_status parse_layers(const char *s, int depth, int interleave, uint8_t *sel)
{
    const int L = interleave ? depth / 2 : depth;
    memset(sel, 0, (size_t)L);
    if (!s || !strcmp(s, "all")) {
        memset(sel, 1, (size_t)L);
        return DM_OK;
    }
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        const long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ','))
            return dm_fail(DM_ERR_ARG, "--layers '%s': expected 'all' or block indices separated by commas", s);
        if (v < 0 || v >= depth)
            return dm_fail(DM_ERR_ARG, "--layers '%s': layer %ld does not exist (depth %d: 0..%d)", s, v,
                           depth, depth - 1);
        if (interleave && v % 2 == 0)
            return dm_fail(DM_ERR_ARG, "--layers '%s': block %ld has no routed experts", s, v);
        const long l = interleave ? v / 2 : v;
        if (sel[l]) return dm_fail(DM_ERR_ARG, "--layers '%s': layer %ld given twice", s, v);
        sel[l] = 1;
        p = *end ? end + 1 : end;
        if (*end && !*p) return dm_fail(DM_ERR_ARG, "--layers '%s': trailing comma", s);
    }
    return DM_OK;
}

/* Add a dump's co-activation counts and gate mass (conditional rows) into coact [L, E, E] and
 * mass [L, E]. */
static dm_status add_dump(const char *path, int L, int E, int64_t *coact, double *mass)
{
    dm_trace_reader *r = NULL;
    dm_route_analysis *an = NULL;
    const dm_trace_record *rec;
    dm_status st = dm_trace_read_open(path, &r);
    if (!st && (dm_trace_read_shape(r)->layers != L || dm_trace_read_shape(r)->num_experts != E))
        st = dm_fail(DM_ERR_FORMAT, "%s: dump of %d layers x %d experts, model %d x %d", path,
                     dm_trace_read_shape(r)->layers, dm_trace_read_shape(r)->num_experts, L, E);
    if (!st) st = dm_route_analysis_new(dm_trace_read_shape(r), 0, &an);
    while (!st && !(st = dm_trace_read_next(r, &rec)) && rec) st = dm_route_analysis_add(an, rec);
    const int X = an ? dm_route_analysis_experts(an) : 0;
    for (int l = 0; !st && l < L; l++) { /* X = E: DiT-MoE dumps have no uncond expert */
        const int64_t *c = dm_route_coact(an, l);
        const double *w = dm_route_mass(an, l);
        for (int e = 0; e < E; e++) {
            mass[(size_t)l * E + e] += w[e];
            for (int g = 0; g < E; g++) coact[((size_t)l * E + e) * E + g] += c[(size_t)e * X + g];
        }
    }
    dm_route_analysis_free(an);
    dm_trace_read_close(r);
    return st;
}

int main(int argc, char **argv)
{
    A.method = "best";
    dm_cli_common_init(&A.common);
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    dm_cli_common_apply(&A.common, 0);
    const char *model = A.pos.n ? A.pos.v[0] : NULL, *probs_path = A.probs, *out = A.out;
    const char *report = A.report, *method = A.method;
    const char *const *dumps = A.dumps.v;
    const int n_dumps = A.dumps.n, keep = A.keep;
    const float lambda = A.lambda;
    if (A.pos.n > 1) st = dm_fail(DM_ERR_ARG, "more than one MODEL (%s, %s)", A.pos.v[0], A.pos.v[1]);
    if (!st && strcmp(method, "best") && strcmp(method, "stun") && strcmp(method, "exhaustive"))
        st = dm_fail(DM_ERR_ARG, "--method %s: best, stun or exhaustive", method);
    if (!st && n_dumps > MAX_DUMPS) st = dm_fail(DM_ERR_ARG, "--routes: at most %d dumps", MAX_DUMPS);
    if (!st && !model) st = dm_fail(DM_ERR_ARG, "no MODEL (see --help)");
    if (!st && !keep) st = dm_fail(DM_ERR_ARG, "--keep N is required");
    if (!st && strcmp(method, "stun") && !probs_path)
        st = dm_fail(DM_ERR_ARG, "--method %s needs --probs (calibration router probabilities)", method);
    if (!st && !probs_path && !n_dumps)
        st = dm_fail(DM_ERR_ARG, "--method stun needs --routes or --probs for co-activation");
    if (st) return dm_cli_exit(PROG, st);

    dm_st_file *f = NULL;
    dm_config cfg = {0};
    dm_npy probs = {0};
    dm_prune_plan *plan = calloc(1, sizeof *plan);
    int64_t *coact = NULL;
    double *mass = NULL;
    char *rep_buf = NULL;
    size_t rep_len = 0;
    FILE *rep = NULL;
    float **W = NULL;
    uint8_t sel[DM_TRACE_MAX_LAYERS];
    if (!plan) st = dm_fail(DM_ERR_NOMEM, "plan");
    if (!st) st = dm_st_open(model, &f);
    if (!st) st = dm_config_from_file(f, &cfg);
    const int promoe = cfg.arch == DM_ARCH_PROMOE;
    if (!st && promoe && cfg.promoe_ec)
        st = dm_fail(DM_ERR_ARG, "%s: ProMoE expert choice is not pruned (its capacity depends on the "
                     "expert count, so dropping prototypes would not be the original with their scores "
                     "at -inf); token choice is", model);
    const int L = dm_config_moe_layers(&cfg), E = cfg.num_experts, D = cfg.hidden, k = cfg.top_k;
    const int F = cfg.expert_hidden;
    if (!st && (L > DM_TRACE_MAX_LAYERS || E > DM_PRUNE_MAX_E))
        st = dm_fail(DM_ERR_ARG, "%s: %d layers x %d experts (at most %d x %d)", model, L, E,
                     DM_TRACE_MAX_LAYERS, DM_PRUNE_MAX_E);
    if (!st && (keep < k || keep > E))
        st = dm_fail(DM_ERR_ARG, "--keep %d: must be in [top_k = %d, E = %d]", keep, k, E);
    for (int l = 0; !st && l < L; l++) { /* a model pruned per layer: choose from the original */
        char name[128];
        snprintf(name, sizeof name, promoe ? "blocks.%d.mlp.cluster_centers" : "blocks.%d.moe.gate.weight",
                 cfg.moe_interleave ? 2 * l + 1 : l);
        const dm_st_tensor *t = dm_st_find(f, name);
        if (t && t->ndim == 2 && t->shape[0] != E)
            st = dm_fail(DM_ERR_ARG, "%s: %s has %lld experts, not num_experts = %d (a model pruned in "
                         "some layers): prune the original model instead", model, name,
                         (long long)t->shape[0], E);
    }
    if (!st) st = parse_layers(A.layers, cfg.depth, cfg.moe_interleave, sel);
    for (int l = 0; !st && promoe && l < L; l++)
        if (!sel[l])
            st = dm_fail(DM_ERR_ARG, "--layers %s: ProMoE layers must keep the same number of experts "
                         "(the unconditional expert's id is the expert count, one for the model)", A.layers);
    int64_t M = 0;
    if (!st && probs_path) {
        st = dm_npy_read_expect(probs_path, DM_F32, 3, &probs);
        if (!st && (probs.shape[0] != L || probs.shape[2] != E))
            st = dm_fail(DM_ERR_FORMAT, "%s: shape [%lld, %lld, %lld], expected [%d, M, %d]", probs_path,
                         (long long)probs.shape[0], (long long)probs.shape[1], (long long)probs.shape[2], L, E);
        M = probs.shape[1];
    }
    if (!st) {
        coact = calloc((size_t)L * E * E, sizeof(int64_t));
        mass = calloc((size_t)L * E, sizeof(double));
        W = calloc((size_t)E, sizeof(float *));
        if (!coact || !mass || !W) st = dm_fail(DM_ERR_NOMEM, "co-activation");
    }
    /* co-activation: dumps, else the top-k of the calibration probabilities */
    for (int d = 0; !st && d < n_dumps; d++) st = add_dump(dumps[d], L, E, coact, mass);
    if (!st && !n_dumps)
        for (int l = 0; l < L; l++)
            for (int64_t m = 0; m < M; m++) {
                const float *p = (const float *)probs.data + ((size_t)l * M + m) * E;
                int ids[DM_PRUNE_MAX_E];
                uint64_t used = 0;
                for (int j = 0; j < k; j++) {
                    int b = -1;
                    for (int e = 0; e < E; e++)
                        if (!(used >> e & 1) && (b < 0 || p[e] > p[b])) b = e;
                    used |= 1ull << b, ids[j] = b;
                    mass[(size_t)l * E + b] += p[b];
                }
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++) coact[((size_t)l * E + ids[i]) * E + ids[j]]++;
            }
    if (!st && report && !(rep = open_memstream(&rep_buf, &rep_len)))
        st = dm_fail(DM_ERR_NOMEM, "--report %s", report);
    if (rep) fprintf(rep, "{\"model\": \"%s\", \"keep\": %d, \"experts\": %d, \"method\": \"%s\", \"layers\": [", model, keep, E, method);
    plan->layers = L, plan->E = E;
    /* flattened expert weights for the centroid: gate | up | down (DiT-MoE), up | down (ProMoE) */
    const size_t nw = (size_t)(promoe ? 2 : 3) * F * D;
    for (int l = 0; !st && l < L; l++) {
        const int blk = cfg.moe_interleave ? 2 * l + 1 : l;
        plan->block[l] = blk;
        if (!sel[l]) { /* not pruned: every expert, in order */
            plan->keep[l] = E;
            for (int e = 0; e < E; e++) plan->kept[l][e] = e;
            dm_log(DM_LOG_INFO, "layer %d: not pruned (--layers)", blk);
            if (rep) fprintf(rep, "%s\n {\"layer\": %d, \"pruned\": false}", l ? "," : "", blk);
            continue;
        }
        plan->keep[l] = keep;
        char name[128];
        float *router = NULL;
        /* router rows: DiT-MoE's gate, ProMoE's prototypes L2-normalised (as the loader does) */
        snprintf(name, sizeof name, promoe ? "blocks.%d.mlp.cluster_centers" : "blocks.%d.moe.gate.weight", blk);
        st = dm_st_load_f32(f, name, 2, (int64_t[]){E, D}, &router);
        for (int e = 0; !st && promoe && e < E; e++) {
            double nn = 0;
            for (int d = 0; d < D; d++) nn += (double)router[(size_t)e * D + d] * router[(size_t)e * D + d];
            for (int d = 0; d < D; d++) router[(size_t)e * D + d] /= (float)(nn > 1e-24 ? sqrt(nn) : 1e-12);
        }
        const char *dit_part[3] = {"gate_proj", "up_proj", "down_proj"}, *pro_part[2] = {"up_proj", "down_proj"};
        const char *const *part = promoe ? pro_part : dit_part;
        const int nq = promoe ? 2 : 3;
        for (int e = 0; !st && e < E; e++) {
            W[e] = malloc(nw * sizeof(float));
            if (!W[e]) st = dm_fail(DM_ERR_NOMEM, "weights");
            for (int q = 0; !st && q < nq; q++) { /* [F, D] up (and gate), [D, F] down */
                float *x = NULL;
                snprintf(name, sizeof name, promoe ? "blocks.%d.mlp.experts.%d.%s.weight"
                                                   : "blocks.%d.moe.experts.%d.%s.weight", blk, e, part[q]);
                const int down = q == nq - 1;
                const int64_t sh[2] = {down ? D : F, down ? F : D};
                st = dm_st_load_f32(f, name, 2, sh, &x);
                if (!st) memcpy(W[e] + (size_t)q * F * D, x, (size_t)F * D * sizeof(float));
                free(x);
            }
        }
        int stun[DM_PRUNE_MAX_E], exh[DM_PRUNE_MAX_E], cl[DM_PRUNE_MAX_E];
        double ls = -1, le = -1, full = -1;
        if (!st)
            st = dm_prune_stun(E, coact + (size_t)l * E * E, router, D, lambda, (const float *const *)W,
                               nw, mass + (size_t)l * E, keep, stun, cl);
        const float *pl = probs.data ? (const float *)probs.data + (size_t)l * M * E : NULL;
        if (!st && pl) {
            uint8_t mk[DM_PRUNE_MAX_E] = {0};
            for (int j = 0; j < keep; j++) mk[stun[j]] = 1;
            ls = dm_prune_lost_mass(pl, M, E, k, mk);
            const uint8_t none[DM_PRUNE_MAX_E] = {0};
            full = dm_prune_lost_mass(pl, M, E, k, none); /* = the mean top-k mass itself */
            if (strcmp(method, "stun")) le = dm_prune_exhaustive(pl, M, E, k, keep, exh);
        }
        if (!st) {
            const int use_exh = !strcmp(method, "exhaustive") || (!strcmp(method, "best") && le <= ls);
            memcpy(plan->kept[l], use_exh ? exh : stun, (size_t)keep * sizeof(int));
            fprintf(stderr, "[INFO] layer %d", blk);
            if (full >= 0) fprintf(stderr, " (top-%d mass %.5f)", k, full);
            fprintf(stderr, ": stun keeps");
            for (int j = 0; j < keep; j++) fprintf(stderr, " %d", stun[j]);
            if (ls >= 0) fprintf(stderr, " (lost mass %.5f)", ls);
            if (le >= 0) {
                fprintf(stderr, "; exhaustive keeps");
                for (int j = 0; j < keep; j++) fprintf(stderr, " %d", exh[j]);
                fprintf(stderr, " (%.5f)", le);
            }
            fprintf(stderr, " -> %s\n", use_exh ? "exhaustive" : "stun");
            if (rep) {
                fprintf(rep, "%s\n {\"layer\": %d, \"pruned\": true, \"stun\": [", l ? "," : "", blk);
                for (int j = 0; j < keep; j++) fprintf(rep, "%s%d", j ? ", " : "", stun[j]);
                fprintf(rep, "], \"stun_clusters\": [");
                for (int e = 0; e < E; e++) fprintf(rep, "%s%d", e ? ", " : "", cl[e]);
                fprintf(rep, "], \"topk_mass\": %.6f, \"stun_lost_mass\": %.6f", full, ls);
                if (le >= 0) {
                    fprintf(rep, ", \"exhaustive\": [");
                    for (int j = 0; j < keep; j++) fprintf(rep, "%s%d", j ? ", " : "", exh[j]);
                    fprintf(rep, "], \"exhaustive_lost_mass\": %.6f", le);
                }
                fprintf(rep, ", \"chosen\": \"%s\"}", use_exh ? "exhaustive" : "stun");
            }
        }
        free(router);
        for (int e = 0; e < E; e++) free(W[e]), W[e] = NULL;
    }
    free(W);
    if (rep) {
        fprintf(rep, "]}\n");
        const int bad = fclose(rep) != 0;
        if (!st && bad) st = dm_fail(DM_ERR_NOMEM, "--report %s", report);
        if (!st) st = dm_write_file_atomic(report, rep_buf, rep_len);
        free(rep_buf);
    }
    if (!st && out) {
        st = dm_prune_write(f, &cfg, plan, method, out);
        if (!st) {
            int nl = 0;
            for (int l = 0; l < L; l++) nl += sel[l];
            dm_log(DM_LOG_INFO, "wrote %s: %d of %d experts in %d of %d layers", out, keep, E, nl, L);
        }
    }
    free(coact);
    free(mass);
    free(plan);
    dm_npy_free(&probs);
    dm_config_free(&cfg);
    if (f) dm_st_close(f);
    return dm_cli_exit(PROG, st);
}

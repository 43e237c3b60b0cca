/* ditmoe-routestats: the MoE lab's statistics of routing dumps as JSON on stdout
 * (trace/analysis.h; docs/moe-lab.md): ExFlow affinity P(expert at l+1 | expert at l), top-k set
 * persistence between adjacent steps per layer and step band, mean experts per token per layer
 * and step, co-activation and gate mass per layer.
 *
 *   ditmoe-routestats [--uncond] [--bands N] DUMP [DUMP...] > stats.json
 *   ditmoe-routestats --probs P.npy --steps S --route SPEC [--route SPEC...] > policies.json
 *
 * The second form applies routing policies (router/route_policy.h, the engine's code) to full
 * router probabilities recorded along a top-k trajectory ([L, S*B*T, E] float32, step-major, from
 * tools/moe_lab/router_probs.py) and reports the experts per token they would select, per layer
 * and step band: what a policy asks for at the states the trained routing visits (the
 * trajectory itself would change under the policy). --cosine: the scores are ProMoE cosines of
 * a top-1 model (tools/moe_lab/promoe_scores.py), for rank2; otherwise DiT-MoE probabilities, k 2.
 *
 * Dumps must share a shape (layers, experts, k, steps). Exit 0, 2 bad input, 1 runtime. Meant
 * to become `ditmoe-routes --affinity` after the CLI merge. */
#include "ditmoe.h"
#include "common.h"
#include "flags.h"
#include "router/route_policy.h"
#include "trace/analysis.h"

#include <stdlib.h>

#include <stdio.h>
#include <string.h>

/* Mean experts per token of each policy on probs [L, S*BT, E], per layer and step band. */
static dm_status policies(const char *path, int S, int bands, const char **specs, int n_specs,
                          int cosine)
{
    dm_npy a = {0};
    dm_status st = dm_npy_read_expect(path, DM_F32, 3, &a);
    if (st) return st;
    const int L = (int)a.shape[0], E = (int)a.shape[2];
    const int64_t M = a.shape[1];
    if (S < 1 || M % S) {
        dm_npy_free(&a);
        return dm_fail(DM_ERR_ARG, "--steps %d does not divide the %lld rows of %s", S, (long long)M, path);
    }
    const int64_t per = M / S;
    dm_route_csr c = {0};
    printf("{\"probs\": \"%s\", \"layers\": %d, \"experts\": %d, \"steps\": %d, \"policies\": [", path, L, E, S);
    for (int i = 0; !st && i < n_specs; i++) {
        dm_route_policy p;
        st = dm_route_policy_parse(specs[i], &p);
        const int mk = cosine ? 1 : 2; /* the shipped models' k: ProMoE top-1, DiT-MoE top-2 */
        if (!st) st = dm_route_policy_check(&p, !cosine, E, mk);
        if (!st) st = dm_route_csr_reserve(&c, (int)per, dm_route_policy_max_picks(&p, E, mk), E);
        if (st) break;
        printf("%s\n {\"route\": \"%s\", \"mean_experts\": [", i ? "," : "", specs[i]);
        for (int l = 0; l < L; l++) {
            printf("%s[", l ? ", " : "");
            for (int b = 0; b < bands; b++) {
                const int s0 = S * b / bands, s1 = S * (b + 1) / bands;
                int64_t picks = 0, toks = 0;
                for (int s = s0; s < s1; s++) {
                    dm_route_select(&p, (const float *)a.data + ((size_t)l * M + (size_t)s * per) * E, (int)per, E, mk,
                                    NULL, E, &c);
                    picks += c.n_picks, toks += per;
                }
                printf("%s%.4f", b ? ", " : "", toks ? (double)picks / toks : 0.0);
            }
            printf("]");
        }
        printf("]}");
    }
    printf("],\n \"bands\": %d}\n", bands);
    dm_route_csr_free(&c);
    dm_npy_free(&a);
    return st;
}

#define PROG "ditmoe-routestats"

static struct {
    const char *probs;
    dm_cli_list specs, dumps;
    int steps, cosine, uncond, bands;
    dm_cli_common common;
} A;

static const dm_cli_opt OPTS[] = {
    {'\0', "uncond", DM_OPT_SET, &A.uncond, 1, 0, NULL, "off",
     "count the unconditional rows instead of the conditional ones", NULL},
    {'\0', "bands", DM_OPT_INT, &A.bands, 1, 1000, "N", "5", "step bands of the per-step tables", NULL},
    {'\0', "probs", DM_OPT_STR, &A.probs, 0, 0, "P.npy", "none",
     "policy mode: router probabilities [L, S*B*T, E] float32 (tools/moe_lab/router_probs.py)", NULL},
    {'\0', "steps", DM_OPT_INT, &A.steps, 1, 100000, "S", "0", "sampler steps of --probs", NULL},
    {'\0', "route", DM_OPT_LIST, &A.specs, 0, 0, "SPEC", "none",
     "routing policy to evaluate on --probs (repeatable): top-k, top-p=P[,max=K][,renorm], ...", NULL},
    {'\0', "cosine", DM_OPT_SET, &A.cosine, 1, 0, NULL, "off",
     "--probs holds ProMoE cosine scores of a top-1 model (rank2 policies)", NULL},
    DM_CLI_LOG_OPTS(A.common),
    DM_CLI_HELP_OPTS,
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "[--uncond] [--bands N] DUMP [DUMP...] > stats.json\n"
    "       " PROG " --probs P.npy --steps S --route SPEC [--route SPEC...] > policies.json",
    "Routing statistics of --dump-routing traces as JSON (docs/moe-lab.md): ExFlow affinity,\n"
    "top-k set persistence between steps, experts per token, co-activation, gate mass.",
    OPTS, &A.dumps, NULL};

int main(int argc, char **argv)
{
    A.bands = 5;
    dm_cli_common_init(&A.common);
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    dm_cli_common_apply(&A.common, 0);
    const char *probs = A.probs, *const *dumps = A.dumps.v, **specs = A.specs.v;
    const int n = A.dumps.n, n_specs = A.specs.n, steps = A.steps, bands = A.bands;
    const int cosine = A.cosine, uncond = A.uncond;
    if (!st && probs) {
        st = n_specs ? policies(probs, steps, bands, specs, n_specs, cosine)
                     : dm_fail(DM_ERR_ARG, "--probs needs at least one --route SPEC");
        return dm_cli_exit(PROG, st);
    }
    if (!st && !n) st = dm_fail(DM_ERR_ARG, "no DUMP (see --help)");
    dm_route_analysis a;
    int have = 0;
    for (int d = 0; !st && d < n; d++) {
        dm_trace_reader *r = NULL;
        const dm_trace_record *rec;
        st = dm_trace_read_open(dumps[d], &r);
        if (!st && !have) {
            st = dm_route_analysis_init(&a, dm_trace_read_shape(r), uncond);
            have = !st;
        } else if (!st) {
            const dm_trace_shape *s = dm_trace_read_shape(r);
            if (s->layers != a.shape.layers || s->num_experts != a.shape.num_experts ||
                s->top_k != a.shape.top_k || s->steps != a.shape.steps ||
                s->uncond_expert != a.shape.uncond_expert)
                st = dm_fail(DM_ERR_FORMAT, "%s: shape differs from %s", dumps[d], dumps[0]);
        }
        while (!st && !(st = dm_trace_read_next(r, &rec)) && rec) st = dm_route_analysis_add(&a, rec);
        if (st == DM_ERR_FORMAT) {
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", dm_last_error());
            st = dm_fail(DM_ERR_FORMAT, "%s: %s", dumps[d], msg);
        }
        dm_trace_read_close(r);
    }
    if (!st) st = dm_route_analysis_write_json(&a, bands, stdout);
    if (have) dm_route_analysis_free(&a);
    return dm_cli_exit(PROG, st);
}

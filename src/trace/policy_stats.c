/* What a routing policy would select on recorded router scores (ditmoe.h
 * dm_route_policy_experts; ditmoe-routes --policies): the engine's own dm_route_select applied
 * step by step, mean experts per token per layer and step band. */
#include "ditmoe.h"
#include "router/route_policy.h"

#include <string.h>

dm_status dm_route_policy_experts(const char *spec, const float *scores, int L, int64_t M, int E,
                                  int S, int top_k, int cosine, int bands, double *mean)
{
    if (S < 1 || M % S)
        return dm_fail(DM_ERR_ARG, "--steps %d does not divide the %lld rows of the scores", S,
                       (long long)M);
    if (bands < 1 || bands > S)
        return dm_fail(DM_ERR_ARG, "--bands %d: must be in [1, steps = %d]", bands, S);
    const int64_t per = M / S;
    if (per > (1 << 30)) return dm_fail(DM_ERR_ARG, "--steps %d: %lld tokens per step", S, (long long)per);
    dm_route_policy p;
    dm_status st = dm_route_policy_parse(spec, &p);
    if (!st) st = dm_route_policy_check(&p, !cosine, E, top_k);
    if (st) return st;
    dm_route_csr c;
    memset(&c, 0, sizeof c);
    st = dm_route_csr_reserve(&c, (int)per, dm_route_policy_max_picks(&p, E, top_k), E);
    for (int l = 0; !st && l < L; l++)
        for (int b = 0; b < bands; b++) {
            const int s0 = (int)((int64_t)S * b / bands), s1 = (int)((int64_t)S * (b + 1) / bands);
            int64_t picks = 0, toks = 0;
            for (int s = s0; s < s1; s++) {
                dm_route_select(&p, scores + ((size_t)l * M + (size_t)s * per) * E, (int)per, E,
                                top_k, NULL, E, &c);
                picks += c.n_picks, toks += per;
            }
            mean[(size_t)l * bands + b] = toks ? (double)picks / toks : 0.0;
        }
    dm_route_csr_free(&c);
    return st;
}

/* Routing-dump analyses for the MoE lab (docs/moe-lab.md; spec docs/spec/moe-inference.md A4,
 * A6, A8), accumulated record by record from the public reader (dm_trace_read_next):
 *  (a) ExFlow affinity: per adjacent MoE-layer pair, counts of (expert e picked at layer l,
 *      expert f picked at layer l+1) over every token's picks (a top-2 token adds 4 pairs);
 *      P(f | e) = affinity[l][e][f] / sum_f affinity[l][e][f].
 *  (b) top-k set persistence: per layer and step s >= 1, how many tokens have the same SET of
 *      experts (order ignored) at step s as at step s-1 (first evaluation of each step, same
 *      image and half), and how many the same top-1.
 *  (c) experts per token: per layer and step, routed picks (ids in [0, E)) and tokens, so
 *      variable-k dumps give their mean.
 *  (d) co-activation: per layer, coact[e][f] = tokens that picked both e and f (e != f), the
 *      diagonal = tokens that picked e; mass[e] = sum of e's gate weights (dumps with weights).
 * Only the counted half (conditional rows, or unconditional with count_uncond) is used.
 * The API is in ditmoe.h; this header adds the struct's fields (for tests). */
#ifndef DM_TRACE_ANALYSIS_H
#define DM_TRACE_ANALYSIS_H

#include "ditmoe.h"

#include <stdio.h>

/* The opaque type of ditmoe.h ("MoE lab: analysis and pruning"); its fields, for the tests. */
struct dm_route_analysis {
    dm_trace_shape shape;
    int X;             /* expert columns: E, or E + 1 with ProMoE's uncond expert (last)      */
    int S;             /* steps (shape.steps, or grown as steps are seen)                     */
    int count_uncond;
    int64_t *affinity; /* [Lm-1, X, X]                                                         */
    int64_t *keep_set; /* [Lm, S] tokens whose expert set at step s equals step s-1's         */
    int64_t *keep_top1;/* [Lm, S] same first pick                                             */
    int64_t *compared; /* [Lm, S] tokens compared at step s (0 for s = 0)                     */
    int64_t *picks;    /* [Lm, S] routed picks                                                */
    int64_t *tokens;   /* [Lm, S] tokens counted                                              */
    int64_t *coact;    /* [Lm, X, X]                                                           */
    double *mass;      /* [Lm, X]                                                              */
    int64_t records, rows;
    /* the previous first-of-step record of the counted half (for (b)) */
    int prev_batch, prev_step, prev_rows;
    int64_t *prev_image; /* [cap] */
    uint8_t *prev_unc;   /* [cap] */
    int32_t *prev_ids;   /* [Lm, cap*T, k] */
    int prev_cap;
    int last_batch, last_step;
};

/* The JSON of dm_route_analysis_json written to f. */
dm_status dm_route_analysis_write_json(const dm_route_analysis *a, int bands, FILE *f);

#endif

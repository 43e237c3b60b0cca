/* Structured expert pruning (docs/moe-lab.md; spec docs/spec/moe-inference.md A4, STUN).
 *
 * Choosing the experts to keep, per MoE layer, two ways:
 *  - STUN: a distance between experts (behaviour: minus the co-activation count of the pair,
 *    divided by its mean over pairs; optionally plus lambda x the L2 distance of their router
 *    rows divided by its mean), greedy agglomerative clustering with complete linkage until
 *    `keep` clusters remain (complete linkage never inverts, so this is the threshold STUN
 *    binary-searches for), and per cluster the member closest to the cluster centroid of the
 *    flattened expert weights (or, without weights, the member with the most gate mass).
 *  - exhaustive: every subset of `keep` experts (C(8,6) = 28, C(16,8) = 12870), scored by the
 *    objective below on calibration router probabilities; the lowest wins (ties: the subset
 *    that comes first in lexicographic order of kept ids).
 * Objective ("lost top-k mass"): over calibration tokens with full router probabilities p [E]
 * (the model's own routing over classes x timesteps), the mean of
 *     sum of the k largest p  -  sum of the k largest p among the kept experts,
 * i.e. how much of the trained routed mass the best kept experts cannot cover. Both methods are
 * scored by it, so they can be compared.
 *
 * The rewrite (DiT-MoE): drop the pruned experts' tensors, renumber the kept ones 0..keep-1 in
 * ascending original id, keep the same rows of blocks.L.moe.gate.weight, set num_experts. The
 * pruned model's router is then a softmax over the kept experts, which is EXACTLY the original
 * model with the dropped experts' router logits set to -inf (exp(-inf) = 0 drops them from
 * the normaliser): the remaining probabilities are renormalised over the kept experts, so the
 * top-k weights are larger than the original model's (that is the definition implemented; it is
 * NOT "original probabilities with dropped experts masked", which would need no renormalisation
 * and cannot be written as a smaller router). */
#ifndef DM_ROUTER_PRUNE_H
#define DM_ROUTER_PRUNE_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

#define DM_PRUNE_MAX_E 64

/* dist [E, E] (0 on the diagonal). coact [E, E] co-activation counts (diagonal ignored);
 * router [E, D] rows or NULL; lambda weighs the router term (ignored without rows). */
void dm_prune_distance(int E, const int64_t *coact, const float *router, int D, double lambda,
                       double *dist);
/* Complete-linkage clustering of E items to `keep` clusters: cluster [E] = 0..keep-1 (numbered
 * by smallest member). Ties merge the pair with the smallest (lower, higher) cluster ids. */
void dm_prune_cluster(int E, const double *dist, int keep, int *cluster);
/* One expert per cluster: closest to the cluster's centroid of weights[e] (n floats each; ties
 * within relative 1e-9, e.g. any 2-member cluster, go to the larger mass[e], then the lower id;
 * when weights is NULL, the largest mass[e]). kept [keep] ascending. */
void dm_prune_representatives(int E, const int *cluster, int keep, const float *const *weights,
                              size_t n, const double *mass, int *kept);
/* The objective of a keep-set (mask [E], 1 = kept) on M tokens of probs [M, E], top-k. */
double dm_prune_lost_mass(const float *probs, int64_t M, int E, int k, const uint8_t *mask);
/* Exhaustive search: the best `keep` experts; kept [keep] ascending; returns the objective. */
double dm_prune_exhaustive(const float *probs, int64_t M, int E, int k, int keep, int *kept);

/* ---- the model rewrite ---------------------------------------------------------------------- */

typedef enum { DM_PRUNE_COPY = 0, DM_PRUNE_RENAME, DM_PRUNE_DROP, DM_PRUNE_ROWS } dm_prune_op_kind;
typedef struct {
    dm_prune_op_kind op;
    char src[160];   /* tensor of the input file */
    char dst[160];   /* its name in the output (COPY/RENAME/ROWS) */
    int n_rows;      /* ROWS: keep these rows of dim 0, in this order */
    int32_t rows[DM_PRUNE_MAX_E];
} dm_prune_op;

typedef struct {
    int layers;                       /* MoE layers (DiT-MoE: depth)                      */
    int block[DM_TRACE_MAX_LAYERS];   /* transformer block of each                        */
    int E, keep;                      /* experts before / after (the same in every layer) */
    int kept[DM_TRACE_MAX_LAYERS][DM_PRUNE_MAX_E]; /* [layers][keep] ascending original ids */
} dm_prune_plan;

/* The op list turning f (a DiT-MoE file of config cfg) into the pruned model: one op per input
 * tensor, in file order. *ops malloc'd. DM_ERR_ARG for ProMoE (not implemented: its prototype
 * rows would be dropped the same way, docs/moe-lab.md) or a plan that does not fit cfg. */
dm_status dm_prune_ops(const dm_st_file *f, const dm_config *cfg, const dm_prune_plan *p,
                       dm_prune_op **ops, int *n_ops);
/* Apply ops: out [n_out] tensors (data points into f, or into *owned for ROWS; free *owned and
 * the names with dm_prune_tensors_free). */
dm_status dm_prune_apply(const dm_st_file *f, const dm_prune_op *ops, int n_ops, dm_st_tensor **out,
                         int *n_out, void **owned);
void dm_prune_tensors_free(dm_st_tensor *t, int n, void *owned);
/* The output's "ditmoe" metadata: f's with num_experts = keep and a "pruned" object
 * {"from_experts", "kept": [[ids] per layer], "method"}. malloc'd JSON string. */
dm_status dm_prune_metadata(const dm_st_file *f, const dm_prune_plan *p, const char *method,
                            char **json);

#endif

/* Structured expert pruning (docs/moe-lab.md; spec docs/spec/moe-inference.md A4, STUN): the
 * steps behind ditmoe.h's dm_prune_stun and dm_prune_write, for tests. The methods, the
 * objective and what the rewrite preserves are described in ditmoe.h ("MoE lab: analysis and
 * pruning"). */
#ifndef DM_ROUTER_PRUNE_H
#define DM_ROUTER_PRUNE_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

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

/* ---- the model rewrite ---------------------------------------------------------------------- */

typedef enum { DM_PRUNE_COPY = 0, DM_PRUNE_RENAME, DM_PRUNE_DROP, DM_PRUNE_ROWS } dm_prune_op_kind;
typedef struct {
    dm_prune_op_kind op;
    char src[160];   /* tensor of the input file */
    char dst[160];   /* its name in the output (COPY/RENAME/ROWS) */
    int n_rows;      /* ROWS: keep these rows of dim 0, in this order */
    int32_t rows[DM_PRUNE_MAX_E];
} dm_prune_op;

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
/* The output's "ditmoe" metadata: f's with num_experts = max keep and a "pruned" object
 * {"from_experts", "kept": [[ids] per layer], "method"}. malloc'd JSON string. */
dm_status dm_prune_metadata(const dm_st_file *f, const dm_prune_plan *p, const char *method,
                            char **json);

#endif

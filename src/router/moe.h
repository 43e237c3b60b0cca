/* The routing rules of the MoE feed-forward layers, and the plain references every backend's `ffn`
 * op is tested against (tests/test_backend_ops.c). The layer description (dm_moe_desc,
 * dm_ffn_layer) is in backend/backend.h because it crosses the seam; what it means is here.
 *
 * DiT-MoE (docs/spec/ditmoe.md §2.8): linear gate, softmax over all experts, top-k without
 * renormalisation, SwiGLU experts without bias, an always-on shared SwiGLU expert. ProMoE
 * (docs/spec/promoe.md §3): samples whose label is the null class send every token to the
 * unconditional expert (index E) with weight 1; other tokens are scored by cosine similarity to
 * unit-norm prototypes (identity / softmax / sigmoid activation), token-choice top-k or
 * expert-choice (each expert takes its top tokens of each image, capacity dm_moe_ec_capacity);
 * GELU-tanh experts with biases; a shared expert on every token. Tie-breaking: token choice prefers
 * the lower expert id, expert choice the lower token index. */
#ifndef DM_ROUTER_MOE_H
#define DM_ROUTER_MOE_H

#include "backend/backend.h"

#include <stdint.h>

/* ---- rules (used by the references and by the CPU backend) ---- */

/* Expert-choice capacity: each routed expert takes floor(T / E * k) tokens of each image,
 * clamped to [1, T]. */
int dm_moe_ec_capacity(int T, int E, int k);
/* k largest of p[E], descending; ties go to the lower expert id. */
void dm_moe_top_k(const float *p, int E, int k, int32_t *ids, float *w);
/* Router scores of one token in place: s [E] holds its logits (softmax router) or its dot
 * products with the unit prototypes (then divided by ||x|| as F.normalize does, eps 1e-12, and
 * activated); x [D] is the token. */
void dm_moe_token_scores(const dm_moe_desc *d, const float *x, float *s);
/* Whether token n (image n / T) is routed to the unconditional expert. */
int dm_moe_is_uncond(const dm_moe_desc *d, const int64_t *y, int64_t null_id, int n, int T);
/* Insert (e, wt) into a token's record of k slots kept in descending weight (EC record). */
void dm_moe_record_pick(int32_t *ids, float *ws, int k, int e, float wt);

/* ---- references: plain loops over host float32 row-major weights ---- */

typedef struct {
    dm_mlp_act act;
    int F;                      /* 0 = absent */
    const float *w1, *b1;       /* [F1, D] (F1 = 2F SwiGLU, gate rows first), [F1] or NULL */
    const float *w2, *b2;       /* [D, F], [D] or NULL */
} dm_mlp_host;

typedef struct {
    dm_moe_desc d;
    const float *gate;           /* [E, D] (NULL for DENSE) */
    const dm_mlp_host *experts;  /* [n_experts] */
    dm_mlp_host shared;
} dm_ffn_host;

/* y [n, D] = MLP(x [n, D]). */
void dm_mlp_forward_ref(const dm_mlp_host *w, const float *x, int n, int D, float *y);
/* Routing record: ids/weights [N, k] (token choice: the top-k; expert choice: the k best picks). */
void dm_moe_route_ref(const dm_ffn_host *w, const float *h, int N, int T, const int64_t *y,
                      int64_t null_id, int32_t *ids, float *weights);
/* out [N, D] = the whole layer (routed experts + shared; DENSE: experts[0]). Expert choice may
 * give a token more than k experts: all count. */
void dm_ffn_forward_ref(const dm_ffn_host *w, const float *h, int N, int T, const int64_t *y,
                        int64_t null_id, float *out);

#endif

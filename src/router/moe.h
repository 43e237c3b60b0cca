/* Mixture-of-experts feed-forward layers and the dense MLP they are built from.
 *
 * DiT-MoE (ditmoe.md §2.8): linear gate, softmax over all experts, top-k without
 * renormalisation, SwiGLU experts without bias, an always-on shared SwiGLU expert.
 * ProMoE (promoe.md §3): samples whose label is the null class send every token to the
 * unconditional expert (index E) with weight 1; other tokens are scored by cosine similarity to
 * unit-norm prototypes (identity / softmax / sigmoid activation), token-choice top-k or
 * expert-choice (each expert takes its top tokens of each image); GELU-tanh experts with biases;
 * a shared expert on every token.
 * Either way, tokens are grouped by expert (a counting sort) and each expert runs one matrix
 * multiply over all its tokens. */
#ifndef DM_ROUTER_MOE_H
#define DM_ROUTER_MOE_H

#include "backend/cpu/ops.h"

#include <stdint.h>

typedef enum { DM_MLP_SWIGLU = 0, DM_MLP_GELU_TANH } dm_mlp_act;

typedef struct {
    dm_mlp_act act;
    int F;     /* hidden width (0 = absent) */
    dm_pmat w1; /* SwiGLU: [2F, D], rows [0,F) gate_proj, [F,2F) up_proj; GELU: [F, D] */
    float *b1;  /* [F] or NULL */
    dm_pmat w2; /* [D, F] */
    float *b2;  /* [D] or NULL */
} dm_mlp_w;

typedef enum { DM_ROUTE_SOFTMAX_TOPK = 0, DM_ROUTE_PROTO_TC, DM_ROUTE_PROTO_EC } dm_route_kind;
typedef enum { DM_GATE_IDENTITY = 0, DM_GATE_SOFTMAX, DM_GATE_SIGMOID } dm_gate_act;

typedef struct {
    dm_route_kind kind;
    int E, k, D;       /* routed experts, picks per token (EC: capacity factor), hidden */
    dm_pmat gate;      /* [E, D]: linear router weight, or unit-norm prototypes (PROTO_*) */
    dm_gate_act act;   /* score activation of the prototype routers */
    int n_experts;     /* E, or E + 1 with the unconditional expert at index E */
    dm_mlp_w *experts; /* [n_experts] */
    dm_mlp_w shared;   /* shared.F == 0 when absent */
} dm_moe_w;

/* Token -> expert assignment of one layer, grouped by expert (a counting sort). */
typedef struct {
    int N, k;
    int32_t *ids;    /* [N, k] chosen experts in descending weight, -1 = none */
    float *weights;  /* [N, k] their gate weights (0 for none) */
    int n_rows;      /* grouped rows (<= N*k) */
    int32_t *offset; /* [n_experts+1] start of each expert's slice of rows/slot_w */
    int32_t *cursor; /* [n_experts] scratch for the counting sort */
    int32_t *rows;   /* [N*k] token of each grouped row, expert-major, ascending token */
    float *slot_w;   /* [N*k] weight of each grouped row */
} dm_routing;

/* Scratch for one MoE or MLP call on up to `cap_tokens` tokens; grows on demand. */
typedef struct {
    int cap_tokens, D, F_max, E, k;
    float *scores;   /* [N, E] router logits / scores */
    float *xg;       /* [N*k, D] gathered rows */
    float *a;        /* [N*k, 2*F_max] first-layer output */
    float *h;        /* [N*k, F_max] activations */
    float *y;        /* [N*k, D] expert outputs */
    dm_routing r;
} dm_moe_scratch;

int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int n_experts, int k);
void dm_moe_scratch_free(dm_moe_scratch *s);

/* y [n, D] = MLP(x [n, D]); a, h: scratch of [n, 2F] and [n, F]. */
void dm_mlp_forward(const dm_mlp_w *w, const float *x, int n, int D, float *a, float *h, float *y);
void dm_mlp_forward_ref(const dm_mlp_w *w, const float *x, int n, int D, float *y);

/* Route h [N = B*T, D] (token n belongs to image n / T, whose label is y[n / T]; label == null_id
 * marks an unconditional image for ProMoE). Fills s->r. */
void dm_moe_route(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                  int64_t null_id, dm_moe_scratch *s);
/* out [N, D] = sum over picks of weight * Expert(h) + Shared(h), from the routing in s->r. */
void dm_moe_apply(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s, float *out);

/* Plain references: per token, per expert, loops (route_ref fills ids/weights [N, k]). */
void dm_moe_route_ref(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                      int64_t null_id, int32_t *ids, float *weights);
void dm_moe_forward_ref(const dm_moe_w *w, const float *h, int N, int T, const int64_t *y,
                        int64_t null_id, float *out);

#endif

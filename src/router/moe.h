/* The MoE feed-forward (DiT-MoE's SparseMoeBlock, ditmoe.md §2.8): a linear gate, softmax over
 * all experts, top-k without renormalisation, SwiGLU experts run as one GEMM per expert over the
 * tokens grouped to it, and an always-on shared SwiGLU expert. */
#ifndef DM_ROUTER_MOE_H
#define DM_ROUTER_MOE_H

#include <stdint.h>

typedef struct {
    float *gate_up; /* [2F, D]: rows [0,F) = gate_proj, rows [F,2F) = up_proj */
    float *down;    /* [D, F] */
    int F;          /* hidden width */
} dm_swiglu_w;

typedef struct {
    int E, k, D;
    float *gate;          /* [E, D] router weight, no bias */
    dm_swiglu_w *experts; /* [E] */
    dm_swiglu_w shared;   /* shared.F == 0 when absent */
} dm_moe_w;

/* Token -> expert assignment of one layer, grouped by expert (a counting sort). */
typedef struct {
    int N, E, k;
    int32_t *ids;    /* [N, k] chosen experts, descending weight */
    float *weights;  /* [N, k] their softmax probabilities (not renormalised) */
    int32_t *offset; /* [E+1] start of each expert's slice in rows/slot */
    int32_t *cursor; /* [E] scratch for the counting sort */
    int32_t *rows;   /* [N*k] token index of each grouped row, expert-major, ascending token */
    float *slot_w;   /* [N*k] gate weight of each grouped row */
} dm_routing;

/* Scratch for one MoE call on up to `cap_tokens` tokens; grows on demand. */
typedef struct {
    int cap_tokens, D, F_max, E, k;
    float *logits;   /* [N, E] */
    float *xg;       /* [N*k, D] gathered rows */
    float *gu;       /* [max(N*k, N), 2*F_max] */
    float *h;        /* [max(N*k, N), F_max] */
    float *y;        /* [max(N*k, N), D] */
    dm_routing r;
} dm_moe_scratch;

int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int E, int k);
void dm_moe_scratch_free(dm_moe_scratch *s);

/* Route h [N, D]: gate logits, softmax, top-k, grouping. Fills s->r. */
void dm_moe_route(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s);
/* Naive reference of the same: ids/weights [N, k] per token, descending weight. */
void dm_moe_route_ref(const dm_moe_w *w, const float *h, int N, int32_t *ids, float *weights);

/* out [N, D] = sum_k w * Expert_k(h) + Shared(h), using the routing in s->r (call route first). */
void dm_moe_apply(const dm_moe_w *w, const float *h, int N, dm_moe_scratch *s, float *out);
/* Naive reference: per token, per chosen expert, plain loops. */
void dm_moe_forward_ref(const dm_moe_w *w, const float *h, int N, float *out);

#endif

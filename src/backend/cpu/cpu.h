/* Internals of the CPU backend (backend/cpu/backend.c, moe.c, embed.c): its weight handle, its
 * context and the fast MoE path. Nothing outside src/backend/cpu and tests includes this. */
#ifndef DM_BACKEND_CPU_CPU_H
#define DM_BACKEND_CPU_CPU_H

#include "backend/backend.h"
#include "backend/cpu/ops.h"
#include "backend/cpu/lowp.h"

/* A CPU weight: LINEAR -> packed panels (float32 or the file's 16-bit form); VECTOR and CONV ->
 * float32 row-major. */
struct dm_weight {
    dm_weight_use use;
    dm_weight_role role;
    int rows, cols;
    dm_pmat pm; /* LINEAR (float path) */
    float *f;   /* VECTOR, CONV: [rows, cols] */
    dm_lpmat lp; /* LINEAR under --precision bf16 / --quant-experts (is_lp = 1): lowp.h */
    int is_lp;
};

/* y [N, W->rows] = x [N, W->cols] · W^T (+ b): the float packed GEMM or the low-precision one.
 * Small N (the per-image products: adaLN, timestep MLP, final modulation) runs on one thread
 * (same bits: every GEMM here is a fixed-order sum per element). DM_ERR_NOMEM only from the
 * low-precision path's activation scratch. */
dm_status dm_cpu_linear(const float *x, int N, const dm_weight *W, const float *b, float *y);
/* Rows at or below which dm_cpu_linear runs single-threaded ($DITMOE_TINY_ROWS overrides;
 * 0 = never). */
int dm_cpu_tiny_rows(void);

/* The float32 data of a VECTOR/CONV weight (NULL for NULL). */
static inline const float *dm_cpu_f(const dm_weight *w) { return w ? w->f : NULL; }

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

/* Grouped rows per token (the `k` to reserve): k, or more for expert choice with a clamped
 * capacity. */
int dm_moe_rows_per_token(const dm_moe_desc *d, int T);
int dm_moe_scratch_reserve(dm_moe_scratch *s, int N, int D, int F_max, int n_experts, int k);
void dm_moe_scratch_free(dm_moe_scratch *s);

/* y [n, D] = MLP(x [n, D]); a, h: scratch of [n, 2F] and [n, F]. */
dm_status dm_mlp_forward(const dm_mlp_layer *w, const float *x, int n, float *a, float *h, float *y);
/* Route h [N = B*T, D] into s->r (labels / null_id as the ffn op). */
void dm_moe_route(const dm_ffn_layer *L, const float *h, int N, int T, const int64_t *y,
                  int64_t null_id, dm_moe_scratch *s);
/* out [N, D] = sum over picks of weight * Expert(h) + Shared(h), from the routing in s->r. */
dm_status dm_moe_apply(const dm_ffn_layer *L, const float *h, int N, dm_moe_scratch *s, float *out);
/* The routed part alone from an explicit grouping (offset [n_experts+1] / rows / slot_w),
 * the scratch reserved for offset[n_experts] rows; and out [N, D] += MLP(h) (shared expert).
 * dm_moe_apply = the first on s->r, then the second: the same arithmetic in the same order. */
dm_status dm_moe_apply_grouped(const dm_ffn_layer *L, const float *h, int N, dm_moe_scratch *s,
                               const int32_t *offset, const int32_t *rows, const float *slot_w,
                               float *out);
dm_status dm_moe_mlp_add(const dm_mlp_layer *w, const float *h, int N, int D, dm_moe_scratch *s,
                         float *out);

/* Fast embedding kernels (embed.c); references in src/dit/embed.c. */
void dm_patchify(const float *x, int B, int C, int S, int p, float *patches);
void dm_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out);
void dm_timestep_sinusoid(const float *t, int B, float *out);

typedef struct {
    dm_moe_scratch moe;
    dm_lp_policy lp;   /* --precision / --quant-experts (dm_load_opts) */
    float *col;        /* VAE im2col bands */
    size_t col_cap;    /* floats */
    float *attn_ws;    /* VAE attention scratch */
    size_t attn_cap;   /* floats */
} dm_cpu_ctx;

#endif

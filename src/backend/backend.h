/* The compute seam: the ONLY compute interface that src/dit, src/router and src/vae see.
 *
 * A backend is a table of ops (dm_backend_ops) plus its private context. The model code holds
 * opaque weight handles (dm_weight *) and buffers the backend allocated (dm_buf), and calls
 * `be->ops->op(be->ctx, ...)`; it never includes a file under src/backend/<name>/ and never
 * calls BLAS. One instance per model / VAE (dm_backend_open), so scratch lives in the instance.
 *
 * Conventions for every op:
 *  - returns dm_status (DM_OK or a dm_fail(...) code; DM_ERR_NOMEM, DM_ERR_BACKEND, DM_ERR_ARG);
 *  - `float *` / `const float *` arguments are BACKEND memory (inside a dm_buf from alloc, or an
 *    offset into one) unless the comment says "host"; row-major float32, shapes beside them;
 *  - labels, timesteps and routing records are small HOST arrays (a device backend copies them);
 *  - an op may run asynchronously; download() and sync() order it against the host;
 *  - a NULL entry in the table means "not supported by this backend": the model checks at load
 *    (dm_backend_require) and fails with DM_ERR_BACKEND, never falls back silently mid-run;
 *  - a token's result should depend only on its own image (batch invariance) and not on the thread
 *    count; a backend that cannot promise it for an op says so (docs/architecture.md).
 *
 * Semantics (what each op computes) are defined by the plain references: src/router/moe.h
 * (*_ref, the MoE rules), src/vae/vae_ref.h (VAE), src/dit/model.h (embedding *_ref) and
 * backend/cpu/ops.h (*_ref of the dense kernels); tests/test_backend_ops.c runs every op of every
 * compiled backend against them.
 * See docs/architecture.md for how a new backend plugs in. */
#ifndef DM_BACKEND_BACKEND_H
#define DM_BACKEND_BACKEND_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

/* Width of the timestep sinusoid (timestep_embed). */
#define DM_TIME_FREQ_DIM 256

/* ---- memory ----------------------------------------------------------------------------------- */

/* Memory a backend owns (host memory for the CPU, device memory for a GPU). */
typedef struct {
    void *p;      /* backend address (pointer arithmetic on it is allowed) */
    size_t bytes; /* 0 for an empty buffer */
} dm_buf;

/* ---- weights ---------------------------------------------------------------------------------- */

/* What a weight is FOR. A backend may choose storage per role: e.g. quantise routed experts only
 * (int8), keep routers and norms in float32. Such a precision choice arrives as a field of
 * dm_load_opts, which dm_backend_open passes to the backend, so model code does not change. The
 * CPU backend (weights_lowp.c): under --precision bf16, ATTN, EXPERT, SHARED and MLP weights run
 * with bf16 operands while EMBED, MOD, FINAL and ROUTER stay float32; --quant-experts stores
 * EXPERT as int8/int4; otherwise the file's F32, or its BF16/F16 kept 16-bit. */
typedef enum {
    DM_ROLE_EMBED = 0, /* patch embedding, timestep MLP, label table, position table */
    DM_ROLE_MOD,       /* adaLN modulation linears */
    DM_ROLE_ATTN,      /* qkv and output projections */
    DM_ROLE_ROUTER,    /* MoE gate / ProMoE prototypes (keep precise: top-k picks depend on it) */
    DM_ROLE_EXPERT,    /* routed experts (incl. the ProMoE unconditional expert) */
    DM_ROLE_SHARED,    /* shared expert */
    DM_ROLE_MLP,       /* dense MLP blocks */
    DM_ROLE_FINAL,     /* final layer */
    DM_ROLE_NORM,      /* biases, norm affine vectors */
    DM_ROLE_VAE,       /* VAE convolutions and attention */
    DM_ROLE_COUNT
} dm_weight_role;

/* How the ops read it (fixes which layouts are allowed). */
typedef enum {
    DM_USE_LINEAR = 0, /* W [rows = out, cols = in] for linear / ffn / attention projections;
                        * layout is the backend's choice (CPU: 32-wide panels, see ops.h) */
    DM_USE_VECTOR,     /* [rows * cols] float32 values: biases, norm weights, embedding tables,
                        * position table (read by add_rows / embed_add / as a bias) */
    DM_USE_CONV,       /* VAE conv weight [rows = Cout, cols = Cin*k*k] or VAE attention [C, C] */
} dm_weight_use;

typedef struct {
    const char *name;    /* tensor name, for messages ("blocks.3.attn.qkv.weight") */
    dm_weight_role role;
    dm_weight_use use;
    dm_dtype dtype;      /* dtype of `data` (any dtype dm_convert_to_f32 accepts) */
    int rows, cols;      /* logical row-major shape [rows, cols]; vectors: rows = n, cols = 1 */
    const void *data;    /* host bytes as stored in the file (may be unaligned); the backend copies,
                          * converts or packs them and never keeps the pointer */
    /* Pre-quantised weight from a file (docs/format.md "Quantised routed experts"; only LINEAR,
     * role EXPERT): quant 0 = none (data is float of `dtype`); 8 = data int8 [rows, cols] (dtype
     * I8) and scale float32 [rows]; 4 = data uint8 [rows, cols / 2] (dtype U8; even k in the low
     * nibble, two's complement) and scale bf16 bits [rows, cols / 32]; value = q * scale. Both
     * may be unaligned. A backend that cannot take them fails naming the tensor. */
    int quant;
    const void *scale;
} dm_weight_desc;

/* Opaque: one tensor in the backend's layout. */
typedef struct dm_weight dm_weight;

/* ---- layer descriptions (weights as handles) -------------------------------------------------- */

/* q/k LayerNorm over the head dim inside attention (XL/G "qknorm" layout). */
typedef struct {
    const dm_weight *q_w, *q_b, *k_w, *k_b; /* [hd] each (VECTOR) */
    float eps;                               /* 1e-6 DiT-MoE, 1e-5 ProMoE */
} dm_attn_qk;

/* One MLP (an expert, the shared expert or a dense block). */
typedef enum { DM_MLP_SWIGLU = 0, DM_MLP_GELU_TANH } dm_mlp_act;
typedef struct {
    dm_mlp_act act;
    int F;                 /* hidden width (0 = absent) */
    const dm_weight *w1;   /* SwiGLU: [2F, D], rows [0,F) gate_proj, [F,2F) up_proj; GELU: [F, D] */
    const dm_weight *b1;   /* [F] or NULL */
    const dm_weight *w2;   /* [D, F] */
    const dm_weight *b2;   /* [D] or NULL */
} dm_mlp_layer;

/* What a feed-forward layer computes; the rules live in src/router/moe.h (dm_moe_desc and the
 * _ref functions). */
typedef enum {
    DM_ROUTE_SOFTMAX_TOPK = 0, /* DiT-MoE: softmax over E logits, top-k, no renormalisation */
    DM_ROUTE_PROTO_TC,         /* ProMoE token choice: cosine to prototypes, activation, top-k */
    DM_ROUTE_PROTO_EC,         /* ProMoE expert choice: each expert takes its top tokens per image */
    DM_ROUTE_DENSE,            /* no routing: experts[0] on every token (dense MLP block) */
} dm_route_kind;
typedef enum { DM_GATE_IDENTITY = 0, DM_GATE_SOFTMAX, DM_GATE_SIGMOID } dm_gate_act;

typedef struct {
    dm_route_kind kind;
    int E;           /* routed experts (0 for DENSE) */
    int k;           /* picks per token (token choice) or capacity factor (expert choice) */
    int D;           /* hidden */
    dm_gate_act act; /* score activation of the prototype routers */
    int n_experts;   /* E, or E + 1 with the unconditional expert at index E (null-class images);
                      * 1 for DENSE */
} dm_moe_desc;

typedef struct {
    dm_moe_desc d;
    const dm_weight *gate;       /* [E, D]: linear router, or unit-norm prototypes (PROTO_*);
                                  * NULL for DENSE */
    const dm_mlp_layer *experts; /* [n_experts] */
    dm_mlp_layer shared;         /* shared.F == 0 when absent */
} dm_ffn_layer;

/* Optional routing record of one layer, HOST memory: ids [N, k] in descending weight (-1 none),
 * weights [N, k] (may be NULL). Filled only when the caller passes one. */
typedef struct {
    int32_t *ids;
    float *weights;
} dm_route_record;

/* VAE mid-block attention: x += Wo·attn(GN(x)) + bo, one head of dim C. */
typedef struct {
    const dm_weight *gn_g, *gn_b;           /* [C] VECTOR */
    const dm_weight *wq, *bq, *wk, *bk;     /* [C, C] CONV, [C] VECTOR */
    const dm_weight *wv, *bv, *wo, *bo;
} dm_vae_attn_layer;

/* ---- the table -------------------------------------------------------------------------------- */

typedef struct dm_backend_ops {
    const char *name; /* "cpu", "cuda": as dm_backend_name */

    void (*close)(void *ctx); /* frees the instance's scratch (called by dm_backend_close) */

    /* -- memory -- */
    dm_status (*alloc)(void *ctx, size_t bytes, dm_buf *out); /* contents undefined */
    void (*release)(void *ctx, dm_buf *b);                     /* NULL-safe; zeroes *b */
    dm_status (*upload)(void *ctx, void *dst, const void *host_src, size_t bytes);
    dm_status (*download)(void *ctx, void *host_dst, const void *src, size_t bytes);
    dm_status (*sync)(void *ctx);

    /* -- weights -- */
    dm_status (*weight)(void *ctx, const dm_weight_desc *d, dm_weight **out);
    void (*weight_free)(void *ctx, dm_weight *w); /* NULL-safe */
    size_t (*weight_bytes)(const dm_weight *w);   /* storage, for the load message */

    /* -- DiT -- (N = B*T token rows; "mod" rows are per image: row b of [B, mod_stride]) */
    /* y [N, out] = x [N, in] · W^T (+ b [out] when b != NULL). W: LINEAR [out, in]. */
    dm_status (*linear)(void *ctx, const float *x, int N, const dm_weight *W, const dm_weight *b,
                        float *y);
    /* y [B*T, D] = LayerNorm(x) (no affine, biased variance, eps), then when shift != NULL:
     * y = y * (1 + scale[b]) + shift[b] (adaLN modulate; shift/scale rows of stride mod_stride). */
    dm_status (*layernorm_mod)(void *ctx, const float *x, int B, int T, int D, float eps,
                               const float *shift, const float *scale, int mod_stride, float *y);
    /* x [B*T, D] += gate[b] * y (gate rows of stride mod_stride). */
    dm_status (*gated_add)(void *ctx, float *x, const float *y, int B, int T, int D,
                           const float *gate, int mod_stride);
    /* x [n] = silu(x) in place. */
    dm_status (*silu)(void *ctx, float *x, size_t n);
    /* out [B, 256] = [cos(t f_k), sin(t f_k)], f_k = exp(-ln(1e4) k / 128); t: HOST [B]. */
    dm_status (*timestep_embed)(void *ctx, const float *t, int B, float *out);
    /* patches [B*T, C*p*p] (c, pi, pj order) from x [B, C, S, S]; T = (S/p)^2. */
    dm_status (*patchify)(void *ctx, const float *x, int B, int C, int S, int p, float *patches);
    /* out [B, Cout, S, S] from tok [B*T, p*p*Cout] ((pi, pj, c) order). */
    dm_status (*unpatchify)(void *ctx, const float *tok, int B, int Cout, int S, int p, float *out);
    /* x [B, n] += table [n] (the same row added to each of B rows: position embedding). */
    dm_status (*add_rows)(void *ctx, float *x, int B, size_t n, const dm_weight *table);
    /* x [B, D] += table [labels[b], :] (label embedding); table VECTOR [rows * D], labels HOST [B]
     * already range-checked by the caller. */
    dm_status (*embed_add)(void *ctx, float *x, int B, int D, const dm_weight *table,
                           const int64_t *labels);
    /* out [B*T, H*hd] = softmax(q k^T / sqrt(hd)) v per image and head, no mask; qkv [B*T, 3*H*hd]
     * laid out [3][H][hd] per token; qk: optional LayerNorm of q and k over hd (NULL = none). */
    dm_status (*attention)(void *ctx, const float *qkv, int B, int T, int H, int hd,
                           const dm_attn_qk *qk, float *out);
    /* The whole feed-forward layer: route -> group tokens by expert -> expert GEMMs -> weighted
     * combine -> + shared expert. out [N, D] from h [N, D]; token n belongs to image n / T whose
     * label is labels[n / T] (HOST [N/T]; label == null_id marks a null-class image, which ProMoE
     * sends to the unconditional expert). rec: NULL, or the routing record to fill (token choice:
     * the picks; expert choice: the k best picks per token). DENSE ignores labels and rec. */
    dm_status (*ffn)(void *ctx, const dm_ffn_layer *L, const float *h, int N, int T,
                     const int64_t *labels, int64_t null_id, float *out, dm_route_record *rec);

    /* -- MoE lab (docs/moe-lab.md §7): the ffn op in its parts, for run-time routing policies,
     * skipped routed experts, the expert cache and weak routing. NULL = unsupported (the model
     * refuses lab options on this backend with one line). Token choice layers only. -- */
    /* scores [N, E] HOST = the router's scores of h [N, D]: softmax probabilities (DiT-MoE) or
     * activated prototype cosines (ProMoE), as dm_moe_token_scores. drop: NULL, or HOST [E] with
     * 1 = that expert's logit is -inf before the activation (a pruned model's router, softmax
     * over the kept experts: docs/moe-lab.md §5). */
    dm_status (*router_scores)(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                               const uint8_t *drop, float *scores);
    /* out [N, D] = sum over the grouped picks of row_w * Expert_e(h[row]) (0 for tokens without
     * picks): the routed part only. Grouping HOST: exp_off [n_experts+1], rows / row_w
     * [exp_off[n_experts]] expert-major with tokens ascending; combined per token in ascending
     * expert order (the ffn op's order, so top-k here is bit-identical to ffn minus shared). */
    dm_status (*moe_grouped)(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                             const int32_t *exp_off, const int32_t *rows, const float *row_w,
                             float *out);
    /* out [N, D] += MLP(h [N, D]) (the shared expert). */
    dm_status (*mlp_add)(void *ctx, const dm_mlp_layer *w, const float *h, int N, float *out);

    /* -- VAE -- (one image, channel-major [C, H, W]) */
    /* out [Cout, H, W] = conv(x [Cin, H, W]) + b, stride 1, zero padding (k-1)/2, k in {1, 3};
     * acc != 0: out += conv(x) + b (the residual add). out must not alias x. */
    dm_status (*conv2d)(void *ctx, const float *x, int Cin, int H, int W, const dm_weight *w,
                        const dm_weight *b, int Cout, int k, int acc, float *out);
    /* y [C, HW] = GroupNorm(x; G groups, eps) * gamma + beta, then SiLU when silu != 0; y may
     * equal x. */
    dm_status (*group_norm)(void *ctx, const float *x, int C, size_t HW, int G, float eps,
                            const dm_weight *gamma, const dm_weight *beta, int silu, float *y);
    /* out [C, 2H, 2W] = nearest 2x upsample of x [C, H, W]. */
    dm_status (*upsample2x)(void *ctx, const float *x, int C, int H, int W, float *out);
    /* In place: x [C, N] += Wo·attn(GN(x)) + bo, single head, scale 1/sqrt(C), G norm groups. */
    dm_status (*vae_attention)(void *ctx, float *x, int C, int N, int G,
                               const dm_vae_attn_layer *w);
} dm_backend_ops;

typedef struct dm_backend {
    const dm_backend_ops *ops;
    void *ctx;
    dm_backend_kind kind;
} dm_backend;

/* ---- registry (backend/backend.c) ------------------------------------------------------------- */

/* Open an instance of o->backend (dm_backend_check first: a backend this build lacks is
 * DM_ERR_ARG). The whole dm_load_opts reaches the backend (device index, later precision). */
dm_status dm_backend_open(const dm_load_opts *o, dm_backend **out);
void dm_backend_close(dm_backend *be); /* NULL-safe */
/* Backends compiled into this build, in order (CPU first). */
int dm_backend_compiled(dm_backend_kind *kinds, int cap);
/* DM_OK when every op named in `ops` (comma-separated field names, e.g. "linear,ffn") is present,
 * else DM_ERR_BACKEND naming the first missing one and `who` (a model path). */
int dm_backend_has(const dm_backend *be, const char *op); /* op: a field name of dm_backend_ops */
dm_status dm_backend_require(const dm_backend *be, const char *ops, const char *who);

/* Convenience for model code: create a weight from a host float32 array. */
dm_status dm_backend_weight_f32(dm_backend *be, const char *name, dm_weight_role role,
                                dm_weight_use use, int rows, int cols, const float *data,
                                dm_weight **out);

/* Per-backend constructors (backend/<name>/backend.c): fill be->ops and be->ctx. */
dm_status dm_backend_cpu_open(dm_backend *be, const dm_load_opts *o);
#ifdef DITMOE_HAVE_CUDA
dm_status dm_backend_cuda_open(dm_backend *be, const dm_load_opts *o);
#endif

#endif

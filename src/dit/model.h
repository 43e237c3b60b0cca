/* DiT-MoE / ProMoE weights and activations (internal to src/dit). Shapes follow the PyTorch state
 * dicts (docs/spec/ditmoe.md §3.1, docs/spec/promoe.md §4, docs/format.md). Every weight is a
 * handle of the model's backend (backend.h), created from the file's bytes and dtype: the backend
 * picks the storage (the CPU keeps BF16/F16 matrices 16-bit in its packed panels, F32 as float32).
 * Activations are backend memory. */
#ifndef DM_DIT_MODEL_H
#define DM_DIT_MODEL_H

#include "backend/backend.h"
#include "ditmoe.h"
#include "router/expert_cache.h"
#include "router/route_policy.h"

typedef struct {
    dm_weight *mod_w, *mod_b;           /* adaLN_modulation.1: [6D, D], [6D] */
    dm_weight *qkv_w, *qkv_b;           /* attn.qkv or attn.Wqkv: [3D, D], [3D] */
    dm_weight *q_norm_w, *q_norm_b;     /* attn.q_norm: [hd] (qknorm layout only, else NULL) */
    dm_weight *k_norm_w, *k_norm_b;     /* attn.k_norm: [hd] */
    dm_weight *proj_w, *proj_b;         /* attn.proj or attn.out_proj: [D, D], [D] */
    int is_moe;        /* 1: MoE feed-forward; 0: dense MLP (ProMoE even blocks) */
    dm_ffn_layer ffn;  /* the feed-forward layer as the backend's ffn op sees it */
    dm_mlp_layer *experts; /* [ffn.d.n_experts] owned (ffn.experts points here) */
    dm_mlp_layer mlp;  /* dense: mlp.fc1 [F, D] + [F], mlp.fc2 [D, F] + [D], GELU-tanh */
} dm_block_w;

/* Activation buffers (backend memory) for a batch of up to `cap_B` images. */
typedef struct {
    int cap_B;
    dm_buf xin;     /* [B, C, S, S] model input */
    dm_buf x;       /* [B*T, D] residual stream */
    dm_buf h;       /* [B*T, D] normalised + modulated input of a sub-layer */
    dm_buf qkv;     /* [B*T, 3D] */
    dm_buf att;     /* [B*T, D] attention output before the projection */
    dm_buf tmp;     /* [B*T, D] sub-layer output */
    dm_buf patches; /* [B*T, C*p*p] */
    dm_buf outp;    /* [B*T, p*p*Cout] final layer output per token */
    dm_buf out;     /* [B, Cout, S, S] model output */
    dm_buf tfreq;   /* [B, 256] timestep sinusoid */
    dm_buf thid;    /* [B, D] */
    dm_buf c;       /* [B, D] conditioning, then SiLU(c) */
    dm_buf mod;     /* [B, 6D] adaLN parameters of the current block */
} dm_workspace;

/* MoE-lab state of a model (forward.c; docs/moe-lab.md §7): the options, the expert cache and
 * host scratch of the split MoE path. All zero = off. */
typedef struct {
    int on;                      /* any option set: MoE layers take the split path            */
    dm_route_policy policy;      /* --route (checked against the model)                      */
    dm_skip_routed skip;         /* --skip-routed                                            */
    dm_expert_cache_opts cache_opts;
    dm_expert_cache *cache;      /* created by dm_model_lab_begin                            */
    int cache_rows;              /* rows the cache was created for                           */
    int64_t st_computed, st_reused; /* counters of caches freed since set_lab                */
    int slots;                   /* k slots of routing records                               */
    char route_s[96], skip_s[512], cache_s[96];
    int cap_N;                   /* tokens the scratch holds                                 */
    dm_route_csr csr, weak, mix, comp; /* policy picks, weak picks, per-row mix, compute view */
    float *scores;               /* [N, E] router scores (host; E of the layer)              */
    float *pscores;              /* [N, Emax] the same zero padded to the model's E (cache)  */
    float *routed;               /* [N, D] routed part (host, for the cache)                 */
    uint8_t *uncond, *is_weak, *keep, *recompute; /* [N] each                                */
    uint8_t *drop;               /* [L_moe, E] 1 = router logit at -inf (pruning check), or NULL */
} dm_lab;

struct dm_model {
    char *path;
    dm_config cfg;
    dm_backend *be;
    int T, G;                             /* tokens per image, token grid side */
    dm_weight *pos_embed;                 /* [T, D] */
    dm_weight *patch_w, *patch_b;         /* x_embedder.proj: [D, C*p*p], [D] */
    dm_weight *t_w1, *t_b1;               /* t_embedder.mlp.0: [D, 256], [D] */
    dm_weight *t_w2, *t_b2;               /* t_embedder.mlp.2: [D, D], [D] */
    dm_weight *y_table;                   /* y_embedder.embedding_table: [num_classes+1, D] */
    dm_block_w *blocks;                   /* [L] */
    dm_weight *final_mod_w, *final_mod_b; /* final_layer.adaLN_modulation.1: [2D, D], [2D] */
    dm_weight *final_w, *final_b;         /* final_layer.linear: [p*p*Cout, D], [p*p*Cout] */
    dm_weight **owned;                    /* every weight above, freed by dm_model_free */
    int n_owned, cap_owned;
    size_t weight_bytes;                  /* backend storage of all weights */
    dm_workspace ws;
    dm_lab lab;                           /* MoE lab options (forward.c)                    */
};

/* The split MoE layer (lab.c), used by forward.c: whether this evaluation needs it (options
 * on, or self-contrast weak rows), the expert cache's begin for the evaluation, and one layer
 * (out [N, D] backend memory; records go to routes at dm_model_route_slots slots). */
int dm_lab_wants_split(const dm_model *m, const dm_forward_rows *rows, int B);
/* Mask experts out of MoE layer `layer`'s router (drop [E], 1 = logit at -inf before the
 * softmax; NULL clears the layer): the original model with those experts' logits at -inf, which
 * is what a ditmoe-prune output computes (docs/moe-lab.md §5). Turns the split path on. */
dm_status dm_lab_set_drop(dm_model *m, int layer, const uint8_t *drop);
dm_status dm_lab_begin_eval(dm_model *m, int B, const dm_forward_rows *rows, int *use_cache);
dm_status dm_lab_moe(dm_model *m, const dm_block_w *bw, int block, int moe_layer, int B,
                     const int64_t *y, const dm_forward_rows *rows, int use_cache,
                     const float *h, float *out, dm_routes *routes);

/* The 2-D sin-cos position table out [G*G, D] (embed.c), used when the file has no pos_embed. */
void dm_pos_embed_2d(int D, int G, float *out);

/* Plain references of the embedding ops (embed.c), what every backend's patchify, unpatchify
 * and timestep_embed compute (host memory). */
void dm_patchify_ref(const float *x, int B, int C, int S, int p, float *patches);
void dm_unpatchify_ref(const float *tok, int B, int Cout, int S, int p, float *out);
void dm_timestep_sinusoid_ref(const float *t, int B, float *out);

#endif

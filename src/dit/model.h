/* DiT-MoE / ProMoE weights and activations (internal to src/dit). Shapes follow the PyTorch
 * state dicts (ditmoe.md §3.1, promoe.md §4); every weight is held as float32 whatever the
 * file's dtype. */
#ifndef DM_DIT_MODEL_H
#define DM_DIT_MODEL_H

#include "ditmoe.h"
#include "router/moe.h"

typedef struct {
    dm_pmat mod_w; float *mod_b; /* adaLN_modulation.1: [6D, D], [6D] */
    dm_pmat qkv_w; float *qkv_b; /* attn.qkv or attn.Wqkv: [3D, D], [3D] */
    float *q_norm_w, *q_norm_b; /* attn.q_norm: [hd] (qknorm layout only, else NULL) */
    float *k_norm_w, *k_norm_b; /* attn.k_norm: [hd] */
    dm_pmat proj_w; float *proj_b; /* attn.proj or attn.out_proj: [D, D], [D] */
    int is_moe;                 /* 1: MoE feed-forward (moe); 0: dense MLP (mlp, ProMoE even blocks) */
    dm_moe_w moe;
    dm_mlp_w mlp;               /* mlp.fc1 [F, D] + [F], mlp.fc2 [D, F] + [D], GELU-tanh */
} dm_block_w;

/* Activation buffers for a batch of up to `cap_B` images. */
typedef struct {
    int cap_B;
    float *x;       /* [B*T, D] residual stream */
    float *h;       /* [B*T, D] normalised + modulated input of a sub-layer */
    float *qkv;     /* [B*T, 3D] */
    float *att;     /* [B*T, D] attention output before the projection */
    float *tmp;     /* [B*T, D] sub-layer output */
    float *patches; /* [B*T, C*p*p] */
    float *outp;    /* [B*T, p*p*Cout] final layer output per token */
    float *tfreq;   /* [B, 256] timestep sinusoid */
    float *thid;    /* [B, D] */
    float *c;       /* [B, D] conditioning, then SiLU(c) */
    float *mod;     /* [B, 6D] adaLN parameters of the current block */
    dm_moe_scratch moe;
} dm_workspace;

struct dm_model {
    char *path;
    dm_config cfg;
    int T, G;                  /* tokens per image, token grid side */
    float *pos_embed;          /* [T, D] */
    dm_pmat patch_w; float *patch_b; /* x_embedder.proj: [D, C*p*p], [D] */
    dm_pmat t_w1; float *t_b1; /* t_embedder.mlp.0: [D, 256], [D] */
    dm_pmat t_w2; float *t_b2; /* t_embedder.mlp.2: [D, D], [D] */
    float *y_table;            /* y_embedder.embedding_table: [num_classes+1, D] */
    dm_block_w *blocks;        /* [L] */
    dm_pmat final_mod_w; float *final_mod_b; /* final_layer.adaLN_modulation.1: [2D, D], [2D] */
    dm_pmat final_w; float *final_b; /* final_layer.linear: [p*p*Cout, D], [p*p*Cout] */
    void **owned;              /* every buffer above (packed ones too), freed by dm_model_free */
    int n_owned, cap_owned;
    dm_workspace ws;
};

/* Embedding helpers (embed.c). */
#define DM_TIME_FREQ_DIM 256
void dm_patchify(const float *x, int B, int C, int S, int p, float *patches);
void dm_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out);
void dm_timestep_sinusoid(const float *t, int B, float *out);
void dm_pos_embed_2d(int D, int G, float *out);

#endif

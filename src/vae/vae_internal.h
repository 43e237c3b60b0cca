/* SD KL-f8 VAE decoder internals (spec/vae_samplers.md part A). Not part of the public API.
 * Activations are one image at a time, channel-major: x [C, H, W] row-major float32. */
#ifndef DM_VAE_INTERNAL_H
#define DM_VAE_INTERNAL_H

#include "ditmoe.h"

#ifndef DM_VAE_EPS
#define DM_VAE_EPS 1e-6f
#endif
#define DM_VAE_MAX_LEVELS 8
#define DM_VAE_MAX_RES 8 /* resnets per up level (num_res_blocks + 1) */

/* ---- kernels ----------------------------------------------------------------------------------
 * The fast kernels (dm_vae_conv2d, dm_vae_conv2d_acc, dm_vae_conv_col_size, dm_vae_group_norm,
 * dm_vae_upsample2x, dm_vae_attention, dm_vae_attn_ws_size) and dm_vae_attn_w live in the CPU
 * backend: src/backend/cpu/vae_kernels.h. Included here only until vae.c calls them through the
 * backend op table (issue 11). */
#include "backend/cpu/vae_kernels.h"

/* Plain references (vae_ref.c): naive loops, sums in double, no BLAS. Same shapes and meaning as
 * the fast kernels. */
void dm_vae_conv2d_ref(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *out);
void dm_vae_group_norm_ref(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                           const float *beta, int silu, float *y);
#ifndef DM_VAE_ATTN_W_DEFINED
#define DM_VAE_ATTN_W_DEFINED
typedef struct {
    const float *gn_g, *gn_b;       /* [C] */
    const float *wq, *bq, *wk, *bk; /* [C, C], [C] */
    const float *wv, *bv, *wo, *bo; /* [C, C], [C] */
} dm_vae_attn_w;
#endif
void dm_vae_attention_ref(float *x, int C, int N, int G, const dm_vae_attn_w *aw);

/* ---- model (vae_load.c, vae.c) --------------------------------------------------------------- */
typedef struct {
    int cin, cout, k;
    float *w; /* [cout, cin, k, k] */
    float *b; /* [cout] */
} dm_vae_conv;

typedef struct {
    int c;
    float *g, *b; /* [c] */
} dm_vae_gn;

typedef struct {
    int cin, cout;
    dm_vae_gn norm1, norm2;
    dm_vae_conv conv1, conv2;
    dm_vae_conv shortcut; /* w == NULL when cin == cout (identity) */
} dm_vae_res;

typedef struct {
    int c;
    dm_vae_gn norm;
    float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo; /* [c, c], [c] */
} dm_vae_attn;

typedef struct {
    int width;
    int nres;
    dm_vae_res res[DM_VAE_MAX_RES];
    int has_up;
    dm_vae_conv up; /* [width, width, 3, 3] */
} dm_vae_level;

struct dm_vae {
    char path[512];
    dm_vae_info info;
    int groups;
    int latent_ch;    /* channels after post_quant_conv (conv_in input) */
    int top;          /* width of conv_in / mid block */
    int levels;       /* L, up levels in execution (diffusers) order */
    int has_attn;
    dm_vae_conv post_quant; /* [latent_ch, z_channels, 1, 1] */
    dm_vae_conv conv_in;
    dm_vae_res mid[2];
    dm_vae_attn attn;
    dm_vae_level level[DM_VAE_MAX_LEVELS];
    dm_vae_gn norm_out;
    dm_vae_conv conv_out;
    /* workspace for the last (h, w) decoded */
    int ws_h, ws_w;
    float *act[3]; /* each [max C*H*W over the network] */
    float *col;    /* im2col bands */
    float *attn_ws;
    double prof_t[4], prof_flops; /* per-op wall time of the last decode (reported with -v) */
};

/* Load + infer config (vae_load.c). */
dm_status dm_vae_load_weights(const char *path, dm_vae *v);
void dm_vae_free_weights(dm_vae *v);

/* Decode one image: z [z_channels, h, w], already divided by the scaling factor, into
 * img [out_ch, h*f, w*f] (vae.c). Workspace must be allocated for (h, w). */
dm_status dm_vae_decode_one(dm_vae *v, int h, int w, const float *z, float *img);

#endif

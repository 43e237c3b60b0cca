/* SD KL-f8 VAE decoder internals (spec/vae_samplers.md part A). Not part of the public API.
 * Activations are one image at a time, channel-major: x [C, H, W] row-major float32. */
#ifndef DM_VAE_INTERNAL_H
#define DM_VAE_INTERNAL_H

#include "ditmoe.h"

#define DM_VAE_EPS 1e-6f
#define DM_VAE_MAX_LEVELS 8
#define DM_VAE_MAX_RES 8 /* resnets per up level (num_res_blocks + 1) */

/* ---- kernels (vae_ops.c); every fast kernel has a plain _ref beside it ---------------------- */

/* out [Cout, H, W] = conv(x [Cin, H, W], w [Cout, Cin, k, k], b [Cout] or NULL), stride 1,
 * zero padding (k-1)/2, k odd. Fast: im2col in bands of output rows + sgemm; col is scratch of
 * at least dm_vae_conv_col_size(Cin, H, W, k) floats (may be NULL for k == 1).
 * `out` must not alias `x`. */
size_t dm_vae_conv_col_size(int Cin, int H, int W, int k);
void dm_vae_conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out);
/* Same, accumulating: out += conv(x) + b (the residual add fused into the sgemm, beta = 1). */
void dm_vae_conv2d_acc(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *col, float *out);
void dm_vae_conv2d_ref(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *out);

/* y [C, HW] = GroupNorm(x [C, HW]; G contiguous groups, biased variance, eps) * gamma + beta,
 * then SiLU when silu != 0. y may equal x (in place). Statistics in double. */
void dm_vae_group_norm(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                       const float *beta, int silu, float *y);
void dm_vae_group_norm_ref(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                           const float *beta, int silu, float *y);

/* out [C, 2H, 2W] = nearest-neighbour 2x upsample of x [C, H, W]. */
void dm_vae_upsample2x(const float *x, int C, int H, int W, float *out);

/* In place: x [C, N] += Wo·attn(GN(x)) + bo, single head of dim C, scale 1/sqrt(C), tokens
 * n = y*W + x. Scratch ws of dm_vae_attn_ws_size(C, N) floats. Weights [C, C] (out, in). */
typedef struct {
    const float *gn_g, *gn_b;      /* [C] */
    const float *wq, *bq, *wk, *bk; /* [C, C], [C] */
    const float *wv, *bv, *wo, *bo; /* [C, C], [C] */
} dm_vae_attn_w;
size_t dm_vae_attn_ws_size(int C, int N);
void dm_vae_attention(float *x, int C, int N, int G, const dm_vae_attn_w *aw, float *ws);
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

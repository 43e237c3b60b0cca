/* SD KL-f8 VAE decoder internals (docs/spec/vae_samplers.md part A, docs/vae.md). Not part of the
 * public API. Activations are one image at a time, channel-major: x [C, H, W] row-major float32, in
 * memory of the decoder's backend; weights are backend handles. The ops it calls are in
 * backend/backend.h, what they compute in vae/vae_ref.h. */
#ifndef DM_VAE_INTERNAL_H
#define DM_VAE_INTERNAL_H

#include "backend/backend.h"
#include "ditmoe.h"
#include "vae/vae_ref.h"

#define DM_VAE_MAX_LEVELS 8
#define DM_VAE_MAX_RES 8 /* resnets per up level (num_res_blocks + 1) */

/* ---- model (vae_load.c, vae.c) --------------------------------------------------------------- */
typedef struct {
    int cin, cout, k;
    dm_weight *w; /* CONV [cout, cin*k*k] */
    dm_weight *b; /* [cout] */
} dm_vae_conv;

typedef struct {
    int c;
    dm_weight *g, *b; /* [c] */
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
    dm_weight *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo; /* CONV [c, c], [c] */
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
    dm_backend *be;
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
    dm_buf act[3]; /* each [max C*H*W over the network] floats, backend memory */
    dm_buf zbuf;   /* [z_channels, h, w] the scaled latent */
    dm_buf obuf;   /* [out_ch, h*f, w*f] the decoded image */
    double prof_t[4], prof_flops; /* per-op wall time of the last decode (reported with -v) */
    /* Small images of a batch are decoded side by side, one per thread, each by its own copy of
     * the decoder (own backend instance, weights and workspace; vae.c image_workers). */
    dm_load_opts opts;          /* as loaded (cfg NULL), to open the copies */
    long long file_size, file_mtime; /* of `path` at load: a copy is only made from the same file */
    int n_copies;
    struct dm_vae **copies;     /* [n_copies] */
};

/* Load + infer config (vae_load.c); v->be must be open. */
dm_status dm_vae_load_weights(const char *path, dm_vae *v);
void dm_vae_free_weights(dm_vae *v);

/* Decode one image: z [z_channels, h, w] (backend memory), already divided by the scaling
 * factor, into img [out_ch, h*f, w*f] (backend memory) (vae.c). Workspace must be allocated for
 * (h, w). */
dm_status dm_vae_decode_one(dm_vae *v, int h, int w, const float *z, float *img);

#endif

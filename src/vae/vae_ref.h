/* What the VAE decoder's ops compute: plain references (one image, channel-major [C, H, W],
 * row-major float32 on the host), the definition every backend's conv2d / group_norm /
 * upsample2x / vae_attention is tested against (tests/test_backend_ops.c, test_vae_ops.c). */
#ifndef DM_VAE_REF_H
#define DM_VAE_REF_H

#include <stddef.h>

#ifndef DM_VAE_EPS
#define DM_VAE_EPS 1e-6f /* every GroupNorm of the decoder */
#endif

/* out [Cout, H, W] = conv(x [Cin, H, W], w [Cout, Cin, k, k], b [Cout] or NULL), stride 1,
 * zero padding (k-1)/2, k odd; sums in double. */
void dm_vae_conv2d_ref(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *out);

/* y [C, HW] = GroupNorm(x [C, HW]; G contiguous groups, biased variance, eps) * gamma + beta,
 * then SiLU when silu != 0. y may equal x (in place). Statistics in double. */
void dm_vae_group_norm_ref(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                           const float *beta, int silu, float *y);

/* Mid-block attention weights, host float32 (weights [C, C] (out, in), vectors [C]); also the
 * CPU kernels' (backend/cpu/vae_kernels.h includes this header). */
typedef struct {
    const float *gn_g, *gn_b;      /* [C] */
    const float *wq, *bq, *wk, *bk; /* [C, C], [C] */
    const float *wv, *bv, *wo, *bo; /* [C, C], [C] */
} dm_vae_attn_w;
/* In place: x [C, N] += Wo·attn(GN(x)) + bo, single head of dim C, scale 1/sqrt(C), tokens
 * n = y*W + x, G norm groups (eps 1e-6). */
void dm_vae_attention_ref(float *x, int C, int N, int G, const dm_vae_attn_w *aw);

/* Nearest-neighbour 2x upsample has no separate reference: out[c, y, x] = in[c, y/2, x/2]. */

#endif

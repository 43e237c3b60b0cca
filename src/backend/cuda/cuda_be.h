/* The CUDA implementation of the op table (backend/backend.h): shared declarations of
 * backend.c, weights.c, ffn.c and vae.c. Compiled only where backend.h exists (the backend seam,
 * issue 11); before that merge these files compile to nothing. */
#ifndef DM_BACKEND_CUDA_CUDA_BE_H
#define DM_BACKEND_CUDA_CUDA_BE_H

#if defined(__has_include)
#if __has_include("backend/backend.h")
#define DMC_HAVE_SEAM 1
#endif
#endif

#ifdef DMC_HAVE_SEAM
#include "backend/backend.h"
#include "backend/cuda/ctx.h"

/* One tensor on the device. LINEAR / CONV weights (not ROUTER): 16-bit, fp16 checkpoints stay
 * fp16, bf16 stay bf16, fp32 become bf16 (rounded on the device). ROUTER weights and VECTORs:
 * fp32 (routing decisions and biases stay precise). Row-major [rows, cols] as in the file. */
struct dm_weight {
    int rows, cols;
    dm_weight_use use;
    dm_weight_role role;
    int ab; /* DMC_BF16, DMC_F16 or DMC_GEMM_F32 */
    void *p;
    size_t bytes;
};

dm_status dmc_be_weight(void *ctx, const dm_weight_desc *d, dm_weight **out);
void dmc_be_weight_free(void *ctx, dm_weight *w);
size_t dmc_be_weight_bytes(const dm_weight *w);

/* y [N, W->rows] fp32 = x [N, W->cols] fp32 . W^T (+ b): x rounded to W's type first. */
dm_status dmc_be_linear(void *ctx, const float *x, int N, const dm_weight *W, const dm_weight *b,
                        float *y);
dm_status dmc_be_ffn(void *ctx, const dm_ffn_layer *L, const float *h, int N, int T,
                     const int64_t *labels, int64_t null_id, float *out, dm_route_record *rec);
/* The MoE lab's split ops (backend.h): h, out device; scores, drop and the grouping HOST. */
dm_status dmc_be_router_scores(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                               const uint8_t *drop, float *scores);
dm_status dmc_be_moe_grouped(void *ctx, const dm_ffn_layer *L, const float *h, int N,
                             const int32_t *exp_off, const int32_t *rows, const float *row_w,
                             float *out);
dm_status dmc_be_mlp_add(void *ctx, const dm_mlp_layer *w, const float *h, int N, float *out);
dm_status dmc_be_conv2d(void *ctx, const float *x, int Cin, int H, int W, const dm_weight *w,
                        const dm_weight *b, int Cout, int k, int acc, float *out);
dm_status dmc_be_group_norm(void *ctx, const float *x, int C, size_t HW, int G, float eps,
                            const dm_weight *gamma, const dm_weight *beta, int silu, float *y);
dm_status dmc_be_upsample2x(void *ctx, const float *x, int C, int H, int W, float *out);
dm_status dmc_be_vae_attention(void *ctx, float *x, int C, int N, int G,
                               const dm_vae_attn_layer *w);

static inline const float *dmc_vec(const dm_weight *w) { return w ? (const float *)w->p : NULL; }

/* Open on device `device` (dm_backend_cuda_open uses device 0, i.e. the first of
 * CUDA_VISIBLE_DEVICES). Without a usable device: DM_ERR_BACKEND, one line. */
dm_status dm_backend_cuda_open_device(dm_backend *be, int device);
#endif

#endif

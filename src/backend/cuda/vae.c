/* VAE decoder ops on the GPU, one image channel-major [C, H, W] fp32 as the table defines them.
 * Convolutions: im2col (3x3) or the input itself (1x1) rounded to the weight's 16-bit type, one
 * pinned cuBLASLt GEMM with fp32 accumulation and output, bias per channel (and the residual
 * through beta = 1). GroupNorm: own deterministic kernels (double statistics, one CTA per group).
 * Mid-block attention: GroupNorm, q/k/v as 1x1 convolutions, fp32 scores by SGEMM, row softmax,
 * PV, output projection accumulated into x. */
#include "backend/cuda/cuda_be.h"

#ifdef DMC_HAVE_SEAM
#include <math.h>

#define VAE_EPS 1e-6f /* DM_VAE_EPS of vae/vae_internal.h */

dm_status dmc_be_conv2d(void *ctx, const float *x, int Cin, int H, int W, const dm_weight *w,
                        const dm_weight *b, int Cout, int k, int acc, float *out)
{
    dmc_ctx *c = ctx;
    const char *op = "conv2d";
    const size_t HW = (size_t)H * W;
    const int K = Cin * k * k;
    if (k != 1 && k != 3) return dm_fail(DM_ERR_ARG, "cuda: conv2d: kernel %d (1 or 3)", k);
    if (w->rows != Cout || w->cols != K)
        return dm_fail(DM_ERR_ARG, "cuda: conv2d: weight [%d, %d], expected [%d, %d]", w->rows,
                       w->cols, Cout, K);
    if (HW > 0x7fffffff) return dm_fail(DM_ERR_ARG, "cuda: conv2d: image too large");
    dm_status st;
    const int ab = w->ab;
    const void *col = x;
    if (ab != DMC_GEMM_F32) {
        uint16_t *c16 = dmc_scratch(c, DMC_SCR_COL, (size_t)K * HW * 2, op, &st);
        if (!c16) return st;
        st = dmc_err(k == 3 ? dmc_im2col3x3_h16(x, Cin, H, W, c16, (dmc_h16)ab, c->stream)
                            : dmc_f32_to_h16(x, (size_t)Cin * HW, c16, (dmc_h16)ab, c->stream), op);
        if (st) return st;
        col = c16;
    } else if (k == 3) {
        return dm_fail(DM_ERR_BACKEND, "cuda: conv2d: 3x3 convolution needs a 16-bit weight");
    }
    /* Column-major: out^T [HW, Cout] = col^T [HW, K] . W^T [K, Cout]. */
    if ((st = dmc_gemm(c, ab, 0, 0, (int)HW, Cout, K, col, (int)HW, w->p, K, acc ? 1.0f : 0.0f,
                       out, (int)HW, NULL, 0, op)))
        return st;
    return b ? dmc_err(dmc_add_bias_chan(out, Cout, HW, dmc_vec(b), c->stream), op) : DM_OK;
}

dm_status dmc_be_group_norm(void *ctx, const float *x, int C, size_t HW, int G, float eps,
                            const dm_weight *gamma, const dm_weight *beta, int silu, float *y)
{
    dmc_ctx *c = ctx;
    const char *op = "group_norm";
    if (G <= 0 || C % G) return dm_fail(DM_ERR_ARG, "cuda: group_norm: %d channels, %d groups", C, G);
    dm_status st;
    double *gs = dmc_scratch(c, DMC_SCR_SMALL, 65536, op, &st);
    if (!gs) return st;
    if ((size_t)G * 2 * sizeof(double) > 65536)
        return dm_fail(DM_ERR_ARG, "cuda: group_norm: %d groups (at most 4096)", G);
    return dmc_err(dmc_group_norm(x, C, HW, G, eps, dmc_vec(gamma), dmc_vec(beta), silu, y, gs,
                                  c->stream),
                   op);
}

dm_status dmc_be_upsample2x(void *ctx, const float *x, int C, int H, int W, float *out)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_upsample2x(x, C, H, W, out, c->stream), "upsample2x");
}

dm_status dmc_be_vae_attention(void *ctx, float *x, int C, int N, int G,
                               const dm_vae_attn_layer *w)
{
    dmc_ctx *c = ctx;
    const char *op = "vae_attention";
    dm_status st;
    const size_t CN = (size_t)C * N;
    float *h = dmc_scratch(c, DMC_SCR_VAE, 4 * CN * sizeof(float), op, &st);
    if (!h) return st;
    float *q = h + CN, *k = q + CN, *v = k + CN;
    float *S = dmc_scratch(c, DMC_SCR_S, (size_t)N * N * sizeof(float), op, &st);
    if (!S) return st;
    if ((st = dmc_be_group_norm(c, x, C, (size_t)N, G, VAE_EPS, w->gn_g, w->gn_b, 0, h))) return st;
    /* q, k, v [C, N] = W . h + b: the 1x1 convolution over the N = H*W pixels. */
    if ((st = dmc_be_conv2d(c, h, C, 1, N, w->wq, w->bq, C, 1, 0, q))) return st;
    if ((st = dmc_be_conv2d(c, h, C, 1, N, w->wk, w->bk, C, 1, 0, k))) return st;
    if ((st = dmc_be_conv2d(c, h, C, 1, N, w->wv, w->bv, C, 1, 0, v))) return st;
    const float scale = 1.0f / sqrtf((float)C), one = 1.0f, zero = 0.0f;
    /* Row-major S [N, N] = scale q^T k: column-major S'(j, i) = sum_c K'(j, c) Q'(i, c). */
    cublasStatus_t s = cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, N, N, C, &scale, k, N, q, N,
                                   &zero, S, N);
    if (s) return dmc_blas_err((int)s, op);
    if ((st = dmc_err(dmc_softmax_rows(S, (size_t)N, N, 1.0f, c->stream), op))) return st;
    /* o [C, N] (into h): column-major O'(i, c) = sum_j P'(j, i) V'(j, c), O' = P'^T V'. */
    s = cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, C, N, &one, S, N, v, N, &zero, h, N);
    if (s) return dmc_blas_err((int)s, op);
    /* x += Wo . o + bo */
    return dmc_be_conv2d(c, h, C, 1, N, w->wo, w->bo, C, 1, 1, x);
}
#else
typedef int dmc_vae_needs_backend_h; /* ISO C: no empty translation unit */
#endif

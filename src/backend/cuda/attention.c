/* Attention: the naive on-GPU reference (fp32: S = scale q k^T by strided-batched SGEMM, row
 * softmax, O = P v) and the dispatch to cuDNN's fused SDPA (attention_cudnn.c). The path is
 * chosen per shape the first time it is seen (plan time) and logged; a cuDNN failure after that
 * is an error, never a silent switch. */
#include "backend/cuda/ctx.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define S_BUDGET ((size_t)512 << 20) /* bytes of fp32 scores per chunk of images */

static dm_status attention_naive(dmc_ctx *c, const float *qkv, int B, int T, int H, int hd,
                                 const float *qw, const float *qb, const float *kw,
                                 const float *kb, float eps, float *out)
{
    const char *op = "attention";
    const size_t per = (size_t)B * H * T * hd;
    dm_status st;
    float *q = dmc_scratch(c, DMC_SCR_Q, 4 * per * sizeof(float), op, &st);
    if (!q) return st;
    float *k = q + per, *v = k + per, *o = v + per;
    if ((st = dmc_err(dmc_attn_split(qkv, B, T, H, hd, qw, qb, kw, kb, eps, q, k, v, c->stream), op)))
        return st;
    const size_t s_img = (size_t)H * T * T * sizeof(float);
    int chunk = (int)(S_BUDGET / s_img);
    chunk = chunk < 1 ? 1 : chunk > B ? B : chunk;
    float *S = dmc_scratch(c, DMC_SCR_S, (size_t)chunk * s_img, op, &st);
    if (!S) return st;
    const float scale = 1.0f / sqrtf((float)hd), one = 1.0f, zero = 0.0f;
    const long long sq = (long long)T * hd, ss = (long long)T * T;
    for (int b0 = 0; b0 < B; b0 += chunk) {
        const int nb = b0 + chunk <= B ? chunk : B - b0, batch = nb * H;
        const size_t off = (size_t)b0 * H * T * hd;
        /* Column-major: S'(j, i) = sum_d K'(d, j) Q'(d, i), i.e. row-major S[i, j] = q_i . k_j. */
        cublasStatus_t s = cublasSgemmStridedBatched(
            c->blas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, &scale, k + off, hd, sq, q + off, hd, sq,
            &zero, S, T, ss, batch);
        if (s) return dmc_blas_err((int)s, op);
        if ((st = dmc_err(dmc_softmax_rows(S, (size_t)batch * T, T, 1.0f, c->stream), op))) return st;
        /* O'(d, i) = sum_j V'(d, j) P'(j, i): row-major o[i, :] = sum_j P[i, j] v[j, :]. */
        s = cublasSgemmStridedBatched(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, &one, v + off,
                                      hd, sq, S, T, ss, &zero, o + off, hd, sq, batch);
        if (s) return dmc_blas_err((int)s, op);
    }
    return dmc_err(dmc_attn_merge(o, B, T, H, hd, out, c->stream), op);
}

static dm_status attention_cudnn(dmc_ctx *c, const float *qkv, int B, int T, int H, int hd,
                                 const float *qw, const float *qb, const float *kw,
                                 const float *kb, float eps, dmc_h16 t, float *out, int *usable)
{
    const char *op = "attention (cuDNN)";
    const size_t n_qkv = (size_t)B * T * 3 * H * hd, n_o = (size_t)B * T * H * hd;
    dm_status st = dmc_sdpa(c, NULL, B, T, H, hd, t, NULL, usable); /* plan (cached) */
    if (st || !*usable) return st;
    uint16_t *q16 = dmc_scratch(c, DMC_SCR_S, (n_qkv + n_o) * sizeof(uint16_t) + 256, op, &st);
    if (!q16) return st;
    uint16_t *o16 = q16 + ((n_qkv + 127) & ~(size_t)127);
    if ((st = dmc_err(dmc_attn_prep16(qkv, B, T, H, hd, qw, qb, kw, kb, eps, q16, t, c->stream), op)))
        return st;
    if ((st = dmc_sdpa(c, q16, B, T, H, hd, t, o16, usable))) return st;
    return dmc_err(dmc_h16_to_f32(o16, n_o, out, t, c->stream), op);
}

int dmc_attention(dmc_ctx *c, dmc_attn_path path, const float *qkv, int B, int T, int H, int hd,
                  const float *qw, const float *qb, const float *kw, const float *kb, float eps,
                  dmc_h16 t, float *out)
{
    if (path == DMC_ATTN_AUTO) path = (dmc_attn_path)c->attn_env;
    if (path == DMC_ATTN_NAIVE)
        return attention_naive(c, qkv, B, T, H, hd, qw, qb, kw, kb, eps, out);
    /* AUTO or CUDNN: dmc_sdpa decides at plan time whether cuDNN can run this shape (usable = 0
     * means "no plan": logged there once per shape). Forced CUDNN without a plan is an error. */
    int usable = 1;
    dm_status st = attention_cudnn(c, qkv, B, T, H, hd, qw, qb, kw, kb, eps, t, out, &usable);
    if (st || usable) return st;
    if (path == DMC_ATTN_CUDNN)
        return dm_fail(DM_ERR_BACKEND, "cuda: attention: DITMOE_CUDA_ATTN=cudnn but cuDNN has no "
                       "SDPA plan for T %d hd %d (%s)", T, hd, dm_last_error());
    return attention_naive(c, qkv, B, T, H, hd, qw, qb, kw, kb, eps, out);
}

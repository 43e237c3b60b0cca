/* CPU kernels used by the transformer (src/dit, src/router). Each fast kernel has a plain
 * reference (suffix _ref) beside it; tests/test_ops.c checks one against the other.
 * Row-major float32; shapes beside every pointer. */
#ifndef DM_BACKEND_CPU_OPS_H
#define DM_BACKEND_CPU_OPS_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

/* y[N,out] = x[N,in] · W[out,in]^T (+ b[out] when b != NULL). Our fixed-order GEMM (gemm.h),
 * W packed per call. Returns 0, or -1 when the packing buffer cannot be allocated. */
int dm_linear(const float *x, int N, int in, const float *W, const float *b, int out, float *y);
void dm_linear_ref(const float *x, int N, int in, const float *W, const float *b, int out, float *y);

/* Weights packed for dm_linear_packed: [ceil(out/DM_PANEL)][in][DM_PANEL], zero-padded, kept
 * in float32 or, for BF16/F16 checkpoints, in their 16-bit form (half the memory; converted to
 * float32 exactly inside the kernel). Every output element is a fixed-order sum over `in`,
 * independent of N, tiling and threads, so a token's result never depends on what else is in
 * the batch. */
#define DM_PANEL 32
typedef struct {
    int out, in;
    dm_dtype dtype; /* DM_F32, DM_BF16 or DM_F16 */
    void *p;        /* [ceil(out/32), in, 32] of dtype */
} dm_pmat;
int dm_pmat_pack(dm_pmat *pm, const float *W /* [out, in] */, int out, int in); /* -1: no memory */
/* Pack 16-bit weights as stored in a file (src may be unaligned). -1: no memory, -2: this build
 * cannot run `dtype` natively (the caller then converts to float32 and uses dm_pmat_pack). */
int dm_pmat_pack_half(dm_pmat *pm, const void *src /* [out, in] */, dm_dtype dtype, int out, int in);
void dm_pmat_free(dm_pmat *pm);
float dm_pmat_get(const dm_pmat *pm, int o, int i); /* W[o, i] */
size_t dm_pmat_bytes(const dm_pmat *pm);
/* y[N, out] = x[N, in] · W^T (+ b[out]). */
void dm_linear_packed(const float *x, int N, const dm_pmat *W, const float *b, float *y);
void dm_linear_packed_ref(const float *x, int N, const dm_pmat *W, const float *b, float *y);

/* Row-wise LayerNorm over D (biased variance), optional affine w[D], b[D] (NULL = none). */
void dm_layernorm(const float *x, int N, int D, float eps, const float *w, const float *b, float *y);
void dm_layernorm_ref(const float *x, int N, int D, float eps, const float *w, const float *b,
                      float *y);

/* In place: x = x * (1 + scale) + shift over rows of x [B*T, D]; shift/scale rows are picked per
 * sample b from mod [B, mod_stride] (shift at offset 0 and scale at offset D of the given pointers). */
void dm_modulate(float *x, int B, int T, int D, const float *shift, const float *scale, int mod_stride);

/* In place: x += gate[b] * y per sample b (gate rows from mod [B, mod_stride]). */
void dm_gated_add(float *x, const float *y, int B, int T, int D, const float *gate, int mod_stride);

/* SiLU in place over n values; and h[n] = silu(g[n]) * u[n] for SwiGLU with g,u interleaved as
 * gu [rows, 2F] (gate in [0,F), up in [F,2F)), output h [rows, F]. */
void dm_silu(float *x, size_t n);
void dm_swiglu(const float *gu, int rows, int F, float *h);

/* exp(x) for the activations, inline so the loops calling it vectorise (libm's expf is a call
 * per element): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6
 * polynomial; within a few ulp of expf over [-87, 88], clamped outside (+-Inf included). NaN in
 * gives NaN out: the clamps let NaN through to the polynomial, and the exponent n is replaced by
 * 0 before its integer conversion (converting NaN to int32_t would be undefined behaviour). */
static inline float dm_exp_fast(float x)
{
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float ni = n == n ? n : 0.0f; /* NaN only when x is NaN; p is NaN then */
    union {
        uint32_t u;
        float f;
    } scale = {.u = (uint32_t)((int32_t)ni + 127) << 23};
    return p * scale.f;
}

/* Softmax in place over each row of x [N, n], n >= 1: exp(x - max) by dm_exp_fast (exactly 0
 * where x - max < -87, so -inf entries give 0), summed in 16 lanes and a fixed tree (an order
 * that depends only on n), times the reciprocal of the sum. The reference is in double. */
void dm_softmax_rows(float *x, int N, int n);
void dm_softmax_rows_ref(float *x, int N, int n);

/* Multi-head self-attention, no mask. qkv [B*T, 3*H*hd] laid out [3][H][hd] per token;
 * q_norm/k_norm: optional LayerNorm over hd (eps qk->eps) with affine weight/bias [hd] shared by heads
 * (NULL = no qk-norm). out [B*T, H*hd], heads concatenated in head order. */
typedef struct {
    const float *q_w, *q_b; /* [hd] or NULL */
    const float *k_w, *k_b; /* [hd] or NULL */
    float eps;              /* 1e-6 DiT-MoE, 1e-5 ProMoE */
} dm_qk_norm;
/* Returns 0, or -1 when scratch memory cannot be allocated. */
int dm_attention(const float *qkv, int B, int T, int H, int hd, const dm_qk_norm *qk, float *out);
void dm_attention_ref(const float *qkv, int B, int T, int H, int hd, const dm_qk_norm *qk,
                      float *out);

/* ---- VAE decoder kernels (one image, channel-major [C, H, W]); references in vae/vae_ref.h ---- */
#include "backend/cpu/vae_kernels.h"

#endif

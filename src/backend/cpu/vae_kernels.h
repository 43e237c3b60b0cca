/* CPU kernels of the VAE decoder (vae_conv.c, vae_norm.c, vae_attention.c). One image at a time,
 * channel-major [C, H, W] row-major float32. Plain references: src/vae/vae_ref.c (*_ref, declared
 * in src/vae/vae_internal.h); tests/test_vae_ops.c checks one against the other.
 *
 * Every kernel gives the same bits for any thread count: each output value is computed by one
 * thread in an order fixed by the shapes alone (the matrix work goes through gemm.h). */
#ifndef DM_BACKEND_CPU_VAE_KERNELS_H
#define DM_BACKEND_CPU_VAE_KERNELS_H

#include "vae/vae_ref.h" /* DM_VAE_EPS, dm_vae_attn_w: the references' definitions */

#include <stddef.h>

/* Work (multiply-adds, or elements for the element-wise kernels) below which a kernel runs on
 * the calling thread alone: waking a team and meeting at its barrier costs more than the work
 * there, and on a loaded machine a spinning idle thread doubles the CPU time (the shipped
 * Fashion-MNIST VAE, 8x8 to 32x32 maps of 16-64 channels, is all below it; every SD-VAE conv is
 * above). Only the speed depends on it: the bits do not depend on the thread count. */
#ifndef DM_VAE_PAR_MACS
#define DM_VAE_PAR_MACS 8e6
#endif
#ifndef DM_VAE_PAR_ELEMS
#define DM_VAE_PAR_ELEMS 65536
#endif

/* out [Cout, H, W] = conv(x [Cin, H, W], w [Cout, Cin, k, k], b [Cout] or NULL), stride 1,
 * zero padding (k-1)/2, k odd. k == 3: Winograd F(4x4) or F(2x2) (vae_conv.c); other k > 1:
 * implicit im2col, one 32-pixel panel of the unrolled input at a time per thread, multiplied by
 * the weights with gemm.h; col is scratch of at least
 * dm_vae_conv_col_size(Cin, H, W, k) floats (may be NULL for k == 1, which reads x in place).
 * `out` must not alias `x`. */
size_t dm_vae_conv_col_size(int Cin, int H, int W, int k);
void dm_vae_conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out);
/* Same, accumulating: out += conv(x) + b (the residual add fused into the GEMM's epilogue). */
void dm_vae_conv2d_acc(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *col, float *out);

/* y [C, HW] = GroupNorm(x [C, HW]; G contiguous groups, biased variance, eps) * gamma + beta,
 * then SiLU when silu != 0. y may equal x (in place). Statistics in double. */
void dm_vae_group_norm(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                       const float *beta, int silu, float *y);

/* out [C, 2H, 2W] = nearest-neighbour 2x upsample of x [C, H, W]. */
void dm_vae_upsample2x(const float *x, int C, int H, int W, float *out);

/* In place: x [C, N] += Wo·attn(GN(x)) + bo, single head of dim C, scale 1/sqrt(C), tokens
 * n = y*W + x. Scratch ws of dm_vae_attn_ws_size(C, N) floats. Weights [C, C] (out, in). */
size_t dm_vae_attn_ws_size(int C, int N);
void dm_vae_attention(float *x, int C, int N, int G, const dm_vae_attn_w *aw, float *ws);

#endif

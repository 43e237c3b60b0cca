/* The CUDA backend's one internal header: kernel launchers (kernels_*.cu, extern "C") and the
 * opaque context API (context.c). No CUDA header is included and no CUDA type appears: a stream
 * is `struct CUstream_st *` (what cudaStream_t is), device pointers are plain pointers, 16-bit
 * values are uint16_t with a dmc_h16 tag. Every launcher enqueues on `s` and returns 0 or the
 * cudaError_t value of the launch (the host maps it with dmc_err, context.c).
 *
 * Every kernel has a CPU counterpart that defines it (the _ref functions of backend/cpu/ops.h,
 * router/moe.h, vae/vae_internal.h, sampler/noise.c); tests/test_cuda_ops.c compares each one
 * on the device with it. Determinism rules (docs/spec/cuda.md §4): row reductions in one warp or CTA
 * in a fixed order, no float atomics, integer counts only, stable orders everywhere. */
#ifndef DM_BACKEND_CUDA_DMCUDA_H
#define DM_BACKEND_CUDA_DMCUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *dmc_stream;
typedef enum { DMC_BF16 = 0, DMC_F16 = 1 } dmc_h16; /* a 16-bit storage type */

/* ---- conversions ---------------------------------------------------------------------------- */
int dmc_f32_to_h16(const float *x, size_t n, uint16_t *y, dmc_h16 t, dmc_stream s); /* RNE */
int dmc_h16_to_f32(const uint16_t *x, size_t n, float *y, dmc_h16 t, dmc_stream s);
/* y [n] fp32 from n values of a file dtype (0 F32, 1 F16, 2 BF16: dm_dtype order). */
int dmc_any_to_f32(const void *x, int dtype, size_t n, float *y, dmc_stream s);
/* y [n] 16-bit of type t from a file dtype (F16 -> F16 and BF16 -> BF16 are copies). */
int dmc_any_to_h16(const void *x, int dtype, size_t n, uint16_t *y, dmc_h16 t, dmc_stream s);
/* Host-side RNE conversions (tests, and rounding inputs to the device type). */
uint16_t dmc_host_f32_to_h16(float f, dmc_h16 t);
float dmc_host_h16_to_f32(uint16_t h, dmc_h16 t);

/* ---- DiT row ops (one warp per row, fixed-order butterfly reductions) ----------------------- */
/* y [B*T, D] = LN(x) (no affine, biased var) and, when shift != NULL, * (1 + scale[b]) + shift[b]
 * with shift/scale rows of stride mod_stride. y may equal x. */
int dmc_layernorm_mod(const float *x, int B, int T, int D, float eps, const float *shift,
                      const float *scale, int mod_stride, float *y, dmc_stream s);
/* x [B*T, D] += gate[b] * y. */
int dmc_gated_add(float *x, const float *y, int B, int T, int D, const float *gate,
                  int mod_stride, dmc_stream s);
int dmc_silu(float *x, size_t n, dmc_stream s);
/* patches [B*T, C*p*p] in (c, pi, pj) order from x [B, C, S, S]. */
int dmc_patchify(const float *x, int B, int C, int S, int p, float *patches, dmc_stream s);
/* out [B, Cout, S, S] from tok [B*T, p*p*Cout] in (pi, pj, c) order. */
int dmc_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out, dmc_stream s);
/* x [B, n] += table [n]. */
int dmc_add_rows(float *x, int B, size_t n, const float *table, dmc_stream s);
/* x [B, D] += table [labels[b], :]; labels on the device. */
int dmc_embed_add(float *x, int B, int D, const float *table, const int32_t *labels,
                  dmc_stream s);
/* y [n] = x [n] + bias [n % C]... per-row bias: x [R, C] += b [C]. */
int dmc_add_bias_rows(float *x, size_t R, int C, const float *b, dmc_stream s);
/* Channel-major: x [C, HW] += b [c] (a conv bias). */
int dmc_add_bias_chan(float *x, int C, size_t HW, const float *b, dmc_stream s);

/* ---- attention helpers ---------------------------------------------------------------------- */
/* q, k, v [B, H, T, hd] fp32 from qkv [B*T, 3*H*hd] ([3][H][hd] per token); q and k LayerNormed
 * over hd with affine (qw, qb, kw, kb [hd], eps) when qw != NULL. */
int dmc_attn_split(const float *qkv, int B, int T, int H, int hd, const float *qw,
                   const float *qb, const float *kw, const float *kb, float eps, float *q,
                   float *k, float *v, dmc_stream s);
/* qkv16 [B*T, 3*H*hd] 16-bit copy of qkv with q, k normalised in place (as above): the layout
 * cuDNN SDPA reads by strides. */
int dmc_attn_prep16(const float *qkv, int B, int T, int H, int hd, const float *qw,
                    const float *qb, const float *kw, const float *kb, float eps, uint16_t *qkv16,
                    dmc_h16 t, dmc_stream s);
/* out [B*T, H*hd] from o [B, H, T, hd]. */
int dmc_attn_merge(const float *o, int B, int T, int H, int hd, float *out, dmc_stream s);
/* In place: each row of x [rows, n] = softmax(scale * row) (fp32, max-subtracted). */
int dmc_softmax_rows(float *x, size_t rows, int n, float scale, dmc_stream s);

/* ---- MoE ------------------------------------------------------------------------------------ */
/* Router (one warp per token, fp32): scores [N, E] = h [N, D] . Wg [E, D]^T, then
 *   kind 0 (DiT-MoE): softmax over E;  kind 1/2 (ProMoE TC/EC): / max(|h|, 1e-12), then act
 *   (0 identity, 1 softmax, 2 sigmoid).
 * Token choice (kind 0, 1): ids/w [N, k] = top-k (ties -> lower id), and the pick matrix
 * sel/pw [N, nE] (sel 1 where picked, pw its weight). Tokens of images with uncond[b] != 0
 * (ProMoE, nE = E + 1) pick expert E with weight 1 (other slots -1 / 0). Kind 2, or ids ==
 * NULL, writes scores only (then dmc_moe_ec_select, or the MoE lab's router_scores). drop: NULL
 * or [E] on the device, 1 = that expert's logit is -inf before the activation (a pruned router,
 * as the CPU backend's router_scores). */
int dmc_moe_router(const float *h, int N, int T, int D, const float *Wg, int E, int k, int kind,
                   int act, const uint8_t *drop, const uint8_t *uncond, int nE, float *scores,
                   int32_t *ids, float *w, uint8_t *sel, float *pw, dmc_stream s);
/* Expert choice: expert e keeps token n of image b iff fewer than cap tokens of b beat it
 * (u > v, or u == v at a lower token); uncond images go to expert E (weight 1). */
int dmc_moe_ec_select(const float *scores, int N, int T, int E, int cap, const uint8_t *uncond,
                      int nE, uint8_t *sel, float *pw, dmc_stream s);
/* Routing record of the EC picks: per token the k picks of highest weight, experts visited in
 * ascending id and inserted by strictly greater weight (as record_pick in moe.c). */
int dmc_moe_ec_record(const uint8_t *sel, const float *pw, int N, int nE, int k, int32_t *ids,
                      float *w, dmc_stream s);
/* Grouping (stable, deterministic): counts[e] = #tokens picking e (one CTA per expert), then
 * offsets[nE+1] (exclusive scan), then rows[p] = token, slot_w[p] = weight, inv[n*nE+e] = p or -1
 * with tokens ascending inside each expert's slice. */
int dmc_moe_count(const uint8_t *sel, int N, int nE, int32_t *counts, dmc_stream s);
int dmc_moe_scan(const int32_t *counts, int nE, int32_t *offsets, dmc_stream s);
int dmc_moe_compact(const uint8_t *sel, const float *pw, int N, int nE, const int32_t *offsets,
                    int32_t *rows, float *slot_w, int32_t *inv, dmc_stream s);
/* xg [n_rows, D] 16-bit = h [rows[p], :]; rows == NULL: the identity (h converted). */
int dmc_gather_h16(const float *h, int D, const int32_t *rows, int n_rows, uint16_t *xg,
                   dmc_h16 t, dmc_stream s);
/* act [n, F] 16-bit = silu(a[:, :F]) * a[:, F:] with a [n, 2F] fp32 (SwiGLU). */
int dmc_swiglu_h16(const float *a, int n, int F, uint16_t *act, dmc_h16 t, dmc_stream s);
/* act [n, F] 16-bit = gelu_tanh(a [n, F]) (the bias is already in a). */
int dmc_gelu_tanh_h16(const float *a, int n, int F, uint16_t *act, dmc_h16 t, dmc_stream s);
/* out [N, D] = sum over experts in ascending id of slot_w[p] * Y[p] (p = inv[n*nE+e] >= 0),
 * then + shared [N, D] when shared != NULL. No atomics: one thread per output element. */
int dmc_moe_combine(const float *Y, const int32_t *inv, const float *slot_w, int N, int nE, int D,
                    const float *shared, float *out, dmc_stream s);

/* ---- sampler -------------------------------------------------------------------------------- */
/* out [B, n]: row b = dm_noise_normal(seed, index[b], stream, n) (index on the device). */
int dmc_noise_normal(uint64_t seed, const uint64_t *index, int B, uint32_t stream, size_t n,
                     float *out, dmc_stream st);

/* ---- VAE (one image, channel-major) --------------------------------------------------------- */
/* col [Cin*9, H*W] 16-bit (row (c, ky, kx), zero padding 1) from x [Cin, H, W] fp32. */
int dmc_im2col3x3_h16(const float *x, int Cin, int H, int W, uint16_t *col, dmc_h16 t,
                      dmc_stream s);
/* y [C, HW] = GroupNorm(x; G contiguous channel groups, biased var, eps) * gamma + beta, then
 * SiLU when silu. Statistics in double, one CTA per group, fixed order (batch-invariant and
 * run-to-run deterministic). y may equal x. stats: scratch [2*G] doubles. */
int dmc_group_norm(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                   const float *beta, int silu, float *y, double *stats, dmc_stream s);
/* out [C, 2H, 2W] nearest. */
int dmc_upsample2x(const float *x, int C, int H, int W, float *out, dmc_stream s);

/* ---- Hopper-only (kernels.sm90a.cu, built for sm_90a only) ---------------------------------- */
/* Runs a one-warp kernel of the sm_90a object that writes 90.0f to out_dev[0] when it was
 * compiled in the arch-specific pass (else it traps); the wgmma/TMA GEMM (P3) comes later.
 * Call only on a device of compute capability 9.0. */
int dmc_sm90a_probe(float *out_dev /* [1] */, dmc_stream s);

/* ---- context (context.c), GEMMs (gemm.c), attention (attention.c) --------------------------- */
/* These return dm_status (an int enum of ditmoe.h) as int so this header needs no other. */
typedef struct dmc_ctx dmc_ctx;
/* Open device `device`: one stream, cuBLAS + cuBLASLt handles with a 32 MiB workspace, atomics
 * off. Without a usable device: DM_ERR_BACKEND "cuda: no CUDA device (cudaGetDeviceCount: ...)". */
int dmc_ctx_create(int device, dmc_ctx **out);
void dmc_ctx_free(dmc_ctx *c); /* NULL-safe */
dmc_stream dmc_ctx_stream(const dmc_ctx *c);
/* 0 and a description of device `device` ("NVIDIA H200, cc 9.0, 132 SMs, 139.8 GiB") when it is
 * usable; else the cudaError value and `msg` = "no CUDA device (cudaGetDeviceCount: ...)". */
int dmc_device_probe(int device, char *msg, size_t cap);
/* Device memory: dmc_alloc fails with DM_ERR_NOMEM "cuda: <op>: out of memory (need 1.2 GiB,
 * 0.8 free)". Copies are ordered on the context's stream; download waits for the copy. */
int dmc_alloc(dmc_ctx *c, size_t bytes, const char *op, void **out);
void dmc_free(dmc_ctx *c, void *p);
int dmc_upload(dmc_ctx *c, void *dst, const void *host, size_t bytes, const char *op);
int dmc_download(dmc_ctx *c, void *host, const void *src, size_t bytes, const char *op);
int dmc_sync(dmc_ctx *c, const char *op);
/* Map the cudaError value `e` of a launcher to DM_OK or DM_ERR_BACKEND "cuda: <op>: <name>: ...". */
int dmc_err(int e, const char *op);

/* Operand types of dmc_gemm: the two 16-bit types, or fp32 (routers, fp32 references). */
#define DMC_GEMM_F32 2
/* D [m, n] (column-major, fp32, ld ldd) = op(A) op(B) (+ beta D) (+ bias [m] per row of D), fp32
 * accumulation, A and B of type `ab` (DMC_BF16, DMC_F16 or DMC_GEMM_F32). cuBLASLt with an
 * algorithm PINNED per shape: chosen once (with the varying dimension `vary` = 'n' (then B
 * must not be transposed) or 0 set to a representative 4096), split-K 1, no reduction scheme, validated for each new size;
 * so a row's result does not depend on how many rows share the call. */
int dmc_gemm(dmc_ctx *c, int ab, int transa, int transb, int m, int n, int k, const void *A,
             int lda, const void *B, int ldb, float beta, float *D, int ldd, const float *bias,
             int vary, const char *op);
/* Row-major y [N, out] (fp32) = x [N, in] . W [out, in]^T (+ bias [out]); W and x of type ab. */
int dmc_linear(dmc_ctx *c, int ab, const void *W, int out, int in, const void *x, int N,
               const float *bias, float *y, const char *op);
/* Attention paths: naive (fp32 batched GEMMs + softmax, the on-GPU reference) and cuDNN's fused
 * SDPA (16-bit operands; plan per shape; cuDNN dlopen'ed). dmc_attention picks per shape at plan
 * time (cuDNN when its plan finalizes and DITMOE_CUDA_ATTN is not "naive"), logs the choice once,
 * and never falls back at run time. qkv, out: device, layouts of dm_attention (ops.h). */
typedef enum { DMC_ATTN_AUTO = 0, DMC_ATTN_NAIVE, DMC_ATTN_CUDNN } dmc_attn_path;
int dmc_attention(dmc_ctx *c, dmc_attn_path path, const float *qkv, int B, int T, int H, int hd,
                  const float *qw, const float *qb, const float *kw, const float *kb, float eps,
                  dmc_h16 t, float *out);
/* cuDNN runtime version (e.g. 91900) or 0 when libcudnn.so.9 could not be loaded (then `why`). */
int dmc_cudnn_version(dmc_ctx *c, const char **why);

#ifdef __cplusplus
}
#endif
#endif

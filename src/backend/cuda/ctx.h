/* Host-side internals of the CUDA backend shared by its .c files (never included outside
 * src/backend/cuda): the context struct, scratch slots and the GEMM plan cache. */
#ifndef DM_BACKEND_CUDA_CTX_H
#define DM_BACKEND_CUDA_CTX_H

#include "backend/cuda/dmcuda.h"
#include "ditmoe.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

/* Named scratch buffers (device), grown on demand (growing waits for the stream first). */
enum {
    DMC_SCR_X16 = 0, /* 16-bit copy of a GEMM input */
    DMC_SCR_ACT16,   /* 16-bit activations between the two expert GEMMs */
    DMC_SCR_A,       /* fp32 first-GEMM output of an MLP */
    DMC_SCR_Y,       /* fp32 expert outputs [rows, D] */
    DMC_SCR_YSH,     /* fp32 shared-expert output */
    DMC_SCR_ROUTE,   /* router scores, ids, weights, picks, inverse map, rows */
    DMC_SCR_SMALL,   /* labels, uncond flags, timesteps, GN statistics */
    DMC_SCR_Q,       /* attention q, k, v, o (fp32) or qkv16 + o16 */
    DMC_SCR_S,       /* attention scores */
    DMC_SCR_COL,     /* VAE im2col */
    DMC_SCR_VAE,     /* VAE attention q, k, v, h */
    DMC_SCR_STAGE,   /* weight upload: device side of the staging ring */
    DMC_SCR_COUNT
};

typedef struct dmc_plan dmc_plan;   /* gemm.c */
typedef struct dmc_cudnn dmc_cudnn; /* attention_cudnn.c */

struct dmc_ctx {
    int device;
    char name[256];
    int cc_major, cc_minor, sm_count;
    size_t total_mem;
    cudaStream_t stream;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *ws; /* cuBLAS / cuBLASLt workspace (one per stream) */
    size_t ws_bytes;
    struct {
        void *p;
        size_t bytes;
    } scr[DMC_SCR_COUNT];
    void *pinned; /* weight staging ring (two halves), allocated at the first weight */
    size_t pinned_bytes;
    cudaEvent_t half_done[2];
    int half_used[2];
    void *host_small; /* pinned, 64 KiB: offsets and other small device->host reads */
    void *host_grp;   /* pageable, grown: moe_grouped's packed host grouping (ffn.c) */
    size_t host_grp_bytes;
    dmc_plan *plans;
    int n_plans, cap_plans;
    dmc_cudnn *dnn;
    int fast;      /* DITMOE_CUDA_FAST=1: per-size heuristics (not batch-invariant) */
    int attn_env;  /* DITMOE_CUDA_ATTN: DMC_ATTN_AUTO / NAIVE / CUDNN */
    int attn_f16;  /* the attention projections are fp16: cuDNN SDPA runs in fp16, else bf16 */
    int quant_logged[2]; /* weights.c: the one-time line for stored int4 [0] / int8 [1] experts */
};

/* Scratch slot `slot` with at least `bytes`; NULL and a dm_fail message on failure. */
void *dmc_scratch(dmc_ctx *c, int slot, size_t bytes, const char *op, dm_status *st);
/* DM_ERR_NOMEM "cuda: <op>: out of memory (need X GiB, Y free)". */
dm_status dmc_oom(const char *op, size_t need);
dm_status dmc_blas_err(int st, const char *op);
void dmc_plans_free(dmc_ctx *c);  /* gemm.c */
void dmc_cudnn_free(dmc_ctx *c);  /* attention_cudnn.c */
/* cuDNN SDPA on a 16-bit qkv [B*T, 3*H*hd] (q, k, v read in place by strides) into o16
 * [B*T, H*hd]. The plan for (B, T, H, hd, t) is built at its first use and cached; *usable = 0
 * (with DM_OK) when cuDNN cannot run the shape (library missing, too old, no engine finalizes),
 * logged once. qkv16 == NULL: plan only. */
dm_status dmc_sdpa(dmc_ctx *c, const uint16_t *qkv16, int B, int T, int H, int hd, dmc_h16 t,
                   uint16_t *o16, int *usable);

#endif

/* CUDA context: device probe, stream, cuBLAS/cuBLASLt handles, workspace, scratch slots, memory
 * and the mapping of CUDA errors to dm_status (DM_ERR_BACKEND, DM_ERR_NOMEM with sizes). */
#include "backend/cuda/ctx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GIB (1024.0 * 1024.0 * 1024.0)
#define WS_BYTES ((size_t)32 << 20)

int dmc_err(int e, const char *op)
{
    if (e == 0) return DM_OK;
    const cudaError_t ce = (cudaError_t)e;
    if (ce == cudaErrorMemoryAllocation) return dmc_oom(op, 0);
    return dm_fail(DM_ERR_BACKEND, "cuda: %s: %s (%s)", op, cudaGetErrorName(ce),
                   cudaGetErrorString(ce));
}

dm_status dmc_oom(const char *op, size_t need)
{
    size_t fr = 0, tot = 0;
    (void)cudaGetLastError(); /* clear the sticky-free allocation error */
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) fr = tot = 0;
    if (need)
        return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of memory (need %.2f GiB, %.2f free of %.1f)",
                       op, need / GIB, fr / GIB, tot / GIB);
    return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of memory (%.2f GiB free of %.1f)", op, fr / GIB,
                   tot / GIB);
}

dm_status dmc_blas_err(int st, const char *op)
{
    if (st == 0) return DM_OK;
    if (st == (int)CUBLAS_STATUS_ALLOC_FAILED) return dmc_oom(op, 0);
    return dm_fail(DM_ERR_BACKEND, "cuda: %s: cuBLAS status %d (%s)", op, st,
                   cublasGetStatusString((cublasStatus_t)st));
}

int dmc_device_probe(int device, char *msg, size_t cap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(msg, cap, "no CUDA device (cudaGetDeviceCount: %s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        (void)cudaGetLastError();
        return e != cudaSuccess ? (int)e : (int)cudaErrorNoDevice;
    }
    if (device < 0 || device >= n) {
        snprintf(msg, cap, "no CUDA device %d (this machine has %d)", device, n);
        return (int)cudaErrorInvalidDevice;
    }
    struct cudaDeviceProp p;
    e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        snprintf(msg, cap, "CUDA device %d: %s", device, cudaGetErrorString(e));
        return (int)e;
    }
    snprintf(msg, cap, "%s, cc %d.%d, %d SMs, %.1f GiB", p.name, p.major, p.minor,
             p.multiProcessorCount, p.totalGlobalMem / GIB);
    return 0;
}

static int env_attn(void)
{
    const char *s = getenv("DITMOE_CUDA_ATTN");
    if (!s || !*s || !strcmp(s, "auto")) return DMC_ATTN_AUTO;
    if (!strcmp(s, "naive")) return DMC_ATTN_NAIVE;
    if (!strcmp(s, "cudnn")) return DMC_ATTN_CUDNN;
    dm_log(DM_LOG_INFO, "[WARN] DITMOE_CUDA_ATTN=%s unknown (auto|naive|cudnn): using auto", s);
    return DMC_ATTN_AUTO;
}

int dmc_ctx_create(int device, dmc_ctx **out)
{
    *out = NULL;
    char msg[320];
    if (dmc_device_probe(device, msg, sizeof msg) != 0)
        return dm_fail(DM_ERR_BACKEND, "cuda: %s", msg);
    dmc_ctx *c = calloc(1, sizeof *c);
    if (!c) return dm_fail(DM_ERR_NOMEM, "cuda: context: out of host memory");
    c->device = device;
    struct cudaDeviceProp p;
    dm_status st = dmc_err((int)cudaSetDevice(device), "cudaSetDevice");
    if (!st) st = dmc_err((int)cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
    if (st) goto fail;
    snprintf(c->name, sizeof c->name, "%s", p.name);
    c->cc_major = p.major;
    c->cc_minor = p.minor;
    c->sm_count = p.multiProcessorCount;
    c->total_mem = p.totalGlobalMem;
    st = dmc_err((int)cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "stream");
    if (!st) st = dmc_blas_err((int)cublasCreate(&c->blas), "cublasCreate");
    if (!st) st = dmc_blas_err((int)cublasLtCreate(&c->lt), "cublasLtCreate");
    if (st) goto fail;
    if (cudaMalloc(&c->ws, WS_BYTES) != cudaSuccess) {
        st = dmc_oom("workspace", WS_BYTES);
        goto fail;
    }
    c->ws_bytes = WS_BYTES;
    /* One handle and one workspace per stream, no atomics: run-to-run determinism (cuBLAS docs,
     * "Results reproducibility"); batch invariance comes from pinned algorithms (gemm.c). */
    st = dmc_blas_err((int)cublasSetStream(c->blas, c->stream), "cublasSetStream");
    if (!st) st = dmc_blas_err((int)cublasSetWorkspace(c->blas, c->ws, c->ws_bytes), "cublasSetWorkspace");
    if (!st) st = dmc_blas_err((int)cublasSetAtomicsMode(c->blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
    if (!st)
        st = dmc_blas_err((int)cublasSetMathMode(c->blas, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                 CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                          "cublasSetMathMode");
    if (!st && cudaHostAlloc(&c->host_small, 65536, cudaHostAllocDefault) != cudaSuccess)
        st = dm_fail(DM_ERR_NOMEM, "cuda: context: cannot pin 64 KiB of host memory");
    if (st) goto fail;
    for (int i = 0; i < 2; i++)
        if ((st = dmc_err((int)cudaEventCreateWithFlags(&c->half_done[i], cudaEventDisableTiming),
                          "event")))
            goto fail;
    const char *fast = getenv("DITMOE_CUDA_FAST");
    c->fast = fast && !strcmp(fast, "1");
    c->attn_env = env_attn();
    dm_log(DM_LOG_VERBOSE, "cuda: device %d: %s%s", device, msg,
           c->fast ? " (DITMOE_CUDA_FAST=1: not batch-invariant)" : "");
    *out = c;
    return DM_OK;
fail:
    dmc_ctx_free(c);
    return st;
}

void dmc_ctx_free(dmc_ctx *c)
{
    if (!c) return;
    if (c->stream) cudaStreamSynchronize(c->stream);
    dmc_plans_free(c);
    dmc_cudnn_free(c);
    for (int i = 0; i < DMC_SCR_COUNT; i++)
        if (c->scr[i].p) cudaFree(c->scr[i].p);
    for (int i = 0; i < 2; i++)
        if (c->half_done[i]) cudaEventDestroy(c->half_done[i]);
    if (c->pinned) cudaFreeHost(c->pinned);
    if (c->host_small) cudaFreeHost(c->host_small);
    free(c->host_grp);
    if (c->ws) cudaFree(c->ws);
    if (c->lt) cublasLtDestroy(c->lt);
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

dmc_stream dmc_ctx_stream(const dmc_ctx *c) { return (dmc_stream)c->stream; }

void *dmc_scratch(dmc_ctx *c, int slot, size_t bytes, const char *op, dm_status *st)
{
    *st = DM_OK;
    if (bytes <= c->scr[slot].bytes) return c->scr[slot].p;
    /* Grow by 1/8 extra so a slowly growing size does not reallocate every call. The old buffer
     * may still be read by queued work: wait for the stream before freeing it. */
    size_t want = bytes + bytes / 8;
    want = (want + 255) & ~(size_t)255;
    if (c->scr[slot].p) {
        cudaError_t e = cudaStreamSynchronize(c->stream);
        if (e != cudaSuccess) {
            *st = dmc_err((int)e, op);
            return NULL;
        }
        cudaFree(c->scr[slot].p);
        c->scr[slot].p = NULL;
        c->scr[slot].bytes = 0;
    }
    if (cudaMalloc(&c->scr[slot].p, want) != cudaSuccess) {
        c->scr[slot].p = NULL;
        *st = dmc_oom(op, want);
        return NULL;
    }
    c->scr[slot].bytes = want;
    return c->scr[slot].p;
}

int dmc_alloc(dmc_ctx *c, size_t bytes, const char *op, void **out)
{
    (void)c;
    *out = NULL;
    if (bytes == 0) return DM_OK;
    if (cudaMalloc(out, bytes) != cudaSuccess) {
        *out = NULL;
        return dmc_oom(op, bytes);
    }
    return DM_OK;
}

void dmc_free(dmc_ctx *c, void *p)
{
    if (!p) return;
    cudaStreamSynchronize(c->stream);
    cudaFree(p);
}

int dmc_upload(dmc_ctx *c, void *dst, const void *host, size_t bytes, const char *op)
{
    if (!bytes) return DM_OK;
    return dmc_err((int)cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, c->stream), op);
}

int dmc_download(dmc_ctx *c, void *host, const void *src, size_t bytes, const char *op)
{
    if (bytes) {
        dm_status st = dmc_err((int)cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost,
                                                    c->stream), op);
        if (st) return st;
    }
    return dmc_sync(c, op);
}

int dmc_sync(dmc_ctx *c, const char *op)
{
    dm_status st = dmc_err((int)cudaStreamSynchronize(c->stream), op);
    if (!st) st = dmc_err((int)cudaGetLastError(), op);
    return st;
}

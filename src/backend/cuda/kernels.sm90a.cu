/* Hopper-only object (built with CUDA_ARCHITECTURES 90a-real, cmake/cuda.cmake). The wgmma/TMA
 * grouped GEMM (P3 of docs/spec/cuda.md §2) will live here; for now it holds the probe that proves
 * the sm_90a image loads and runs on the device: the kernel reports whether it was compiled in
 * the arch-specific pass (__CUDA_ARCH_FEAT_SM90_ALL). Dispatched only when the device reports
 * compute capability 9.0. */
#include "backend/cuda/dmcuda.h"

#include <cuda_runtime.h>

__global__ void k_sm90a_probe(float *out)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (threadIdx.x == 0) out[0] = 90.0f;
#else
    __trap();
#endif
}

extern "C" int dmc_sm90a_probe(float *out_dev, dmc_stream s)
{
    k_sm90a_probe<<<1, 32, 0, s>>>(out_dev);
    return (int)cudaGetLastError();
}

/* Sampler noise (Philox, the counter scheme of src/sampler/noise.c through philox.h) and the VAE
 * kernels: im2col for 3x3 convolutions, deterministic GroupNorm(+SiLU), nearest upsampling. */
#include "backend/cuda/dmcuda.h"
#include "backend/cuda/philox.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

static int launched(void) { return (int)cudaGetLastError(); }

static unsigned blocks_for(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 65535u * 32u ? 65535u * 32u : (b ? b : 1));
}

__device__ __forceinline__ uint16_t to_h16(float f, int t)
{
    return t == DMC_F16 ? __half_as_ushort(__float2half_rn(f))
                        : __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

/* ---- noise: one thread per block of 4 normals of one image ---- */

__global__ void k_noise(uint64_t seed, const uint64_t *index, int B, uint32_t stream, size_t n,
                        float *out)
{
    const size_t nb = (n + 3) / 4, total = nb * (size_t)B;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int b = (int)(i / nb);
        const uint32_t j = (uint32_t)(i % nb);
        float z[4];
        dmc_noise_block(seed, index[b], stream, j, z);
        float *o = out + (size_t)b * n;
        for (int q = 0; q < 4 && 4 * (size_t)j + q < n; q++) o[4 * (size_t)j + q] = z[q];
    }
}

extern "C" int dmc_noise_normal(uint64_t seed, const uint64_t *index, int B, uint32_t stream,
                                size_t n, float *out, dmc_stream st)
{
    const size_t total = (n + 3) / 4 * (size_t)B;
    if (total) k_noise<<<blocks_for(total, 128), 128, 0, st>>>(seed, index, B, stream, n, out);
    return launched();
}

/* ---- VAE ---- */

__global__ void k_im2col3x3(const float *x, int Cin, int H, int W, uint16_t *col, int t)
{
    const size_t HW = (size_t)H * W, total = (size_t)Cin * 9 * HW;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / HW, px = i % HW;
        const int c = (int)(r / 9), ky = (int)(r % 9) / 3, kx = (int)(r % 3);
        const int y = (int)(px / W) + ky - 1, xx = (int)(px % W) + kx - 1;
        const float v = y >= 0 && y < H && xx >= 0 && xx < W ? x[((size_t)c * H + y) * W + xx] : 0.0f;
        col[i] = to_h16(v, t);
    }
}

extern "C" int dmc_im2col3x3_h16(const float *x, int Cin, int H, int W, uint16_t *col, dmc_h16 t,
                                 dmc_stream s)
{
    const size_t total = (size_t)Cin * 9 * H * W;
    if (total) k_im2col3x3<<<blocks_for(total, 256), 256, 0, s>>>(x, Cin, H, W, col, (int)t);
    return launched();
}

#define GN_THREADS 512

/* Fixed-order block sum of doubles: per-thread strided partials, then a tree in shared memory. */
__device__ double block_sum(double v, double *sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = GN_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    const double r = sh[0];
    __syncthreads();
    return r;
}

/* One CTA per group: mean (double), then the centred variance around the float mean (as the
 * CPU kernel); stats[2g] = mean, stats[2g+1] = 1 / sqrt(var + eps). */
__global__ void k_gn_stats(const float *x, int C, size_t HW, int G, float eps, double *stats)
{
    __shared__ double sh[GN_THREADS];
    const int g = blockIdx.x, cg = C / G;
    const float *xg = x + (size_t)g * cg * HW;
    const size_t n = (size_t)cg * HW;
    double s = 0.0;
    for (size_t i = threadIdx.x; i < n; i += GN_THREADS) s += xg[i];
    const double mean = block_sum(s, sh) / (double)n;
    const float mf = (float)mean;
    s = 0.0;
    for (size_t i = threadIdx.x; i < n; i += GN_THREADS) {
        const float d = xg[i] - mf;
        s += (double)(d * d);
    }
    const double var = block_sum(s, sh) / (double)n;
    if (threadIdx.x == 0) {
        stats[2 * g] = mean;
        stats[2 * g + 1] = 1.0 / sqrt(var + (double)eps);
    }
}

__global__ void k_gn_apply(const float *x, int C, size_t HW, int G, const float *gamma,
                           const float *beta, int silu, const double *stats, float *y)
{
    const size_t total = (size_t)C * HW;
    const int cg = C / G;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int c = (int)(i / HW), g = c / cg;
        const float mf = (float)stats[2 * g], rstd = (float)stats[2 * g + 1];
        const float a = rstd * gamma[c], bb = beta[c] - mf * a;
        float v = x[i] * a + bb;
        if (silu) v = v / (1.0f + expf(-v));
        y[i] = v;
    }
}

extern "C" int dmc_group_norm(const float *x, int C, size_t HW, int G, float eps,
                              const float *gamma, const float *beta, int silu, float *y,
                              double *stats, dmc_stream s)
{
    if (G <= 0 || C % G) return (int)cudaErrorInvalidValue;
    k_gn_stats<<<G, GN_THREADS, 0, s>>>(x, C, HW, G, eps, stats);
    int e = launched();
    if (e) return e;
    const size_t total = (size_t)C * HW;
    if (total) k_gn_apply<<<blocks_for(total, 256), 256, 0, s>>>(x, C, HW, G, gamma, beta, silu, stats, y);
    return launched();
}

__global__ void k_upsample2x(const float *x, int C, int H, int W, float *out)
{
    const size_t total = (size_t)C * 4 * H * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int ox = (int)(i % (2 * W));
        const size_t r = i / (2 * W);
        const int oy = (int)(r % (2 * H)), c = (int)(r / (2 * H));
        out[i] = x[((size_t)c * H + oy / 2) * W + ox / 2];
    }
}

extern "C" int dmc_upsample2x(const float *x, int C, int H, int W, float *out, dmc_stream s)
{
    const size_t total = (size_t)C * 4 * H * W;
    if (total) k_upsample2x<<<blocks_for(total, 256), 256, 0, s>>>(x, C, H, W, out);
    return launched();
}

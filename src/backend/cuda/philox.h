/* Philox4x32-10 and Box-Muller as ONE host+device function, so the GPU draws exactly the noise
 * of src/sampler/noise.c (same key, counter and word order): key = (seed lo, seed hi), counter =
 * (block j, stream, index lo, index hi), 4 normals per block, out[4j + i] = z_i. Included by the
 * .cu kernels (device) and by tests (host, against dm_noise_normal). */
#ifndef DM_BACKEND_CUDA_PHILOX_H
#define DM_BACKEND_CUDA_PHILOX_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DMC_HD __host__ __device__ __forceinline__
#else
#define DMC_HD static inline
#endif

DMC_HD void dmc_philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1, uint32_t out[4])
{
    for (int r = 0; r < 10; r++) {
        if (r > 0) { /* key schedule: bump between rounds (golden ratio, sqrt(3) - 1) */
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* Normals 4j .. 4j+3 of the stream (seed, index, stream); double Box-Muller as the CPU. */
DMC_HD void dmc_noise_block(uint64_t seed, uint64_t index, uint32_t stream, uint32_t j, float z[4])
{
    uint32_t w[4];
    dmc_philox4x32(j, stream, (uint32_t)index, (uint32_t)(index >> 32), (uint32_t)seed,
                   (uint32_t)(seed >> 32), w);
    const double inv = 1.0 / 4294967296.0; /* 2^-32 */
    for (int i = 0; i < 2; i++) {
        const double u0 = ((double)w[2 * i] + 0.5) * inv, u1 = ((double)w[2 * i + 1] + 0.5) * inv;
        const double r = sqrt(-2.0 * log(u0)), th = 6.283185307179586 * u1;
        z[2 * i] = (float)(r * cos(th));
        z[2 * i + 1] = (float)(r * sin(th));
    }
}

#endif

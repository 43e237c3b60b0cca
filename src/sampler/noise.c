/* Counter-based noise: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
 * as easy as 1, 2, 3", SC'11) keyed by the seed, with the counter holding (block, stream, image
 * index), and Box-Muller to normals. An image's noise depends only on (seed, index, stream):
 * never on batch size, batch order or threads. */
#include "ditmoe.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u /* golden ratio */
#define PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi)
{
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void dm_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        if (r > 0) { /* key schedule: bump between rounds */
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint32_t hi0, hi1;
        uint32_t lo0 = mulhilo(PHILOX_M0, c0, &hi0);
        uint32_t lo1 = mulhilo(PHILOX_M1, c2, &hi1);
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

/* One Box-Muller pair from two 32-bit words; u in (0,1) so log() is finite. */
static inline void box_muller(uint32_t a, uint32_t b, float *z0, float *z1)
{
    const double inv = 1.0 / 4294967296.0; /* 2^-32 */
    double u0 = ((double)a + 0.5) * inv, u1 = ((double)b + 0.5) * inv;
    double r = sqrt(-2.0 * log(u0)), th = 6.283185307179586 * u1;
    *z0 = (float)(r * cos(th));
    *z1 = (float)(r * sin(th));
}

void dm_noise_normal(uint64_t seed, uint64_t index, uint32_t stream, size_t n, float *out)
{
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    for (size_t j = 0; 4 * j < n; j++) {
        const uint32_t ctr[4] = {(uint32_t)j, stream, (uint32_t)index, (uint32_t)(index >> 32)};
        uint32_t w[4];
        float z[4];
        dm_philox4x32(ctr, key, w);
        box_muller(w[0], w[1], &z[0], &z[1]);
        box_muller(w[2], w[3], &z[2], &z[3]);
        for (int k = 0; k < 4 && 4 * j + k < n; k++) out[4 * j + k] = z[k];
    }
}

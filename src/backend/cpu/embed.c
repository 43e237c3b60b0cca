/* The CPU backend's embedding kernels: patchify, unpatchify (OpenMP over tokens) and the timestep
 * sinusoid. Layouts (docs/spec/ditmoe.md §2.1, §2.3, §2.10): patch vectors are (c, pi, pj) with c
 * slowest, the final layer's per-token output is (pi, pj, c) with c fastest, the sinusoid is [cos,
 * sin]. References: src/dit/embed.c. */
#include "backend/cpu/cpu.h"

#include <math.h>

void dm_patchify(const float *x, int B, int C, int S, int p, float *patches)
{
    const int G = S / p, T = G * G, P = C * p * p;
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, tok = bt % T, gi = tok / G, gj = tok % G;
        float *dst = patches + (size_t)bt * P;
        for (int c = 0; c < C; c++)
            for (int pi = 0; pi < p; pi++)
                for (int pj = 0; pj < p; pj++)
                    dst[(c * p + pi) * p + pj] =
                        x[(((size_t)b * C + c) * S + gi * p + pi) * S + gj * p + pj];
    }
}

void dm_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out)
{
    const int G = S / p, T = G * G, P = p * p * Cout;
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, t = bt % T, gi = t / G, gj = t % G;
        const float *src = tok + (size_t)bt * P;
        for (int pi = 0; pi < p; pi++)
            for (int pj = 0; pj < p; pj++)
                for (int c = 0; c < Cout; c++)
                    out[(((size_t)b * Cout + c) * S + gi * p + pi) * S + gj * p + pj] =
                        src[(pi * p + pj) * Cout + c];
    }
}

void dm_timestep_sinusoid(const float *t, int B, float *out)
{
    const int half = DM_TIME_FREQ_DIM / 2;
    const float neg_log = (float)(-log(10000.0)); /* float32 like torch.arange(float32) * scalar */
    for (int b = 0; b < B; b++)
        for (int k = 0; k < half; k++) {
            float freq = expf(neg_log * (float)k / (float)half);
            float arg = t[b] * freq;
            out[(size_t)b * DM_TIME_FREQ_DIM + k] = cosf(arg);
            out[(size_t)b * DM_TIME_FREQ_DIM + half + k] = sinf(arg);
        }
}

/* The 2-D sin-cos position table, and plain references of the embedding ops (patchify, unpatchify,
 * timestep sinusoid) that every backend is tested against. The traps (docs/spec/ditmoe.md §11,
 * docs/traps.md): patch vectors are (c, pi, pj) with c slowest, the final layer's per-token output
 * is (pi, pj, c) with c fastest; the timestep sinusoid is [cos, sin], the position table is [sin,
 * cos] per half with the first half encoding the column. */
#include "dit/model.h"

#include <math.h>

void dm_patchify_ref(const float *x, int B, int C, int S, int p, float *patches)
{
    const int G = S / p, T = G * G, P = C * p * p;
    for (int b = 0; b < B; b++)
        for (int tok = 0; tok < T; tok++)
            for (int c = 0; c < C; c++)
                for (int pi = 0; pi < p; pi++)
                    for (int pj = 0; pj < p; pj++)
                        patches[((size_t)b * T + tok) * P + (c * p + pi) * p + pj] =
                            x[(((size_t)b * C + c) * S + tok / G * p + pi) * S + tok % G * p + pj];
}

void dm_unpatchify_ref(const float *tok, int B, int Cout, int S, int p, float *out)
{
    const int G = S / p, T = G * G, P = p * p * Cout;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int pi = 0; pi < p; pi++)
                for (int pj = 0; pj < p; pj++)
                    for (int c = 0; c < Cout; c++)
                        out[(((size_t)b * Cout + c) * S + t / G * p + pi) * S + t % G * p + pj] =
                            tok[((size_t)b * T + t) * P + (pi * p + pj) * Cout + c];
}

void dm_timestep_sinusoid_ref(const float *t, int B, float *out)
{
    const int half = DM_TIME_FREQ_DIM / 2;
    for (int b = 0; b < B; b++)
        for (int k = 0; k < half; k++) {
            double arg = (double)t[b] * exp(-log(10000.0) * k / half);
            out[(size_t)b * DM_TIME_FREQ_DIM + k] = (float)cos(arg);
            out[(size_t)b * DM_TIME_FREQ_DIM + half + k] = (float)sin(arg);
        }
}

void dm_pos_embed_2d(int D, int G, float *out)
{
    const int K = D / 4;
    for (int m = 0; m < G * G; m++) {
        double pos[2] = {(double)(m % G), (double)(m / G)}; /* column first, then row */
        for (int half = 0; half < 2; half++)
            for (int k = 0; k < K; k++) {
                double w = pow(10000.0, -(double)k / K);
                out[(size_t)m * D + half * 2 * K + k] = (float)sin(pos[half] * w);
                out[(size_t)m * D + half * 2 * K + K + k] = (float)cos(pos[half] * w);
            }
    }
}

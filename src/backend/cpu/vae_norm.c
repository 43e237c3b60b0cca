/* VAE GroupNorm (+ SiLU) and nearest 2x upsample. GroupNorm runs one group per thread with
 * its statistics summed in a fixed order, so the result does not depend on the thread count. */
#include "backend/cpu/ops.h"
#include "backend/cpu/vae_kernels.h"

#include <math.h>
#include <string.h>

/* SiLU with the vectorisable exp of the transformer (ops.h; a few ulp from expf). */
static inline float silu(float v) { return v / (1.0f + dm_exp_fast(-v)); }

void dm_vae_group_norm(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                       const float *beta, int silu_on, float *y)
{
    const int cg = C / G;
#pragma omp parallel for schedule(static) if ((double)C * HW >= DM_VAE_PAR_ELEMS)
    for (int g = 0; g < G; g++) {
        const float *xg = x + (size_t)g * cg * HW; /* [cg, HW] contiguous */
        const size_t n = (size_t)cg * HW;
        /* Pass 1: mean; pass 2: centred variance (both accumulated in double per 4 lanes). */
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        size_t i = 0;
        for (; i + 4 <= n; i += 4) {
            s0 += xg[i]; s1 += xg[i + 1]; s2 += xg[i + 2]; s3 += xg[i + 3];
        }
        for (; i < n; i++) s0 += xg[i];
        const double mean = (s0 + s1 + s2 + s3) / (double)n;
        s0 = s1 = s2 = s3 = 0;
        const float mf = (float)mean;
        for (i = 0; i + 4 <= n; i += 4) {
            float d0 = xg[i] - mf, d1 = xg[i + 1] - mf, d2 = xg[i + 2] - mf, d3 = xg[i + 3] - mf;
            s0 += d0 * d0; s1 += d1 * d1; s2 += d2 * d2; s3 += d3 * d3;
        }
        for (; i < n; i++) { float d = xg[i] - mf; s0 += d * d; }
        const double var = (s0 + s1 + s2 + s3) / (double)n;
        const float rstd = (float)(1.0 / sqrt(var + (double)eps));
        for (int c = g * cg; c < (g + 1) * cg; c++) {
            const float a = rstd * gamma[c];
            const float bb = beta[c] - mf * a;
            const float *xc = x + (size_t)c * HW;
            float *yc = y + (size_t)c * HW;
            if (silu_on)
                for (size_t j = 0; j < HW; j++) yc[j] = silu(xc[j] * a + bb);
            else
                for (size_t j = 0; j < HW; j++) yc[j] = xc[j] * a + bb;
        }
    }
}

void dm_vae_upsample2x(const float *x, int C, int H, int W, float *out)
{
    const int W2 = 2 * W;
#pragma omp parallel for schedule(static) if ((double)C * H * W >= DM_VAE_PAR_ELEMS)
    for (int c = 0; c < C; c++) {
        const float *xc = x + (size_t)c * H * W;
        float *oc = out + (size_t)c * 4 * H * W;
        for (int yy = 0; yy < H; yy++) {
            float *o = oc + (size_t)(2 * yy) * W2;
            const float *s = xc + (size_t)yy * W;
            for (int xx = 0; xx < W; xx++) o[2 * xx] = o[2 * xx + 1] = s[xx];
            memcpy(o + W2, o, sizeof(float) * W2);
        }
    }
}

/* Plain references of the VAE decoder kernels (the fast ones live in src/backend/cpu/vae_*.c):
 * naive loops, sums in double, no BLAS. tests/test_vae_ops.c checks the fast kernels against
 * these. */
#include "vae/vae_internal.h"

#include <math.h>
#include <stdlib.h>

void dm_vae_conv2d_ref(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *out)
{
    const int p = (k - 1) / 2;
    for (int co = 0; co < Cout; co++)
        for (int y = 0; y < H; y++)
            for (int xx = 0; xx < W; xx++) {
                double s = b ? b[co] : 0.0;
                for (int ci = 0; ci < Cin; ci++)
                    for (int ky = 0; ky < k; ky++)
                        for (int kx = 0; kx < k; kx++) {
                            int iy = y + ky - p, ix = xx + kx - p;
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                            s += (double)w[(((size_t)co * Cin + ci) * k + ky) * k + kx] *
                                 x[((size_t)ci * H + iy) * W + ix];
                        }
                out[((size_t)co * H + y) * W + xx] = (float)s;
            }
}

void dm_vae_group_norm_ref(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                           const float *beta, int silu_on, float *y)
{
    const int cg = C / G;
    for (int g = 0; g < G; g++) {
        double s = 0, ss = 0;
        for (int c = g * cg; c < (g + 1) * cg; c++)
            for (size_t j = 0; j < HW; j++) s += x[(size_t)c * HW + j];
        const double n = (double)cg * (double)HW, mean = s / n;
        for (int c = g * cg; c < (g + 1) * cg; c++)
            for (size_t j = 0; j < HW; j++) {
                double d = x[(size_t)c * HW + j] - mean;
                ss += d * d;
            }
        const double rstd = 1.0 / sqrt(ss / n + (double)eps);
        for (int c = g * cg; c < (g + 1) * cg; c++)
            for (size_t j = 0; j < HW; j++) {
                double v = (x[(size_t)c * HW + j] - mean) * rstd * gamma[c] + beta[c];
                if (silu_on) v = v / (1.0 + exp(-v));
                y[(size_t)c * HW + j] = (float)v;
            }
    }
}

void dm_vae_attention_ref(float *x, int C, int N, int G, const dm_vae_attn_w *aw)
{
    float *h = malloc(sizeof(float) * (size_t)C * N);
    float *q = malloc(sizeof(float) * (size_t)C * N);
    float *k = malloc(sizeof(float) * (size_t)C * N);
    float *v = malloc(sizeof(float) * (size_t)C * N);
    double *p = malloc(sizeof(double) * (size_t)N);
    float *o = malloc(sizeof(float) * (size_t)C * N);
    if (!h || !q || !k || !v || !p || !o) goto done;
    dm_vae_group_norm_ref(x, C, (size_t)N, G, DM_VAE_EPS, aw->gn_g, aw->gn_b, 0, h);
    for (int c = 0; c < C; c++)
        for (int n = 0; n < N; n++) {
            double sq = aw->bq[c], sk = aw->bk[c], sv = aw->bv[c];
            for (int i = 0; i < C; i++) {
                double hv = h[(size_t)i * N + n];
                sq += aw->wq[(size_t)c * C + i] * hv;
                sk += aw->wk[(size_t)c * C + i] * hv;
                sv += aw->wv[(size_t)c * C + i] * hv;
            }
            q[(size_t)c * N + n] = (float)sq;
            k[(size_t)c * N + n] = (float)sk;
            v[(size_t)c * N + n] = (float)sv;
        }
    for (int n = 0; n < N; n++) {
        double mx = -INFINITY, sum = 0;
        for (int m = 0; m < N; m++) {
            double s = 0;
            for (int c = 0; c < C; c++) s += (double)q[(size_t)c * N + n] * k[(size_t)c * N + m];
            p[m] = s / sqrt((double)C);
            if (p[m] > mx) mx = p[m];
        }
        for (int m = 0; m < N; m++) { p[m] = exp(p[m] - mx); sum += p[m]; }
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (int m = 0; m < N; m++) s += p[m] * v[(size_t)c * N + m];
            o[(size_t)c * N + n] = (float)(s / sum);
        }
    }
    for (int c = 0; c < C; c++)
        for (int n = 0; n < N; n++) {
            double s = aw->bo[c];
            for (int i = 0; i < C; i++) s += aw->wo[(size_t)c * C + i] * (double)o[(size_t)i * N + n];
            x[(size_t)c * N + n] += (float)s;
        }
done:
    free(h); free(q); free(k); free(v); free(p); free(o);
}

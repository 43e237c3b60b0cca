/* VAE decoder kernels: convolution (im2col + sgemm, and a naive reference), GroupNorm(+SiLU),
 * nearest 2x upsample, single-head spatial self-attention. One image, channel-major [C, H, W]. */
#include "vae/vae_internal.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Im2col band budget: at most this many floats (64 MiB) per band, but always >= one output row.
 * Larger bands measured faster (OpenBLAS repacks the weights on every sgemm call). */
#ifndef COL_BUDGET
#define COL_BUDGET ((size_t)16 << 20)
#endif
/* Attention score block budget (floats). */
#define SCORE_BUDGET ((size_t)4 << 20)

static int band_rows(int Cin, int H, int W, int k)
{
    size_t per_row = (size_t)Cin * k * k * W;
    size_t r = per_row ? COL_BUDGET / per_row : (size_t)H;
    if (r < 1) r = 1;
    if (r > (size_t)H) r = (size_t)H;
    return (int)r;
}

size_t dm_vae_conv_col_size(int Cin, int H, int W, int k)
{
    if (k == 1) return 0;
    return (size_t)Cin * k * k * W * band_rows(Cin, H, W, k);
}

/* col [Cin*k*k, rows*W] for output rows y0 .. y0+rows-1. */
static void im2col_band(const float *x, int Cin, int H, int W, int k, int y0, int rows, float *col)
{
    const int p = (k - 1) / 2;
    const size_t n = (size_t)rows * W;
#pragma omp parallel for schedule(static)
    for (int ci = 0; ci < Cin; ci++) {
        const float *xc = x + (size_t)ci * H * W; /* [H, W] */
        for (int ky = 0; ky < k; ky++) {
            for (int kx = 0; kx < k; kx++) {
                float *dst = col + ((size_t)ci * k * k + (size_t)ky * k + kx) * n;
                const int dx = kx - p;
                const int x_lo = dx < 0 ? -dx : 0;          /* first valid output x */
                const int x_hi = dx > 0 ? W - dx : W;       /* one past last valid output x */
                for (int r = 0; r < rows; r++) {
                    const int iy = y0 + r + ky - p;
                    float *d = dst + (size_t)r * W;
                    if (iy < 0 || iy >= H || x_hi <= x_lo) {
                        memset(d, 0, sizeof(float) * W);
                        continue;
                    }
                    for (int xx = 0; xx < x_lo; xx++) d[xx] = 0.0f;
                    memcpy(d + x_lo, xc + (size_t)iy * W + x_lo + dx, sizeof(float) * (x_hi - x_lo));
                    for (int xx = x_hi; xx < W; xx++) d[xx] = 0.0f;
                }
            }
        }
    }
}

/* out rows [Cout, ld] start at `out`: fill each with its bias (or 0) over n columns. */
static void fill_bias(float *out, int Cout, size_t n, size_t ld, const float *b)
{
#pragma omp parallel for schedule(static)
    for (int co = 0; co < Cout; co++) {
        float v = b ? b[co] : 0.0f;
        float *o = out + (size_t)co * ld;
        for (size_t i = 0; i < n; i++) o[i] = v;
    }
}

/* out = conv(x) + b, or out += conv(x) + b when acc. */
static void conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out, int acc)
{
    const size_t HW = (size_t)H * W;
    if (!acc)
        fill_bias(out, Cout, HW, HW, b);
    else if (b) {
#pragma omp parallel for schedule(static)
        for (int co = 0; co < Cout; co++) {
            float *o = out + (size_t)co * HW;
            for (size_t i = 0; i < HW; i++) o[i] += b[co];
        }
    }
    if (k == 1) {
        /* out [Cout, HW] += w [Cout, Cin] . x [Cin, HW] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Cout, (int)HW, Cin, 1.0f, w, Cin,
                    x, (int)HW, 1.0f, out, (int)HW);
        return;
    }
    const int K = Cin * k * k;
    const int R = band_rows(Cin, H, W, k);
    for (int y0 = 0; y0 < H; y0 += R) {
        const int rows = y0 + R <= H ? R : H - y0;
        const int n = rows * W;
        im2col_band(x, Cin, H, W, k, y0, rows, col);
        /* out[:, y0*W : y0*W+n] [Cout, n] (ld HW) += w [Cout, K] . col [K, n] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Cout, n, K, 1.0f, w, K, col, n, 1.0f,
                    out + (size_t)y0 * W, (int)HW);
    }
}

void dm_vae_conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out)
{
    conv2d(x, Cin, H, W, w, b, Cout, k, col, out, 0);
}

void dm_vae_conv2d_acc(const float *x, int Cin, int H, int W, const float *w, const float *b,
                       int Cout, int k, float *col, float *out)
{
    conv2d(x, Cin, H, W, w, b, Cout, k, col, out, 1);
}

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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

void dm_vae_group_norm(const float *x, int C, size_t HW, int G, float eps, const float *gamma,
                       const float *beta, int silu_on, float *y)
{
    const int cg = C / G;
#pragma omp parallel for schedule(static)
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

void dm_vae_upsample2x(const float *x, int C, int H, int W, float *out)
{
    const int W2 = 2 * W;
#pragma omp parallel for schedule(static)
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

static int score_rows(int N)
{
    size_t r = SCORE_BUDGET / (size_t)N;
    if (r < 1) r = 1;
    if (r > (size_t)N) r = (size_t)N;
    return (int)r;
}

size_t dm_vae_attn_ws_size(int C, int N)
{
    return 4 * (size_t)C * N + (size_t)score_rows(N) * N;
}

/* y [C, N] = W [C, C] . h [C, N] + b */
static void proj(const float *Wt, const float *b, const float *h, int C, int N, float *y)
{
    fill_bias(y, C, (size_t)N, (size_t)N, b);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, N, C, 1.0f, Wt, C, h, N, 1.0f, y, N);
}

void dm_vae_attention(float *x, int C, int N, int G, const dm_vae_attn_w *aw, float *ws)
{
    float *h = ws;                    /* [C, N] normed input, later the attention output o */
    float *q = h + (size_t)C * N;     /* [C, N] */
    float *k = q + (size_t)C * N;     /* [C, N] */
    float *v = k + (size_t)C * N;     /* [C, N] */
    float *S = v + (size_t)C * N;     /* [nb, N] score block */
    dm_vae_group_norm(x, C, (size_t)N, G, DM_VAE_EPS, aw->gn_g, aw->gn_b, 0, h);
    proj(aw->wq, aw->bq, h, C, N, q);
    proj(aw->wk, aw->bk, h, C, N, k);
    proj(aw->wv, aw->bv, h, C, N, v);
    const float scale = 1.0f / sqrtf((float)C);
    const int nb = score_rows(N);
    for (int n0 = 0; n0 < N; n0 += nb) {
        const int m = n0 + nb <= N ? nb : N - n0;
        /* S [m, N] = scale * q[:, n0:n0+m]^T . k */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, N, C, scale, q + n0, N, k, N, 0.0f,
                    S, N);
#pragma omp parallel for schedule(static)
        for (int i = 0; i < m; i++) {
            float *s = S + (size_t)i * N;
            float mx = s[0];
            for (int j = 1; j < N; j++) mx = s[j] > mx ? s[j] : mx;
            double sum = 0;
            for (int j = 0; j < N; j++) { s[j] = expf(s[j] - mx); sum += s[j]; }
            const float inv = (float)(1.0 / sum);
            for (int j = 0; j < N; j++) s[j] *= inv;
        }
        /* o[:, n0:n0+m] [C, m] (ld N) = v [C, N] . S^T [N, m] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, C, m, N, 1.0f, v, N, S, N, 0.0f,
                    h + n0, N);
    }
    /* x += wo . o + bo */
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        float *xc = x + (size_t)c * N;
        for (int j = 0; j < N; j++) xc[j] += aw->bo[c];
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, C, N, C, 1.0f, aw->wo, C, h, N, 1.0f, x,
                N);
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

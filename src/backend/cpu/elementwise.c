/* Row-wise and element-wise kernels: LayerNorm, adaLN modulation, gated residual, SiLU, SwiGLU,
 * softmax. Fast versions parallelise over rows; references are plain loops in double. */
#include "backend/cpu/ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static void layernorm_row(const float *x, int D, float eps, const float *w, const float *b, float *y)
{
    float mean = 0.0f;
    for (int i = 0; i < D; i++) mean += x[i];
    mean /= (float)D;
    float var = 0.0f;
    for (int i = 0; i < D; i++) {
        float d = x[i] - mean;
        var += d * d;
    }
    var /= (float)D;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < D; i++) {
        float v = (x[i] - mean) * inv;
        y[i] = w ? v * w[i] + (b ? b[i] : 0.0f) : v;
    }
}

void dm_layernorm(const float *x, int N, int D, float eps, const float *w, const float *b, float *y)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) layernorm_row(x + (size_t)n * D, D, eps, w, b, y + (size_t)n * D);
}

void dm_layernorm_ref(const float *x, int N, int D, float eps, const float *w, const float *b,
                      float *y)
{
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * D;
        double mean = 0, var = 0;
        for (int i = 0; i < D; i++) mean += r[i];
        mean /= D;
        for (int i = 0; i < D; i++) var += (r[i] - mean) * (r[i] - mean);
        var /= D;
        for (int i = 0; i < D; i++) {
            double v = (r[i] - mean) / sqrt(var + eps);
            if (w) v = v * w[i] + (b ? b[i] : 0.0);
            y[(size_t)n * D + i] = (float)v;
        }
    }
}

void dm_modulate(float *x, int B, int T, int D, const float *shift, const float *scale, int mod_stride)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < B * T; r++) {
        int b = r / T;
        const float *sh = shift + (size_t)b * mod_stride, *sc = scale + (size_t)b * mod_stride;
        float *row = x + (size_t)r * D;
        for (int i = 0; i < D; i++) row[i] = row[i] * (1.0f + sc[i]) + sh[i];
    }
}

void dm_gated_add(float *x, const float *y, int B, int T, int D, const float *gate, int mod_stride)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < B * T; r++) {
        const float *g = gate + (size_t)(r / T) * mod_stride;
        float *row = x + (size_t)r * D;
        const float *yr = y + (size_t)r * D;
        for (int i = 0; i < D; i++) row[i] += g[i] * yr[i];
    }
}

static inline float silu1(float v) { return v / (1.0f + dm_exp_fast(-v)); }

void dm_silu(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) x[i] = silu1(x[i]);
}

void dm_swiglu(const float *gu, int rows, int F, float *h)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *g = gu + (size_t)r * 2 * F, *u = g + F;
        float *o = h + (size_t)r * F;
#pragma omp simd
        for (int i = 0; i < F; i++) o[i] = silu1(g[i]) * u[i];
    }
}

void dm_softmax_rows(float *x, int N, int n)
{
    for (int r = 0; r < N; r++) {
        float *row = x + (size_t)r * n;
        float m = row[0];
        for (int i = 1; i < n; i++) m = row[i] > m ? row[i] : m;
        float s = 0.0f;
        for (int i = 0; i < n; i++) {
            row[i] = expf(row[i] - m);
            s += row[i];
        }
        for (int i = 0; i < n; i++) row[i] /= s;
    }
}

/* Row-wise and element-wise kernels: LayerNorm, adaLN modulation, gated residual, SiLU, SwiGLU,
 * softmax. Fast versions parallelise over rows; references are plain loops in double. */
#include "backend/cpu/ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Row sums in LANES lanes: element i of a row goes to lane i % LANES (the tail
 * i >= n - n % LANES to lanes 0 .. n % LANES - 1), and the lanes are combined by one fixed tree.
 * The order depends only on n, so a row's result does not depend on the other rows, the batch or
 * the thread count, and it is the same bits whether or not the compiler vectorises the lane
 * loops (no FMA contraction in C11 mode). */
#define LANES 16

static float lanes_sum(float *a)
{
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) a[l] += a[l + w];
    return a[0];
}

/* sum of x[0 .. n) in the lane order above */
static float row_sum(const float *x, int n)
{
    const int nv = n - n % LANES;
    float acc[LANES] = {0};
    for (int i = 0; i < nv; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l];
    for (int i = nv; i < n; i++) acc[i - nv] += x[i];
    return lanes_sum(acc);
}

/* sum of (x[i] - m)^2 over i in [0, n), same order */
static float row_sum_sq(const float *x, int n, float m)
{
    const int nv = n - n % LANES;
    float acc[LANES] = {0};
    for (int i = 0; i < nv; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const float d = x[i + l] - m;
            acc[l] += d * d;
        }
    for (int i = nv; i < n; i++) {
        const float d = x[i] - m;
        acc[i - nv] += d * d;
    }
    return lanes_sum(acc);
}

static void layernorm_row(const float *x, int D, float eps, const float *w, const float *b, float *y)
{
    const float mean = row_sum(x, D) / (float)D;
    const float var = row_sum_sq(x, D, mean) / (float)D;
    const float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < D; i++) {
        float v = (x[i] - mean) * inv;
        y[i] = w ? v * w[i] + (b ? b[i] : 0.0f) : v;
    }
}

void dm_layernorm(const float *x, int N, int D, float eps, const float *w, const float *b, float *y)
{
    if (N == 1) { /* one row (the per-token qk-norm in attention.c): no parallel region */
        layernorm_row(x, D, eps, w, b, y);
        return;
    }
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

/* exp(d) for d = x - max <= 0: dm_exp_fast, and exactly 0 below its clamp (a masked -inf logit
 * gives 0, not exp(-87)); NaN passes through. */
static inline float sm_exp(float d) { return d < -87.0f ? 0.0f : dm_exp_fast(d); }

/* max in lanes (exact in any order), exp stored and summed in the lane order, times 1 / sum */
static void softmax_row(float *row, int n)
{
    const int nv = n - n % LANES;
    float mx[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = row[0];
    for (int i = 0; i < nv; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) mx[l] = row[i + l] > mx[l] ? row[i + l] : mx[l];
    for (int i = nv; i < n; i++) mx[i - nv] = row[i] > mx[i - nv] ? row[i] : mx[i - nv];
    float m = mx[0];
    for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    float acc[LANES] = {0};
    for (int i = 0; i < nv; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const float e = sm_exp(row[i + l] - m);
            row[i + l] = e;
            acc[l] += e;
        }
    for (int i = nv; i < n; i++) {
        const float e = sm_exp(row[i] - m);
        row[i] = e;
        acc[i - nv] += e;
    }
    const float inv = 1.0f / lanes_sum(acc);
#pragma omp simd
    for (int i = 0; i < n; i++) row[i] *= inv;
}

void dm_softmax_rows(float *x, int N, int n)
{
    for (int r = 0; r < N; r++) softmax_row(x + (size_t)r * n, n);
}

void dm_softmax_rows_ref(float *x, int N, int n)
{
    for (int r = 0; r < N; r++) {
        float *row = x + (size_t)r * n;
        double m = row[0], s = 0;
        for (int i = 1; i < n; i++) m = row[i] > m ? row[i] : m;
        for (int i = 0; i < n; i++) s += exp((double)row[i] - m);
        for (int i = 0; i < n; i++) row[i] = (float)(exp((double)row[i] - m) / s);
    }
}

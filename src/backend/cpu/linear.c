/* Dense matrix work: y = x W^T + b through OpenBLAS, and its naive reference. */
#include "backend/cpu/ops.h"

#include <cblas.h>

void dm_linear(const float *x, int N, int in, const float *W, const float *b, int out, float *y)
{
    if (N == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, out, in, 1.0f, x, in, W, in, 0.0f, y,
                out);
    if (!b) return;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *row = y + (size_t)n * out;
        for (int o = 0; o < out; o++) row[o] += b[o];
    }
}

void dm_linear_ref(const float *x, int N, int in, const float *W, const float *b, int out, float *y)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < out; o++) {
            double acc = b ? b[o] : 0.0;
            for (int i = 0; i < in; i++) acc += (double)x[(size_t)n * in + i] * W[(size_t)o * in + i];
            y[(size_t)n * out + o] = (float)acc;
        }
}

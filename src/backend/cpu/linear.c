/* Dense y = x W^T + b for unpacked weights (tests, benchmarks, one-off products) through our own
 * fixed-order GEMM (gemm.h): W^T is packed per call. And its naive reference. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/ops.h"

#include <stdlib.h>

int dm_linear(const float *x, int N, int in, const float *W, const float *b, int out, float *y)
{
    if (N <= 0 || out <= 0) return 0;
    float *wp = malloc(sizeof(float) * (dm_bpack_size(in, out) + 1));
    if (!wp) return -1;
    dm_bpack_t(W, (size_t)in, in, out, wp); /* B [in, out] = W^T */
    dm_gemm_epi e = DM_GEMM_EPI_INIT;
    e.col_bias = b;
    dm_gemm(x, (size_t)in, N, in, (dm_gemm_b){wp, 0}, out, y, (size_t)out, &e, 1);
    free(wp);
    return 0;
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

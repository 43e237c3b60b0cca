/* Our own GEMM over pre-packed weights: y[N,out] = x[N,in] · W^T + b.
 *
 * Why not OpenBLAS here: sgemm's blocking and small-matrix paths depend on the number of rows,
 * so the same token computed in a batch of 1 and a batch of 3 (or grouped with different tokens
 * in front of an expert) came out different in the last bits. Images must depend only on their
 * seed and index, so every output element here is one fixed-order sum over k = 0..in-1, whatever
 * N, the row's position in its tile, or the thread count. Weights are packed once at load into
 * panels of DM_PANEL output columns ([panels][in][DM_PANEL], zero-padded), which also saves the
 * per-call packing BLAS does; measured on par with or faster than OpenBLAS (docs/perf.md).
 * Compiled with -ffp-contract=fast so the accumulation is FMA. */
#include "backend/cpu/ops.h"

#include <stdlib.h>
#include <string.h>

#define MR 8 /* rows per tile */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

int dm_pmat_pack(dm_pmat *pm, const float *W, int out, int in)
{
    const int np = (out + DM_PANEL - 1) / DM_PANEL;
    float *p = aligned_alloc(64, ((size_t)np * in * DM_PANEL * sizeof(float) + 63) / 64 * 64);
    if (!p) return -1;
    for (int j = 0; j < np; j++)
        for (int k = 0; k < in; k++)
            for (int c = 0; c < DM_PANEL; c++) {
                int o = j * DM_PANEL + c;
                p[((size_t)j * in + k) * DM_PANEL + c] = o < out ? W[(size_t)o * in + k] : 0.0f;
            }
    *pm = (dm_pmat){.out = out, .in = in, .p = p};
    return 0;
}

void dm_pmat_free(dm_pmat *pm)
{
    free(pm->p);
    pm->p = NULL;
}

float dm_pmat_get(const dm_pmat *pm, int o, int i)
{
    return pm->p[((size_t)(o / DM_PANEL) * pm->in + i) * DM_PANEL + o % DM_PANEL];
}

/* C[m rows, ncols] = A[m, K] · panel + bias; m <= MR. */
static inline void tile(const float *A, int K, int m, const float *wp, const float *bias, float *C,
                        int ldc, int ncols)
{
    v16 acc[MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (v16){0};
    for (int k = 0; k < K; k++) {
        const v16 w0 = *(const v16 *)(wp + (size_t)k * DM_PANEL);
        const v16 w1 = *(const v16 *)(wp + (size_t)k * DM_PANEL + 16);
        for (int r = 0; r < MR; r++)
            if (r < m) {
                const float a = A[(size_t)r * K + k];
                acc[r][0] += a * w0;
                acc[r][1] += a * w1;
            }
    }
    for (int r = 0; r < m; r++) {
        float row[DM_PANEL];
        memcpy(row, &acc[r][0], sizeof acc[r][0]);
        memcpy(row + 16, &acc[r][1], sizeof acc[r][1]);
        float *c = C + (size_t)r * ldc;
        if (bias)
            for (int i = 0; i < ncols; i++) c[i] = row[i] + bias[i];
        else
            memcpy(c, row, (size_t)ncols * sizeof(float));
    }
}

void dm_linear_packed(const float *x, int N, const dm_pmat *W, const float *b, float *y)
{
    const int K = W->in, out = W->out, np = (out + DM_PANEL - 1) / DM_PANEL;
    const int mt = (N + MR - 1) / MR;
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < np; j++) {
            const int m = N - i * MR < MR ? N - i * MR : MR;
            const int nc = out - j * DM_PANEL < DM_PANEL ? out - j * DM_PANEL : DM_PANEL;
            tile(x + (size_t)i * MR * K, K, m, W->p + (size_t)j * K * DM_PANEL,
                 b ? b + j * DM_PANEL : NULL, y + (size_t)i * MR * out + j * DM_PANEL, out, nc);
        }
}

void dm_linear_packed_ref(const float *x, int N, const dm_pmat *W, const float *b, float *y)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < W->out; o++) {
            double acc = b ? b[o] : 0.0;
            for (int i = 0; i < W->in; i++) acc += (double)x[(size_t)n * W->in + i] * dm_pmat_get(W, o, i);
            y[(size_t)n * W->out + o] = (float)acc;
        }
}

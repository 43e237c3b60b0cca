/* VAE mid-block attention (one head of dim C over the N = H*W pixels) through our fixed-order
 * GEMM (gemm.h): q, k, v = W·GN(x) + b; scores in blocks of query rows, S = q^T k / sqrt(C),
 * row softmax (dm_softmax_rows), o^T = S v^T; x += Wo·o + bo. Every value is one fixed-order
 * sum computed by one thread, so the result does not depend on the thread count. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/ops.h" /* dm_softmax_rows */
#include "backend/cpu/vae_kernels.h"

#include <math.h>

/* Attention score block budget (floats). */
#define SCORE_BUDGET ((size_t)4 << 20)

static int score_rows(int N)
{
    size_t r = SCORE_BUDGET / (size_t)N;
    if (r < 1) r = 1;
    if (r > (size_t)N) r = (size_t)N;
    return (int)r;
}

size_t dm_vae_attn_ws_size(int C, int N)
{
    return 5 * (size_t)C * N + (size_t)score_rows(N) * N;
}

/* dst [cols, rows] = src [rows, cols]^T */
static void transpose(const float *src, int rows, int cols, float *dst, int par)
{
#pragma omp parallel for schedule(static) if (par)
    for (int c0 = 0; c0 < cols; c0 += 32)
        for (int r = 0; r < rows; r++)
            for (int c = c0; c < c0 + 32 && c < cols; c++)
                dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

/* y [C, N] = W [C, C] · h [C, N] + b */
static void proj(const float *W, const float *b, const float *h, int C, int N, float *y, int par)
{
    dm_gemm_epi e = DM_GEMM_EPI_INIT;
    e.row_bias = b;
    dm_gemm(W, (size_t)C, C, C, (dm_gemm_b){h, (size_t)N}, N, y, (size_t)N, &e, par);
}

void dm_vae_attention(float *x, int C, int N, int G, const dm_vae_attn_w *aw, float *ws)
{
    float *h = ws;                /* [C, N] normed input; at the end o */
    float *q = h + (size_t)C * N; /* [C, N]; then v^T [N, C] */
    float *k = q + (size_t)C * N; /* [C, N] */
    float *v = k + (size_t)C * N; /* [C, N]; then o^T [N, C] */
    float *qt = v + (size_t)C * N; /* [N, C] */
    float *S = qt + (size_t)C * N; /* [nb, N] score block */
    const int par = (double)C * N * (4.0 * C + 2.0 * N) >= DM_VAE_PAR_MACS; /* all products */
    dm_vae_group_norm(x, C, (size_t)N, G, DM_VAE_EPS, aw->gn_g, aw->gn_b, 0, h);
    proj(aw->wq, aw->bq, h, C, N, q, par);
    proj(aw->wk, aw->bk, h, C, N, k, par);
    proj(aw->wv, aw->bv, h, C, N, v, par);
    transpose(q, C, N, qt, par);
    float *vt = q, *ot = v;
    transpose(v, C, N, vt, par);
    dm_gemm_epi es = DM_GEMM_EPI_INIT;
    es.alpha = 1.0f / sqrtf((float)C);
    const int nb = score_rows(N);
    for (int n0 = 0; n0 < N; n0 += nb) {
        const int m = n0 + nb <= N ? nb : N - n0;
        /* S [m, N] = scale * q^T[n0 : n0+m] [m, C] · k [C, N] */
        dm_gemm(qt + (size_t)n0 * C, (size_t)C, m, C, (dm_gemm_b){k, (size_t)N}, N, S, (size_t)N,
                &es, par);
#pragma omp parallel for schedule(static) if (par)
        for (int i = 0; i < m; i++) dm_softmax_rows(S + (size_t)i * N, 1, N);
        /* o^T[n0 : n0+m] [m, C] = S [m, N] · v^T [N, C] */
        dm_gemm(S, (size_t)N, m, N, (dm_gemm_b){vt, (size_t)C}, C, ot + (size_t)n0 * C, (size_t)C,
                NULL, par);
    }
    transpose(ot, N, C, h, par); /* o [C, N] */
    /* x += wo · o + bo */
    dm_gemm_epi eo = DM_GEMM_EPI_INIT;
    eo.row_bias = aw->bo;
    eo.accumulate = 1;
    dm_gemm(aw->wo, (size_t)C, C, C, (dm_gemm_b){h, (size_t)N}, N, x, (size_t)N, &eo, par);
}

/* Multi-head self-attention over all tokens of each image (no mask), optional per-head q/k
 * LayerNorm (the XL/G "qknorm" layout).
 *
 * Fast path: one (image, head) pair per OpenMP task; both products go through our fixed-order
 * GEMM (gemm.h) on the calling thread: S = (q k^T) / sqrt(hd) with k^T packed from the k rows,
 * softmax over each row of S, then out = S v with v packed from the qkv rows. Every value is
 * computed by one thread in an order that depends only on T and hd, so the result is the same
 * bits for any thread count and any batch. With qk-norm, q and k are normalised into scratch
 * first. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* dst [T, hd] = LayerNorm_hd(head h of q or k (which = 0, 1) of image b). */
static void norm_head(const float *qkv, int T, int D, int which, int h, int hd, const float *w,
                      const float *b, float eps, float *dst)
{
    for (int t = 0; t < T; t++)
        dm_layernorm(qkv + (size_t)t * 3 * D + (size_t)which * D + (size_t)h * hd, 1, hd, eps, w,
                     b, dst + (size_t)t * hd);
}

int dm_attention(const float *qkv, int B, int T, int H, int hd, const dm_qk_norm *qk, float *out)
{
    const int D = H * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    int failed = 0;
    const size_t npk = dm_bpack_size(hd, T), npv = dm_bpack_size(T, hd);
#pragma omp parallel reduction(| : failed)
    {
        size_t nq = qk ? (size_t)2 * T * hd : 0;
        float *buf = malloc(((size_t)T * T + npk + npv + nq) * sizeof(float));
        if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            if (!buf) continue;
            const int b = bh / H, h = bh % H;
            const float *rows = qkv + (size_t)b * T * 3 * D;
            const float *q = rows + (size_t)h * hd, *k = rows + D + (size_t)h * hd;
            const float *v = rows + 2 * D + (size_t)h * hd;
            int ldq = 3 * D, ldk = 3 * D;
            float *s = buf;                        /* [T, T] scores, then probabilities */
            float *pk = s + (size_t)T * T;         /* k^T [hd, T] packed */
            float *pv = pk + npk;                  /* v [T, hd] packed */
            if (qk) {
                float *qn = pv + npv, *kn = qn + (size_t)T * hd;
                norm_head(rows, T, D, 0, h, hd, qk->q_w, qk->q_b, qk->eps, qn);
                norm_head(rows, T, D, 1, h, hd, qk->k_w, qk->k_b, qk->eps, kn);
                q = qn, k = kn, ldq = ldk = hd;
            }
            dm_bpack_t(k, (size_t)ldk, hd, T, pk);
            dm_gemm_epi e = DM_GEMM_EPI_INIT;
            e.alpha = scale;
            dm_gemm(q, (size_t)ldq, T, hd, (dm_gemm_b){pk, 0}, T, s, (size_t)T, &e, 0);
            dm_softmax_rows(s, T, T);
            dm_bpack(v, (size_t)3 * D, T, hd, pv);
            dm_gemm(s, (size_t)T, T, T, (dm_gemm_b){pv, 0}, hd, out + (size_t)b * T * D + (size_t)h * hd,
                    (size_t)D, NULL, 0);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

void dm_attention_ref(const float *qkv, int B, int T, int H, int hd, const dm_qk_norm *qk,
                      float *out)
{
    const int D = H * hd;
    float *q = malloc((size_t)T * hd * sizeof(float)), *k = malloc((size_t)T * hd * sizeof(float));
    double *s = malloc((size_t)T * sizeof(double));
    if (!q || !k || !s) goto done;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            for (int t = 0; t < T; t++) {
                const float *row = qkv + ((size_t)b * T + t) * 3 * D;
                for (int d = 0; d < hd; d++) {
                    q[(size_t)t * hd + d] = row[h * hd + d];
                    k[(size_t)t * hd + d] = row[D + h * hd + d];
                }
                if (qk && qk->q_w) {
                    dm_layernorm_ref(q + (size_t)t * hd, 1, hd, qk->eps, qk->q_w, qk->q_b, q + (size_t)t * hd);
                    dm_layernorm_ref(k + (size_t)t * hd, 1, hd, qk->eps, qk->k_w, qk->k_b, k + (size_t)t * hd);
                }
            }
            for (int i = 0; i < T; i++) {
                double m = -INFINITY, sum = 0;
                for (int j = 0; j < T; j++) {
                    double acc = 0;
                    for (int d = 0; d < hd; d++) acc += (double)q[(size_t)i * hd + d] * k[(size_t)j * hd + d];
                    s[j] = acc / sqrt((double)hd);
                    if (s[j] > m) m = s[j];
                }
                for (int j = 0; j < T; j++) sum += (s[j] = exp(s[j] - m));
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j < T; j++)
                        acc += s[j] / sum * qkv[((size_t)b * T + j) * 3 * D + 2 * D + h * hd + d];
                    out[((size_t)b * T + i) * D + h * hd + d] = (float)acc;
                }
            }
        }
done:
    free(q);
    free(k);
    free(s);
}

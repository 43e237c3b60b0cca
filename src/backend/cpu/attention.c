/* Multi-head self-attention over all tokens of each image (no mask), optional per-head q/k
 * LayerNorm (the XL/G "qknorm" layout).
 *
 * Fast path: one (image, head) pair per OpenMP task; both products are single-threaded sgemm
 * calls reading q, k, v in place from the qkv rows (leading dimension 3D) and writing the head's
 * columns of `out` (leading dimension D). With qk-norm, q and k are normalised into scratch
 * first. The OpenMP build of OpenBLAS runs single-threaded inside our parallel region. */
#include "backend/cpu/ops.h"

#include <cblas.h>
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
#pragma omp parallel reduction(| : failed)
    {
        size_t nq = qk ? (size_t)2 * T * hd : 0;
        float *buf = malloc(((size_t)T * T + nq) * sizeof(float));
        if (!buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            if (!buf) continue;
            const int b = bh / H, h = bh % H;
            const float *rows = qkv + (size_t)b * T * 3 * D;
            const float *q = rows + (size_t)h * hd, *k = rows + D + (size_t)h * hd;
            const float *v = rows + 2 * D + (size_t)h * hd;
            int ldq = 3 * D, ldk = 3 * D;
            float *s = buf; /* [T, T] scores, then probabilities */
            if (qk) {
                float *qn = buf + (size_t)T * T, *kn = qn + (size_t)T * hd;
                norm_head(rows, T, D, 0, h, hd, qk->q_w, qk->q_b, qk->eps, qn);
                norm_head(rows, T, D, 1, h, hd, qk->k_w, qk->k_b, qk->eps, kn);
                q = qn, k = kn, ldq = ldk = hd;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, q, ldq, k, ldk,
                        0.0f, s, T);
            dm_softmax_rows(s, T, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, s, T, v, 3 * D,
                        0.0f, out + (size_t)b * T * D + (size_t)h * hd, D);
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

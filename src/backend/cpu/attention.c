/* Multi-head self-attention over all tokens of each image (no mask), optional per-head q/k
 * LayerNorm (the XL/G "qknorm" layout).
 *
 * Fast path: one (image, head) pair per task. K is transposed to [hd, T] so both products are
 * axpy-shaped inner loops over a contiguous axis, which the compiler vectorises without
 * reassociating sums:   s[j] = sum_d q[d] * kT[d][j],   o[:] = sum_j p[j] * v[j][:].  */
#include "backend/cpu/ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Copy head h of q, k or v (which = 0, 1, 2) of image b into dst [T, hd], qk-normed if asked. */
static void gather_head(const float *qkv, int b, int T, int H, int hd, int which, int h,
                        const float *nw, const float *nb, float *dst)
{
    const int D = H * hd;
    for (int t = 0; t < T; t++) {
        const float *src = qkv + ((size_t)b * T + t) * 3 * D + (size_t)which * D + (size_t)h * hd;
        float *d = dst + (size_t)t * hd;
        if (nw)
            dm_layernorm(src, 1, hd, 1e-6f, nw, nb, d);
        else
            memcpy(d, src, (size_t)hd * sizeof(float));
    }
}

static void attend_head(const float *q, const float *kT, const float *v, int T, int hd, float *s,
                        float *out, int out_stride)
{
    const float scale = 1.0f / sqrtf((float)hd);
    for (int i = 0; i < T; i++) {
        const float *qi = q + (size_t)i * hd;
        for (int j = 0; j < T; j++) s[j] = 0.0f;
        for (int d = 0; d < hd; d++) {
            const float qd = qi[d] * scale;
            const float *kr = kT + (size_t)d * T;
            for (int j = 0; j < T; j++) s[j] += qd * kr[j];
        }
        dm_softmax_rows(s, 1, T);
        float *o = out + (size_t)i * out_stride;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (int j = 0; j < T; j++) {
            const float p = s[j];
            const float *vj = v + (size_t)j * hd;
            for (int d = 0; d < hd; d++) o[d] += p * vj[d];
        }
    }
}

int dm_attention(const float *qkv, int B, int T, int H, int hd, const dm_qk_norm *qk, float *out)
{
    const int D = H * hd;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *buf = malloc(((size_t)4 * T * hd + T) * sizeof(float));
        if (!buf) failed = 1;
        float *q = buf, *k = q + (size_t)T * hd, *kT = k + (size_t)T * hd, *v = kT + (size_t)T * hd,
              *s = v + (size_t)T * hd;
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            if (!buf) continue;
            int b = bh / H, h = bh % H;
            gather_head(qkv, b, T, H, hd, 0, h, qk ? qk->q_w : NULL, qk ? qk->q_b : NULL, q);
            gather_head(qkv, b, T, H, hd, 1, h, qk ? qk->k_w : NULL, qk ? qk->k_b : NULL, k);
            gather_head(qkv, b, T, H, hd, 2, h, NULL, NULL, v);
            for (int t = 0; t < T; t++)
                for (int d = 0; d < hd; d++) kT[(size_t)d * T + t] = k[(size_t)t * hd + d];
            attend_head(q, kT, v, T, hd, s, out + (size_t)b * T * D + (size_t)h * hd, D);
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
                    dm_layernorm_ref(q + (size_t)t * hd, 1, hd, 1e-6f, qk->q_w, qk->q_b, q + (size_t)t * hd);
                    dm_layernorm_ref(k + (size_t)t * hd, 1, hd, 1e-6f, qk->k_w, qk->k_b, k + (size_t)t * hd);
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

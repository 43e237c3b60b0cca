/* VAE convolutions through our fixed-order GEMM (gemm.h).
 *
 * k x k (k > 1): implicit im2col. The unrolled input is never built whole: each thread packs one
 * 32-pixel panel of it ([Cin*k*k][32], zero padding outside the image) into its own slot of
 * `col` and multiplies the weights [Cout, Cin*k*k] by it while the panel is hot in its cache.
 * 1 x 1: out = w [Cout, Cin] · x [Cin, HW], x read in place. Each output value is one sum over
 * (ci, ky, kx) in that order, whatever the thread count. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/vae_kernels.h"

#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Panel slots in the scratch: at most this many threads pack panels at once. */
#define CONV_SLOTS 16

size_t dm_vae_conv_col_size(int Cin, int H, int W, int k)
{
    (void)H, (void)W;
    if (k == 1) return 0;
    return (size_t)CONV_SLOTS * Cin * k * k * DM_GEMM_NR;
}

/* bp [Cin*k*k][32] = the unrolled input for output pixels n0 .. n0+31 (zeros past HW). */
static void pack_panel(const float *x, int Cin, int H, int W, int k, int n0, float *bp)
{
    const int p = (k - 1) / 2;
    const size_t HW = (size_t)H * W;
    if (W % DM_GEMM_NR == 0) {
        /* The panel lies in one output row y, columns x0 .. x0+31. */
        const int y = n0 / W, x0 = n0 % W;
        for (int ci = 0; ci < Cin; ci++)
            for (int ky = 0; ky < k; ky++) {
                const int iy = y + ky - p;
                float *d = bp + ((size_t)ci * k + ky) * k * DM_GEMM_NR;
                if (iy < 0 || iy >= H) {
                    memset(d, 0, sizeof(float) * DM_GEMM_NR * k);
                    continue;
                }
                const float *src = x + (size_t)ci * HW + (size_t)iy * W;
                for (int kx = 0; kx < k; kx++, d += DM_GEMM_NR) {
                    const int s0 = x0 + kx - p; /* input column of panel column 0 */
                    if (s0 >= 0 && s0 + DM_GEMM_NR <= W) {
                        memcpy(d, src + s0, sizeof(float) * DM_GEMM_NR);
                    } else {
                        for (int c = 0; c < DM_GEMM_NR; c++) {
                            const int ix = s0 + c;
                            d[c] = ix >= 0 && ix < W ? src[ix] : 0.0f;
                        }
                    }
                }
            }
        return;
    }
    int yc[DM_GEMM_NR], xc[DM_GEMM_NR];
    for (int c = 0; c < DM_GEMM_NR; c++) {
        const size_t n = (size_t)n0 + c;
        yc[c] = n < HW ? (int)(n / W) : -H - k; /* past the end: every tap outside */
        xc[c] = n < HW ? (int)(n % W) : 0;
    }
    for (int ci = 0; ci < Cin; ci++)
        for (int ky = 0; ky < k; ky++)
            for (int kx = 0; kx < k; kx++) {
                float *d = bp + (((size_t)ci * k + ky) * k + kx) * DM_GEMM_NR;
                const float *xch = x + (size_t)ci * HW;
                for (int c = 0; c < DM_GEMM_NR; c++) {
                    const int iy = yc[c] + ky - p, ix = xc[c] + kx - p;
                    d[c] = iy >= 0 && iy < H && ix >= 0 && ix < W ? xch[(size_t)iy * W + ix] : 0.0f;
                }
            }
}

static void conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out, int acc)
{
    const int HW = H * W;
    dm_gemm_epi e = DM_GEMM_EPI_INIT;
    e.row_bias = b;
    e.accumulate = acc;
    if (k == 1) {
        dm_gemm(w, (size_t)Cin, Cout, Cin, (dm_gemm_b){x, (size_t)HW}, HW, out, (size_t)HW, &e, 1);
        return;
    }
    const int K = Cin * k * k, np = (HW + DM_GEMM_NR - 1) / DM_GEMM_NR;
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    if (nt > CONV_SLOTS) nt = CONV_SLOTS;
    if (nt > np) nt = np;
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *bp = col + (size_t)tid * K * DM_GEMM_NR;
#pragma omp for schedule(dynamic, 1)
        for (int j = 0; j < np; j++) {
            const int n0 = j * DM_GEMM_NR, nc = HW - n0 < DM_GEMM_NR ? HW - n0 : DM_GEMM_NR;
            pack_panel(x, Cin, H, W, k, n0, bp);
            dm_gemm_panel(w, (size_t)K, Cout, K, bp, 0, n0, nc, out, (size_t)HW, &e);
        }
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

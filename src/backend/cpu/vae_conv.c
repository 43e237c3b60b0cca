/* VAE convolutions, every product a fixed-order FMA chain (gemm.h or the Winograd GEMM below).
 *
 * 3 x 3: Winograd, F(4x4, 3x3) on maps >= DM_VAE_F4_MIN_HW pixels with sides multiples of 4,
 * else F(2x2, 3x3); the element-wise products summed over Cin are GEMMs on blocks of panels of
 * 32 tiles per thread. Other k > 1: implicit im2col: each thread packs one 32-pixel panel of the
 * unrolled input ([Cin*k*k][32], zero padding outside the image) into its own slot of `col` and
 * multiplies the weights [Cout, Cin*k*k] by it while the panel is hot in its cache.
 * 1 x 1: out = w [Cout, Cin] · x [Cin, HW], x read in place. Each output value is computed by one
 * thread in an order fixed by the shapes, whatever the thread count. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/vae_kernels.h"
#include "ditmoe.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
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

/* ---- 3x3 by Winograd F(2x2, 3x3) ------------------------------------------------------------
 * out tile 2x2 = A^T [ (G g G^T) .* (B^T d B) ] A per channel pair, summed over Cin: 16 products
 * per 2x2 outputs instead of 36. The 16 element-wise products summed over Cin are 16 GEMMs
 * U_xi [Cout, Cin] · V_xi [Cin, tiles] (wino_gemm below), on blocks of up to WP_MAX panels of 32
 * tiles per thread (V block P x 16 x Cin x 32, M block P x 16 x Cp x 32). Each output value comes from one
 * thread in an order fixed by the shapes, so the result is thread invariant; it differs from the
 * direct convolution in the last bits (the transforms round differently).
 *   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
 *   A^T = [1 1 1 0; 0 1 -1 -1] */
#define WT 32 /* tiles per block (one GEMM panel) */

/* Helpers shared by F(2x2) and F(4x4): T is the output tile side (2 or 4), always a constant at
 * the call site so the loops unroll as if written out. */

/* Tiles t0+c0 .. t0+c0+run-1 (run returned) lie in one tile row ty, from tile column tx0. */
static inline int wino_run(int t0, int c0, int nt, int tw, int *ty, int *tx0)
{
    *ty = (t0 + c0) / tw, *tx0 = (t0 + c0) % tw;
    return tw - *tx0 < nt - c0 ? tw - *tx0 : nt - c0;
}

/* Zero columns nt .. 31 of V [nxi][Cin][32] (the unused tiles of a block). */
static void wino_zero_tail(float *V, int nxi, int Cin, int nt)
{
    if (nt < WT)
        for (int xi = 0; xi < nxi; xi++)
            for (int ci = 0; ci < Cin; ci++)
                memset(V + ((size_t)xi * Cin + ci) * WT + nt, 0, sizeof(float) * (WT - nt));
}

/* -> x row iy, columns ix0 .. ix0+n-1 of one channel xc [H][W]: in place when inside the image,
 * else copied into rp [n] with zeros outside it. */
static inline const float *wino_row(const float *xc, int H, int W, int iy, int ix0, int n,
                                    float *rp)
{
    if (iy >= 0 && iy < H && ix0 >= 0 && ix0 + n <= W) return xc + (size_t)iy * W + ix0;
    if (iy < 0 || iy >= H) {
        memset(rp, 0, sizeof(float) * n);
        return rp;
    }
    const float *row = xc + (size_t)iy * W;
    const int lo = ix0 < 0 ? -ix0 : 0, hi = ix0 + n > W ? W - ix0 : n;
    for (int k = 0; k < lo; k++) rp[k] = 0.0f;
    memcpy(rp + lo, row + ix0 + lo, sizeof(float) * (hi - lo));
    for (int k = hi; k < n; k++) rp[k] = 0.0f;
    return rp;
}

/* Output channel oc [H][W] at tiles t0 .. t0+nt-1 (T x T) = y [T][T][32], or += y when acc.
 * Rows past H and columns past W (the partial tiles of an odd side, F(2x2) only) are skipped.
 * y (read only; not const: ISO C before C23 will not pass float [T][T][WT] as const) is indexed
 * as an array (a variably modified parameter): the same loop on a flat pointer,
 * y[(i*T + j)*WT + c], vectorised worse and made F(4x4) up to 13% slower (32 -> 32 @256x256). */
static inline __attribute__((always_inline)) void
wino_store(const int T, float y[T][T][WT], int H, int W, int tw, int t0, int nt, int acc,
           float *oc)
{
    for (int c0 = 0; c0 < nt;) {
        int ty, tx0;
        const int run = wino_run(t0, c0, nt, tw, &ty, &tx0);
        const int full = T * (tx0 + run) <= W ? run : run - 1; /* tiles wholly inside */
        const int last = W - T * (tx0 + full);                 /* columns of the partial tile */
        const int rows = H - T * ty < T ? H - T * ty : T;
        for (int i = 0; i < rows; i++) {
            float *o = oc + (size_t)(T * ty + i) * W + T * tx0;
            if (acc)
                for (int c = 0; c < full; c++)
                    for (int j = 0; j < T; j++) o[T * c + j] = o[T * c + j] + y[i][j][c0 + c];
            else
                for (int c = 0; c < full; c++)
                    for (int j = 0; j < T; j++) o[T * c + j] = y[i][j][c0 + c];
            if (full < run)
                for (int j = 0; j < last; j++) {
                    float *ol = o + T * full + j;
                    *ol = acc ? *ol + y[i][j][c0 + full] : y[i][j][c0 + full];
                }
        }
        c0 += run;
    }
}

/* Row tile i of Up [16][ceil(Cout/8)][Cin][8] = G g G^T for every (co, ci), packed as dm_apack does. Walked
 * in the packed order (row tile, ci, row in tile) so each of the 16 outputs is written in runs
 * of 8 contiguous floats. */
static void wino_weights(const float *w, int Cin, int Cout, float *Up, int i)
{
    const int mt = (Cout + DM_GEMM_MR - 1) / DM_GEMM_MR;
    const size_t xs = (size_t)mt * DM_GEMM_MR * Cin; /* floats per xi */
    for (int ci = 0; ci < Cin; ci++) {
        float u[16][DM_GEMM_MR];
        for (int r = 0; r < DM_GEMM_MR; r++) {
            const int co = i * DM_GEMM_MR + r;
            if (co >= Cout) {
                for (int xi = 0; xi < 16; xi++) u[xi][r] = 0.0f;
                continue;
            }
            const float *g = w + ((size_t)co * Cin + ci) * 9;
            float t[4][3]; /* G g */
            for (int j = 0; j < 3; j++) {
                t[0][j] = g[j];
                t[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
                t[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
                t[3][j] = g[6 + j];
            }
            for (int q = 0; q < 4; q++) { /* (G g) G^T */
                u[q * 4 + 0][r] = t[q][0];
                u[q * 4 + 1][r] = 0.5f * (t[q][0] + t[q][1] + t[q][2]);
                u[q * 4 + 2][r] = 0.5f * (t[q][0] - t[q][1] + t[q][2]);
                u[q * 4 + 3][r] = t[q][2];
            }
        }
        const size_t at = ((size_t)i * Cin + ci) * DM_GEMM_MR;
        for (int xi = 0; xi < 16; xi++) memcpy(Up + xi * xs + at, u[xi], sizeof u[xi]);
    }
}

/* V [16][Cin][32] = B^T d B for tiles t0 .. t0+nt-1 (zeros for the unused columns). The block
 * is walked in runs of tiles of one tile row; the input row segment a run reads is copied with
 * its zero padding into rp [2*32 + 4] so the run's loops have no bounds checks (and vectorise). */
static void wino_input(const float *x, int Cin, int H, int W, int tw, int t0, int nt, float *V,
                       float *rp)
{
    const size_t HW = (size_t)H * W, cs = (size_t)Cin * WT; /* floats per xi */
    wino_zero_tail(V, 16, Cin, nt);
    for (int c0 = 0; c0 < nt;) {
        int ty, tx0;
        const int run = wino_run(t0, c0, nt, tw, &ty, &tx0); /* tiles c0 .. c0+run-1 */
        for (int ci = 0; ci < Cin; ci++) {
            const float *xc = x + (size_t)ci * HW;
            float e[4][4][WT]; /* e[r][q][c]: row r of the patch times B */
            for (int r = 0; r < 4; r++) {
                /* b[k] = x[2 ty - 1 + r][2 tx0 - 1 + k], k = 0 .. 2 run + 1, zero outside the
                 * image; patch column q of tile c: b[2c + q] */
                const float *b = wino_row(xc, H, W, 2 * ty - 1 + r, 2 * tx0 - 1, 2 * run + 2, rp);
                for (int c = 0; c < run; c++) {
                    const float d0 = b[2 * c], d1 = b[2 * c + 1], d2 = b[2 * c + 2], d3 = b[2 * c + 3];
                    e[r][0][c] = d0 - d2;
                    e[r][1][c] = d1 + d2;
                    e[r][2][c] = d2 - d1;
                    e[r][3][c] = d1 - d3;
                }
            }
            float *vc = V + (size_t)ci * WT + c0;
            for (int q = 0; q < 4; q++)
                for (int c = 0; c < run; c++) {
                    vc[(0 * 4 + q) * cs + c] = e[0][q][c] - e[2][q][c];
                    vc[(1 * 4 + q) * cs + c] = e[1][q][c] + e[2][q][c];
                    vc[(2 * 4 + q) * cs + c] = e[2][q][c] - e[1][q][c];
                    vc[(3 * 4 + q) * cs + c] = e[1][q][c] - e[3][q][c];
                }
        }
        c0 += run;
    }
}

/* out tiles t0 .. t0+nt-1 = A^T m A (+ b), or out += that, from M [16][Cp][32] (Cp >= Cout). */
static void wino_output(const float *Mb, int Cp, int Cout, int H, int W, int tw, int t0, int nt,
                        const float *b, int acc, float *out)
{
    const size_t HW = (size_t)H * W, xs = (size_t)Cp * WT;
    for (int co = 0; co < Cout; co++) {
        const float bias = b ? b[co] : 0.0f;
        float *oc = out + (size_t)co * HW;
        const float *mc = Mb + (size_t)co * WT;
        float y[2][2][WT]; /* y[i][j][c] = (A^T m A)[i][j] + bias for tile c */
        for (int c = 0; c < nt; c++) {
            float t[2][4]; /* A^T m */
            for (int j = 0; j < 4; j++) {
                t[0][j] = mc[(0 * 4 + j) * xs + c] + mc[(1 * 4 + j) * xs + c] + mc[(2 * 4 + j) * xs + c];
                t[1][j] = mc[(1 * 4 + j) * xs + c] - mc[(2 * 4 + j) * xs + c] - mc[(3 * 4 + j) * xs + c];
            }
            for (int i = 0; i < 2; i++) {
                y[i][0][c] = (t[i][0] + t[i][1] + t[i][2]) + bias;
                y[i][1][c] = (t[i][1] - t[i][2] - t[i][3]) + bias;
            }
        }
        wino_store(2, y, H, W, tw, t0, nt, acc, oc);
    }
}

/* ---- 3x3 by Winograd F(4x4, 3x3) on large maps ---------------------------------------------
 * 36 products per 4x4 outputs (2.25 per output instead of 4): 36 GEMMs U_xi [Cout, Cin] ·
 * V_xi [Cin, tiles], the same blocks and GEMM as F(2x2). Interpolation points 0, 1, -1, 2, -1/2
 * (and infinity): of the sets tried ({0,±1,±2}, {0,±1,±1/2}, {0,±1,1/2,-2}, {0,±1,2,-1/2}) the
 * one with the smallest float32 error (max 1.5e-5 x RMS per layer in a numpy model of one
 * 256-channel layer, vs 4.5e-5 for the usual ±2; F(2x2) 2.3e-6). Used on maps of at least
 * DM_VAE_F4_MIN_HW pixels whose sides are multiples of 4 (no partial tiles), where most of the
 * FLOPs are; the error budget is in docs/perf.md. Matrices (y = A^T [(G g G^T) .* (B^T d B)] A):
 *   B^T rows: [1 3/2 -2 -3/2 1 0] [0 -1 -5/2 -1/2 1 0] [0 1 1/2 -5/2 1 0]
 *             [0 -1/2 -1 1/2 1 0] [0 2 -1 -2 1 0]     [0 1 3/2 -2 -3/2 1]
 *   G rows:   [1 0 0] [-1/3 -1/3 -1/3] [1/3 -1/3 1/3] [1/15 2/15 4/15] [-16/15 8/15 -4/15] [0 0 1]
 *   A^T rows: [1 1 1 1 1 0] [0 1 -1 2 -1/2 0] [0 1 1 4 1/4 0] [0 1 -1 8 -1/8 1] */
#ifndef DM_VAE_F4_MIN_HW
#define DM_VAE_F4_MIN_HW (64 * 64)
#endif

/* The 1-D transforms, written out (the sums in this order; no multiply by 0 or +-1), as macros
 * so the same expressions run on floats and on 16-lane vectors (same bits per lane). */
#define BT6(d, o)                                                           \
    do {                                                                    \
        (o)[0] = (d)[0] + 1.5f * (d)[1] - 2.0f * (d)[2] - 1.5f * (d)[3] + (d)[4]; \
        (o)[1] = -(d)[1] - 2.5f * (d)[2] - 0.5f * (d)[3] + (d)[4];          \
        (o)[2] = (d)[1] + 0.5f * (d)[2] - 2.5f * (d)[3] + (d)[4];           \
        (o)[3] = -0.5f * (d)[1] - (d)[2] + 0.5f * (d)[3] + (d)[4];          \
        (o)[4] = 2.0f * (d)[1] - (d)[2] - 2.0f * (d)[3] + (d)[4];           \
        (o)[5] = (d)[1] + 1.5f * (d)[2] - 2.0f * (d)[3] - 1.5f * (d)[4] + (d)[5]; \
    } while (0)
#define AT4(m, o)                                                           \
    do {                                                                    \
        (o)[0] = (m)[0] + (m)[1] + (m)[2] + (m)[3] + (m)[4];                \
        (o)[1] = (m)[1] - (m)[2] + 2.0f * (m)[3] - 0.5f * (m)[4];           \
        (o)[2] = (m)[1] + (m)[2] + 4.0f * (m)[3] + 0.25f * (m)[4];          \
        (o)[3] = (m)[1] - (m)[2] + 8.0f * (m)[3] - 0.125f * (m)[4] + (m)[5]; \
    } while (0)
static inline void g6(const float g[3], float o[6])
{
    o[0] = g[0];
    o[1] = -(g[0] + g[1] + g[2]) / 3.0f;
    o[2] = (g[0] - g[1] + g[2]) / 3.0f;
    o[3] = (g[0] + 2.0f * g[1] + 4.0f * g[2]) / 15.0f;
    o[4] = (-16.0f * g[0] + 8.0f * g[1] - 4.0f * g[2]) / 15.0f;
    o[5] = g[2];
}
/* 16 floats as one value (GCC/clang vector extension: lane-wise, no contraction into FMA).
 * Loads and stores are macros: a function passing it by value changes ABI with the target. */
typedef float v16f __attribute__((vector_size(64)));
#define LD16(v, p) memcpy(&(v), (p), sizeof(v16f))
#define ST16(p, v) memcpy((p), &(v), sizeof(v16f))

/* Row tile i of Up [36][ceil(Cout/8)][Cin][8] = G g G^T. */
static void wino4_weights(const float *w, int Cin, int Cout, float *Up, int i)
{
    const int mt = (Cout + DM_GEMM_MR - 1) / DM_GEMM_MR;
    const size_t xs = (size_t)mt * DM_GEMM_MR * Cin;
    for (int ci = 0; ci < Cin; ci++) {
        float u[36][DM_GEMM_MR];
        for (int r = 0; r < DM_GEMM_MR; r++) {
            const int co = i * DM_GEMM_MR + r;
            if (co >= Cout) {
                for (int xi = 0; xi < 36; xi++) u[xi][r] = 0.0f;
                continue;
            }
            const float *g = w + ((size_t)co * Cin + ci) * 9;
            float t[6][3], col[3], row[6]; /* t = G g */
            for (int j = 0; j < 3; j++) {
                col[0] = g[j], col[1] = g[3 + j], col[2] = g[6 + j];
                g6(col, row);
                for (int q = 0; q < 6; q++) t[q][j] = row[q];
            }
            for (int q = 0; q < 6; q++) { /* (G g) G^T */
                g6(t[q], row);
                for (int s = 0; s < 6; s++) u[q * 6 + s][r] = row[s];
            }
        }
        const size_t at = ((size_t)i * Cin + ci) * DM_GEMM_MR;
        for (int xi = 0; xi < 36; xi++) memcpy(Up + xi * xs + at, u[xi], sizeof u[xi]);
    }
}

/* V [36][Cin][32] = B^T d B for tiles t0 .. t0+nt-1 (zeros for unused columns); tiles are 4x4
 * with H, W multiples of 4. rp: [4*32 + 2] row segment with its zero padding. */
static void wino4_input(const float *x, int Cin, int H, int W, int tw, int t0, int nt, float *V,
                        float *rp)
{
    const size_t HW = (size_t)H * W, cs = (size_t)Cin * WT;
    wino_zero_tail(V, 36, Cin, nt);
    for (int c0 = 0; c0 < nt;) {
        int ty, tx0;
        const int run = wino_run(t0, c0, nt, tw, &ty, &tx0);
        for (int ci = 0; ci < Cin; ci++) {
            const float *xc = x + (size_t)ci * HW;
            float e[6][6][WT]; /* e[r][q][c]: row r of tile c's patch times B */
            for (int r = 0; r < 6; r++) {
                const float *b = wino_row(xc, H, W, 4 * ty - 1 + r, 4 * tx0 - 1, 4 * run + 2, rp);
                int c = 0;
                for (; c + 16 <= run; c += 16) { /* d_s[c] = b[4c + s]: deinterleave by 4 */
                    const float *bc = b + 4 * c;
                    v16f d[6], o[6];
#ifdef __AVX512F__
                    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                                         24, 26, 28, 30);
                    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
                    const __m512i sh = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                        9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(1));
                    const __m512 l0 = _mm512_loadu_ps(bc), l1 = _mm512_loadu_ps(bc + 16);
                    const __m512 l2 = _mm512_loadu_ps(bc + 32), l3 = _mm512_loadu_ps(bc + 48);
                    const __m512 e01 = _mm512_permutex2var_ps(l0, ev, l1), o01 = _mm512_permutex2var_ps(l0, od, l1);
                    const __m512 e23 = _mm512_permutex2var_ps(l2, ev, l3), o23 = _mm512_permutex2var_ps(l2, od, l3);
                    const __m512 q0 = _mm512_permutex2var_ps(e01, ev, e23), q1 = _mm512_permutex2var_ps(o01, ev, o23);
                    const __m512 q2 = _mm512_permutex2var_ps(e01, od, e23), q3 = _mm512_permutex2var_ps(o01, od, o23);
                    const __m512 q4 = _mm512_permutex2var_ps(q0, sh, _mm512_set1_ps(bc[64]));
                    const __m512 q5 = _mm512_permutex2var_ps(q1, sh, _mm512_set1_ps(bc[65]));
                    memcpy(&d[0], &q0, 64), memcpy(&d[1], &q1, 64), memcpy(&d[2], &q2, 64);
                    memcpy(&d[3], &q3, 64), memcpy(&d[4], &q4, 64), memcpy(&d[5], &q5, 64);
#else
                    float t[6][16];
                    for (int l = 0; l < 16; l++)
                        for (int q = 0; q < 6; q++) t[q][l] = bc[4 * l + q];
                    for (int q = 0; q < 6; q++) LD16(d[q], t[q]);
#endif
                    BT6(d, o);
                    for (int q = 0; q < 6; q++) ST16(e[r][q] + c, o[q]);
                }
                for (; c < run; c++) {
                    float o[6];
                    BT6(b + 4 * c, o);
                    for (int q = 0; q < 6; q++) e[r][q][c] = o[q];
                }
            }
            float *vc = V + (size_t)ci * WT + c0;
            for (int q = 0; q < 6; q++) {
                int c = 0;
                for (; c + 16 <= run; c += 16) {
                    v16f d[6], o[6];
                    for (int r = 0; r < 6; r++) LD16(d[r], e[r][q] + c);
                    BT6(d, o);
                    for (int p = 0; p < 6; p++) ST16(vc + (p * 6 + q) * cs + c, o[p]);
                }
                for (; c < run; c++) {
                    float d[6], o[6];
                    for (int r = 0; r < 6; r++) d[r] = e[r][q][c];
                    BT6(d, o);
                    for (int p = 0; p < 6; p++) vc[(p * 6 + q) * cs + c] = o[p];
                }
            }
        }
        c0 += run;
    }
}

/* out tiles t0 .. t0+nt-1 (4x4) = A^T m A (+ b), or out += that, from M [36][Cp][32]. */
static void wino4_output(const float *Mb, int Cp, int Cout, int H, int W, int tw, int t0, int nt,
                         const float *b, int acc, float *out)
{
    const size_t HW = (size_t)H * W, xs = (size_t)Cp * WT;
    for (int co = 0; co < Cout; co++) {
        const float bias = b ? b[co] : 0.0f;
        float *oc = out + (size_t)co * HW;
        const float *mc = Mb + (size_t)co * WT;
        float y[4][4][WT];
        for (int c = 0; c < nt; c += 16) { /* all 32 columns of M exist (zeros past nt) */
            v16f t[4][6]; /* A^T m */
            for (int j = 0; j < 6; j++) {
                v16f m6[6], o[4];
                for (int i = 0; i < 6; i++) LD16(m6[i], mc + (i * 6 + j) * xs + c);
                AT4(m6, o);
                for (int i = 0; i < 4; i++) t[i][j] = o[i];
            }
            for (int i = 0; i < 4; i++) {
                v16f o[4];
                AT4(t[i], o);
                for (int j = 0; j < 4; j++) {
                    const v16f yb = o[j] + bias;
                    ST16(y[i][j] + c, yb);
                }
            }
        }
        wino_store(4, y, H, W, tw, t0, nt, acc, oc);
    }
}

/* ---- the 16 products, blocked over several panels --------------------------------------------
 * M_p,xi [Cp][32] = U_xi (packed [Cp/8][Cin][8]) · V_p,xi [Cin][32] for the P panels p of a
 * block: the 8-row A micro-panel (8 x Cin, in L1) is used on all P panels (Cin x 32 each, in L2)
 * before the next one is loaded, so U is streamed from memory once per P panels instead of once
 * per panel. Every value is one FMA chain over ci = 0 .. Cin-1 from 0, whatever P or the thread
 * count. (Cutting k into L1-sized blocks, as dm_gemm_panel_ap does, was slower here: perf.md.) */
#define WP_MAX 8 /* panels per block at most */

#ifdef __AVX512F__
/* c [8][32] = a [K][8] · b [K][32], each value acc = fma(a, b, acc) over k from 0. */
static inline void wtile(const float *a, const float *b, int K, float *c)
{
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 b0 = _mm512_loadu_ps(b + (size_t)k * 32), b1 = _mm512_loadu_ps(b + (size_t)k * 32 + 16);
        const float *ak = a + (size_t)k * 8;
        for (int r = 0; r < 8; r++) {
            const __m512 ar = _mm512_set1_ps(ak[r]);
            acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_ps(c + r * 32, acc[r][0]);
        _mm512_storeu_ps(c + r * 32 + 16, acc[r][1]);
    }
}
#else
static inline void wtile(const float *a, const float *b, int K, float *c)
{
    float acc[8][32] = {{0}};
    for (int k = 0; k < K; k++)
        for (int r = 0; r < 8; r++)
            for (int j = 0; j < 32; j++) acc[r][j] = fmaf(a[(size_t)k * 8 + r], b[(size_t)k * 32 + j], acc[r][j]);
    memcpy(c, acc, sizeof acc);
}
#endif

/* For p < P: C + p*cstep [Cp][32] = A [Cp/8][K][8] · (B + p*bstep) [K][32]. */
static void wino_gemm(const float *A, int Cp, int K, const float *B, size_t bstep, int P, float *C,
                      size_t cstep)
{
    for (int i = 0; i < Cp / 8; i++)
        for (int p = 0; p < P; p++)
            wtile(A + (size_t)i * K * 8, B + p * bstep, K, C + p * cstep + (size_t)i * 8 * 32);
}

/* ---- per-thread scratch kept between calls ---------------------------------------------------
 * A small VAE (the shipped Fashion-MNIST one) makes thousands of convolutions of a few hundred KiB
 * of scratch each; malloc/free of that size went to mmap/munmap and a page fault per fresh page
 * (~10 % of the decode). Buffers up to SCR_KEEP bytes are kept per thread (freed at thread exit
 * by a pthread key destructor); larger ones are allocated per call (their convolutions are big
 * enough not to notice), so an SD decode does not keep tens of MiB after it. */
#ifndef SCR_KEEP
#define SCR_KEEP ((size_t)40 << 20)
#endif
enum { SCR_U, SCR_V, SCR_M, SCR_R, SCR_N };
typedef struct {
    float *p[SCR_N];
    size_t cap[SCR_N]; /* bytes */
} scratch_t;
static pthread_key_t scr_key;
static int scr_key_ok;
static pthread_once_t scr_once = PTHREAD_ONCE_INIT;

static void scr_free(void *q)
{
    scratch_t *t = q;
    for (int i = 0; i < SCR_N; i++) free(t->p[i]);
    free(t);
}
static void scr_init(void) { scr_key_ok = pthread_key_create(&scr_key, scr_free) == 0; }

/* n floats in this thread's slot (kept), or a fresh allocation (too big / no key); NULL: no
 * memory. Give it back with scr_put. */
static float *scr_get(int slot, size_t n)
{
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    pthread_once(&scr_once, scr_init);
    scratch_t *t = scr_key_ok ? pthread_getspecific(scr_key) : NULL;
    if (!t && scr_key_ok && bytes <= SCR_KEEP) {
        t = calloc(1, sizeof *t);
        if (t && pthread_setspecific(scr_key, t) != 0) {
            free(t);
            t = NULL;
        }
    }
    if (!t || bytes > SCR_KEEP) return aligned_alloc(64, bytes);
    if (t->cap[slot] < bytes) {
        free(t->p[slot]);
        t->p[slot] = aligned_alloc(64, bytes);
        t->cap[slot] = t->p[slot] ? bytes : 0;
    }
    return t->p[slot];
}
static void scr_put(int slot, float *p)
{
    scratch_t *t = scr_key_ok ? pthread_getspecific(scr_key) : NULL;
    if (!t || t->p[slot] != p) free(p);
}

/* 0, or -1 when the scratch cannot be allocated (the caller then runs the direct path). */
static int conv3x3_winograd(const float *x, int Cin, int H, int W, const float *w, const float *b,
                            int Cout, float *out, int acc)
{
    const int f4 = H % 4 == 0 && W % 4 == 0 && (double)H * W >= DM_VAE_F4_MIN_HW;
    const int NX = f4 ? 36 : 16, ts = f4 ? 4 : 2; /* products, tile side */
    const int th = (H + ts - 1) / ts, tw = (W + ts - 1) / ts, T = th * tw, np = (T + WT - 1) / WT;
    const int mt = (Cout + DM_GEMM_MR - 1) / DM_GEMM_MR, Cp = mt * DM_GEMM_MR;
    const size_t xs = (size_t)Cp * Cin;
    int nthr = 1;
#ifdef _OPENMP
    if ((double)Cin * Cout * 9 * H * W >= DM_VAE_PAR_MACS) nthr = omp_get_max_threads();
#endif
    /* panels per block: enough blocks for every thread, at most WP_MAX (the bits do not depend
     * on it) */
    int P = (np + nthr - 1) / nthr;
    if (P > WP_MAX) P = WP_MAX;
    if (P < 1) P = 1;
    const int nb = (np + P - 1) / P;
    const size_t vstep = (size_t)NX * Cin * WT, mstep = (size_t)NX * Cp * WT; /* per panel */
    float *Up = scr_get(SCR_U, NX * xs);
    if (!Up) return -1;
    int failed = 0; /* shared: any thread without scratch stops them all before any work */
    /* One team for the weight transform and the blocks (each barrier costs, on a loaded machine,
     * up to a time slice of the thread that is not running). */
#pragma omp parallel num_threads(nb < nthr ? nb : nthr)
    {
        float *V = scr_get(SCR_V, P * vstep), *Mb = scr_get(SCR_M, P * mstep);
        float *rp = scr_get(SCR_R, 4 * WT + 4);
        if (!V || !Mb || !rp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) /* its implicit barrier also publishes `failed` */
        for (int i = 0; i < mt; i++) {
            if (f4)
                wino4_weights(w, Cin, Cout, Up, i);
            else
                wino_weights(w, Cin, Cout, Up, i);
        }
        int stop;
#pragma omp atomic read
        stop = failed;
        if (!stop) {
#pragma omp for schedule(dynamic, 1)
            for (int blk = 0; blk < nb; blk++) {
                const int p0 = blk * P, pn = np - p0 < P ? np - p0 : P;
                for (int p = 0; p < pn; p++) {
                    const int t0 = (p0 + p) * WT, nt = T - t0 < WT ? T - t0 : WT;
                    if (f4)
                        wino4_input(x, Cin, H, W, tw, t0, nt, V + p * vstep, rp);
                    else
                        wino_input(x, Cin, H, W, tw, t0, nt, V + p * vstep, rp);
                }
                for (int xi = 0; xi < NX; xi++)
                    wino_gemm(Up + xi * xs, Cp, Cin, V + (size_t)xi * Cin * WT, vstep, pn,
                              Mb + (size_t)xi * Cp * WT, mstep);
                for (int p = 0; p < pn; p++) {
                    const int t0 = (p0 + p) * WT, nt = T - t0 < WT ? T - t0 : WT;
                    if (f4)
                        wino4_output(Mb + p * mstep, Cp, Cout, H, W, tw, t0, nt, b, acc, out);
                    else
                        wino_output(Mb + p * mstep, Cp, Cout, H, W, tw, t0, nt, b, acc, out);
                }
            }
        }
        scr_put(SCR_V, V), scr_put(SCR_M, Mb), scr_put(SCR_R, rp);
    }
    scr_put(SCR_U, Up);
    return failed ? -1 : 0;
}

static void conv2d(const float *x, int Cin, int H, int W, const float *w, const float *b, int Cout,
                   int k, float *col, float *out, int acc)
{
    const int HW = H * W;
    dm_gemm_epi e = DM_GEMM_EPI_INIT;
    e.row_bias = b;
    e.accumulate = acc;
    const int par = (double)Cin * Cout * k * k * HW >= DM_VAE_PAR_MACS;
    if (k == 1) {
        dm_gemm(w, (size_t)Cin, Cout, Cin, (dm_gemm_b){x, (size_t)HW}, HW, out, (size_t)HW, &e, par);
        return;
    }
    if (k == 3) {
        if (conv3x3_winograd(x, Cin, H, W, w, b, Cout, out, acc) == 0) return;
        dm_log(DM_LOG_INFO, "VAE conv %d->%d at %dx%d: no memory for the Winograd scratch; "
               "direct convolution instead (same result up to the last bits, slower)", Cin, Cout,
               H, W);
    }
    const int K = Cin * k * k, np = (HW + DM_GEMM_NR - 1) / DM_GEMM_NR;
    int nt = 1;
#ifdef _OPENMP
    if (par) nt = omp_get_max_threads();
#endif
    if (nt > CONV_SLOTS) nt = CONV_SLOTS;
    if (nt > np) nt = np;
    /* Weights packed per call ([Cout/8][K][8], contiguous broadcasts); without memory for it the
     * unpacked path runs (same bits, slower). */
    float *wp = malloc(sizeof(float) * dm_apack_size(Cout, K));
    if (wp) dm_apack(w, (size_t)K, Cout, K, wp);
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *bp = col + (size_t)tid * K * DM_GEMM_NR;
        float *part = wp ? malloc(sizeof(float) * dm_apack_size(Cout, DM_GEMM_NR)) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int j = 0; j < np; j++) {
            const int n0 = j * DM_GEMM_NR, nc = HW - n0 < DM_GEMM_NR ? HW - n0 : DM_GEMM_NR;
            pack_panel(x, Cin, H, W, k, n0, bp);
            if (wp)
                dm_gemm_panel_ap(wp, Cout, K, bp, n0, nc, out, (size_t)HW, &e, part);
            else
                dm_gemm_panel(w, (size_t)K, Cout, K, bp, 0, n0, nc, out, (size_t)HW, &e);
        }
        free(part);
    }
    free(wp);
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

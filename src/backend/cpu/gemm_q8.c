/* int8 GEMM (lowp.h): W8A8 with int32 accumulation.
 *   y[n][o] = fma((float)(sum_k u[n][k] * q[o][k] - corr[o]), sx[n] * s[o], b[o])
 * u = activations quantised per row + 128 (unsigned, the operand vpdpbusd multiplies as u8),
 * q = int8 weights, s = their per-column scale, corr = 128 * sum_k q[o][k] (removes the +128).
 * The int32 sum is exact whatever the order (|u q| <= 255 * 127, in < 66000), so the VNNI and the
 * portable paths agree bit for bit, and the float epilogue is the same three operations in both.
 * Layout: int8 [np][ceil(in/4)][32 columns][4 consecutive k] (one vpdpbusd lane = one column,
 * four k); activation rows padded to a multiple of 4 with u = 128 against zero weights.
 * Paths: AMX (tdpbusd) when the CPU and OS allow it and in % 64 == 0, else AVX512-VNNI, else the
 * portable loops; all three give the same bits. */
#include "backend/cpu/lowp_impl.h"

#include <math.h>
#include <stdlib.h>
#ifdef DM_LP_X86
#include <immintrin.h>
#endif

#define MR 8

dm_status dm_lp_pack_q8(dm_lpmat *m, const float *W)
{
    const int out = m->out, in = m->in, cols = m->np * DM_LP_PANEL;
    m->kb = (in + 3) / 4;
    const size_t n = (size_t)m->np * m->kb * DM_LP_PANEL * 4;
    int8_t *p = aligned_alloc(64, (n + 63) / 64 * 64);
    m->w = p;
    m->scale = calloc((size_t)cols, sizeof(float));
    m->corr = calloc((size_t)cols, sizeof(int32_t));
    if (!p || !m->scale || !m->corr) return DM_ERR_NOMEM;
    memset(p, 0, n);
    for (int o = 0; o < out; o++) {
        const float *w = W + (size_t)o * in;
        float amax = 0.0f;
        for (int i = 0; i < in; i++) amax = fabsf(w[i]) > amax ? fabsf(w[i]) : amax;
        const float s = amax / 127.0f;
        int32_t sum = 0;
        const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
        for (int i = 0; i < in && s > 0.0f; i++) {
            float q = rintf(w[i] / s);
            q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
            p[((j * m->kb + (size_t)i / 4) * DM_LP_PANEL + c) * 4 + (size_t)i % 4] = (int8_t)q;
            sum += (int32_t)q;
        }
        m->scale[o] = s;
        m->corr[o] = 128 * sum;
    }
    return DM_OK;
}

/* ---- portable path ---------------------------------------------------------------------------- */

static void tile_generic(const uint8_t *X, size_t ld, int kb, int m, const int8_t *wp,
                         const int32_t *corr, const float *sw, const float *sx, const float *bias,
                         float *C, int ldc, int nc)
{
    int32_t acc[MR][DM_LP_PANEL];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < kb; k++) {
        /* this quad's weights de-interleaved to [4][32], so the row loops below run over
         * contiguous columns (the compiler vectorises them); integer sums: any order is exact */
        int32_t wt[4][DM_LP_PANEL];
        const int8_t *w = wp + (size_t)k * DM_LP_PANEL * 4;
        for (int c = 0; c < DM_LP_PANEL; c++)
            for (int t = 0; t < 4; t++) wt[t][c] = w[c * 4 + t];
        for (int r = 0; r < m; r++) {
            const uint8_t *u = X + (size_t)r * ld + 4 * (size_t)k;
            for (int t = 0; t < 4; t++) {
                const int32_t a = u[t];
                for (int c = 0; c < DM_LP_PANEL; c++) acc[r][c] += a * wt[t][c];
            }
        }
    }
    for (int r = 0; r < m; r++) {
        float *y = C + (size_t)r * ldc;
        for (int c = 0; c < nc; c++)
            y[c] = fmaf((float)(acc[r][c] - corr[c]), sx[r] * sw[c], bias ? bias[c] : 0.0f);
    }
}

/* ---- AVX512-VNNI path ------------------------------------------------------------------------- */
#ifdef DM_LP_X86
#define TGT_VNNI __attribute__((target(DM_TARGET_AVX512 ",avx512vnni")))

TGT_VNNI static inline __attribute__((always_inline)) void
tile_q8_m(const int M, const uint8_t *X, size_t ld, int kb, const int8_t *wp, const int32_t *corr,
          const float *sw, const float *sx, const float *bias, float *C, int ldc, int nc)
{
    __m512i acc[MR][2];
    for (int r = 0; r < M; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int k = 0; k < kb; k++) {
        const __m512i w0 = _mm512_load_si512(wp + (size_t)k * DM_LP_PANEL * 4);
        const __m512i w1 = _mm512_load_si512(wp + (size_t)k * DM_LP_PANEL * 4 + 64);
        for (int r = 0; r < M; r++) {
            int32_t a4;
            memcpy(&a4, X + (size_t)r * ld + 4 * (size_t)k, 4);
            const __m512i a = _mm512_set1_epi32(a4);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, w1);
        }
    }
    const __m512i c0 = _mm512_loadu_si512(corr), c1 = _mm512_loadu_si512(corr + 16);
    const __m512 s0 = _mm512_loadu_ps(sw), s1 = _mm512_loadu_ps(sw + 16);
    const dm_lp_tail tl = dm_lp_tail_of(nc, bias);
    const __mmask16 m0 = tl.m0, m1 = tl.m1;
    const __m512 b0 = tl.b0, b1 = tl.b1;
    for (int r = 0; r < M; r++) {
        const __m512 xs = _mm512_set1_ps(sx[r]);
        const __m512 t0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], c0));
        const __m512 t1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], c1));
        float *c = C + (size_t)r * ldc;
        _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(t0, _mm512_mul_ps(xs, s0), b0));
        _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(t1, _mm512_mul_ps(xs, s1), b1));
    }
}

#define TILE_M(M)                                                                                  \
    TGT_VNNI static void tile_q8_##M(const uint8_t *X, size_t ld, int kb, const int8_t *wp,       \
                                     const int32_t *corr, const float *sw, const float *sx,       \
                                     const float *bias, float *C, int ldc, int nc)                \
    {                                                                                              \
        tile_q8_m(M, X, ld, kb, wp, corr, sw, sx, bias, C, ldc, nc);                               \
    }
TILE_M(1) TILE_M(2) TILE_M(3) TILE_M(4) TILE_M(5) TILE_M(6) TILE_M(7) TILE_M(8)
typedef void (*tile_q8_fn)(const uint8_t *, size_t, int, const int8_t *, const int32_t *,
                           const float *, const float *, const float *, float *, int, int);
static const tile_q8_fn tiles_q8[MR + 1] = {NULL,      tile_q8_1, tile_q8_2, tile_q8_3, tile_q8_4,
                                            tile_q8_5, tile_q8_6, tile_q8_7, tile_q8_8};

/* ---- AMX path (tdpbusd: 16 x 16 int32 += 16 x 64 u8 . 64 x 16 s8 per instruction) ------------
 * The packed weights are already the B-tile layout (a k quad per tile row, 16 columns x 4 bytes,
 * row stride 128 bytes = one panel's quad), the activation rows are A-tile rows. A block is 32
 * rows x one panel: C tiles 0-3, A tiles 4-5, B tiles 6-7; needs in % 64 == 0 and the activation
 * buffer padded to a multiple of 32 rows. Integer sums are exact, so the result is the same as
 * the VNNI and portable paths'. */
#define TGT_AMX __attribute__((target(DM_TARGET_AVX512 ",avx512vnni,amx-tile,amx-int8")))

TGT_AMX static void block_q8_amx(const uint8_t *X, size_t ld, int kb, int m, const int8_t *wp,
                                 const int32_t *corr, const float *sw, const float *sx,
                                 const float *bias, float *C, int ldc, int nc)
{
    int32_t acc[32][DM_LP_PANEL] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    if (m > 16) {
        _tile_zero(2);
        _tile_zero(3);
        for (int s = 0; s < kb; s += 16) {
            _tile_loadd(4, X + 4 * (size_t)s, ld);
            _tile_loadd(5, X + 16 * ld + 4 * (size_t)s, ld);
            _tile_loadd(6, wp + (size_t)s * 128, 128);
            _tile_loadd(7, wp + (size_t)s * 128 + 64, 128);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(2, &acc[16][0], 128);
        _tile_stored(3, &acc[16][16], 128);
    } else {
        for (int s = 0; s < kb; s += 16) {
            _tile_loadd(4, X + 4 * (size_t)s, ld);
            _tile_loadd(6, wp + (size_t)s * 128, 128);
            _tile_loadd(7, wp + (size_t)s * 128 + 64, 128);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
        }
    }
    _tile_stored(0, &acc[0][0], 128);
    _tile_stored(1, &acc[0][16], 128);
    const __m512i c0 = _mm512_loadu_si512(corr), c1 = _mm512_loadu_si512(corr + 16);
    const __m512 s0 = _mm512_loadu_ps(sw), s1 = _mm512_loadu_ps(sw + 16);
    const dm_lp_tail tl = dm_lp_tail_of(nc, bias);
    const __mmask16 m0 = tl.m0, m1 = tl.m1;
    const __m512 b0 = tl.b0, b1 = tl.b1;
    for (int r = 0; r < m; r++) { /* the VNNI tile's epilogue, operation for operation */
        const __m512 xs = _mm512_set1_ps(sx[r]);
        const __m512 t0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc[r]), c0));
        const __m512 t1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc[r] + 16), c1));
        float *c = C + (size_t)r * ldc;
        _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(t0, _mm512_mul_ps(xs, s0), b0));
        _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(t1, _mm512_mul_ps(xs, s1), b1));
    }
}

static void gemm_q8_amx(const uint8_t *xu, const float *sx, int N, const dm_lpmat *W, const float *b,
                        float *y)
{
    const int kb = W->kb, out = W->out, np = W->np, mt = (N + 31) / 32;
    const size_t ld = (size_t)kb * 4;
    const int8_t *wbase = W->w;
#pragma omp parallel
    {
        dm_amx_begin();
#pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < mt; i++)
            for (int j = 0; j < np; j++) {
                const int m = N - i * 32 < 32 ? N - i * 32 : 32;
                const int nc = out - j * DM_LP_PANEL < DM_LP_PANEL ? out - j * DM_LP_PANEL : DM_LP_PANEL;
                block_q8_amx(xu + (size_t)i * 32 * ld, ld, kb, m,
                             wbase + (size_t)j * kb * DM_LP_PANEL * 4, W->corr + j * DM_LP_PANEL,
                             W->scale + j * DM_LP_PANEL, sx + i * 32, b ? b + j * DM_LP_PANEL : NULL,
                             y + (size_t)i * 32 * out + j * DM_LP_PANEL, out, nc);
            }
        dm_amx_end();
    }
}
#endif

void dm_lp_gemm_q8(const uint8_t *xu, const float *sx, int N, const dm_lpmat *W, const float *b,
                   float *y, unsigned feat)
{
    const int kb = W->kb, out = W->out, np = W->np, mt = (N + MR - 1) / MR;
    const size_t ld = (size_t)kb * 4;
    const int fast = (feat & DM_CPU_AVX512_VNNI) != 0;
    const int8_t *wbase = W->w;
#ifdef DM_LP_X86
    if ((feat & DM_CPU_AMX_INT8) && kb % 16 == 0) {
        gemm_q8_amx(xu, sx, N, W, b, y);
        return;
    }
#endif
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < np; j++) {
            const int m = N - i * MR < MR ? N - i * MR : MR;
            const int nc = out - j * DM_LP_PANEL < DM_LP_PANEL ? out - j * DM_LP_PANEL : DM_LP_PANEL;
            const uint8_t *X = xu + (size_t)i * MR * ld;
            const int8_t *wp = wbase + (size_t)j * kb * DM_LP_PANEL * 4;
            const int32_t *corr = W->corr + j * DM_LP_PANEL;
            const float *sw = W->scale + j * DM_LP_PANEL, *bias = b ? b + j * DM_LP_PANEL : NULL;
            float *C = y + (size_t)i * MR * out + j * DM_LP_PANEL;
#ifdef DM_LP_X86
            if (fast) tiles_q8[m](X, ld, kb, wp, corr, sw, sx + i * MR, bias, C, out, nc);
            else
#endif
                tile_generic(X, ld, kb, m, wp, corr, sw, sx + i * MR, bias, C, out, nc);
        }
    (void)fast;
}

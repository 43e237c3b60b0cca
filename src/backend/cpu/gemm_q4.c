/* int4 GEMM (lowp.h): weights in groups of 32 along the input, one bf16 scale d per group and
 * column; activations quantised per row to int8 and stored + 128 (u, unsigned for vpdpbusd).
 *   acc = -fcorr[o];  for g in order: acc = fma(d[g][o], (float)(sum_{k in g} u[k] * 16 q[o][k]), acc)
 *   y[n][o] = fma(acc, sx[n] / 16, b[o])
 * The weights enter the dot product as 16 q (the nibble moved to the top of its byte: no sign
 * extension needed), |u * 16 q| <= 255 * 128, so a group's int32 sum is exact and converts to float
 * exactly (< 2^24); fcorr = 128 * 16 * sum_g d[g] sum_{k in g} q (the +128 of u), computed once at
 * pack. Float work is the same fma chain in both paths, so the VNNI and portable paths agree bit
 * for bit.
 * Layout per panel and group: 8 quads of 64 bytes; byte c*4+j of quad t holds k = 32g + 4t + j of
 * column c in its low nibble and of column c+16 in its high nibble (two's complement). One 64-byte
 * load gives both 16-column halves: high = v & 0xF0, low = (v << 4) & 0xF0. */
#include "backend/cpu/lowp_impl.h"

#include <math.h>
#include <stdlib.h>
#ifdef DM_LP_X86
#include <immintrin.h>
#endif

#define MR 6
#define QB 512 /* bytes per panel and group: 32 columns x 32 k x 4 bits */

dm_status dm_lp_pack_q4(dm_lpmat *m, const float *W)
{
    const int out = m->out, in = m->in, cols = m->np * DM_LP_PANEL;
    m->kb = in / DM_Q4_GROUP;
    const size_t n = (size_t)m->np * m->kb * QB;
    uint8_t *p = aligned_alloc(64, n);
    m->w = p;
    m->gscale = calloc((size_t)m->np * m->kb * DM_LP_PANEL, sizeof(uint16_t));
    m->fcorr = calloc((size_t)cols, sizeof(float));
    if (!p || !m->gscale || !m->fcorr) return DM_ERR_NOMEM;
    memset(p, 0, n);
    for (int o = 0; o < out; o++) {
        const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
        double corr = 0;
        for (int g = 0; g < m->kb; g++) {
            const float *w = W + (size_t)o * in + (size_t)g * DM_Q4_GROUP;
            float big = 0.0f; /* the value of largest magnitude */
            for (int i = 0; i < DM_Q4_GROUP; i++) big = fabsf(w[i]) > fabsf(big) ? w[i] : big;
            const uint16_t dh = dm_lp_bf16_rne(big / -8.0f);
            const float d = dm_bf16_to_f32(dh);
            m->gscale[(j * m->kb + g) * DM_LP_PANEL + c] = dh;
            int sum = 0;
            for (int i = 0; i < DM_Q4_GROUP && d != 0.0f; i++) {
                float q = rintf(w[i] / d);
                q = q > 7.0f ? 7.0f : q < -8.0f ? -8.0f : q;
                const int qi = (int)q;
                sum += qi;
                uint8_t *byte = p + (j * m->kb + g) * QB + (size_t)(i / 4) * 64 + (c % 16) * 4 + i % 4;
                *byte |= (uint8_t)((qi & 15) << (c < 16 ? 0 : 4));
            }
            corr += (double)d * sum;
        }
        m->fcorr[o] = (float)(corr * 128.0 * 16.0);
    }
    return DM_OK;
}

/* ---- portable path ---------------------------------------------------------------------------- */

static void tile_generic(const uint8_t *X, size_t ld, int G, int m, const uint8_t *wp,
                         const uint16_t *gs, const float *fcorr, const float *sx, const float *bias,
                         float *C, int ldc, int nc)
{
    float acc[MR][DM_LP_PANEL];
    for (int r = 0; r < m; r++)
        for (int c = 0; c < DM_LP_PANEL; c++) acc[r][c] = -fcorr[c];
    for (int g = 0; g < G; g++) {
        /* the group's weights as 16 q, [32 k][32 columns], so the row loops run over contiguous
         * columns; the integer group sums are exact in any order */
        int32_t wt[DM_Q4_GROUP][DM_LP_PANEL];
        const uint8_t *wg = wp + (size_t)g * QB;
        for (int t = 0; t < 8; t++)
            for (int c = 0; c < 16; c++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t byte = wg[t * 64 + c * 4 + j];
                    wt[t * 4 + j][c] = (int8_t)(uint8_t)(byte << 4);
                    wt[t * 4 + j][c + 16] = (int8_t)(byte & 0xF0);
                }
        float s[DM_LP_PANEL];
        for (int c = 0; c < DM_LP_PANEL; c++) s[c] = dm_lp_bits_f((uint32_t)gs[(size_t)g * DM_LP_PANEL + c] << 16);
        for (int r = 0; r < m; r++) {
            int32_t dot[DM_LP_PANEL] = {0};
            const uint8_t *u = X + (size_t)r * ld + (size_t)g * DM_Q4_GROUP;
            for (int k = 0; k < DM_Q4_GROUP; k++) {
                const int32_t a = u[k];
                for (int c = 0; c < DM_LP_PANEL; c++) dot[c] += a * wt[k][c];
            }
            for (int c = 0; c < DM_LP_PANEL; c++) acc[r][c] = fmaf(s[c], (float)dot[c], acc[r][c]);
        }
    }
    for (int r = 0; r < m; r++) {
        float *y = C + (size_t)r * ldc;
        for (int c = 0; c < nc; c++) y[c] = fmaf(acc[r][c], sx[r] * 0.0625f, bias ? bias[c] : 0.0f);
    }
}

/* ---- AVX512-VNNI path ------------------------------------------------------------------------- */
#ifdef DM_LP_X86
#define TGT_VNNI __attribute__((target(DM_TARGET_AVX512 ",avx512vnni")))

TGT_VNNI static inline __attribute__((always_inline)) __m512 bf16x16(const uint16_t *s)
{
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)s)), 16));
}

TGT_VNNI static inline __attribute__((always_inline)) void
tile_q4_m(const int M, const uint8_t *X, size_t ld, int G, const uint8_t *wp, const uint16_t *gs,
          const float *fcorr, const float *sx, const float *bias, float *C, int ldc, int nc)
{
    const __m512i nib = _mm512_set1_epi8((char)0xF0);
    __m512 acc[MR][2];
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u); /* -fcorr exactly as C's unary minus */
    const __m512 f0 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_loadu_si512(fcorr), sign));
    const __m512 f1 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_loadu_si512(fcorr + 16), sign));
    for (int r = 0; r < M; r++) acc[r][0] = f0, acc[r][1] = f1;
    for (int g = 0; g < G; g++) {
        __m512i dot[MR][2];
        for (int r = 0; r < M; r++) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
        const uint8_t *wg = wp + (size_t)g * QB;
        for (int t = 0; t < 8; t++) {
            const __m512i v = _mm512_load_si512(wg + t * 64);
            const __m512i w0 = _mm512_and_si512(_mm512_slli_epi16(v, 4), nib);
            const __m512i w1 = _mm512_and_si512(v, nib);
            for (int r = 0; r < M; r++) {
                int32_t a4;
                memcpy(&a4, X + (size_t)r * ld + (size_t)g * 32 + t * 4, 4);
                const __m512i a = _mm512_set1_epi32(a4);
                dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], a, w0);
                dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], a, w1);
            }
        }
        const __m512 s0 = bf16x16(gs + (size_t)g * DM_LP_PANEL);
        const __m512 s1 = bf16x16(gs + (size_t)g * DM_LP_PANEL + 16);
        for (int r = 0; r < M; r++) {
            acc[r][0] = _mm512_fmadd_ps(s0, _mm512_cvtepi32_ps(dot[r][0]), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(dot[r][1]), acc[r][1]);
        }
    }
    const dm_lp_tail tl = dm_lp_tail_of(nc, bias);
    const __mmask16 m0 = tl.m0, m1 = tl.m1;
    const __m512 b0 = tl.b0, b1 = tl.b1;
    for (int r = 0; r < M; r++) {
        const __m512 xs = _mm512_set1_ps(sx[r] * 0.0625f);
        float *c = C + (size_t)r * ldc;
        _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(acc[r][0], xs, b0));
        _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(acc[r][1], xs, b1));
    }
}

#define TILE_M(M)                                                                                  \
    TGT_VNNI static void tile_q4_##M(const uint8_t *X, size_t ld, int G, const uint8_t *wp,       \
                                     const uint16_t *gs, const float *fcorr, const float *sx,     \
                                     const float *bias, float *C, int ldc, int nc)                \
    {                                                                                              \
        tile_q4_m(M, X, ld, G, wp, gs, fcorr, sx, bias, C, ldc, nc);                               \
    }
TILE_M(1) TILE_M(2) TILE_M(3) TILE_M(4) TILE_M(5) TILE_M(6)
typedef void (*tile_q4_fn)(const uint8_t *, size_t, int, const uint8_t *, const uint16_t *,
                           const float *, const float *, const float *, float *, int, int);
static const tile_q4_fn tiles_q4[MR + 1] = {NULL,      tile_q4_1, tile_q4_2, tile_q4_3,
                                            tile_q4_4, tile_q4_5, tile_q4_6};
#endif

void dm_lp_gemm_q4(const uint8_t *xu, const float *sx, int N, const dm_lpmat *W, const float *b,
                   float *y, unsigned feat)
{
    const int G = W->kb, out = W->out, np = W->np, mt = (N + MR - 1) / MR;
    const size_t ld = (size_t)(W->in + 3) / 4 * 4;
    const int fast = (feat & DM_CPU_AVX512_VNNI) != 0;
    const uint8_t *wbase = W->w;
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < np; j++) {
            const int m = N - i * MR < MR ? N - i * MR : MR;
            const int nc = out - j * DM_LP_PANEL < DM_LP_PANEL ? out - j * DM_LP_PANEL : DM_LP_PANEL;
            const uint8_t *X = xu + (size_t)i * MR * ld, *wp = wbase + (size_t)j * G * QB;
            const uint16_t *gs = W->gscale + (size_t)j * G * DM_LP_PANEL;
            const float *fc = W->fcorr + j * DM_LP_PANEL, *bias = b ? b + j * DM_LP_PANEL : NULL;
            float *C = y + (size_t)i * MR * out + j * DM_LP_PANEL;
#ifdef DM_LP_X86
            if (fast) tiles_q4[m](X, ld, G, wp, gs, fc, sx + i * MR, bias, C, out, nc);
            else
#endif
                tile_generic(X, ld, G, m, wp, gs, fc, sx + i * MR, bias, C, out, nc);
        }
    (void)fast;
}

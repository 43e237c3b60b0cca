/* bf16 GEMM: y[N, out] = bf16(x) · bf16(W)^T + b with fp32 accumulation (lowp.h).
 *
 * Layout: weights in 32-column panels, k in pairs: uint32 [np][ceil(in/2)][32], each uint32 holding
 * (W[o][2k] low, W[o][2k+1] high), the operand vdpbf16ps wants; activations as the same pairs
 * broadcast to every lane. One accumulator per output element, k pairs in ascending order.
 *
 * What vdpbf16ps computes, measured on this project's Xeon (4M random cases over a wide exponent
 * range, 0 mismatches against the first model below, ~10 % mismatches against the others):
 *     acc = FTZ(acc + x[2k+1] * w[2k+1]);  acc = FTZ(acc + x[2k] * w[2k])
 * i.e. the ODD element first, each step one fp32 rounding (round to nearest even) of the sum of the
 * accumulator and an exact product (bf16 x bf16 has 16 significant bits, exact in fp32), as in
 * Intel's pseudo-code; NOT one rounding of the three-term sum and not the even element first.
 * Denormals: bf16 inputs and the accumulator input are read as zero, results below FLT_MIN are
 * flushed to +-0 (DAZ/FTZ, whatever MXCSR says). The portable path computes exactly that
 * (activations and weights are already flushed when rounded to bf16), so both paths give the same
 * bits. The one case not reproduced: a product that is itself below FLT_MIN (|x w| < 1.2e-38)
 * added to a non-zero accumulator, which DiT activations never reach. */
#include "backend/cpu/lowp_impl.h"

#include <stdlib.h>
#ifdef DM_LP_X86
#include <immintrin.h>
#endif

#define MR 8 /* rows per tile */

dm_status dm_lp_pack_bf16(dm_lpmat *m, const float *W)
{
    const int out = m->out, in = m->in;
    m->kb = (in + 1) / 2;
    const size_t n = (size_t)m->np * m->kb * DM_LP_PANEL;
    uint32_t *p = aligned_alloc(64, (n * sizeof(uint32_t) + 63) / 64 * 64);
    if (!p) return DM_ERR_NOMEM;
    for (int j = 0; j < m->np; j++)
        for (int k = 0; k < m->kb; k++)
            for (int c = 0; c < DM_LP_PANEL; c++) {
                const int o = j * DM_LP_PANEL + c;
                uint32_t lo = 0, hi = 0;
                if (o < out) {
                    lo = dm_lp_bf16_rne(W[(size_t)o * in + 2 * k]);
                    if (2 * k + 1 < in) hi = dm_lp_bf16_rne(W[(size_t)o * in + 2 * k + 1]);
                }
                p[((size_t)j * m->kb + k) * DM_LP_PANEL + c] = lo | hi << 16;
            }
    m->w = p;
    return DM_OK;
}

/* ---- portable path: exact emulation of vdpbf16ps (see the top) ------------------------------- */

/* The helpers that take or return a vector by value are defined once per target: clang refuses a
 * call that passes a 64-byte vector between functions compiled for different targets (the ABI
 * changes with avx512f), which a build without -march=native would otherwise make. */
#define DEFINE_VEC_HELPERS(SUF, ATTR)                                                            \
    ATTR static inline dm_v16f ftz16##SUF(dm_v16f a)                                             \
    {                                                                                            \
        dm_v16u u;                                                                               \
        memcpy(&u, &a, sizeof u);                                                                \
        dm_v16u small = (dm_v16u)((u & 0x7fffffffu) < 0x00800000u); /* |a| < FLT_MIN */          \
        u &= ~(small & 0x7fffffffu);                                                             \
        memcpy(&a, &u, sizeof a);                                                                \
        return a;                                                                                \
    }                                                                                            \
    ATTR static inline dm_v16f lo16##SUF(dm_v16u u) /* even k */                                 \
    {                                                                                            \
        dm_v16u v = u << 16;                                                                     \
        dm_v16f f;                                                                               \
        memcpy(&f, &v, sizeof f);                                                                \
        return f;                                                                                \
    }                                                                                            \
    ATTR static inline dm_v16f hi16##SUF(dm_v16u u) /* odd k */                                  \
    {                                                                                            \
        dm_v16u v = u & 0xffff0000u;                                                             \
        dm_v16f f;                                                                               \
        memcpy(&f, &v, sizeof f);                                                                \
        return f;                                                                                \
    }

static void store_rows(dm_v16f acc[MR][2], int m, const float *bias, float *C, int ldc, int nc)
{
    for (int r = 0; r < m; r++) {
        float row[DM_LP_PANEL];
        memcpy(row, &acc[r][0], 64);
        memcpy(row + 16, &acc[r][1], 64);
        float *c = C + (size_t)r * ldc;
        for (int i = 0; i < nc; i++) c[i] = bias ? row[i] + bias[i] : row[i];
    }
}

#define DEFINE_GENERIC_TILE(NAME, SUF, ATTR)                                                        \
    ATTR static void NAME(const uint32_t *X, int kb, int m, const uint32_t *wp, const float *bias, \
                          float *C, int ldc, int nc)                                             \
    {                                                                                            \
        dm_v16f acc[MR][2];                                                                      \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (dm_v16f){0};                       \
        for (int k = 0; k < kb; k++) {                                                           \
            const dm_v16u u0 = *(const dm_v16u *)(wp + (size_t)k * DM_LP_PANEL);                 \
            const dm_v16u u1 = *(const dm_v16u *)(wp + (size_t)k * DM_LP_PANEL + 16);            \
            const dm_v16f e0 = lo16##SUF(u0), o0 = hi16##SUF(u0), e1 = lo16##SUF(u1), o1 = hi16##SUF(u1);            \
            for (int r = 0; r < MR; r++)                                                         \
                if (r < m) {                                                                     \
                    const uint32_t a = X[(size_t)r * kb + k];                                    \
                    const float ae = dm_lp_bits_f(a << 16), ao = dm_lp_bits_f(a & 0xffff0000u);  \
                    acc[r][0] = ftz16##SUF(acc[r][0] + ao * o0);                                      \
                    acc[r][1] = ftz16##SUF(acc[r][1] + ao * o1);                                      \
                    acc[r][0] = ftz16##SUF(acc[r][0] + ae * e0);                                      \
                    acc[r][1] = ftz16##SUF(acc[r][1] + ae * e1);                                      \
                }                                                                                \
        }                                                                                        \
        store_rows(acc, m, bias, C, ldc, nc);                                                    \
    }

DEFINE_VEC_HELPERS(, )
DEFINE_GENERIC_TILE(tile_generic, , )
#ifdef DM_LP_X86
/* The same C, compiled for AVX512 (CPUs with AVX512 but without BF16, in a generic build). */
DEFINE_VEC_HELPERS(_avx512, __attribute__((target(DM_TARGET_AVX512))))
DEFINE_GENERIC_TILE(tile_generic_avx512, _avx512, __attribute__((target(DM_TARGET_AVX512))))
#endif

/* ---- AVX512-BF16 path ------------------------------------------------------------------------ */
#ifdef DM_LP_X86
#define TGT_BF16 __attribute__((target(DM_TARGET_AVX512 ",avx512bf16")))

/* One tile of M rows (a compile-time constant in each instance, so the accumulators stay in
 * registers); every row runs the same instruction sequence whatever M is. */
TGT_BF16 static inline __attribute__((always_inline)) void
tile_bf16_m(const int M, const uint32_t *X, int kb, const uint32_t *wp, const float *bias, float *C,
            int ldc, int nc)
{
    __m512 acc[MR][2];
    for (int r = 0; r < M; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < kb; k++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wp + (size_t)k * DM_LP_PANEL);
        const __m512bh w1 = (__m512bh)_mm512_load_si512(wp + (size_t)k * DM_LP_PANEL + 16);
        for (int r = 0; r < M; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)X[(size_t)r * kb + k]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
        }
    }
    const dm_lp_tail tl = dm_lp_tail_of(nc, bias);
    const __mmask16 m0 = tl.m0, m1 = tl.m1;
    const __m512 b0 = tl.b0, b1 = tl.b1;
    for (int r = 0; r < M; r++) {
        float *c = C + (size_t)r * ldc;
        _mm512_mask_storeu_ps(c, m0, bias ? _mm512_add_ps(acc[r][0], b0) : acc[r][0]);
        _mm512_mask_storeu_ps(c + 16, m1, bias ? _mm512_add_ps(acc[r][1], b1) : acc[r][1]);
    }
}

#define TILE_M(M)                                                                                  \
    TGT_BF16 static void tile_bf16_##M(const uint32_t *X, int kb, const uint32_t *wp,             \
                                       const float *bias, float *C, int ldc, int nc)              \
    {                                                                                              \
        tile_bf16_m(M, X, kb, wp, bias, C, ldc, nc);                                               \
    }
TILE_M(1) TILE_M(2) TILE_M(3) TILE_M(4) TILE_M(5) TILE_M(6) TILE_M(7) TILE_M(8)

typedef void (*tile_bf16_fn)(const uint32_t *, int, const uint32_t *, const float *, float *, int, int);
static const tile_bf16_fn tiles_bf16[MR + 1] = {NULL,        tile_bf16_1, tile_bf16_2,
                                                tile_bf16_3, tile_bf16_4, tile_bf16_5,
                                                tile_bf16_6, tile_bf16_7, tile_bf16_8};
#endif

#ifdef DM_LP_X86
/* ---- AMX path (tdpbf16ps: 16 x 16 fp32 += 16 x 32 bf16 . 32 x 16 bf16 per instruction) -------
 * The packed weights are the B-tile layout as is (a k pair per tile row, 16 columns x 2 bf16, row
 * stride 128 bytes); activation rows are A-tile rows (16 pairs = 64 bytes). Blocks of 32 rows x one
 * panel: C tiles 0-3, A 4-5, B 6-7; needs in % 32 == 0 and the activation buffer padded to a
 * multiple of 32 rows. Each output element still depends only on its own row and column with a
 * fixed k order (32 k per instruction, instructions in ascending k), so batch and thread
 * invariance hold; but the tile unit's internal summation is not vdpbf16ps's (measured: about
 * 60 % of outputs differ in the last bits from every sequential model tried), so results differ
 * from the vdpbf16ps / portable paths within fp32 accumulation error (test_lowp states it). */
#define TGT_AMXB __attribute__((target(DM_TARGET_AVX512 ",amx-tile,amx-bf16")))

TGT_AMXB static void block_bf16_amx(const uint32_t *X, size_t ldb, int kb, int m, const uint32_t *wp,
                                    const float *bias, float *C, int ldc, int nc)
{
    float acc[32][DM_LP_PANEL] __attribute__((aligned(64)));
    _tile_zero(0);
    _tile_zero(1);
    if (m > 16) {
        _tile_zero(2);
        _tile_zero(3);
        for (int s = 0; s < kb; s += 16) {
            _tile_loadd(4, X + s, ldb);
            _tile_loadd(5, (const char *)(X + s) + 16 * ldb, ldb);
            _tile_loadd(6, wp + (size_t)s * DM_LP_PANEL, 128);
            _tile_loadd(7, wp + (size_t)s * DM_LP_PANEL + 16, 128);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(2, &acc[16][0], 128);
        _tile_stored(3, &acc[16][16], 128);
    } else {
        for (int s = 0; s < kb; s += 16) {
            _tile_loadd(4, X + s, ldb);
            _tile_loadd(6, wp + (size_t)s * DM_LP_PANEL, 128);
            _tile_loadd(7, wp + (size_t)s * DM_LP_PANEL + 16, 128);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
    }
    _tile_stored(0, &acc[0][0], 128);
    _tile_stored(1, &acc[0][16], 128);
    const dm_lp_tail tl = dm_lp_tail_of(nc, bias);
    const __mmask16 m0 = tl.m0, m1 = tl.m1;
    const __m512 b0 = tl.b0, b1 = tl.b1;
    for (int r = 0; r < m; r++) {
        const __m512 a0 = _mm512_load_ps(acc[r]), a1 = _mm512_load_ps(acc[r] + 16);
        float *c = C + (size_t)r * ldc;
        _mm512_mask_storeu_ps(c, m0, bias ? _mm512_add_ps(a0, b0) : a0);
        _mm512_mask_storeu_ps(c + 16, m1, bias ? _mm512_add_ps(a1, b1) : a1);
    }
}

static void gemm_bf16_amx(const uint32_t *xb, int N, const dm_lpmat *W, const float *b, float *y)
{
    const int kb = W->kb, out = W->out, np = W->np, mt = (N + 31) / 32;
    const size_t ldb = (size_t)kb * sizeof(uint32_t);
    const uint32_t *wbase = W->w;
#pragma omp parallel
    {
        dm_amx_begin();
#pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < mt; i++)
            for (int j = 0; j < np; j++) {
                const int m = N - i * 32 < 32 ? N - i * 32 : 32;
                const int nc = out - j * DM_LP_PANEL < DM_LP_PANEL ? out - j * DM_LP_PANEL : DM_LP_PANEL;
                block_bf16_amx(xb + (size_t)i * 32 * kb, ldb, kb, m, wbase + (size_t)j * kb * DM_LP_PANEL,
                               b ? b + j * DM_LP_PANEL : NULL, y + (size_t)i * 32 * out + j * DM_LP_PANEL,
                               out, nc);
            }
        dm_amx_end();
    }
}
#endif

void dm_lp_gemm_bf16(const uint32_t *xb, int N, const dm_lpmat *W, const float *b, float *y,
                     unsigned feat)
{
    const int kb = W->kb, out = W->out, np = W->np, mt = (N + MR - 1) / MR;
    const int path = (feat & DM_CPU_AVX512_BF16) ? 2 : (feat & DM_CPU_AVX512) ? 1 : 0;
    const uint32_t *wbase = W->w;
#ifdef DM_LP_X86
    if ((feat & DM_CPU_AMX_BF16) && kb % 16 == 0) {
        gemm_bf16_amx(xb, N, W, b, y);
        return;
    }
#endif
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < np; j++) {
            const int m = N - i * MR < MR ? N - i * MR : MR;
            const int nc = out - j * DM_LP_PANEL < DM_LP_PANEL ? out - j * DM_LP_PANEL : DM_LP_PANEL;
            const uint32_t *X = xb + (size_t)i * MR * kb, *wp = wbase + (size_t)j * kb * DM_LP_PANEL;
            const float *bias = b ? b + j * DM_LP_PANEL : NULL;
            float *C = y + (size_t)i * MR * out + j * DM_LP_PANEL;
#ifdef DM_LP_X86
            if (path == 2) tiles_bf16[m](X, kb, wp, bias, C, out, nc);
            else if (path == 1) tile_generic_avx512(X, kb, m, wp, bias, C, out, nc);
            else
#endif
                tile_generic(X, kb, m, wp, bias, C, out, nc);
        }
    (void)path;
}

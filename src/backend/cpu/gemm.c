/* Our own GEMM over pre-packed weights: y[N,out] = x[N,in] · W^T + b.
 *
 * Why not OpenBLAS here: sgemm's blocking and small-matrix paths depend on the number of rows,
 * so the same token computed in a batch of 1 and a batch of 3 (or grouped with different tokens
 * in front of an expert) came out different in the last bits. Images must depend only on their
 * seed and index, so every output element here is one fixed-order sum over k = 0..in-1, whatever
 * N, the row's position in its tile, or the thread count. Weights are packed once at load into
 * panels of DM_PANEL output columns ([panels][in][DM_PANEL], zero-padded), which also saves the
 * per-call packing BLAS does; measured on par with or faster than OpenBLAS (docs/perf.md).
 * BF16 and F16 weights stay 16-bit in memory and are widened to float32 (exactly) in registers.
 * Compiled with -ffp-contract=fast so the accumulation is FMA. */
#include "backend/cpu/ops.h"

#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#define DM_HAVE_F16 1
#endif

#define MR 8 /* rows per tile */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static void *alloc_panels(int out, int in, size_t esize)
{
    const size_t np = (size_t)(out + DM_PANEL - 1) / DM_PANEL;
    return aligned_alloc(64, (np * in * DM_PANEL * esize + 63) / 64 * 64);
}

int dm_pmat_pack(dm_pmat *pm, const float *W, int out, int in)
{
    float *p = alloc_panels(out, in, sizeof(float));
    if (!p) return -1;
    const int np = (out + DM_PANEL - 1) / DM_PANEL;
    for (int j = 0; j < np; j++)
        for (int k = 0; k < in; k++)
            for (int c = 0; c < DM_PANEL; c++) {
                int o = j * DM_PANEL + c;
                p[((size_t)j * in + k) * DM_PANEL + c] = o < out ? W[(size_t)o * in + k] : 0.0f;
            }
    *pm = (dm_pmat){.out = out, .in = in, .dtype = DM_F32, .p = p};
    return 0;
}

int dm_pmat_pack_half(dm_pmat *pm, const void *src, dm_dtype dtype, int out, int in)
{
#ifndef DM_HAVE_F16
    if (dtype == DM_F16) return -2;
#endif
    if (dtype != DM_BF16 && dtype != DM_F16) return -2;
    uint16_t *p = alloc_panels(out, in, sizeof(uint16_t));
    if (!p) return -1;
    const unsigned char *s = src;
    const int np = (out + DM_PANEL - 1) / DM_PANEL;
    for (int j = 0; j < np; j++)
        for (int k = 0; k < in; k++)
            for (int c = 0; c < DM_PANEL; c++) {
                int o = j * DM_PANEL + c;
                uint16_t h = 0; /* +0.0 in both formats */
                if (o < out) memcpy(&h, s + ((size_t)o * in + k) * 2, 2);
                p[((size_t)j * in + k) * DM_PANEL + c] = h;
            }
    *pm = (dm_pmat){.out = out, .in = in, .dtype = dtype, .p = p};
    return 0;
}

void dm_pmat_free(dm_pmat *pm)
{
    free(pm->p);
    pm->p = NULL;
}

size_t dm_pmat_bytes(const dm_pmat *pm)
{
    return (size_t)(pm->out + DM_PANEL - 1) / DM_PANEL * pm->in * DM_PANEL *
           dm_dtype_size(pm->dtype);
}

float dm_pmat_get(const dm_pmat *pm, int o, int i)
{
    size_t at = ((size_t)(o / DM_PANEL) * pm->in + i) * DM_PANEL + o % DM_PANEL;
    switch (pm->dtype) {
    case DM_BF16: return dm_bf16_to_f32(((const uint16_t *)pm->p)[at]);
    case DM_F16: return dm_f16_to_f32(((const uint16_t *)pm->p)[at]);
    default: return ((const float *)pm->p)[at];
    }
}

/* Panel row k widened to two float32 vectors (columns 0-15, 16-31). */
static inline void row_f32(const void *panel, size_t k, v16 *w0, v16 *w1)
{
    const float *w = (const float *)panel + k * DM_PANEL;
    *w0 = *(const v16 *)w;
    *w1 = *(const v16 *)(w + 16);
}

static inline v16 widen_bf16(v16h h)
{
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void row_bf16(const void *panel, size_t k, v16 *w0, v16 *w1)
{
    const uint16_t *w = (const uint16_t *)panel + k * DM_PANEL;
    *w0 = widen_bf16(*(const v16h *)w);
    *w1 = widen_bf16(*(const v16h *)(w + 16));
}

#ifdef DM_HAVE_F16
static inline v16 widen_f16(const uint16_t *h)
{
    v16 f;
#ifdef __AVX512F__
    __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    memcpy(&f, &r, sizeof f);
#else
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
    memcpy(&f, &lo, 32);
    memcpy((char *)&f + 32, &hi, 32);
#endif
    return f;
}

static inline void row_f16(const void *panel, size_t k, v16 *w0, v16 *w1)
{
    const uint16_t *w = (const uint16_t *)panel + k * DM_PANEL;
    *w0 = widen_f16(w);
    *w1 = widen_f16(w + 16);
}
#endif

/* C[m rows, ncols] = A[m, K] · panel + bias; m <= MR. One body per weight type (ROW loads and
 * widens a panel row), so every type sums in the same order. */
#define DEFINE_TILE(NAME, ROW)                                                                    \
    static void NAME(const float *A, int K, int m, const void *wp, const float *bias, float *C, \
                     int ldc, int ncols)                                                          \
    {                                                                                             \
        v16 acc[MR][2];                                                                           \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (v16){0};                            \
        for (int k = 0; k < K; k++) {                                                             \
            v16 w0, w1;                                                                           \
            ROW(wp, (size_t)k, &w0, &w1);                                                         \
            for (int r = 0; r < MR; r++)                                                          \
                if (r < m) {                                                                      \
                    const float a = A[(size_t)r * K + k];                                         \
                    acc[r][0] += a * w0;                                                          \
                    acc[r][1] += a * w1;                                                          \
                }                                                                                 \
        }                                                                                         \
        store_tile(acc, m, bias, C, ldc, ncols);                                                  \
    }

static inline void store_tile(v16 acc[MR][2], int m, const float *bias, float *C, int ldc,
                              int ncols)
{
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

DEFINE_TILE(tile_f32, row_f32)
DEFINE_TILE(tile_bf16, row_bf16)
#ifdef DM_HAVE_F16
DEFINE_TILE(tile_f16, row_f16)
#endif

typedef void (*tile_fn)(const float *, int, int, const void *, const float *, float *, int, int);

void dm_linear_packed(const float *x, int N, const dm_pmat *W, const float *b, float *y)
{
    const int K = W->in, out = W->out, np = (out + DM_PANEL - 1) / DM_PANEL;
    const int mt = (N + MR - 1) / MR;
    const size_t esize = dm_dtype_size(W->dtype);
    tile_fn tile = W->dtype == DM_BF16 ? tile_bf16 :
#ifdef DM_HAVE_F16
                   W->dtype == DM_F16 ? tile_f16 :
#endif
                                        tile_f32;
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < np; j++) {
            const int m = N - i * MR < MR ? N - i * MR : MR;
            const int nc = out - j * DM_PANEL < DM_PANEL ? out - j * DM_PANEL : DM_PANEL;
            tile(x + (size_t)i * MR * K, K, m, (const char *)W->p + (size_t)j * K * DM_PANEL * esize,
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

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

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#define DM_HAVE_F16 1
#endif

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

/* acc + a * b, one rounding (explicit, so no code path depends on the compiler contracting:
 * clang contracted `c += a * w` in some tile variants and not others, and a row's bits then
 * depended on the size of its tile). */
static inline v16 vfma(v16 acc, float a, v16 b)
{
#ifdef __AVX512F__
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(a), (__m512)b, (__m512)acc);
    return (v16)r;
#else
    v16 r;
    for (int i = 0; i < 16; i++) r[i] = fmaf(a, b[i], acc[i]);
    return r;
#endif
}

/* The packed product's multiply-add: vfma where the target has an FMA instruction; without one
 * (a baseline x86-64 build) a multiply then an add, which no compiler can contract there, so
 * every tile variant still rounds the same way (and fmaf, a libm call per lane, is not paid). */
static inline v16 lfma(v16 acc, float a, v16 b)
{
#if defined(__AVX512F__) || defined(__FMA__)
    return vfma(acc, a, b);
#else
    return acc + a * b;
#endif
}

/* ---- the packed-weight product: register tiles over a copied block of A rows -------------
 *
 * y rows are taken in blocks of LRB tiles of LMR rows. For each chunk of LKC k values the block's
 * rows are copied (plain row copies) into a buffer whose rows are LKC floats apart, a constant,
 * so every row's broadcast is one pointer plus a fixed displacement; then every panel of the work
 * item runs over that chunk for each tile: the B chunk is reused by the block's tiles, the A tile
 * stays in L1/L2 while the panels go by. Between chunks the running sums wait in y itself
 * (stored as float32 and reloaded: exactly the register values), and the bias is added once after
 * the last chunk. So every output element is still one FMA chain over k = 0..in-1 from 0, then
 * + bias: the same bits as a one-row product, whatever N, the row's place in its tile, the
 * chunking or the thread count. */
#ifndef LMR
#define LMR 12 /* rows per register tile: 12 x 2 accumulators of 16 floats */
#endif
#ifndef LRB
#define LRB 4 /* tiles per row block */
#endif
#ifndef LKC
#define LKC 512 /* k per chunk = row stride of the copied A (a block is 96 KiB, in L2) */
#endif

/* acc[0..R) += A tile chunk (rows LKC floats apart) · panel rows 0..kc-1. R is a constant after
 * inlining, so the loop over rows unrolls and the 2R sums live in registers. */
#define DEFINE_TILE(NAME, ROW)                                                                    \
    static inline __attribute__((always_inline)) void NAME##_rows(const int R, const float *ap,  \
                                                                  int kc, const void *wp,        \
                                                                  v16 acc[LMR][2])               \
    {                                                                                             \
        v16 c[LMR][2];                                                                            \
        for (int r = 0; r < R; r++) c[r][0] = acc[r][0], c[r][1] = acc[r][1];                     \
        for (int k = 0; k < kc; k++) {                                                            \
            v16 w0, w1;                                                                           \
            ROW(wp, (size_t)k, &w0, &w1);                                                         \
            for (int r = 0; r < R; r++) {                                                         \
                const float a = ap[r * LKC + k];                                                  \
                c[r][0] = lfma(c[r][0], a, w0);                                                   \
                c[r][1] = lfma(c[r][1], a, w1);                                                   \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++) acc[r][0] = c[r][0], acc[r][1] = c[r][1];                     \
    }                                                                                             \
    static void NAME(int m, const float *ap, int kc, const void *wp, v16 acc[LMR][2])             \
    {                                                                                             \
        if (m > 8) NAME##_rows(LMR, ap, kc, wp, acc);                                             \
        else if (m > 4) NAME##_rows(8, ap, kc, wp, acc);                                          \
        else if (m > 2) NAME##_rows(4, ap, kc, wp, acc);                                          \
        else if (m > 1) NAME##_rows(2, ap, kc, wp, acc);                                          \
        else NAME##_rows(1, ap, kc, wp, acc);                                                     \
    }

DEFINE_TILE(tile_f32, row_f32)
DEFINE_TILE(tile_bf16, row_bf16)
#ifdef DM_HAVE_F16
DEFINE_TILE(tile_f16, row_f16)
#endif

typedef void (*tile_fn)(int, const float *, int, const void *, v16[LMR][2]);

/* Tile rows 0..m-1 of C, columns 0..nc-1: load the running sums (first: zeros) ... */
static void sums_load(v16 acc[LMR][2], int m, int first, const float *C, int ldc, int nc)
{
    for (int r = 0; r < LMR; r++) acc[r][0] = acc[r][1] = (v16){0};
    if (first) return;
    for (int r = 0; r < m; r++) {
        float row[DM_PANEL] = {0};
        memcpy(row, C + (size_t)r * ldc, (size_t)nc * sizeof(float));
        memcpy(&acc[r][0], row, sizeof acc[r][0]);
        memcpy(&acc[r][1], row + 16, sizeof acc[r][1]);
    }
}

/* ... and store them back (last: + bias, the one rounding after the chain). */
static void sums_store(v16 acc[LMR][2], int m, const float *bias, float *C, int ldc, int nc)
{
    for (int r = 0; r < m; r++) {
        float row[DM_PANEL];
        memcpy(row, &acc[r][0], sizeof acc[r][0]);
        memcpy(row + 16, &acc[r][1], sizeof acc[r][1]);
        float *c = C + (size_t)r * ldc;
        if (bias)
            for (int i = 0; i < nc; i++) c[i] = row[i] + bias[i];
        else
            memcpy(c, row, (size_t)nc * sizeof(float));
    }
}

/* Rows r0 .. r0+rn-1 of x, k0 .. k0+kc-1, into tiles of LMR rows LKC apart (zero rows past rn,
 * computed but never stored). */
static void copy_rows(const float *x, int K, int r0, int rn, int k0, int kc, float *ap)
{
    const int rows = (rn + LMR - 1) / LMR * LMR;
    for (int r = 0; r < rows; r++) {
        float *d = ap + (size_t)r * LKC;
        if (r < rn) memcpy(d, x + (size_t)(r0 + r) * K + k0, sizeof(float) * kc);
        else memset(d, 0, sizeof(float) * kc);
    }
}

void dm_linear_packed(const float *x, int N, const dm_pmat *W, const float *b, float *y)
{
    if (N <= 0 || W->out <= 0) return;
    const int K = W->in, out = W->out, np = (out + DM_PANEL - 1) / DM_PANEL;
    const int BR = LRB * LMR, nb = (N + BR - 1) / BR;
    const size_t esize = dm_dtype_size(W->dtype);
    tile_fn tile = W->dtype == DM_BF16 ? tile_bf16 :
#ifdef DM_HAVE_F16
                   W->dtype == DM_F16 ? tile_f16 :
#endif
                                        tile_f32;
    /* work items: (row block, run of panels); enough of them for the threads to balance */
    const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    int pc = 1;
    while (pc < np && nb * pc < 8 * nt) pc++;
    const int ppc = (np + pc - 1) / pc;
    pc = (np + ppc - 1) / ppc;
#pragma omp parallel if (nt > 1 && nb * pc > 1)
    {
        /* the block's copy; without memory for it, one tile at a time from the stack (same
         * chains, so the same bits) */
        float one[LMR * LKC] __attribute__((aligned(64)));
        float *heap = N > LMR ? aligned_alloc(64, sizeof(float) * BR * LKC) : NULL;
        float *ap = heap ? heap : one;
        const int group = heap ? BR : LMR; /* rows copied at a time */
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < nb * pc; it++) {
            const int r0 = it / pc * BR, rn = N - r0 < BR ? N - r0 : BR;
            const int j0 = it % pc * ppc, j1 = j0 + ppc < np ? j0 + ppc : np;
            /* K == 0: no chain at all, one pass that stores y = bias (or 0) */
            for (int k0 = 0; k0 < K || (K == 0 && k0 == 0); k0 += LKC) {
                const int kc = K - k0 < LKC ? K - k0 : LKC;
                for (int g0 = 0; g0 < rn; g0 += group) {
                    const int gn = rn - g0 < group ? rn - g0 : group;
                    copy_rows(x, K, r0 + g0, gn, k0, kc, ap);
                    for (int j = j0; j < j1; j++) {
                        const int nc = out - j * DM_PANEL < DM_PANEL ? out - j * DM_PANEL : DM_PANEL;
                        const char *wp = (const char *)W->p + ((size_t)j * K + k0) * DM_PANEL * esize;
                        for (int t = 0; t * LMR < gn; t++) {
                            const int m = gn - t * LMR < LMR ? gn - t * LMR : LMR;
                            float *c = y + (size_t)(r0 + g0 + t * LMR) * out + j * DM_PANEL;
                            v16 acc[LMR][2];
                            sums_load(acc, m, k0 == 0, c, out, nc);
                            tile(m, ap + (size_t)t * LMR * LKC, kc, wp, acc);
                            sums_store(acc, m, k0 + kc == K && b ? b + j * DM_PANEL : NULL, c, out,
                                       nc);
                        }
                    }
                }
            }
        }
        free(heap);
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

/* ---- generic row-major product with a fixed reduction order (gemm.h) ----------------------- */
#include "backend/cpu/gemm.h"

#define GMR 8 /* rows per tile */

size_t dm_bpack_size(int K, int N)
{
    return (size_t)(N + DM_GEMM_NR - 1) / DM_GEMM_NR * (size_t)K * DM_GEMM_NR;
}

void dm_bpack(const float *B, size_t ldb, int K, int N, float *Bp)
{
    const int np = (N + DM_GEMM_NR - 1) / DM_GEMM_NR;
    for (int j = 0; j < np; j++) {
        const int nc = N - j * DM_GEMM_NR < DM_GEMM_NR ? N - j * DM_GEMM_NR : DM_GEMM_NR;
        float *dst = Bp + (size_t)j * K * DM_GEMM_NR;
        const float *src = B + (size_t)j * DM_GEMM_NR;
        if (nc == DM_GEMM_NR) /* constant size: an inlined copy, not a libc call per row */
            for (int k = 0; k < K; k++)
                memcpy(dst + (size_t)k * DM_GEMM_NR, src + (size_t)k * ldb, sizeof(float) * DM_GEMM_NR);
        else
            for (int k = 0; k < K; k++) {
                float *d = dst + (size_t)k * DM_GEMM_NR;
                memcpy(d, src + (size_t)k * ldb, sizeof(float) * nc);
                for (int c = nc; c < DM_GEMM_NR; c++) d[c] = 0.0f;
            }
    }
}

void dm_bpack_t(const float *Bt, size_t ldbt, int K, int N, float *Bp)
{
    const int np = (N + DM_GEMM_NR - 1) / DM_GEMM_NR;
    for (int j = 0; j < np; j++) {
        const int nc = N - j * DM_GEMM_NR < DM_GEMM_NR ? N - j * DM_GEMM_NR : DM_GEMM_NR;
        float *dst = Bp + (size_t)j * K * DM_GEMM_NR;
        for (int c = 0; c < DM_GEMM_NR; c++) {
            const float *src = Bt + (size_t)(j * DM_GEMM_NR + c) * ldbt;
            for (int k = 0; k < K; k++) dst[(size_t)k * DM_GEMM_NR + c] = c < nc ? src[k] : 0.0f;
        }
    }
}

/* The one epilogue every tile shape goes through (noinline: a single compiled copy, so the
 * alpha / bias / accumulate arithmetic is the same instructions for every element). */
__attribute__((noinline)) static void gstore(v16 acc[GMR][2], int m, int nc, float *C, size_t ldc,
                                             const dm_gemm_epi *e, int i0, int j0)
{
    for (int r = 0; r < m; r++) {
        float row[DM_GEMM_NR];
        memcpy(row, &acc[r][0], sizeof acc[r][0]);
        memcpy(row + 16, &acc[r][1], sizeof acc[r][1]);
        float *c = C + (size_t)r * ldc;
        const float rb = e->row_bias ? e->row_bias[i0 + r] : 0.0f;
        for (int i = 0; i < nc; i++) {
            float v = row[i];
            if (e->alpha != 1.0f) v = v * e->alpha;
            if (e->row_bias) v = v + rb;
            if (e->col_bias) v = v + e->col_bias[j0 + i];
            c[i] = e->accumulate ? c[i] + v : v;
        }
    }
}

/* Rows i0 .. i0+m-1 (m <= GMR) of C, panel columns j0 .. j0+nc-1. bp: panel row 0; stride:
 * floats between panel rows (32 when packed, ldb in place). */
static void gtile(const float *A, size_t lda, int m, int K, const float *bp, size_t stride, int nc,
                  float *C, size_t ldc, const dm_gemm_epi *e, int i0, int j0)
{
    v16 acc[GMR][2];
    for (int r = 0; r < GMR; r++) acc[r][0] = acc[r][1] = (v16){0};
    if (nc == DM_GEMM_NR && m == GMR) {
        for (int k = 0; k < K; k++) {
            const v16 b0 = *(const v16 *)(bp + (size_t)k * stride);
            const v16 b1 = *(const v16 *)(bp + (size_t)k * stride + 16);
            for (int r = 0; r < GMR; r++) {
                const float a = A[(size_t)r * lda + k];
                acc[r][0] = vfma(acc[r][0], a, b0);
                acc[r][1] = vfma(acc[r][1], a, b1);
            }
        }
    } else {
        /* Partial tile: same chain per element; the last columns of an in-place B are copied
         * (never read past the row). */
        for (int k = 0; k < K; k++) {
            float t[DM_GEMM_NR] = {0};
            const float *brow = bp + (size_t)k * stride;
            if (nc < DM_GEMM_NR) {
                memcpy(t, brow, sizeof(float) * nc);
                brow = t;
            }
            const v16 b0 = *(const v16 *)brow, b1 = *(const v16 *)(brow + 16);
            for (int r = 0; r < m; r++) {
                const float a = A[(size_t)r * lda + k];
                acc[r][0] = vfma(acc[r][0], a, b0);
                acc[r][1] = vfma(acc[r][1], a, b1);
            }
        }
    }
    gstore(acc, m, nc, C, ldc, e, i0, j0);
}

void dm_gemm_panel(const float *A, size_t lda, int M, int K, const float *bp, size_t ldb, int j0,
                   int nc, float *C, size_t ldc, const dm_gemm_epi *e)
{
    const size_t stride = ldb ? ldb : DM_GEMM_NR;
    const dm_gemm_epi none = DM_GEMM_EPI_INIT;
    if (!e) e = &none;
    for (int i = 0; i < M; i += GMR)
        gtile(A + (size_t)i * lda, lda, M - i < GMR ? M - i : GMR, K, bp, stride, nc,
              C + (size_t)i * ldc + j0, ldc, e, i, j0);
}

void dm_gemm(const float *A, size_t lda, int M, int K, dm_gemm_b B, int N, float *C, size_t ldc,
             const dm_gemm_epi *e, int threaded)
{
    if (M <= 0 || N <= 0) return;
    const dm_gemm_epi none = DM_GEMM_EPI_INIT;
    if (!e) e = &none;
    const int np = (N + DM_GEMM_NR - 1) / DM_GEMM_NR, mt = (M + GMR - 1) / GMR;
    if (threaded && B.ldb && M >= 4 * GMR && np >= 2) {
        /* B in place with rows far apart: each thread copies one panel at a time into a packed
         * [K][32] buffer (contiguous, stays in cache) and runs every row tile on it. A thread
         * without memory for the copy reads B in place: the same bits either way. */
#pragma omp parallel
        {
            float *buf = malloc(sizeof(float) * dm_bpack_size(K, DM_GEMM_NR));
#pragma omp for schedule(dynamic, 1)
            for (int j = 0; j < np; j++) {
                const int nc = N - j * DM_GEMM_NR < DM_GEMM_NR ? N - j * DM_GEMM_NR : DM_GEMM_NR;
                const float *bj = B.p + (size_t)j * DM_GEMM_NR;
                if (buf) dm_bpack(bj, B.ldb, K, nc, buf);
                dm_gemm_panel(A, lda, M, K, buf ? buf : bj, buf ? 0 : B.ldb, j * DM_GEMM_NR, nc,
                              C, ldc, e);
            }
            free(buf);
        }
        return;
    }
    const size_t stride = B.ldb ? B.ldb : DM_GEMM_NR;
    /* panel j starts at column j*32 (in place) or at the j-th packed [K][32] block */
    const size_t pstep = B.ldb ? DM_GEMM_NR : (size_t)K * DM_GEMM_NR;
#pragma omp parallel for collapse(2) schedule(static) if (threaded)
    for (int j = 0; j < np; j++)
        for (int i = 0; i < mt; i++) {
            const int m = M - i * GMR < GMR ? M - i * GMR : GMR;
            const int nc = N - j * DM_GEMM_NR < DM_GEMM_NR ? N - j * DM_GEMM_NR : DM_GEMM_NR;
            gtile(A + (size_t)i * GMR * lda, lda, m, K, B.p + (size_t)j * pstep, stride, nc,
                  C + (size_t)i * GMR * ldc + (size_t)j * DM_GEMM_NR, ldc, e, i * GMR,
                  j * DM_GEMM_NR);
        }
}

void dm_gemm_ref(const float *A, size_t lda, int M, int K, const float *B, size_t ldb, int N,
                 float *C, size_t ldc, const dm_gemm_epi *e)
{
    const dm_gemm_epi none = DM_GEMM_EPI_INIT;
    if (!e) e = &none;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += (double)A[(size_t)i * lda + k] * B[(size_t)k * ldb + j];
            s *= e->alpha;
            if (e->row_bias) s += e->row_bias[i];
            if (e->col_bias) s += e->col_bias[j];
            float *c = C + (size_t)i * ldc + j;
            *c = e->accumulate ? (float)(*c + s) : (float)s;
        }
}

/* ---- packed A, k-blocked panel product ---------------------------------------------------- */
#ifndef DM_GEMM_KC
#define DM_GEMM_KC 192 /* k rows of a B panel per block: 192 x 128 B = 24 KiB stay in L1 */
#endif

size_t dm_apack_size(int M, int K)
{
    return (size_t)(M + GMR - 1) / GMR * GMR * (size_t)K;
}

void dm_apack(const float *A, size_t lda, int M, int K, float *Ap)
{
    const int mt = (M + GMR - 1) / GMR;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < mt; i++) {
        float *d = Ap + (size_t)i * K * GMR;
        for (int k = 0; k < K; k++)
            for (int r = 0; r < GMR; r++) {
                const int row = i * GMR + r;
                d[(size_t)k * GMR + r] = row < M ? A[(size_t)row * lda + k] : 0.0f;
            }
    }
}

/* acc += A tile (packed [K][8]) · panel rows k0 .. k1-1 (packed [K][32]); always the full 8 x 32
 * (padding rows and columns are zeros and are never stored). Same FMA chain as gtile. */
static inline void gtile_ap(const float *ap, int k0, int k1, const float *bp, v16 acc[GMR][2])
{
    for (int k = k0; k < k1; k++) {
        const v16 b0 = *(const v16 *)(bp + (size_t)k * DM_GEMM_NR);
        const v16 b1 = *(const v16 *)(bp + (size_t)k * DM_GEMM_NR + 16);
        const float *a = ap + (size_t)k * GMR;
        for (int r = 0; r < GMR; r++) {
            acc[r][0] = vfma(acc[r][0], a[r], b0);
            acc[r][1] = vfma(acc[r][1], a[r], b1);
        }
    }
}

void dm_gemm_panel_ap(const float *Ap, int M, int K, const float *bp, int j0, int nc, float *C,
                      size_t ldc, const dm_gemm_epi *e, float *part)
{
    const dm_gemm_epi none = DM_GEMM_EPI_INIT;
    if (!e) e = &none;
    const int mt = (M + GMR - 1) / GMR;
    const int kc = part && K > DM_GEMM_KC ? DM_GEMM_KC : K;
    for (int k0 = 0; k0 < K; k0 += kc) {
        const int k1 = K - k0 < kc ? K : k0 + kc;
        for (int i = 0; i < mt; i++) {
            v16 acc[GMR][2];
            float *pp = part ? part + (size_t)i * GMR * DM_GEMM_NR : NULL;
            for (int r = 0; r < GMR; r++) {
                if (k0 == 0) {
                    acc[r][0] = acc[r][1] = (v16){0};
                } else { /* the running sums, stored as float32: exactly the register values */
                    memcpy(&acc[r][0], pp + r * DM_GEMM_NR, sizeof acc[r][0]);
                    memcpy(&acc[r][1], pp + r * DM_GEMM_NR + 16, sizeof acc[r][1]);
                }
            }
            gtile_ap(Ap + (size_t)i * K * GMR, k0, k1, bp, acc);
            if (k1 == K) {
                const int m = M - i * GMR < GMR ? M - i * GMR : GMR;
                gstore(acc, m, nc, C + (size_t)i * GMR * ldc + j0, ldc, e, i * GMR, j0);
            } else {
                for (int r = 0; r < GMR; r++) {
                    memcpy(pp + r * DM_GEMM_NR, &acc[r][0], sizeof acc[r][0]);
                    memcpy(pp + r * DM_GEMM_NR + 16, &acc[r][1], sizeof acc[r][1]);
                }
            }
        }
    }
}

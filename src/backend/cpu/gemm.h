/* Our own row-major float32 GEMM with a fixed reduction order (gemm.c), for the products whose
 * right-hand operand is an activation rather than a weight packed at load: the VAE's
 * convolutions (weights x im2col), the attention products (q k^T, P v) and dm_linear.
 *
 *   C [M, N] = alpha * (A [M, K] · B [K, N]) (+ row_bias [M]) (+ col_bias [N]), or C += that.
 *
 * Every output element is ONE sum over k = 0..K-1 in increasing k, accumulated with FMA from
 * 0, then scaled by alpha, then the biases added, then (accumulate) added to the old C. No
 * K-splitting, no order that depends on M, N, the element's place in its tile, the tiling or
 * the number of threads: the same inputs give the same bits for any thread count and any
 * batch around them. (dm_linear_packed in ops.h follows the same rule for packed weights.)
 *
 * B is read as 32-column panels: either packed ([ceil(N/32)][K][32], zero-padded; see
 * dm_bpack / dm_bpack_t) or in place from a row-major [K, N] matrix with row stride ldb. */
#ifndef DM_BACKEND_CPU_GEMM_H
#define DM_BACKEND_CPU_GEMM_H

#include <stddef.h>

#define DM_GEMM_NR 32 /* panel width (columns of B per panel) */

/* Floats needed for B [K, N] packed. */
size_t dm_bpack_size(int K, int N);
/* Bp = B [K, N] (row stride ldb) packed into panels. */
void dm_bpack(const float *B, size_t ldb, int K, int N, float *Bp);
/* Bp = B [K, N] packed, read from its transpose Bt [N, K] (row stride ldbt): e.g. k^T from k
 * rows, or W^T from a weight [out, in]. */
void dm_bpack_t(const float *Bt, size_t ldbt, int K, int N, float *Bp);

typedef struct {
    float alpha;             /* 1 = none */
    const float *row_bias;   /* [M] or NULL */
    const float *col_bias;   /* [N] or NULL */
    int accumulate;          /* C += result instead of C = result */
} dm_gemm_epi;
#define DM_GEMM_EPI_INIT {1.0f, NULL, NULL, 0}

/* B as panels: packed (ldb == 0: Bp from dm_bpack*) or row-major in place (ldb = row stride). */
typedef struct {
    const float *p;
    size_t ldb;
} dm_gemm_b;

/* C [M, N] (row stride ldc) from A [M, K] (row stride lda) and B. threaded != 0: OpenMP over
 * (panel, row tile) pairs; 0: the calling thread only (inside an OpenMP region of the caller).
 * Bits do not depend on `threaded` either. */
void dm_gemm(const float *A, size_t lda, int M, int K, dm_gemm_b B, int N, float *C, size_t ldc,
             const dm_gemm_epi *e, int threaded);
/* Columns [j0, j0 + nc) of C only, one 32-wide panel (nc <= 32), all M rows, on this thread. The
 * building block of implicit-im2col convolutions: bp points at the panel's row 0 (packed: K rows
 * of 32 floats; ldb as above). */
void dm_gemm_panel(const float *A, size_t lda, int M, int K, const float *bp, size_t ldb, int j0,
                   int nc, float *C, size_t ldc, const dm_gemm_epi *e);
/* A [M, K] packed for dm_gemm_panel_ap: [ceil(M/8)][K][8], zero rows past M. */
#define DM_GEMM_MR 8
size_t dm_apack_size(int M, int K);
void dm_apack(const float *A, size_t lda, int M, int K, float *Ap);
/* dm_gemm_panel with A packed and B a packed panel; k is processed in blocks that stay in L1,
 * the running sums kept in part ([ceil(M/8)*8][32] floats; NULL: no blocking). Storing a running
 * float32 sum and reloading it is exact, so the bits equal dm_gemm_panel's. */
void dm_gemm_panel_ap(const float *Ap, int M, int K, const float *bp, int j0, int nc, float *C,
                      size_t ldc, const dm_gemm_epi *e, float *part);
/* Plain loops in double: the reference. */
void dm_gemm_ref(const float *A, size_t lda, int M, int K, const float *B, size_t ldb, int N,
                 float *C, size_t ldc, const dm_gemm_epi *e);

#endif

/* Dense GEMMs through cuBLASLt with an algorithm pinned per shape (docs/spec/cuda.md §4 rule 1).
 *
 * A plan is keyed by everything but the varying dimension (the token count of a linear layer):
 * types, transposes, the fixed sizes and leading dimensions, bias, beta. Its algorithm is chosen
 * once by the heuristic at a representative size (4096 for the varying dimension n), restricted to
 * algorithms without a reduction scheme and forced to split-K 1, and then reused for every size:
 * one CTA owns an output tile and walks K in a fixed order, so a row's result does not depend on
 * how many other rows are in the call. Each new size is validated with cublasLtMatmulAlgoCheck;
 * when the pinned algorithm does not support a size, that size gets its own heuristic algorithm
 * (still without split-K) and one [WARN] line says batch invariance is lost for it. With
 * DITMOE_CUDA_FAST=1 every size uses its own heuristic (the --fast trade of §4). */
#include "backend/cuda/ctx.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REP 4096    /* representative size of the varying dimension */
#define N_SEEN 16   /* sizes validated per plan (ring) */

typedef struct {
    int ab, transa, transb, m, n, k, lda, ldb, ldd, has_bias, has_beta;
} plan_key;

struct dmc_plan {
    plan_key key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulAlgo_t algo;
    int vary;
    int seen[N_SEEN]; /* validated sizes of the varying dimension, 0 = empty */
    int n_seen;
    int warned;
};

static cudaDataType ab_type(int ab)
{
    return ab == DMC_F16 ? CUDA_R_16F : ab == DMC_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

void dmc_plans_free(dmc_ctx *c)
{
    for (int i = 0; i < c->n_plans; i++) cublasLtMatmulDescDestroy(c->plans[i].desc);
    free(c->plans);
    c->plans = NULL;
    c->n_plans = c->cap_plans = 0;
}

/* Layouts of one call: A [rows x cols] as stored (column-major). */
typedef struct {
    cublasLtMatrixLayout_t A, B, D;
} layouts;

static void layouts_free(layouts *L)
{
    if (L->A) cublasLtMatrixLayoutDestroy(L->A);
    if (L->B) cublasLtMatrixLayoutDestroy(L->B);
    if (L->D) cublasLtMatrixLayoutDestroy(L->D);
    memset(L, 0, sizeof *L);
}

static cublasStatus_t layouts_make(const plan_key *k, int m, int n, layouts *L)
{
    memset(L, 0, sizeof *L);
    const cudaDataType t = ab_type(k->ab);
    const int ar = k->transa ? k->k : m, ac = k->transa ? m : k->k;
    const int br = k->transb ? n : k->k, bc = k->transb ? k->k : n;
    cublasStatus_t s = cublasLtMatrixLayoutCreate(&L->A, t, (uint64_t)ar, (uint64_t)ac, k->lda);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutCreate(&L->B, t, (uint64_t)br, (uint64_t)bc, k->ldb);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutCreate(&L->D, CUDA_R_32F, (uint64_t)m, (uint64_t)n, k->ldd);
    if (s != CUBLAS_STATUS_SUCCESS) layouts_free(L);
    return s;
}

/* Heuristic algorithm for (m, n) without reduction schemes, forced to split-K 1 and checked. */
static dm_status pick_algo(dmc_ctx *c, dmc_plan *p, int m, int n, cublasLtMatmulAlgo_t *algo,
                           const char *op)
{
    layouts L;
    cublasStatus_t s = layouts_make(&p->key, m, n, &L);
    if (s) return dmc_blas_err((int)s, op);
    cublasLtMatmulPreference_t pref = NULL;
    s = cublasLtMatmulPreferenceCreate(&pref);
    const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE;
    if (!s)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &c->ws_bytes, sizeof c->ws_bytes);
    if (!s && !c->fast)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                 &mask, sizeof mask);
    /* The plan is made without pointers: only accept algorithms that work at 16-B alignment
     * (expert slices and other offsets into scratch are not always 256-B aligned). */
    const uint32_t align = 16;
    const cublasLtMatmulPreferenceAttributes_t al[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && !s; i++)
        s = cublasLtMatmulPreferenceSetAttribute(pref, al[i], &align, sizeof align);
    cublasLtMatmulHeuristicResult_t res[8];
    int got = 0;
    if (!s)
        s = cublasLtMatmulAlgoGetHeuristic(c->lt, p->desc, L.A, L.B, L.D, L.D, pref, 8, res, &got);
    dm_status st = DM_OK;
    if (s) {
        st = dmc_blas_err((int)s, op);
    } else {
        int ok = 0;
        for (int i = 0; i < got && !ok; i++) {
            cublasLtMatmulAlgo_t a = res[i].algo;
            if (!c->fast) {
                const int32_t one = 1;
                const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
                if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one,
                                                         sizeof one) ||
                    cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                                         &none, sizeof none))
                    continue;
            }
            cublasLtMatmulHeuristicResult_t chk;
            if (cublasLtMatmulAlgoCheck(c->lt, p->desc, L.A, L.B, L.D, L.D, &a, &chk) ==
                    CUBLAS_STATUS_SUCCESS &&
                chk.workspaceSize <= c->ws_bytes) {
                *algo = a;
                ok = 1;
            }
        }
        if (!ok)
            st = dm_fail(DM_ERR_BACKEND, "cuda: %s: cuBLASLt has no algorithm without split-K "
                         "for m %d n %d k %d", op, m, n, p->key.k);
    }
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    layouts_free(&L);
    return st;
}

static dm_status plan_get(dmc_ctx *c, const plan_key *key, int vary, int m, int n, dmc_plan **out,
                          const char *op)
{
    for (int i = 0; i < c->n_plans; i++)
        if (!memcmp(&c->plans[i].key, key, sizeof *key)) {
            *out = &c->plans[i];
            return DM_OK;
        }
    if (c->n_plans == c->cap_plans) {
        int cap = c->cap_plans ? 2 * c->cap_plans : 64;
        dmc_plan *q = realloc(c->plans, (size_t)cap * sizeof *q);
        if (!q) return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of host memory (plans)", op);
        c->plans = q;
        c->cap_plans = cap;
    }
    dmc_plan *p = &c->plans[c->n_plans];
    memset(p, 0, sizeof *p);
    p->key = *key;
    p->vary = vary;
    cublasStatus_t s = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    const cublasOperation_t ta = key->transa ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = key->transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (!s) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (!s) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (!s && key->has_bias) {
        const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        const cudaDataType bt = CUDA_R_32F;
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
        if (!s)
            s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt,
                                               sizeof bt);
    }
    if (s) {
        if (p->desc) cublasLtMatmulDescDestroy(p->desc);
        return dmc_blas_err((int)s, op);
    }
    /* The algorithm is chosen at the representative size, then pinned. */
    dm_status st = pick_algo(c, p, m, vary == 'n' ? REP : n, &p->algo, op);
    if (st) {
        cublasLtMatmulDescDestroy(p->desc);
        return st;
    }
    c->n_plans++;
    dm_log(DM_LOG_VERBOSE, "cuda: %s: pinned cuBLASLt algorithm for m %d n %s k %d%s", op,
           m, vary ? "any" : "fixed", key->k, key->has_bias ? " + bias" : "");
    *out = p;
    return DM_OK;
}

int dmc_gemm(dmc_ctx *c, int ab, int transa, int transb, int m, int n, int k, const void *A,
             int lda, const void *B, int ldb, float beta, float *D, int ldd, const float *bias,
             int vary, const char *op)
{
    if (m <= 0 || n <= 0) return DM_OK;
    if (((uintptr_t)A | (uintptr_t)B | (uintptr_t)D | (uintptr_t)bias) & 15)
        return dm_fail(DM_ERR_BACKEND, "cuda: %s: GEMM operand not 16-byte aligned", op);
    if (vary && (vary != 'n' || transb))
        return dm_fail(DM_ERR_BACKEND, "cuda: %s: dmc_gemm varies n only, with B not transposed", op);
    const plan_key key = {ab, !!transa, !!transb, m, vary ? -1 : n, k, lda, ldb, ldd,
                          bias != NULL, beta != 0.0f};
    dmc_plan *p = NULL;
    dm_status st = plan_get(c, &key, vary, m, n, &p, op);
    if (st) return st;
    layouts L;
    cublasStatus_t s = layouts_make(&p->key, m, n, &L);
    if (s) return dmc_blas_err((int)s, op);
    cublasLtMatmulAlgo_t algo = p->algo;
    const int size = n;
    if (c->fast) {
        st = pick_algo(c, p, m, n, &algo, op);
    } else if (vary) {
        int known = 0;
        for (int i = 0; i < N_SEEN; i++) known |= p->seen[i] == size;
        if (!known) {
            cublasLtMatmulHeuristicResult_t chk;
            if (cublasLtMatmulAlgoCheck(c->lt, p->desc, L.A, L.B, L.D, L.D, &p->algo, &chk) ==
                    CUBLAS_STATUS_SUCCESS &&
                chk.workspaceSize <= c->ws_bytes) {
                p->seen[p->n_seen++ % N_SEEN] = size;
            } else {
                if (!p->warned)
                    dm_log(DM_LOG_INFO, "[WARN] cuda: %s: the pinned GEMM algorithm does not "
                           "support n = %d: using its own algorithm (results for this size are "
                           "not batch-invariant)", op, size);
                p->warned = 1;
                st = pick_algo(c, p, m, n, &algo, op);
            }
        }
    }
    if (!st && bias)
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                           sizeof bias);
    if (!st && !s) {
        const float alpha = 1.0f;
        s = cublasLtMatmul(c->lt, p->desc, &alpha, A, L.A, B, L.B, &beta, D, L.D, D, L.D, &algo,
                           c->ws, c->ws_bytes, c->stream);
    }
    layouts_free(&L);
    if (st) return st;
    return dmc_blas_err((int)s, op);
}

int dmc_linear(dmc_ctx *c, int ab, const void *W, int out, int in, const void *x, int N,
               const float *bias, float *y, const char *op)
{
    /* Column-major view: y^T [out, N] = W [in, out]^T . x^T [in, N]. */
    return dmc_gemm(c, ab, 1, 0, out, N, in, W, in, x, in, 0.0f, y, out, bias, 'n', op);
}

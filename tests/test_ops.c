/* Op-level tests: every fast CPU kernel against its plain reference (tolerances stated inline),
 * and the embedding layouts against independent formulas. */
#include "backend/cpu/cpu.h"
#include "backend/cpu/gemm.h"
#include "dit/model.h"

#include <check.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) /* uniform in [-1, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float *rand_buf(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = frand() * scale;
    return p;
}
/* max |a-b| / max(1e-12, rms(b)) */
static double rel_err(const float *a, const float *b, size_t n)
{
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m) m = d;
        s += (double)b[i] * b[i];
    }
    return m / fmax(1e-12, sqrt(s / (double)n));
}

static dm_pmat rand_pmat(int out, int in, float scale)
{
    float *W = rand_buf((size_t)out * in, scale);
    dm_pmat pm;
    ck_assert_int_eq(dm_pmat_pack(&pm, W, out, in), 0);
    free(W);
    return pm;
}

START_TEST(linear_matches_reference)
{
    int N = 37, in = 70, out = 45;
    float *x = rand_buf((size_t)N * in, 1), *W = rand_buf((size_t)out * in, 0.2f), *b = rand_buf(out, 1);
    float *y = malloc(sizeof(float) * N * out), *r = malloc(sizeof(float) * N * out);
    dm_linear(x, N, in, W, b, out, y);
    dm_linear_ref(x, N, in, W, b, out, r);
    ck_assert_double_le(rel_err(y, r, (size_t)N * out), 1e-5); /* float32 GEMM vs double loops */
    dm_linear(x, N, in, W, NULL, out, y);
    dm_linear_ref(x, N, in, W, NULL, out, r);
    ck_assert_double_le(rel_err(y, r, (size_t)N * out), 1e-5);
    free(x), free(W), free(b), free(y), free(r);
}
END_TEST

START_TEST(packed_linear_matches_reference)
{
    int N = 29, in = 70, out = 45; /* out not a multiple of the panel: padding exercised */
    float *x = rand_buf((size_t)N * in, 1), *b = rand_buf(out, 1);
    dm_pmat W = rand_pmat(out, in, 0.2f);
    float *y = malloc(sizeof(float) * N * out), *r = malloc(sizeof(float) * N * out);
    for (int o = 0; o < out; o += 7) ck_assert(dm_pmat_get(&W, o, 3) != 0.0f);
    dm_linear_packed(x, N, &W, b, y);
    dm_linear_packed_ref(x, N, &W, b, r);
    ck_assert_double_le(rel_err(y, r, (size_t)N * out), 1e-5);
    dm_pmat_free(&W), free(x), free(b), free(y), free(r);
}
END_TEST

/* BF16 / F16 weights kept 16-bit: same result as widening them to float32 first. */
static void check_packed_half(dm_dtype dt)
{
    int N = 21, in = 53, out = 70;
    float *x = rand_buf((size_t)N * in, 1), *b = rand_buf(out, 1), *W = rand_buf((size_t)out * in, 0.2f);
    uint16_t *h = malloc(sizeof(uint16_t) * out * in);
    for (int i = 0; i < out * in; i++) {
        h[i] = dt == DM_BF16 ? dm_f32_to_bf16(W[i]) : dm_f32_to_f16(W[i]);
        W[i] = dt == DM_BF16 ? dm_bf16_to_f32(h[i]) : dm_f16_to_f32(h[i]);
    }
    dm_pmat P16, P32;
    int r = dm_pmat_pack_half(&P16, h, dt, out, in);
    if (r == -2) { /* this build cannot run F16 natively: the loader widens instead */
        ck_assert_int_eq(dt, DM_F16);
        goto done;
    }
    ck_assert_int_eq(r, 0);
    ck_assert_int_eq(dm_pmat_pack(&P32, W, out, in), 0);
    ck_assert_uint_eq(dm_pmat_bytes(&P16) * 2, dm_pmat_bytes(&P32));
    float *y16 = malloc(sizeof(float) * N * out), *y32 = malloc(sizeof(float) * N * out);
    dm_linear_packed(x, N, &P16, b, y16);
    dm_linear_packed(x, N, &P32, b, y32);
    ck_assert_mem_eq(y16, y32, sizeof(float) * N * out); /* widening is exact, order identical */
    dm_linear_packed_ref(x, N, &P16, b, y32);
    ck_assert_double_le(rel_err(y16, y32, (size_t)N * out), 1e-5);
    free(y16), free(y32);
    dm_pmat_free(&P16), dm_pmat_free(&P32);
done:
    free(x), free(b), free(W), free(h);
}
START_TEST(packed_linear_bf16) { check_packed_half(DM_BF16); }
END_TEST
START_TEST(packed_linear_f16) { check_packed_half(DM_F16); }
END_TEST

/* A row's result must not depend on the batch around it (images depend only on seed and index):
 * every row of a 29-row product equals the same row computed alone, bit for bit. */
START_TEST(packed_linear_is_batch_invariant)
{
    int N = 29, in = 96, out = 70;
    float *x = rand_buf((size_t)N * in, 1), *b = rand_buf(out, 1);
    dm_pmat W = rand_pmat(out, in, 0.2f);
    float *y = malloc(sizeof(float) * N * out), *one = malloc(sizeof(float) * out);
    dm_linear_packed(x, N, &W, b, y);
    for (int n = 0; n < N; n++) {
        dm_linear_packed(x + (size_t)n * in, 1, &W, b, one);
        ck_assert_mem_eq(one, y + (size_t)n * out, sizeof(float) * out);
    }
    dm_pmat_free(&W), free(x), free(b), free(y), free(one);
}
END_TEST

/* The packed product in row blocks of 48 and k-chunks of 512 (gemm.c): more rows than a block,
 * every partial-tile size, in > one chunk and not a multiple of it, any thread count. Each row
 * equals that row computed alone, bit for bit, and the whole matches the double reference. */
START_TEST(packed_linear_blocks_and_chunks)
{
    const int N = 113, in = 1100, out = 70;
    float *x = rand_buf((size_t)N * in, 1), *b = rand_buf(out, 1);
    dm_pmat W = rand_pmat(out, in, 0.05f);
    float *y = malloc(sizeof(float) * N * out), *y1 = malloc(sizeof(float) * N * out);
    float *r = malloc(sizeof(float) * N * out), *one = malloc(sizeof(float) * out);
    const int nt = omp_get_max_threads();
    omp_set_num_threads(2);
    dm_linear_packed(x, N, &W, b, y);
    omp_set_num_threads(1);
    dm_linear_packed(x, N, &W, b, y1);
    omp_set_num_threads(nt);
    ck_assert_mem_eq(y, y1, sizeof(float) * N * out);
    for (int n = 0; n < N; n++) {
        dm_linear_packed(x + (size_t)n * in, 1, &W, b, one);
        ck_assert_mem_eq(one, y + (size_t)n * out, sizeof(float) * out);
    }
    for (int m = 2; m <= 13; m++) { /* the first m rows alone: tiles of 1..12 rows, one of 12 + 1 */
        dm_linear_packed(x, m, &W, b, y1);
        ck_assert_mem_eq(y1, y, sizeof(float) * m * out);
    }
    dm_linear_packed_ref(x, N, &W, b, r);
    ck_assert_double_le(rel_err(y, r, (size_t)N * out), 1e-5);
    dm_pmat_free(&W), free(x), free(b), free(y), free(y1), free(r), free(one);
}
END_TEST

START_TEST(exp_fast_matches_libm)
{
    double worst = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.0137f) {
        double ref = exp((double)x), rel = fabs(dm_exp_fast(x) - ref) / ref;
        if (rel > worst) worst = rel;
    }
    ck_assert_double_le(worst, 5e-7); /* a few float ulp */
    ck_assert_float_eq(dm_exp_fast(0.0f), 1.0f);
    ck_assert(dm_exp_fast(-1000.0f) >= 0.0f && dm_exp_fast(-1000.0f) < 1e-37f);
}
END_TEST

START_TEST(exp_fast_nan_and_inf)
{
    /* NaN in -> NaN out (quiet, negative and payload NaNs), no undefined int conversion (the
     * sanitizer build compiles this file with -fsanitize=float-cast-overflow). */
    const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu, 0xffffffffu};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        float x;
        memcpy(&x, &nans[i], sizeof x);
        ck_assert_msg(isnan(dm_exp_fast(x)), "dm_exp_fast(NaN 0x%08x) is not NaN", nans[i]);
    }
    ck_assert_float_eq(dm_exp_fast(INFINITY), dm_exp_fast(88.0f));
    ck_assert_float_eq(dm_exp_fast(-INFINITY), dm_exp_fast(-87.0f));
    ck_assert(isfinite(dm_exp_fast(88.0f)) && dm_exp_fast(88.0f) > 1e38f);
    /* The vectorised loop (dm_silu): NaN lanes stay NaN, the other lanes are the scalar values. */
    float v[37], w[37];
    for (int i = 0; i < 37; i++) v[i] = w[i] = (i % 5 == 2) ? NAN : (float)(i - 18) * 0.7f;
    dm_silu(v, 37);
    for (int i = 0; i < 37; i++) {
        if (i % 5 == 2) {
            ck_assert(isnan(v[i]));
        } else {
            const float e = w[i] / (1.0f + dm_exp_fast(-w[i]));
            ck_assert_mem_eq(&v[i], &e, sizeof e);
        }
    }
}
END_TEST

/* Generic GEMM against double loops: shapes off the tile (M % 8, N % 32), packed and in-place B,
 * every epilogue option. Tolerance: rel_err <= 1e-5 (float32 FMA sums vs double). */
static void gemm_case(int M, int K, int N, int inplace, int opt)
{
    const size_t ldb = (size_t)N + 3, ldc = (size_t)N + 1;
    float *A = rand_buf((size_t)M * K, 1), *B = rand_buf((size_t)K * ldb, 1);
    float *rb = rand_buf(M, 1), *cb = rand_buf(N, 1), *C0 = rand_buf((size_t)M * ldc, 1);
    float *C = malloc(sizeof(float) * M * ldc), *R = malloc(sizeof(float) * M * ldc);
    float *Bp = malloc(sizeof(float) * (dm_bpack_size(K, N) + 1));
    memcpy(C, C0, sizeof(float) * M * ldc), memcpy(R, C0, sizeof(float) * M * ldc);
    dm_bpack(B, ldb, K, N, Bp);
    dm_gemm_epi e = {opt & 1 ? 0.37f : 1.0f, opt & 2 ? rb : NULL, opt & 4 ? cb : NULL, opt & 8};
    dm_gemm(A, (size_t)K, M, K, inplace ? (dm_gemm_b){B, ldb} : (dm_gemm_b){Bp, 0}, N, C, ldc, &e, 1);
    dm_gemm_ref(A, (size_t)K, M, K, B, ldb, N, R, ldc, &e);
    double worst = 0;
    for (int i = 0; i < M; i++) {
        double r = rel_err(C + (size_t)i * ldc, R + (size_t)i * ldc, (size_t)N);
        if (r > worst) worst = r;
        ck_assert_float_eq(C[(size_t)i * ldc + N], C0[(size_t)i * ldc + N]); /* past N: untouched */
    }
    ck_assert_msg(worst <= 1e-5, "gemm %dx%dx%d inplace %d opt %d: %g", M, K, N, inplace, opt, worst);
    free(A), free(B), free(rb), free(cb), free(C0), free(C), free(R), free(Bp);
}
START_TEST(gemm_matches_reference)
{
    const int shapes[][3] = {{1, 1, 1}, {8, 32, 32}, {13, 70, 45}, {37, 9, 100}, {5, 200, 31},
                             {64, 64, 64}, {17, 3, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int opt = 0; opt < 16; opt++)
            gemm_case(shapes[s][0], shapes[s][1], shapes[s][2], opt & 1, opt);
}
END_TEST

/* The sum order is fixed: every element equals a scalar fmaf chain over k = 0..K-1 from 0,
 * whatever the thread count, packed or in-place B, the row's or column's place in its tile or
 * how many other rows and columns are in the product (rows computed alone, panels alone). */
START_TEST(gemm_fixed_order)
{
    const int M = 29, K = 77, N = 70;
    float *A = rand_buf((size_t)M * K, 1), *B = rand_buf((size_t)K * N, 1);
    float *Bp = malloc(sizeof(float) * dm_bpack_size(K, N)), *Bt = malloc(sizeof(float) * K * N);
    float *Bpt = malloc(sizeof(float) * dm_bpack_size(K, N));
    float *C = malloc(sizeof(float) * M * N), *D = malloc(sizeof(float) * M * N);
    for (int k = 0; k < K; k++)
        for (int j = 0; j < N; j++) Bt[(size_t)j * K + k] = B[(size_t)k * N + j];
    dm_bpack(B, N, K, N, Bp);
    dm_bpack_t(Bt, K, K, N, Bpt);
    ck_assert_mem_eq(Bp, Bpt, sizeof(float) * dm_bpack_size(K, N));
    dm_gemm(A, K, M, K, (dm_gemm_b){Bp, 0}, N, C, N, NULL, 1);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s = fmaf(A[(size_t)i * K + k], B[(size_t)k * N + j], s);
            ck_assert_msg(memcmp(&s, &C[(size_t)i * N + j], sizeof s) == 0,
                          "C[%d,%d] is not the k-ordered FMA chain", i, j);
        }
    for (int t = 1; t <= 3; t++) {
        dm_set_threads(t);
        for (int inplace = 0; inplace < 2; inplace++) {
            dm_gemm(A, K, M, K, inplace ? (dm_gemm_b){B, N} : (dm_gemm_b){Bp, 0}, N, D, N, NULL, t > 1);
            ck_assert_mem_eq(C, D, sizeof(float) * M * N);
        }
    }
    dm_set_threads(2);
    for (int i = 0; i < M; i++) { /* one row alone */
        dm_gemm(A + (size_t)i * K, K, 1, K, (dm_gemm_b){B, N}, N, D, N, NULL, 1);
        ck_assert_mem_eq(D, C + (size_t)i * N, sizeof(float) * N);
    }
    memset(D, 0, sizeof(float) * M * N);
    for (int j0 = 0; j0 < N; j0 += DM_GEMM_NR) /* panel by panel */
        dm_gemm_panel(A, K, M, K, Bp + (size_t)j0 * K, 0, j0, N - j0 < 32 ? N - j0 : 32, D, N, NULL);
    ck_assert_mem_eq(C, D, sizeof(float) * M * N);
    free(A), free(B), free(Bp), free(Bt), free(Bpt), free(C), free(D);
}
END_TEST

START_TEST(linear_is_thread_invariant)
{
    int N = 21, in = 50, out = 70;
    float *x = rand_buf((size_t)N * in, 1), *W = rand_buf((size_t)out * in, 0.2f), *b = rand_buf(out, 1);
    float *y1 = malloc(sizeof(float) * N * out), *y = malloc(sizeof(float) * N * out);
    dm_set_threads(1);
    ck_assert_int_eq(dm_linear(x, N, in, W, b, out, y1), 0);
    for (int t = 2; t <= 3; t++) {
        dm_set_threads(t);
        ck_assert_int_eq(dm_linear(x, N, in, W, b, out, y), 0);
        ck_assert_mem_eq(y1, y, sizeof(float) * N * out);
    }
    dm_set_threads(2);
    free(x), free(W), free(b), free(y1), free(y);
}
END_TEST

START_TEST(layernorm_matches_reference)
{
    /* Rows on and off the 16 summation lanes, one row alone (N = 1: no parallel region), and rows
     * with a large common offset (mean 100, spread 3). Tolerance: rel_err <= 1e-5. */
    const int shapes[][2] = {{19, 96}, {5, 37}, {1, 40}, {3, 384}, {2, 7}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int N = shapes[si][0], D = shapes[si][1];
        float *x = rand_buf((size_t)N * D, 3), *w = rand_buf(D, 1), *b = rand_buf(D, 1);
        float *y = malloc(sizeof(float) * N * D), *r = malloc(sizeof(float) * N * D);
        for (int off = 0; off <= 100; off += 100) {
            for (size_t i = 0; i < (size_t)N * D; i++) x[i] += (float)off;
            dm_layernorm(x, N, D, 1e-6f, NULL, NULL, y);
            dm_layernorm_ref(x, N, D, 1e-6f, NULL, NULL, r);
            ck_assert_double_le(rel_err(y, r, (size_t)N * D), 1e-5);
            dm_layernorm(x, N, D, 1e-6f, w, b, y);
            dm_layernorm_ref(x, N, D, 1e-6f, w, b, r);
            ck_assert_double_le(rel_err(y, r, (size_t)N * D), 1e-5);
        }
        free(x), free(w), free(b), free(y), free(r);
    }
}
END_TEST

/* dm_softmax_rows against the double reference, rows of lengths on and off the 16 lanes.
 * Tolerance per element: |p - ref| <= 4e-6 ref + 1e-37. The relative part covers dm_exp_fast
 * (<= 5e-7), the float x - max (half an ulp of |x - max| <= 32: <= 2e-6 relative in exp), the
 * float sum and the reciprocal; the absolute part covers entries flushed to 0 below the clamp
 * (x - max < -87: exp < 1.7e-38) and denormal results. Rows of 1000-scale logits keep most
 * entries far below the max; -inf entries must give exactly 0. Each row's bits do not depend on
 * the other rows (row r alone == row r of the block). */
START_TEST(softmax_matches_reference)
{
    const int lens[] = {1, 2, 15, 16, 17, 31, 33, 64, 100, 256, 1000, 1027};
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        const int n = lens[li], R = 6;
        float *x = rand_buf((size_t)R * n, 8.0f);
        for (int i = 0; i < n; i++) x[(size_t)1 * n + i] *= 4.0f;      /* +-32: wide spread */
        for (int i = 0; i < n; i++) x[(size_t)2 * n + i] += 1000.0f;   /* large offset */
        for (int i = 0; i < n; i++) x[(size_t)3 * n + i] *= 1000.0f;   /* most entries flushed */
        for (int i = 0; i < n; i++) x[(size_t)4 * n + i] = 1.0f;       /* uniform */
        for (int i = 0; n > 1 && i < n; i += 3) x[(size_t)5 * n + i] = -INFINITY; /* masked, */
        if (n > 1) x[(size_t)5 * n + 1] = 0.5f; /* the first entry included; one not masked */
        float *y = malloc(sizeof(float) * R * n), *r = malloc(sizeof(float) * R * n);
        memcpy(y, x, sizeof(float) * R * n);
        memcpy(r, x, sizeof(float) * R * n);
        dm_softmax_rows(y, R, n);
        dm_softmax_rows_ref(r, R, n);
        double worst = 0;
        for (size_t i = 0; i < (size_t)R * n; i++) {
            const double d = fabs((double)y[i] - r[i]) - 1e-37;
            if (d > 0 && d / r[i] > worst) worst = d / r[i];
            ck_assert_msg(isfinite(y[i]) && y[i] >= 0.0f, "n %d: p[%zu] = %g", n, i, y[i]);
        }
        ck_assert_msg(worst <= 4e-6, "softmax n %d: worst relative error %.3g > 4e-6", n, worst);
        for (int i = 0; i < n; i++)
            if (isinf(x[(size_t)5 * n + i])) ck_assert_float_eq(y[(size_t)5 * n + i], 0.0f);
        for (int i = 0; i < n; i++) ck_assert_float_eq_tol(y[(size_t)4 * n + i], 1.0f / n, 1e-6f / n);
        if (n == 1)
            for (int q = 0; q < R; q++) ck_assert_float_eq(y[q], 1.0f);
        for (int q = 0; q < R; q++) {
            float *one = malloc(sizeof(float) * n);
            memcpy(one, x + (size_t)q * n, sizeof(float) * n);
            dm_softmax_rows(one, 1, n);
            ck_assert_mem_eq(one, y + (size_t)q * n, sizeof(float) * n);
            free(one);
        }
        free(x), free(y), free(r);
    }
}
END_TEST

static void check_attention(int qknorm)
{
    int B = 2, T = 23, H = 3, hd = 16, D = H * hd;
    float *qkv = rand_buf((size_t)B * T * 3 * D, 2);
    float *nw = rand_buf(4 * hd, 1);
    dm_qk_norm qk = {nw, nw + hd, nw + 2 * hd, nw + 3 * hd, 1e-6f};
    float *y = malloc(sizeof(float) * B * T * D), *r = malloc(sizeof(float) * B * T * D);
    ck_assert_int_eq(dm_attention(qkv, B, T, H, hd, qknorm ? &qk : NULL, y), 0);
    dm_attention_ref(qkv, B, T, H, hd, qknorm ? &qk : NULL, r);
    ck_assert_double_le(rel_err(y, r, (size_t)B * T * D), 1e-5);
    free(qkv), free(nw), free(y), free(r);
}
START_TEST(attention_matches_reference) { check_attention(0); }
END_TEST
START_TEST(attention_qknorm_matches_reference) { check_attention(1); }
END_TEST

/* The MoE layer (routing, grouping, experts, combine) and the dense MLP are tested through the
 * backend table in test_backend_ops.c (op "ffn"), against router/moe.h's references. */
/* Same bits for 1, 2 and 3 threads, and image b alone (B = 1) equals image b in the batch. */
static void check_attention_invariance(int qknorm, int T, int hd)
{
    int B = 3, H = 2, D = H * hd;
    float *qkv = rand_buf((size_t)B * T * 3 * D, 2);
    float *nw = rand_buf(4 * hd, 1);
    dm_qk_norm qk = {nw, nw + hd, nw + 2 * hd, nw + 3 * hd, 1e-6f};
    float *y1 = malloc(sizeof(float) * B * T * D), *y = malloc(sizeof(float) * B * T * D);
    dm_set_threads(1);
    ck_assert_int_eq(dm_attention(qkv, B, T, H, hd, qknorm ? &qk : NULL, y1), 0);
    for (int t = 2; t <= 3; t++) {
        dm_set_threads(t);
        ck_assert_int_eq(dm_attention(qkv, B, T, H, hd, qknorm ? &qk : NULL, y), 0);
        ck_assert_mem_eq(y1, y, sizeof(float) * B * T * D);
    }
    for (int b = 0; b < B; b++) {
        ck_assert_int_eq(dm_attention(qkv + (size_t)b * T * 3 * D, 1, T, H, hd, qknorm ? &qk : NULL, y), 0);
        ck_assert_mem_eq(y1 + (size_t)b * T * D, y, sizeof(float) * T * D);
    }
    dm_set_threads(2);
    free(qkv), free(nw), free(y1), free(y);
}
START_TEST(attention_is_thread_and_batch_invariant)
{
    check_attention_invariance(0, 16, 32);
    check_attention_invariance(1, 37, 24);
    check_attention_invariance(0, 64, 64);
}
END_TEST


START_TEST(patchify_layout)
{
    int B = 2, C = 3, S = 8, p = 2, G = S / p, T = G * G;
    float *x = malloc(sizeof(float) * B * C * S * S), *pt = malloc(sizeof(float) * B * T * C * p * p);
    for (int i = 0; i < B * C * S * S; i++) x[i] = (float)i;
    dm_patchify(x, B, C, S, p, pt);
    /* token m = row*G + col; patch vector ordered (c, pi, pj) */
    int b = 1, gi = 2, gj = 3, c = 2, pi = 1, pj = 0, m = gi * G + gj;
    ck_assert_float_eq(pt[((size_t)b * T + m) * C * p * p + (c * p + pi) * p + pj],
                       x[((b * C + c) * S + gi * p + pi) * S + gj * p + pj]);
    /* unpatchify reads (pi, pj, c) with c fastest */
    float *tok = malloc(sizeof(float) * B * T * p * p * C), *img = malloc(sizeof(float) * B * C * S * S);
    for (int i = 0; i < B * T * p * p * C; i++) tok[i] = (float)i;
    dm_unpatchify(tok, B, C, S, p, img);
    ck_assert_float_eq(img[((b * C + c) * S + gi * p + pi) * S + gj * p + pj],
                       tok[((size_t)b * T + m) * p * p * C + (pi * p + pj) * C + c]);
    free(x), free(pt), free(tok), free(img);
}
END_TEST

START_TEST(timestep_is_cos_then_sin)
{
    float t[2] = {0.0f, 500.0f}, e[2 * DM_TIME_FREQ_DIM];
    dm_timestep_sinusoid(t, 2, e);
    ck_assert_float_eq(e[0], 1.0f);   /* cos(0) */
    ck_assert_float_eq(e[128], 0.0f); /* sin(0) */
    for (int k = 0; k < 128; k += 17) {
        double f = exp(-log(10000.0) * k / 128.0);
        ck_assert_double_le(fabs(e[256 + k] - cos(500.0 * f)), 2e-4);
        ck_assert_double_le(fabs(e[256 + 128 + k] - sin(500.0 * f)), 2e-4);
    }
}
END_TEST

START_TEST(pos_embed_column_first_sin_first)
{
    int D = 16, G = 4, K = D / 4;
    float pe[16 * 16];
    dm_pos_embed_2d(D, G, pe);
    int m = 1 * G + 3; /* row 1, col 3 */
    for (int k = 0; k < K; k++) {
        double w = pow(10000.0, -(double)k / K);
        ck_assert_double_le(fabs(pe[m * D + k] - sin(3 * w)), 1e-6);         /* column, sin */
        ck_assert_double_le(fabs(pe[m * D + K + k] - cos(3 * w)), 1e-6);     /* column, cos */
        ck_assert_double_le(fabs(pe[m * D + 2 * K + k] - sin(1 * w)), 1e-6); /* row, sin */
        ck_assert_double_le(fabs(pe[m * D + 3 * K + k] - cos(1 * w)), 1e-6); /* row, cos */
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("cpu");
    tcase_add_test(tc, linear_matches_reference);
    tcase_add_test(tc, packed_linear_matches_reference);
    tcase_add_test(tc, packed_linear_is_batch_invariant);
    tcase_add_test(tc, packed_linear_blocks_and_chunks);
    tcase_add_test(tc, packed_linear_bf16);
    tcase_add_test(tc, packed_linear_f16);
    tcase_add_test(tc, exp_fast_matches_libm);
    tcase_add_test(tc, exp_fast_nan_and_inf);
    tcase_add_test(tc, gemm_matches_reference);
    tcase_add_test(tc, gemm_fixed_order);
    tcase_add_test(tc, linear_is_thread_invariant);
    tcase_add_test(tc, layernorm_matches_reference);
    tcase_add_test(tc, softmax_matches_reference);
    tcase_add_test(tc, attention_matches_reference);
    tcase_add_test(tc, attention_qknorm_matches_reference);
    tcase_add_test(tc, attention_is_thread_and_batch_invariant);
    tcase_add_test(tc, patchify_layout);
    tcase_add_test(tc, timestep_is_cos_then_sin);
    tcase_add_test(tc, pos_embed_column_first_sin_first);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}

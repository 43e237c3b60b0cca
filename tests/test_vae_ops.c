/* VAE kernels: fast (src/backend/cpu/vae_*.c: implicit im2col + our fixed-order GEMM, OpenMP)
 * vs the naive references (src/vae/vae_ref.c), and thread invariance (1, 2, 3 threads give the
 * same bits). Tolerance: max|fast - ref| <= 1e-5 * max(1, max|ref|) (float32 sums vs double). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ditmoe.h"
#include "backend/cpu/ops.h"
#include "vae/vae_internal.h"

#define TOL 1e-5f

static unsigned rng_state = 12345u;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)((rng_state >> 8) & 0xFFFFFF) / (float)0x800000 - 1.0f;
}
static float *rand_buf(size_t n, float scale)
{
    float *p = malloc(sizeof(float) * (n ? n : 1));
    ck_assert_ptr_nonnull(p);
    for (size_t i = 0; i < n; i++) p[i] = scale * frand();
    return p;
}
static float max_abs_diff(const float *a, const float *b, size_t n, float *max_ref)
{
    float d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        float e = fabsf(a[i] - b[i]);
        if (!(e <= d)) d = e; /* NaN propagates as a failure */
        if (fabsf(b[i]) > m) m = fabsf(b[i]);
    }
    *max_ref = m;
    return d;
}

static void conv_case(int Cin, int Cout, int H, int W, int k, int bias)
{
    const size_t nx = (size_t)Cin * H * W, nw = (size_t)Cout * Cin * k * k, no = (size_t)Cout * H * W;
    float *x = rand_buf(nx, 1.0f), *w = rand_buf(nw, 1.0f / sqrtf((float)(Cin * k * k)));
    float *b = bias ? rand_buf((size_t)Cout, 0.5f) : NULL;
    float *col = malloc(sizeof(float) * (dm_vae_conv_col_size(Cin, H, W, k) + 1));
    float *o1 = malloc(sizeof(float) * no), *o2 = malloc(sizeof(float) * no);
    ck_assert(col && o1 && o2);
    dm_vae_conv2d(x, Cin, H, W, w, b, Cout, k, col, o1);
    dm_vae_conv2d_ref(x, Cin, H, W, w, b, Cout, k, o2);
    float m, d = max_abs_diff(o1, o2, no, &m);
    ck_assert_msg(d <= TOL * fmaxf(1.0f, m), "conv Cin %d Cout %d %dx%d k %d: max diff %g (max %g)",
                  Cin, Cout, H, W, k, (double)d, (double)m);
    /* accumulating form: o1 = r + conv(x) + b, checked against r + reference */
    float *r = rand_buf(no, 1.0f);
    for (size_t i = 0; i < no; i++) { o1[i] = r[i]; o2[i] += r[i]; }
    dm_vae_conv2d_acc(x, Cin, H, W, w, b, Cout, k, col, o1);
    d = max_abs_diff(o1, o2, no, &m);
    ck_assert_msg(d <= TOL * fmaxf(1.0f, m), "conv acc Cin %d Cout %d %dx%d k %d: max diff %g",
                  Cin, Cout, H, W, k, (double)d);
    free(r);
    free(x); free(w); free(b); free(col); free(o1); free(o2);
}

START_TEST(conv_small)
{
    conv_case(3, 5, 7, 9, 3, 1);
    conv_case(4, 8, 1, 1, 3, 1);  /* 1x1 image: only the centre tap is inside */
    conv_case(6, 4, 5, 3, 1, 1);  /* 1x1 conv (shortcut / post_quant_conv) */
    conv_case(2, 3, 4, 6, 5, 0);  /* other odd kernel, no bias */
    conv_case(16, 16, 1, 17, 3, 1);
    conv_case(1, 2, 13, 1, 3, 1);
}
END_TEST

START_TEST(conv_large)
{
    /* Widths that are multiples of the 32-pixel panel (one panel per image row segment) and
     * widths that are not (panels across rows, last panel partial); channels over a tile. */
    conv_case(24, 20, 9, 64, 3, 1);
    conv_case(8, 17, 5, 32, 3, 0);
    conv_case(19, 9, 7, 45, 3, 1);
    conv_case(40, 33, 12, 40, 1, 1);
    conv_case(3, 4, 3, 96, 5, 1);
    /* maps of >= 128x128 with sides multiples of 4: Winograd F(4x4, 3x3) (vae_conv.c); a
     * 132-wide map puts panels across tile rows and leaves a partial last panel */
    conv_case(8, 12, 128, 132, 3, 1);
    conv_case(5, 9, 128, 128, 3, 0);
}
END_TEST

/* f(threads) must give the same bytes for threads 1, 2, 3. */
static void conv_threads(int Cin, int Cout, int H, int W, int k, int acc)
{
    const size_t nx = (size_t)Cin * H * W, no = (size_t)Cout * H * W;
    float *x = rand_buf(nx, 1.0f), *w = rand_buf((size_t)Cout * Cin * k * k, 0.2f);
    float *b = rand_buf((size_t)Cout, 0.5f), *r = rand_buf(no, 1.0f);
    float *col = malloc(sizeof(float) * (dm_vae_conv_col_size(Cin, H, W, k) + 1));
    float *o1 = malloc(sizeof(float) * no), *o = malloc(sizeof(float) * no);
    ck_assert(col && o1 && o);
    for (int t = 1; t <= 3; t++) {
        dm_set_threads(t);
        float *dst = t == 1 ? o1 : o;
        memcpy(dst, r, sizeof(float) * no);
        if (acc)
            dm_vae_conv2d_acc(x, Cin, H, W, w, b, Cout, k, col, dst);
        else
            dm_vae_conv2d(x, Cin, H, W, w, b, Cout, k, col, dst);
        if (t > 1)
            ck_assert_msg(memcmp(o1, o, sizeof(float) * no) == 0,
                          "conv Cin %d Cout %d %dx%d k %d acc %d: threads %d differ from 1", Cin,
                          Cout, H, W, k, acc, t);
    }
    dm_set_threads(2);
    free(x); free(w); free(b); free(r); free(col); free(o1); free(o);
}

START_TEST(thread_invariance)
{
    /* above DM_VAE_PAR_MACS (below it a kernel runs on one thread whatever the count) */
    conv_threads(16, 24, 64, 64, 3, 0);
    conv_threads(16, 24, 64, 64, 3, 1);
    conv_threads(8, 12, 128, 132, 3, 1); /* F(4x4, 3x3) */
    conv_threads(7, 9, 11, 13, 3, 0);
    conv_threads(64, 64, 48, 48, 1, 1);
    /* group norm (+SiLU) */
    const int C = 32, HW = 300, G = 8;
    float *x = rand_buf((size_t)C * HW, 2.0f), *g = rand_buf(C, 1.0f), *bb = rand_buf(C, 1.0f);
    float *y1 = malloc(sizeof(float) * C * HW), *y = malloc(sizeof(float) * C * HW);
    ck_assert(y1 && y);
    for (int t = 1; t <= 3; t++) {
        dm_set_threads(t);
        dm_vae_group_norm(x, C, HW, G, DM_VAE_EPS, g, bb, 1, t == 1 ? y1 : y);
        if (t > 1) ck_assert_mem_eq(y1, y, sizeof(float) * C * HW);
    }
    free(x); free(g); free(bb); free(y1); free(y);
    /* attention */
    const int Ca = 48, N = 70;
    float *p[10];
    for (int i = 0; i < 10; i++) {
        int mat = i >= 2 && i % 2 == 0;
        p[i] = rand_buf(mat ? (size_t)Ca * Ca : (size_t)Ca, mat ? 0.15f : 0.2f);
    }
    dm_vae_attn_w aw = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]};
    float *x0 = rand_buf((size_t)Ca * N, 2.0f), *a1 = malloc(sizeof(float) * Ca * N);
    float *a = malloc(sizeof(float) * Ca * N), *ws = malloc(sizeof(float) * dm_vae_attn_ws_size(Ca, N));
    ck_assert(a1 && a && ws);
    for (int t = 1; t <= 3; t++) {
        dm_set_threads(t);
        float *dst = t == 1 ? a1 : a;
        memcpy(dst, x0, sizeof(float) * Ca * N);
        dm_vae_attention(dst, Ca, N, 8, &aw, ws);
        if (t > 1) ck_assert_mem_eq(a1, a, sizeof(float) * Ca * N);
    }
    dm_set_threads(2);
    for (int i = 0; i < 10; i++) free(p[i]);
    free(x0); free(a1); free(a); free(ws);
}
END_TEST

static void gn_case(int C, int HW, int G, int silu, float offset)
{
    const size_t n = (size_t)C * HW;
    float *x = rand_buf(n, 2.0f), *g = rand_buf((size_t)C, 0.3f), *b = rand_buf((size_t)C, 0.5f);
    for (size_t i = 0; i < n; i++) x[i] += offset; /* large mean: tests the centred variance */
    for (int c = 0; c < C; c++) g[c] += 1.0f;
    float *y1 = malloc(sizeof(float) * n), *y2 = malloc(sizeof(float) * n);
    float *xin = malloc(sizeof(float) * n);
    ck_assert(y1 && y2 && xin);
    for (size_t i = 0; i < n; i++) xin[i] = x[i];
    dm_vae_group_norm(x, C, (size_t)HW, G, DM_VAE_EPS, g, b, silu, y1);
    dm_vae_group_norm_ref(x, C, (size_t)HW, G, DM_VAE_EPS, g, b, silu, y2);
    float m, d = max_abs_diff(y1, y2, n, &m);
    ck_assert_msg(d <= 1e-4f * fmaxf(1.0f, m), "group norm C %d HW %d G %d silu %d offset %g: %g",
                  C, HW, G, silu, (double)offset, (double)d);
    /* in place gives the same result */
    dm_vae_group_norm(xin, C, (size_t)HW, G, DM_VAE_EPS, g, b, silu, xin);
    d = max_abs_diff(xin, y1, n, &m);
    ck_assert_msg(d == 0.0f, "group norm in place differs by %g", (double)d);
    free(x); free(g); free(b); free(y1); free(y2); free(xin);
}

START_TEST(group_norm)
{
    gn_case(64, 37, 32, 0, 0.0f);
    gn_case(64, 37, 32, 1, 0.0f);
    gn_case(24, 100, 8, 1, 0.0f);
    gn_case(32, 4096, 32, 1, 50.0f);
    gn_case(6, 5, 1, 0, 3.0f);
}
END_TEST

START_TEST(group_norm_known)
{
    /* Independent closed form: one group of values {1, 3} (mean 2, biased var 1). */
    float x[2] = {1.0f, 3.0f}, g[1] = {2.0f}, b[1] = {0.5f}, y[2];
    dm_vae_group_norm(x, 1, 2, 1, DM_VAE_EPS, g, b, 0, y);
    const float r = 1.0f / sqrtf(1.0f + DM_VAE_EPS);
    ck_assert_float_eq_tol(y[0], -2.0f * r + 0.5f, 1e-6f);
    ck_assert_float_eq_tol(y[1], 2.0f * r + 0.5f, 1e-6f);
    dm_vae_group_norm(x, 1, 2, 1, DM_VAE_EPS, g, b, 1, y);
    const float v = 2.0f * r + 0.5f;
    ck_assert_float_eq_tol(y[1], v / (1.0f + expf(-v)), 1e-6f);
}
END_TEST

START_TEST(upsample)
{
    const int C = 3, H = 4, W = 5;
    float *x = rand_buf((size_t)C * H * W, 1.0f), *o = malloc(sizeof(float) * 4 * C * H * W);
    ck_assert_ptr_nonnull(o);
    dm_vae_upsample2x(x, C, H, W, o);
    for (int c = 0; c < C; c++)
        for (int y = 0; y < 2 * H; y++)
            for (int xx = 0; xx < 2 * W; xx++)
                ck_assert_float_eq(o[((size_t)c * 2 * H + y) * 2 * W + xx],
                                   x[((size_t)c * H + y / 2) * W + xx / 2]);
    free(x); free(o);
}
END_TEST

static void attn_case(int C, int N, int G)
{
    dm_vae_attn_w aw;
    float *p[10];
    for (int i = 0; i < 10; i++) {
        int mat = i >= 2 && i % 2 == 0; /* gn_g, gn_b, then (w, b) x 4 */
        p[i] = rand_buf(mat ? (size_t)C * C : (size_t)C, mat ? 1.0f / sqrtf((float)C) : 0.2f);
    }
    for (int c = 0; c < C; c++) p[0][c] += 1.0f;
    aw.gn_g = p[0]; aw.gn_b = p[1];
    aw.wq = p[2]; aw.bq = p[3]; aw.wk = p[4]; aw.bk = p[5];
    aw.wv = p[6]; aw.bv = p[7]; aw.wo = p[8]; aw.bo = p[9];
    const size_t n = (size_t)C * N;
    float *x1 = rand_buf(n, 2.0f), *x2 = malloc(sizeof(float) * n);
    float *ws = malloc(sizeof(float) * dm_vae_attn_ws_size(C, N));
    ck_assert(x2 && ws);
    for (size_t i = 0; i < n; i++) x2[i] = x1[i];
    dm_vae_attention(x1, C, N, G, &aw, ws);
    dm_vae_attention_ref(x2, C, N, G, &aw);
    float m, d = max_abs_diff(x1, x2, n, &m);
    ck_assert_msg(d <= TOL * fmaxf(1.0f, m) * 4, "attention C %d N %d: %g (max %g)", C, N,
                  (double)d, (double)m);
    for (int i = 0; i < 10; i++) free(p[i]);
    free(x1); free(x2); free(ws);
}

START_TEST(attention)
{
    attn_case(32, 48, 32);
    attn_case(64, 30, 8);
    attn_case(16, 1, 4); /* a single token: softmax of one score = 1 */
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("vae_ops");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, conv_small);
    tcase_add_test(tc, conv_large);
    tcase_add_test(tc, thread_invariance);
    tcase_add_test(tc, group_norm);
    tcase_add_test(tc, group_norm_known);
    tcase_add_test(tc, upsample);
    tcase_add_test(tc, attention);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    dm_set_threads(2);
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* Low-precision GEMMs (backend/cpu/lowp.h): bf16, int8 per channel, int4 per group of 32.
 * Each kernel against its plain reference (same rounding / quantisation, double sums) and against
 * the float32 product (the quantisation error), on DiT-MoE shapes; batch, thread and
 * fast-vs-portable invariance bit for bit; packing from 16-bit sources; bad shapes. Tolerances are
 * stated where they are checked; the measured values are printed (ctest -V). */
#include "backend/cpu/lowp.h"
#include "backend/cpu/ops.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static float frand(void) /* uniform in [-1, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float grand(void) /* roughly normal (sum of 4 uniforms, unit variance) */
{
    return (frand() + frand() + frand() + frand()) * 0.8660254f;
}
static float *rand_buf(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = grand() * scale;
    return p;
}
static double rms(const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)b[i] * b[i];
    return sqrt(s / (double)n);
}
/* max |a-b| / rms(b) */
static double max_err(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m / fmax(1e-30, rms(b, n));
}
/* rms(a-b) / rms(b) */
static double rms_err(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s / (double)n) / fmax(1e-30, rms(b, n));
}
static double f32_ref_err(const float *y, const float *x, int N, const float *W, const float *b,
                          int out, int in, double *maxe)
{
    float *r = malloc(sizeof(float) * N * out);
    dm_linear_ref(x, N, in, W, b, out, r);
    double e = rms_err(y, r, (size_t)N * out);
    *maxe = max_err(y, r, (size_t)N * out);
    free(r);
    return e;
}

static const dm_lp_format FORMATS[] = {DM_LP_BF16, DM_LP_Q8, DM_LP_Q4};
/* Fast vs plain reference (same rounded operands; only fp32 vs double summation differs):
 * max |y - ref| / rms(ref). */
static const double TOL_REF[] = {2e-5, 2e-6, 1e-5};
/* Against the float32 product of the unrounded operands, rms(y - y32) / rms(y32), on these
 * random (near-normal) inputs: bf16 rounds both operands (2^-9 relative each), int8 quantises
 * both to 127 levels per row / column, int4 the weights to 16 levels per group of 32. */
static const double TOL_F32[] = {8e-3, 2.5e-2, 1.5e-1};

typedef struct {
    int N, in, out;
} shape;
/* DiT-MoE S/2 .. XL shapes: adaLN at one image, qkv, an expert's down projection, XL hidden,
 * widths that are not a multiple of the 32-column panel, and a small odd one. */
static const shape SHAPES[] = {{1, 384, 2304},  {7, 1152, 4600}, {33, 1536, 384},
                               {256, 384, 1000}, {5, 150, 45},   {2, 1152, 4608}};
/* int4 takes only widths in multiples of 32 (the odd shape is for bf16 / int8 padding) */
#define SKIP(f, sh) ((f) == DM_LP_Q4 && (sh).in % 32)

START_TEST(kernels_match_reference)
{
    const dm_lp_format f = FORMATS[_i];
    for (size_t s = 0; s < sizeof SHAPES / sizeof *SHAPES; s++) {
        const shape sh = SHAPES[s];
        if (SKIP(f, sh)) continue;
        float *x = rand_buf((size_t)sh.N * sh.in, 1.0f), *W = rand_buf((size_t)sh.out * sh.in, 0.05f);
        float *b = rand_buf((size_t)sh.out, 0.1f);
        float *y = malloc(sizeof(float) * sh.N * sh.out), *r = malloc(sizeof(float) * sh.N * sh.out);
        dm_lpmat m;
        ck_assert_int_eq(dm_lp_pack(&m, f, W, DM_F32, sh.out, sh.in, "w"), DM_OK);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const float *bb = with_bias ? b : NULL;
            ck_assert_int_eq(dm_lp_linear(x, sh.N, &m, bb, y), DM_OK);
            dm_lp_linear_ref(x, sh.N, &m, bb, r);
            const double e = max_err(y, r, (size_t)sh.N * sh.out);
            double e32max, e32 = f32_ref_err(y, x, sh.N, W, bb, sh.out, sh.in, &e32max);
            printf("%s N=%d %d->%d bias=%d: vs ref max %.2e (tol %.0e); vs f32 rms %.2e (tol %.1e) "
                   "max %.2e\n",
                   dm_lp_format_name(f), sh.N, sh.in, sh.out, with_bias, e, TOL_REF[f], e32,
                   TOL_F32[f], e32max);
            ck_assert_double_le(e, TOL_REF[f]);
            ck_assert_double_le(e32, TOL_F32[f]);
        }
        dm_lp_free(&m);
        free(x), free(W), free(b), free(y), free(r);
    }
}
END_TEST

static int bits_equal(const float *a, const float *b, size_t n)
{
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* A row computed alone, inside a batch of 7 at another offset, and inside the whole batch (256
 * rows, every position in a tile) gives the same bits; 1 vs 2 threads too. */
START_TEST(batch_and_thread_invariant)
{
    const dm_lp_format f = FORMATS[_i];
    const int N = 256, in = 384, out = 1000;
    float *x = rand_buf((size_t)N * in, 1.0f), *W = rand_buf((size_t)out * in, 0.05f);
    float *b = rand_buf((size_t)out, 0.1f);
    float *y = malloc(sizeof(float) * N * out), *z = malloc(sizeof(float) * N * out);
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_pack(&m, f, W, DM_F32, out, in, "w"), DM_OK);
    dm_set_threads(2);
    ck_assert_int_eq(dm_lp_linear(x, N, &m, b, y), DM_OK);
    for (int n = 0; n < N; n += 37) {
        ck_assert_int_eq(dm_lp_linear(x + (size_t)n * in, 1, &m, b, z), DM_OK);
        ck_assert_msg(bits_equal(z, y + (size_t)n * out, out), "%s row %d alone differs",
                      dm_lp_format_name(f), n);
    }
    ck_assert_int_eq(dm_lp_linear(x + (size_t)5 * in, 7, &m, b, z), DM_OK);
    ck_assert_msg(bits_equal(z, y + (size_t)5 * out, (size_t)7 * out), "rows 5..11 as a batch of 7");
    ck_assert_int_eq(dm_lp_linear(x + (size_t)3 * in, 33, &m, b, z), DM_OK);
    ck_assert_msg(bits_equal(z, y + (size_t)3 * out, (size_t)33 * out), "rows 3..35 as a batch of 33");
    dm_set_threads(1);
    ck_assert_int_eq(dm_lp_linear(x, N, &m, b, z), DM_OK);
    ck_assert_msg(bits_equal(z, y, (size_t)N * out), "%s: 1 vs 2 threads differ", dm_lp_format_name(f));
    dm_set_threads(2);
    dm_lp_free(&m);
    free(x), free(W), free(b), free(y), free(z);
}
END_TEST

/* The portable path (what a CPU without AVX512-BF16 / VNNI runs) gives the same bits as the
 * AVX512-BF16 / VNNI kernels, on every shape, and so does the AVX512 build of the portable code.
 * AMX: int8 (tdpbusd, exact integer sums) gives the same bits too; bf16 (tdpbf16ps) sums inside
 * the tile unit in its own order, so it is held to TOL_AMX_BF16 against the others instead (it is
 * within TOL_REF of the double reference, like them). */
#define TOL_AMX_BF16 2e-5 /* max |amx - vdpbf16ps| / rms */
START_TEST(portable_path_matches_native)
{
    const dm_lp_format f = FORMATS[_i];
    const unsigned have = dm_cpu_features();
    const unsigned vec = DM_CPU_AVX512 | DM_CPU_AVX512_BF16 | DM_CPU_AVX512_VNNI;
    const unsigned need = f == DM_LP_BF16 ? DM_CPU_AVX512_BF16 : DM_CPU_AVX512_VNNI;
    if (!(have & need))
        printf("%s: this CPU (features %s) has no native path; the portable path is what the other "
               "tests ran\n",
               dm_lp_format_name(f), dm_cpu_features_string(have));
    for (size_t s = 0; s < sizeof SHAPES / sizeof *SHAPES; s++) {
        const shape sh = SHAPES[s];
        if (SKIP(f, sh)) continue;
        const size_t n = (size_t)sh.N * sh.out;
        float *x = rand_buf((size_t)sh.N * sh.in, 1.0f), *W = rand_buf((size_t)sh.out * sh.in, 0.05f);
        float *b = rand_buf((size_t)sh.out, 0.1f);
        float *y = malloc(sizeof(float) * n), *z = malloc(sizeof(float) * n);
        dm_lpmat m;
        ck_assert_int_eq(dm_lp_pack(&m, f, W, DM_F32, sh.out, sh.in, "w"), DM_OK);
        dm_cpu_force_features(vec); /* AVX512-BF16 / VNNI, no AMX (limited to what the CPU has) */
        ck_assert_int_eq(dm_lp_linear(x, sh.N, &m, b, y), DM_OK);
        const unsigned masks[] = {0u, DM_CPU_AVX512, DM_CPU_DETECT};
        for (int k = 0; k < 3; k++) {
            dm_cpu_force_features(masks[k]);
            ck_assert_int_eq(dm_lp_linear(x, sh.N, &m, b, z), DM_OK);
            const int amx_bf16 = k == 2 && f == DM_LP_BF16 && (have & DM_CPU_AMX_BF16) && sh.in % 32 == 0;
            const double e = max_err(z, y, n);
            if (amx_bf16) {
                printf("bf16 N=%d %d->%d: AMX vs vdpbf16ps max %.2e (tol %.0e)\n", sh.N, sh.in,
                       sh.out, e, TOL_AMX_BF16);
                ck_assert_double_le(e, TOL_AMX_BF16);
            } else {
                ck_assert_msg(bits_equal(z, y, n), "%s N=%d %d->%d: features %s differ (max %.3e)",
                              dm_lp_format_name(f), sh.N, sh.in, sh.out,
                              dm_cpu_features_string(k == 2 ? have : masks[k]), e);
            }
        }
        dm_cpu_force_features(DM_CPU_DETECT);
        dm_lp_free(&m);
        free(x), free(W), free(b), free(y), free(z);
    }
}
END_TEST

/* Packing BF16 / F16 source weights gives the same packed matrix as their float32 values. */
START_TEST(pack_from_16bit_sources)
{
    const dm_lp_format f = FORMATS[_i];
    const int out = 70, in = 96, N = 9;
    float *W = rand_buf((size_t)out * in, 0.05f), *x = rand_buf((size_t)N * in, 1.0f);
    float *y = malloc(sizeof(float) * N * out), *z = malloc(sizeof(float) * N * out);
    uint16_t *h = malloc(sizeof(uint16_t) * out * in);
    for (int t = 0; t < 2; t++) {
        const dm_dtype dt = t ? DM_F16 : DM_BF16;
        for (int i = 0; i < out * in; i++) {
            h[i] = t ? dm_f32_to_f16(W[i]) : dm_f32_to_bf16(W[i]);
            W[i] = t ? dm_f16_to_f32(h[i]) : dm_bf16_to_f32(h[i]); /* the values h holds */
        }
        dm_lpmat a, c;
        ck_assert_int_eq(dm_lp_pack(&a, f, W, DM_F32, out, in, "w"), DM_OK);
        ck_assert_int_eq(dm_lp_pack(&c, f, (const char *)h, dt, out, in, "w"), DM_OK);
        ck_assert_uint_eq(dm_lp_bytes(&a), dm_lp_bytes(&c));
        for (int o = 0; o < out; o++)
            for (int i = 0; i < in; i++) ck_assert(dm_lp_get(&a, o, i) == dm_lp_get(&c, o, i));
        ck_assert_int_eq(dm_lp_linear(x, N, &a, NULL, y), DM_OK);
        ck_assert_int_eq(dm_lp_linear(x, N, &c, NULL, z), DM_OK);
        ck_assert(bits_equal(y, z, (size_t)N * out));
        dm_lp_free(&a);
        dm_lp_free(&c);
    }
    free(W), free(x), free(y), free(z), free(h);
}
END_TEST

/* Zero rows give the bias; a non-finite activation makes its row's outputs NaN (as float32 would),
 * leaving the other rows alone. */
START_TEST(zero_and_nonfinite_rows)
{
    const dm_lp_format f = FORMATS[_i];
    const int N = 3, in = 64, out = 40;
    float *W = rand_buf((size_t)out * in, 0.05f), *x = rand_buf((size_t)N * in, 1.0f);
    float *b = rand_buf((size_t)out, 0.1f), *y = malloc(sizeof(float) * N * out);
    memset(x, 0, sizeof(float) * in);
    x[2 * in + 7] = NAN;
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_pack(&m, f, W, DM_F32, out, in, "w"), DM_OK);
    ck_assert_int_eq(dm_lp_linear(x, N, &m, b, y), DM_OK);
    for (int o = 0; o < out; o++) {
        ck_assert_float_eq(y[o], b[o]);
        ck_assert(isfinite(y[out + o]));
        ck_assert(isnan(y[2 * out + o]));
    }
    dm_lp_free(&m);
    free(W), free(x), free(b), free(y);
}
END_TEST

/* Activation rounding on its edge cases, through both conversion paths: one row per value
 * [x, 0] times W = [1, 0] gives y = bf16(x) exactly (RNE ties, values that round up to the next
 * binade or to inf, denormals flushed, -0, inf, NaN). */
START_TEST(bf16_rounding_edge_cases)
{
    enum { N = 40 };
    float x[N * 2], y[N], z[N];
    const float W[2] = {1.0f, 0.0f};
    const uint32_t bits[] = {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x3f7fffffu, 0x7f7fffffu,
                             0x00000001u, 0x807fffffu, 0x00800000u, 0x80000000u, 0x7f800000u,
                             0xff800000u, 0x7fc00001u, 0x3fffffffu, 0x00ffffffu, 0xbf808000u};
    const int nb = (int)(sizeof bits / sizeof *bits);
    for (int i = 0; i < N; i++) {
        uint32_t u = i < nb ? bits[i] : (uint32_t)(0x3e000000u + (uint32_t)i * 0x00012345u);
        memcpy(&x[2 * i], &u, 4);
        x[2 * i + 1] = 0.0f;
    }
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_pack(&m, DM_LP_BF16, W, DM_F32, 1, 2, "w"), DM_OK);
    ck_assert_int_eq(dm_lp_linear(x, N, &m, NULL, y), DM_OK);
    dm_cpu_force_features(0);
    ck_assert_int_eq(dm_lp_linear(x, N, &m, NULL, z), DM_OK);
    dm_cpu_force_features(DM_CPU_DETECT);
    for (int i = 0; i < N; i++) {
        const float xi = x[2 * i];
        const uint16_t h = dm_lp_bf16_rne(xi);
        if (isnan(xi)) {
            ck_assert(isnan(y[i]) && isnan(z[i]));
            continue;
        }
        const float e = dm_bf16_to_f32(h);
        /* RNE, then a result below FLT_MIN flushed to +-0 (a denormal may round up to FLT_MIN) */
        if (fabsf(e) >= 1.17549435e-38f) ck_assert_uint_eq(h, dm_f32_to_bf16(xi));
        else ck_assert(e == 0.0f && signbit(e) == signbit(xi));
        ck_assert_msg(y[i] == e, "x = %a: native %a, expected %a", xi, y[i], e);
        ck_assert_msg(memcmp(&y[i], &z[i], 4) == 0, "x = %a: native %a, portable %a", xi, y[i], z[i]);
    }
    dm_lp_free(&m);
}
END_TEST

START_TEST(int4_needs_groups_of_32)
{
    float *W = rand_buf(8 * 100, 0.05f);
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_pack(&m, DM_LP_Q4, W, DM_F32, 8, 100, "blocks.0.moe.experts.1.w2"),
                     DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "blocks.0.moe.experts.1.w2"));
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "multiple of 32"));
    ck_assert_ptr_null(m.w);
    /* int8 and bf16 take any width */
    ck_assert_int_eq(dm_lp_pack(&m, DM_LP_Q8, W, DM_F32, 8, 100, "w"), DM_OK);
    dm_lp_free(&m);
    ck_assert_int_eq(dm_lp_pack(&m, DM_LP_Q4, W, DM_I32, 8, 96, "w"), DM_ERR_FORMAT);
    free(W);
}
END_TEST

/* Storage per format, and the G/2 routed-expert footprint it implies (printed for the record). */
START_TEST(footprint)
{
    const int out = 2 * 4608, in = 1152; /* an XL-sized SwiGLU w1 */
    float *W = rand_buf((size_t)out * in, 0.05f);
    for (int k = 0; k < 3; k++) {
        dm_lpmat m;
        ck_assert_int_eq(dm_lp_pack(&m, FORMATS[k], W, DM_F32, out, in, "w"), DM_OK);
        const double bpw = (double)dm_lp_bytes(&m) / ((double)out * in);
        ck_assert_double_le(fabs(bpw - dm_lp_bytes_per_weight(FORMATS[k], in)), 1e-6);
        /* DiT-MoE-G/2: 16.5e9 parameters, 92 % in routed experts, the rest kept in bf16 */
        const double gb = (16.5e9 * 0.92 * bpw + 16.5e9 * 0.08 * 2.0) / 1e9;
        printf("%s: %.4f bytes/weight; G/2 with %s routed experts ~ %.1f GB\n",
               dm_lp_format_name(FORMATS[k]), bpw, dm_lp_format_name(FORMATS[k]), gb);
        dm_lp_free(&m);
    }
    ck_assert_double_lt(dm_lp_bytes_per_weight(DM_LP_Q8, in), 1.01);
    ck_assert_double_lt(dm_lp_bytes_per_weight(DM_LP_Q4, in), 0.57);
    free(W);
}
END_TEST

START_TEST(feature_names)
{
    ck_assert_str_eq(dm_cpu_features_string(0), "generic");
    ck_assert_str_eq(dm_cpu_features_string(DM_CPU_AVX512 | DM_CPU_AVX512_BF16 | DM_CPU_AVX512_VNNI |
                                            DM_CPU_AMX_INT8 | DM_CPU_AMX_BF16),
                     "avx512,bf16,vnni,amx-int8,amx-bf16");
    ck_assert_str_eq(dm_cpu_features_string(DM_CPU_AVX512_VNNI), "vnni");
    dm_lp_format f;
    ck_assert_int_eq(dm_lp_format_from_name("int4", &f), 0);
    ck_assert_int_eq(f, DM_LP_Q4);
    ck_assert_int_eq(dm_lp_format_from_name("int3", &f), -1);
    ck_assert_uint_eq(dm_cpu_parse_features(NULL), ~0u);
    ck_assert_uint_eq(dm_cpu_parse_features("native"), ~0u);
    ck_assert_uint_eq(dm_cpu_parse_features("generic"), 0u);
    ck_assert_uint_eq(dm_cpu_parse_features("none"), 0u);
    ck_assert_uint_eq(dm_cpu_parse_features("vnni"), DM_CPU_AVX512 | DM_CPU_AVX512_VNNI);
    ck_assert_uint_eq(dm_cpu_parse_features("bf16,amx"),
                      DM_CPU_AVX512 | DM_CPU_AVX512_BF16 | DM_CPU_AMX_INT8 | DM_CPU_AMX_BF16);
    dm_cpu_force_features(0);
    ck_assert_uint_eq(dm_cpu_features(), 0);
    dm_cpu_force_features(DM_CPU_DETECT);
    printf("this CPU: %s\n", dm_cpu_features_string(dm_cpu_features()));
}
END_TEST

#ifdef DM_BACKEND_BACKEND_H /* the op table's roles exist (backend/backend.h, via lowp.h) */
/* The storage rule: experts quantised only when asked, the router never, bf16 for the per-token
 * GEMMs (attention, experts, shared expert, dense MLP) under --precision bf16 and float32 for the
 * embedders, adaLN and final layer, int4 on a width that is not a multiple of 32 refused with the
 * tensor's name. */
START_TEST(policy_by_role)
{
    float W[4 * 64];
    for (int i = 0; i < 4 * 64; i++) W[i] = grand() * 0.05f;
    dm_weight_desc d = {.name = "blocks.2.moe.experts.3.w1", .role = DM_ROLE_EXPERT,
                        .use = DM_USE_LINEAR, .dtype = DM_F32, .rows = 4, .cols = 64, .data = W};
    int lp;
    dm_lp_format f;
    const dm_lp_policy f32 = {0, 0}, bf16 = {1, 0}, q8 = {0, 8}, bf16q4 = {1, 4};
    ck_assert_int_eq(dm_lp_choose(NULL, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(lp, 0);
    ck_assert_int_eq(dm_lp_choose(&f32, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(lp, 0);
    ck_assert_int_eq(dm_lp_choose(&bf16, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(f, DM_LP_BF16);
    ck_assert_int_eq(dm_lp_choose(&q8, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(f, DM_LP_Q8);
    ck_assert_int_eq(dm_lp_choose(&bf16q4, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(f, DM_LP_Q4);
    ck_assert_int_eq(lp, 1);
    /* the per-token GEMMs go bf16 under --precision bf16, never quantised */
    const dm_weight_role keep[] = {DM_ROLE_SHARED, DM_ROLE_ATTN, DM_ROLE_MLP};
    for (size_t k = 0; k < sizeof keep / sizeof *keep; k++) {
        d.role = keep[k];
        ck_assert_int_eq(dm_lp_bf16_role(d.role), 1);
        ck_assert_int_eq(dm_lp_choose(&q8, &d, &lp, &f), DM_OK);
        ck_assert_int_eq(lp, 0);
        ck_assert_int_eq(dm_lp_choose(&bf16q4, &d, &lp, &f), DM_OK);
        ck_assert_int_eq(lp, 1);
        ck_assert_int_eq(f, DM_LP_BF16);
    }
    /* the per-image / small products (embedders, adaLN, final layer) stay float32 in bf16 too */
    const dm_weight_role f32roles[] = {DM_ROLE_MOD, DM_ROLE_EMBED, DM_ROLE_FINAL};
    for (size_t k = 0; k < sizeof f32roles / sizeof *f32roles; k++) {
        d.role = f32roles[k];
        ck_assert_int_eq(dm_lp_bf16_role(d.role), 0);
        for (int q = 0; q < 3; q++) {
            const dm_lp_policy *pol = q == 0 ? &bf16 : q == 1 ? &bf16q4 : &q8;
            lp = 1;
            ck_assert_int_eq(dm_lp_choose(pol, &d, &lp, &f), DM_OK);
            ck_assert_int_eq(lp, 0);
        }
    }
    ck_assert_int_eq(dm_lp_bf16_role(DM_ROLE_ROUTER), 0);
    ck_assert_int_eq(dm_lp_bf16_role(DM_ROLE_VAE), 0);
    d.role = DM_ROLE_ROUTER;
    ck_assert_int_eq(dm_lp_choose(&bf16q4, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(lp, 0);
    d.role = DM_ROLE_EXPERT;
    d.use = DM_USE_VECTOR;
    ck_assert_int_eq(dm_lp_choose(&bf16q4, &d, &lp, &f), DM_OK);
    ck_assert_int_eq(lp, 0);
    d.use = DM_USE_LINEAR;
    d.cols = 48, d.rows = 4;
    ck_assert_int_eq(dm_lp_choose(&bf16q4, &d, &lp, &f), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "blocks.2.moe.experts.3.w1"));
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_pack_desc(&q8, &d, &m, &lp), DM_OK);
    ck_assert_int_eq(lp, 1);
    ck_assert_int_eq(m.fmt, DM_LP_Q8);
    ck_assert_int_eq(m.in, 48);
    dm_lp_free(&m);
}
END_TEST
#endif

int main(void)
{
    Suite *s = suite_create("lowp");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, kernels_match_reference, 0, 3);
    tcase_add_loop_test(tc, batch_and_thread_invariant, 0, 3);
    tcase_add_loop_test(tc, portable_path_matches_native, 0, 3);
    tcase_add_loop_test(tc, pack_from_16bit_sources, 0, 3);
    tcase_add_loop_test(tc, zero_and_nonfinite_rows, 0, 3);
    tcase_add_test(tc, bf16_rounding_edge_cases);
    tcase_add_test(tc, int4_needs_groups_of_32);
    tcase_add_test(tc, footprint);
    tcase_add_test(tc, feature_names);
#ifdef DM_BACKEND_BACKEND_H
    tcase_add_test(tc, policy_by_role);
#endif
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

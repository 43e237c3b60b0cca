/* Stored (pre-quantised) expert weights at the backend seam (docs/format.md "Quantised routed
 * experts"; the file-level round trips are tests/test_quant_file.py):
 *  - dm_lp_import of dm_lp_export(dm_lp_pack(W)) rebuilds the packed matrix byte for byte (panels,
 *    scales, corrections) for int8 and int4, widths with partial panels, a zero row and a zero
 *    group; dm_quant_weight gives the exported values; the GEMM outputs are bitwise equal;
 *  - the file layout is the documented one (int8 row-major, int4 even k in the low nibble);
 *  - bad stored values (-128, a non-finite scale, int4 width) are refused naming the tensor;
 *  - dm_dequant_rows (src/base: the values a float-only backend uploads) equals dm_lp_get of the
 *    imported matrix bit for bit (incl. a zero row, a zero group and a group of scale -0 with
 *    nonzero nibbles) and refuses the same bad values;
 *  - the CPU backend's weight() takes desc.quant (any precision), refuses the other
 *    --quant-experts kind and non-expert roles; the CUDA backend (when compiled and a device
 *    opens) takes desc.quant (dequantised to bf16; its values are checked in test_cuda_ops
 *    "quant") and refuses it for a non-expert role, else that case prints a skip line. */
#include "backend/backend.h"
#include "backend/cpu/lowp.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0x243F6A8885A308D3ull;
static float urand(void) /* [-1, 1) */
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* W [out, in] random with row 1 zero and (in >= 64) row 2's second group zero. */
static float *make_w(int out, int in)
{
    float *W = malloc((size_t)out * in * sizeof *W);
    for (int i = 0; i < out * in; i++) W[i] = 0.05f * urand();
    for (int i = 0; i < in; i++) W[in + i] = 0.0f;
    if (in >= 64 && out > 2)
        for (int i = 32; i < 64; i++) W[2 * in + i] = 0.0f;
    return W;
}

static size_t qbytes(int bits, int out, int in) { return bits == 8 ? (size_t)out * in : (size_t)out * in / 2; }
static size_t sbytes(int bits, int out, int in) { return bits == 8 ? 4 * (size_t)out : 2 * (size_t)out * (in / 32); }

static void same_lpmat(const dm_lpmat *a, const dm_lpmat *b)
{
    ck_assert_int_eq(a->fmt, b->fmt);
    ck_assert_int_eq(a->np, b->np);
    ck_assert_int_eq(a->kb, b->kb);
    const size_t cols = (size_t)a->np * DM_LP_PANEL, kb = (size_t)a->kb;
    if (a->fmt == DM_LP_Q8) {
        ck_assert_int_eq(memcmp(a->w, b->w, cols * kb * 4), 0);
        ck_assert_int_eq(memcmp(a->scale, b->scale, cols * sizeof(float)), 0);
        ck_assert_int_eq(memcmp(a->corr, b->corr, cols * sizeof(int32_t)), 0);
    } else {
        ck_assert_int_eq(memcmp(a->w, b->w, cols * kb * 16), 0);
        ck_assert_int_eq(memcmp(a->gscale, b->gscale, cols * kb * sizeof(uint16_t)), 0);
        ck_assert_int_eq(memcmp(a->fcorr, b->fcorr, cols * sizeof(float)), 0);
    }
}

static const int SHAPES[][2] = {{37, 64}, {64, 96}, {5, 128}};

START_TEST(import_rebuilds_pack)
{
    const int bits = _i % 2 ? 4 : 8, out = SHAPES[_i / 2][0], in = SHAPES[_i / 2][1];
    const dm_lp_format fmt = bits == 8 ? DM_LP_Q8 : DM_LP_Q4;
    float *W = make_w(out, in);
    dm_lpmat a, b;
    ck_assert_int_eq(dm_lp_pack(&a, fmt, W, DM_F32, out, in, "w"), DM_OK);
    void *q = malloc(qbytes(bits, out, in)), *s = malloc(sbytes(bits, out, in));
    void *q2 = malloc(qbytes(bits, out, in)), *s2 = malloc(sbytes(bits, out, in));
    ck_assert_int_eq(dm_lp_export(&a, q, s), DM_OK);
    ck_assert_int_eq(dm_quant_weight(bits, W, DM_F32, out, in, "w", q2, s2), DM_OK);
    ck_assert_int_eq(memcmp(q, q2, qbytes(bits, out, in)), 0);
    ck_assert_int_eq(memcmp(s, s2, sbytes(bits, out, in)), 0);
    /* the documented layout: value = q * scale, within half a step of W (int4: one step at the
     * clamped top, + d's bf16 rounding) */
    for (int o = 0; o < out; o++)
        for (int k = 0; k < in; k++) {
            float v, step;
            if (bits == 8) {
                float sc;
                memcpy(&sc, (char *)s + 4 * (size_t)o, 4);
                v = ((int8_t *)q)[(size_t)o * in + k] * sc;
                step = 0.5f * sc * 1.0001f;
            } else {
                const uint8_t byte = ((uint8_t *)q)[(size_t)o * (in / 2) + k / 2];
                const int nib = (byte >> (k % 2 ? 4 : 0)) & 15;
                uint16_t h;
                memcpy(&h, (char *)s + 2 * ((size_t)o * (in / 32) + k / 32), 2);
                const float d = dm_bf16_to_f32(h);
                v = (nib >= 8 ? nib - 16 : nib) * d;
                step = 1.04f * fabsf(d);
            }
            ck_assert_msg(fabsf(v - dm_lp_get(&a, o, k)) <= 1e-12f, "[%d, %d]", o, k);
            ck_assert_msg(fabsf(v - W[(size_t)o * in + k]) <= step + 1e-30f, "[%d, %d]", o, k);
        }
    ck_assert_int_eq(dm_lp_import(&b, fmt, out, in, q, s, "w"), DM_OK);
    same_lpmat(&a, &b);
    const int N = 7;
    float *x = malloc((size_t)N * in * sizeof *x), *ya = malloc((size_t)N * out * 4),
          *yb = malloc((size_t)N * out * 4);
    for (int i = 0; i < N * in; i++) x[i] = urand();
    ck_assert_int_eq(dm_lp_linear(x, N, &a, NULL, ya), DM_OK);
    ck_assert_int_eq(dm_lp_linear(x, N, &b, NULL, yb), DM_OK);
    ck_assert_int_eq(memcmp(ya, yb, (size_t)N * out * 4), 0);
    dm_lp_free(&a);
    dm_lp_free(&b);
    free(W), free(q), free(s), free(q2), free(s2), free(x), free(ya), free(yb);
}
END_TEST

START_TEST(import_refuses_bad_values)
{
    const int out = 4, in = 64;
    int8_t q8[4 * 64] = {0};
    float s8[4] = {0.01f, 0.02f, 0.03f, 0.04f};
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_import(&m, DM_LP_Q8, out, in, q8, s8, "e.w"), DM_OK);
    dm_lp_free(&m);
    q8[2 * in + 9] = -128;
    ck_assert_int_eq(dm_lp_import(&m, DM_LP_Q8, out, in, q8, s8, "e.w"), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "e.w: value -128 at [2, 9]"));
    q8[2 * in + 9] = 0;
    s8[3] = INFINITY;
    ck_assert_int_eq(dm_lp_import(&m, DM_LP_Q8, out, in, q8, s8, "e.w"), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "row 3"));
    uint8_t q4[4 * 32] = {0};
    uint16_t s4[4 * 2] = {0};
    s4[5] = 0x7fc0; /* NaN */
    ck_assert_int_eq(dm_lp_import(&m, DM_LP_Q4, out, in, q4, s4, "e.w"), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "row 2, group 1"));
    ck_assert_int_eq(dm_lp_import(&m, DM_LP_Q4, out, 48, q4, s4, "e.w"), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "e.w"));
    float w48[2 * 48] = {0};
    ck_assert_int_eq(dm_quant_weight(4, w48, DM_F32, 2, 48, "e.w", q4, s4), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "multiple of 32"));
}
END_TEST

/* dm_dequant_rows == dm_lp_get of dm_lp_import, bit for bit, whole matrix and a row range. */
START_TEST(dequant_equals_cpu_values)
{
    const int bits = _i % 2 ? 4 : 8, out = SHAPES[_i / 2][0], in = SHAPES[_i / 2][1];
    const dm_lp_format fmt = bits == 8 ? DM_LP_Q8 : DM_LP_Q4;
    float *W = make_w(out, in);
    void *q = malloc(qbytes(bits, out, in)), *s = malloc(sbytes(bits, out, in));
    ck_assert_int_eq(dm_quant_weight(bits, W, DM_F32, out, in, "w", q, s), DM_OK);
    if (bits == 4 && out > 3) { /* row 3, group 0: scale -0 over nonzero nibbles */
        const uint16_t mz = 0x8000;
        memcpy((char *)s + 2 * ((size_t)3 * (in / 32)), &mz, 2);
        memset((uint8_t *)q + (size_t)3 * (in / 2), 0x93, 16);
    }
    dm_lpmat m;
    ck_assert_int_eq(dm_lp_import(&m, fmt, out, in, q, s, "w"), DM_OK);
    float *y = malloc((size_t)out * in * sizeof *y), *ref = malloc((size_t)out * in * sizeof *ref);
    for (int o = 0; o < out; o++)
        for (int k = 0; k < in; k++) ref[(size_t)o * in + k] = dm_lp_get(&m, o, k);
    ck_assert_int_eq(dm_dequant_rows(bits, q, s, out, in, 0, out, "w", y), DM_OK);
    ck_assert_int_eq(memcmp(y, ref, (size_t)out * in * sizeof *y), 0);
    const int r0 = out / 3, nr = out - r0 > 2 ? 2 : out - r0;
    ck_assert_int_eq(dm_dequant_rows(bits, q, s, out, in, r0, nr, "w", y), DM_OK);
    ck_assert_int_eq(memcmp(y, ref + (size_t)r0 * in, (size_t)nr * in * sizeof *y), 0);
    ck_assert_int_eq(dm_dequant_rows(bits, q, s, out, in, out - 1, 2, "w", y), DM_ERR_ARG);
    dm_lp_free(&m);
    free(W), free(q), free(s), free(y), free(ref);
}
END_TEST

START_TEST(dequant_refuses_bad_values)
{
    const int out = 4, in = 64;
    int8_t q8[4 * 64] = {0};
    float s8[4] = {0.01f, 0.02f, 0.03f, 0.04f}, y[4 * 64];
    q8[2 * in + 9] = -128;
    ck_assert_int_eq(dm_dequant_rows(8, q8, s8, out, in, 0, out, "e.w", y), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "e.w: value -128 at [2, 9]"));
    q8[2 * in + 9] = 0;
    s8[3] = INFINITY;
    ck_assert_int_eq(dm_dequant_rows(8, q8, s8, out, in, 0, out, "e.w", y), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "row 3"));
    uint8_t q4[4 * 32] = {0};
    uint16_t s4[4 * 2] = {0};
    s4[5] = 0x7fc0; /* NaN */
    ck_assert_int_eq(dm_dequant_rows(4, q4, s4, out, in, 0, out, "e.w", y), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "row 2, group 1"));
    ck_assert_int_eq(dm_dequant_rows(4, q4, s4, out, 48, 0, out, "e.w", y), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "e.w"));
}
END_TEST

static dm_backend *open_cpu(int quant, dm_precision prec)
{
    dm_load_opts o;
    dm_load_opts_init(&o);
    o.quant_experts = quant;
    o.precision = prec;
    dm_backend *be = NULL;
    ck_assert_int_eq(dm_backend_open(&o, &be), DM_OK);
    return be;
}

/* y = x W^T through the backend's linear op */
static void run_linear(dm_backend *be, const dm_weight *w, const float *x, int N, int in, int out,
                       float *y)
{
    dm_buf bx, by;
    ck_assert_int_eq(be->ops->alloc(be->ctx, (size_t)N * in * 4, &bx), DM_OK);
    ck_assert_int_eq(be->ops->alloc(be->ctx, (size_t)N * out * 4, &by), DM_OK);
    ck_assert_int_eq(be->ops->upload(be->ctx, bx.p, x, (size_t)N * in * 4), DM_OK);
    ck_assert_int_eq(be->ops->linear(be->ctx, bx.p, N, w, NULL, by.p), DM_OK);
    ck_assert_int_eq(be->ops->download(be->ctx, y, by.p, (size_t)N * out * 4), DM_OK);
    be->ops->release(be->ctx, &bx);
    be->ops->release(be->ctx, &by);
}

START_TEST(cpu_backend_takes_stored)
{
    const int bits = _i % 2 ? 4 : 8, out = 40, in = 96, N = 5;
    const dm_precision prec = _i / 2 ? DM_PREC_BF16 : DM_PREC_F32;
    float *W = make_w(out, in), *x = malloc((size_t)N * in * 4), *ya = malloc((size_t)N * out * 4),
          *yb = malloc((size_t)N * out * 4);
    for (int i = 0; i < N * in; i++) x[i] = urand();
    void *q = malloc(qbytes(bits, out, in)), *s = malloc(sbytes(bits, out, in));
    ck_assert_int_eq(dm_quant_weight(bits, W, DM_F32, out, in, "e.w", q, s), DM_OK);
    /* reference: the float weight quantised at load by a --quant-experts backend */
    dm_backend *bq = open_cpu(bits, prec), *bn = open_cpu(0, prec), *bo = open_cpu(12 - bits, prec);
    dm_weight_desc df = {.name = "e.w", .role = DM_ROLE_EXPERT, .use = DM_USE_LINEAR,
                         .dtype = DM_F32, .rows = out, .cols = in, .data = W};
    dm_weight_desc ds = df;
    ds.dtype = bits == 8 ? DM_I8 : DM_U8;
    ds.data = q;
    ds.quant = bits;
    ds.scale = s;
    dm_weight *wa, *wb, *wc, *bad;
    ck_assert_int_eq(bq->ops->weight(bq->ctx, &df, &wa), DM_OK);
    ck_assert_int_eq(bn->ops->weight(bn->ctx, &ds, &wb), DM_OK); /* no flag: the stored kind */
    ck_assert_int_eq(bq->ops->weight(bq->ctx, &ds, &wc), DM_OK); /* same kind: a no-op */
    ck_assert_uint_eq(bq->ops->weight_bytes(wa), bn->ops->weight_bytes(wb));
    run_linear(bq, wa, x, N, in, out, ya);
    run_linear(bn, wb, x, N, in, out, yb);
    ck_assert_int_eq(memcmp(ya, yb, (size_t)N * out * 4), 0);
    run_linear(bq, wc, x, N, in, out, yb);
    ck_assert_int_eq(memcmp(ya, yb, (size_t)N * out * 4), 0);
    ck_assert_int_eq(bo->ops->weight(bo->ctx, &ds, &bad), DM_ERR_ARG); /* the other kind */
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "re-quantise"));
    ds.role = DM_ROLE_SHARED;
    ck_assert_int_eq(bn->ops->weight(bn->ctx, &ds, &bad), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "only routed experts"));
    bq->ops->weight_free(bq->ctx, wa);
    bq->ops->weight_free(bq->ctx, wc);
    bn->ops->weight_free(bn->ctx, wb);
    dm_backend_close(bq);
    dm_backend_close(bn);
    dm_backend_close(bo);
    free(W), free(x), free(ya), free(yb), free(q), free(s);
}
END_TEST

START_TEST(cuda_takes_stored)
{
    dm_load_opts o;
    dm_load_opts_init(&o);
    o.backend = DM_BACKEND_CUDA;
    dm_backend *be = NULL;
    if (dm_backend_check(DM_BACKEND_CUDA) != DM_OK || dm_backend_open(&o, &be) != DM_OK) {
        printf("cuda_takes_stored: skipped (no CUDA backend or device here)\n");
        return;
    }
    int8_t q[32 * 32] = {0};
    float s[32] = {0};
    dm_weight_desc d = {.name = "blocks.0.moe.experts.0.down_proj.weight", .role = DM_ROLE_EXPERT,
                        .use = DM_USE_LINEAR, .dtype = DM_I8, .rows = 32, .cols = 32, .data = q,
                        .quant = 8, .scale = s};
    dm_weight *w = NULL;
    ck_assert_int_eq(be->ops->weight(be->ctx, &d, &w), DM_OK); /* dequantised to bf16 */
    ck_assert_ptr_nonnull(w);
    ck_assert_uint_eq(be->ops->weight_bytes(w), 32 * 32 * 2);
    be->ops->weight_free(be->ctx, w);
    w = NULL;
    d.role = DM_ROLE_SHARED;
    d.name = "blocks.0.moe.shared_experts.down_proj.weight";
    ck_assert_int_eq(be->ops->weight(be->ctx, &d, &w), DM_ERR_FORMAT);
    ck_assert_ptr_null(w);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "shared_experts.down_proj.weight"));
    dm_backend_close(be);
}
END_TEST

int main(void)
{
    Suite *st = suite_create("quant_stored");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, import_rebuilds_pack, 0, 6);
    tcase_add_test(tc, import_refuses_bad_values);
    tcase_add_loop_test(tc, cpu_backend_takes_stored, 0, 4);
    tcase_add_loop_test(tc, dequant_equals_cpu_values, 0, 6);
    tcase_add_test(tc, dequant_refuses_bad_values);
    tcase_add_test(tc, cuda_takes_stored);
    suite_add_tcase(st, tc);
    SRunner *sr = srunner_create(st);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* Regression tests for the defects of the hardening pass (issue 16; docs/reliability.md): every
 * header field range-checked before it is converted, sizes derived from what a file can hold
 * before anything is allocated, the batch manifest's version and kind checked, resume's test of
 * a finished PNG, and dm_all_finite. Each case expects one error code and a message naming the
 * file and the field; run under the clang sanitizer build they must also give no UBSan report. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "batch/batch.h"
#include "ditmoe.h"

static char g_dir[64];

static const char *tmp(const char *name)
{
    static char buf[8][256];
    static int k;
    char *b = buf[k++ % 8];
    snprintf(b, 256, "%s/%s", g_dir, name);
    return b;
}

static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/ditmoe-hard-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* A routing dump with no records: the 24-byte head, then the JSON header. */
static void write_dump(const char *path, const char *json)
{
    uint8_t head[24];
    memcpy(head, "DMROUTE1", 8);
    put_u64(head + 8, 24);
    put_u64(head + 16, strlen(json));
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fwrite(head, 1, 24, f);
    fputs(json, f);
    fclose(f);
}

static char *dump_json(const char *grid, const char *classes, const char *steps,
                       const char *records, const char *moe_layers)
{
    static char buf[1024];
    snprintf(buf, sizeof buf,
             "{\"format\":\"ditmoe-routing\",\"version\":1,\"shape\":{\"layers\":1,"
             "\"moe_layers\":%s,\"grid\":%s,\"tokens\":16,\"top_k\":2,\"experts\":8,"
             "\"uncond_expert\":-1,\"num_classes\":%s,\"steps\":%s,\"heun\":false,"
             "\"id_dtype\":\"u8\",\"weights\":\"f16\"},\"records\":%s}",
             moe_layers, grid, classes, steps, records);
    return buf;
}

static dm_status open_dump(const char *json)
{
    const char *p = tmp("d.dmr");
    write_dump(p, json);
    dm_trace_reader *r = NULL;
    dm_status st = dm_trace_read_open(p, &r);
    if (st == DM_OK) {
        ck_assert_ptr_nonnull(r);
        dm_trace_read_close(r);
    } else {
        ck_assert_ptr_null(r);
        ck_assert_msg(strstr(dm_last_error(), p) != NULL, "message names the file: %s",
                      dm_last_error());
    }
    return st;
}

#define EXPECT_FIELD(json, field)                                                              \
    do {                                                                                       \
        ck_assert_int_eq(open_dump(json), DM_ERR_FORMAT);                                      \
        ck_assert_msg(strstr(dm_last_error(), field) != NULL, "expected %s in: %s", field,     \
                      dm_last_error());                                                        \
    } while (0)

START_TEST(test_trace_header_ranges)
{
    /* the valid baseline opens */
    ck_assert_int_eq(open_dump(dump_json("[4,4]", "10", "50", "0", "[0]")), DM_OK);
    /* issue 16: "grid": [1e30, 1] was converted to int before the range error */
    EXPECT_FIELD(dump_json("[1e30,1]", "10", "50", "0", "[0]"), "shape.grid");
    EXPECT_FIELD(dump_json("[1,1e30]", "10", "50", "0", "[0]"), "shape.grid");
    EXPECT_FIELD(dump_json("[-1e30,-1e30]", "10", "50", "0", "[0]"), "shape.grid");
    EXPECT_FIELD(dump_json("[1.5,2]", "10", "50", "0", "[0]"), "shape.grid");
    EXPECT_FIELD(dump_json("[2048,2048]", "10", "50", "0", "[0]"), "shape.grid");
    EXPECT_FIELD(dump_json("[4,4]", "1e30", "50", "0", "[0]"), "shape.num_classes");
    EXPECT_FIELD(dump_json("[4,4]", "10", "1e30", "0", "[0]"), "shape.steps");
    EXPECT_FIELD(dump_json("[4,4]", "10", "50", "1e30", "[0]"), "records");
    EXPECT_FIELD(dump_json("[4,4]", "10", "50", "0", "[1e30]"), "shape.moe_layers");
    EXPECT_FIELD(dump_json("[4,4]", "10", "50", "0", "[0.5]"), "shape.moe_layers");
    /* issue 16: a 274-byte dump claiming 2^22 classes (ditmoe-routes allocated 1 GB) */
    EXPECT_FIELD(dump_json("[4,4]", "4194304", "50", "0", "[0]"), "shape.num_classes");
    EXPECT_FIELD(dump_json("[4,4]", "1073741824", "50", "0", "[0]"), "shape.num_classes");
    /* steps above the sampler's limit */
    EXPECT_FIELD(dump_json("[4,4]", "10", "100001", "0", "[0]"), "shape.steps");
    /* records the file cannot hold: no record bytes at all, a million promised */
    EXPECT_FIELD(dump_json("[4,4]", "10", "50", "1000000", "[0]"), "records");
}
END_TEST

START_TEST(test_route_counts_caps)
{
    dm_trace_shape s;
    memset(&s, 0, sizeof s);
    s.layers = 1;
    s.grid_h = s.grid_w = 4;
    s.top_k = 2;
    s.num_experts = 8;
    s.uncond_expert = -1;
    s.num_classes = DM_MAX_CLASSES;
    s.steps = 50;
    dm_route_counts c;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_OK); /* 1 x 32768 x 8: fine */
    dm_route_counts_free(&c);
    /* the largest shapes a header may give: refused before anything is allocated */
    s.layers = DM_TRACE_MAX_LAYERS;
    s.num_experts = 65533;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "classes"));
    ck_assert_ptr_null(c.by_class);
    s.num_classes = 10;
    s.grid_h = s.grid_w = 1024;
    s.num_experts = 64;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "tokens"));
    s.grid_h = s.grid_w = 4;
    s.steps = DM_SAMPLE_MAX_STEPS;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "steps"));
    s.steps = DM_SAMPLE_MAX_STEPS + 1;
    s.layers = 1;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_ERR_FORMAT);
    /* unknown step count: a record far past the sampler limit is refused, not grown into */
    s.steps = 0;
    ck_assert_int_eq(dm_route_counts_init(&c, &s, 0), DM_OK);
    dm_trace_record rec;
    memset(&rec, 0, sizeof rec);
    rec.step = 1 << 24;
    ck_assert_int_eq(dm_route_counts_add(&c, &rec), DM_ERR_FORMAT);
    dm_route_counts_free(&c);
}
END_TEST

/* ------------------------------------------------------------------ batch manifest */

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static const char *manifest(const char *version, const char *height)
{
    static char buf[512];
    snprintf(buf, sizeof buf,
             "{\"format\":\"ditmoe-batch\",\"version\":%s,\"params\":{\"num\":4,"
             "\"classes\":\"random\",\"width\":32,\"height\":%s,\"channels\":1}}",
             version, height);
    return buf;
}

START_TEST(test_manifest_fields)
{
    const char *mf = tmp("manifest.json");
    dm_batch_params p;
    write_text(mf, manifest("1", "32"));
    ck_assert_int_eq(dm_batch_manifest_read(g_dir, &p), DM_OK);
    ck_assert_int_eq(p.height, 32);
    ck_assert_int_eq(p.num, 4);
    /* issue 16: "height": 3e43 was converted to int */
    const char *bad[] = {"3e43", "-3e43", "0", "1.5", "70000", "\"32\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(mf, manifest("1", bad[i]));
        ck_assert_int_eq(dm_batch_manifest_read(g_dir, &p), DM_ERR_FORMAT);
        ck_assert_msg(strstr(dm_last_error(), "params.height") && strstr(dm_last_error(), mf),
                      "%s: %s", bad[i], dm_last_error());
    }
    /* issue 16: version 99 was accepted */
    const char *vers[] = {"99", "0", "1e300", "\"1\"", "null"};
    for (size_t i = 0; i < sizeof vers / sizeof vers[0]; i++) {
        write_text(mf, manifest(vers[i], "32"));
        ck_assert_int_eq(dm_batch_manifest_read(g_dir, &p), DM_ERR_FORMAT);
        ck_assert_msg(strstr(dm_last_error(), "version"), "%s: %s", vers[i], dm_last_error());
        int found = 0;
        dm_batch_params q;
        memset(&q, 0, sizeof q);
        ck_assert_int_eq(dm_batch_manifest_check(g_dir, &q, &found), DM_ERR_FORMAT);
    }
    /* issue 16: a manifest.json that is a directory was "not valid JSON" */
    unlink(mf);
    ck_assert_int_eq(mkdir(mf, 0755), 0);
    ck_assert_int_eq(dm_batch_manifest_read(g_dir, &p), DM_ERR_IO);
    ck_assert_msg(strstr(dm_last_error(), "is a directory"), "%s", dm_last_error());
    int found = 0;
    ck_assert_int_eq(dm_batch_manifest_check(g_dir, &p, &found), DM_ERR_IO);
    rmdir(mf);
}
END_TEST

/* ------------------------------------------------------------------ resume's PNG check */

static uint8_t *slurp(const char *path, long *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    *n = ftell(f);
    rewind(f);
    uint8_t *b = malloc((size_t)*n);
    ck_assert_int_eq(fread(b, 1, (size_t)*n, f), (size_t)*n);
    fclose(f);
    return b;
}

static void spit(const char *path, const uint8_t *b, long n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    if (n) fwrite(b, 1, (size_t)n, f);
    fclose(f);
}

START_TEST(test_png_check)
{
    const int w = 7, h = 5;
    uint8_t pix[7 * 5 * 3];
    for (size_t i = 0; i < sizeof pix; i++) pix[i] = (uint8_t)(i * 37);
    const char *good = tmp("000000.png");
    const char *text[] = {"class", "3", NULL};
    ck_assert_int_eq(dm_png_write(good, w, h, 3, pix, text), DM_OK);
    ck_assert_int_eq(dm_batch_png_check(good, w, h, 3), DM_OK);
    /* the wrong size or channel count */
    ck_assert_int_eq(dm_batch_png_check(good, w + 1, h, 3), DM_ERR_FORMAT);
    ck_assert_int_eq(dm_batch_png_check(good, w, h - 1, 3), DM_ERR_FORMAT);
    ck_assert_int_eq(dm_batch_png_check(good, w, h, 1), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), good));
    ck_assert_int_eq(dm_batch_png_check(tmp("absent.png"), w, h, 3), DM_ERR_IO);
    /* every truncation, every appended byte, and a flipped byte in every chunk are refused */
    long n;
    uint8_t *b = slurp(good, &n);
    const char *bad = tmp("bad.png");
    for (long cut = 0; cut < n; cut++) {
        spit(bad, b, cut);
        ck_assert_msg(dm_batch_png_check(bad, w, h, 3) == DM_ERR_FORMAT, "cut at %ld", cut);
    }
    uint8_t *c = malloc((size_t)n + 1);
    memcpy(c, b, (size_t)n);
    c[n] = 0;
    spit(bad, c, n + 1);
    ck_assert_int_eq(dm_batch_png_check(bad, w, h, 3), DM_ERR_FORMAT);
    for (long i = 0; i < n; i++) {
        memcpy(c, b, (size_t)n);
        c[i] ^= 0x10;
        spit(bad, c, n);
        ck_assert_msg(dm_batch_png_check(bad, w, h, 3) == DM_ERR_FORMAT, "byte %ld flipped", i);
    }
    /* resume: a good file is done; a 0-byte, a truncated and a wrong-size file are not */
    spit(tmp("000001.png"), NULL, 0);
    spit(tmp("000002.png"), b, n - 12); /* no IEND */
    uint8_t small[2 * 2 * 3] = {0};
    ck_assert_int_eq(dm_png_write(tmp("000003.png"), 2, 2, 3, small, NULL), DM_OK);
    ck_assert_int_eq(dm_png_write(tmp("000004.png"), w, h, 3, pix, NULL), DM_OK);
    uint8_t done[6];
    int64_t ndone = -1;
    ck_assert_int_eq(dm_batch_scan_complete(g_dir, 6, w, h, 3, done, &ndone, -1, 1), DM_OK);
    ck_assert_int_eq(ndone, 2);
    const uint8_t want[6] = {1, 0, 0, 0, 1, 0};
    ck_assert_mem_eq(done, want, 6);
    /* a shard checks only what it owns; the others count as found */
    ck_assert_int_eq(dm_batch_scan_complete(g_dir, 6, w, h, 3, done, &ndone, 0, 2), DM_OK);
    const uint8_t want0[6] = {1, 1, 0, 1, 1, 0}; /* odd indices belong to rank 1: unchecked */
    ck_assert_mem_eq(done, want0, 6);
    ck_assert_int_eq(ndone, 4);
    free(c);
    free(b);
}
END_TEST

/* pack's N (a flag, or a hand-edited manifest's params.num) sizes nothing before the folder is
 * known to hold N images: 10^12 asked of a folder of 3 is refused at once, naming the first. */
START_TEST(test_pack_huge_num)
{
    uint8_t px[2 * 2 * 3] = {0};
    char name[32];
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof name, "%06d.png", i == 2 ? 3 : i);
        ck_assert_int_eq(dm_png_write(tmp(name), 2, 2, 3, px, NULL), DM_OK);
    }
    ck_assert_int_eq(dm_batch_pack(g_dir, 1000000000000LL, tmp("o.npz"), 0, 0, NULL, NULL),
                     DM_ERR_ARG);
    ck_assert_msg(strstr(dm_last_error(), "000002.png") != NULL, "%s", dm_last_error());
    ck_assert_int_eq(access(tmp("o.npz"), F_OK), -1);
    ck_assert_int_eq(dm_batch_pack(g_dir, 2, tmp("o.npz"), 0, 0, NULL, NULL), DM_OK);
}
END_TEST

START_TEST(test_all_finite)
{
    float x[16];
    for (int i = 0; i < 16; i++) x[i] = (float)i - 8.0f;
    size_t bad = 99;
    ck_assert_int_eq(dm_all_finite(x, 16, &bad), 1);
    ck_assert_uint_eq(bad, 99);
    ck_assert_int_eq(dm_all_finite(x, 0, NULL), 1);
    x[11] = INFINITY;
    x[13] = NAN;
    ck_assert_int_eq(dm_all_finite(x, 16, &bad), 0);
    ck_assert_uint_eq(bad, 11);
    ck_assert_int_eq(dm_all_finite(x, 11, NULL), 1);
    x[2] = -NAN;
    ck_assert_int_eq(dm_all_finite(x, 16, &bad), 0);
    ck_assert_uint_eq(bad, 2);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("hardening");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_trace_header_ranges);
    tcase_add_test(tc, test_route_counts_caps);
    tcase_add_test(tc, test_manifest_fields);
    tcase_add_test(tc, test_png_check);
    tcase_add_test(tc, test_pack_huge_num);
    tcase_add_test(tc, test_all_finite);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* I/O tests: safetensors reader (good and bad files written here by a tiny writer), .npy
 * round trips and rejections, model config (metadata and inference), class ids, PNG with tEXt
 * read back through libpng, f32 -> f16/bf16 rounding. Expected values are computed independently
 * (bit patterns from the IEEE formats, ldexp), never taken from our own output. */
#include "ditmoe.h"

#include <check.h>
#include <dirent.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_dir[256];

static const char *tpath(const char *name)
{
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/dm_test_io_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
    dm_set_log_level(DM_LOG_QUIET);
}

static void teardown(void)
{
    DIR *d = opendir(g_dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.') {
                char p[600];
                snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
                if (rmdir(p) != 0) unlink(p);
            }
        closedir(d);
    }
    rmdir(g_dir);
}

/* Expect failure with a message containing every given substring. */
static void expect_err(dm_status st, const char *a, const char *b)
{
    const char *m = dm_last_error();
    ck_assert_msg(st != DM_OK, "expected an error containing \"%s\"", a);
    ck_assert_msg(strstr(m, a) != NULL, "message \"%s\" lacks \"%s\"", m, a);
    if (b) ck_assert_msg(strstr(m, b) != NULL, "message \"%s\" lacks \"%s\"", m, b);
    ck_assert_msg(strchr(m, '\n') == NULL, "message is not one line: \"%s\"", m);
}

/* ---------------------------------------------------------------------------------------------
 * A tiny safetensors writer (independent of src/io): raw header text + data bytes.
 * ------------------------------------------------------------------------------------------- */
static void write_raw(const char *path, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(bytes, 1, n, f), n);
    fclose(f);
}

/* u64 LE length | header | data (data_len bytes; zeros if data is NULL, as a sparse file) */
static void write_st(const char *path, const char *header, const void *data, size_t data_len)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    uint64_t n = strlen(header);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, n, f);
    if (data) fwrite(data, 1, data_len, f);
    fflush(f);
    if (!data) ck_assert_int_eq(ftruncate(fileno(f), (off_t)(8 + n + data_len)), 0);
    fclose(f);
}

/* Tensor list -> header JSON with contiguous offsets; returns the data size. */
typedef struct {
    char name[96];
    const char *dtype;
    int ndim;
    int64_t shape[4];
} tspec;

static size_t esize(const char *dt)
{
    return strcmp(dt, "F32") == 0 || strcmp(dt, "I32") == 0 ? 4 : strcmp(dt, "I64") == 0 ? 8
         : strcmp(dt, "U8") == 0 ? 1 : 2;
}

/* meta_json: the "ditmoe" JSON text (escaped here), or NULL. header must hold cap bytes. */
static size_t build_header(const tspec *t, int n, const char *meta_json, char *hdr, size_t cap)
{
    size_t o = 0, off = 0;
    o += (size_t)snprintf(hdr + o, cap - o, "{");
    if (meta_json) {
        o += (size_t)snprintf(hdr + o, cap - o, "\"__metadata__\":{\"ditmoe\":\"");
        for (const char *c = meta_json; *c; c++) {
            if (*c == '"' || *c == '\\') hdr[o++] = '\\';
            hdr[o++] = *c;
        }
        o += (size_t)snprintf(hdr + o, cap - o, "\"},");
    }
    for (int i = 0; i < n; i++) {
        size_t cnt = 1;
        o += (size_t)snprintf(hdr + o, cap - o, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "",
                              t[i].name, t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++) {
            o += (size_t)snprintf(hdr + o, cap - o, d ? ",%lld" : "%lld", (long long)t[i].shape[d]);
            cnt *= (size_t)t[i].shape[d];
        }
        size_t nb = cnt * esize(t[i].dtype);
        o += (size_t)snprintf(hdr + o, cap - o, "],\"data_offsets\":[%zu,%zu]}", off, off + nb);
        off += nb;
    }
    snprintf(hdr + o, cap - o, "}");
    ck_assert_uint_lt(o + 2, cap);
    return off;
}

/* ---------------------------------------------------------------------------------------------
 * Safetensors: good file
 * ------------------------------------------------------------------------------------------- */
START_TEST(st_good_file)
{
    /* u8 [3] at 0..3, then f32 [2,3] at 3..27 (unaligned), f16 [7] 27..41, bf16 [6] 41..53,
     * i32 [2] 53..61. */
    unsigned char data[61];
    unsigned char u8v[3] = {1, 2, 250};
    memcpy(data, u8v, 3);
    float f32v[6] = {1.0f, -2.5f, 0.1f, 3.0e38f, -0.0f, 1e-40f};
    memcpy(data + 3, f32v, 24);
    uint16_t f16v[7] = {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x2E66, 0x0000, 0x8400};
    memcpy(data + 27, f16v, 14);
    uint16_t bf16v[6] = {0x3F80, 0xC020, 0x3DCD, 0x0001, 0x7F7F, 0xBF40};
    memcpy(data + 41, bf16v, 12);
    int32_t i32v[2] = {-7, 123456};
    memcpy(data + 53, i32v, 8);
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\",\"k\":\"v w\"},"
                      "\"u\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[3,27]},"
                      "\"h\":{\"dtype\":\"F16\",\"shape\":[7],\"data_offsets\":[27,41]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[41,53]},"
                      "\"i\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[53,61]},"
                      "\"s\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[61,61]}}";
    const char *p = tpath("good.safetensors");
    write_st(p, hdr, data, sizeof data);
    dm_st_file *f;
    ck_assert_int_eq(dm_st_open(p, &f), DM_OK);
    ck_assert_int_eq(dm_st_count(f), 6);
    ck_assert_str_eq(dm_st_at(f, 0)->name, "u"); /* header order */
    ck_assert_str_eq(dm_st_at(f, 5)->name, "s");
    ck_assert_ptr_null(dm_st_at(f, 6));
    ck_assert_str_eq(dm_st_path(f), p);
    ck_assert_str_eq(dm_st_meta(f, "format"), "pt");
    ck_assert_str_eq(dm_st_meta(f, "k"), "v w");
    ck_assert_ptr_null(dm_st_meta(f, "nope"));
    ck_assert_ptr_null(dm_st_find(f, "nope"));
    const dm_st_tensor *ti = dm_st_find(f, "i");
    ck_assert_ptr_nonnull(ti);
    ck_assert_int_eq(ti->dtype, DM_I32);
    ck_assert_uint_eq(ti->nbytes, 8);
    int32_t iv[2];
    memcpy(iv, ti->data, 8);
    ck_assert_int_eq(iv[0], -7);
    ck_assert_int_eq(iv[1], 123456);
    ck_assert_int_eq(((const uint8_t *)dm_st_find(f, "u")->data)[2], 250);

    float *x;
    int64_t s23[2] = {2, 3};
    ck_assert_int_eq(dm_st_load_f32(f, "a", 2, s23, &x), DM_OK);
    for (int i = 0; i < 6; i++) ck_assert_msg(memcmp(&x[i], &f32v[i], 4) == 0, "f32 %d", i);
    free(x);

    /* F16: values from the binary16 definition. */
    int64_t s7 = 7;
    ck_assert_int_eq(dm_st_load_f32(f, "h", 1, &s7, &x), DM_OK);
    float eh[7] = {1.0f, -2.5f, 65504.0f, ldexpf(1.0f, -24), 1638.0f / 16384.0f, 0.0f,
                   -ldexpf(1.0f, -14)};
    for (int i = 0; i < 7; i++) ck_assert_msg(x[i] == eh[i], "f16 %d: %g vs %g", i, x[i], eh[i]);
    free(x);

    /* BF16: top 16 bits of binary32. */
    ck_assert_int_eq(dm_st_load_f32(f, "b", 2, s23, &x), DM_OK);
    float eb[6] = {1.0f, -2.5f, 205.0f / 2048.0f, ldexpf(1.0f, -133),
                   ldexpf(255.0f / 128.0f, 127), -0.75f};
    for (int i = 0; i < 6; i++) ck_assert_msg(x[i] == eb[i], "bf16 %d: %g vs %g", i, x[i], eb[i]);
    free(x);

    int64_t s04[2] = {0, 4};
    ck_assert_int_eq(dm_st_load_f32(f, "s", 2, s04, &x), DM_OK);
    free(x);

    /* Load errors. */
    int64_t s32[2] = {3, 2};
    expect_err(dm_st_load_f32(f, "a", 2, s32, &x), "good.safetensors: a: shape [2,3] expected [3,2]",
               NULL);
    ck_assert_ptr_null(x);
    expect_err(dm_st_load_f32(f, "zz", 2, s23, &x), "good.safetensors: missing tensor zz", NULL);
    int64_t s2 = 2;
    expect_err(dm_st_load_f32(f, "i", 1, &s2, &x), "good.safetensors: i: dtype I32", NULL);
    dm_st_close(f);
}
END_TEST

/* ---------------------------------------------------------------------------------------------
 * Safetensors: every bad input gives an error naming the file and what is wrong.
 * ------------------------------------------------------------------------------------------- */
static void bad_st(const char *name, const char *hdr, size_t data_len, const char *w1,
                   const char *w2)
{
    const char *p = tpath(name);
    write_st(p, hdr, NULL, data_len);
    dm_st_file *f = (dm_st_file *)1;
    expect_err(dm_st_open(p, &f), name, w1);
    if (w2) expect_err(DM_ERR_FORMAT, w2, NULL);
    ck_assert_ptr_null(f);
}

START_TEST(st_bad_files)
{
    dm_st_file *f;
    /* missing file */
    expect_err(dm_st_open(tpath("absent.safetensors"), &f), "absent.safetensors", "cannot open");
    ck_assert_int_eq(dm_st_open(tpath("absent.safetensors"), &f), DM_ERR_IO);
    /* truncated: fewer than 8 bytes */
    write_raw(tpath("short.safetensors"), "\x05\0\0", 3);
    expect_err(dm_st_open(tpath("short.safetensors"), &f), "short.safetensors", "too short");
    ck_assert_ptr_null(f);
    /* header length past EOF */
    unsigned char b[10] = {200, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_raw(tpath("hlen.safetensors"), b, 10);
    expect_err(dm_st_open(tpath("hlen.safetensors"), &f), "hlen.safetensors", "header length");
    unsigned char huge[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    write_raw(tpath("huge.safetensors"), huge, 8);
    expect_err(dm_st_open(tpath("huge.safetensors"), &f), "huge.safetensors", "header length");
    /* file truncated inside the data: offsets now past the end */
    bad_st("trunc.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
           10, "w: data_offsets out of range", "found [0,16]");
    /* malformed JSON / not an object */
    bad_st("json.safetensors", "{\"w\":{\"dtype\":\"F32\",", 0, "malformed JSON", NULL);
    bad_st("arr.safetensors", "[1,2]", 0, "not a JSON object", NULL);
    /* offsets out of range and reversed */
    bad_st("range.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
           8, "w: data_offsets out of range", NULL);
    bad_st("rev.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 8,
           "w: data_offsets out of range", NULL);
    /* overlapping tensors */
    bad_st("overlap.safetensors",
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]},"
           "\"c\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
           20, "overlaps", "c: data overlaps tensor a");
    /* unknown dtype: names tensor and dtype */
    bad_st("dtype.safetensors", "{\"w\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
           "w: unsupported dtype", "found F64");
    /* size mismatch */
    bad_st("size.safetensors", "{\"w\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,8]}}",
           8, "w: data size mismatch", "expected 12 bytes");
    /* shape overflow (product wraps 64 bits) */
    bad_st("ovf.safetensors",
           "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
           "w: shape overflows", NULL);
    /* bad shape entries and rank */
    bad_st("neg.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}",
           0, "w: bad shape entry 0", NULL);
    bad_st("frac.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,0]}}",
           0, "w: bad shape entry 0", NULL);
    bad_st("rank.safetensors",
           "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
           "w: too many dimensions", "found 9");
    bad_st("nooff.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4,
           "w: bad \"data_offsets\"", NULL);
    bad_st("nodt.safetensors", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
           "w: missing or non-string \"dtype\"", NULL);
    /* metadata values must be strings; duplicate tensor names are rejected */
    bad_st("meta.safetensors", "{\"__metadata__\":{\"n\":3}}", 0, "__metadata__: n", NULL);
    bad_st("dup.safetensors",
           "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
           "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
           2, "w: tensor appears twice", NULL);
}
END_TEST

/* ---------------------------------------------------------------------------------------------
 * f32 -> f16 / bf16 rounding, ties to even (expected bit patterns from the formats).
 * ------------------------------------------------------------------------------------------- */
START_TEST(f16_bf16_rounding)
{
    /* binary16: 1 + 2^-11 is halfway between 0x3C00 and 0x3C01 -> even 0x3C00;
     * 1 + 3*2^-11 halfway between 0x3C01 and 0x3C02 -> 0x3C02; just above a tie rounds up. */
    ck_assert_uint_eq(dm_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3C00);
    ck_assert_uint_eq(dm_f32_to_f16(1.0f + 3 * ldexpf(1, -11)), 0x3C02);
    ck_assert_uint_eq(dm_f32_to_f16(1.0f + ldexpf(1, -11) + ldexpf(1, -20)), 0x3C01);
    ck_assert_uint_eq(dm_f32_to_f16(-(1.0f + 3 * ldexpf(1, -11))), 0xBC02);
    /* subnormal ties: 2^-25 between 0 and 2^-24 -> 0; 3*2^-25 -> 2*2^-24 */
    ck_assert_uint_eq(dm_f32_to_f16(ldexpf(1, -25)), 0x0000);
    ck_assert_uint_eq(dm_f32_to_f16(3 * ldexpf(1, -25)), 0x0002);
    ck_assert_uint_eq(dm_f32_to_f16(ldexpf(1, -24)), 0x0001);
    /* normal/subnormal boundary: (2^-14 - 2^-25) is a tie between 0x03FF and 0x0400 -> 0x0400 */
    ck_assert_uint_eq(dm_f32_to_f16(ldexpf(1, -14) - ldexpf(1, -25)), 0x0400);
    /* overflow: 65520 is the tie between 65504 and 2^16 -> inf; 65519 -> 65504 */
    ck_assert_uint_eq(dm_f32_to_f16(65520.0f), 0x7C00);
    ck_assert_uint_eq(dm_f32_to_f16(65519.0f), 0x7BFF);
    ck_assert_uint_eq(dm_f32_to_f16(0.1f), 0x2E66);
    ck_assert_uint_eq(dm_f32_to_f16(INFINITY), 0x7C00);
    uint16_t hn = dm_f32_to_f16(NAN);
    ck_assert((hn & 0x7C00) == 0x7C00 && (hn & 0x3FF) != 0);
    /* bfloat16: 1 + 2^-8 between 0x3F80 and 0x3F81 -> 0x3F80; 1 + 3*2^-8 -> 0x3F82 */
    ck_assert_uint_eq(dm_f32_to_bf16(1.0f + ldexpf(1, -8)), 0x3F80);
    ck_assert_uint_eq(dm_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)), 0x3F82);
    ck_assert_uint_eq(dm_f32_to_bf16(1.0f + ldexpf(1, -8) + ldexpf(1, -20)), 0x3F81);
    ck_assert_uint_eq(dm_f32_to_bf16(0.1f), 0x3DCD);
    ck_assert_uint_eq(dm_f32_to_bf16(-2.5f), 0xC020);
    uint16_t bn = dm_f32_to_bf16(NAN);
    ck_assert((bn & 0x7F80) == 0x7F80 && (bn & 0x7F) != 0);
    /* round trips are exact for representable values */
    for (uint32_t h = 0; h < 0x7C00; h += 7) ck_assert_uint_eq(dm_f32_to_f16(dm_f16_to_f32(h)), h);
}
END_TEST

/* ---------------------------------------------------------------------------------------------
 * .npy
 * ------------------------------------------------------------------------------------------- */
/* A v1.0 file written by hand, the way numpy lays it out. */
static void write_npy_raw(const char *path, int version, const char *dict, const void *data,
                          size_t n)
{
    unsigned char pre[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', (unsigned char)version, 0};
    size_t pl = version == 1 ? 10 : 12, dl = strlen(dict);
    size_t total = (pl + dl + 1 + 63) / 64 * 64, hl = total - pl;
    for (size_t i = 0; i < pl - 8; i++) pre[8 + i] = (unsigned char)(hl >> (8 * i));
    FILE *f = fopen(path, "wb");
    fwrite(pre, 1, pl, f);
    fwrite(dict, 1, dl, f);
    for (size_t i = dl; i < hl - 1; i++) fputc(' ', f);
    fputc('\n', f);
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

START_TEST(npy_read_handmade)
{
    float v[3] = {1.5f, -2.0f, 3.25f};
    write_npy_raw(tpath("a.npy"), 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", v,
                  12);
    dm_npy a;
    ck_assert_int_eq(dm_npy_read(tpath("a.npy"), &a), DM_OK);
    ck_assert_int_eq(a.dtype, DM_F32);
    ck_assert_int_eq(a.ndim, 1);
    ck_assert_int_eq(a.shape[0], 3);
    ck_assert_uint_eq(a.count, 3);
    ck_assert(memcmp(a.data, v, 12) == 0);
    dm_npy_free(&a);
    /* version 2.0, double-quoted keys, 4-d shape without trailing comma, key order shuffled */
    int64_t w[2 * 4 * 1 * 3];
    for (int i = 0; i < 24; i++) w[i] = (int64_t)i * 1000000007LL - 5;
    write_npy_raw(tpath("b.npy"), 2, "{\"shape\": (2, 4, 1, 3), \"fortran_order\": False, \"descr\": "
                  "\"<i8\"}", w, sizeof w);
    ck_assert_int_eq(dm_npy_read_expect(tpath("b.npy"), DM_I64, 4, &a), DM_OK);
    ck_assert_int_eq(a.shape[0], 2);
    ck_assert_int_eq(a.shape[1], 4);
    ck_assert_int_eq(a.shape[2], 1);
    ck_assert_int_eq(a.shape[3], 3);
    ck_assert(memcmp(a.data, w, sizeof w) == 0);
    dm_npy_free(&a);
    /* scalar */
    int32_t s = -42;
    write_npy_raw(tpath("c.npy"), 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (), }", &s, 4);
    ck_assert_int_eq(dm_npy_read(tpath("c.npy"), &a), DM_OK);
    ck_assert_int_eq(a.ndim, 0);
    ck_assert_uint_eq(a.count, 1);
    ck_assert_int_eq(*(int32_t *)a.data, -42);
    dm_npy_free(&a);
}
END_TEST

START_TEST(npy_round_trip)
{
    dm_dtype types[4] = {DM_F32, DM_I32, DM_I64, DM_U8};
    const char *descr[4] = {"'<f4'", "'<i4'", "'<i8'", "'|u1'"};
    int64_t shapes[3][3] = {{5, 0, 0}, {2, 3, 4}, {0, 0, 0}};
    int ndims[3] = {1, 3, 0};
    unsigned char buf[24 * 8], back[24 * 8];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i * 37 + 11);
    for (int t = 0; t < 4; t++)
        for (int s = 0; s < 3; s++) {
            const char *p = tpath("rt.npy");
            ck_assert_int_eq(dm_npy_write(p, types[t], ndims[s], shapes[s], buf), DM_OK);
            /* header: 64-byte aligned, numpy's dict text */
            FILE *f = fopen(p, "rb");
            unsigned char hd[256];
            size_t got = fread(hd, 1, sizeof hd, f);
            fclose(f);
            ck_assert_uint_ge(got, 10);
            size_t hl = hd[8] | (size_t)hd[9] << 8;
            ck_assert_uint_eq((10 + hl) % 64, 0);
            ck_assert_int_eq(hd[9 + hl], '\n');
            hd[9 + hl] = 0;
            ck_assert_ptr_nonnull(strstr((char *)hd + 10, descr[t]));
            const char *want_shape = s == 0 ? "'shape': (5,)" : s == 1 ? "'shape': (2, 3, 4)"
                                                                       : "'shape': ()";
            ck_assert_msg(strstr((char *)hd + 10, want_shape), "%s", hd + 10);
            dm_npy a;
            ck_assert_int_eq(dm_npy_read_expect(p, types[t], ndims[s], &a), DM_OK);
            size_t cnt = s == 0 ? 5 : s == 1 ? 24 : 1;
            ck_assert_uint_eq(a.count, cnt);
            memcpy(back, a.data, cnt * dm_dtype_size(types[t]));
            ck_assert(memcmp(back, buf, cnt * dm_dtype_size(types[t])) == 0);
            dm_npy_free(&a);
        }
    /* unwritable dtype */
    int64_t one = 1;
    expect_err(dm_npy_write(tpath("h.npy"), DM_F16, 1, &one, buf), "h.npy", "F16");
}
END_TEST

START_TEST(npy_rejects)
{
    float v[4] = {0};
    dm_npy a;
    write_npy_raw(tpath("i.npy"), 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", v,
                  16);
    expect_err(dm_npy_read_expect(tpath("i.npy"), DM_F32, 1, &a), "i.npy: dtype int64 expected float32",
               NULL);
    ck_assert_ptr_null(a.data);
    expect_err(dm_npy_read_expect(tpath("i.npy"), DM_I64, 2, &a), "i.npy", "rank 1");
    write_npy_raw(tpath("fo.npy"), 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                  v, 16);
    expect_err(dm_npy_read(tpath("fo.npy"), &a), "fo.npy", "fortran_order");
    write_npy_raw(tpath("be.npy"), 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }", v,
                  16);
    expect_err(dm_npy_read(tpath("be.npy"), &a), "be.npy", "'>f4' (big-endian");
    write_npy_raw(tpath("f8.npy"), 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", v,
                  16);
    expect_err(dm_npy_read(tpath("f8.npy"), &a), "f8.npy", "'<f8'");
    write_npy_raw(tpath("tr.npy"), 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", v,
                  16);
    expect_err(dm_npy_read(tpath("tr.npy"), &a), "tr.npy", "expected 20 bytes");
    write_npy_raw(tpath("sh.npy"), 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
                  v, 16);
    expect_err(dm_npy_read(tpath("sh.npy"), &a), "sh.npy", "shape");
    write_npy_raw(tpath("v9.npy"), 9, "{}", v, 0);
    expect_err(dm_npy_read(tpath("v9.npy"), &a), "v9.npy", "version 9");
    write_raw(tpath("junk.npy"), "hello world!", 12);
    expect_err(dm_npy_read(tpath("junk.npy"), &a), "junk.npy", "not a .npy");
    expect_err(dm_npy_read(tpath("none.npy"), &a), "none.npy", "cannot open");
}
END_TEST

/* Interop with numpy itself (skipped when $PYTHON is unset or lacks numpy): numpy reads our files
 * and writes files (v1.0 and v2.0) that we read. */
START_TEST(npy_numpy_interop)
{
    const char *py = getenv("PYTHON");
    char cmd[2048];
    if (!py) return;
    snprintf(cmd, sizeof cmd, "%s -c 'import numpy' 2>/dev/null", py);
    if (system(cmd) != 0) return;
    float f[6] = {0.5f, -1.0f, 3.0f, 1e-30f, 7.25f, -0.0f};
    int64_t s23[2] = {2, 3}, s4 = 4;
    int64_t l[4] = {-1, 0, 1LL << 40, 9};
    uint8_t u[4] = {0, 1, 128, 255};
    ck_assert_int_eq(dm_npy_write(tpath("ours_f.npy"), DM_F32, 2, s23, f), DM_OK);
    ck_assert_int_eq(dm_npy_write(tpath("ours_l.npy"), DM_I64, 1, &s4, l), DM_OK);
    ck_assert_int_eq(dm_npy_write(tpath("ours_u.npy"), DM_U8, 1, &s4, u), DM_OK);
    snprintf(cmd, sizeof cmd,
             "cd %s && %s -c '\n"
             "import numpy as np\n"
             "a = np.load(\"ours_f.npy\"); assert a.dtype == np.float32 and a.shape == (2, 3)\n"
             "assert (a == np.array([[0.5, -1, 3], [1e-30, 7.25, 0]], np.float32)).all()\n"
             "b = np.load(\"ours_l.npy\"); assert b.dtype == np.int64 and list(b) == [-1, 0, 2**40, 9]\n"
             "c = np.load(\"ours_u.npy\"); assert c.dtype == np.uint8 and list(c) == [0, 1, 128, 255]\n"
             "np.save(\"np_i4.npy\", np.arange(-3, 9, dtype=np.int32).reshape(3, 1, 4))\n"
             "with open(\"np_v2.npy\", \"wb\") as fh:\n"
             "    np.lib.format.write_array(fh, np.linspace(0, 1, 5, dtype=np.float32), version=(2, 0))\n"
             "np.save(\"np_f.npy\", np.asfortranarray(np.ones((2, 3), np.float32)))\n"
             "np.save(\"np_be.npy\", np.ones(3, dtype=\">f4\"))\n"
             "'",
             g_dir, py);
    ck_assert_msg(system(cmd) == 0, "python side failed: %s", cmd);
    dm_npy a;
    ck_assert_msg(dm_npy_read_expect(tpath("np_i4.npy"), DM_I32, 3, &a) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(a.shape[0], 3);
    ck_assert_int_eq(a.shape[1], 1);
    ck_assert_int_eq(a.shape[2], 4);
    for (int i = 0; i < 12; i++) ck_assert_int_eq(((int32_t *)a.data)[i], i - 3);
    dm_npy_free(&a);
    ck_assert_msg(dm_npy_read_expect(tpath("np_v2.npy"), DM_F32, 1, &a) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(a.shape[0], 5);
    for (int i = 0; i < 5; i++) ck_assert(((float *)a.data)[i] == (float)i / 4.0f);
    dm_npy_free(&a);
    expect_err(dm_npy_read(tpath("np_f.npy"), &a), "np_f.npy", "fortran_order");
    expect_err(dm_npy_read(tpath("np_be.npy"), &a), "np_be.npy", "big-endian");
}
END_TEST

static int count_tmp_files(void)
{
    int n = 0;
    DIR *d = opendir(g_dir);
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

START_TEST(atomic_write_failures)
{
    float v[2] = {1, 2};
    int64_t two = 2;
    /* target is an existing directory: rename fails, temp file removed, message names path */
    mkdir(tpath("adir.npy"), 0755);
    expect_err(dm_npy_write(tpath("adir.npy"), DM_F32, 1, &two, v), "adir.npy", NULL);
    ck_assert_int_eq(count_tmp_files(), 0);
    expect_err(dm_npy_write(tpath("nodir/x.npy"), DM_F32, 1, &two, v), "nodir/x.npy", NULL);
    uint8_t px[4] = {0};
    mkdir(tpath("adir.png"), 0755);
    expect_err(dm_png_write(tpath("adir.png"), 2, 2, 1, px, NULL), "adir.png", NULL);
    ck_assert_int_eq(count_tmp_files(), 0);
    expect_err(dm_png_write(tpath("x.png"), 2, 2, 2, px, NULL), "x.png", "channels");
    /* an existing file is replaced whole */
    write_raw(tpath("old.npy"), "garbage", 7);
    ck_assert_int_eq(dm_npy_write(tpath("old.npy"), DM_F32, 1, &two, v), DM_OK);
    dm_npy a;
    ck_assert_int_eq(dm_npy_read(tpath("old.npy"), &a), DM_OK);
    ck_assert(((float *)a.data)[1] == 2.0f);
    dm_npy_free(&a);
}
END_TEST

/* ---------------------------------------------------------------------------------------------
 * Model config
 * ------------------------------------------------------------------------------------------- */
/* A config from a file without "sampling" metadata records nothing (unset), and
 * dm_sample_params_init supplies the table's defaults for its (arch, objective). */
static void expect_sampling(const dm_config *c, dm_sampler_kind k, int steps, float cfg, int ch)
{
    ck_assert_int_eq(c->default_sampler, DM_SAMPLER_UNSET);
    ck_assert_int_eq(c->default_steps, 0);
    ck_assert(c->default_cfg_scale == 0.0f);
    ck_assert_int_eq(c->cfg_channels, -1);
    dm_sample_params p;
    dm_sample_params_init(&p, c);
    ck_assert_int_eq(p.sampler, k);
    ck_assert_int_eq(p.steps, steps);
    ck_assert(p.cfg_scale == cfg);
    ck_assert_int_eq(p.cfg_channels, ch);
}

typedef struct {
    int D, L, E, eh, sh, C, p, in, out, classes, qknorm, hd, promoe;
} mspec;

/* Write a model file with the DiT-MoE key set (zero data, sparse). */
static void write_model(const char *path, const mspec *m, const char *meta)
{
    static tspec t[512];
    int n = 0;
    int64_t D = m->D, T = (int64_t)(m->in / m->p) * (m->in / m->p);
#define ADD(nm, nd, ...)                                                          \
    do {                                                                          \
        int64_t s_[4] = {__VA_ARGS__};                                            \
        snprintf(t[n].name, sizeof t[n].name, "%s", nm);                          \
        t[n].dtype = "F16";                                                       \
        t[n].ndim = nd;                                                           \
        memcpy(t[n].shape, s_, sizeof s_);                                        \
        n++;                                                                      \
    } while (0)
    char k[96];
    ADD("pos_embed", 3, 1, T, D);
    ADD("x_embedder.proj.weight", 4, D, m->C, m->p, m->p);
    ADD("x_embedder.proj.bias", 1, D);
    ADD("y_embedder.embedding_table.weight", 2, m->classes + 1, D);
    ADD("final_layer.linear.weight", 2, (int64_t)m->p * m->p * m->out, D);
    for (int i = 0; i < m->L; i++) {
        if (m->qknorm) {
            snprintf(k, sizeof k, "blocks.%d.attn.Wqkv.weight", i); ADD(k, 2, 3 * D, D);
            snprintf(k, sizeof k, "blocks.%d.attn.q_norm.weight", i); ADD(k, 1, m->hd);
            snprintf(k, sizeof k, "blocks.%d.attn.k_norm.weight", i); ADD(k, 1, m->hd);
            snprintf(k, sizeof k, "blocks.%d.attn.out_proj.weight", i); ADD(k, 2, D, D);
        } else {
            snprintf(k, sizeof k, "blocks.%d.attn.qkv.weight", i); ADD(k, 2, 3 * D, D);
            snprintf(k, sizeof k, "blocks.%d.attn.proj.weight", i); ADD(k, 2, D, D);
        }
        if (m->promoe && i % 2 == 1) { /* ProMoE MoE block: 12 routed + 1 uncond expert, 2D wide */
            snprintf(k, sizeof k, "blocks.%d.mlp.cluster_centers", i); ADD(k, 2, 12, D);
            for (int e = 0; e <= 12; e++) {
                snprintf(k, sizeof k, "blocks.%d.mlp.experts.%d.up_proj.weight", i, e);
                ADD(k, 2, 2 * D, D);
            }
            snprintf(k, sizeof k, "blocks.%d.mlp.shared_expert.up_proj.weight", i);
            ADD(k, 2, 2 * D, D);
            continue;
        }
        if (m->promoe) { /* ProMoE dense block */
            snprintf(k, sizeof k, "blocks.%d.mlp.fc1.weight", i); ADD(k, 2, 4 * D, D);
            snprintf(k, sizeof k, "blocks.%d.mlp.fc2.weight", i); ADD(k, 2, D, 4 * D);
            continue;
        }
        snprintf(k, sizeof k, "blocks.%d.moe.gate.weight", i); ADD(k, 2, m->E, D);
        for (int e = 0; e < m->E; e++) {
            snprintf(k, sizeof k, "blocks.%d.moe.experts.%d.gate_proj.weight", i, e);
            ADD(k, 2, m->eh, D);
        }
        if (m->sh) {
            snprintf(k, sizeof k, "blocks.%d.moe.shared_experts.gate_proj.weight", i);
            ADD(k, 2, m->sh, D);
        }
    }
#undef ADD
    static char hdr[1 << 17];
    size_t data = build_header(t, n, meta, hdr, sizeof hdr);
    write_st(path, hdr, NULL, data);
}

static const mspec k_small = {.D = 384, .L = 2, .E = 4, .eh = 1536, .sh = 768, .C = 4, .p = 2,
                              .in = 8, .out = 8, .classes = 10};
static const mspec k_qk = {.D = 64, .L = 3, .E = 2, .eh = 256, .sh = 0, .C = 3, .p = 1, .in = 4,
                           .out = 3, .classes = 5, .qknorm = 1, .hd = 16};

static const char *k_meta_full =
    "{\"format_version\": 1, \"arch\": \"dit-moe\", \"name\": \"tiny\", \"hidden_size\": 384,"
    " \"depth\": 2, \"num_heads\": 6, \"num_experts\": 4, \"top_k\": 2, \"expert_hidden\": 1536,"
    " \"shared_hidden\": 768, \"attention\": \"timm\", \"patch_size\": 2, \"input_size\": 8,"
    " \"in_channels\": 4, \"learn_sigma\": true, \"num_classes\": 10,"
    " \"class_names\": [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\","
    " \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"], \"objective\": \"ddpm\", \"vae_scale\": 0.5,"
    " \"sampling\": {\"sampler\": \"ddim\", \"steps\": 30, \"cfg_scale\": 1.5, \"cfg_channels\": 4}}";

static dm_status config_of(const char *name, const mspec *m, const char *meta, dm_config *c)
{
    const char *p = tpath(name);
    write_model(p, m, meta);
    dm_st_file *f;
    dm_status st = dm_st_open(p, &f);
    ck_assert_msg(st == DM_OK, "%s", dm_last_error());
    st = dm_config_from_file(f, c);
    dm_st_close(f);
    return st;
}

/* Replace the first occurrence of `from` in the full metadata with `to`. */
static const char *meta_with(const char *from, const char *to)
{
    static char buf[4096];
    const char *at = strstr(k_meta_full, from);
    ck_assert_ptr_nonnull(at);
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)(at - k_meta_full), k_meta_full, to,
             at + strlen(from));
    return buf;
}

/* The shape of k_small as every config reader must see it (DiT-MoE-S-like, 2 blocks, 4 experts). */
static void expect_k_small_shape(const dm_config *c)
{
    ck_assert_int_eq(c->hidden, 384);
    ck_assert_int_eq(c->depth, 2);
    ck_assert_int_eq(c->heads, 6);
    ck_assert_int_eq(c->num_experts, 4);
    ck_assert_int_eq(c->top_k, 2);
    ck_assert_int_eq(c->expert_hidden, 1536);
    ck_assert_int_eq(c->shared_hidden, 768);
    ck_assert_int_eq(c->patch, 2);
    ck_assert_int_eq(c->input_size, 8);
    ck_assert_int_eq(c->in_channels, 4);
    ck_assert_int_eq(c->out_channels, 8);
    ck_assert_int_eq(c->learn_sigma, 1);
    ck_assert_int_eq(c->num_classes, 10);
}

START_TEST(config_metadata)
{
    dm_config c;
    ck_assert_msg(config_of("m.safetensors", &k_small, k_meta_full, &c) == DM_OK, "%s",
                  dm_last_error());
    ck_assert_int_eq(c.arch, DM_ARCH_DITMOE);
    ck_assert_int_eq(c.attn, DM_ATTN_TIMM);
    ck_assert_str_eq(c.name, "tiny");
    expect_k_small_shape(&c);
    ck_assert_ptr_nonnull(c.class_names);
    ck_assert_str_eq(c.class_names[9], "Ankle boot");
    ck_assert_int_eq(c.objective, DM_OBJ_DDPM);
    ck_assert(c.vae_scale == 0.5f);
    ck_assert_int_eq(c.default_sampler, DM_SAMPLER_DDIM);
    ck_assert_int_eq(c.default_steps, 30);
    ck_assert(c.default_cfg_scale == 1.5f);
    ck_assert_int_eq(c.cfg_channels, 4);

    /* class ids */
    int id;
    ck_assert_int_eq(dm_config_class_id(&c, "7", &id), DM_OK);
    ck_assert_int_eq(id, 7);
    ck_assert_int_eq(dm_config_class_id(&c, "0", &id), DM_OK);
    ck_assert_int_eq(id, 0);
    ck_assert_int_eq(dm_config_class_id(&c, "ankle boot", &id), DM_OK);
    ck_assert_int_eq(id, 9);
    ck_assert_int_eq(dm_config_class_id(&c, "Ankle_Boot", &id), DM_OK);
    ck_assert_int_eq(id, 9);
    ck_assert_int_eq(dm_config_class_id(&c, "ankle-boot", &id), DM_OK);
    ck_assert_int_eq(id, 9);
    ck_assert_int_eq(dm_config_class_id(&c, "t-shirt_top", &id), DM_OK);
    ck_assert_int_eq(id, 0);
    ck_assert_int_eq(dm_config_class_id(&c, "T-SHIRT/TOP", &id), DM_OK);
    ck_assert_int_eq(id, 0);
    expect_err(dm_config_class_id(&c, "10", &id), "0..9", "\"Ankle boot\"");
    ck_assert_int_eq(id, -1);
    expect_err(dm_config_class_id(&c, "-1", &id), "out of range", "0..9");
    expect_err(dm_config_class_id(&c, "boot", &id), "unknown class \"boot\"", "\"Trouser\"");
    dm_config_free(&c);
    ck_assert_ptr_null(c.class_names);

    /* ImageNet-style names: comma-separated synonyms match; an over-long name (67 bytes) is cut
     * after the last whole synonym that fits in DM_MAX_CLASS_NAME - 1 bytes */
    const char *m2 = meta_with("\"Shirt\"",
                               "\"lesser panda, red panda, panda, bear cat, cat bear, Ailurus fulgens\"");
    ck_assert_msg(config_of("m2.safetensors", &k_small, m2, &c) == DM_OK, "%s", dm_last_error());
    ck_assert_str_eq(c.class_names[6], "lesser panda, red panda, panda, bear cat, cat bear");
    ck_assert_int_eq(dm_config_class_id(&c, "Red Panda", &id), DM_OK);
    ck_assert_int_eq(id, 6);
    ck_assert_int_eq(dm_config_class_id(&c, "cat_bear", &id), DM_OK);
    ck_assert_int_eq(id, 6);
    expect_err(dm_config_class_id(&c, "panda, bear", &id), "unknown class", NULL);
    dm_config_free(&c);

    /* sampling defaults from the objective; class_names optional */
    const char *rf = "{\"hidden_size\": 64, \"depth\": 3, \"num_heads\": 4, \"num_experts\": 2,"
                     " \"top_k\": 1, \"expert_hidden\": 256, \"shared_hidden\": 0, \"attention\":"
                     " \"qknorm\", \"patch_size\": 1, \"input_size\": 4, \"in_channels\": 3,"
                     " \"learn_sigma\": false, \"num_classes\": 5, \"objective\": \"rf\"}";
    ck_assert_msg(config_of("rf.safetensors", &k_qk, rf, &c) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(c.attn, DM_ATTN_QKNORM);
    ck_assert_int_eq(c.objective, DM_OBJ_RF);
    ck_assert_int_eq(c.out_channels, 3);
    expect_sampling(&c, DM_SAMPLER_EULER, 50, 4.0f, 0);
    ck_assert(fabsf(c.vae_scale - 0.18215f) < 1e-7f);
    ck_assert_ptr_null(c.class_names);
    ck_assert_int_eq(dm_config_class_id(&c, "4", &id), DM_OK);
    expect_err(dm_config_class_id(&c, "5", &id), "0..4", NULL);
    expect_err(dm_config_class_id(&c, "cat", &id), "0..4", "no class names");
    dm_config_free(&c);
}
END_TEST

START_TEST(config_metadata_invalid)
{
    dm_config c;
    static const struct {
        const char *from, *to, *w1, *w2;
    } cases[] = {
        {"\"num_heads\": 6", "\"num_heads\": 5", "num_heads", "not divisible"},
        {"\"num_heads\": 6", "\"num_heads\": 0", "num_heads", ">= 1"},
        {"\"depth\": 2", "\"depth\": -2", "depth", NULL},
        {"\"hidden_size\": 384,", "", "hidden_size: missing", NULL},
        {"\"top_k\": 2", "\"top_k\": 5", "top_k", "found 5"},
        {"\"top_k\": 2", "\"top_k\": 0", "top_k", NULL},
        {"\"top_k\": 2", "\"top_k\": 1.5", "top_k", NULL},
        {"\"attention\": \"timm\"", "\"attention\": \"flash\"", "attention", "\"flash\""},
        {"\"objective\": \"ddpm\"", "\"objective\": \"edm\"", "objective", "\"edm\""},
        {"\"arch\": \"dit-moe\"", "\"arch\": \"dit\"", "arch", NULL},
        {"\"format_version\": 1", "\"format_version\": 2", "format_version", NULL},
        {"\"Bag\", ", "", "class_names", "10 strings"},
        {"\"learn_sigma\": true", "\"learn_sigma\": 1", "learn_sigma", NULL},
        {"\"vae_scale\": 0.5", "\"vae_scale\": -1", "vae_scale", NULL},
        {"\"sampler\": \"ddim\"", "\"sampler\": \"dpm\"", "sampling.sampler", "\"dpm\""},
        {"\"cfg_channels\": 4", "\"cfg_channels\": 9", "cfg_channels", NULL},
        {"\"input_size\": 8", "\"input_size\": 7", "input_size", NULL},
        /* valid metadata that contradicts the tensors */
        {"\"num_experts\": 4", "\"num_experts\": 8", "blocks.0.moe.gate.weight",
         "shape [4,384] expected [8,384]"},
        {"\"depth\": 2", "\"depth\": 3", "block count 2 expected depth 3", NULL},
        {"\"in_channels\": 4", "\"in_channels\": 8", "x_embedder.proj.weight",
         "expected [384,8,2,2]"},
        {"\"in_channels\": 4", "\"in_channels\": 3", "cfg_channels", "expected 0..3, found 4"},
        {"\"input_size\": 8", "\"input_size\": 16", "pos_embed", "expected [1,64,384]"},
        {"\"attention\": \"timm\"", "\"attention\": \"qknorm\"",
         "missing tensor blocks.0.attn.Wqkv.weight", NULL},
        {"\"expert_hidden\": 1536", "\"expert_hidden\": 1024", "blocks.0.moe.experts.3.gate_proj",
         NULL},
        {"\"shared_hidden\": 768", "\"shared_hidden\": 0", "shared_experts", "shared_hidden is 0"},
        {"\"learn_sigma\": true", "\"learn_sigma\": false", "final_layer.linear.weight", NULL},
        {"\"num_classes\": 10", "\"num_classes\": 11", "class_names", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dm_status st = config_of("bad.safetensors", &k_small, meta_with(cases[i].from, cases[i].to), &c);
        ck_assert_msg(st != DM_OK, "case %zu (%s) accepted", i, cases[i].to);
        expect_err(st, "bad.safetensors", cases[i].w1);
        if (cases[i].w2) expect_err(st, cases[i].w2, NULL);
        ck_assert_ptr_null(c.class_names);
    }
    /* metadata that is not JSON */
    expect_err(config_of("nj.safetensors", &k_small, "{oops", &c), "nj.safetensors",
               "not a JSON object");
}
END_TEST

START_TEST(config_inferred)
{
    dm_config c;
    /* timm layout, released hidden size 384 -> 6 heads, DDPM */
    ck_assert_msg(config_of("inf.safetensors", &k_small, NULL, &c) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(c.arch, DM_ARCH_DITMOE);
    ck_assert_int_eq(c.attn, DM_ATTN_TIMM);
    expect_k_small_shape(&c);
    ck_assert_ptr_null(c.class_names);
    ck_assert_int_eq(c.objective, DM_OBJ_DDPM);
    expect_sampling(&c, DM_SAMPLER_DDPM, 250, 4.0f, 3);
    ck_assert(fabsf(c.vae_scale - 0.18215f) < 1e-7f);
    ck_assert_str_eq(c.name, "DiT-MoE-S/2-4E2A");
    dm_config_free(&c);

    /* qk-norm layout, no shared expert, no learned sigma; hidden 64 is not in the released table
     * so the head count comes from q_norm's size (64 / 16 = 4); RF objective */
    ck_assert_msg(config_of("infq.safetensors", &k_qk, NULL, &c) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(c.attn, DM_ATTN_QKNORM);
    ck_assert_int_eq(c.hidden, 64);
    ck_assert_int_eq(c.depth, 3);
    ck_assert_int_eq(c.heads, 4);
    ck_assert_int_eq(c.num_experts, 2);
    ck_assert_int_eq(c.expert_hidden, 256);
    ck_assert_int_eq(c.shared_hidden, 0);
    ck_assert_int_eq(c.patch, 1);
    ck_assert_int_eq(c.input_size, 4);
    ck_assert_int_eq(c.in_channels, 3);
    ck_assert_int_eq(c.out_channels, 3);
    ck_assert_int_eq(c.learn_sigma, 0);
    ck_assert_int_eq(c.num_classes, 5);
    ck_assert_int_eq(c.objective, DM_OBJ_RF);
    expect_sampling(&c, DM_SAMPLER_EULER, 50, 4.0f, 0);
    dm_config_free(&c);

    /* qk-norm, released size 1152 (16 heads) but q_norm says 64 -> mismatch named */
    mspec bad = k_qk;
    bad.D = 1152;
    bad.hd = 64;
    bad.L = 1;
    expect_err(config_of("infx.safetensors", &bad, NULL, &c), "infx.safetensors",
               "blocks.0.attn.q_norm.weight: shape [64] expected [72]");
    /* timm layout with a hidden size outside the table */
    mspec odd = k_small;
    odd.D = 256;
    expect_err(config_of("inf256.safetensors", &odd, NULL, &c),
               "inf256.safetensors: cannot infer num_heads for hidden size 256; convert with --heads",
               NULL);
    /* output rows that are neither C nor 2C */
    odd = k_small;
    odd.out = 5;
    expect_err(config_of("infout.safetensors", &odd, NULL, &c), "final_layer.linear.weight", NULL);
    /* ProMoE keys are detected */
    mspec pro = k_small;
    pro.promoe = 1;
    ck_assert_msg(config_of("pro.safetensors", &pro, NULL, &c) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(c.arch, DM_ARCH_PROMOE);
    ck_assert_int_eq(c.depth, 2);
    ck_assert_int_eq(c.hidden, 384);
    ck_assert_int_eq(c.num_experts, 12);
    ck_assert_int_eq(c.top_k, 1);
    ck_assert_int_eq(c.expert_hidden, 768);
    ck_assert_int_eq(c.shared_hidden, 768);
    ck_assert_int_eq(c.mlp_hidden, 1536);
    ck_assert_int_eq(c.moe_interleave, 1);
    ck_assert_int_eq(c.objective, DM_OBJ_RF);
    ck_assert_float_eq(c.time_scale, 1000.0f);
    expect_sampling(&c, DM_SAMPLER_EULER, 250, 1.5f, 0); /* ProMoE's reference settings */
    dm_config_free(&c);
    /* a file without the model tensors */
    write_st(tpath("empty.safetensors"), "{}", NULL, 0);
    dm_st_file *f;
    ck_assert_int_eq(dm_st_open(tpath("empty.safetensors"), &f), DM_OK);
    expect_err(dm_config_from_file(f, &c), "empty.safetensors: missing tensor x_embedder.proj.weight",
               NULL);
    dm_st_close(f);
}
END_TEST

START_TEST(enum_names)
{
    ck_assert_str_eq(dm_arch_name(DM_ARCH_DITMOE), "dit-moe");
    ck_assert_str_eq(dm_arch_name(DM_ARCH_PROMOE), "promoe");
    ck_assert_str_eq(dm_objective_name(DM_OBJ_DDPM), "ddpm");
    ck_assert_str_eq(dm_objective_name(DM_OBJ_RF), "rf");
    dm_objective o;
    ck_assert_int_eq(dm_objective_from_name("rf", &o), 0);
    ck_assert_int_eq(o, DM_OBJ_RF);
    ck_assert_int_eq(dm_objective_from_name("ddpm", &o), 0);
    ck_assert_int_eq(o, DM_OBJ_DDPM);
    ck_assert_int_eq(dm_objective_from_name("edm", &o), -1);
    const char *acts[] = {"identity", "softmax", "sigmoid"};
    for (int i = 0; i < DM_ROUTER_COUNT; i++) {
        dm_router_act a;
        ck_assert_str_eq(dm_router_act_name((dm_router_act)i), acts[i]);
        ck_assert_int_eq(dm_router_act_from_name(acts[i], &a), 0);
        ck_assert_int_eq(a, i);
    }
    dm_router_act a;
    ck_assert_int_eq(dm_router_act_from_name("relu", &a), -1);
    ck_assert_str_eq(dm_router_act_name(DM_ROUTER_COUNT), "?");
    /* values load.c relies on (it casts router_act to the gate's activation) */
    ck_assert_int_eq(DM_ROUTER_IDENTITY, 0);
    ck_assert_int_eq(DM_ROUTER_SOFTMAX, 1);
    ck_assert_int_eq(DM_ROUTER_SIGMOID, 2);
}
END_TEST

/* ---------------------------------------------------------------------------------------------
 * PNG
 * ------------------------------------------------------------------------------------------- */
/* Read back with libpng's classic API: pixels [h, w, ch] and the tEXt chunks. */
static uint8_t *read_png(const char *path, int *w, int *h, int *ch, png_textp *text, int *ntext,
                         png_structp *ps, png_infop *pi)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    png_init_io(png, f);
    png_read_png(png, info, PNG_TRANSFORM_IDENTITY, NULL);
    fclose(f);
    *w = (int)png_get_image_width(png, info);
    *h = (int)png_get_image_height(png, info);
    *ch = png_get_channels(png, info);
    ck_assert_int_eq(png_get_bit_depth(png, info), 8);
    png_bytepp rows = png_get_rows(png, info);
    uint8_t *pix = malloc((size_t)*w * *h * *ch);
    for (int y = 0; y < *h; y++) memcpy(pix + (size_t)y * *w * *ch, rows[y], (size_t)*w * *ch);
    *ntext = 0;
    png_get_text(png, info, text, ntext);
    *ps = png;
    *pi = info;
    return pix;
}

START_TEST(png_write_read)
{
    for (int ch = 1; ch <= 4; ch++) {
        if (ch == 2) continue;
        int W = 7, H = 5;
        uint8_t pix[7 * 5 * 4];
        for (int i = 0; i < W * H * ch; i++) pix[i] = (uint8_t)(i * 29 + ch);
        const char *text[] = {"seed", "42", "prompt", "class 207 golden retriever", "cfg", "4.0",
                              NULL};
        const char *p = tpath("img.png");
        ck_assert_msg(dm_png_write(p, W, H, ch, pix, ch == 4 ? NULL : text) == DM_OK, "%s",
                      dm_last_error());
        int w, h, c, nt;
        png_textp tx;
        png_structp ps;
        png_infop pi;
        uint8_t *back = read_png(p, &w, &h, &c, &tx, &nt, &ps, &pi);
        ck_assert_int_eq(w, W);
        ck_assert_int_eq(h, H);
        ck_assert_int_eq(c, ch);
        ck_assert(memcmp(back, pix, (size_t)W * H * ch) == 0);
        if (ch == 4) {
            ck_assert_int_eq(nt, 0);
        } else {
            ck_assert_int_eq(nt, 3);
            for (int i = 0; i < 3; i++) {
                ck_assert_str_eq(tx[i].key, text[2 * i]);
                ck_assert_str_eq(tx[i].text, text[2 * i + 1]);
                ck_assert_int_eq(tx[i].compression, PNG_TEXT_COMPRESSION_NONE);
            }
        }
        png_destroy_read_struct(&ps, &pi, NULL);
        free(back);
    }
    ck_assert_int_eq(count_tmp_files(), 0);
    uint8_t px[4] = {0};
    const char *badkey[] = {"", "v", NULL};
    expect_err(dm_png_write(tpath("k.png"), 2, 2, 1, px, badkey), "k.png", "tEXt key");
}
END_TEST

START_TEST(image_to_u8)
{
    /* clamp(127.5 x + 128, 0, 255) truncated; [C=2,H=1,W=4] -> [H,W,C] */
    float chw[8] = {-1.0f, 0.0f, 1.0f, 0.5f, -2.0f, 2.0f, NAN, -0.9f};
    uint8_t out[8];
    dm_image_to_u8(2, 1, 4, chw, out);
    /* -1 -> 0.5 -> 0; 0 -> 128; 1 -> 255.5 -> 255; 0.5 -> 191.75 -> 191;
     * -2 -> 0; 2 -> 255; NaN -> 0; -0.9 -> 13.25 -> 13 */
    uint8_t want[8] = {0, 0, 128, 255, 255, 0, 191, 13};
    for (int i = 0; i < 8; i++) ck_assert_msg(out[i] == want[i], "%d: %d vs %d", i, out[i], want[i]);
}
END_TEST

/* Mutated files never crash the readers (run under ASan/UBSan by scripts/test.sh): flip bytes in
 * a valid safetensors header and a valid .npy header; either an error or a consistent file. */
START_TEST(mutated_files_are_safe)
{
    const char *hdr = "{\"__metadata__\":{\"ditmoe\":\"{}\"},"
                      "\"a\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[12,24]}}";
    size_t hl = strlen(hdr);
    unsigned char img[8 + 256 + 24];
    for (int i = 0; i < 8; i++) img[i] = (unsigned char)(hl >> (8 * i));
    memcpy(img + 8, hdr, hl);
    memset(img + 8 + hl, 0x3C, 24);
    size_t n = 8 + hl + 24;
    uint64_t r = 12345;
    for (int it = 0; it < 400; it++) {
        unsigned char m[sizeof img];
        memcpy(m, img, n);
        for (int k = 0; k < 1 + it % 3; k++) {
            r = r * 6364136223846793005ULL + 1442695040888963407ULL;
            size_t at = (size_t)(r >> 33) % (8 + hl);
            m[at] = (unsigned char)(r >> 20);
        }
        size_t len = it % 7 == 0 ? (size_t)(r >> 40) % n : n;
        write_raw(tpath("mut.safetensors"), m, len);
        dm_st_file *f;
        if (dm_st_open(tpath("mut.safetensors"), &f) != DM_OK) continue;
        for (int i = 0; i < dm_st_count(f); i++) {
            const dm_st_tensor *t = dm_st_at(f, i);
            float *x;
            if (dm_st_load_f32(f, t->name, t->ndim, t->shape, &x) == DM_OK) free(x);
        }
        dm_config c;
        if (dm_config_from_file(f, &c) == DM_OK) dm_config_free(&c);
        dm_st_close(f);
    }
    float v[6] = {1, 2, 3, 4, 5, 6};
    int64_t s23[2] = {2, 3};
    ck_assert_int_eq(dm_npy_write(tpath("good.npy"), DM_F32, 2, s23, v), DM_OK);
    FILE *fp = fopen(tpath("good.npy"), "rb");
    unsigned char nb[128 + 24];
    size_t nn = fread(nb, 1, sizeof nb, fp);
    fclose(fp);
    for (int it = 0; it < 400; it++) {
        unsigned char m[sizeof nb];
        memcpy(m, nb, nn);
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        m[(size_t)(r >> 33) % 128] = (unsigned char)(r >> 20);
        write_raw(tpath("mut.npy"), m, it % 5 == 0 ? (size_t)(r >> 40) % nn : nn);
        dm_npy a;
        if (dm_npy_read(tpath("mut.npy"), &a) == DM_OK) {
            ck_assert_uint_eq(a.count * dm_dtype_size(a.dtype) <= 24, 1);
            dm_npy_free(&a);
        }
    }
}
END_TEST

static Suite *io_suite(void)
{
    Suite *s = suite_create("io");
    TCase *tc = tcase_create("io");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, st_good_file);
    tcase_add_test(tc, st_bad_files);
    tcase_add_test(tc, f16_bf16_rounding);
    tcase_add_test(tc, npy_read_handmade);
    tcase_add_test(tc, npy_round_trip);
    tcase_add_test(tc, npy_rejects);
    tcase_add_test(tc, npy_numpy_interop);
    tcase_add_test(tc, atomic_write_failures);
    tcase_add_test(tc, config_metadata);
    tcase_add_test(tc, config_metadata_invalid);
    tcase_add_test(tc, config_inferred);
    tcase_add_test(tc, enum_names);
    tcase_add_test(tc, png_write_read);
    tcase_add_test(tc, image_to_u8);
    tcase_add_test(tc, mutated_files_are_safe);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(io_suite());
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

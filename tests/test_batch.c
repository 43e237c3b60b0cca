/* Batch-generation library tests (Check): SHA-256 against the FIPS 180-2 example vectors, CRC-32
 * against its published check values and the bitwise reference, the index -> class draw (spec'd
 * Philox keying, exact uniformity, balance), the resume scan, the manifest check, the .npy header
 * and the zip writer's own records. numpy / zipfile interop is tests/test_batch_cli.py. */
#include "batch/batch.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void hex(const uint8_t *d, char out[65])
{
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static void sha_str(const void *msg, size_t n, char out[65])
{
    dm_sha256_ctx c;
    uint8_t d[32];
    dm_sha256_init(&c);
    dm_sha256_update(&c, msg, n);
    dm_sha256_final(&c, d);
    hex(d, out);
}

/* FIPS 180-2 appendix B.1, B.2, B.3 (and the empty message, FIPS 180-4 examples). */
START_TEST(test_sha256_fips)
{
    char h[65];
    sha_str("abc", 3, h);
    ck_assert_str_eq(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha_str(two, strlen(two), h);
    ck_assert_str_eq(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    sha_str("", 0, h);
    ck_assert_str_eq(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    /* one million 'a', fed in uneven pieces (exercises the partial-block path) */
    dm_sha256_ctx c;
    uint8_t d[32];
    char *a = malloc(1000000);
    memset(a, 'a', 1000000);
    dm_sha256_init(&c);
    size_t off = 0, step = 1;
    while (off < 1000000) {
        size_t k = 1000000 - off < step ? 1000000 - off : step;
        dm_sha256_update(&c, a + off, k);
        off += k;
        step = step * 3 % 1013 + 1;
    }
    dm_sha256_final(&c, d);
    hex(d, h);
    ck_assert_str_eq(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* the file form */
    char path[] = "/tmp/ditmoe-test-sha-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, a, 1000000), 1000000);
    close(fd);
    ck_assert_int_eq(dm_sha256_file(path, h), DM_OK);
    ck_assert_str_eq(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    unlink(path);
    ck_assert_int_eq(dm_sha256_file(path, h), DM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), path));
    free(a);
}
END_TEST

/* Padding edge cases: lengths around the 55/56/64-byte boundaries, one-shot vs byte by byte. */
START_TEST(test_sha256_boundaries)
{
    uint8_t msg[130];
    for (int i = 0; i < 130; i++) msg[i] = (uint8_t)(i * 7 + 1);
    for (size_t n = 50; n <= 130; n++) {
        char h1[65], h2[65];
        sha_str(msg, n, h1);
        dm_sha256_ctx c;
        uint8_t d[32];
        dm_sha256_init(&c);
        for (size_t i = 0; i < n; i++) dm_sha256_update(&c, msg + i, 1);
        dm_sha256_final(&c, d);
        hex(d, h2);
        ck_assert_msg(!strcmp(h1, h2), "length %zu", n);
    }
}
END_TEST

START_TEST(test_crc32_known)
{
    /* The CRC-32 (ISO-HDLC) catalogue check value, and two widely published values. */
    ck_assert_uint_eq(dm_crc32(0, "123456789", 9), 0xCBF43926u);
    ck_assert_uint_eq(dm_crc32_naive(0, "123456789", 9), 0xCBF43926u);
    const char *fox = "The quick brown fox jumps over the lazy dog";
    ck_assert_uint_eq(dm_crc32(0, fox, strlen(fox)), 0x414FA339u);
    ck_assert_uint_eq(dm_crc32_naive(0, fox, strlen(fox)), 0x414FA339u);
    ck_assert_uint_eq(dm_crc32(0, "", 0), 0u);
    /* PNG's IEND chunk: CRC over "IEND" is ae 42 60 82 (in every PNG file). */
    ck_assert_uint_eq(dm_crc32(0, "IEND", 4), 0xAE426082u);
}
END_TEST

START_TEST(test_crc32_fast_vs_naive)
{
    uint8_t buf[4099];
    uint32_t s = 12345;
    for (size_t i = 0; i < sizeof buf; i++) {
        s = s * 1664525u + 1013904223u;
        buf[i] = (uint8_t)(s >> 24);
    }
    for (size_t n = 0; n < 70; n++)
        ck_assert_uint_eq(dm_crc32(0, buf + 1, n), dm_crc32_naive(0, buf + 1, n));
    const uint32_t whole = dm_crc32_naive(0, buf, sizeof buf);
    ck_assert_uint_eq(dm_crc32(0, buf, sizeof buf), whole);
    /* running form: any split gives the same CRC */
    for (size_t cut = 0; cut < sizeof buf; cut += 397)
        ck_assert_uint_eq(dm_crc32(dm_crc32(0, buf, cut), buf + cut, sizeof buf - cut), whole);
}
END_TEST

/* ---------------------------------------------------------------- classes */

START_TEST(test_class_modes)
{
    dm_batch_classes c = {.mode = DM_BATCH_BALANCED, .num_classes = 7};
    for (uint64_t i = 0; i < 100; i++) ck_assert_int_eq(dm_batch_class_of(&c, 5, i), (int)(i % 7));
    int list[3] = {4, 1, 4};
    dm_batch_classes l = {.mode = DM_BATCH_LIST, .num_classes = 7, .nlist = 3, .list = list};
    for (uint64_t i = 0; i < 30; i++)
        ck_assert_int_eq(dm_batch_class_of(&l, 5, i), list[i % 3]);
    char buf[64];
    dm_batch_classes_str(&l, buf, sizeof buf);
    ck_assert_str_eq(buf, "4,1,4");
    dm_batch_classes_str(&c, buf, sizeof buf);
    ck_assert_str_eq(buf, "balanced");
}
END_TEST

/* For K a power of two nothing is rejected, so the class is the top log2(K) bits of word 0 of
 * the documented Philox block: checks the keying is the documented one (and not the noise's). */
START_TEST(test_class_random_keying)
{
    dm_batch_classes c = {.mode = DM_BATCH_RANDOM, .num_classes = 8};
    const uint64_t seeds[3] = {0, 42, 0x123456789abcull};
    for (int s = 0; s < 3; s++)
        for (uint64_t i = 0; i < 50; i++) {
            const uint64_t idx = i * 0x10000001ull; /* high word too */
            const uint32_t key[2] = {(uint32_t)seeds[s] ^ 0x9e3779b9u,
                                     (uint32_t)(seeds[s] >> 32) ^ 0xbb67ae85u};
            const uint32_t ctr[4] = {0, 0x636c6173u, (uint32_t)idx, (uint32_t)(idx >> 32)};
            uint32_t w[4];
            dm_philox4x32(ctr, key, w);
            ck_assert_int_eq(dm_batch_class_of(&c, seeds[s], idx), (int)(w[0] >> 29));
        }
}
END_TEST

/* Uniform over K (chi-square), deterministic, and different seeds differ. */
START_TEST(test_class_random_uniform)
{
    const int Ks[3] = {10, 1000, 3};
    for (int t = 0; t < 3; t++) {
        const int K = Ks[t];
        const int n = 200000;
        dm_batch_classes c = {.mode = DM_BATCH_RANDOM, .num_classes = K};
        long *cnt = calloc((size_t)K, sizeof(long));
        int same_other_seed = 0;
        for (int i = 0; i < n; i++) {
            int k = dm_batch_class_of(&c, 7, (uint64_t)i);
            ck_assert(k >= 0 && k < K);
            ck_assert_int_eq(k, dm_batch_class_of(&c, 7, (uint64_t)i));
            cnt[k]++;
            same_other_seed += k == dm_batch_class_of(&c, 8, (uint64_t)i);
        }
        const double e = (double)n / K;
        double chi = 0;
        for (int k = 0; k < K; k++) chi += (cnt[k] - e) * (cnt[k] - e) / e;
        /* chi-square with K-1 dof: mean K-1, sd sqrt(2(K-1)); allow 6 sd */
        ck_assert_msg(chi < (K - 1) + 6 * sqrt(2.0 * (K - 1)) + 10, "K %d chi2 %g", K, chi);
        /* another seed agrees only by chance, ~n/K times */
        ck_assert_msg(fabs(same_other_seed - e) < 6 * sqrt(e) + 10, "K %d: %d agreements", K,
                      same_other_seed);
        free(cnt);
    }
}
END_TEST

/* ---------------------------------------------------------------- files */

static void touch(const char *dir, const char *name)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    ck_assert_ptr_nonnull(f);
    fputs("x", f);
    fclose(f);
}

static int exists(const char *dir, const char *name)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

START_TEST(test_scan_and_clean)
{
    char dir[] = "/tmp/ditmoe-test-scan-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    const char *names[] = {"000000.png", "000003.png", "000004.png", "000009.png", "000010.png",
                           "0000001.png", "000002.png.tmp.77", "000005.png.tmp.78",
                           "manifest.json.tmp.5", "notes.txt", "00001.png", "000006.pngx", NULL};
    for (int i = 0; names[i]; i++) touch(dir, names[i]);
    uint8_t done[10];
    int64_t n = -1;
    /* shard 0 of 2 cleans temp files of even indices and the manifest's */
    ck_assert_int_eq(dm_batch_scan(dir, 10, done, &n, 0, 2), DM_OK);
    ck_assert_int_eq(n, 4); /* 0, 3, 4, 9 (10 is past N; the others are not our names) */
    const uint8_t want[10] = {1, 0, 0, 1, 1, 0, 0, 0, 0, 1};
    ck_assert(!memcmp(done, want, 10));
    ck_assert(!exists(dir, "000002.png.tmp.77"));
    ck_assert(exists(dir, "000005.png.tmp.78")); /* shard 1's */
    ck_assert(!exists(dir, "manifest.json.tmp.5"));
    ck_assert(exists(dir, "notes.txt") && exists(dir, "0000001.png"));
    ck_assert_int_eq(dm_batch_scan(dir, 10, NULL, &n, 1, 2), DM_OK);
    ck_assert(!exists(dir, "000005.png.tmp.78"));
    char p[600];
    dm_batch_png_path(dir, 1234567, p, sizeof p);
    ck_assert_ptr_nonnull(strstr(p, "/1234567.png"));
    dm_batch_png_path(dir, 12, p, sizeof p);
    ck_assert_ptr_nonnull(strstr(p, "/000012.png"));
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
    ck_assert_int_eq(dm_batch_scan("/nonexistent-ditmoe", 10, done, &n, -1, 1), DM_ERR_IO);
}
END_TEST

static dm_batch_params params(void)
{
    dm_batch_params p;
    memset(&p, 0, sizeof p);
    snprintf(p.model_file, sizeof p.model_file, "m.safetensors");
    snprintf(p.vae_file, sizeof p.vae_file, "v.safetensors");
    memset(p.model_sha256, 'a', 64);
    memset(p.vae_sha256, 'b', 64);
    p.seed = 18446744073709551615ull; /* 2^64-1: must survive JSON */
    snprintf(p.sampler, sizeof p.sampler, "ddpm");
    p.steps = 250;
    p.cfg_scale = 1.5f;
    p.cfg_channels = 3;
    p.cfg_t_lo = 0.1f;
    p.cfg_t_hi = 0.7f;
    p.eta = 0;
    snprintf(p.classes, sizeof p.classes, "random");
    p.num_classes = 1000;
    p.num = 50000;
    p.width = p.height = 256;
    p.channels = 3;
    return p;
}

START_TEST(test_manifest)
{
    char dir[] = "/tmp/ditmoe-test-man-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    dm_batch_params p = params(), q;
    int found = -1;
    ck_assert_int_eq(dm_batch_manifest_check(dir, &p, &found), DM_OK);
    ck_assert_int_eq(found, 0);
    ck_assert_int_eq(dm_batch_manifest_write(dir, &p, 17), DM_OK);
    ck_assert_int_eq(dm_batch_manifest_check(dir, &p, &found), DM_OK);
    ck_assert_int_eq(found, 1);
    ck_assert_int_eq(dm_batch_manifest_read(dir, &q), DM_OK);
    ck_assert_int_eq(q.num, 50000);
    ck_assert_str_eq(q.classes, "random");
    /* each parameter change is refused, naming its flag */
    struct {
        const char *flag;
        void (*mutate)(dm_batch_params *);
    } cases[] = {
        {"--seed", NULL}, {"--steps", NULL}, {"--cfg-scale", NULL}, {"--model", NULL},
        {"--vae", NULL}, {"--classes", NULL}, {"--num", NULL}, {"--cfg-interval", NULL},
        {"--sampler", NULL}, {"--cfg-channels", NULL}, {"image size", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dm_batch_params r = params();
        switch (i) {
        case 0: r.seed -= 1; break; /* differs only past 2^53 */
        case 1: r.steps = 251; break;
        case 2: r.cfg_scale = 1.5000001f; break;
        case 3: r.model_sha256[63] = 'c'; break;
        case 4: r.vae_sha256[0] = 'c'; break;
        case 5: snprintf(r.classes, sizeof r.classes, "balanced"); break;
        case 6: r.num = 50001; break;
        case 7: r.cfg_t_hi = 0.8f; break;
        case 8: snprintf(r.sampler, sizeof r.sampler, "ddim"); break;
        case 9: r.cfg_channels = 0; break;
        case 10: r.width = 128; break;
        }
        ck_assert_int_eq(dm_batch_manifest_check(dir, &r, &found), DM_ERR_ARG);
        ck_assert_msg(strstr(dm_last_error(), cases[i].flag) != NULL, "case %s: %s",
                      cases[i].flag, dm_last_error());
    }
    /* informational names are not compared */
    dm_batch_params r = params();
    snprintf(r.model_file, sizeof r.model_file, "renamed.safetensors");
    ck_assert_int_eq(dm_batch_manifest_check(dir, &r, &found), DM_OK);
    /* a broken manifest is a format error, not a crash */
    char path[600];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    FILE *f = fopen(path, "wb");
    fputs("{\"format\": \"ditmoe-batch\", \"params\": [", f);
    fclose(f);
    ck_assert_int_eq(dm_batch_manifest_check(dir, &p, &found), DM_ERR_FORMAT);
    f = fopen(path, "wb");
    fputs("{\"something\": 1}", f);
    fclose(f);
    ck_assert_int_eq(dm_batch_manifest_check(dir, &p, &found), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "not a ditmoe-batch manifest"));
    f = fopen(path, "wb");
    fputs("{\"format\": \"ditmoe-batch\", \"version\": 1}", f);
    fclose(f);
    ck_assert_int_eq(dm_batch_manifest_check(dir, &p, &found), DM_ERR_ARG); /* fields missing */
    ck_assert_int_eq(dm_batch_manifest_read(dir, &q), DM_ERR_FORMAT);
    unlink(path);
    rmdir(dir);
}
END_TEST

/* ---------------------------------------------------------------- npy / zip */

START_TEST(test_npy_header)
{
    char buf[256];
    const int64_t s4[4] = {50000, 256, 256, 3}, s1[1] = {7};
    size_t n = dm_npy_header("|u1", 4, s4, buf, sizeof buf);
    ck_assert_uint_eq(n % 64, 0);
    ck_assert(!memcmp(buf, "\x93NUMPY\x01\x00", 8));
    ck_assert_uint_eq((uint8_t)buf[8] | (uint8_t)buf[9] << 8, n - 10);
    ck_assert_int_eq(buf[n - 1], '\n');
    ck_assert(!strncmp(buf + 10, "{'descr': '|u1', 'fortran_order': False, 'shape': "
                                 "(50000, 256, 256, 3), }", 69));
    n = dm_npy_header("<i8", 1, s1, buf, sizeof buf);
    ck_assert_uint_eq(n % 64, 0);
    ck_assert_ptr_nonnull(strstr(buf + 10, "'shape': (7,), }"));
    ck_assert_uint_eq(dm_npy_header("<i8", 1, s1, buf, 40), 0); /* too small a buffer */
}
END_TEST

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The zip records, read back by hand: signatures, the patched CRC (vs the naive CRC of the
 * member bytes), ZIP64 locator when forced, and misuse errors. */
START_TEST(test_npz_records)
{
    for (int force = 0; force < 2; force++) {
        char path[] = "/tmp/ditmoe-test-npz-XXXXXX";
        int fd = mkstemp(path);
        close(fd);
        dm_npz *z;
        ck_assert_int_eq(dm_npz_open(path, force, &z), DM_OK);
        const int64_t shape[2] = {3, 5};
        uint8_t data[15];
        for (int i = 0; i < 15; i++) data[i] = (uint8_t)(i * 17);
        ck_assert_int_eq(dm_npz_begin(z, "arr_0", "|u1", 1, 2, shape), DM_OK);
        ck_assert_int_eq(dm_npz_write(z, data, 7), DM_OK);
        ck_assert_int_eq(dm_npz_write(z, data + 7, 9), DM_ERR_ARG); /* past the shape */
        ck_assert_int_eq(dm_npz_write(z, data + 7, 8), DM_OK);
        ck_assert_int_eq(dm_npz_end(z), DM_OK);
        ck_assert_int_eq(dm_npz_close(z), DM_OK);
        FILE *f = fopen(path, "rb");
        uint8_t b[1024];
        size_t n = fread(b, 1, sizeof b, f);
        fclose(f);
        ck_assert_uint_eq(rd32(b), 0x04034b50u);
        const size_t nl = b[26] | b[27] << 8, xl = b[28] | b[29] << 8;
        ck_assert_uint_eq(nl, 9);
        ck_assert(!memcmp(b + 30, "arr_0.npy", 9));
        ck_assert_uint_eq(xl, force ? 20 : 0);
        const uint8_t *member = b + 30 + nl + xl;
        char hdr[256];
        const size_t hl = dm_npy_header("|u1", 2, shape, hdr, sizeof hdr), msize = hl + 15;
        ck_assert_uint_eq(hl, 128); /* 69 bytes rounded up to 64 */
        ck_assert(!memcmp(member, hdr, hl));
        ck_assert_uint_eq(rd32(b + 14), dm_crc32_naive(0, member, msize));
        ck_assert(!memcmp(member + hl, data, 15));
        ck_assert_uint_eq(rd32(b + 22), force ? 0xffffffffu : msize);
        /* end of central directory at the very end (no comment) */
        ck_assert_uint_eq(rd32(b + n - 22), 0x06054b50u);
        if (force) {
            ck_assert_uint_eq(rd32(b + n - 22 - 20), 0x07064b50u);      /* locator */
            ck_assert_uint_eq(rd32(b + n - 22 - 20 - 56), 0x06064b50u); /* ZIP64 end record */
        } else {
            ck_assert_uint_eq(rd32(b + n - 22 - 20) == 0x07064b50u, 0);
        }
        /* misuse is an error, not a corrupt file */
        ck_assert_int_eq(dm_npz_open(path, force, &z), DM_OK);
        ck_assert_int_eq(dm_npz_begin(z, "arr_0", "|u1", 1, 2, shape), DM_OK);
        ck_assert_int_eq(dm_npz_write(z, data, 3), DM_OK);
        ck_assert_int_eq(dm_npz_end(z), DM_ERR_ARG);
        dm_npz_abort(z);
        f = fopen(path, "rb");
        ck_assert_uint_eq(fread(b, 1, sizeof b, f), n); /* the old file is untouched */
        fclose(f);
        unlink(path);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("batch");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_sha256_fips);
    tcase_add_test(tc, test_sha256_boundaries);
    tcase_add_test(tc, test_crc32_known);
    tcase_add_test(tc, test_crc32_fast_vs_naive);
    tcase_add_test(tc, test_class_modes);
    tcase_add_test(tc, test_class_random_keying);
    tcase_add_test(tc, test_class_random_uniform);
    tcase_add_test(tc, test_scan_and_clean);
    tcase_add_test(tc, test_manifest);
    tcase_add_test(tc, test_npy_header);
    tcase_add_test(tc, test_npz_records);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}

/* The generation pipeline and the image writers through the public header only (Check), on the
 * shipped fmnist model and VAE (assets/): open checks and errors, images that do not depend on
 * the batch they are made in, the hooks (progress, latents, initial noise), the metadata list
 * (every field, floats that read back exactly), and JPEG / BMP / PNG output: the COM segment
 * right after SOI, atomic writes, DM_ERR_WRITE for an output that cannot be written. */
#include "ditmoe.h"

#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_model[PATH_MAX], g_vae[PATH_MAX], g_tmp[64];

static void paths(void)
{
    const char *src = getenv("DITMOE_SRC");
    snprintf(g_model, sizeof g_model, "%s/assets/%s", src ? src : "..", DM_DEFAULT_MODEL);
    snprintf(g_vae, sizeof g_vae, "%s/assets/%s", src ? src : "..", DM_DEFAULT_VAE);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/ditmoe-pipeline-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_tmp));
}

static dm_pipeline *open_both(void)
{
    dm_pipeline_opts o;
    dm_pipeline_opts_init(&o);
    o.model_path = g_model;
    o.vae_path = g_vae;
    o.threads = 2;
    dm_pipeline *p = NULL;
    ck_assert_msg(dm_pipeline_open(&o, &p) == DM_OK, "%s", dm_last_error());
    return p;
}

static void params(dm_pipeline *p, dm_sample_params *sp)
{
    dm_sample_params_init(sp, dm_pipeline_config(p));
    sp->steps = 3;
    sp->seed = 42;
}

START_TEST(test_open_errors)
{
    paths();
    dm_pipeline_opts o;
    dm_pipeline_opts_init(&o);
    dm_pipeline *p = (dm_pipeline *)1;
    ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_ERR_ARG); /* no model */
    ck_assert_ptr_null(p);
    char nope[PATH_MAX + 16];
    snprintf(nope, sizeof nope, "%s/nope.safetensors", g_tmp);
    o.model_path = nope;
    ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_ERR_IO);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "nope.safetensors"));
    o.model_path = g_model;
    o.vae_path = nope;
    ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_ERR_IO);
    o.vae_path = g_model; /* a transformer is not a VAE */
    ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_ERR_FORMAT);
    o.vae_path = g_vae;
    if (dm_backend_check(DM_BACKEND_CUDA) != DM_OK) {
        o.backend = DM_BACKEND_CUDA; /* never a silent CPU fallback */
        ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_ERR_ARG);
        ck_assert_ptr_nonnull(strstr(dm_last_error(), "CUDA"));
    }
    /* latents only: no VAE, so no pixels */
    o.backend = DM_BACKEND_CPU;
    o.vae_path = NULL;
    ck_assert_int_eq(dm_pipeline_open(&o, &p), DM_OK);
    const dm_pipeline_info *in = dm_pipeline_get_info(p);
    ck_assert_int_eq(in->channels, 0);
    ck_assert_ptr_null(dm_pipeline_vae(p));
    dm_sample_params sp;
    params(p, &sp);
    int64_t y = 1;
    uint64_t idx = 0;
    uint8_t px[4];
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 1, &y, &idx, NULL, px), DM_ERR_ARG);
    sp.steps = 0;
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 1, &y, &idx, NULL, NULL), DM_ERR_ARG);
    dm_pipeline_free(p);
    rmdir(g_tmp);
}
END_TEST

typedef struct {
    int calls, last, n;
} prog_count;

static void count_step(void *ctx, int step, int nsteps)
{
    prog_count *c = ctx;
    c->calls++;
    c->last = step;
    c->n = nsteps;
}

/* Image i is the same bits whether made alone, in a batch of 3, or second in a batch of 2. */
START_TEST(test_batch_invariant_and_hooks)
{
    paths();
    dm_pipeline *p = open_both();
    const dm_pipeline_info *in = dm_pipeline_get_info(p);
    ck_assert(in->channels == 1 || in->channels == 3);
    ck_assert_int_gt(in->width, in->latent_size);
    dm_sample_params sp;
    params(p, &sp);
    const size_t per = (size_t)in->height * in->width * in->channels;
    const size_t lat = (size_t)in->latent_channels * in->latent_size * in->latent_size;
    uint8_t *a = malloc(3 * per), *b = malloc(3 * per);
    float *za = malloc(3 * lat * sizeof(float)), *zb = malloc(3 * lat * sizeof(float));
    int64_t y[3] = {2, 7, 7};
    uint64_t idx[3] = {5, 6, 7};
    prog_count pc = {0};
    dm_pipeline_hooks h = {count_step, &pc, NULL, NULL, za};
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 3, y, idx, &h, a), DM_OK);
    ck_assert_int_eq(pc.calls, 3);
    ck_assert_int_eq(pc.last, 3);
    h.latents = zb;
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 1, y, idx, &h, b), DM_OK);
    h.latents = zb + lat;
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 2, y + 1, idx + 1, &h, b + per), DM_OK);
    ck_assert(memcmp(a, b, 3 * per) == 0);
    ck_assert(memcmp(za, zb, 3 * lat * sizeof(float)) == 0);
    ck_assert(memcmp(a + per, a + 2 * per, per) != 0); /* same class, other index: other noise */
    /* the initial-noise hook: image 6's own noise given explicitly gives image 6 */
    float *init = malloc(lat * sizeof(float));
    dm_noise_normal(sp.seed, 6, 0, lat, init);
    uint64_t other = 99;
    h.init = init;
    h.latents = NULL;
    ck_assert_int_eq(dm_pipeline_generate(p, &sp, 1, y + 1, &other, &h, b), DM_OK);
    const int deterministic = sp.sampler == DM_SAMPLER_EULER || sp.sampler == DM_SAMPLER_HEUN ||
                              (sp.sampler == DM_SAMPLER_DDIM && sp.eta == 0.0f);
    if (deterministic) ck_assert(memcmp(a + per, b, per) == 0); /* else step noise is keyed too */
    const dm_pipeline_stats *st = dm_pipeline_get_stats(p);
    ck_assert_int_eq(st->images, 7);
    ck_assert_int_gt(st->forwards, 0);
    free(init);
    free(a);
    free(b);
    free(za);
    free(zb);
    dm_pipeline_free(p);
    rmdir(g_tmp);
}
END_TEST

START_TEST(test_gen_text)
{
    paths();
    dm_pipeline *p = open_both();
    dm_sample_params sp;
    params(p, &sp);
    sp.cfg_t_lo = 0.2f;
    sp.cfg_t_hi = 0.75f;
    sp.eta = 0.1234567f;
    sp.cfg_scale = 1.5f;
    sp.seed = 18446744073709551615ull;
    dm_gen_text t;
    dm_gen_text_init(&t, p, &sp, "test 1", 3, 12345678901ull);
    const char *keys[] = {"Software", "ditmoe-version", "model", "vae", "backend", "class",
                          "sampler", "steps", "cfg-scale", "cfg-channels", "cfg-interval", "eta",
                          "seed", "num-train-steps", "image-index"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        ck_assert_msg(dm_gen_text_get(&t, keys[i]) != NULL, "missing %s", keys[i]);
    ck_assert_str_eq(dm_gen_text_get(&t, "cfg-interval"), "0.2,0.75");
    ck_assert_str_eq(dm_gen_text_get(&t, "cfg-scale"), "1.5");
    ck_assert(strtof(dm_gen_text_get(&t, "eta"), NULL) == sp.eta); /* reads back exactly */
    ck_assert_str_eq(dm_gen_text_get(&t, "seed"), "18446744073709551615");
    ck_assert_str_eq(dm_gen_text_get(&t, "image-index"), "12345678901");
    ck_assert_str_eq(dm_gen_text_get(&t, "model"), DM_DEFAULT_MODEL);
    ck_assert_str_eq(dm_gen_text_get(&t, "backend"), "cpu");
    ck_assert_str_eq(dm_gen_text_get(&t, "Software"), "test 1");
    const dm_config *c = dm_pipeline_config(p);
    char want[128];
    if (c->class_names)
        snprintf(want, sizeof want, "3 (%s)", c->class_names[3]);
    else
        snprintf(want, sizeof want, "3");
    ck_assert_str_eq(dm_gen_text_get(&t, "class"), want);
    /* the kv list is the same pairs, NULL-terminated */
    int n = 0;
    while (t.kv[2 * n]) n++;
    ck_assert_int_eq(n, t.n);
    ck_assert_int_eq(dm_gen_text_set(&t, "class", "1,2"), DM_OK);
    ck_assert_int_eq(t.n, n);
    ck_assert_str_eq(dm_gen_text_get(&t, "class"), "1,2");
    ck_assert_int_eq(dm_gen_text_set(&t, "extra", "x"), DM_OK);
    ck_assert_int_eq(t.n, n + 1);
    ck_assert_str_eq(t.kv[2 * n], "extra");
    ck_assert_ptr_null(t.kv[2 * n + 2]);
    dm_gen_text_init(&t, p, &sp, NULL, -1, 0);
    ck_assert_ptr_null(dm_gen_text_get(&t, "class"));
    dm_pipeline_free(p);
    rmdir(g_tmp);
}
END_TEST

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)len + 1);
    *n = fread(b, 1, (size_t)len, f);
    fclose(f);
    return b;
}

START_TEST(test_image_writers)
{
    paths();
    enum { W = 24, H = 16 };
    uint8_t px[W * H * 3];
    for (int i = 0; i < W * H * 3; i++) px[i] = (uint8_t)(i * 7);
    const char *text[] = {"seed", "7", "cfg-interval", "0.2,0.8", NULL};
    char path[PATH_MAX];
    dm_image_format f;
    ck_assert_int_eq(dm_image_format_from_path("a/b.JPG", &f), 0);
    ck_assert_int_eq(f, DM_IMAGE_JPEG);
    ck_assert_int_eq(dm_image_format_from_path("a.bmp", &f), 0);
    ck_assert_int_eq(f, DM_IMAGE_BMP);
    ck_assert_int_eq(dm_image_format_from_path("a.png/b", &f), -1);

    snprintf(path, sizeof path, "%s/a.jpg", g_tmp);
    ck_assert_int_eq(dm_image_write(path, W, H, 3, px, 90, text), DM_OK);
    size_t n;
    uint8_t *b = slurp(path, &n);
    ck_assert_ptr_nonnull(b);
    const char com[] = "seed=7\ncfg-interval=0.2,0.8\n";
    const size_t cl = strlen(com);
    ck_assert(n > 6 + cl && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF && b[3] == 0xFE);
    ck_assert_int_eq((b[4] << 8) | b[5], (int)cl + 2);
    ck_assert(memcmp(b + 6, com, cl) == 0);
    ck_assert(b[6 + cl] == 0xFF && b[n - 2] == 0xFF && b[n - 1] == 0xD9); /* next marker, EOI */
    free(b);
    ck_assert_int_eq(dm_jpeg_write(path, W, H, 3, px, 0, NULL), DM_ERR_ARG);
    ck_assert_int_eq(dm_jpeg_write(path, W, H, 2, px, 90, NULL), DM_ERR_ARG);
    unlink(path);

    snprintf(path, sizeof path, "%s/a.bmp", g_tmp);
    ck_assert_int_eq(dm_image_write(path, W, H, 3, px, 90, text), DM_OK);
    b = slurp(path, &n);
    ck_assert(b && n == 54 + (size_t)H * W * 3 && b[0] == 'B' && b[1] == 'M');
    /* bottom-up BGR rows (24 * 3 bytes: no padding) */
    ck_assert(b[54] == px[(H - 1) * W * 3 + 2] && b[56] == px[(H - 1) * W * 3]);
    free(b);
    unlink(path);

    snprintf(path, sizeof path, "%s/a.tif", g_tmp);
    ck_assert_int_eq(dm_image_write(path, W, H, 3, px, 90, text), DM_ERR_ARG);
    /* outputs that cannot be written: DM_ERR_WRITE, nothing left */
    const char *exts[] = {"png", "jpg", "bmp"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/no/such/dir/a.%s", g_tmp, exts[i]);
        ck_assert_int_eq(dm_image_write(path, W, H, 3, px, 90, text), DM_ERR_WRITE);
    }
    snprintf(path, sizeof path, "%s/no/x.bin", g_tmp);
    ck_assert_int_eq(dm_write_file_atomic(path, "abc", 3), DM_ERR_WRITE);
    snprintf(path, sizeof path, "%s/x.bin", g_tmp);
    ck_assert_int_eq(dm_write_file_atomic(path, "abc", 3), DM_OK);
    b = slurp(path, &n);
    ck_assert(b && n == 3 && !memcmp(b, "abc", 3));
    free(b);
    unlink(path);
    /* PNG back through dm_png_read_rgb */
    snprintf(path, sizeof path, "%s/a.png", g_tmp);
    ck_assert_int_eq(dm_image_write(path, W, H, 3, px, 90, text), DM_OK);
    int w, h;
    uint8_t *rgb;
    ck_assert_int_eq(dm_png_read_rgb(path, &w, &h, &rgb), DM_OK);
    ck_assert(w == W && h == H && !memcmp(rgb, px, sizeof px));
    free(rgb);
    unlink(path);
    ck_assert_int_eq(dm_png_read_rgb(path, &w, &h, &rgb), DM_ERR_IO);
    ck_assert_int_eq(rmdir(g_tmp), 0); /* no temp file left anywhere */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("pipeline");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_batch_invariant_and_hooks);
    tcase_add_test(tc, test_gen_text);
    tcase_add_test(tc, test_image_writers);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}

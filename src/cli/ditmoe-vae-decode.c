/* ditmoe-vae-decode: latents (.npy) -> images with the SD KL-f8 VAE decoder (or any config of it).
 *   ditmoe-vae-decode --vae vae.safetensors --z z.npy [--out img.npy] [--png PREFIX] */
#include "ditmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_sec(void) /* process CPU time, all threads */
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(FILE *fp)
{
    fprintf(fp,
            "usage: ditmoe-vae-decode --vae FILE --z FILE [--out FILE] [--png PREFIX] [options]\n"
            "Decode diffusion latents z [B,zc,h,w] (float32 .npy) as decoder(z / scaling_factor).\n"
            "  --vae FILE      VAE safetensors (diffusers, legacy diffusers or ldm names)\n"
            "  --z FILE        latents, float32 .npy [B, zc, h, w]\n"
            "  -o, --out FILE  decoded images, float32 .npy [B, out_ch, h*f, w*f] (roughly [-1,1])\n"
            "  --png PREFIX    also write PREFIX_0.png, PREFIX_1.png, ... (8-bit, DiT's mapping)\n"
            "  -t, --threads N threads (default 0 = all cores)\n"
            "  -v              verbose (timings, buffer sizes); -q quiet\n"
            "  -h, --help      this help\n"
            "At least one of --out / --png is required.\n");
}

static int bad(const char *msg, const char *arg)
{
    fprintf(stderr, "ditmoe-vae-decode: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    fprintf(stderr, "try 'ditmoe-vae-decode --help'\n");
    return 2;
}

static int fail(dm_status st)
{
    fprintf(stderr, "ditmoe-vae-decode: %s\n", dm_last_error());
    return dm_exit_code(st);
}

int main(int argc, char **argv)
{
    const char *vae_path = NULL, *z_path = NULL, *out_path = NULL, *png_prefix = NULL;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const int has_val = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-v")) dm_set_log_level(DM_LOG_VERBOSE);
        else if (!strcmp(a, "-q")) dm_set_log_level(DM_LOG_QUIET);
        else if (!strcmp(a, "--vae") && has_val) vae_path = argv[++i];
        else if (!strcmp(a, "--z") && has_val) z_path = argv[++i];
        else if ((!strcmp(a, "--out") || !strcmp(a, "-o")) && has_val) out_path = argv[++i];
        else if (!strcmp(a, "--png") && has_val) png_prefix = argv[++i];
        else if ((!strcmp(a, "--threads") || !strcmp(a, "-t")) && has_val) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 0 || n > 1024) return bad("--threads: expected an integer >= 0", argv[i]);
            threads = (int)n;
        } else if (a[0] == '-' && has_val == 0 &&
                   (!strcmp(a, "--vae") || !strcmp(a, "--z") || !strcmp(a, "--out") ||
                    !strcmp(a, "-o") || !strcmp(a, "--png") || !strcmp(a, "--threads") ||
                    !strcmp(a, "-t")))
            return bad("missing value for", a);
        else
            return bad("unknown argument", a);
    }
    if (!vae_path) return bad("--vae is required", NULL);
    if (!z_path) return bad("--z is required", NULL);
    if (!out_path && !png_prefix) return bad("nothing to write: give --out and/or --png", NULL);
    dm_set_threads(threads);

    dm_npy z = {0};
    dm_status st = dm_npy_read_expect(z_path, DM_F32, 4, &z);
    if (st != DM_OK) return fail(st);
    dm_vae *v = NULL;
    st = dm_vae_load(vae_path, &v);
    if (st != DM_OK) { dm_npy_free(&z); return fail(st); }
    const dm_vae_info *info = dm_vae_get_info(v);
    int rc = 0;
    float *img = NULL;
    uint8_t *u8 = NULL;
    const int64_t B = z.shape[0], zc = z.shape[1], h = z.shape[2], w = z.shape[3];
    if (zc != info->z_channels || B < 1 || h < 1 || w < 1 || B > 1000000 || h > 4096 || w > 4096) {
        fprintf(stderr, "ditmoe-vae-decode: %s: shape [%lld,%lld,%lld,%lld] expected [B,%d,h,w] "
                "(the VAE %s has %d latent channels)\n", z_path, (long long)B, (long long)zc,
                (long long)h, (long long)w, info->z_channels, vae_path, info->z_channels);
        rc = 2;
        goto done;
    }
    const int f = info->factor, oc = info->out_channels;
    const int64_t H = h * f, W = w * f;
    if (png_prefix && oc != 1 && oc != 3 && oc != 4) {
        fprintf(stderr, "ditmoe-vae-decode: --png: the VAE has %d output channels (PNG needs 1, 3 "
                "or 4)\n", oc);
        rc = 2;
        goto done;
    }
    const size_t per = (size_t)oc * (size_t)H * (size_t)W;
    img = malloc(sizeof(float) * per * (size_t)B);
    if (!img) { fprintf(stderr, "ditmoe-vae-decode: out of memory for %lld images\n", (long long)B); rc = 1; goto done; }
    dm_log(DM_LOG_INFO, "decoding %lld latent(s) %dx%dx%d -> %dx%dx%d (scale %g, %d threads)",
           (long long)B, (int)zc, (int)h, (int)w, oc, (int)H, (int)W, (double)info->scale,
           dm_get_threads());
    const double t0 = dm_time_sec(), c0 = cpu_sec();
    st = dm_vae_decode(v, (int)B, (int)h, (int)w, (const float *)z.data, img);
    if (st != DM_OK) { rc = fail(st); goto done; }
    const double dt = dm_time_sec() - t0, dc = cpu_sec() - c0;
    dm_log(DM_LOG_INFO, "decoded in %.3f s (%.3f s/image, cpu %.3f s)", dt, dt / (double)B, dc);
    if (out_path) {
        int64_t shape[4] = {B, oc, H, W};
        st = dm_npy_write(out_path, DM_F32, 4, shape, img);
        if (st != DM_OK) { rc = fail(st); goto done; }
        dm_log(DM_LOG_INFO, "wrote %s", out_path);
    }
    if (png_prefix) {
        u8 = malloc(per);
        if (!u8) { fprintf(stderr, "ditmoe-vae-decode: out of memory\n"); rc = 1; goto done; }
        for (int64_t b = 0; b < B; b++) {
            char path[4096];
            snprintf(path, sizeof path, "%s_%lld.png", png_prefix, (long long)b);
            dm_image_to_u8(oc, (int)H, (int)W, img + (size_t)b * per, u8);
            const char *text[] = {"Software", "ditmoe-vae-decode " DITMOE_VERSION, "VAE", vae_path,
                                  "Latent", z_path, NULL};
            st = dm_png_write(path, (int)W, (int)H, oc, u8, text);
            if (st != DM_OK) { rc = fail(st); goto done; }
        }
        dm_log(DM_LOG_INFO, "wrote %s_0.png .. %s_%lld.png", png_prefix, png_prefix,
               (long long)(B - 1));
    }
done:
    free(u8);
    free(img);
    dm_vae_free(v);
    dm_npy_free(&z);
    return rc;
}

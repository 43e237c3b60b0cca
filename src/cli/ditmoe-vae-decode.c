/* ditmoe-vae-decode: latents (.npy) -> images with the SD KL-f8 VAE decoder (or any config of it).
 *   ditmoe-vae-decode --vae vae.safetensors --z z.npy [--out img.npy] [--png PREFIX]
 * Exit codes (ditmoe.h dm_exit_code): 0 ok, 2 bad input (flags, missing or malformed files,
 * shapes), 1 runtime failure. */
#include "flags.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROG "ditmoe-vae-decode"

static double cpu_sec(void) /* process CPU time, all threads */
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const char *vae, *z, *out, *png;
    dm_cli_common common;
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    {'\0', "vae", DM_OPT_STR, &A.vae, 0, 0, "FILE", "none (required)",
     "VAE safetensors (diffusers, legacy diffusers or ldm names)", NULL},
    {'\0', "z", DM_OPT_STR, &A.z, 0, 0, "FILE", "none (required)",
     "latents, float32 .npy [B, zc, h, w]", NULL},
    {'o', "out", DM_OPT_STR, &A.out, 0, 0, "FILE", "none",
     "decoded images, float32 .npy [B, out_ch, h*f, w*f] (roughly [-1,1])", NULL},
    {'\0', "png", DM_OPT_STR, &A.png, 0, 0, "PREFIX", "none",
     "also write PREFIX_0.png, PREFIX_1.png, ... (8-bit, DiT's mapping)", NULL},
    {'t', "threads", DM_OPT_INT, &A.common.threads, 0, 4096, "N", "0 = all cores", "threads",
     &A.common.have_threads},
    DM_CLI_BACKEND_OPTS(A.common),
    DM_CLI_LOG_OPTS(A.common),
    DM_CLI_HELP_OPTS,
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "--vae FILE --z FILE [--out FILE] [--png PREFIX] [options]",
    "Decode diffusion latents z [B,zc,h,w] (float32 .npy) as decoder(z / scaling_factor).",
    OPTS, NULL, "At least one of --out / --png is required.\n"};

int main(int argc, char **argv)
{
    dm_cli_common_init(&A.common);
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    if (!A.vae) st = dm_fail(DM_ERR_ARG, "--vae is required (see --help)");
    else if (!A.z) st = dm_fail(DM_ERR_ARG, "--z is required (see --help)");
    else if (!A.out && !A.png) st = dm_fail(DM_ERR_ARG, "nothing to write: give --out and/or --png");
    if (st) return dm_cli_exit(PROG, st);
    dm_cli_common_apply(&A.common, -1);
    const char *vae_path = A.vae, *z_path = A.z, *out_path = A.out, *png_prefix = A.png;

    dm_npy z = {0};
    dm_vae *v = NULL;
    float *img = NULL;
    uint8_t *u8 = NULL;
    if ((st = dm_npy_read_expect(z_path, DM_F32, 4, &z))) goto done;
    size_t zbad = 0;
    if (!dm_all_finite((const float *)z.data,
                       (size_t)(z.shape[0] * z.shape[1] * z.shape[2] * z.shape[3]), &zbad)) {
        st = dm_fail(DM_ERR_ARG, "%s: element %zu of the latent is not finite", z_path, zbad);
        goto done;
    }
    dm_load_opts lo;
    dm_cli_common_load_opts(&A.common, &lo);
    if ((st = dm_vae_load_opts(vae_path, &lo, &v))) goto done;
    const dm_vae_info *info = dm_vae_get_info(v);
    const int64_t B = z.shape[0], zc = z.shape[1], h = z.shape[2], w = z.shape[3];
    if (zc != info->z_channels || B < 1 || h < 1 || w < 1 || B > 1000000 || h > 4096 || w > 4096) {
        st = dm_fail(DM_ERR_ARG, "--z %s: shape [%lld,%lld,%lld,%lld] expected [B,%d,h,w] (the "
                     "VAE %s has %d latent channels)", z_path, (long long)B, (long long)zc,
                     (long long)h, (long long)w, info->z_channels, vae_path, info->z_channels);
        goto done;
    }
    const int f = info->factor, oc = info->out_channels;
    const int64_t H = h * f, W = w * f;
    if (png_prefix && oc != 1 && oc != 3 && oc != 4) {
        st = dm_fail(DM_ERR_ARG, "--png: the VAE has %d output channels (PNG needs 1, 3 or 4)",
                     oc);
        goto done;
    }
    const size_t per = (size_t)oc * (size_t)H * (size_t)W;
    img = malloc(sizeof(float) * per * (size_t)B);
    if (!img) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory for %lld images", (long long)B);
        goto done;
    }
    dm_log(DM_LOG_INFO, "decoding %lld latent(s) %dx%dx%d -> %dx%dx%d (scale %g, %d threads)",
           (long long)B, (int)zc, (int)h, (int)w, oc, (int)H, (int)W, (double)info->scale,
           dm_get_threads());
    const double t0 = dm_time_sec(), c0 = cpu_sec();
    st = dm_vae_decode(v, (int)B, (int)h, (int)w, (const float *)z.data, img);
    if (st != DM_OK) goto done;
    const double dt = dm_time_sec() - t0, dc = cpu_sec() - c0;
    dm_log(DM_LOG_INFO, "decoded in %.3f s (%.3f s/image, cpu %.3f s)", dt, dt / (double)B, dc);
    if (out_path) {
        int64_t shape[4] = {B, oc, H, W};
        st = dm_npy_write(out_path, DM_F32, 4, shape, img);
        if (st != DM_OK) goto done;
        dm_log(DM_LOG_INFO, "wrote %s", out_path);
    }
    if (png_prefix) {
        u8 = malloc(per);
        if (!u8) {
            st = dm_fail(DM_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (int64_t b = 0; b < B; b++) {
            char path[PATH_MAX];
            snprintf(path, sizeof path, "%s_%lld.png", png_prefix, (long long)b);
            dm_image_to_u8(oc, (int)H, (int)W, img + (size_t)b * per, u8);
            const char *text[] = {"Software", "ditmoe-vae-decode " DITMOE_VERSION, "VAE", vae_path,
                                  "Latent", z_path, NULL};
            st = dm_png_write(path, (int)W, (int)H, oc, u8, text);
            if (st != DM_OK) goto done;
        }
        dm_log(DM_LOG_INFO, "wrote %s_0.png .. %s_%lld.png", png_prefix, png_prefix,
               (long long)(B - 1));
    }
done:
    free(u8);
    free(img);
    dm_vae_free(v);
    dm_npy_free(&z);
    return dm_cli_exit(PROG, st);
}

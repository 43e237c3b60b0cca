/* libFuzzer target: the VAE decoder loader (src/vae/vae_load.c, SD / ldm / diffusers layouts)
 * and, when it loads, one decode of a 1x1 latent (src/vae/vae.c). */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("vae.safetensors", data, size);
    dm_vae *v = NULL;
    if (dm_vae_load(path, &v) != DM_OK) return 0;
    const dm_vae_info *vi = dm_vae_get_info(v);
    if (vi->factor >= 1 && vi->factor <= 16 && vi->z_channels <= 64 && vi->out_channels <= 64) {
        float *z = malloc((size_t)vi->z_channels * sizeof *z);
        float *img = malloc((size_t)vi->out_channels * vi->factor * vi->factor * sizeof *img);
        for (int i = 0; z && i < vi->z_channels; i++) z[i] = 0.1f * (float)(i - 2);
        if (z && img) (void)dm_vae_decode(v, 1, 1, 1, z, img);
        free(z);
        free(img);
    }
    dm_vae_free(v);
    return 0;
}

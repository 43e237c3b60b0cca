/* libFuzzer target: every PNG we read — ditmoe-routes' overlay reader (dm_png_read_rgb,
 * src/io/png.c), resume's completeness check (src/batch/pngcheck.c) and pack's libpng
 * reader (src/batch/pack.c, one image into an .npz with its label). */
#include "batch/batch.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("000000.png", data, size);
    int w = 0, h = 0;
    uint8_t *rgb = NULL;
    if (dm_png_read_rgb(path, &w, &h, &rgb) == DM_OK) free(rgb);
    (void)dm_batch_png_check(path, 4, 3, 3);
    char out[512];
    snprintf(out, sizeof out, "%s/out.npz", fuzz_dir());
    if (dm_batch_pack(fuzz_dir(), 1, out, 1, 0, NULL, NULL) == DM_OK) unlink(out);
    return 0;
}

/* PNG output (libpng), written atomically, with tEXt chunks carrying the generation parameters;
 * PNG input as 8-bit RGB (overlays); and the float [-1,1] CHW -> uint8 HWC conversion DiT's
 * sample_ddp.py uses. */
#include "io/atomic.h"
#include "io/png_scan.h"

#include <errno.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

void dm_image_to_u8(int channels, int h, int w, const float *chw, uint8_t *hwc)
{
    const size_t plane = (size_t)h * w;
    for (int c = 0; c < channels; c++)
        for (size_t i = 0; i < plane; i++) {
            float v = 127.5f * chw[(size_t)c * plane + i];
            v = v + 128.0f;               /* two roundings, like torch's mul then add */
            if (!(v > 0.0f)) v = 0.0f;    /* also maps NaN to 0 */
            if (v > 255.0f) v = 255.0f;
            hwc[i * channels + c] = (uint8_t)v; /* truncation, as .to(torch.uint8) */
        }
}

typedef struct {
    jmp_buf jb;
    char msg[256];
} png_err_ctx;

static void on_png_error(png_structp png, png_const_charp msg)
{
    png_err_ctx *e = png_get_error_ptr(png);
    snprintf(e->msg, sizeof e->msg, "%s", msg ? msg : "libpng error");
    longjmp(e->jb, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg;
}

dm_status dm_png_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                       const char *const *text)
{
    if (w <= 0 || h <= 0 || w > 1000000 || h > 1000000)
        return dm_fail(DM_ERR_ARG, "%s: bad image size %dx%d", path, w, h);
    int color;
    switch (channels) {
    case 1: color = PNG_COLOR_TYPE_GRAY; break;
    case 3: color = PNG_COLOR_TYPE_RGB; break;
    case 4: color = PNG_COLOR_TYPE_RGB_ALPHA; break;
    default: return dm_fail(DM_ERR_ARG, "%s: %d channels (expected 1, 3 or 4)", path, channels);
    }
    int ntext = 0;
    if (text)
        while (text[2 * ntext]) {
            if (!text[2 * ntext + 1])
                return dm_fail(DM_ERR_ARG, "%s: tEXt key \"%s\" has no value", path, text[2 * ntext]);
            size_t kl = strlen(text[2 * ntext]);
            if (kl < 1 || kl > 79)
                return dm_fail(DM_ERR_ARG, "%s: tEXt key \"%s\" must be 1..79 characters", path,
                               text[2 * ntext]);
            ntext++;
        }

    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *fp = dm_atomic_open(path, tmp);
    if (!fp) return DM_ERR_WRITE;

    png_err_ctx err;
    err.msg[0] = '\0';
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &err, on_png_error,
                                              on_png_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    png_text *volatile chunks = NULL;
    png_bytep *volatile rows = NULL;
    if (!png || !info) {
        png_destroy_write_struct(png ? &png : NULL, NULL);
        dm_atomic_abort(fp, tmp);
        return dm_fail(DM_ERR_NOMEM, "%s: cannot create libpng writer", path);
    }
    if (setjmp(err.jb)) {
        png_destroy_write_struct(&png, &info);
        free(chunks);
        free(rows);
        dm_atomic_abort(fp, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: PNG write failed: %s", path, err.msg);
    }
    chunks = calloc((size_t)ntext + 1, sizeof(png_text));
    rows = malloc((size_t)h * sizeof(png_bytep));
    if (!chunks || !rows) png_error(png, "out of memory");
    png_init_io(png, fp);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, color, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    for (int i = 0; i < ntext; i++) {
        chunks[i].compression = PNG_TEXT_COMPRESSION_NONE;
        chunks[i].key = (png_charp)text[2 * i];
        chunks[i].text = (png_charp)text[2 * i + 1];
        chunks[i].text_length = strlen(text[2 * i + 1]);
    }
    if (ntext) png_set_text(png, info, chunks, ntext);
    for (int y = 0; y < h; y++) rows[y] = (png_bytep)(pix + (size_t)y * w * channels);
    png_write_info(png, info);
    png_write_image(png, rows);
    png_write_end(png, info);
    png_destroy_write_struct(&png, &info);
    free(chunks);
    free(rows);
    return dm_atomic_commit(fp, tmp, path);
}

dm_status dm_png_read_rgb(const char *path, int *w, int *h, uint8_t **rgb)
{
    *rgb = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    /* libpng allocates a chunk's claimed length before reading it: every length is checked
     * against the file first (io/png_scan.h; found by tests/fuzz/fuzz_png) */
    dm_status st = dm_png_prescan(f, path);
    if (st) {
        fclose(f);
        return st;
    }
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_stdio(&im, f)) {
        fclose(f);
        return dm_fail(DM_ERR_FORMAT, "%s: cannot read PNG: %s", path, im.message);
    }
    im.format = PNG_FORMAT_RGB;
    if (im.width < 1 || im.height < 1 || (uint64_t)im.width * im.height > 1u << 26) {
        png_image_free(&im);
        fclose(f);
        return dm_fail(DM_ERR_FORMAT, "%s: PNG of %ux%u pixels is out of range", path, im.width,
                       im.height);
    }
    uint8_t *buf = malloc(PNG_IMAGE_SIZE(im));
    if (!buf) {
        png_image_free(&im);
        fclose(f);
        return dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
    }
    if (!png_image_finish_read(&im, NULL, buf, 0, NULL)) {
        free(buf);
        dm_fail(DM_ERR_FORMAT, "%s: cannot read PNG: %s", path, im.message);
        png_image_free(&im);
        fclose(f);
        return DM_ERR_FORMAT;
    }
    fclose(f);
    *w = (int)im.width;
    *h = (int)im.height;
    *rgb = buf;
    return DM_OK;
}

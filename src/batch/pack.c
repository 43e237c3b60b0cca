/* pack: DIR/{index:06d}.png -> OUT.npz for the ADM evaluator (arr_0 uint8 [N,H,W,3], optional
 * arr_1 int64 [N] labels), streaming one PNG at a time through libpng. */
#include "batch/batch.h"
#include "io/png_scan.h"

#include <errno.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *path;
    char msg[256];
} png_err_t;

static void on_png_error(png_structp png, png_const_charp msg)
{
    png_err_t *e = png_get_error_ptr(png);
    snprintf(e->msg, sizeof e->msg, "%s", msg);
    longjmp(png_jmpbuf(png), 1);
}

static void on_png_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg;
}

/* Read one 8-bit PNG as RGB into rgb [h, w, 3] (*rgb grown as needed). Sets w/h on the first
 * image (when *w == 0) and then requires the same size. label: leading integer of tEXt "class"
 * (-1 if absent). */
static dm_status read_png(const char *path, int *w, int *h, uint8_t **rgb, uint8_t **row_buf,
                          int64_t *label)
{
    FILE *f = fopen(path, "rb");
    if (!f) return dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    dm_status pst = dm_png_prescan(f, path); /* chunk lengths bounded by the file (png_scan.h) */
    if (pst) {
        fclose(f);
        return pst;
    }
    png_err_t err = {path, ""};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, on_png_error,
                                             on_png_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_read_struct(&png, &info, NULL);
        fclose(f);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    dm_status st = DM_OK;
    if (setjmp(png_jmpbuf(png))) {
        st = dm_fail(DM_ERR_FORMAT, "%s: not a readable PNG: %s", path, err.msg);
        goto out;
    }
    png_set_user_limits(png, 65536, 65536);
    png_init_io(png, f);
    png_read_info(png, info);
    png_uint_32 pw = png_get_image_width(png, info), ph = png_get_image_height(png, info);
    int ct = png_get_color_type(png, info), bd = png_get_bit_depth(png, info);
    if (bd != 8 || (ct != PNG_COLOR_TYPE_GRAY && ct != PNG_COLOR_TYPE_RGB &&
                    ct != PNG_COLOR_TYPE_RGB_ALPHA && ct != PNG_COLOR_TYPE_GRAY_ALPHA)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: expected an 8-bit gray or RGB(A) PNG, found color type "
                     "%d with %d-bit samples", path, ct, bd);
        goto out;
    }
    if (pw > 65536 || ph > 65536 || (uint64_t)pw * ph > (1u << 26)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: %ux%u image is too large", path, (unsigned)pw,
                     (unsigned)ph);
        goto out;
    }
    if (*w == 0) {
        *w = (int)pw;
        *h = (int)ph;
        *rgb = malloc((size_t)pw * ph * 3);
        *row_buf = malloc((size_t)pw * 4);
        if (!*rgb || !*row_buf) {
            st = dm_fail(DM_ERR_NOMEM, "out of memory for a %ux%u image", (unsigned)pw,
                         (unsigned)ph);
            goto out;
        }
    } else if ((int)pw != *w || (int)ph != *h) {
        st = dm_fail(DM_ERR_FORMAT, "%s: image is %ux%u, the first one is %dx%d", path,
                     (unsigned)pw, (unsigned)ph, *w, *h);
        goto out;
    }
    if (png_get_interlace_type(png, info) != PNG_INTERLACE_NONE) {
        st = dm_fail(DM_ERR_FORMAT, "%s: interlaced PNGs are not supported", path);
        goto out;
    }
    const int ch = png_get_channels(png, info); /* 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA */
    for (png_uint_32 y = 0; y < ph; y++) {
        png_read_row(png, *row_buf, NULL);
        uint8_t *dst = *rgb + (size_t)y * pw * 3;
        const uint8_t *src = *row_buf;
        for (png_uint_32 x = 0; x < pw; x++) {
            if (ch <= 2) {
                dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = src[(size_t)x * ch];
            } else {
                dst[3 * x] = src[(size_t)x * ch];
                dst[3 * x + 1] = src[(size_t)x * ch + 1];
                dst[3 * x + 2] = src[(size_t)x * ch + 2];
            }
        }
    }
    png_read_end(png, info);
    *label = -1;
    png_textp text;
    int ntext = 0;
    png_get_text(png, info, &text, &ntext);
    for (int i = 0; i < ntext; i++)
        if (!strcmp(text[i].key, "class") && text[i].text) {
            char *end;
            long v = strtol(text[i].text, &end, 10);
            if (end != text[i].text && v >= 0) *label = v;
        }
out:
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    return st;
}

dm_status dm_batch_pack(const char *dir, int64_t num, const char *outp, int labels, int force_zip64,
                        dm_progress_fn progress, void *progress_ctx)
{
    if (num < 1) return dm_fail(DM_ERR_ARG, "pack: N must be at least 1");
    /* Count first: N comes from a flag or a hand-editable manifest, and nothing of size N is
     * allocated before the folder is known to hold N images. */
    int64_t ndone = 0;
    dm_status st = dm_batch_scan(dir, num, NULL, &ndone, -1, 1);
    if (st) return st;
    if (ndone < num) {
        /* ndone files below N: one of the indices 0..ndone is missing */
        const int64_t m = ndone + 1;
        uint8_t *done = malloc((size_t)m);
        if (!done) return dm_fail(DM_ERR_NOMEM, "out of memory");
        int64_t first = 0, n2 = 0;
        if ((st = dm_batch_scan(dir, m, done, &n2, -1, 1))) {
            free(done);
            return st;
        }
        while (first < m - 1 && done[first]) first++;
        free(done);
        char p[4096];
        dm_batch_png_path(dir, (uint64_t)first, p, sizeof p);
        return dm_fail(DM_ERR_ARG, "pack %s: %lld of %lld images missing, the first is %s "
                       "(finish the run first)", dir, (long long)(num - ndone), (long long)num, p);
    }

    int64_t *lab = labels ? malloc((size_t)num * sizeof(int64_t)) : NULL;
    uint8_t *rgb = NULL, *row = NULL;
    dm_npz *z = NULL;
    int w = 0, h = 0;
    char path[4096];
    if (labels && !lab) return dm_fail(DM_ERR_NOMEM, "out of memory");
    /* The first image fixes H and W, which the arr_0 header needs before any data. */
    dm_batch_png_path(dir, 0, path, sizeof path);
    int64_t l0;
    if ((st = read_png(path, &w, &h, &rgb, &row, &l0))) goto out;
    if ((st = dm_npz_open(outp, force_zip64, &z))) goto out;
    const int64_t shape[4] = {num, h, w, 3};
    if ((st = dm_npz_begin(z, "arr_0", "|u1", 1, 4, shape))) goto out;
    for (int64_t i = 0; i < num; i++) {
        dm_batch_png_path(dir, (uint64_t)i, path, sizeof path);
        int64_t li = l0;
        if (i > 0 && (st = read_png(path, &w, &h, &rgb, &row, &li))) goto out;
        if (labels) {
            if (li < 0) {
                st = dm_fail(DM_ERR_FORMAT, "%s: --labels: no tEXt \"class\" chunk with a class "
                             "id", path);
                goto out;
            }
            lab[i] = li;
        }
        if ((st = dm_npz_write(z, rgb, (size_t)w * h * 3))) goto out;
        if (progress) progress(progress_ctx, (int)(i + 1), (int)num);
    }
    if ((st = dm_npz_end(z))) goto out;
    if (labels) {
        const int64_t ls[1] = {num};
        if ((st = dm_npz_begin(z, "arr_1", "<i8", 8, 1, ls))) goto out;
        /* int64 little endian; this host is little endian (x86-64), written byte by byte anyway */
        for (int64_t i = 0; i < num; i++) {
            uint8_t b[8];
            for (int k = 0; k < 8; k++) b[k] = (uint8_t)((uint64_t)lab[i] >> (8 * k));
            if ((st = dm_npz_write(z, b, 8))) goto out;
        }
        if ((st = dm_npz_end(z))) goto out;
    }
    st = dm_npz_close(z);
    z = NULL;
out:
    dm_npz_abort(z);
    free(lab);
    free(rgb);
    free(row);
    return st;
}

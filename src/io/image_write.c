/* JPEG and BMP output through stb_image_write (Debian's libstb-dev header; its implementation is
 * compiled here, static, so nothing clashes with another copy), written atomically; the JPEG
 * carries the generation parameters in a COM segment placed right after SOI (stb has no comment
 * API, so we insert it into the encoded bytes). And dm_image_write, which picks the format from
 * the file name. */
#include "io/atomic.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* stb declares writers this file does not use (static): unused-function stays off for the file. */
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#define STBI_WRITE_NO_STDIO
#include <stb_image_write.h>
#pragma GCC diagnostic pop

int dm_image_format_from_path(const char *path, dm_image_format *out)
{
    const char *dot = strrchr(path, '.'), *slash = strrchr(path, '/');
    if (!dot || (slash && dot < slash)) return -1;
    if (!strcasecmp(dot, ".png")) *out = DM_IMAGE_PNG;
    else if (!strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg")) *out = DM_IMAGE_JPEG;
    else if (!strcasecmp(dot, ".bmp")) *out = DM_IMAGE_BMP;
    else return -1;
    return 0;
}

const char *dm_image_format_name(dm_image_format f)
{
    return f == DM_IMAGE_PNG ? "png" : f == DM_IMAGE_JPEG ? "jpeg" : f == DM_IMAGE_BMP ? "bmp" : "?";
}

/* The encoder's output, collected in memory. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
    int oom;
} membuf;

static void collect(void *ctx, void *data, int size)
{
    membuf *m = ctx;
    if (m->oom || size <= 0) return;
    if (m->n + (size_t)size > m->cap) {
        size_t cap = m->cap ? m->cap : 1 << 16;
        while (cap < m->n + (size_t)size) cap *= 2;
        uint8_t *np = realloc(m->p, cap);
        if (!np) {
            m->oom = 1;
            return;
        }
        m->p = np;
        m->cap = cap;
    }
    memcpy(m->p + m->n, data, (size_t)size);
    m->n += (size_t)size;
}

static dm_status check_image(const char *path, int w, int h, int channels, const char *what)
{
    if (w <= 0 || h <= 0 || w > 65500 || h > 65500)
        return dm_fail(DM_ERR_ARG, "%s: bad image size %dx%d for %s", path, w, h, what);
    if (channels != 1 && channels != 3)
        return dm_fail(DM_ERR_ARG, "%s: %d channels (%s needs 1 or 3)", path, channels, what);
    return DM_OK;
}

/* Write the pieces atomically. */
static dm_status write_parts(const char *path, const void *a, size_t na, const void *b, size_t nb)
{
    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *f = dm_atomic_open(path, tmp);
    if (!f) return DM_ERR_WRITE;
    if ((na && fwrite(a, 1, na, f) != na) || (nb && fwrite(b, 1, nb, f) != nb)) {
        int e = errno;
        dm_atomic_abort(f, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed: %s", path, strerror(e ? e : EIO));
    }
    return dm_atomic_commit(f, tmp, path);
}

dm_status dm_jpeg_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                        int quality, const char *const *text)
{
    dm_status st = check_image(path, w, h, channels, "JPEG");
    if (st) return st;
    if (quality < 1 || quality > 100)
        return dm_fail(DM_ERR_ARG, "%s: JPEG quality %d (expected 1..100)", path, quality);
    /* The comment: "key=value\n" per pair. */
    size_t clen = 0;
    for (int i = 0; text && text[2 * i]; i++) {
        if (!text[2 * i + 1])
            return dm_fail(DM_ERR_ARG, "%s: comment key \"%s\" has no value", path, text[2 * i]);
        clen += strlen(text[2 * i]) + strlen(text[2 * i + 1]) + 2;
    }
    if (clen > 65533)
        return dm_fail(DM_ERR_ARG, "%s: JPEG comment of %zu bytes (at most 65533)", path, clen);
    membuf m = {0};
    int ok = stbi_write_jpg_to_func(collect, &m, w, h, channels, pix, quality);
    if (!ok || m.oom || m.n < 4 || m.p[0] != 0xFF || m.p[1] != 0xD8) {
        free(m.p);
        return m.oom ? dm_fail(DM_ERR_NOMEM, "%s: out of memory encoding the JPEG", path)
                     : dm_fail(DM_ERR_WRITE, "%s: JPEG encoding failed", path);
    }
    /* SOI, then COM (FF FE, length = 2 + text bytes, big endian), then the rest as encoded. */
    uint8_t *head = malloc(6 + clen + 1); /* SOI, COM marker + length, text, sprintf's NUL */
    if (!head) {
        free(m.p);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    size_t nh = 0;
    head[nh++] = 0xFF;
    head[nh++] = 0xD8;
    if (clen) {
        head[nh++] = 0xFF;
        head[nh++] = 0xFE;
        head[nh++] = (uint8_t)((clen + 2) >> 8);
        head[nh++] = (uint8_t)((clen + 2) & 0xFF);
        for (int i = 0; text[2 * i]; i++)
            nh += (size_t)snprintf((char *)head + nh, 6 + clen + 1 - nh, "%s=%s\n", text[2 * i],
                                   text[2 * i + 1]);
    }
    st = write_parts(path, head, nh, m.p + 2, m.n - 2);
    free(head);
    free(m.p);
    return st;
}

dm_status dm_bmp_write(const char *path, int w, int h, int channels, const uint8_t *pix)
{
    dm_status st = check_image(path, w, h, channels, "BMP");
    if (st) return st;
    membuf m = {0};
    int ok = stbi_write_bmp_to_func(collect, &m, w, h, channels, pix);
    if (!ok || m.oom) {
        free(m.p);
        return m.oom ? dm_fail(DM_ERR_NOMEM, "%s: out of memory encoding the BMP", path)
                     : dm_fail(DM_ERR_WRITE, "%s: BMP encoding failed", path);
    }
    st = write_parts(path, m.p, m.n, NULL, 0);
    free(m.p);
    return st;
}

dm_status dm_image_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                         int quality, const char *const *text)
{
    dm_image_format f;
    if (dm_image_format_from_path(path, &f))
        return dm_fail(DM_ERR_ARG, "%s: unknown image type (name it .png, .jpg, .jpeg or .bmp)",
                       path);
    switch (f) {
    case DM_IMAGE_JPEG: return dm_jpeg_write(path, w, h, channels, pix, quality, text);
    case DM_IMAGE_BMP: return dm_bmp_write(path, w, h, channels, pix);
    default: return dm_png_write(path, w, h, channels, pix, text);
    }
}

/* Resume's test of a finished image: DIR/{index:06d}.png counts as done only when it is a
 * complete PNG of the run's size (see batch.h). Files appear only by rename, so a kill -9 never
 * leaves a partial one under the final name; this catches what something else left there (a
 * 0-byte file, a truncated copy, another run's image of a different size). */
#include "batch/batch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

dm_status dm_batch_png_check(const char *path, int w, int h, int channels)
{
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    static const int color_of[5] = {-1, 0, 4, 2, 6}; /* channels -> PNG colour type */
    FILE *f = fopen(path, "rb");
    if (!f) return dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    dm_status st = DM_OK;
    uint8_t head[8], buf[1 << 15];
    int chunks = 0, idat = 0, iend = 0;
    const size_t got = fread(head, 1, 8, f);
    if (got != 8 || memcmp(head, sig, 8)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: %s", path, got ? "not a PNG (no signature)"
                                                         : "empty file, not a PNG");
        goto out;
    }
    while (!iend) {
        if (fread(head, 1, 8, f) != 8) {
            st = dm_fail(DM_ERR_FORMAT, "%s: truncated after %d chunks (no IEND)", path, chunks);
            goto out;
        }
        const uint32_t len = be32(head);
        char type[5];
        memcpy(type, head + 4, 4);
        type[4] = '\0';
        if (len > 0x7fffffffu) {
            st = dm_fail(DM_ERR_FORMAT, "%s: chunk %d: length %u out of range", path, chunks, len);
            goto out;
        }
        if (chunks == 0 && (strcmp(type, "IHDR") || len != 13)) {
            st = dm_fail(DM_ERR_FORMAT, "%s: first chunk is not a 13-byte IHDR", path);
            goto out;
        }
        uint32_t crc = dm_crc32(0, head + 4, 4);
        for (uint32_t left = len; left > 0;) {
            const size_t n = left < sizeof buf ? left : sizeof buf;
            if (fread(buf, 1, n, f) != n) {
                st = dm_fail(DM_ERR_FORMAT, "%s: truncated inside chunk %s", path, type);
                goto out;
            }
            if (chunks == 0) { /* IHDR: width, height, depth, colour type, ..., interlace */
                const int ct = channels >= 1 && channels <= 4 ? color_of[channels] : -2;
                if (be32(buf) != (uint32_t)w || be32(buf + 4) != (uint32_t)h || buf[8] != 8 ||
                    buf[9] != ct) {
                    st = dm_fail(DM_ERR_FORMAT, "%s: %ux%u, %d-bit colour type %d; the run makes "
                                 "%dx%d 8-bit images with %d channels", path, be32(buf),
                                 be32(buf + 4), buf[8], buf[9], w, h, channels);
                    goto out;
                }
            }
            crc = dm_crc32(crc, buf, n);
            left -= (uint32_t)n;
        }
        uint8_t c4[4];
        if (fread(c4, 1, 4, f) != 4) {
            st = dm_fail(DM_ERR_FORMAT, "%s: truncated in the CRC of chunk %s", path, type);
            goto out;
        }
        if (be32(c4) != crc) {
            st = dm_fail(DM_ERR_FORMAT, "%s: chunk %s: CRC mismatch (corrupt)", path, type);
            goto out;
        }
        idat |= !strcmp(type, "IDAT");
        iend = !strcmp(type, "IEND");
        chunks++;
    }
    if (!idat) st = dm_fail(DM_ERR_FORMAT, "%s: no image data (IDAT)", path);
    else if (fgetc(f) != EOF) st = dm_fail(DM_ERR_FORMAT, "%s: bytes after IEND", path);
out:
    fclose(f);
    return st;
}

dm_status dm_batch_scan_complete(const char *dir, int64_t num, int w, int h, int channels,
                                 uint8_t *done, int64_t *ndone, int clean_rank, int clean_size)
{
    uint8_t *d = done ? done : malloc((size_t)(num > 0 ? num : 1));
    if (!d) return dm_fail(DM_ERR_NOMEM, "out of memory for %lld flags", (long long)num);
    int64_t count = 0;
    dm_status st = dm_batch_scan(dir, num, d, &count, clean_rank, clean_size);
    char path[4096];
    for (int64_t i = 0; st == DM_OK && i < num; i++) {
        if (!d[i] || (clean_rank >= 0 && !dm_batch_owns((uint64_t)i, clean_rank, clean_size)))
            continue;
        dm_batch_png_path(dir, (uint64_t)i, path, sizeof path);
        if (dm_batch_png_check(path, w, h, channels) != DM_OK) {
            dm_log(DM_LOG_INFO, "%s; making it again", dm_last_error());
            d[i] = 0;
            count--;
        }
    }
    if (!done) free(d);
    if (st == DM_OK && ndone) *ndone = count;
    return st;
}

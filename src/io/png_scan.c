/* Structural pre-pass over a PNG file (see png_scan.h). */
#include "io/png_scan.h"

#include <string.h>
#include <sys/stat.h>

dm_status dm_png_prescan(FILE *f, const char *path)
{
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode))
        return dm_fail(DM_ERR_IO, "%s: not a regular file", path);
    const long long size = (long long)sb.st_size;
    uint8_t b[8];
    if (fseek(f, 0, SEEK_SET) != 0 || fread(b, 1, 8, f) != 8 ||
        memcmp(b, "\x89PNG\r\n\x1a\n", 8))
        return dm_fail(DM_ERR_FORMAT, "%s: not a PNG (no signature)", path);
    for (long long pos = 8;;) {
        if (size - pos < 12 || fseek(f, (long)pos, SEEK_SET) != 0 || fread(b, 1, 8, f) != 8)
            return dm_fail(DM_ERR_FORMAT, "%s: truncated PNG (no IEND chunk)", path);
        const long long len = (long long)b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3];
        if (len > size - pos - 12)
            return dm_fail(DM_ERR_FORMAT, "%s: PNG chunk \"%.4s\" at byte %lld claims %lld bytes, "
                           "past the end of the file (truncated or corrupt)", path,
                           (const char *)b + 4, pos, len);
        if (!memcmp(b + 4, "IEND", 4)) break;
        pos += 12 + len;
    }
    if (fseek(f, 0, SEEK_SET) != 0) return dm_fail(DM_ERR_IO, "%s: cannot seek", path);
    return DM_OK;
}

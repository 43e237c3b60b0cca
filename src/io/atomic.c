/* Atomic output files: temp file beside the target + rename (see atomic.h). */
#include "io/atomic.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

FILE *dm_atomic_open(const char *path, char tmp[DM_ATOMIC_TMP_MAX])
{
    int n = snprintf(tmp, DM_ATOMIC_TMP_MAX, "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || n >= DM_ATOMIC_TMP_MAX) {
        tmp[0] = '\0';
        dm_fail(DM_ERR_WRITE, "%s: path too long", path);
        return NULL;
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        dm_fail(DM_ERR_WRITE, "%s: cannot create temp file %s: %s", path, tmp, strerror(errno));
        tmp[0] = '\0';
        return NULL;
    }
    return f;
}

dm_status dm_atomic_commit(FILE *f, const char *tmp, const char *path)
{
    int err = 0;
    errno = 0;
    if (fflush(f) != 0 || ferror(f)) err = errno ? errno : EIO;
    if (!err && fsync(fileno(f)) != 0 && errno != EINVAL && errno != EROFS) err = errno;
    if (fclose(f) != 0 && !err) err = errno ? errno : EIO;
    if (!err && rename(tmp, path) != 0) err = errno;
    if (err) {
        remove(tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed: %s", path, strerror(err));
    }
    return DM_OK;
}

void dm_atomic_abort(FILE *f, const char *tmp)
{
    if (f) fclose(f);
    if (tmp && tmp[0]) remove(tmp);
}

dm_status dm_write_file_atomic(const char *path, const void *data, size_t n)
{
    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *f = dm_atomic_open(path, tmp);
    if (!f) return DM_ERR_WRITE;
    if (n && fwrite(data, 1, n, f) != n) {
        int err = errno;
        dm_atomic_abort(f, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed: %s", path, strerror(err ? err : EIO));
    }
    return dm_atomic_commit(f, tmp, path);
}

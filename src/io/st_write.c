/* Safetensors writer: u64 LE header length | JSON header padded with spaces to a multiple of 8 |
 * tensor data, contiguous in the order given (the layout tools/safetensors_io.py writes). The
 * header needs only names, dtypes and sizes, so the data can be produced tensor by tensor while
 * it is written (dm_st_write_stream: bounded memory for a model of any size).
 * Atomic: a temp file beside the target, renamed into place (atomic.h). */
#include "io/atomic.h"
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The atomic helpers report DM_ERR_IO; an output that cannot be written is DM_ERR_WRITE. */
static dm_status rewrite_as_write(void)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", dm_last_error());
    return dm_fail(DM_ERR_WRITE, "%s", msg);
}

dm_status dm_st_write(const char *path, int n, const dm_st_tensor *t, const char *const *meta)
{
    return dm_st_write_stream(path, n, t, meta, NULL, NULL);
}

dm_status dm_st_write_stream(const char *path, int n, const dm_st_tensor *t,
                             const char *const *meta, dm_st_fill_fn fill, void *ud)
{
    cJSON *h = cJSON_CreateObject();
    if (!h) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    int ok = 1;
    if (meta && meta[0]) {
        cJSON *m = cJSON_AddObjectToObject(h, "__metadata__");
        ok &= m != NULL;
        for (int i = 0; ok && meta[i] && meta[i + 1]; i += 2)
            ok &= cJSON_AddStringToObject(m, meta[i], meta[i + 1]) != NULL;
    }
    uint64_t off = 0;
    for (int i = 0; ok && i < n; i++) {
        if (!strcmp(t[i].name, "__metadata__")) {
            cJSON_Delete(h);
            return dm_fail(DM_ERR_ARG, "%s: \"__metadata__\" is not a valid tensor name", path);
        }
        size_t count = 1;
        for (int d = 0; d < t[i].ndim; d++) count *= (size_t)t[i].shape[d];
        if (count * dm_dtype_size(t[i].dtype) != t[i].nbytes) {
            cJSON_Delete(h);
            return dm_fail(DM_ERR_ARG, "%s: %s: %zu bytes for %zu %s elements", path, t[i].name,
                           t[i].nbytes, count, dm_dtype_name(t[i].dtype));
        }
        cJSON *e = cJSON_AddObjectToObject(h, t[i].name); /* dtype, shape, data_offsets */
        ok &= e && cJSON_AddStringToObject(e, "dtype", dm_dtype_name(t[i].dtype));
        cJSON *sh = ok ? cJSON_AddArrayToObject(e, "shape") : NULL;
        ok &= sh != NULL;
        for (int d = 0; ok && d < t[i].ndim; d++)
            ok &= cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
        cJSON *o = ok ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
        ok &= o && cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off)) &&
              cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + t[i].nbytes)));
        off += t[i].nbytes;
    }
    char *js = ok ? cJSON_PrintUnformatted(h) : NULL;
    cJSON_Delete(h);
    if (!js) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    size_t jl = strlen(js), pad = (8 - jl % 8) % 8;
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)(jl + pad) >> (8 * i));
    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *fp = dm_atomic_open(path, tmp);
    if (!fp) {
        free(js);
        return rewrite_as_write();
    }
    int w = fwrite(len, 1, 8, fp) == 8 && fwrite(js, 1, jl, fp) == jl;
    for (size_t i = 0; w && i < pad; i++) w = fputc(' ', fp) != EOF;
    free(js);
    dm_status fst = DM_OK;
    for (int i = 0; w && i < n; i++) {
        const void *data = t[i].data;
        if (!data && t[i].nbytes && fill) {
            if ((fst = fill(ud, i, &data)) != DM_OK) break;
        }
        if (!data && t[i].nbytes) {
            fst = dm_fail(DM_ERR_ARG, "%s: %s: no data", path, t[i].name);
            break;
        }
        w = t[i].nbytes == 0 || fwrite(data, 1, t[i].nbytes, fp) == t[i].nbytes;
    }
    if (fst != DM_OK) { /* the producer's error (it named the tensor); no output file */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", dm_last_error());
        dm_atomic_abort(fp, tmp);
        return dm_fail(fst, "%s", msg);
    }
    if (!w) {
        dm_atomic_abort(fp, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed", path);
    }
    dm_status st = dm_atomic_commit(fp, tmp, path);
    return st == DM_OK ? st : rewrite_as_write();
}

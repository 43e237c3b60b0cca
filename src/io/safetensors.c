/* Safetensors reader: the file is mmap'd read-only and every header field is checked before use.
 *
 * Layout: u64 LE header length N | N bytes of JSON | data. The JSON object maps tensor names to
 * {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets relative to the data
 * start) and may hold "__metadata__": {string: string}.
 */
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MB of JSON is far beyond any real model */


char *dm_fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape)
{
    size_t o = 0;
    if (cap == 0) return buf;
    buf[0] = '\0';
    o += (size_t)snprintf(buf + o, cap - o, "[");
    for (int i = 0; i < ndim && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
    return buf;
}

const char *dm_st_path(const dm_st_file *f) { return f->path; }
int dm_st_count(const dm_st_file *f) { return f->n; }

const dm_st_tensor *dm_st_at(const dm_st_file *f, int i)
{
    return (i >= 0 && i < f->n) ? &f->t[i] : NULL;
}

typedef struct {
    const char *name;
    int idx;
} name_idx;

static int cmp_name_idx(const void *a, const void *b)
{
    return strcmp(((const name_idx *)a)->name, ((const name_idx *)b)->name);
}

const dm_st_tensor *dm_st_find(const dm_st_file *f, const char *name)
{
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->t[f->by_name[mid]].name);
        if (c == 0) return &f->t[f->by_name[mid]];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

const char *dm_st_meta(const dm_st_file *f, const char *key)
{
    for (int i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta_key[i], key) == 0) return f->meta_val[i];
    return NULL;
}

void dm_st_close(dm_st_file *f)
{
    if (!f) return;
    if (f->map && f->map != MAP_FAILED) munmap(f->map, f->size);
    for (int i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (int i = 0; i < f->nmeta; i++) {
        free(f->meta_key[i]);
        free(f->meta_val[i]);
    }
    for (int i = 0; i < f->n_owned; i++) free(f->owned[i]);
    free(f->owned);
    free(f->t);
    free(f->by_name);
    free(f->meta_key);
    free(f->meta_val);
    free(f->path);
    free(f);
}

/* A JSON number that is a non-negative integer exactly representable in a double. */
static int json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j)) return 0;
    double d = j->valuedouble;
    if (!(d >= 0.0) || d > 9007199254740992.0 || d != (double)(uint64_t)d) return 0;
    *out = (uint64_t)d;
    return 1;
}

static dm_status parse_metadata(dm_st_file *f, const cJSON *m)
{
    if (!cJSON_IsObject(m))
        return dm_fail(DM_ERR_FORMAT, "%s: __metadata__: not an object (expected {string: string})",
                       f->path);
    int cnt = cJSON_GetArraySize(m);
    f->meta_key = calloc((size_t)cnt + 1, sizeof(char *));
    f->meta_val = calloc((size_t)cnt + 1, sizeof(char *));
    if (!f->meta_key || !f->meta_val) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    for (const cJSON *e = m->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            return dm_fail(DM_ERR_FORMAT,
                           "%s: __metadata__: %s: value is not a string (metadata values must be "
                           "strings)",
                           f->path, e->string ? e->string : "?");
        f->meta_key[f->nmeta] = strdup(e->string ? e->string : "");
        f->meta_val[f->nmeta] = strdup(e->valuestring);
        f->nmeta++;
        if (!f->meta_key[f->nmeta - 1] || !f->meta_val[f->nmeta - 1])
            return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    }
    return DM_OK;
}

static dm_status parse_tensor(dm_st_file *f, const cJSON *e, dm_st_tensor *t, uint64_t *begin)
{
    const char *p = f->path, *nm = e->string;
    if (!cJSON_IsObject(e)) return dm_fail(DM_ERR_FORMAT, "%s: %s: entry is not an object", p, nm);
    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jd))
        return dm_fail(DM_ERR_FORMAT, "%s: %s: missing or non-string \"dtype\"", p, nm);
    if (dm_dtype_from_name(jd->valuestring, &t->dtype) != 0)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: unsupported dtype (expected F32, F16, BF16, I32, I64, U8 or I8, found %s)",
                       p, nm, jd->valuestring);
    if (!cJSON_IsArray(js))
        return dm_fail(DM_ERR_FORMAT, "%s: %s: missing or non-array \"shape\"", p, nm);
    int nd = cJSON_GetArraySize(js);
    if (nd > DM_MAX_DIMS)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: too many dimensions (expected at most %d, found %d)",
                       p, nm, DM_MAX_DIMS, nd);
    t->ndim = nd;
    uint64_t count = 1;
    int i = 0;
    for (const cJSON *d = js->child; d; d = d->next, i++) {
        uint64_t v;
        if (!json_uint(d, &v) || v > (uint64_t)INT64_MAX)
            return dm_fail(DM_ERR_FORMAT,
                           "%s: %s: bad shape entry %d (expected a non-negative integer)", p, nm, i);
        t->shape[i] = (int64_t)v;
        if (__builtin_mul_overflow(count, v, &count))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: shape overflows", p, nm);
    }
    uint64_t b, en;
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 || !json_uint(jo->child, &b) ||
        !json_uint(jo->child->next, &en))
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: bad \"data_offsets\" (expected [begin, end] of non-negative integers)",
                       p, nm);
    if (b > en || en > f->data_size)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: data_offsets out of range (expected begin <= end <= %zu, found "
                       "[%llu,%llu])",
                       p, nm, f->data_size, (unsigned long long)b, (unsigned long long)en);
    uint64_t need;
    if (__builtin_mul_overflow(count, (uint64_t)dm_dtype_size(t->dtype), &need) || need != en - b) {
        char sh[160];
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: data size mismatch (expected %llu bytes for %s %s, found %llu)", p, nm,
                       (unsigned long long)need, jd->valuestring,
                       dm_fmt_shape(sh, sizeof sh, t->ndim, t->shape),
                       (unsigned long long)(en - b));
    }
    t->data = f->data + b;
    t->nbytes = (size_t)(en - b);
    *begin = b;
    return DM_OK;
}

dm_status dm_st_index(dm_st_file *f)
{
    name_idx *ni = malloc(((size_t)f->n + 1) * sizeof *ni);
    if (!ni) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    for (int i = 0; i < f->n; i++) ni[i] = (name_idx){f->t[i].name, i};
    qsort(ni, (size_t)f->n, sizeof *ni, cmp_name_idx);
    for (int i = 0; i < f->n; i++) f->by_name[i] = ni[i].idx;
    free(ni);
    for (int i = 1; i < f->n; i++)
        if (strcmp(f->t[f->by_name[i]].name, f->t[f->by_name[i - 1]].name) == 0)
            return dm_fail(DM_ERR_FORMAT, "%s: %s: tensor %s", f->path, f->t[f->by_name[i]].name,
                           f->is_pt ? "appears twice after stripping module./model. prefixes"
                                    : "appears twice in the header");
    return DM_OK;
}

int dm_st_is_pt(const dm_st_file *f) { return f->is_pt; }

typedef struct {
    uint64_t begin, end;
    int idx;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static dm_status parse_header(dm_st_file *f, const char *json, size_t len)
{
    const char *p = f->path;
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long off = (at && at >= json && at <= json + len) ? (long)(at - json) : -1;
        return dm_fail(DM_ERR_FORMAT, "%s: header: malformed JSON (error near byte %ld of %zu)", p,
                       off, len);
    }
    dm_status st = DM_OK;
    span *sp = NULL;
    if (!cJSON_IsObject(root)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header: not a JSON object", p);
        goto done;
    }
    int cnt = cJSON_GetArraySize(root);
    f->t = calloc((size_t)cnt + 1, sizeof *f->t);
    f->by_name = calloc((size_t)cnt + 1, sizeof *f->by_name);
    sp = calloc((size_t)cnt + 1, sizeof *sp);
    if (!f->t || !f->by_name || !sp) {
        st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", p);
        goto done;
    }
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!e->string) continue;
        if (strcmp(e->string, "__metadata__") == 0) {
            if (f->nmeta || f->meta_key) {
                st = dm_fail(DM_ERR_FORMAT, "%s: __metadata__: appears twice", p);
                goto done;
            }
            if ((st = parse_metadata(f, e)) != DM_OK) goto done;
            continue;
        }
        dm_st_tensor *t = &f->t[f->n];
        uint64_t b = 0;
        if ((st = parse_tensor(f, e, t, &b)) != DM_OK) goto done;
        if (!(t->name = strdup(e->string))) {
            st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", p);
            goto done;
        }
        sp[f->n] = (span){b, b + t->nbytes, f->n};
        f->n++;
    }
    if ((st = dm_st_index(f)) != DM_OK) goto done;
    /* Overlaps: sort non-empty spans by begin; each must start at or after the previous end. */
    int ns = 0;
    for (int i = 0; i < f->n; i++)
        if (sp[i].end > sp[i].begin) sp[ns++] = sp[i];
    qsort(sp, (size_t)ns, sizeof *sp, cmp_span);
    for (int i = 1; i < ns; i++)
        if (sp[i].begin < sp[i - 1].end) {
            st = dm_fail(DM_ERR_FORMAT,
                         "%s: %s: data overlaps tensor %s (expected begin >= %llu, found %llu)", p,
                         f->t[sp[i].idx].name, f->t[sp[i - 1].idx].name,
                         (unsigned long long)sp[i - 1].end, (unsigned long long)sp[i].begin);
            goto done;
        }
done:
    free(sp);
    cJSON_Delete(root);
    return st;
}

dm_status dm_st_open(const char *path, dm_st_file **out)
{
    return dm_st_open_opts(path, NULL, out);
}

dm_status dm_st_open_opts(const char *path, const dm_config_overrides *ov, dm_st_file **out)
{
    *out = NULL;
    dm_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    }
    dm_status st = DM_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        st = dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = dm_fail(DM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = dm_fail(DM_ERR_IO, "%s: not a regular file", path);
        close(fd);
        goto fail;
    }
    if (sb.st_size < 8) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: file too short for a safetensors header or a PyTorch checkpoint "
                     "(expected >= 8 bytes, found %lld)",
                     path, (long long)sb.st_size);
        close(fd);
        goto fail;
    }
    f->size = (size_t)sb.st_size;
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        st = dm_fail(DM_ERR_IO, "%s: cannot mmap: %s", path, strerror(errno));
        goto fail;
    }
    if (ov && dm_config_overrides_any(ov)) {
        f->ov = *ov;
        f->has_overrides = 1;
    }
    const uint8_t *b = f->map;
    if (dm_pt_magic(b, f->size)) { /* a torch.save file (.pt/.pth): pt.c */
        if ((st = dm_pt_fill(f)) != DM_OK) goto fail;
        *out = f;
        return DM_OK;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    if (hlen > f->size - 8) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: header length past end of file (expected <= %zu, found %llu)", path,
                     f->size - 8, (unsigned long long)hlen);
        goto fail;
    }
    if (hlen > ST_MAX_HEADER) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header too large (expected <= %llu bytes, found %llu)",
                     path, (unsigned long long)ST_MAX_HEADER, (unsigned long long)hlen);
        goto fail;
    }
    f->data = b + 8 + hlen;
    f->data_size = f->size - 8 - (size_t)hlen;
    if ((st = parse_header(f, (const char *)b + 8, (size_t)hlen)) != DM_OK) goto fail;
    *out = f;
    return DM_OK;
fail:
    dm_st_close(f);
    return st;
}

dm_status dm_st_check_shape(const dm_st_file *f, const char *name, int ndim, const int64_t *shape)
{
    const dm_st_tensor *t = dm_st_find(f, name);
    if (!t) return dm_fail(DM_ERR_FORMAT, "%s: missing tensor %s", f->path, name);
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    /* int4 experts (docs/format.md): U8 [out, in/2] holds the logical [out, in] */
    if (!same && ndim == 2 && t->ndim == 2 && t->dtype == DM_U8 && dm_st_quant_bits(f) == 4 &&
        t->shape[0] == shape[0] && shape[1] % 2 == 0 && t->shape[1] == shape[1] / 2)
        same = 1;
    if (!same) {
        char a[160], e[160];
        return dm_fail(DM_ERR_FORMAT, "%s: %s: shape %s expected %s", f->path, name,
                       dm_fmt_shape(a, sizeof a, t->ndim, t->shape),
                       dm_fmt_shape(e, sizeof e, ndim, shape));
    }
    return DM_OK;
}

dm_status dm_st_load_f32(const dm_st_file *f, const char *name, int ndim, const int64_t *shape,
                         float **out)
{
    *out = NULL;
    dm_status st = dm_st_check_shape(f, name, ndim, shape);
    if (st != DM_OK) return st;
    const dm_st_tensor *t = dm_st_find(f, name);
    if (t->dtype != DM_F32 && t->dtype != DM_F16 && t->dtype != DM_BF16)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s expected F32, F16 or BF16", f->path, name,
                       dm_dtype_name(t->dtype));
    size_t n = t->nbytes / dm_dtype_size(t->dtype);
    float *buf = malloc(n ? n * sizeof(float) : 1);
    if (!buf)
        return dm_fail(DM_ERR_NOMEM, "%s: %s: out of memory (%zu bytes)", f->path, name,
                       n * sizeof(float));
    if ((st = dm_convert_to_f32(t->dtype, t->data, n, buf)) != DM_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    return DM_OK;
}

int dm_st_quant_bits(const dm_st_file *f)
{
    const char *q = dm_st_meta(f, "quant_experts");
    return !q ? 0 : !strcmp(q, "int8") ? 8 : !strcmp(q, "int4") ? 4 : -1;
}

void dm_st_release(const dm_st_file *f, const dm_st_tensor *t)
{
    if (!f || !t || !f->map || !t->nbytes) return;
    const uintptr_t lo = (uintptr_t)f->map, hi = lo + f->size, a = (uintptr_t)t->data;
    if (a < lo || a + t->nbytes > hi) return; /* a converted / rearranged copy (.pt) */
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t b = a & ~(pg - 1), e = a + t->nbytes;
    (void)madvise((void *)b, e - b, MADV_DONTNEED); /* a hint: the data re-reads from the file */
}

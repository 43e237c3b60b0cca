/* .npy reader/writer: versions 1.0, 2.0 (and 3.0, same as 2.0 with a UTF-8 header), C order,
 * little-endian '<f4' '<i4' '<i8' '|u1'. Anything else is a one-line error naming the file.
 *
 * File: "\x93NUMPY" | major | minor | header length (u16 LE for 1.x, u32 LE for 2.x/3.x) |
 * header (a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), })
 * padded with spaces and ending in '\n' | raw data.
 */
#include "io/atomic.h"
#include "io/st_internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c assumes a little-endian host"
#endif

#define NPY_MAX_HEADER (1u << 20)

static const struct {
    dm_dtype t;
    const char *descr;
    const char *numpy; /* numpy's name, used in messages */
} k_npy_types[] = {
    {DM_F32, "<f4", "float32"},
    {DM_I32, "<i4", "int32"},
    {DM_I64, "<i8", "int64"},
    {DM_U8, "|u1", "uint8"},
};
#define NPY_NTYPES ((int)(sizeof k_npy_types / sizeof k_npy_types[0]))

static const char *numpy_name(dm_dtype t)
{
    for (int i = 0; i < NPY_NTYPES; i++)
        if (k_npy_types[i].t == t) return k_npy_types[i].numpy;
    return dm_dtype_name(t);
}

/* ---- a tiny parser for the header's dict literal ---- */
typedef struct {
    const char *s, *end;
} cursor;

static void skip_ws(cursor *c)
{
    while (c->s < c->end && isspace((unsigned char)*c->s)) c->s++;
}

static int eat(cursor *c, char ch)
{
    skip_ws(c);
    if (c->s < c->end && *c->s == ch) {
        c->s++;
        return 1;
    }
    return 0;
}

/* A quoted string ('...' or "...") without escapes into buf. */
static int parse_str(cursor *c, char *buf, size_t cap)
{
    skip_ws(c);
    if (c->s >= c->end || (*c->s != '\'' && *c->s != '"')) return 0;
    char q = *c->s++;
    size_t n = 0;
    while (c->s < c->end && *c->s != q) {
        if (*c->s == '\\' || n + 1 >= cap) return 0;
        buf[n++] = *c->s++;
    }
    if (c->s >= c->end) return 0;
    c->s++;
    buf[n] = '\0';
    return 1;
}

static int parse_word(cursor *c, const char *w)
{
    skip_ws(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->s) >= n && memcmp(c->s, w, n) == 0) {
        c->s += n;
        return 1;
    }
    return 0;
}

/* "(3,)", "()", "(2, 4, 32, 32)", "(2,4)" */
static int parse_shape(cursor *c, int *ndim, int64_t *shape)
{
    if (!eat(c, '(')) return 0;
    int n = 0;
    for (;;) {
        skip_ws(c);
        if (eat(c, ')')) break;
        if (c->s >= c->end || !isdigit((unsigned char)*c->s) || n >= DM_MAX_DIMS) return 0;
        int64_t v = 0;
        while (c->s < c->end && isdigit((unsigned char)*c->s)) {
            if (v > (INT64_MAX - 9) / 10) return 0;
            v = v * 10 + (*c->s++ - '0');
        }
        if (c->s < c->end && (*c->s == 'L')) c->s++; /* Python 2 long suffix */
        shape[n++] = v;
        if (eat(c, ',')) continue;
        if (eat(c, ')')) break;
        return 0;
    }
    *ndim = n;
    return 1;
}

/* The header text for a message: control characters replaced, trailing padding dropped. */
static const char *header_excerpt(const char *h, size_t len, char *buf, size_t cap)
{
    while (len && isspace((unsigned char)h[len - 1])) len--;
    size_t n = 0;
    for (size_t i = 0; i < len && n + 4 < cap; i++)
        buf[n++] = (h[i] >= 32 && h[i] < 127) ? h[i] : '?';
    if (len >= cap - 4) buf[n++] = '.', buf[n++] = '.', buf[n++] = '.';
    buf[n] = '\0';
    return buf;
}

static dm_status parse_header(const char *path, const char *h, size_t len, char *descr,
                              size_t dcap, int *fortran, int *ndim, int64_t *shape)
{
    cursor c = {h, h + len};
    char ex[200];
    int got_d = 0, got_f = 0, got_s = 0;
    if (!eat(&c, '{')) goto bad;
    for (;;) {
        if (eat(&c, '}')) break;
        char key[64];
        if (!parse_str(&c, key, sizeof key) || !eat(&c, ':')) goto bad;
        if (strcmp(key, "descr") == 0) {
            if (!parse_str(&c, descr, dcap)) goto bad;
            got_d = 1;
        } else if (strcmp(key, "fortran_order") == 0) {
            if (parse_word(&c, "True")) *fortran = 1;
            else if (parse_word(&c, "False")) *fortran = 0;
            else goto bad;
            got_f = 1;
        } else if (strcmp(key, "shape") == 0) {
            if (!parse_shape(&c, ndim, shape))
                return dm_fail(DM_ERR_FORMAT, "%s: unparseable shape in .npy header: %s", path,
                               header_excerpt(h, len, ex, sizeof ex));
            got_s = 1;
        } else {
            return dm_fail(DM_ERR_FORMAT, "%s: unexpected key '%s' in .npy header", path, key);
        }
        if (eat(&c, ',')) continue;
        if (eat(&c, '}')) break;
        goto bad;
    }
    if (!got_d || !got_f || !got_s)
        return dm_fail(DM_ERR_FORMAT, "%s: .npy header lacks '%s'", path,
                       !got_d ? "descr" : !got_f ? "fortran_order" : "shape");
    return DM_OK;
bad:
    return dm_fail(DM_ERR_FORMAT, "%s: malformed .npy header: %s", path,
                   header_excerpt(h, len, ex, sizeof ex));
}

void dm_npy_free(dm_npy *a)
{
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

dm_status dm_npy_read(const char *path, dm_npy *out)
{
    memset(out, 0, sizeof *out);
    dm_status st = DM_OK;
    char *hdr = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = dm_fail(DM_ERR_IO, "%s: not a readable regular file", path);
        goto done;
    }
    uint64_t fsize = (uint64_t)sb.st_size;
    unsigned char pre[12];
    if (fsize < 10 || fread(pre, 1, 10, fp) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = dm_fail(DM_ERR_FORMAT, "%s: not a .npy file (missing \\x93NUMPY magic)", path);
        goto done;
    }
    int major = pre[6];
    uint64_t hlen, pos;
    if (major == 1) {
        hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8;
        pos = 10;
    } else if (major == 2 || major == 3) {
        if (fread(pre + 10, 1, 2, fp) != 2) {
            st = dm_fail(DM_ERR_FORMAT, "%s: truncated .npy header", path);
            goto done;
        }
        hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8 | (uint64_t)pre[10] << 16 |
               (uint64_t)pre[11] << 24;
        pos = 12;
    } else {
        st = dm_fail(DM_ERR_FORMAT, "%s: unsupported .npy version %d.%d (expected 1.0 or 2.0)",
                     path, major, pre[7]);
        goto done;
    }
    if (hlen > NPY_MAX_HEADER || pos + hlen > fsize) {
        st = dm_fail(DM_ERR_FORMAT, "%s: .npy header length %llu past end of file (%llu bytes)",
                     path, (unsigned long long)hlen, (unsigned long long)fsize);
        goto done;
    }
    hdr = malloc(hlen + 1);
    if (!hdr) {
        st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    if (fread(hdr, 1, hlen, fp) != hlen) {
        st = dm_fail(DM_ERR_IO, "%s: read error in .npy header", path);
        goto done;
    }
    hdr[hlen] = '\0';
    char descr[32];
    int fortran = 0;
    if ((st = parse_header(path, hdr, hlen, descr, sizeof descr, &fortran, &out->ndim,
                           out->shape)) != DM_OK)
        goto done;
    int ti = -1;
    for (int i = 0; i < NPY_NTYPES; i++)
        if (strcmp(descr, k_npy_types[i].descr) == 0) ti = i;
    if (ti < 0) {
        const char *why = descr[0] == '>' ? "big-endian, " : "";
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: unsupported dtype '%s' (%sexpected one of '<f4' '<i4' '<i8' '|u1')", path,
                     descr, why);
        goto done;
    }
    if (fortran) {
        st = dm_fail(DM_ERR_FORMAT, "%s: fortran_order is True (expected C order: save with "
                     "np.ascontiguousarray)", path);
        goto done;
    }
    out->dtype = k_npy_types[ti].t;
    uint64_t count = 1, nbytes;
    for (int i = 0; i < out->ndim; i++)
        if (__builtin_mul_overflow(count, (uint64_t)out->shape[i], &count)) {
            st = dm_fail(DM_ERR_FORMAT, "%s: shape overflows", path);
            goto done;
        }
    if (__builtin_mul_overflow(count, (uint64_t)dm_dtype_size(out->dtype), &nbytes) ||
        nbytes != fsize - pos - hlen) {
        char sh[160];
        st = dm_fail(DM_ERR_FORMAT, "%s: data size mismatch (expected %llu bytes for %s %s, found "
                     "%llu)", path, (unsigned long long)nbytes, k_npy_types[ti].numpy,
                     dm_fmt_shape(sh, sizeof sh, out->ndim, out->shape),
                     (unsigned long long)(fsize - pos - hlen));
        goto done;
    }
    out->count = (size_t)count;
    out->data = malloc(nbytes ? (size_t)nbytes : 1);
    if (!out->data) {
        st = dm_fail(DM_ERR_NOMEM, "%s: out of memory (%llu bytes)", path,
                     (unsigned long long)nbytes);
        goto done;
    }
    if (fread(out->data, 1, (size_t)nbytes, fp) != nbytes) {
        st = dm_fail(DM_ERR_IO, "%s: read error", path);
        goto done;
    }
done:
    free(hdr);
    fclose(fp);
    if (st != DM_OK) dm_npy_free(out);
    return st;
}

dm_status dm_npy_read_expect(const char *path, dm_dtype dtype, int ndim_expect, dm_npy *out)
{
    dm_status st = dm_npy_read(path, out);
    if (st != DM_OK) return st;
    if (out->dtype != dtype) {
        st = dm_fail(DM_ERR_FORMAT, "%s: dtype %s expected %s", path, numpy_name(out->dtype),
                     numpy_name(dtype));
    } else if (ndim_expect >= 0 && out->ndim != ndim_expect) {
        char sh[160];
        st = dm_fail(DM_ERR_FORMAT, "%s: rank %d (shape %s) expected rank %d", path, out->ndim,
                     dm_fmt_shape(sh, sizeof sh, out->ndim, out->shape), ndim_expect);
    }
    if (st != DM_OK) dm_npy_free(out);
    return st;
}

dm_status dm_npy_write(const char *path, dm_dtype dtype, int ndim, const int64_t *shape,
                       const void *data)
{
    int ti = -1;
    for (int i = 0; i < NPY_NTYPES; i++)
        if (k_npy_types[i].t == dtype) ti = i;
    if (ti < 0)
        return dm_fail(DM_ERR_ARG, "%s: cannot write dtype %s to .npy (expected F32, I32, I64 or U8)",
                       path, dm_dtype_name(dtype));
    if (ndim < 0 || ndim > DM_MAX_DIMS)
        return dm_fail(DM_ERR_ARG, "%s: rank %d out of range [0,%d]", path, ndim, DM_MAX_DIMS);
    uint64_t count = 1, nbytes;
    char dict[512];
    int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                     k_npy_types[ti].descr);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || __builtin_mul_overflow(count, (uint64_t)shape[i], &count))
            return dm_fail(DM_ERR_ARG, "%s: bad shape dimension %d", path, i);
        n += snprintf(dict + n, sizeof dict - (size_t)n, i ? ", %lld" : "%lld",
                      (long long)shape[i]);
    }
    n += snprintf(dict + n, sizeof dict - (size_t)n, "%s), }", ndim == 1 ? "," : "");
    if (__builtin_mul_overflow(count, (uint64_t)dm_dtype_size(dtype), &nbytes))
        return dm_fail(DM_ERR_ARG, "%s: shape overflows", path);
    /* Version 1.0 header: 10-byte preamble + dict + spaces + '\n', total a multiple of 64. */
    size_t total = 10 + (size_t)n + 1;
    total = (total + 63) / 64 * 64;
    size_t hlen = total - 10;
    unsigned char head[600];
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    head[8] = (unsigned char)(hlen & 0xff);
    head[9] = (unsigned char)(hlen >> 8);
    memcpy(head + 10, dict, (size_t)n);
    memset(head + 10 + n, ' ', hlen - (size_t)n - 1);
    head[total - 1] = '\n';

    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *fp = dm_atomic_open(path, tmp);
    if (!fp) return DM_ERR_WRITE;
    if (fwrite(head, 1, total, fp) != total ||
        (nbytes && fwrite(data, 1, (size_t)nbytes, fp) != nbytes)) {
        int e = errno;
        dm_atomic_abort(fp, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed: %s", path, strerror(e));
    }
    return dm_atomic_commit(fp, tmp, path);
}

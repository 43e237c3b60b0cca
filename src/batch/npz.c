/* .npz writer for the ADM evaluator: an uncompressed (STORED) zip of .npy members, streamed, with
 * ZIP64 records when a member or an offset passes 4 GiB - 1 (APPNOTE 6.3: local header 4.3.7,
 * central header 4.3.12, ZIP64 extra 4.5.3, ZIP64 end record 4.3.14 and locator 4.3.15). */
#include "batch/batch.h"
#include "io/atomic.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#define MAX_MEMBERS 8
#define U32_MAX 0xffffffffu
#define DOS_DATE 0x0021 /* 1980-01-01: fixed, so equal inputs give byte-equal archives */
#define DOS_TIME 0x0000

typedef struct {
    char name[64];    /* "arr_0.npy" */
    uint64_t offset;  /* of the local header */
    uint64_t size;    /* npy header + data (stored: compressed = uncompressed) */
    uint32_t crc;
    int zip64;        /* sizes in the ZIP64 extra field */
} member_t;

struct dm_npz {
    FILE *f;
    char path[4096], tmp[DM_ATOMIC_TMP_MAX];
    int force_zip64;
    member_t m[MAX_MEMBERS];
    int n;
    int open;           /* a member is being written */
    uint64_t pos;       /* bytes written to the file */
    uint64_t expect;    /* size of the open member's data payload */
    uint64_t got;
};

static void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static dm_status out(dm_npz *z, const void *p, size_t n)
{
    if (n && fwrite(p, 1, n, z->f) != n)
        return dm_fail(DM_ERR_WRITE, "%s: write failed: %s", z->path, strerror(errno));
    z->pos += n;
    return DM_OK;
}

size_t dm_npy_header(const char *descr, int ndim, const int64_t *shape, char *buf, size_t n)
{
    char dict[512], sh[256] = "";
    size_t used = 0;
    for (int i = 0; i < ndim && used < sizeof sh; i++)
        used += (size_t)snprintf(sh + used, sizeof sh - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    int dl = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%s%s), }",
                      descr, sh, ndim == 1 ? "," : "");
    if (dl < 0 || (size_t)dl >= sizeof dict) return 0;
    size_t total = 10 + (size_t)dl + 1; /* magic, version, u16 length, dict, '\n' */
    total = (total + 63) / 64 * 64;
    if (total > n || total - 10 > 0xffff) return 0;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    put16((uint8_t *)buf + 8, (uint32_t)(total - 10));
    memcpy(buf + 10, dict, (size_t)dl);
    memset(buf + 10 + dl, ' ', total - 10 - (size_t)dl - 1);
    buf[total - 1] = '\n';
    return total;
}

dm_status dm_npz_open(const char *path, int force_zip64, dm_npz **outp)
{
    *outp = NULL;
    dm_npz *z = calloc(1, sizeof *z);
    if (!z) return dm_fail(DM_ERR_NOMEM, "out of memory");
    snprintf(z->path, sizeof z->path, "%s", path);
    z->force_zip64 = force_zip64;
    z->f = dm_atomic_open(path, z->tmp);
    if (!z->f) {
        free(z);
        return DM_ERR_WRITE;
    }
    *outp = z;
    return DM_OK;
}

dm_status dm_npz_begin(dm_npz *z, const char *name, const char *descr, size_t itemsize, int ndim,
                       const int64_t *shape)
{
    if (z->open || z->n >= MAX_MEMBERS)
        return dm_fail(DM_ERR_ARG, "%s: npz member %s: previous member not ended or too many",
                       z->path, name);
    char hdr[1024];
    size_t hl = dm_npy_header(descr, ndim, shape, hdr, sizeof hdr);
    if (!hl) return dm_fail(DM_ERR_ARG, "%s: npz member %s: header too long", z->path, name);
    uint64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && count > UINT64_MAX / 2 / (uint64_t)shape[i]))
            return dm_fail(DM_ERR_ARG, "%s: npz member %s: bad shape", z->path, name);
        count *= (uint64_t)shape[i];
    }
    member_t *m = &z->m[z->n];
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "%s.npy", name);
    m->offset = z->pos;
    m->size = hl + count * itemsize;
    m->zip64 = z->force_zip64 || m->size >= U32_MAX;
    z->expect = count * itemsize;
    z->got = 0;

    /* Local file header; the CRC (offset 14) is patched in dm_npz_end(). */
    const size_t nl = strlen(m->name), xl = m->zip64 ? 20 : 0;
    uint8_t h[30 + 64 + 20];
    put32(h, 0x04034b50);
    put16(h + 4, m->zip64 ? 45 : 20); /* version needed: 4.5 for ZIP64 */
    put16(h + 6, 0);                  /* flags */
    put16(h + 8, 0);                  /* method: stored */
    put16(h + 10, DOS_TIME);
    put16(h + 12, DOS_DATE);
    put32(h + 14, 0);                 /* CRC-32, patched */
    put32(h + 18, m->zip64 ? U32_MAX : (uint32_t)m->size);
    put32(h + 22, m->zip64 ? U32_MAX : (uint32_t)m->size);
    put16(h + 26, (uint32_t)nl);
    put16(h + 28, (uint32_t)xl);
    memcpy(h + 30, m->name, nl);
    if (m->zip64) {
        uint8_t *x = h + 30 + nl;
        put16(x, 0x0001);
        put16(x + 2, 16);
        put64(x + 4, m->size);  /* original size */
        put64(x + 12, m->size); /* compressed size */
    }
    dm_status st = out(z, h, 30 + nl + xl);
    if (st) return st;
    m->crc = dm_crc32(0, hdr, hl);
    if ((st = out(z, hdr, hl))) return st;
    z->open = 1;
    z->n++;
    return DM_OK;
}

dm_status dm_npz_write(dm_npz *z, const void *data, size_t n)
{
    if (!z->open) return dm_fail(DM_ERR_ARG, "%s: npz write outside a member", z->path);
    member_t *m = &z->m[z->n - 1];
    if (n > z->expect - z->got)
        return dm_fail(DM_ERR_ARG, "%s: %s: more data than its shape holds", z->path, m->name);
    m->crc = dm_crc32(m->crc, data, n);
    z->got += n;
    return out(z, data, n);
}

dm_status dm_npz_end(dm_npz *z)
{
    if (!z->open) return dm_fail(DM_ERR_ARG, "%s: npz end without a member", z->path);
    member_t *m = &z->m[z->n - 1];
    if (z->got != z->expect)
        return dm_fail(DM_ERR_ARG, "%s: %s: %llu data bytes written, shape needs %llu", z->path,
                       m->name, (unsigned long long)z->got, (unsigned long long)z->expect);
    uint8_t c[4];
    put32(c, m->crc);
    if (fseeko(z->f, (off_t)(m->offset + 14), SEEK_SET) != 0 || fwrite(c, 1, 4, z->f) != 4 ||
        fseeko(z->f, 0, SEEK_END) != 0)
        return dm_fail(DM_ERR_WRITE, "%s: cannot patch the CRC of %s: %s", z->path, m->name,
                       strerror(errno));
    z->open = 0;
    return DM_OK;
}

dm_status dm_npz_close(dm_npz *z)
{
    dm_status st = DM_OK;
    if (z->open) {
        st = dm_fail(DM_ERR_ARG, "%s: npz closed inside member %s", z->path, z->m[z->n - 1].name);
        goto fail;
    }
    const uint64_t cd_offset = z->pos;
    int any64 = z->force_zip64;
    for (int i = 0; i < z->n; i++) {
        const member_t *m = &z->m[i];
        const int big_off = z->force_zip64 || m->offset >= U32_MAX;
        const size_t nl = strlen(m->name);
        /* ZIP64 extra: only the fields whose header slot says 0xffffffff, in this order. */
        uint8_t x[4 + 24];
        size_t xl = 0;
        if (m->zip64 || big_off) {
            xl = 4;
            if (m->zip64) {
                put64(x + xl, m->size);
                put64(x + xl + 8, m->size);
                xl += 16;
            }
            if (big_off) {
                put64(x + xl, m->offset);
                xl += 8;
            }
            put16(x, 0x0001);
            put16(x + 2, (uint32_t)(xl - 4));
            any64 = 1;
        }
        uint8_t h[46 + 64];
        put32(h, 0x02014b50);
        put16(h + 4, 45);                              /* made by: 4.5, MS-DOS attributes */
        put16(h + 6, m->zip64 || big_off ? 45 : 20);   /* needed */
        put16(h + 8, 0);
        put16(h + 10, 0);
        put16(h + 12, DOS_TIME);
        put16(h + 14, DOS_DATE);
        put32(h + 16, m->crc);
        put32(h + 20, m->zip64 ? U32_MAX : (uint32_t)m->size);
        put32(h + 24, m->zip64 ? U32_MAX : (uint32_t)m->size);
        put16(h + 28, (uint32_t)nl);
        put16(h + 30, (uint32_t)xl);
        put16(h + 32, 0); /* comment */
        put16(h + 34, 0); /* disk */
        put16(h + 36, 0); /* internal attributes */
        put32(h + 38, 0); /* external attributes */
        put32(h + 42, big_off ? U32_MAX : (uint32_t)m->offset);
        memcpy(h + 46, m->name, nl);
        if ((st = out(z, h, 46 + nl)) || (st = out(z, x, xl))) goto fail;
    }
    const uint64_t cd_size = z->pos - cd_offset;
    if (cd_offset >= U32_MAX || cd_size >= U32_MAX) any64 = 1;
    if (any64) {
        const uint64_t eocd64 = z->pos;
        uint8_t r[56 + 20];
        put32(r, 0x06064b50);
        put64(r + 4, 44); /* size of the rest of this record */
        put16(r + 12, 45);
        put16(r + 14, 45);
        put32(r + 16, 0);
        put32(r + 20, 0);
        put64(r + 24, (uint64_t)z->n);
        put64(r + 32, (uint64_t)z->n);
        put64(r + 40, cd_size);
        put64(r + 48, cd_offset);
        put32(r + 56, 0x07064b50); /* locator */
        put32(r + 60, 0);
        put64(r + 64, eocd64);
        put32(r + 72, 1);          /* total disks */
        if ((st = out(z, r, sizeof r))) goto fail;
    }
    uint8_t e[22];
    put32(e, 0x06054b50);
    put16(e + 4, 0);
    put16(e + 6, 0);
    put16(e + 8, (uint32_t)z->n);
    put16(e + 10, (uint32_t)z->n);
    put32(e + 12, any64 && (z->force_zip64 || cd_size >= U32_MAX) ? U32_MAX : (uint32_t)cd_size);
    put32(e + 16, any64 && (z->force_zip64 || cd_offset >= U32_MAX) ? U32_MAX : (uint32_t)cd_offset);
    put16(e + 20, 0);
    if ((st = out(z, e, sizeof e))) goto fail;
    st = dm_atomic_commit(z->f, z->tmp, z->path);
    free(z);
    return st;
fail:
    dm_npz_abort(z);
    return st;
}

void dm_npz_abort(dm_npz *z)
{
    if (!z) return;
    dm_atomic_abort(z->f, z->tmp);
    free(z);
}

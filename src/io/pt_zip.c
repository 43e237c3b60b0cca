/* The zip directory of a torch.save file: end-of-central-directory record (ZIP64 when present),
 * central directory entries, and each entry's local header, every offset and length checked
 * against the file. Entries must be stored (method 0, as torch.save writes them); CRCs are not
 * verified (that would read every weight; the mapping is only touched where tensors are used). */
#include "io/pt_internal.h"

#include <stdlib.h>
#include <string.h>

static uint64_t rd(const uint8_t *q, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | q[i];
    return v;
}

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const pz_entry *)a)->name, ((const pz_entry *)b)->name);
}

void dm_zip_free(pz_dir *z)
{
    for (int i = 0; i < z->n; i++) free(z->e[i].name);
    free(z->e);
    memset(z, 0, sizeof *z);
}

const pz_entry *dm_zip_find(const pz_dir *z, const char *name)
{
    pz_entry key = {.name = (char *)name};
    return z->n ? bsearch(&key, z->e, (size_t)z->n, sizeof key, cmp_entry) : NULL;
}

/* Values of the ZIP64 extra field (id 1) that replace 0xFFFFFFFF fields, in order. */
static int zip64_extra(const uint8_t *x, size_t xlen, uint64_t *vals[3])
{
    size_t o = 0;
    while (o + 4 <= xlen) {
        unsigned id = (unsigned)rd(x + o, 2), sz = (unsigned)rd(x + o + 2, 2);
        if (o + 4 + sz > xlen) return -1;
        if (id == 1) {
            size_t k = 0;
            for (int i = 0; i < 3; i++)
                if (vals[i] && *vals[i] == 0xFFFFFFFFu) {
                    if (k + 8 > sz) return -1;
                    *vals[i] = rd(x + o + 4 + k, 8);
                    k += 8;
                }
            return 0;
        }
        o += 4 + sz;
    }
    for (int i = 0; i < 3; i++)
        if (vals[i] && *vals[i] == 0xFFFFFFFFu) return -1;
    return 0;
}

dm_status dm_zip_read(const char *path, const uint8_t *b, size_t size, pz_dir *z)
{
    memset(z, 0, sizeof *z);
    if (size < 22) return dm_fail(DM_ERR_FORMAT, "%s: zip: too short for an end record", path);
    size_t eocd = (size_t)-1;
    size_t lo = size > 22 + 65535 ? size - 22 - 65535 : 0;
    for (size_t i = size - 22 + 1; i-- > lo;)
        if (rd(b + i, 4) == 0x06054b50u && i + 22 + rd(b + i + 20, 2) <= size) {
            eocd = i;
            break;
        }
    if (eocd == (size_t)-1)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: zip: no end-of-central-directory record (truncated file?)", path);
    uint64_t count = rd(b + eocd + 10, 2), cd_size = rd(b + eocd + 12, 4),
             cd_off = rd(b + eocd + 16, 4);
    if (count == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
        if (eocd < 20 || rd(b + eocd - 20, 4) != 0x07064b50u)
            return dm_fail(DM_ERR_FORMAT, "%s: zip: ZIP64 locator missing", path);
        uint64_t e64 = rd(b + eocd - 20 + 8, 8);
        if (e64 > size - 56 || rd(b + e64, 4) != 0x06064b50u)
            return dm_fail(DM_ERR_FORMAT, "%s: zip: ZIP64 end record out of range or corrupt",
                           path);
        count = rd(b + e64 + 32, 8);
        cd_size = rd(b + e64 + 40, 8);
        cd_off = rd(b + e64 + 48, 8);
    }
    if (cd_off > size || cd_size > size - cd_off)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: zip: central directory [%llu, +%llu) past the end of the file (%zu "
                       "bytes; truncated?)",
                       path, (unsigned long long)cd_off, (unsigned long long)cd_size, size);
    if (count > cd_size / 46)
        return dm_fail(DM_ERR_FORMAT, "%s: zip: %llu entries do not fit a %llu-byte directory",
                       path, (unsigned long long)count, (unsigned long long)cd_size);
    z->e = calloc((size_t)count + 1, sizeof *z->e);
    if (!z->e) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    const uint8_t *c = b + cd_off, *cend = c + cd_size;
    for (uint64_t k = 0; k < count; k++) {
        if (cend - c < 46 || rd(c, 4) != 0x02014b50u) {
            dm_zip_free(z);
            return dm_fail(DM_ERR_FORMAT, "%s: zip: central directory entry %llu corrupt", path,
                           (unsigned long long)k);
        }
        size_t nl = (size_t)rd(c + 28, 2), xl = (size_t)rd(c + 30, 2), cl = (size_t)rd(c + 32, 2);
        if ((size_t)(cend - c) < 46 + nl + xl + cl) {
            dm_zip_free(z);
            return dm_fail(DM_ERR_FORMAT, "%s: zip: central directory entry %llu truncated", path,
                           (unsigned long long)k);
        }
        uint64_t csz = rd(c + 20, 4), usz = rd(c + 24, 4), lho = rd(c + 42, 4);
        uint64_t *v[3] = {&usz, &csz, &lho};
        pz_entry *e = &z->e[z->n];
        e->name = malloc(nl + 1);
        if (!e->name) {
            dm_zip_free(z);
            return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
        }
        memcpy(e->name, c + 46, nl);
        e->name[nl] = '\0';
        z->n++;
        if (zip64_extra(c + 46 + nl, xl, v)) {
            dm_status st = dm_fail(DM_ERR_FORMAT, "%s: zip: %s: bad ZIP64 extra field", path, e->name);
            dm_zip_free(z);
            return st;
        }
        e->method = (int)rd(c + 10, 2);
        e->flags = (int)rd(c + 8, 2);
        /* The local header: its own name/extra lengths decide where the data starts. */
        if (lho > size || size - lho < 30 || rd(b + lho, 4) != 0x04034b50u) {
            dm_status st = dm_fail(DM_ERR_FORMAT,
                                   "%s: zip: %s: local header at %llu out of range or corrupt",
                                   path, e->name, (unsigned long long)lho);
            dm_zip_free(z);
            return st;
        }
        uint64_t ln = rd(b + lho + 26, 2), lx = rd(b + lho + 28, 2);
        uint64_t data = lho + 30 + ln + lx;
        if (ln != nl || data > size || memcmp(b + lho + 30, c + 46, nl) != 0) {
            dm_status st = dm_fail(DM_ERR_FORMAT,
                                   "%s: zip: %s: local header does not match the directory", path,
                                   e->name);
            dm_zip_free(z);
            return st;
        }
        if (e->method == 0 && csz != usz) {
            dm_status st = dm_fail(DM_ERR_FORMAT, "%s: zip: %s: stored entry with %llu bytes "
                                   "stored but %llu uncompressed", path, e->name,
                                   (unsigned long long)csz, (unsigned long long)usz);
            dm_zip_free(z);
            return st;
        }
        if (csz > size - data) {
            dm_status st = dm_fail(DM_ERR_FORMAT,
                                   "%s: zip: %s: data [%llu, +%llu) past the end of the file (%zu "
                                   "bytes; truncated?)",
                                   path, e->name, (unsigned long long)data,
                                   (unsigned long long)csz, size);
            dm_zip_free(z);
            return st;
        }
        e->offset = data;
        e->size = usz;
        c += 46 + nl + xl + cl;
    }
    qsort(z->e, (size_t)z->n, sizeof *z->e, cmp_entry);
    for (int i = 1; i < z->n; i++)
        if (!strcmp(z->e[i].name, z->e[i - 1].name)) {
            dm_status st = dm_fail(DM_ERR_FORMAT, "%s: zip: entry %s appears twice", path,
                                   z->e[i].name);
            dm_zip_free(z);
            return st;
        }
    return DM_OK;
}

/* PyTorch checkpoints (.pt/.pth) as a tensor table, without executing anything.
 *
 * Zip format (torch >= 1.6): entries <archive>/data.pkl (the pickled object; storages as
 * persistent ids ('storage', torch.XStorage, key, location, numel)) and <archive>/data/<key>
 * (each storage's raw little-endian bytes, stored uncompressed). Legacy format: pickles of the
 * magic number, protocol version and system info, the object (persistent ids with a 6th "view"
 * field), the list of storage keys, then per key an int64 element count and the raw bytes.
 *
 * The state dict is found as tools/convert_checkpoint.py finds it; only its tensors are looked
 * at, each checked against its storage (offset + extent within numel, numel within the entry).
 * Contiguous f32/f16/bf16/int tensors point into the mapping; non-contiguous ones are gathered
 * and float64 ones converted to float32 (as the converter stores them) into owned buffers. */
#include "io/pt_internal.h"
#include "io/st_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t k_legacy_magic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46,
                                         0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

int dm_pt_magic(const uint8_t *b, size_t size)
{
    if (size >= 4 && b[0] == 'P' && b[1] == 'K' && b[2] == 3 && b[3] == 4) return 1;
    if (size >= sizeof k_legacy_magic && !memcmp(b, k_legacy_magic, sizeof k_legacy_magic))
        return 2;
    return 0;
}

typedef struct {
    const char *key;
    const uint8_t *data;
    uint64_t size; /* bytes available for the storage */
} storage_src;

typedef struct {
    dm_st_file *f;
    pk_graph g;
    pz_dir z;
    char prefix[512]; /* zip: "<archive>/" */
    storage_src *leg; /* legacy: [nleg] */
    int nleg;
} pt_ctx;

static const char *const k_wrappers[] = {"ema_model_state_dict", "ema", "model", "module",
                                         "state_dict", "model_state_dict"};

static int ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && !strcmp(s + n - m, suf);
}

/* convert_checkpoint.unwrap: up to 4 levels of wrapper dicts. */
static dm_status unwrap(pt_ctx *c, int *out)
{
    const pk_graph *g = &c->g;
    int obj = g->root;
    for (int it = 0; it < 4; it++) {
        if (g->v[obj].kind != PV_DICT)
            return dm_fail(DM_ERR_FORMAT, "%s: checkpoint holds a %s, expected a dict (state dict)",
                           c->f->path, g->v[obj].kind == PV_LIST ? "list" : "non-dict value");
        const pv *d = &g->v[obj];
        int sd = 0;
        for (int i = 0; i + 1 < d->n && !sd; i += 2) {
            const pv *k = &g->v[d->items[i]];
            if (k->kind == PV_STR && ends_with(k->s, "x_embedder.proj.weight")) sd = 1;
        }
        if (sd) break;
        int next = 0;
        for (size_t w = 0; w < sizeof k_wrappers / sizeof *k_wrappers && !next; w++) {
            int v = dm_pickle_dict_get(g, obj, k_wrappers[w]);
            if (v && g->v[v].kind == PV_DICT) next = v;
        }
        if (!next) break;
        obj = next;
    }
    *out = obj;
    return DM_OK;
}

static dm_status storage_bytes(pt_ctx *c, const pv *s, const uint8_t **data, uint64_t *size)
{
    const char *p = c->f->path;
    if (c->leg) {
        for (int i = 0; i < c->nleg; i++)
            if (!strcmp(c->leg[i].key, s->s)) {
                *data = c->leg[i].data;
                *size = c->leg[i].size;
                return DM_OK;
            }
        return dm_fail(DM_ERR_FORMAT, "%s: storage %s: not in the file's storage list", p, s->s);
    }
    char name[1024];
    snprintf(name, sizeof name, "%sdata/%s", c->prefix, s->s);
    const pz_entry *e = dm_zip_find(&c->z, name);
    if (!e) return dm_fail(DM_ERR_FORMAT, "%s: zip: entry %s missing (storage %s)", p, name, s->s);
    if (e->method != 0 || (e->flags & 1))
        return dm_fail(DM_ERR_FORMAT,
                       "%s: zip: %s: %s entry (torch.save stores storages uncompressed; resave "
                       "with torch.save)",
                       p, name, (e->flags & 1) ? "encrypted" : "compressed");
    *data = c->f->map ? (const uint8_t *)c->f->map + e->offset : NULL;
    *size = e->size;
    return DM_OK;
}

static dm_status own(dm_st_file *f, void *buf)
{
    void **o = realloc(f->owned, ((size_t)f->n_owned + 1) * sizeof *o);
    if (!o) {
        free(buf);
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    }
    f->owned = o;
    f->owned[f->n_owned++] = buf;
    return DM_OK;
}

/* One state-dict tensor into t (name already set). */
static dm_status add_tensor(pt_ctx *c, const pv *tv, dm_st_tensor *t)
{
    dm_st_file *f = c->f;
    const char *p = f->path, *nm = t->name;
    const pv *s = &c->g.v[tv->storage];
    static const int k_map[PT_NTYPES] = {DM_F32, DM_F16, DM_BF16, DM_F32, DM_I64,
                                         DM_I32, -1,     -1,      DM_U8,  -1};
    if (k_map[tv->dtype] < 0)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: unsupported dtype %s (expected float32, float16, bfloat16, "
                       "float64, int64, int32 or uint8)",
                       p, nm, dm_pt_dtype_names[tv->dtype]);
    const size_t es = dm_pt_dtype_size(tv->dtype);
    const uint8_t *data = NULL;
    uint64_t avail = 0;
    dm_status st = storage_bytes(c, s, &data, &avail);
    if (st) return st;
    uint64_t sbytes;
    if (__builtin_mul_overflow((uint64_t)s->i, (uint64_t)es, &sbytes) || sbytes > avail)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: storage %s holds %llu bytes, expected %llu (%lld %s elements)",
                       p, nm, s->s, (unsigned long long)avail,
                       (unsigned long long)((uint64_t)s->i * es), (long long)s->i,
                       dm_pt_dtype_names[tv->dtype]);
    /* Extent: offset + sum (shape-1)*stride must lie inside the storage. */
    uint64_t count = 1, last = (uint64_t)tv->i, tmp;
    int contiguous = 1;
    int64_t expect = 1;
    for (int d = tv->ndim - 1; d >= 0; d--) {
        if (__builtin_mul_overflow(count, (uint64_t)tv->shape[d], &count))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: shape overflows", p, nm);
        if (tv->shape[d] > 1 && tv->stride[d] != expect) contiguous = 0;
        if (tv->shape[d] > 0 &&
            (__builtin_mul_overflow((uint64_t)(tv->shape[d] - 1), (uint64_t)tv->stride[d], &tmp) ||
             __builtin_add_overflow(last, tmp, &last)))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: strides overflow", p, nm);
        if (__builtin_mul_overflow(expect, tv->shape[d], &expect)) expect = INT64_MAX;
    }
    t->ndim = tv->ndim;
    memcpy(t->shape, tv->shape, sizeof t->shape);
    if (count && last >= (uint64_t)s->i) {
        char sh[160];
        return dm_fail(DM_ERR_FORMAT,
                       "%s: %s: shape %s at storage offset %lld needs element %llu, but storage "
                       "%s has %lld elements",
                       p, nm, dm_fmt_shape(sh, sizeof sh, t->ndim, t->shape), (long long)tv->i,
                       (unsigned long long)last, s->s, (long long)s->i);
    }
    t->dtype = (dm_dtype)k_map[tv->dtype];
    size_t nbytes = (size_t)count * es;
    if (!count) {
        t->data = data;
        t->nbytes = 0;
        return DM_OK;
    }
    const uint8_t *src = data + (size_t)tv->i * es;
    if (contiguous && tv->dtype != PT_F64) {
        t->data = src;
        t->nbytes = nbytes;
        return DM_OK;
    }
    uint8_t *buf = malloc(nbytes);
    if (!buf) return dm_fail(DM_ERR_NOMEM, "%s: %s: out of memory (%zu bytes)", p, nm, nbytes);
    if (contiguous) {
        memcpy(buf, src, nbytes);
    } else { /* gather in row-major order */
        int64_t idx[DM_MAX_DIMS] = {0};
        for (uint64_t k = 0; k < count; k++) {
            int64_t off = 0;
            for (int d = 0; d < tv->ndim; d++) off += idx[d] * tv->stride[d];
            memcpy(buf + k * es, src + (size_t)off * es, es);
            for (int d = tv->ndim - 1; d >= 0; d--) {
                if (++idx[d] < tv->shape[d]) break;
                idx[d] = 0;
            }
        }
    }
    if (tv->dtype == PT_F64) { /* to float32 in place, round to nearest like torch's .float() */
        float *o = (float *)buf;
        for (uint64_t k = 0; k < count; k++) {
            double v;
            memcpy(&v, buf + k * 8, 8);
            o[k] = (float)v;
        }
        nbytes = (size_t)count * 4;
    }
    if ((st = own(f, buf))) return st;
    t->data = buf;
    t->nbytes = nbytes;
    return DM_OK;
}

/* Strip "module." / "model." prefixes repeatedly (convert_checkpoint.clean_state_dict). */
static const char *strip(const char *s)
{
    for (int changed = 1; changed;) {
        changed = 0;
        if (!strncmp(s, "module.", 7)) s += 7, changed = 1;
        if (!strncmp(s, "model.", 6)) s += 6, changed = 1;
    }
    return s;
}

static dm_status fill_table(pt_ctx *c, int sd)
{
    dm_st_file *f = c->f;
    const pv *d = &c->g.v[sd];
    f->t = calloc((size_t)d->n / 2 + 1, sizeof *f->t);
    f->by_name = calloc((size_t)d->n / 2 + 1, sizeof *f->by_name);
    if (!f->t || !f->by_name) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    for (int i = 0; i + 1 < d->n; i += 2) {
        const pv *k = &c->g.v[d->items[i]], *v = &c->g.v[d->items[i + 1]];
        if (v->kind != PV_TENSOR) continue; /* ints, strings, nested dicts: ignored */
        char num[32];
        const char *key = k->kind == PV_STR ? k->s : NULL;
        if (!key && k->kind == PV_INT) snprintf(num, sizeof num, "%lld", (long long)k->i), key = num;
        if (!key) continue;
        dm_st_tensor *t = &f->t[f->n];
        if (!(t->name = strdup(strip(key)))) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
        f->n++;
        dm_status st = add_tensor(c, v, t);
        if (st) return st;
    }
    return dm_st_index(f);
}

static dm_status read_legacy(pt_ctx *c, int *root)
{
    dm_st_file *f = c->f;
    const uint8_t *b = f->map;
    size_t pos = 0, used;
    pk_graph tmp;
    dm_status st;
    static const char *const what[3] = {"legacy magic", "legacy protocol", "legacy sys_info"};
    for (int i = 0; i < 3; i++) {
        if ((st = dm_pickle_load(f->path, what[i], b + pos, f->size - pos, 0, &tmp, &used)))
            return st;
        if (i == 2) {
            int le = dm_pickle_dict_get(&tmp, tmp.root, "little_endian");
            if (le && tmp.v[le].kind == PV_BOOL && !tmp.v[le].i) {
                dm_pickle_free(&tmp);
                return dm_fail(DM_ERR_FORMAT, "%s: big-endian legacy checkpoint not supported",
                               f->path);
            }
        }
        dm_pickle_free(&tmp);
        pos += used;
    }
    if ((st = dm_pickle_load(f->path, "legacy object pickle", b + pos, f->size - pos, 1, &c->g, &used)))
        return st;
    pos += used;
    if ((st = dm_pickle_load(f->path, "legacy storage keys", b + pos, f->size - pos, 0, &tmp, &used)))
        return st;
    pos += used;
    const pv *l = &tmp.v[tmp.root];
    if (l->kind != PV_LIST) {
        dm_pickle_free(&tmp);
        return dm_fail(DM_ERR_FORMAT, "%s: legacy storage keys: not a list", f->path);
    }
    c->leg = calloc((size_t)l->n + 1, sizeof *c->leg);
    if (!c->leg) {
        dm_pickle_free(&tmp);
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
    }
    /* Element sizes by key, from the storages the object pickle mentions. */
    st = DM_OK;
    for (int i = 0; i < l->n && st == DM_OK; i++) {
        const pv *k = &tmp.v[l->items[i]];
        size_t es = 0;
        for (int j = 1; j < c->g.nv && k->kind == PV_STR; j++)
            if (c->g.v[j].kind == PV_STORAGE && !strcmp(c->g.v[j].s, k->s))
                es = dm_pt_dtype_size(c->g.v[j].dtype);
        if (k->kind != PV_STR || !es) {
            st = dm_fail(DM_ERR_FORMAT, "%s: legacy storage keys: entry %d unknown", f->path, i);
            break;
        }
        if (f->size - pos < 8) {
            st = dm_fail(DM_ERR_FORMAT, "%s: storage %s: truncated (size field past the end)",
                         f->path, k->s);
            break;
        }
        uint64_t numel = 0, bytes;
        for (int q = 7; q >= 0; q--) numel = (numel << 8) | b[pos + q];
        pos += 8;
        if (__builtin_mul_overflow(numel, (uint64_t)es, &bytes) || bytes > f->size - pos) {
            st = dm_fail(DM_ERR_FORMAT,
                         "%s: storage %s: %llu elements past the end of the file (truncated?)",
                         f->path, k->s, (unsigned long long)numel);
            break;
        }
        char *key = strdup(k->s);
        if (!key || own(f, key)) {
            st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", f->path);
            break;
        }
        c->leg[c->nleg++] = (storage_src){key, b + pos, bytes};
        pos += (size_t)bytes;
    }
    dm_pickle_free(&tmp);
    *root = c->g.root;
    return st;
}

dm_status dm_pt_fill(dm_st_file *f)
{
    pt_ctx c = {.f = f};
    f->is_pt = 1;
    dm_status st;
    int kind = dm_pt_magic(f->map, f->size), root = 0;
    if (kind == 1) {
        if ((st = dm_zip_read(f->path, f->map, f->size, &c.z))) return st;
        const pz_entry *pkl = NULL;
        for (int i = 0; i < c.z.n; i++) {
            const char *n = c.z.e[i].name, *s = strchr(n, '/');
            if (s && !strcmp(s, "/data.pkl")) {
                pkl = &c.z.e[i];
                snprintf(c.prefix, sizeof c.prefix, "%.*s/", (int)(s - n), n);
                break;
            }
        }
        if (!pkl) {
            dm_zip_free(&c.z);
            return dm_fail(DM_ERR_FORMAT, "%s: zip: no <archive>/data.pkl entry (not a torch.save "
                           "file?)", f->path);
        }
        char bo[600];
        snprintf(bo, sizeof bo, "%sbyteorder", c.prefix);
        const pz_entry *boe = dm_zip_find(&c.z, bo);
        if (boe && boe->method == 0 && boe->size == 3 &&
            !memcmp((const uint8_t *)f->map + boe->offset, "big", 3)) {
            dm_zip_free(&c.z);
            return dm_fail(DM_ERR_FORMAT, "%s: big-endian checkpoint not supported", f->path);
        }
        if (pkl->method != 0) {
            dm_zip_free(&c.z);
            return dm_fail(DM_ERR_FORMAT, "%s: zip: data.pkl is compressed (torch.save stores it "
                           "uncompressed)", f->path);
        }
        st = dm_pickle_load(f->path, "data.pkl", (const uint8_t *)f->map + pkl->offset,
                            (size_t)pkl->size, 0, &c.g, NULL);
        root = c.g.root;
    } else {
        st = read_legacy(&c, &root);
    }
    int sd = 0;
    if (st == DM_OK) st = unwrap(&c, &sd);
    if (st == DM_OK) st = fill_table(&c, sd);
    dm_pickle_free(&c.g);
    dm_zip_free(&c.z);
    free(c.leg);
    (void)root;
    return st;
}

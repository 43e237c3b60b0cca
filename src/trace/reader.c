/* Routing dump reader: every offset, length, count and id is checked against the header, so a
 * truncated or corrupt file gives DM_ERR_FORMAT with the file and record named. */
#include "trace/format.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct dm_trace_reader {
    FILE *f;
    char *path;
    char *json;             /* header text, NUL-terminated */
    dm_trace_shape s;
    int T, idb;
    long records, next;     /* records promised by the header, records read */
    int prev_batch, prev_eval; /* of the last record read */
    uint64_t data_end;      /* offset of the JSON header */
    uint64_t pos;           /* offset of the next record */
    uint8_t *buf;           /* one payload */
    size_t cap_buf;
    dm_trace_record rec;
    int64_t *image, *label, *cls; /* [cap_rows] */
    float *t;               /* [cap_rows] */
    uint8_t *uncond;        /* [cap_rows] */
    int32_t *ids;           /* [Lm, R*T, k] */
    float *weights;         /* [Lm, R*T, k] */
    uint8_t *flags;         /* [Lm, R*T] */
    size_t cap_rows;
};

/* An integer field in [lo, hi]; the range is checked before the conversion to int. */
static int get_int(const cJSON *o, const char *key, int lo, int hi, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi) ||
        v->valuedouble != floor(v->valuedouble))
        return -1;
    *out = (int)v->valuedouble;
    return 0;
}

static dm_status parse_header(dm_trace_reader *r)
{
    const char *path = r->path;
    cJSON *h = cJSON_Parse(r->json);
    if (!h) return dm_fail(DM_ERR_FORMAT, "%s: the JSON header does not parse", path);
    dm_status st = DM_OK;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(h, "format");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(h, "shape");
    int version = 0, records = 0;
    dm_trace_shape *sh = &r->s;
    memset(sh, 0, sizeof *sh);
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "ditmoe-routing") ||
        get_int(h, "version", 0, 1000, &version)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header \"format\" must be \"ditmoe-routing\" with a "
                     "\"version\"", path);
        goto done;
    }
    if (version != DM_TRACE_VERSION) {
        st = dm_fail(DM_ERR_FORMAT, "%s: format version %d, expected %d", path, version,
                     DM_TRACE_VERSION);
        goto done;
    }
    const char *bad = !cJSON_IsObject(s) ? "shape"
                      : get_int(s, "layers", 1, DM_TRACE_MAX_LAYERS, &sh->layers) ? "shape.layers"
                      : get_int(s, "top_k", 1, 64, &sh->top_k) ? "shape.top_k"
                      : get_int(s, "experts", 1, 65533, &sh->num_experts) ? "shape.experts"
                      : get_int(s, "uncond_expert", -1, 65533, &sh->uncond_expert)
                          ? "shape.uncond_expert"
                      : get_int(s, "num_classes", 1, DM_MAX_CLASSES, &sh->num_classes)
                          ? "shape.num_classes"
                      : get_int(s, "steps", 0, DM_SAMPLE_MAX_STEPS, &sh->steps) ? "shape.steps"
                      : get_int(h, "records", 0, 1 << 30, &records) ? "records"
                                                                      : NULL;
    if (!bad) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(s, "grid");
        const cJSON *ml = cJSON_GetObjectItemCaseSensitive(s, "moe_layers");
        if (!cJSON_IsArray(g) || cJSON_GetArraySize(g) != 2 ||
            !cJSON_IsNumber(cJSON_GetArrayItem(g, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(g, 1)))
            bad = "shape.grid";
        else {
            /* Range first, then convert: (int)1e30 is undefined behaviour. */
            const double gh = cJSON_GetArrayItem(g, 0)->valuedouble,
                         gw = cJSON_GetArrayItem(g, 1)->valuedouble;
            if (!(gh >= 1 && gw >= 1 && gh <= (1 << 20) && gw <= (1 << 20) &&
                  gh * gw <= (1 << 20) && gh == floor(gh) && gw == floor(gw)))
                bad = "shape.grid";
            else {
                sh->grid_h = (int)gh;
                sh->grid_w = (int)gw;
            }
        }
        if (!bad && (!cJSON_IsArray(ml) || cJSON_GetArraySize(ml) != sh->layers)) bad = "shape.moe_layers";
        for (int l = 0; !bad && l < sh->layers; l++) {
            const cJSON *v = cJSON_GetArrayItem(ml, l);
            if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= 1e6) ||
                v->valuedouble != floor(v->valuedouble))
                bad = "shape.moe_layers";
            else sh->moe_layers[l] = (int)v->valuedouble;
        }
        const cJSON *heun = cJSON_GetObjectItemCaseSensitive(s, "heun");
        if (!bad && !cJSON_IsBool(heun)) bad = "shape.heun";
        sh->heun = cJSON_IsTrue(heun);
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(s, "weights");
        const cJSON *idt = cJSON_GetObjectItemCaseSensitive(s, "id_dtype");
        if (!bad && (!cJSON_IsString(w) || (strcmp(w->valuestring, "f16") &&
                                            strcmp(w->valuestring, "none"))))
            bad = "shape.weights";
        if (!bad) sh->weights = !strcmp(w->valuestring, "f16");
        if (!bad && sh->uncond_expert >= 0 && sh->uncond_expert < sh->num_experts)
            bad = "shape.uncond_expert";
        if (!bad && (!cJSON_IsString(idt) ||
                     strcmp(idt->valuestring, dm_trace_id_bytes(sh) == 1 ? "u8" : "u16")))
            bad = "shape.id_dtype";
    }
    if (bad) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header field \"%s\" missing or out of range", path, bad);
        goto done;
    }
    /* What the file can hold: every record has at least one row with Lm*T*k ids, so the
     * records promised must fit between the file head and the JSON header. */
    const uint64_t min_rec = DM_TRACE_REC_HEAD + DM_TRACE_ROW_BYTES +
                             (uint64_t)sh->layers * dm_trace_tokens(sh) * sh->top_k *
                                 dm_trace_id_bytes(sh);
    const uint64_t room = r->data_end - DM_TRACE_HEAD_BYTES;
    if ((uint64_t)records > room / min_rec) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header field \"records\" is %d, but the %llu record "
                     "bytes hold at most %llu records of this shape (truncated or corrupt)", path,
                     records, (unsigned long long)room, (unsigned long long)(room / min_rec));
        goto done;
    }
    r->records = records;
done:
    cJSON_Delete(h);
    return st;
}

dm_status dm_trace_read_open(const char *path, dm_trace_reader **out)
{
    *out = NULL;
    dm_trace_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    dm_status st = DM_OK;
    r->f = fopen(path, "rb");
    if (!r->f) {
        st = dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    setvbuf(r->f, NULL, _IOFBF, 1 << 20);
    uint8_t head[DM_TRACE_HEAD_BYTES];
    if (fseek(r->f, 0, SEEK_END) != 0) {
        st = dm_fail(DM_ERR_IO, "%s: cannot seek", path);
        goto fail;
    }
    const long size = ftell(r->f);
    rewind(r->f);
    if (size < DM_TRACE_HEAD_BYTES || fread(head, 1, sizeof head, r->f) != sizeof head ||
        memcmp(head, DM_TRACE_MAGIC, 8)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: not a ditmoe routing dump (no \"" DM_TRACE_MAGIC
                     "\" magic)", path);
        goto fail;
    }
    const uint64_t off = dm_get_u64(head + 8), len = dm_get_u64(head + 16);
    if (off == 0) {
        st = dm_fail(DM_ERR_FORMAT, "%s: unfinished dump (the writer never closed it)", path);
        goto fail;
    }
    if (off < DM_TRACE_HEAD_BYTES || len < 2 || len > (1u << 30) || off > (uint64_t)size ||
        len != (uint64_t)size - off) {
        st = dm_fail(DM_ERR_FORMAT, "%s: header at byte %llu, %llu bytes, but the file has %ld "
                     "bytes (truncated or corrupt)", path, (unsigned long long)off,
                     (unsigned long long)len, size);
        goto fail;
    }
    r->json = malloc(len + 1);
    if (!r->json) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory for a %llu-byte header", (unsigned long long)len);
        goto fail;
    }
    if (fseek(r->f, (long)off, SEEK_SET) != 0 || fread(r->json, 1, len, r->f) != len) {
        st = dm_fail(DM_ERR_FORMAT, "%s: cannot read the %llu-byte header", path,
                     (unsigned long long)len);
        goto fail;
    }
    r->json[len] = '\0';
    r->data_end = off;
    if ((st = parse_header(r))) goto fail;
    r->T = dm_trace_tokens(&r->s);
    r->idb = dm_trace_id_bytes(&r->s);
    r->pos = DM_TRACE_HEAD_BYTES;
    if (fseek(r->f, DM_TRACE_HEAD_BYTES, SEEK_SET) != 0) {
        st = dm_fail(DM_ERR_IO, "%s: cannot seek", path);
        goto fail;
    }
    *out = r;
    return DM_OK;
fail:
    dm_trace_read_close(r);
    return st;
}

const dm_trace_shape *dm_trace_read_shape(const dm_trace_reader *r) { return &r->s; }
const char *dm_trace_read_header(const dm_trace_reader *r) { return r->json; }
long dm_trace_read_count(const dm_trace_reader *r) { return r->records; }

static int grow(dm_trace_reader *r, size_t rows, size_t payload)
{
    if (payload > r->cap_buf) {
        uint8_t *nb = realloc(r->buf, payload);
        if (!nb) return -1;
        r->buf = nb;
        r->cap_buf = payload;
    }
    if (rows > r->cap_rows) {
        const size_t n = (size_t)r->s.layers * rows * r->T;
        free(r->image);
        free(r->label);
        free(r->cls);
        free(r->t);
        free(r->uncond);
        free(r->ids);
        free(r->weights);
        free(r->flags);
        r->cls = malloc(rows * sizeof(int64_t));
        r->image = malloc(rows * sizeof(int64_t));
        r->label = malloc(rows * sizeof(int64_t));
        r->t = malloc(rows * sizeof(float));
        r->uncond = malloc(rows);
        r->ids = malloc(n * r->s.top_k * sizeof(int32_t));
        r->weights = malloc(n * r->s.top_k * sizeof(float));
        r->flags = malloc(n);
        r->cap_rows = rows;
        if (!r->image || !r->label || !r->cls || !r->t || !r->uncond || !r->ids || !r->weights || !r->flags) {
            r->cap_rows = 0;
            return -1;
        }
    }
    return 0;
}

dm_status dm_trace_read_next(dm_trace_reader *r, const dm_trace_record **out)
{
    *out = NULL;
    const dm_trace_shape *s = &r->s;
    const char *path = r->path;
    const long idx = r->next;
    if (r->pos == r->data_end) {
        if (idx != r->records)
            return dm_fail(DM_ERR_FORMAT, "%s: %ld records, the header promises %ld", path, idx,
                           r->records);
        return DM_OK;
    }
    uint8_t head[DM_TRACE_REC_HEAD];
    if (r->data_end - r->pos < DM_TRACE_REC_HEAD || fread(head, 1, sizeof head, r->f) != sizeof head)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: truncated record head at byte %llu", path,
                       idx, (unsigned long long)r->pos);
    if (dm_get_u32(head) != DM_TRACE_REC_TAG)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: bad tag at byte %llu (corrupt dump)", path,
                       idx, (unsigned long long)r->pos);
    const uint32_t batch = dm_get_u32(head + 4), eval = dm_get_u32(head + 8),
                   step = dm_get_u32(head + 12), R = dm_get_u32(head + 16),
                   flags = dm_get_u32(head + 20);
    const uint64_t payload = dm_get_u64(head + 24);
    if (R < 1 || R > DM_TRACE_MAX_ROWS || (flags & ~DM_TRACE_FLAG_TOKFLAGS) || batch > 1u << 30 ||
        eval > 1u << 30 || step > 1u << 30)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: bad head (rows %u, flags %#x, batch %u, "
                       "eval %u, step %u)", path, idx, R, flags, batch, eval, step);
    const int first = idx == 0;
    if (first ? (batch != 0 || eval != 0)
              : !((batch == (uint32_t)r->prev_batch && eval == (uint32_t)r->prev_eval + 1) ||
                  (batch == (uint32_t)r->prev_batch + 1 && eval == 0)))
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: batch %u eval %u does not follow batch %d "
                       "eval %d (corrupt dump)", path, idx, batch, eval, r->prev_batch,
                       r->prev_eval);
    if (s->steps > 0 && (step >= (uint32_t)s->steps || step != (uint32_t)dm_trace_step_of_eval(s, (int)eval)))
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: step %u of eval %u does not fit %d %s "
                       "steps", path, idx, step, eval, s->steps, s->heun ? "heun" : "sampler");
    const size_t RT = (size_t)R * r->T, n = (size_t)s->layers * RT * s->top_k;
    const int tokflags = flags & DM_TRACE_FLAG_TOKFLAGS;
    const uint64_t expect = (uint64_t)R * DM_TRACE_ROW_BYTES + (uint64_t)n * r->idb +
                            (s->weights ? 2 * (uint64_t)n : 0) +
                            (tokflags ? (uint64_t)s->layers * RT : 0);
    if (payload != expect)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: payload of %llu bytes, expected %llu for "
                       "%u rows", path, idx, (unsigned long long)payload,
                       (unsigned long long)expect, R);
    if (payload > r->data_end - r->pos - DM_TRACE_REC_HEAD)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: truncated (%llu payload bytes, %llu left)",
                       path, idx, (unsigned long long)payload,
                       (unsigned long long)(r->data_end - r->pos - DM_TRACE_REC_HEAD));
    if (grow(r, R, payload))
        return dm_fail(DM_ERR_NOMEM, "out of memory for a record of %u rows", R);
    if (fread(r->buf, 1, payload, r->f) != payload)
        return dm_fail(DM_ERR_FORMAT, "%s: record %ld: truncated payload", path, idx);
    const uint8_t *p = r->buf;
    for (uint32_t i = 0; i < R; i++, p += DM_TRACE_ROW_BYTES) {
        r->image[i] = (int64_t)dm_get_u64(p);
        r->label[i] = (int32_t)dm_get_u32(p + 8);
        r->cls[i] = (int32_t)dm_get_u32(p + 12);
        uint32_t tb = dm_get_u32(p + 16), kind = dm_get_u32(p + 20);
        memcpy(&r->t[i], &tb, 4);
        /* kind: 0 conditional, 1 unconditional (null label), 2 self-contrast weak (its label) */
        if (r->label[i] < 0 || r->label[i] > s->num_classes || kind > 2 || r->cls[i] < 0 ||
            r->cls[i] >= s->num_classes || (kind != 1 && r->cls[i] != r->label[i]) ||
            (kind == 1) != (r->label[i] == s->num_classes))
            return dm_fail(DM_ERR_FORMAT, "%s: record %ld row %u: label %lld / class %lld / kind %u "
                           "do not fit %d classes", path, idx, i, (long long)r->label[i],
                           (long long)r->cls[i], kind,
                           s->num_classes);
        r->uncond[i] = (uint8_t)kind;
    }
    const uint32_t none = r->idb == 1 ? 0xFFu : 0xFFFFu;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = r->idb == 1 ? p[0] : (uint32_t)p[0] | (uint32_t)p[1] << 8;
        p += r->idb;
        if (v == none)
            r->ids[i] = -1;
        else if (v < (uint32_t)s->num_experts || (int)v == s->uncond_expert)
            r->ids[i] = (int32_t)v;
        else
            return dm_fail(DM_ERR_FORMAT, "%s: record %ld: expert id %u out of range [0,%d) "
                           "(layer %zu, row-token %zu)", path, idx, v, s->num_experts,
                           i / (RT * s->top_k), i / s->top_k % RT);
    }
    if (s->weights)
        for (size_t i = 0; i < n; i++, p += 2)
            r->weights[i] = dm_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
    if (tokflags) memcpy(r->flags, p, (size_t)s->layers * RT);
    r->pos += DM_TRACE_REC_HEAD + payload;
    r->prev_batch = (int)batch;
    r->prev_eval = (int)eval;
    r->next++;
    if (r->next > r->records)
        return dm_fail(DM_ERR_FORMAT, "%s: more records than the %ld the header promises", path,
                       r->records);
    dm_trace_record *rec = &r->rec;
    rec->batch = (int)batch;
    rec->eval = (int)eval;
    rec->step = (int)step;
    rec->rows = (int)R;
    rec->image = r->image;
    rec->label = r->label;
    rec->cls = r->cls;
    rec->t = r->t;
    rec->uncond = r->uncond;
    rec->ids = r->ids;
    rec->weights = s->weights ? r->weights : NULL;
    rec->token_flags = tokflags ? r->flags : NULL;
    *out = rec;
    return DM_OK;
}

void dm_trace_read_close(dm_trace_reader *r)
{
    if (!r) return;
    if (r->f) fclose(r->f);
    free(r->path);
    free(r->json);
    free(r->buf);
    free(r->image);
    free(r->label);
    free(r->cls);
    free(r->t);
    free(r->uncond);
    free(r->ids);
    free(r->weights);
    free(r->flags);
    free(r);
}

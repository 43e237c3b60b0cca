/* Routing dump writer and the tracing denoiser (format in format.h, docs/routing.md).
 * Records are streamed through a FILE buffer to "<path>.tmp.<pid>"; memory stays bounded by one
 * evaluation's record plus the image list kept for the header. */
#include "trace/format.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>

#define DM_TRACE_LIST_MAX 100000 /* images listed in the header (memory stays bounded) */
#include <stdlib.h>
#include <string.h>

struct dm_trace {
    FILE *f;
    char tmp[DM_ATOMIC_TMP_MAX];
    char *path;
    dm_trace_shape s;
    int T, idb;              /* tokens, bytes per id */
    cJSON *head;             /* header being built: model, sampler, class names */
    cJSON *notes;            /* notes object (owned by head) */
    cJSON *evals;            /* [{eval, step, t, rows}] of batch 0 (owned by head) */
    cJSON *img_index, *img_class, *img_batch; /* parallel arrays (owned by head) */
    /* current batch */
    int B, batch, eval;
    int64_t *y;              /* [B] */
    uint64_t *index;         /* [B] */
    int cap_B;
    long records, rows, images;
    uint64_t data_bytes;
    uint8_t *buf;            /* one record */
    size_t cap_buf;
    double seconds;
    dm_status failed;        /* sticky write failure */
    /* tracing denoiser */
    dm_model *m;
    int32_t *rids;           /* [Lm, R*T, k] routes from the forward */
    float *rw;               /* [Lm, R*T, k] */
    uint8_t *rflags;         /* [Lm, R*T] token flags */
    size_t cap_rt;           /* R*T the buffers hold */
};

int dm_trace_tokens(const dm_trace_shape *s) { return s->grid_h * s->grid_w; }

int dm_trace_step_of_eval(const dm_trace_shape *s, int eval)
{
    if (s->heun && s->steps > 0) return eval < 2 * (s->steps - 1) ? eval / 2 : s->steps - 1;
    return eval;
}

void dm_trace_shape_from_model(dm_trace_shape *s, const dm_config *cfg, const dm_sample_params *p)
{
    memset(s, 0, sizeof *s);
    const int promoe = cfg->arch == DM_ARCH_PROMOE;
    for (int l = 0; l < cfg->depth && s->layers < DM_TRACE_MAX_LAYERS; l++)
        if (!cfg->moe_interleave || l % 2 == 1) s->moe_layers[s->layers++] = l;
    s->grid_h = s->grid_w = cfg->patch > 0 ? cfg->input_size / cfg->patch : 0;
    s->top_k = cfg->top_k;
    s->num_experts = cfg->num_experts;
    s->uncond_expert = promoe ? cfg->num_experts : -1;
    s->num_classes = cfg->num_classes;
    s->steps = p ? p->steps : 0;
    s->heun = p && p->sampler == DM_SAMPLER_HEUN;
    s->weights = 1;
}

static dm_status check_shape(const dm_trace_shape *s, const char *path)
{
    const int X = s->uncond_expert >= 0 ? s->uncond_expert + 1 : s->num_experts;
    if (s->layers < 1 || s->layers > DM_TRACE_MAX_LAYERS || s->grid_h < 1 || s->grid_w < 1 ||
        (long)s->grid_h * s->grid_w > 1 << 20 || s->top_k < 1 || s->top_k > 64 ||
        s->num_experts < 1 || X > 65534 || s->num_classes < 1 || s->steps < 0 ||
        (s->uncond_expert >= 0 && s->uncond_expert < s->num_experts))
        return dm_fail(DM_ERR_ARG, "%s: bad trace shape (layers %d, grid %dx%d, k %d, E %d, "
                       "uncond %d, classes %d, steps %d)", path, s->layers, s->grid_h, s->grid_w,
                       s->top_k, s->num_experts, s->uncond_expert, s->num_classes, s->steps);
    return DM_OK;
}

static cJSON *model_json(const dm_config *cfg, const char *model_path)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    if (model_path) cJSON_AddStringToObject(o, "path", model_path);
    if (cfg) {
        cJSON_AddStringToObject(o, "name", cfg->name);
        cJSON_AddStringToObject(o, "arch", dm_arch_name(cfg->arch));
        cJSON_AddStringToObject(o, "objective", dm_objective_name(cfg->objective));
        cJSON_AddNumberToObject(o, "depth", cfg->depth);
        cJSON_AddNumberToObject(o, "hidden", cfg->hidden);
        cJSON_AddNumberToObject(o, "patch", cfg->patch);
        cJSON_AddNumberToObject(o, "input_size", cfg->input_size);
        cJSON_AddNumberToObject(o, "in_channels", cfg->in_channels);
        cJSON_AddStringToObject(o, "router", cfg->arch == DM_ARCH_PROMOE
                                                  ? "prototype-cosine (conditional/unconditional)"
                                                  : "softmax-top-k");
    }
    return o;
}

static cJSON *sampler_json(const dm_sample_params *p)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !p) return o;
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    cJSON_AddStringToObject(o, "name", dm_sampler_name(p->sampler));
    cJSON_AddNumberToObject(o, "steps", p->steps);
    cJSON_AddNumberToObject(o, "cfg_scale", p->cfg_scale);
    cJSON_AddNumberToObject(o, "cfg_channels", p->cfg_channels);
    cJSON *iv = cJSON_AddArrayToObject(o, "cfg_interval");
    if (iv) {
        cJSON_AddItemToArray(iv, cJSON_CreateNumber(p->cfg_t_lo));
        cJSON_AddItemToArray(iv, cJSON_CreateNumber(p->cfg_t_hi));
    }
    cJSON_AddNumberToObject(o, "eta", p->eta);
    cJSON_AddStringToObject(o, "seed", seed); /* string: a u64 does not fit a double */
    cJSON_AddStringToObject(o, "noise", "image i: dm_noise_normal(seed, i, stream)");
    char sc[96];
    dm_self_contrast_string(p, sc, sizeof sc);
    cJSON_AddStringToObject(o, "self_contrast", sc);
    return o;
}

dm_status dm_trace_open(const char *path, const dm_trace_shape *s, const dm_config *cfg,
                        const char *model_path, const dm_sample_params *p, dm_trace **out)
{
    *out = NULL;
    if (!path || !s) return dm_fail(DM_ERR_ARG, "dm_trace_open: bad arguments");
    dm_status st = check_shape(s, path);
    if (st) return st;
    dm_trace *tr = calloc(1, sizeof *tr);
    if (!tr) return dm_fail(DM_ERR_NOMEM, "out of memory");
    tr->s = *s;
    tr->T = dm_trace_tokens(s);
    tr->idb = dm_trace_id_bytes(s);
    tr->path = strdup(path);
    tr->head = cJSON_CreateObject();
    if (!tr->path || !tr->head) {
        dm_trace_abort(tr);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    cJSON_AddItemToObject(tr->head, "model", model_json(cfg, model_path));
    cJSON_AddItemToObject(tr->head, "sampler", sampler_json(p));
    if (cfg && cfg->class_names) {
        cJSON *names = cJSON_AddArrayToObject(tr->head, "class_names");
        for (int i = 0; names && i < cfg->num_classes; i++)
            cJSON_AddItemToArray(names, cJSON_CreateString(cfg->class_names[i]));
    }
    tr->notes = cJSON_AddObjectToObject(tr->head, "notes");
    tr->evals = cJSON_CreateArray();
    cJSON *images = cJSON_CreateObject();
    tr->img_index = cJSON_AddArrayToObject(images, "index");
    tr->img_class = cJSON_AddArrayToObject(images, "class");
    tr->img_batch = cJSON_AddArrayToObject(images, "batch");
    cJSON_AddItemToObject(tr->head, "images", images);
    cJSON_AddItemToObject(tr->head, "evals", tr->evals);
    if (!tr->notes || !tr->evals || !tr->img_index || !tr->img_class || !tr->img_batch) {
        dm_trace_abort(tr);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    tr->batch = -1;
    tr->f = dm_atomic_open(path, tr->tmp);
    if (!tr->f) {
        dm_trace_abort(tr);
        return DM_ERR_WRITE;
    }
    setvbuf(tr->f, NULL, _IOFBF, 1 << 20);
    uint8_t head[DM_TRACE_HEAD_BYTES] = {0};
    memcpy(head, DM_TRACE_MAGIC, 8); /* offsets stay 0 until dm_trace_close */
    if (fwrite(head, 1, sizeof head, tr->f) != sizeof head) {
        dm_trace_abort(tr);
        return dm_fail(DM_ERR_WRITE, "%s: write failed", path);
    }
    *out = tr;
    return DM_OK;
}

dm_status dm_trace_note(dm_trace *tr, const char *key, const char *value)
{
    if (!tr || !key || !value) return dm_fail(DM_ERR_ARG, "dm_trace_note: bad arguments");
    cJSON_DeleteItemFromObjectCaseSensitive(tr->notes, key);
    if (!cJSON_AddStringToObject(tr->notes, key, value))
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    return DM_OK;
}

dm_status dm_trace_batch(dm_trace *tr, int B, const int64_t *y, const uint64_t *index)
{
    if (!tr || B < 1 || B > DM_TRACE_MAX_ROWS || !y || !index)
        return dm_fail(DM_ERR_ARG, "dm_trace_batch: bad arguments (B = %d)", B);
    if (B > tr->cap_B) {
        int64_t *ny = realloc(tr->y, (size_t)B * sizeof *ny);
        if (ny) tr->y = ny;
        uint64_t *ni = realloc(tr->index, (size_t)B * sizeof *ni);
        if (ni) tr->index = ni;
        if (!ny || !ni) return dm_fail(DM_ERR_NOMEM, "out of memory");
        tr->cap_B = B;
    }
    for (int b = 0; b < B; b++) {
        if (y[b] < 0 || y[b] >= tr->s.num_classes)
            return dm_fail(DM_ERR_ARG, "%s: class %lld of image %llu out of range [0,%d)",
                           tr->path, (long long)y[b], (unsigned long long)index[b],
                           tr->s.num_classes);
        tr->y[b] = y[b];
        tr->index[b] = index[b];
    }
    tr->B = B;
    if (tr->batch < 0 || tr->eval > 0) tr->batch++; /* a batch without evals is replaced */
    tr->eval = 0;
    for (int b = 0; b < B; b++) { /* the header lists the first images; records have all */
        if (tr->images++ >= DM_TRACE_LIST_MAX) continue;
        cJSON_AddItemToArray(tr->img_index, cJSON_CreateNumber((double)index[b]));
        cJSON_AddItemToArray(tr->img_class, cJSON_CreateNumber((double)y[b]));
        cJSON_AddItemToArray(tr->img_batch, cJSON_CreateNumber(tr->batch));
    }
    return DM_OK;
}

dm_status dm_trace_write(dm_trace *tr, int R, const float *t, const int64_t *y,
                         const int32_t *ids, const float *weights, const uint8_t *token_flags)
{
    return dm_trace_write_rows(tr, R, t, y, NULL, ids, weights, token_flags);
}

dm_status dm_trace_write_rows(dm_trace *tr, int R, const float *t, const int64_t *y,
                              const uint8_t *kinds, const int32_t *ids, const float *weights,
                              const uint8_t *token_flags)
{
    if (!tr) return dm_fail(DM_ERR_ARG, "dm_trace_write: no trace");
    if (tr->failed) return tr->failed;
    const double t0 = dm_time_sec();
    const dm_trace_shape *s = &tr->s;
    if (tr->batch < 0)
        return dm_fail(DM_ERR_ARG, "%s: dm_trace_batch must be called before the first "
                       "evaluation", tr->path);
    if (R < 1 || R > DM_TRACE_MAX_ROWS || R % tr->B != 0 || !t || !y || !ids)
        return dm_fail(DM_ERR_ARG, "%s: evaluation of %d rows for a batch of %d images "
                       "(expected a multiple)", tr->path, R, tr->B);
    const size_t RT = (size_t)R * tr->T, n = (size_t)s->layers * RT * s->top_k;
    const int use_w = s->weights && weights;
    const size_t need = DM_TRACE_REC_HEAD + (size_t)R * DM_TRACE_ROW_BYTES + n * tr->idb +
                        (s->weights ? 2 * n : 0) + (token_flags ? (size_t)s->layers * RT : 0);
    if (need > tr->cap_buf) {
        uint8_t *nb = realloc(tr->buf, need);
        if (!nb) return dm_fail(DM_ERR_NOMEM, "out of memory for a trace record (%zu bytes)", need);
        tr->buf = nb;
        tr->cap_buf = need;
    }
    uint8_t *p = tr->buf;
    const int step = dm_trace_step_of_eval(s, tr->eval);
    dm_put_u32(p + 0, DM_TRACE_REC_TAG);
    dm_put_u32(p + 4, (uint32_t)tr->batch);
    dm_put_u32(p + 8, (uint32_t)tr->eval);
    dm_put_u32(p + 12, (uint32_t)step);
    dm_put_u32(p + 16, (uint32_t)R);
    dm_put_u32(p + 20, token_flags ? DM_TRACE_FLAG_TOKFLAGS : 0);
    dm_put_u64(p + 24, need - DM_TRACE_REC_HEAD);
    p += DM_TRACE_REC_HEAD;
    for (int r = 0; r < R; r++, p += DM_TRACE_ROW_BYTES) {
        if (y[r] < 0 || y[r] > s->num_classes)
            return dm_fail(DM_ERR_ARG, "%s: label %lld of row %d out of range [0,%d]", tr->path,
                           (long long)y[r], r, s->num_classes);
        uint32_t kind = y[r] == s->num_classes;
        if (kinds && kinds[r] == DM_BRANCH_WEAK) {
            if (kind)
                return dm_fail(DM_ERR_ARG, "%s: weak row %d has the null label", tr->path, r);
            kind = 2;
        }
        uint32_t tb;
        memcpy(&tb, &t[r], 4);
        dm_put_u64(p, tr->index[r % tr->B]);
        dm_put_u32(p + 8, (uint32_t)y[r]);
        dm_put_u32(p + 12, (uint32_t)tr->y[r % tr->B]);
        dm_put_u32(p + 16, tb);
        dm_put_u32(p + 20, kind);
    }
    const uint32_t none = tr->idb == 1 ? 0xFFu : 0xFFFFu;
    for (size_t i = 0; i < n; i++) {
        const int32_t id = ids[i];
        if (id < -1 || (id >= s->num_experts && id != s->uncond_expert))
            return dm_fail(DM_ERR_ARG, "%s: expert id %d at layer %zu token %zu out of range "
                           "[-1,%d)", tr->path, id, i / (RT * s->top_k),
                           i / s->top_k % RT, s->num_experts);
        const uint32_t v = id < 0 ? none : (uint32_t)id;
        if (tr->idb == 1)
            *p++ = (uint8_t)v;
        else {
            p[0] = (uint8_t)v;
            p[1] = (uint8_t)(v >> 8);
            p += 2;
        }
    }
    if (s->weights)
        for (size_t i = 0; i < n; i++, p += 2) {
            const uint16_t h = use_w ? dm_f32_to_f16(weights[i]) : 0;
            p[0] = (uint8_t)h;
            p[1] = (uint8_t)(h >> 8);
        }
    if (token_flags) {
        memcpy(p, token_flags, (size_t)s->layers * RT);
        p += (size_t)s->layers * RT;
    }
    if (fwrite(tr->buf, 1, need, tr->f) != need) {
        tr->failed = dm_fail(DM_ERR_WRITE, "%s: write failed (disk full?)", tr->path);
        return tr->failed;
    }
    if (tr->batch == 0) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "eval", tr->eval);
        cJSON_AddNumberToObject(e, "step", step);
        cJSON_AddNumberToObject(e, "t", t[0]);
        cJSON_AddNumberToObject(e, "rows", R);
        cJSON_AddItemToArray(tr->evals, e);
    }
    tr->eval++;
    tr->records++;
    tr->rows += R;
    tr->data_bytes += need;
    tr->seconds += dm_time_sec() - t0;
    return DM_OK;
}

static cJSON *shape_json(const dm_trace_shape *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "layers", s->layers);
    cJSON *ml = cJSON_AddArrayToObject(o, "moe_layers");
    for (int l = 0; ml && l < s->layers; l++) cJSON_AddItemToArray(ml, cJSON_CreateNumber(s->moe_layers[l]));
    cJSON *g = cJSON_AddArrayToObject(o, "grid");
    if (g) {
        cJSON_AddItemToArray(g, cJSON_CreateNumber(s->grid_h));
        cJSON_AddItemToArray(g, cJSON_CreateNumber(s->grid_w));
    }
    cJSON_AddNumberToObject(o, "tokens", dm_trace_tokens(s));
    cJSON_AddNumberToObject(o, "top_k", s->top_k);
    cJSON_AddNumberToObject(o, "experts", s->num_experts);
    cJSON_AddNumberToObject(o, "uncond_expert", s->uncond_expert);
    cJSON_AddNumberToObject(o, "num_classes", s->num_classes);
    cJSON_AddNumberToObject(o, "steps", s->steps);
    cJSON_AddBoolToObject(o, "heun", s->heun);
    cJSON_AddStringToObject(o, "id_dtype", dm_trace_id_bytes(s) == 1 ? "u8" : "u16");
    cJSON_AddStringToObject(o, "weights", s->weights ? "f16" : "none");
    return o;
}

dm_status dm_trace_close(dm_trace *tr)
{
    if (!tr) return dm_fail(DM_ERR_ARG, "dm_trace_close: no trace");
    dm_status st = tr->failed;
    if (st) {
        dm_trace_abort(tr);
        return st;
    }
    cJSON *h = tr->head;
    cJSON_AddStringToObject(h, "format", "ditmoe-routing");
    cJSON_AddNumberToObject(h, "version", DM_TRACE_VERSION);
    cJSON_AddItemToObject(h, "shape", shape_json(&tr->s));
    cJSON_AddNumberToObject(h, "records", (double)tr->records);
    cJSON_AddNumberToObject(h, "batches", tr->batch + 1);
    cJSON_AddNumberToObject(h, "rows", (double)tr->rows);
    cJSON_AddNumberToObject(h, "images_total", (double)tr->images);
    cJSON_AddBoolToObject(h, "images_listed_all", tr->images <= DM_TRACE_LIST_MAX);
    cJSON_AddNumberToObject(h, "data_bytes", (double)tr->data_bytes);
    char *text = cJSON_PrintUnformatted(h);
    if (!text) {
        dm_trace_abort(tr);
        return dm_fail(DM_ERR_NOMEM, "out of memory for the trace header");
    }
    const size_t len = strlen(text);
    uint8_t off[16];
    dm_put_u64(off, DM_TRACE_HEAD_BYTES + tr->data_bytes);
    dm_put_u64(off + 8, len);
    if (fwrite(text, 1, len, tr->f) != len || fseek(tr->f, 8, SEEK_SET) != 0 ||
        fwrite(off, 1, 16, tr->f) != 16) {
        free(text);
        st = dm_fail(DM_ERR_WRITE, "%s: write failed (disk full?)", tr->path);
        dm_trace_abort(tr);
        return st;
    }
    free(text);
    st = dm_atomic_commit(tr->f, tr->tmp, tr->path);
    tr->f = NULL;
    tr->tmp[0] = '\0';
    dm_trace_abort(tr); /* frees the rest */
    return st;
}

void dm_trace_abort(dm_trace *tr)
{
    if (!tr) return;
    if (tr->f || tr->tmp[0]) dm_atomic_abort(tr->f, tr->tmp);
    cJSON_Delete(tr->head);
    free(tr->path);
    free(tr->y);
    free(tr->index);
    free(tr->buf);
    free(tr->rids);
    free(tr->rw);
    free(tr->rflags);
    free(tr);
}

double dm_trace_seconds(const dm_trace *tr) { return tr ? tr->seconds : 0.0; }

/* ------------------------------------------------------------------ tracing denoiser */

static dm_status trace_rows_fn(void *ctx, int B, const float *x, const float *t,
                               const int64_t *y, const dm_forward_rows *rows, float *out)
{
    dm_trace *tr = ctx;
    const dm_config *c = dm_model_config(tr->m);
    const dm_trace_shape *s = &tr->s;
    const size_t RT = (size_t)B * tr->T, k = (size_t)s->top_k;
    if (s->top_k != dm_model_route_slots(tr->m) || s->layers != dm_config_moe_layers(c) ||
        c->patch < 1 || tr->T != (c->input_size / c->patch) * (c->input_size / c->patch))
        return dm_fail(DM_ERR_ARG, "%s: trace shape (%d layers, k %d, %d tokens) does not fit "
                       "model %s (%d slots)", tr->path, s->layers, s->top_k, tr->T,
                       dm_model_path(tr->m), dm_model_route_slots(tr->m));
    if (RT > tr->cap_rt) {
        free(tr->rids);
        free(tr->rw);
        free(tr->rflags);
        tr->rids = malloc((size_t)s->layers * RT * k * sizeof(int32_t));
        tr->rw = malloc((size_t)s->layers * RT * k * sizeof(float));
        tr->rflags = malloc((size_t)s->layers * RT);
        tr->cap_rt = RT;
        if (!tr->rids || !tr->rw || !tr->rflags) {
            tr->cap_rt = 0;
            return dm_fail(DM_ERR_NOMEM, "out of memory for routing records of %d rows", B);
        }
    }
    dm_routes r = {tr->rids, s->weights ? tr->rw : NULL}; /* [L_moe, B*T, k] */
    /* token flags only when the expert cache or a skip rule can mark tokens */
    const int flags = *dm_model_lab_string(tr->m, "expert_cache") != '\0' ||
                      *dm_model_lab_string(tr->m, "skip_routed") != '\0';
    dm_forward_rows fr = {0};
    if (rows) fr = *rows;
    fr.token_flags = flags ? tr->rflags : NULL;
    dm_status st = dm_model_forward_rows(tr->m, B, x, t, y, &fr, out, &r);
    if (st) return st;
    return dm_trace_write_rows(tr, B, t, y, rows ? rows->branch : NULL, tr->rids, r.weights,
                               fr.token_flags);
}

static dm_status trace_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                          float *out)
{
    return trace_rows_fn(ctx, B, x, t, y, NULL, out);
}

static dm_status trace_begin(void *ctx, int max_rows)
{
    dm_trace *tr = ctx;
    return dm_model_lab_begin(tr->m, max_rows);
}

void dm_trace_denoiser(dm_trace *tr, dm_model *m, dm_denoiser *out)
{
    dm_model_denoiser(m, out);
    tr->m = m;
    out->fn = trace_fn;
    out->fn_rows = trace_rows_fn;
    out->begin = trace_begin;
    out->ctx = tr;
    /* the MoE-lab options in the header's sampler object (route always) */
    cJSON *smp = cJSON_GetObjectItem(tr->head, "sampler");
    if (smp && !cJSON_GetObjectItem(smp, "route")) {
        cJSON_AddStringToObject(smp, "route", dm_model_lab_string(m, "route"));
        cJSON_AddStringToObject(smp, "skip_routed", dm_model_lab_string(m, "skip_routed"));
        cJSON_AddStringToObject(smp, "expert_cache", dm_model_lab_string(m, "expert_cache"));
    }
}

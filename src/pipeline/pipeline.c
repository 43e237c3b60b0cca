/* The generation pipeline (ditmoe.h, "Generation pipeline"): model + VAE opened and checked
 * together, sample -> latent rescale -> decode -> uint8 pixels, and the metadata list that
 * reproduces an image. Built on the public API only (ditmoe.h). */
#include "ditmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct dm_pipeline {
    dm_model *model;
    dm_vae *vae;
    const dm_config *cfg;
    dm_pipeline_info info;
    dm_pipeline_stats stats;
    dm_backend_kind backend;
    dm_precision precision;
    int quant_experts;
    char *model_path, *vae_path;
    float *z, *img;      /* scratch: [cap, C, S, S] latents, [cap, oc, H, W] decoded floats */
    int cap;             /* images the scratch holds */
};

void dm_pipeline_opts_init(dm_pipeline_opts *o)
{
    memset(o, 0, sizeof *o);
    o->backend = DM_BACKEND_CPU;
    o->threads = -1;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

dm_status dm_pipeline_open(const dm_pipeline_opts *o, dm_pipeline **out)
{
    *out = NULL;
    if (!o || !o->model_path || !*o->model_path)
        return dm_fail(DM_ERR_ARG, "pipeline: no model file given");
    dm_status st = dm_backend_check(o->backend);
    if (st) return st;
    dm_pipeline *p = calloc(1, sizeof *p);
    if (!p) return dm_fail(DM_ERR_NOMEM, "out of memory");
    p->backend = o->backend;
    p->model_path = dup_str(o->model_path);
    p->vae_path = dup_str(o->vae_path ? o->vae_path : "");
    if (!p->model_path || !p->vae_path) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (o->threads >= 0) dm_set_threads(o->threads);
    dm_load_opts lo;
    dm_load_opts_init(&lo);
    lo.backend = o->backend;
    lo.precision = o->precision;
    lo.quant_experts = o->quant_experts;
    p->precision = o->precision;
    p->quant_experts = o->quant_experts;
    lo.device = o->device;
    lo.cfg = o->cfg;
    if ((st = dm_model_load_opts(o->model_path, &lo, &p->model))) goto fail;
    if ((st = dm_model_set_lab(p->model, &o->lab))) goto fail;
    lo.cfg = NULL;
    p->cfg = dm_model_config(p->model);
    const dm_config *c = p->cfg;
    p->info.latent_channels = c->in_channels;
    p->info.latent_size = c->input_size;
    p->info.latent_rescale = 1.0f;
    if (o->vae_path) {
        if ((st = dm_vae_load_opts(o->vae_path, &lo, &p->vae))) goto fail;
        const dm_vae_info *vi = dm_vae_get_info(p->vae);
        if (vi->z_channels != c->in_channels) {
            st = dm_fail(DM_ERR_ARG, "latent channels differ: model %s has %d, VAE %s has %d",
                         o->model_path, c->in_channels, o->vae_path, vi->z_channels);
            goto fail;
        }
        if (vi->out_channels != 1 && vi->out_channels != 3) {
            st = dm_fail(DM_ERR_ARG, "%s: the VAE has %d output channels (images need 1 or 3)",
                         o->vae_path, vi->out_channels);
            goto fail;
        }
        p->info.channels = vi->out_channels;
        p->info.width = p->info.height = c->input_size * vi->factor;
        /* dm_vae_decode divides by the VAE's own scale; the model's latent scale wins. */
        if (c->vae_scale > 0 && vi->scale != c->vae_scale) {
            p->info.latent_rescale = vi->scale / c->vae_scale;
            dm_log(DM_LOG_INFO, "latent scale: model says %g, VAE file says %g; using the model's",
                   (double)c->vae_scale, (double)vi->scale);
        }
    }
    *out = p;
    return DM_OK;
fail:
    dm_pipeline_free(p);
    return st;
}

void dm_pipeline_free(dm_pipeline *p)
{
    if (!p) return;
    dm_vae_free(p->vae);
    dm_model_lab_free(p->model);
    dm_model_free(p->model);
    free(p->model_path);
    free(p->vae_path);
    free(p->z);
    free(p->img);
    free(p);
}

const dm_config *dm_pipeline_config(const dm_pipeline *p) { return p->cfg; }
const dm_pipeline_info *dm_pipeline_get_info(const dm_pipeline *p) { return &p->info; }
const dm_pipeline_stats *dm_pipeline_get_stats(const dm_pipeline *p) { return &p->stats; }
const char *dm_pipeline_model_path(const dm_pipeline *p) { return p->model_path; }
const char *dm_pipeline_vae_path(const dm_pipeline *p) { return p->vae_path; }
dm_backend_kind dm_pipeline_backend(const dm_pipeline *p) { return p->backend; }
dm_model *dm_pipeline_model(dm_pipeline *p) { return p->model; }
dm_vae *dm_pipeline_vae(dm_pipeline *p) { return p->vae; }

/* The denoiser the sampler drives, wrapped to time the transformer. */
typedef struct {
    dm_denoiser inner;
    dm_pipeline_stats *stats;
} timed_t;

static dm_status timed_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                          float *out)
{
    timed_t *tm = ctx;
    double t0 = dm_time_sec();
    dm_status st = tm->inner.fn(tm->inner.ctx, B, x, t, y, out);
    tm->stats->forward_sec += dm_time_sec() - t0;
    tm->stats->forwards++;
    tm->stats->rows += B;
    return st;
}

static dm_status timed_rows_fn(void *ctx, int B, const float *x, const float *t,
                               const int64_t *y, const dm_forward_rows *rows, float *out)
{
    timed_t *tm = ctx;
    double t0 = dm_time_sec();
    dm_status st = tm->inner.fn_rows(tm->inner.ctx, B, x, t, y, rows, out);
    tm->stats->forward_sec += dm_time_sec() - t0;
    tm->stats->forwards++;
    tm->stats->rows += B;
    return st;
}

static dm_status timed_begin(void *ctx, int max_rows)
{
    timed_t *tm = ctx;
    return tm->inner.begin(tm->inner.ctx, max_rows);
}

static dm_status reserve(dm_pipeline *p, int B)
{
    if (B <= p->cap) return DM_OK;
    const size_t per_lat = (size_t)p->info.latent_channels * p->info.latent_size *
                           p->info.latent_size;
    const size_t per_img = (size_t)p->info.channels * p->info.width * p->info.height;
    float *z = realloc(p->z, (size_t)B * per_lat * sizeof(float));
    if (!z) return dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d latents", B);
    p->z = z;
    if (per_img) {
        float *img = realloc(p->img, (size_t)B * per_img * sizeof(float));
        if (!img) return dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d images", B);
        p->img = img;
    }
    p->cap = B;
    return DM_OK;
}

dm_status dm_pipeline_generate(dm_pipeline *p, const dm_sample_params *sp, int B, const int64_t *y,
                               const uint64_t *index, const dm_pipeline_hooks *hooks,
                               uint8_t *pixels)
{
    static const dm_pipeline_hooks none;
    const dm_pipeline_hooks *h = hooks ? hooks : &none;
    if (B < 1) return dm_fail(DM_ERR_ARG, "pipeline: batch of %d images (need >= 1)", B);
    if (pixels && !p->vae)
        return dm_fail(DM_ERR_ARG, "pipeline: pixels asked for, but it was opened without a VAE");
    dm_status st = dm_sample_params_check(sp, p->cfg);
    if (st) return st;
    for (int b = 0; b < B; b++)
        if (y[b] < 0 || y[b] > p->cfg->num_classes)
            return dm_fail(DM_ERR_ARG, "pipeline: class %lld out of range [0, %d]",
                           (long long)y[b], p->cfg->num_classes);
    if ((st = reserve(p, B))) return st;
    const int C = p->info.latent_channels, S = p->info.latent_size;
    const size_t per_lat = (size_t)C * S * S;

    timed_t tm = {.stats = &p->stats};
    if (h->trace) {
        dm_trace_denoiser(h->trace, p->model, &tm.inner);
        if ((st = dm_trace_batch(h->trace, B, y, index))) return st;
    } else {
        dm_model_denoiser(p->model, &tm.inner);
    }
    dm_denoiser d = tm.inner;
    d.fn = timed_fn;
    d.fn_rows = tm.inner.fn_rows ? timed_rows_fn : NULL;
    d.begin = tm.inner.begin ? timed_begin : NULL;
    d.ctx = &tm;
    double t0 = dm_time_sec();
    st = dm_sample(&d, sp, B, y, index, h->init, p->z, h->progress, h->progress_ctx);
    p->stats.sample_sec += dm_time_sec() - t0;
    if (st) return st;
    if (h->latents) memcpy(h->latents, p->z, (size_t)B * per_lat * sizeof(float));
    if (!pixels) {
        p->stats.images += B;
        return DM_OK;
    }
    if (p->info.latent_rescale != 1.0f) {
        const float r = p->info.latent_rescale;
        for (size_t j = 0; j < (size_t)B * per_lat; j++) p->z[j] *= r;
    }
    t0 = dm_time_sec();
    st = dm_vae_decode(p->vae, B, S, S, p->z, p->img);
    if (st) return st;
    const int oc = p->info.channels, H = p->info.height, W = p->info.width;
    const size_t per_img = (size_t)oc * H * W;
    for (int b = 0; b < B; b++)
        dm_image_to_u8(oc, H, W, p->img + (size_t)b * per_img, pixels + (size_t)b * per_img);
    p->stats.decode_sec += dm_time_sec() - t0;
    p->stats.images += B;
    return DM_OK;
}

/* ------------------------------------------------------------------ metadata */

/* The fewest significant digits (6..9) that read back as the same float. */
static void fmt_float(float v, char *buf, size_t n)
{
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(buf, n, "%.*g", digits, (double)v);
        if (strtof(buf, NULL) == v) return;
    }
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

dm_status dm_gen_text_set(dm_gen_text *t, const char *key, const char *value)
{
    if (strlen(key) >= sizeof t->keys[0] || strlen(value) >= sizeof t->vals[0])
        return dm_fail(DM_ERR_ARG, "metadata %s: key or value too long", key);
    int i = 0;
    while (i < t->n && strcmp(t->keys[i], key)) i++;
    if (i == t->n) {
        if (t->n >= DM_GEN_TEXT_MAX) return dm_fail(DM_ERR_ARG, "metadata: more than %d fields",
                                                    DM_GEN_TEXT_MAX);
        t->n++;
        snprintf(t->keys[i], sizeof t->keys[i], "%s", key);
    }
    snprintf(t->vals[i], sizeof t->vals[i], "%s", value);
    for (int k = 0; k < t->n; k++) {
        t->kv[2 * k] = t->keys[k];
        t->kv[2 * k + 1] = t->vals[k];
    }
    t->kv[2 * t->n] = NULL;
    return DM_OK;
}

const char *dm_gen_text_get(const dm_gen_text *t, const char *key)
{
    for (int i = 0; i < t->n; i++)
        if (!strcmp(t->keys[i], key)) return t->vals[i];
    return NULL;
}

void dm_gen_text_init(dm_gen_text *t, const dm_pipeline *p, const dm_sample_params *sp,
                      const char *software, int64_t cls, uint64_t index)
{
    memset(t, 0, sizeof *t);
    char v[256], a[48], b[48];
    const dm_config *c = p->cfg;
    if (software)
        dm_gen_text_set(t, "Software", software);
    else
        dm_gen_text_set(t, "Software", "ditmoe " DITMOE_VERSION);
    dm_gen_text_set(t, "ditmoe-version", DITMOE_VERSION);
    dm_gen_text_set(t, "model", base_name(p->model_path));
    dm_gen_text_set(t, "vae", base_name(p->vae_path));
    dm_gen_text_set(t, "backend", dm_backend_name(p->backend));
    dm_gen_text_set(t, "precision", dm_precision_name(p->precision));
    dm_gen_text_set(t, "quant_experts", dm_quant_name(p->quant_experts));
    if (cls >= 0) {
        if (c->class_names && cls < c->num_classes)
            snprintf(v, sizeof v, "%lld (%s)", (long long)cls, c->class_names[cls]);
        else
            snprintf(v, sizeof v, "%lld", (long long)cls);
        dm_gen_text_set(t, "class", v);
    }
    snprintf(v, sizeof v, "%llu", (unsigned long long)sp->seed);
    dm_gen_text_set(t, "seed", v);
    snprintf(v, sizeof v, "%d", sp->steps);
    dm_gen_text_set(t, "steps", v);
    dm_gen_text_set(t, "sampler", dm_sampler_name(sp->sampler));
    fmt_float(sp->cfg_scale, v, sizeof v);
    dm_gen_text_set(t, "cfg-scale", v);
    snprintf(v, sizeof v, sp->cfg_channels ? "%d" : "all", sp->cfg_channels);
    dm_gen_text_set(t, "cfg-channels", v);
    fmt_float(sp->cfg_t_lo, a, sizeof a);
    fmt_float(sp->cfg_t_hi, b, sizeof b);
    snprintf(v, sizeof v, "%s,%s", a, b);
    dm_gen_text_set(t, "cfg-interval", v);
    fmt_float(sp->eta, v, sizeof v);
    dm_gen_text_set(t, "eta", v);
    snprintf(v, sizeof v, "%d", sp->num_train_steps);
    dm_gen_text_set(t, "num-train-steps", v);
    snprintf(v, sizeof v, "%llu", (unsigned long long)index);
    dm_gen_text_set(t, "image-index", v);
    /* MoE lab (issue 14): the policy always, the other options when on */
    dm_gen_text_set(t, "route", dm_model_lab_string(p->model, "route"));
    const char *lab_keys[][2] = {{"skip-routed", "skip_routed"}, {"expert-cache", "expert_cache"}};
    for (int i = 0; i < 2; i++) {
        const char *val = dm_model_lab_string(p->model, lab_keys[i][1]);
        if (*val) dm_gen_text_set(t, lab_keys[i][0], val);
    }
    if (sp->sc_w > 0.0f) {
        char sc[96];
        dm_self_contrast_string(sp, sc, sizeof sc);
        dm_gen_text_set(t, "self-contrast", sc);
    }
}

/* The sampler loops (spec vae_samplers.md B.1, B.3, B.4; ditmoe.md 4-5) around a denoiser
 * callback. State z [B,C,H,W] holds only the conditional images: with guidance, each model
 * evaluation runs ONE forward on [z; z] with labels [y; null] (2B rows) — the same numbers as
 * DiT's forward_with_cfg, whose second state half is dead weight. Per-element math is float32
 * with float64 tables cast to float32 at use, as in the PyTorch reference. */
#include "ditmoe.h"
#include "router/route_policy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const dm_denoiser *d;
    const dm_sample_params *p;
    int B;
    const int64_t *y;     /* [B] */
    const uint64_t *idx;  /* [B] */
    size_t n, nout, hw;   /* C*H*W, Cout*H*W, H*W */
    float *xin;           /* [3B, C, H, W] doubled (tripled with self-contrast) input */
    float *tin;           /* [3B] */
    int64_t *yin;         /* [3B] labels, then null (then labels for weak rows) */
    float *raw;           /* [3B, Cout, H, W] raw model output (guided case) */
    int64_t *rimg;        /* [3B] MoE lab: global image index of each row */
    uint8_t *rbr;         /* [3B] branch of each row (0 cond, 1 uncond, 2 weak) */
    float *rt01;          /* [3B] normalised time of each row */
    float *o;             /* [B, Cout, H, W] guided output */
    float *noise;         /* [B, C, H, W] */
    float *tmp;           /* [B, C, H, W] Heun predictor state */
    float *v1;            /* [B, C, H, W] Heun first slope */
} run_t;

/* One model call on R rows (the rows-aware denoiser when it has one). */
static dm_status call(run_t *r, int R, const float *x, double tfrac, float *out)
{
    const dm_denoiser *d = r->d;
    if (!d->fn_rows) return d->fn(d->ctx, R, x, r->tin, r->yin, out);
    for (int i = 0; i < R; i++) r->rt01[i] = (float)tfrac;
    const dm_forward_rows rows = {r->rimg, r->rbr, r->rt01, (dm_weak_kind)r->p->sc_weak, NULL};
    return d->fn_rows(d->ctx, R, x, r->tin, r->yin, &rows, out);
}

/* o = guided model output at (x, t). tval is what the model sees, tfrac in [0,1] (1 = noise)
 * decides the guidance interval. Rows: [cond] unguided, [cond; uncond] CFG, with
 * self-contrast [cond; uncond; weak] (mode=add, cfg-scale != 1) or [cond; weak]. */
static dm_status evaluate(run_t *r, const float *x, float tval, double tfrac)
{
    const dm_denoiser *d = r->d;
    const dm_sample_params *p = r->p;
    const int B = r->B;
    const int inside = tfrac >= (double)p->cfg_t_lo - 1e-9 && tfrac <= (double)p->cfg_t_hi + 1e-9;
    const int sc = p->sc_w > 0.0f && inside;
    const int uncond = inside && (sc ? !p->sc_replace && p->cfg_scale != 1.0f
                                     : p->cfg_scale != 1.0f);
    const int parts = 1 + uncond + sc;
    for (int b = 0; b < B; b++) {
        for (int q = 0; q < parts; q++) {
            const int i = q * B + b;
            r->tin[i] = tval;
            r->rimg[i] = (int64_t)r->idx[b];
            r->rbr[i] = (uint8_t)(q == 0 ? DM_BRANCH_COND
                                  : q == 1 && uncond ? DM_BRANCH_UNCOND : DM_BRANCH_WEAK);
            r->yin[i] = r->rbr[i] == DM_BRANCH_UNCOND ? (int64_t)d->num_classes : r->y[b];
        }
    }
    if (parts == 1) return call(r, B, x, tfrac, r->o);
    for (int q = 0; q < parts; q++)
        memcpy(r->xin + (size_t)q * B * r->n, x, (size_t)B * r->n * sizeof(float));
    dm_status st = call(r, parts * B, r->xin, tfrac, r->raw);
    if (st) return st;
    const int k = p->cfg_channels <= 0 || p->cfg_channels > d->channels ? d->channels
                                                                         : p->cfg_channels;
    const float s = p->cfg_scale;
    const dm_self_contrast scp = {p->sc_w, (dm_weak_kind)p->sc_weak, p->sc_replace};
    for (int b = 0; b < B; b++)
        for (int ch = 0; ch < d->out_channels; ch++) {
            const size_t at = ((size_t)b * d->out_channels + ch) * r->hw;
            const size_t part = (size_t)B * d->out_channels * r->hw;
            const float *c = r->raw + at;
            const float *u = uncond ? r->raw + part + at : c;
            const float *w = sc ? r->raw + (size_t)(parts - 1) * part + at : NULL;
            float *dst = r->o + at;
            if (ch >= k)
                memcpy(dst, c, r->hw * sizeof(float)); /* unguided: conditional half */
            else if (sc)
                dm_self_contrast_combine(&scp, uncond ? s : 1.0f, r->hw, c, u, w, dst);
            else
                for (size_t i = 0; i < r->hw; i++) dst[i] = u[i] + s * (c[i] - u[i]);
        }
    return DM_OK;
}

static void draw_noise(run_t *r, uint32_t stream)
{
    for (int b = 0; b < r->B; b++)
        dm_noise_normal(r->p->seed, r->idx[b], stream, r->n, r->noise + (size_t)b * r->n);
}

static dm_status check_finite(const run_t *r, const float *z, int step, int nsteps, double t)
{
    const size_t total = (size_t)r->B * r->n;
    for (size_t i = 0; i < total; i++)
        if (!isfinite(z[i]))
            return dm_fail(DM_ERR_NUMERIC,
                           "non-finite latent at step %d/%d (t=%.4g, image index %llu)", step,
                           nsteps, t, (unsigned long long)r->idx[i / r->n]);
    return DM_OK;
}

/* Ancestral DDPM (p_sample_loop) or DDIM over the respaced schedule. */
static dm_status run_gaussian(run_t *r, float *z, dm_progress_fn progress, void *pctx)
{
    const dm_sample_params *p = r->p;
    const dm_denoiser *d = r->d;
    dm_ddpm_schedule s;
    dm_status st = dm_ddpm_schedule_init(&s, p->num_train_steps, p->steps);
    if (st) return st;
    const int N = s.n, C = d->channels, learned = d->out_channels >= 2 * C;
    const size_t hw = r->hw;
    for (int i = N - 1; i >= 0; i--) {
        const int step = N - i;
        const double tfrac = (double)s.timestep[i] / (double)(p->num_train_steps - 1);
        if ((st = evaluate(r, z, (float)s.timestep[i], tfrac))) break;
        const float sra = (float)s.sqrt_recip_ac[i], srm1 = (float)s.sqrt_recipm1_ac[i];
        const int noisy = i != 0 && (p->sampler == DM_SAMPLER_DDPM || p->eta > 0.0f);
        if (noisy) draw_noise(r, (uint32_t)step);
        if (p->sampler == DM_SAMPLER_DDPM) {
            const float c1 = (float)s.coef1[i], c2 = (float)s.coef2[i];
            const float min_log = (float)s.post_logvar_clipped[i], max_log = (float)s.log_beta[i];
            for (int b = 0; b < r->B; b++)
                for (int ch = 0; ch < C; ch++) {
                    float *x = z + ((size_t)b * C + ch) * hw;
                    const float *eps = r->o + ((size_t)b * d->out_channels + ch) * hw;
                    const float *var = learned ? eps + (size_t)C * hw : NULL;
                    const float *nz = r->noise + ((size_t)b * C + ch) * hw;
                    for (size_t j = 0; j < hw; j++) {
                        float x0 = sra * x[j] - srm1 * eps[j]; /* clip_denoised=False */
                        float mean = c1 * x0 + c2 * x[j];
                        if (noisy) {
                            float logv = max_log; /* fixed-large variance without learn_sigma */
                            if (learned) {
                                float frac = (var[j] + 1.0f) / 2.0f;
                                logv = frac * max_log + (1.0f - frac) * min_log;
                            }
                            mean = mean + expf(0.5f * logv) * nz[j];
                        }
                        x[j] = mean;
                    }
                }
        } else { /* DDIM */
            const float ab = (float)s.ac[i], abp = (float)s.ac_prev[i];
            const float sigma = p->eta * sqrtf((1.0f - abp) / (1.0f - ab)) * sqrtf(1.0f - ab / abp);
            const float sq_abp = sqrtf(abp), dir = sqrtf(1.0f - abp - sigma * sigma);
            for (int b = 0; b < r->B; b++)
                for (int ch = 0; ch < C; ch++) {
                    float *x = z + ((size_t)b * C + ch) * hw;
                    const float *eps = r->o + ((size_t)b * d->out_channels + ch) * hw;
                    const float *nz = r->noise + ((size_t)b * C + ch) * hw;
                    for (size_t j = 0; j < hw; j++) {
                        float x0 = sra * x[j] - srm1 * eps[j];
                        float e = (sra * x[j] - x0) / srm1;
                        float mean = x0 * sq_abp + dir * e;
                        x[j] = noisy ? mean + sigma * nz[j] : mean;
                    }
                }
        }
        if ((st = check_finite(r, z, step, N, tfrac))) break;
        if (progress) progress(pctx, step, N);
    }
    dm_ddpm_schedule_free(&s);
    return st;
}

/* z -= dt * v for the first C channels of a model output [B, Cout, H, W]. */
static void euler_update(const run_t *r, float *z, const float *src, const float *v, int vstride,
                         float dt)
{
    const size_t n = r->n;
    for (int b = 0; b < r->B; b++) {
        const float *vb = v + (size_t)b * vstride;
        for (size_t j = 0; j < n; j++) z[(size_t)b * n + j] = src[(size_t)b * n + j] - dt * vb[j];
    }
}

/* Rectified flow, DiT-MoE convention: t = 1 noise, v = noise - data, Euler from t = 1 down to
 * 1/N (the model is never called at t = 0); Heun averages the slopes at t and t - 1/N except on
 * the last step, which is plain Euler. */
static dm_status run_flow(run_t *r, float *z, dm_progress_fn progress, void *pctx)
{
    const dm_sample_params *p = r->p;
    const int N = p->steps, vs = (int)r->nout;
    const float dt = (float)(1.0 / N);
    /* The model sees time_scale * t (ProMoE: 1000 * sigma, in float32 as its reference does). */
    const float ts = r->d->time_scale > 0.0f ? r->d->time_scale : 1.0f;
    dm_status st = DM_OK;
    for (int i = N; i >= 1; i--) {
        const int step = N - i + 1;
        const double t = (double)i / N, tn = (double)(i - 1) / N;
        if ((st = evaluate(r, z, (float)t * ts, t))) return st;
        if (p->sampler == DM_SAMPLER_HEUN && i > 1) {
            /* v1 = first slope (first C channels of each row), tmp = predictor */
            for (int b = 0; b < r->B; b++)
                memcpy(r->v1 + (size_t)b * r->n, r->o + (size_t)b * vs, r->n * sizeof(float));
            euler_update(r, r->tmp, z, r->v1, (int)r->n, dt);
            if ((st = evaluate(r, r->tmp, (float)tn * ts, tn))) return st;
            for (int b = 0; b < r->B; b++) {
                const float *v1 = r->v1 + (size_t)b * r->n, *v2 = r->o + (size_t)b * vs;
                float *zb = z + (size_t)b * r->n;
                for (size_t j = 0; j < r->n; j++) zb[j] = zb[j] - dt * (0.5f * (v1[j] + v2[j]));
            }
        } else {
            euler_update(r, z, z, r->o, vs, dt);
        }
        if ((st = check_finite(r, z, step, N, t))) return st;
        if (progress) progress(pctx, step, N);
    }
    return st;
}

dm_status dm_sample(const dm_denoiser *d, const dm_sample_params *p, int B, const int64_t *y,
                    const uint64_t *index, const float *init, float *z, dm_progress_fn progress,
                    void *progress_ctx)
{
    if (!d || !d->fn || !p || !y || !index || !z || B < 1)
        return dm_fail(DM_ERR_ARG, "dm_sample: bad arguments");
    if (d->channels < 1 || d->out_channels < d->channels || d->height < 1 || d->width < 1)
        return dm_fail(DM_ERR_ARG, "dm_sample: bad denoiser shape C=%d Cout=%d %dx%d",
                       d->channels, d->out_channels, d->height, d->width);
    dm_status st = dm_sample_params_check(p, NULL);
    if (st) return st;
    for (int b = 0; b < B; b++)
        if (y[b] < 0 || y[b] >= d->num_classes)
            return dm_fail(DM_ERR_ARG, "class id %lld out of range [0,%d)", (long long)y[b],
                           d->num_classes);
    run_t r = {.d = d, .p = p, .B = B, .y = y, .idx = index};
    r.hw = (size_t)d->height * d->width;
    r.n = (size_t)d->channels * r.hw;
    r.nout = (size_t)d->out_channels * r.hw;
    if (p->sc_w > 0.0f && !d->fn_rows) {
        st = dm_fail(DM_ERR_ARG, "--self-contrast: this denoiser has no per-row (weak) pass");
        return st;
    }
    /* most rows of one evaluation: cond, + uncond (CFG), + weak (self-contrast) */
    const int sc_on = p->sc_w > 0.0f;
    const int parts = 1 + (sc_on ? !p->sc_replace && p->cfg_scale != 1.0f : p->cfg_scale != 1.0f) +
                      sc_on;
    if (d->begin && (st = d->begin(d->ctx, parts * B))) return st;
    r.xin = malloc(3 * (size_t)B * r.n * sizeof(float));
    r.tin = malloc(3 * (size_t)B * sizeof(float));
    r.yin = malloc(3 * (size_t)B * sizeof(int64_t));
    r.raw = malloc(3 * (size_t)B * r.nout * sizeof(float));
    r.rimg = malloc(3 * (size_t)B * sizeof(int64_t));
    r.rbr = malloc(3 * (size_t)B);
    r.rt01 = malloc(3 * (size_t)B * sizeof(float));
    r.o = malloc((size_t)B * r.nout * sizeof(float));
    r.noise = malloc((size_t)B * r.n * sizeof(float));
    r.tmp = malloc((size_t)B * r.n * sizeof(float));
    r.v1 = malloc((size_t)B * r.n * sizeof(float));
    if (!r.xin || !r.tin || !r.yin || !r.raw || !r.o || !r.noise || !r.tmp || !r.v1 || !r.rimg ||
        !r.rbr || !r.rt01) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d (%zu floats per image)", B,
                     r.nout);
        goto done;
    }
    if (init)
        memcpy(z, init, (size_t)B * r.n * sizeof(float));
    else
        for (int b = 0; b < B; b++) dm_noise_normal(p->seed, index[b], 0, r.n, z + (size_t)b * r.n);
    if (dm_sampler_objective(p->sampler) == DM_OBJ_DDPM)
        st = run_gaussian(&r, z, progress, progress_ctx);
    else
        st = run_flow(&r, z, progress, progress_ctx);
done:
    free(r.xin);
    free(r.tin);
    free(r.yin);
    free(r.raw);
    free(r.o);
    free(r.noise);
    free(r.tmp);
    free(r.v1);
    free(r.rimg);
    free(r.rbr);
    free(r.rt01);
    return st;
}

static dm_status model_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                          float *out)
{
    return dm_model_forward((dm_model *)ctx, B, x, t, y, out, NULL);
}

static dm_status model_rows_fn(void *ctx, int B, const float *x, const float *t,
                               const int64_t *y, const dm_forward_rows *rows, float *out)
{
    return dm_model_forward_rows((dm_model *)ctx, B, x, t, y, rows, out, NULL);
}

static dm_status model_begin(void *ctx, int max_rows)
{
    return dm_model_lab_begin((dm_model *)ctx, max_rows);
}

void dm_model_denoiser(dm_model *m, dm_denoiser *d)
{
    d->fn_rows = model_rows_fn;
    d->begin = model_begin;
    const dm_config *c = dm_model_config(m);
    d->fn = model_fn;
    d->ctx = m;
    d->channels = c->in_channels;
    d->out_channels = c->out_channels;
    d->height = c->input_size;
    d->width = c->input_size;
    d->num_classes = c->num_classes;
    d->time_scale = c->time_scale;
}

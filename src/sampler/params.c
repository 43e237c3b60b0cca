/* Sampler names, default parameters (one place), and the parameter check against a model. */
#include "ditmoe.h"
#include "router/route_policy.h"

#include <stdio.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *const k_sampler_names[DM_SAMPLER_COUNT] = {"ddpm", "ddim", "euler", "heun"};
static const dm_objective k_sampler_objective[DM_SAMPLER_COUNT] = {DM_OBJ_DDPM, DM_OBJ_DDPM,
                                                                   DM_OBJ_RF, DM_OBJ_RF};

const char *dm_sampler_name(dm_sampler_kind k)
{
    return (unsigned)k < DM_SAMPLER_COUNT ? k_sampler_names[k] : "?";
}

int dm_sampler_from_name(const char *s, dm_sampler_kind *out)
{
    for (int i = 0; s && i < DM_SAMPLER_COUNT; i++)
        if (!strcasecmp(s, k_sampler_names[i])) {
            *out = (dm_sampler_kind)i;
            return 0;
        }
    return -1;
}

dm_objective dm_sampler_objective(dm_sampler_kind k)
{
    return (unsigned)k < DM_SAMPLER_COUNT ? k_sampler_objective[k] : DM_OBJ_DDPM;
}

/* The one table of sampling defaults: a row per (arch, objective). A model file's "sampling"
 * metadata overrides any of them (dm_config records only what the file says). DiT-MoE follows
 * DiT's sample.py (250 DDPM steps, cfg 4.0 on the first 3 latent channels) and its rectified-
 * flow scripts (Euler, 50 steps, all channels); ProMoE's reference samples 250 Euler steps at
 * cfg 1.5 (promoe.md). */
static const struct {
    dm_arch arch;
    dm_objective objective;
    dm_sampler_kind sampler;
    int steps;
    float cfg_scale;
    int cfg_channels; /* 0 = all */
} k_defaults[] = {
    {DM_ARCH_DITMOE, DM_OBJ_DDPM, DM_SAMPLER_DDPM, 250, 4.0f, 3},
    {DM_ARCH_DITMOE, DM_OBJ_RF, DM_SAMPLER_EULER, 50, 4.0f, 0},
    {DM_ARCH_PROMOE, DM_OBJ_DDPM, DM_SAMPLER_DDPM, 250, 1.5f, 3},
    {DM_ARCH_PROMOE, DM_OBJ_RF, DM_SAMPLER_EULER, 250, 1.5f, 0},
};

void dm_sample_params_init(dm_sample_params *p, const dm_config *cfg)
{
    memset(p, 0, sizeof *p);
    const dm_arch arch = cfg ? cfg->arch : DM_ARCH_DITMOE;
    const dm_objective obj = cfg ? cfg->objective : DM_OBJ_DDPM;
    int row = 0;
    for (int i = 0; i < (int)(sizeof k_defaults / sizeof k_defaults[0]); i++)
        if (k_defaults[i].arch == arch && k_defaults[i].objective == obj) row = i;
    p->sampler = k_defaults[row].sampler;
    p->steps = k_defaults[row].steps;
    p->cfg_scale = k_defaults[row].cfg_scale;
    p->cfg_channels = k_defaults[row].cfg_channels;
    if (cfg) { /* what the file says */
        if ((unsigned)cfg->default_sampler < DM_SAMPLER_COUNT) p->sampler = cfg->default_sampler;
        if (cfg->default_steps > 0) p->steps = cfg->default_steps;
        if (cfg->default_cfg_scale > 0.0f && isfinite(cfg->default_cfg_scale))
            p->cfg_scale = cfg->default_cfg_scale;
        if (cfg->cfg_channels >= 0) p->cfg_channels = cfg->cfg_channels;
    }
    p->cfg_t_lo = 0.0f;
    p->cfg_t_hi = 1.0f;
    p->eta = 0.0f;
    p->seed = 0;
    p->num_train_steps = 1000;
}

dm_status dm_sample_params_check(const dm_sample_params *p, const dm_config *cfg)
{
    if ((unsigned)p->sampler >= DM_SAMPLER_COUNT)
        return dm_fail(DM_ERR_ARG, "sampler: unknown sampler %d", (int)p->sampler);
    if (cfg && dm_sampler_objective(p->sampler) != cfg->objective)
        return dm_fail(DM_ERR_ARG,
                       "sampler %s: the model was trained with the %s objective; use %s",
                       dm_sampler_name(p->sampler), dm_objective_name(cfg->objective),
                       cfg->objective == DM_OBJ_RF ? "euler or heun" : "ddpm or ddim");
    if (p->steps < 1) return dm_fail(DM_ERR_ARG, "steps %d: must be >= 1", p->steps);
    if (dm_sampler_objective(p->sampler) == DM_OBJ_DDPM && p->steps > p->num_train_steps)
        return dm_fail(DM_ERR_ARG, "steps %d: a %s model has only %d diffusion steps",
                       p->steps, "ddpm", p->num_train_steps);
    if (p->steps > DM_SAMPLE_MAX_STEPS)
        return dm_fail(DM_ERR_ARG, "steps %d: at most %d", p->steps, DM_SAMPLE_MAX_STEPS);
    if (!isfinite(p->cfg_scale))
        return dm_fail(DM_ERR_ARG, "cfg_scale: must be a finite number");
    if (cfg && (p->cfg_channels < 0 || p->cfg_channels > cfg->in_channels))
        return dm_fail(DM_ERR_ARG, "cfg_channels %d: the model has %d latent channels (use 1..%d "
                       "or all)", p->cfg_channels, cfg->in_channels, cfg->in_channels);
    if (!(p->cfg_t_lo >= 0.0f && p->cfg_t_hi <= 1.0f && p->cfg_t_lo <= p->cfg_t_hi))
        return dm_fail(DM_ERR_ARG, "cfg_interval %g,%g: need 0 <= LO <= HI <= 1 (t = 1 is noise)",
                       (double)p->cfg_t_lo, (double)p->cfg_t_hi);
    if (!(p->eta >= 0.0f && isfinite(p->eta)))
        return dm_fail(DM_ERR_ARG, "eta %g: must be >= 0", (double)p->eta);
    if (p->eta != 0.0f && p->sampler != DM_SAMPLER_DDIM)
        return dm_fail(DM_ERR_ARG, "eta: only the ddim sampler uses eta (sampler is %s)",
                       dm_sampler_name(p->sampler));
    return DM_OK;
}

dm_status dm_self_contrast_set(dm_sample_params *p, const char *spec)
{
    dm_self_contrast sc;
    dm_status st = dm_self_contrast_parse(spec, &sc);
    if (st) return st;
    p->sc_w = sc.w;
    p->sc_weak = (int)sc.weak;
    p->sc_replace = sc.replace_uncond;
    return DM_OK;
}

void dm_self_contrast_string(const dm_sample_params *p, char *buf, size_t n)
{
    static const char *weak[] = {"rank2", "rank3", "top1", "shared"};
    if (!(p->sc_w > 0.0f)) {
        if (n) buf[0] = '\0';
        return;
    }
    char w[32];
    for (int digits = 6; digits <= 9; digits++) { /* shortest form that reads back */
        snprintf(w, sizeof w, "%.*g", digits, (double)p->sc_w);
        if (strtof(w, NULL) == p->sc_w) break;
    }
    snprintf(buf, n, "%s,weak=%s,mode=%s", w, (unsigned)p->sc_weak < 4 ? weak[p->sc_weak] : "?",
             p->sc_replace ? "replace" : "add");
}

/* The flag-table parser and --help printer (see flags.h). */
#include "flags.h"

#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int takes_value(const dm_cli_opt *o)
{
    return o->kind != DM_OPT_SET && o->kind != DM_OPT_HELP && o->kind != DM_OPT_VERSION;
}

static const dm_cli_opt *find_long(const dm_cli_opt *t, const char *name, size_t len)
{
    for (; t->kind != DM_OPT_END; t++)
        if (t->long_name && strlen(t->long_name) == len && !strncmp(t->long_name, name, len))
            return t;
    return NULL;
}

static const dm_cli_opt *find_short(const dm_cli_opt *t, char c)
{
    for (; t->kind != DM_OPT_END; t++)
        if (t->short_name && t->short_name == c) return t;
    return NULL;
}

static dm_status set_value(const dm_cli_opt *o, const char *flag, const char *v)
{
    dm_status st = DM_OK;
    switch (o->kind) {
    case DM_OPT_STR: *(const char **)o->dest = v; break;
    case DM_OPT_INT: st = dm_cli_int(flag, v, (long)o->lo, (long)o->hi, o->dest); break;
    case DM_OPT_I64: st = dm_cli_i64(flag, v, (int64_t)o->lo, (int64_t)o->hi, o->dest); break;
    case DM_OPT_U64: st = dm_cli_u64(flag, v, o->dest); break;
    case DM_OPT_FLOAT: {
        float f;
        if ((st = dm_cli_float(flag, v, &f))) break;
        if (f < o->lo || f > o->hi)
            return dm_fail(DM_ERR_ARG, "%s '%s': expected a number in [%g, %g]", flag, v, o->lo,
                           o->hi);
        *(float *)o->dest = f;
        break;
    }
    case DM_OPT_LIST: {
        dm_cli_list *l = o->dest;
        if (l->n >= DM_CLI_LIST_MAX)
            return dm_fail(DM_ERR_ARG, "%s: at most %d occurrences", flag, DM_CLI_LIST_MAX);
        l->v[l->n++] = v;
        break;
    }
    case DM_OPT_BACKEND: {
        dm_backend_kind k;
        if (dm_backend_from_name(v, &k)) {
            char names[128] = "";
            size_t used = 0;
            for (int i = 0; i < DM_BACKEND_COUNT && used < sizeof names; i++)
                used += (size_t)snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "",
                                         dm_backend_name((dm_backend_kind)i));
            return dm_fail(DM_ERR_ARG, "%s '%s': expected one of %s", flag, v, names);
        }
        if ((st = dm_backend_check(k))) {
            char msg[512], lead[64];
            snprintf(msg, sizeof msg, "%s", dm_last_error());
            snprintf(lead, sizeof lead, "backend %s: ", v); /* the flag says it already */
            const size_t nl = strlen(lead);
            return dm_fail(st, "%s %s: %s", flag, v, strncmp(msg, lead, nl) ? msg : msg + nl);
        }
        *(dm_backend_kind *)o->dest = k;
        break;
    }
    default: break;
    }
    if (!st && o->seen) *o->seen = 1;
    return st;
}

static dm_status run_opt(const dm_cli_prog *p, const dm_cli_opt *o, const char *flag,
                         const char *v, int *done)
{
    switch (o->kind) {
    case DM_OPT_HELP:
        dm_cli_usage(p, stdout);
        *done = 1;
        return DM_OK;
    case DM_OPT_VERSION:
        printf("%s %s\n", p->name, DITMOE_VERSION);
        *done = 1;
        return DM_OK;
    case DM_OPT_SET:
        *(int *)o->dest = (int)o->lo;
        if (o->seen) *o->seen = 1;
        return DM_OK;
    default: return set_value(o, flag, v);
    }
}

dm_status dm_cli_parse_from(const dm_cli_prog *p, int first, int argc, char **argv, int *done)
{
    *done = 0;
    /* --help and --version anywhere win over every other problem. */
    for (int i = first; i < argc; i++) {
        if (!strcmp(argv[i], "--")) break;
        const dm_cli_opt *o = NULL;
        if (!strncmp(argv[i], "--", 2))
            o = find_long(p->opts, argv[i] + 2, strlen(argv[i] + 2));
        else if (argv[i][0] == '-' && argv[i][1] && !argv[i][2])
            o = find_short(p->opts, argv[i][1]);
        if (o && (o->kind == DM_OPT_HELP || o->kind == DM_OPT_VERSION))
            return run_opt(p, o, argv[i], NULL, done);
        if (o && takes_value(o)) i++; /* skip its value (it may look like a flag) */
    }
    int only_positional = 0;
    for (int i = first; i < argc; i++) {
        const char *s = argv[i];
        if (only_positional || s[0] != '-' || !s[1]) {
            if (!p->positional || p->positional->n >= DM_CLI_LIST_MAX)
                return dm_fail(DM_ERR_ARG, "unexpected argument '%s' (see --help)", s);
            p->positional->v[p->positional->n++] = s;
            continue;
        }
        if (!strcmp(s, "--")) {
            only_positional = 1;
            continue;
        }
        const dm_cli_opt *o;
        const char *inline_val = NULL;
        char flag[96];
        if (s[1] == '-') {
            const char *eq = strchr(s + 2, '=');
            size_t len = eq ? (size_t)(eq - s - 2) : strlen(s + 2);
            o = find_long(p->opts, s + 2, len);
            if (o && eq) inline_val = eq + 1;
        } else {
            o = s[2] ? NULL : find_short(p->opts, s[1]);
        }
        if (!o) return dm_fail(DM_ERR_ARG, "unknown flag '%s' (see --help)", s);
        if (s[1] == '-')
            snprintf(flag, sizeof flag, "--%s", o->long_name);
        else
            snprintf(flag, sizeof flag, "-%c", o->short_name);
        const char *v = NULL;
        if (takes_value(o)) {
            if (inline_val)
                v = inline_val;
            else if (i + 1 < argc)
                v = argv[++i];
            else
                return dm_fail(DM_ERR_ARG, "%s needs a value (%s; see --help)", flag,
                               o->metavar ? o->metavar : "a value");
        } else if (inline_val) {
            return dm_fail(DM_ERR_ARG, "%s takes no value", flag);
        }
        dm_status st = run_opt(p, o, flag, v, done);
        if (st || *done) return st;
    }
    return DM_OK;
}

/* Help text, wrapped: flag column of 24, help lines indented under it, then the default. */
void dm_cli_usage(const dm_cli_prog *p, FILE *f)
{
    fprintf(f, "usage: %s %s\n", p->name, p->synopsis ? p->synopsis : "[options]");
    if (p->about) fprintf(f, "%s\n", p->about);
    fprintf(f, "options:\n");
    for (const dm_cli_opt *o = p->opts; o->kind != DM_OPT_END; o++) {
        char col[128];
        int n = 0;
        if (o->short_name && o->long_name)
            n = snprintf(col, sizeof col, "-%c, --%s", o->short_name, o->long_name);
        else if (o->short_name)
            n = snprintf(col, sizeof col, "-%c", o->short_name);
        else
            n = snprintf(col, sizeof col, "--%s", o->long_name);
        if (takes_value(o) && o->metavar && n > 0 && (size_t)n < sizeof col)
            snprintf(col + n, sizeof col - (size_t)n, " %s", o->metavar);
        fprintf(f, "  %-22s", col);
        if (strlen(col) > 22) fprintf(f, "\n  %-22s", "");
        const char *h = o->help ? o->help : "";
        for (;;) {
            const char *nl = strchr(h, '\n');
            if (!nl) break;
            fprintf(f, " %.*s\n  %-22s", (int)(nl - h), h, "");
            h = nl + 1;
        }
        if (o->kind == DM_OPT_HELP || o->kind == DM_OPT_VERSION) {
            fprintf(f, " %s\n", h);
            continue;
        }
        /* the default on the last help line when it fits in 100 columns, else on its own */
        char d[200];
        snprintf(d, sizeof d, "(default: %s)", o->dflt ? o->dflt : "none");
        if (25 + strlen(h) + 1 + strlen(d) <= 100)
            fprintf(f, " %s %s\n", h, d);
        else
            fprintf(f, " %s\n  %-22s %s\n", h, "", d);
    }
    if (p->footer) fprintf(f, "%s", p->footer);
}

int dm_cli_exit(const char *prog, dm_status st)
{
    if (st == DM_OK) return 0;
    dm_cli_flag_prefix(st); /* the library names fields, the programs their flags */
    const char *msg = dm_last_error();
    fprintf(stderr, "%s: %s\n", prog, msg && *msg ? msg : "failed");
    return dm_exit_code(st);
}

/* ------------------------------------------------------------------ shared groups */

void dm_cli_common_init(dm_cli_common *c)
{
    memset(c, 0, sizeof *c);
    c->backend = DM_BACKEND_CPU;
    c->log_level = DM_LOG_INFO;
    c->precision = "f32";
    c->quant_experts = "none";
}

dm_status dm_cli_precision(const dm_cli_common *c, dm_precision *prec, int *quant_bits)
{
    if (dm_precision_from_name(c->precision ? c->precision : "f32", prec))
        return dm_fail(DM_ERR_ARG, "--precision: unknown value '%s' (f32 | bf16)", c->precision);
    if (dm_quant_from_name(c->quant_experts ? c->quant_experts : "none", quant_bits))
        return dm_fail(DM_ERR_ARG, "--quant-experts: unknown value '%s' (none | int8 | int4)",
                       c->quant_experts);
    return DM_OK;
}

void dm_cli_common_apply(const dm_cli_common *c, int threads_default)
{
    dm_set_log_level((dm_log_level)c->log_level);
    dm_set_threads(threads_default >= 0 && !c->have_threads ? threads_default : c->threads);
}

void dm_cli_common_load_opts(const dm_cli_common *c, dm_load_opts *o)
{
    dm_load_opts_init(o);
    o->backend = c->backend;
    o->device = c->device;
    /* checked earlier by dm_cli_precision; an unknown name leaves the defaults */
    dm_precision p;
    int q;
    if (!dm_precision_from_name(c->precision ? c->precision : "f32", &p)) o->precision = p;
    if (!dm_quant_from_name(c->quant_experts ? c->quant_experts : "none", &q)) o->quant_experts = q;
}

void dm_cli_overrides_init(dm_cli_overrides *o)
{
    memset(o, 0, sizeof *o);
    dm_config_overrides_init(&o->ov);
}

static dm_status one_of(const char *flag, const char *v, const char *const *choices, const char *list)
{
    if (!v) return DM_OK;
    for (int i = 0; choices[i]; i++)
        if (!strcmp(v, choices[i])) return DM_OK;
    return dm_fail(DM_ERR_ARG, "%s '%s': expected %s", flag, v, list);
}

dm_status dm_cli_overrides_get(dm_cli_overrides *o, const dm_config_overrides **out)
{
    static const char *const objs[] = {"ddpm", "rf", NULL};
    static const char *const variants[] = {"tc", "ec", NULL};
    static const char *const routers[] = {"identity", "softmax", "sigmoid", NULL};
    *out = NULL;
    dm_status st;
    if ((st = one_of("--objective", o->ov.objective, objs, "ddpm or rf")) ||
        (st = one_of("--promoe-variant", o->ov.promoe_variant, variants, "tc or ec")) ||
        (st = one_of("--router", o->ov.router, routers, "identity, softmax or sigmoid")))
        return st;
    if (o->vae_scale) {
        char *end;
        double x = strtod(o->vae_scale, &end);
        if (end == o->vae_scale || *end || !isfinite(x) || !(x > 0))
            return dm_fail(DM_ERR_ARG, "--vae-scale '%s': must be a positive number", o->vae_scale);
        o->ov.vae_scale = x;
    }
    if (dm_config_overrides_any(&o->ov)) *out = &o->ov;
    return DM_OK;
}

dm_status dm_cli_sampler_params(const dm_cli_sampler_flags *f, const dm_config *c, uint64_t seed,
                                dm_sample_params *p)
{
    dm_sample_params_init(p, c);
    dm_status st;
    if (f->sampler && dm_sampler_from_name(f->sampler, &p->sampler))
        return dm_fail(DM_ERR_ARG, "--sampler '%s': expected ddpm, ddim, euler or heun", f->sampler);
    if (f->steps && (st = dm_cli_int("--steps", f->steps, -1000000, 1000000, &p->steps))) return st;
    if (f->cfg_scale && (st = dm_cli_float("--cfg-scale", f->cfg_scale, &p->cfg_scale))) return st;
    if (f->cfg_channels) {
        if (!strcmp(f->cfg_channels, "all"))
            p->cfg_channels = 0;
        else if (dm_cli_int("--cfg-channels", f->cfg_channels, 1, 64, &p->cfg_channels))
            return dm_fail(DM_ERR_ARG, "--cfg-channels '%s': expected 3 or all (1..%d)",
                           f->cfg_channels, c->in_channels);
    }
    if (f->cfg_interval) {
        char lo[64];
        const char *comma = strchr(f->cfg_interval, ',');
        size_t len = comma ? (size_t)(comma - f->cfg_interval) : 0;
        if (!comma || len >= sizeof lo)
            return dm_fail(DM_ERR_ARG, "--cfg-interval '%s': expected LO,HI", f->cfg_interval);
        memcpy(lo, f->cfg_interval, len);
        lo[len] = '\0';
        if (dm_cli_float("--cfg-interval", lo, &p->cfg_t_lo) ||
            dm_cli_float("--cfg-interval", comma + 1, &p->cfg_t_hi))
            return dm_fail(DM_ERR_ARG, "--cfg-interval '%s': expected LO,HI (numbers in [0,1])",
                           f->cfg_interval);
    }
    if (f->eta && (st = dm_cli_float("--eta", f->eta, &p->eta))) return st;
    p->seed = seed;
    return dm_sample_params_check(p, c);
}

dm_status dm_cli_lab_opts(dm_cli_lab_flags *f, dm_lab_opts *o)
{
    dm_lab_opts_init(o);
    o->route = f->route;
    o->expert_cache = f->expert_cache;
    size_t at = 0;
    f->skip_joined[0] = '\0';
    for (int i = 0; i < f->skip.n; i++) {
        const int w = snprintf(f->skip_joined + at, sizeof f->skip_joined - at, "%s%s",
                               i ? ";" : "", f->skip.v[i]);
        if (w < 0 || (size_t)w >= sizeof f->skip_joined - at)
            return dm_fail(DM_ERR_ARG, "--skip-routed: rules too long (at most %zu characters)",
                           sizeof f->skip_joined - 1);
        at += (size_t)w;
    }
    o->skip_routed = f->skip.n ? f->skip_joined : NULL;
    return DM_OK;
}

dm_status dm_cli_lab_sample(const dm_cli_lab_flags *f, dm_sample_params *p)
{
    if (!f->self_contrast) return DM_OK;
    return dm_self_contrast_set(p, f->self_contrast);
}

void dm_cli_lab_log(dm_pipeline *pl, const dm_sample_params *p)
{
    dm_model *m = dm_pipeline_model(pl);
    char sc[96];
    dm_self_contrast_string(p, sc, sizeof sc);
    const char *route = dm_model_lab_string(m, "route"), *skip = dm_model_lab_string(m, "skip_routed"),
               *cache = dm_model_lab_string(m, "expert_cache");
    if (!strcmp(route, "top-k") && !*skip && !*cache && !*sc) return;
    dm_log(DM_LOG_INFO, "MoE lab: route %s%s%s%s%s%s%s", route, *skip ? ", skip-routed " : "", skip,
           *cache ? ", expert-cache " : "", cache, *sc ? ", self-contrast " : "", sc);
}

void dm_cli_lab_stats(dm_pipeline *pl)
{
    dm_model *m = dm_pipeline_model(pl);
    if (!*dm_model_lab_string(m, "expert_cache")) return;
    int64_t computed = 0, reused = 0;
    size_t bytes = 0;
    dm_model_lab_stats(m, &computed, &reused, &bytes);
    const double all = (double)(computed + reused);
    dm_log(DM_LOG_VERBOSE, "expert cache: %lld token-layer outputs computed, %lld reused (%.1f %%), "
           "%.2f MiB", (long long)computed, (long long)reused, all > 0 ? 100.0 * reused / all : 0.0,
           bytes / 1048576.0);
}

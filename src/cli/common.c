/* CLI helpers: number parsing, progress bar, default asset lookup (see common.h). */
#include "cli/common.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

dm_status dm_cli_int(const char *flag, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || !*s || *end || errno || v < lo || v > hi)
        return dm_fail(DM_ERR_ARG, "%s '%s': expected an integer in [%ld, %ld]", flag,
                       s ? s : "", lo, hi);
    *out = (int)v;
    return DM_OK;
}

dm_status dm_cli_u64(const char *flag, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = (s && *s != '-') ? strtoull(s, &end, 10) : 0;
    if (!s || !*s || *s == '-' || *end || errno)
        return dm_fail(DM_ERR_ARG, "%s '%s': expected a non-negative integer below 2^64", flag,
                       s ? s : "");
    *out = (uint64_t)v;
    return DM_OK;
}

dm_status dm_cli_float(const char *flag, const char *s, float *out)
{
    char *end;
    errno = 0;
    double v = s ? strtod(s, &end) : 0;
    if (!s || !*s || *end || errno || !isfinite(v) || fabs(v) > 3.4e38)
        return dm_fail(DM_ERR_ARG, "%s '%s': expected a finite number", flag, s ? s : "");
    *out = (float)v;
    return DM_OK;
}

/* ---------------------------------------------------------------- progress bar */

void dm_cli_progress_start(dm_cli_progress *p, long total, int enabled)
{
    memset(p, 0, sizeof *p);
    p->enabled = enabled;
    p->total = total > 0 ? total : 1;
    p->t0 = dm_time_sec();
}

void dm_cli_progress_label(dm_cli_progress *p, const char *label)
{
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
}

static void fmt_time(double s, char *buf, size_t n)
{
    if (!isfinite(s) || s < 0) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void draw(dm_cli_progress *p, double now)
{
    double el = now - p->t0;
    char rate[32] = "", eta[32] = "--:--", line[160];
    if (p->done > 0 && el > 0) {
        double ips = (double)p->done / el;
        if (ips >= 1.0)
            snprintf(rate, sizeof rate, "%.2f it/s", ips);
        else
            snprintf(rate, sizeof rate, "%.2f s/it", 1.0 / ips);
        fmt_time((double)(p->total - p->done) / ips, eta, sizeof eta);
    }
    int w = snprintf(line, sizeof line, "\r%s%sstep %ld/%ld  %s  ETA %s", p->label,
                     p->label[0] ? " " : "", p->done, p->total, rate, eta);
    if (w < 0) return;
    if (w > (int)sizeof line - 1) w = (int)sizeof line - 1;
    fputs(line, stderr);
    for (int i = w; i < p->width; i++) fputc(' ', stderr); /* erase a longer previous line */
    p->width = w;
    fflush(stderr);
    p->last_draw = now;
}

void dm_cli_progress_step(dm_cli_progress *p)
{
    p->done++;
    if (!p->enabled) return;
    double now = dm_time_sec();
    if (now - p->last_draw >= 0.1 || p->done == p->total) draw(p, now);
}

void dm_cli_progress_end(dm_cli_progress *p)
{
    if (!p->enabled || p->width == 0) return;
    draw(p, dm_time_sec());
    fputc('\n', stderr);
    p->width = 0;
}

/* ---------------------------------------------------------------- assets */

static int exe_dir(char *buf, size_t n)
{
    ssize_t k = readlink("/proc/self/exe", buf, n - 1);
    if (k <= 0) return 0;
    buf[k] = '\0';
    char *slash = strrchr(buf, '/');
    if (!slash) return 0;
    *slash = '\0';
    return 1;
}

static int candidates(const char *name, char out[4][PATH_MAX])
{
    int k = 0;
    char dir[PATH_MAX / 2];
    if (exe_dir(dir, sizeof dir)) {
        snprintf(out[k++], PATH_MAX, "%s/../../assets/%s", dir, name);
        /* installed: <prefix>/bin/ditmoe-* and <prefix>/share/ditmoe/assets */
        snprintf(out[k++], PATH_MAX, "%s/../share/ditmoe/assets/%s", dir, name);
    }
    const char *env = getenv("DITMOE_ASSETS");
    if (env && *env) snprintf(out[k++], PATH_MAX, "%s/%s", env, name);
#ifdef DITMOE_SOURCE_DIR
    snprintf(out[k++], PATH_MAX, "%s/assets/%s", DITMOE_SOURCE_DIR, name);
#endif
    return k;
}

int dm_default_asset(const char *name, char *buf, size_t n)
{
    char c[4][PATH_MAX];
    int k = candidates(name, c);
    for (int i = 0; i < k; i++)
        if (access(c[i], R_OK) == 0) {
            char real[PATH_MAX];
            snprintf(buf, n, "%s", realpath(c[i], real) ? real : c[i]);
            return 1;
        }
    snprintf(buf, n, "%s", k ? c[0] : name);
    return 0;
}

void dm_default_asset_places(const char *name, char *buf, size_t n)
{
    char c[4][PATH_MAX];
    int k = candidates(name, c);
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < k && used < n; i++) {
        int w = snprintf(buf + used, n - used, "%s%s", i ? ", " : "", c[i]);
        if (w < 0) break;
        used += (size_t)w;
    }
}

void dm_cli_progress_break(dm_cli_progress *p)
{
    if (!p->enabled || p->width == 0) return;
    fputc('\n', stderr);
    p->width = 0;
}

const char **dm_cli_sampler_flag(dm_cli_sampler_flags *f, const char *flag)
{
    return !strcmp(flag, "--sampler")        ? &f->sampler
           : !strcmp(flag, "--steps")        ? &f->steps
           : !strcmp(flag, "--cfg-scale")    ? &f->cfg_scale
           : !strcmp(flag, "--cfg-channels") ? &f->cfg_channels
           : !strcmp(flag, "--cfg-interval") ? &f->cfg_interval
           : !strcmp(flag, "--eta")          ? &f->eta
                                             : NULL;
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

dm_status dm_cli_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = s ? strtoll(s, &end, 10) : 0;
    if (!s || !*s || *end || errno || v < lo || v > hi)
        return dm_fail(DM_ERR_ARG, "%s '%s': expected an integer in [%lld, %lld]", flag,
                       s ? s : "", (long long)lo, (long long)hi);
    *out = v;
    return DM_OK;
}

/* CLI helpers: number parsing, progress line, names, default asset lookup (see common.h). */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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

/* ---------------------------------------------------------------- progress line */

void dm_cli_progress_start(dm_cli_progress *p, double total, const char *unit, int enabled)
{
    memset(p, 0, sizeof *p);
    p->enabled = enabled;
    p->tty = isatty(2);
    p->total = total > 0 ? total : 1;
    p->t0 = p->last_draw = dm_time_sec();
    snprintf(p->unit, sizeof p->unit, "%s", unit ? unit : "steps");
}

void dm_cli_progress_label(dm_cli_progress *p, const char *label)
{
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
}

static void fmt_time(double s, char *buf, size_t n)
{
    if (!(s >= 0) || s > 1e8) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void draw(dm_cli_progress *p, double now)
{
    double el = now - p->t0;
    char rate[48] = "", eta[32] = "--:--", line[200];
    if (p->done > 0 && el > 0) {
        double ips = p->done / el;
        if (ips >= 1.0)
            snprintf(rate, sizeof rate, "%.2f %s/s", ips, p->unit);
        else
            snprintf(rate, sizeof rate, "%.2f s/%s", 1.0 / ips, p->unit);
        fmt_time((p->total - p->done) / ips, eta, sizeof eta);
    }
    int w = snprintf(line, sizeof line, "%s%s%s%.0f/%.0f %s  %s  ETA %s", p->tty ? "\r" : "",
                     p->label, p->label[0] ? " " : "", floor(p->done + 1e-9), p->total, p->unit,
                     rate, eta);
    p->last_draw = now;
    if (w < 0) return;
    if (!p->tty) {
        fprintf(stderr, "%s\n", line);
        return;
    }
    if (w > (int)sizeof line - 1) w = (int)sizeof line - 1;
    fputs(line, stderr);
    for (int i = w; i < p->width; i++) fputc(' ', stderr); /* erase a longer previous line */
    p->width = w;
    fflush(stderr);
}

void dm_cli_progress_set(dm_cli_progress *p, double done)
{
    p->done = done;
    if (!p->enabled) return;
    double now = dm_time_sec();
    if (now - p->last_draw >= (p->tty ? 0.1 : 30.0) || (p->tty && done >= p->total)) draw(p, now);
}

void dm_cli_progress_end(dm_cli_progress *p)
{
    if (!p->enabled || !p->tty || p->width == 0) return;
    draw(p, dm_time_sec());
    fputc('\n', stderr);
    p->width = 0;
}

void dm_cli_progress_break(dm_cli_progress *p)
{
    if (!p->enabled || !p->tty || p->width == 0) return;
    fputc('\n', stderr);
    p->width = 0;
}

void dm_cli_on_step(void *ctx, int step, int nsteps)
{
    (void)nsteps;
    dm_cli_step_ctx *c = ctx;
    dm_cli_progress_set(c->bar, c->base + step * c->per_step);
}

/* ---------------------------------------------------------------- names and files */

const char *dm_cli_base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

int dm_cli_pattern_count(const char *pat)
{
    int k = 0;
    for (const char *s = pat; *s; s++) {
        if (*s != '%') continue;
        if (s[1] == '%') {
            s++;
            continue;
        }
        const char *q = s + 1;
        while (*q >= '0' && *q <= '9') q++;
        if (*q != 'd' || q - s > 4) return -1;
        k++;
        s = q;
    }
    return k <= 1 ? k : -1;
}

void dm_cli_pattern_format(const char *pat, uint64_t index, char *buf, size_t n)
{
    size_t o = 0;
    if (!n) return;
    for (const char *s = pat; *s && o + 1 < n; s++) {
        if (*s != '%') {
            buf[o++] = *s;
            continue;
        }
        if (s[1] == '%') {
            buf[o++] = '%';
            s++;
            continue;
        }
        int width = 0;
        const char *q = s + 1;
        while (*q >= '0' && *q <= '9') width = width * 10 + (*q++ - '0');
        if (*q != 'd') break; /* unchecked pattern: stop */
        int w = snprintf(buf + o, n - o, "%0*llu", width, (unsigned long long)index);
        if (w < 0) break;
        o += (size_t)w < n - o ? (size_t)w : n - o - 1;
        s = q;
    }
    buf[o] = '\0';
}

dm_status dm_cli_check_writable(const char *path, const char *flag)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    char probe[PATH_MAX + 32];
    snprintf(probe, sizeof probe, "%s/.ditmoe-probe-XXXXXX", dir);
    int fd = mkstemp(probe);
    if (fd < 0)
        return dm_fail(DM_ERR_WRITE, "%s %s: cannot write in directory %s: %s", flag, path, dir,
                       strerror(errno));
    close(fd);
    unlink(probe);
    return DM_OK;
}

uint64_t dm_cli_random_seed(void)
{
    uint64_t s = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
        close(fd);
    }
    if (!s) s = (uint64_t)time(NULL) * 6364136223846793005ull ^ (uint64_t)getpid();
    return s >> 1 & 0xffffffffffull;
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

dm_status dm_cli_find_asset(const char *given, const char *name, const char *flag,
                            const char *what, char *path, size_t n)
{
    if (given) {
        snprintf(path, n, "%s", given);
        return DM_OK;
    }
    if (dm_default_asset(name, path, n)) return DM_OK;
    char places[3 * PATH_MAX];
    dm_default_asset_places(name, places, sizeof places);
    return dm_fail(DM_ERR_IO, "no --%s given and the default %s was not found (looked at: %s)",
                   flag, what, places);
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

/* ------------------------------------------------------------------ library messages */

/* The library names the parameter a message is about by its field ("steps 0: must be >= 1",
 * "cfg_interval 0.8,0.2: ...", "classes 'x': ..."); the programs name it by their flag. */
static const char *const lib_fields[] = {"sampler", "steps",        "cfg_scale", "cfg_channels",
                                         "cfg_interval", "eta",     "classes"};

dm_status dm_cli_flag_prefix(dm_status st)
{
    if (st == DM_OK) return st;
    const char *msg = dm_last_error();
    if (!msg) return st;
    for (size_t i = 0; i < sizeof lib_fields / sizeof lib_fields[0]; i++) {
        size_t n = strlen(lib_fields[i]);
        if (strncmp(msg, lib_fields[i], n) || (msg[n] != ' ' && msg[n] != ':')) continue;
        char flag[32], rest[1024]; /* copy: dm_fail writes the buffer dm_last_error() returns */
        size_t j = 0;
        for (; j < n && j < sizeof flag - 1; j++) flag[j] = lib_fields[i][j] == '_' ? '-' : lib_fields[i][j];
        flag[j] = '\0';
        snprintf(rest, sizeof rest, "%s", msg + n);
        return dm_fail(st, "--%s%s", flag, rest);
    }
    return st;
}

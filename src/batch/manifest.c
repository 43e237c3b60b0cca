/* DIR/manifest.json of a batch run: model/VAE SHA-256, every generation parameter, N, progress.
 * Written atomically; a rerun into the same DIR must match it parameter for parameter. */
#include "batch/batch.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MANIFEST_FORMAT "ditmoe-batch"
#define MANIFEST_VERSION 1

static void manifest_path(const char *dir, char *buf, size_t n)
{
    snprintf(buf, n, "%s/manifest.json", dir);
}

dm_status dm_batch_manifest_write(const char *dir, const dm_batch_params *p, int64_t done)
{
    char path[4096], seed[32], now[32];
    manifest_path(dir, path, sizeof path);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    time_t t = time(NULL);
    struct tm tmv;
    gmtime_r(&t, &tmv);
    strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", &tmv);

    cJSON *root = cJSON_CreateObject();
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON *vae = cJSON_AddObjectToObject(root, "vae");
    cJSON *par = cJSON_AddObjectToObject(root, "params");
    cJSON *prog = cJSON_AddObjectToObject(root, "progress");
    if (!root || !model || !vae || !par || !prog) {
        cJSON_Delete(root);
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    }
    cJSON_AddStringToObject(root, "format", MANIFEST_FORMAT);
    cJSON_AddNumberToObject(root, "version", MANIFEST_VERSION);
    cJSON_AddStringToObject(root, "software", "ditmoe-batch " DITMOE_VERSION);
    cJSON_AddStringToObject(model, "file", p->model_file);
    cJSON_AddStringToObject(model, "sha256", p->model_sha256);
    cJSON_AddStringToObject(vae, "file", p->vae_file);
    cJSON_AddStringToObject(vae, "sha256", p->vae_sha256);
    cJSON_AddStringToObject(par, "seed", seed); /* a string: JSON numbers are doubles */
    cJSON_AddStringToObject(par, "sampler", p->sampler);
    cJSON_AddNumberToObject(par, "steps", p->steps);
    cJSON_AddNumberToObject(par, "cfg_scale", (double)p->cfg_scale);
    cJSON_AddNumberToObject(par, "cfg_channels", p->cfg_channels);
    cJSON_AddNumberToObject(par, "cfg_t_lo", (double)p->cfg_t_lo);
    cJSON_AddNumberToObject(par, "cfg_t_hi", (double)p->cfg_t_hi);
    cJSON_AddNumberToObject(par, "eta", (double)p->eta);
    cJSON_AddStringToObject(par, "classes", p->classes);
    cJSON_AddStringToObject(par, "engine", p->engine);
    cJSON_AddNumberToObject(par, "num_classes", p->num_classes);
    cJSON_AddNumberToObject(par, "num", (double)p->num);
    cJSON_AddNumberToObject(par, "width", p->width);
    cJSON_AddNumberToObject(par, "height", p->height);
    cJSON_AddNumberToObject(par, "channels", p->channels);
    cJSON_AddNumberToObject(prog, "done", (double)done);
    cJSON_AddNumberToObject(prog, "total", (double)p->num);
    cJSON_AddStringToObject(prog, "updated", now);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return dm_fail(DM_ERR_NOMEM, "out of memory");

    char tmp[DM_ATOMIC_TMP_MAX];
    FILE *f = dm_atomic_open(path, tmp);
    if (!f) {
        free(text);
        return DM_ERR_WRITE;
    }
    size_t len = strlen(text);
    int ok = fwrite(text, 1, len, f) == len && fputc('\n', f) != EOF;
    free(text);
    if (!ok) {
        dm_atomic_abort(f, tmp);
        return dm_fail(DM_ERR_WRITE, "%s: write failed", path);
    }
    return dm_atomic_commit(f, tmp, path);
}

static int num_is(const cJSON *v, double want)
{
    return cJSON_IsNumber(v) && v->valuedouble == want;
}

/* Read and parse; *root NULL and DM_OK if the file does not exist. */
static dm_status load(const char *dir, cJSON **root)
{
    char path[4096];
    manifest_path(dir, path, sizeof path);
    *root = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT) return DM_OK;
        return dm_fail(DM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        const int dir = S_ISDIR(sb.st_mode);
        fclose(f);
        return dm_fail(DM_ERR_IO, "%s: %s (remove it, or use another output directory)", path,
                       dir ? "is a directory, not a manifest file" : "not a regular file");
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 16384;
            if (cap > (64u << 20)) {
                free(buf);
                fclose(f);
                return dm_fail(DM_ERR_FORMAT, "%s: larger than 64 MiB, not a manifest", path);
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return dm_fail(DM_ERR_NOMEM, "out of memory");
            }
            buf = nb;
        }
        size_t k = fread(buf + len, 1, 4096, f);
        len += k;
        if (k < 4096) break;
    }
    const int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        free(buf);
        return dm_fail(DM_ERR_IO, "%s: read error", path);
    }
    buf[len] = '\0';
    *root = cJSON_Parse(buf);
    free(buf);
    if (!*root || !cJSON_IsObject(*root)) {
        cJSON_Delete(*root);
        *root = NULL;
        return dm_fail(DM_ERR_FORMAT, "%s: not valid JSON (remove it, or use another output "
                       "directory)", path);
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(*root, "format");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, MANIFEST_FORMAT)) {
        cJSON_Delete(*root);
        *root = NULL;
        return dm_fail(DM_ERR_FORMAT, "%s: not a ditmoe-batch manifest (format \"%s\")", path,
                       MANIFEST_FORMAT);
    }
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(*root, "version");
    if (!num_is(ver, MANIFEST_VERSION)) {
        char found[32];
        if (cJSON_IsNumber(ver)) snprintf(found, sizeof found, "%g", ver->valuedouble);
        else snprintf(found, sizeof found, "%s", ver ? "not a number" : "missing");
        cJSON_Delete(*root);
        *root = NULL;
        return dm_fail(DM_ERR_FORMAT, "%s: version: %s, this ditmoe-batch reads version %d (made "
                       "by another release; use another output directory)", path, found,
                       MANIFEST_VERSION);
    }
    return DM_OK;
}

static const cJSON *get(const cJSON *root, const char *obj, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, obj), key);
}

/* Compare one field; on mismatch fail naming the flag and both values. */
#define MISMATCH(flag, fmt, old, new_)                                                          \
    do {                                                                                       \
        st = dm_fail(DM_ERR_ARG, "%s: made with different parameters: " flag " was " fmt     \
                     " there, " fmt " in this run; use a new output directory or the same "   \
                     "parameters", path, old, new_);                                            \
        goto out;                                                                              \
    } while (0)


static const char *str_or(const cJSON *v, const char *dflt)
{
    return cJSON_IsString(v) ? v->valuestring : dflt;
}

static double num_or(const cJSON *v, double dflt)
{
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

dm_status dm_batch_manifest_check(const char *dir, const dm_batch_params *p, int *found)
{
    cJSON *root;
    dm_status st = load(dir, &root);
    *found = root != NULL;
    if (st || !root) return st;
    char path[4096], seed[32];
    manifest_path(dir, path, sizeof path);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)p->seed);
    const char *s;
    if (strcmp(s = str_or(get(root, "model", "sha256"), "?"), p->model_sha256))
        MISMATCH("--model (SHA-256 of the file)", "%s", s, p->model_sha256);
    if (strcmp(s = str_or(get(root, "vae", "sha256"), "?"), p->vae_sha256))
        MISMATCH("--vae (SHA-256 of the file)", "%s", s, p->vae_sha256);
    if (strcmp(s = str_or(get(root, "params", "seed"), "?"), seed)) MISMATCH("--seed", "%s", s, seed);
    /* absent in manifests written before the field existed: nothing to compare */
    if (get(root, "params", "engine") &&
        strcmp(s = str_or(get(root, "params", "engine"), "?"), p->engine))
        MISMATCH("model configuration / engine options", "%s", s, p->engine);
    if (strcmp(s = str_or(get(root, "params", "sampler"), "?"), p->sampler))
        MISMATCH("--sampler", "%s", s, p->sampler);
    if (!num_is(get(root, "params", "steps"), p->steps))
        MISMATCH("--steps", "%g", num_or(get(root, "params", "steps"), -1), (double)p->steps);
    if (!num_is(get(root, "params", "cfg_scale"), (double)p->cfg_scale))
        MISMATCH("--cfg-scale", "%g", num_or(get(root, "params", "cfg_scale"), -1),
                 (double)p->cfg_scale);
    if (!num_is(get(root, "params", "cfg_channels"), p->cfg_channels))
        MISMATCH("--cfg-channels (0 = all)", "%g", num_or(get(root, "params", "cfg_channels"), -1),
                 (double)p->cfg_channels);
    if (!num_is(get(root, "params", "cfg_t_lo"), (double)p->cfg_t_lo) ||
        !num_is(get(root, "params", "cfg_t_hi"), (double)p->cfg_t_hi)) {
        char a[64], b[64];
        snprintf(a, sizeof a, "%g,%g", num_or(get(root, "params", "cfg_t_lo"), -1),
                 num_or(get(root, "params", "cfg_t_hi"), -1));
        snprintf(b, sizeof b, "%g,%g", (double)p->cfg_t_lo, (double)p->cfg_t_hi);
        MISMATCH("--cfg-interval", "%s", a, b);
    }
    if (!num_is(get(root, "params", "eta"), (double)p->eta))
        MISMATCH("--eta", "%g", num_or(get(root, "params", "eta"), -1), (double)p->eta);
    if (strcmp(s = str_or(get(root, "params", "classes"), "?"), p->classes))
        MISMATCH("--classes", "%s", s, p->classes);
    if (!num_is(get(root, "params", "num_classes"), p->num_classes))
        MISMATCH("the model's num_classes", "%g", num_or(get(root, "params", "num_classes"), -1),
                 (double)p->num_classes);
    if (!num_is(get(root, "params", "num"), (double)p->num))
        MISMATCH("--num", "%.0f", num_or(get(root, "params", "num"), -1), (double)p->num);
    if (!num_is(get(root, "params", "width"), p->width) ||
        !num_is(get(root, "params", "height"), p->height) ||
        !num_is(get(root, "params", "channels"), p->channels)) {
        char a[64], b[64];
        snprintf(a, sizeof a, "%gx%gx%g", num_or(get(root, "params", "width"), -1),
                 num_or(get(root, "params", "height"), -1),
                 num_or(get(root, "params", "channels"), -1));
        snprintf(b, sizeof b, "%dx%dx%d", p->width, p->height, p->channels);
        MISMATCH("the image size (width x height x channels)", "%s", a, b);
    }
out:
    cJSON_Delete(root);
    return st;
}

dm_status dm_batch_manifest_read(const char *dir, dm_batch_params *p)
{
    cJSON *root;
    dm_status st = load(dir, &root);
    if (st) return st;
    char path[4096];
    manifest_path(dir, path, sizeof path);
    if (!root) return dm_fail(DM_ERR_ARG, "%s: not found (not a ditmoe-batch output directory; "
                              "pass --num N to pack any {index:06d}.png folder)", path);
    memset(p, 0, sizeof *p);
    const cJSON *num = get(root, "params", "num"), *cls = get(root, "params", "classes");
    if (!cJSON_IsNumber(num) || num->valuedouble < 1 || num->valuedouble > 1e12 ||
        num->valuedouble != (double)(int64_t)num->valuedouble) {
        cJSON_Delete(root);
        return dm_fail(DM_ERR_FORMAT, "%s: params.num missing or not a positive integer", path);
    }
    p->num = (int64_t)num->valuedouble;
    snprintf(p->classes, sizeof p->classes, "%s", str_or(cls, ""));
    /* Range first, then convert ((int)3e43 is undefined). Absent = 0: pack takes the size from
     * the first image. */
    static const struct {
        const char *key;
        double max;
    } dims[3] = {{"width", 65536}, {"height", 65536}, {"channels", 4}};
    int *dst[3] = {&p->width, &p->height, &p->channels};
    for (int i = 0; i < 3; i++) {
        const cJSON *v = get(root, "params", dims[i].key);
        if (!v) continue;
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1 && v->valuedouble <= dims[i].max) ||
            v->valuedouble != floor(v->valuedouble)) {
            cJSON_Delete(root);
            return dm_fail(DM_ERR_FORMAT, "%s: params.%s: expected an integer in [1, %g]", path,
                           dims[i].key, dims[i].max);
        }
        *dst[i] = (int)v->valuedouble;
    }
    cJSON_Delete(root);
    return DM_OK;
}

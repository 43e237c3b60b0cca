/* Batch generation bookkeeping: which class each global index gets, output names, and the resume
 * scan of an output directory (see batch.h). */
#include "batch/batch.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------ classes */

dm_status dm_batch_classes_parse(const char *s, const dm_config *cfg, dm_batch_classes *out)
{
    memset(out, 0, sizeof *out);
    out->num_classes = cfg->num_classes;
    if (cfg->num_classes < 1)
        return dm_fail(DM_ERR_ARG, "classes: the model has no classes (num_classes %d)",
                       cfg->num_classes);
    if (!s || !strcmp(s, "random")) {
        out->mode = DM_BATCH_RANDOM;
        return DM_OK;
    }
    if (!strcmp(s, "balanced")) {
        out->mode = DM_BATCH_BALANCED;
        return DM_OK;
    }
    out->mode = DM_BATCH_LIST;
    int cap = 1;
    for (const char *q = s; *q; q++) cap += *q == ',';
    out->list = malloc((size_t)cap * sizeof(int));
    if (!out->list) return dm_fail(DM_ERR_NOMEM, "out of memory");
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char tok[256];
        if (len >= sizeof tok) {
            dm_batch_classes_free(out);
            return dm_fail(DM_ERR_ARG, "classes: entry too long");
        }
        memcpy(tok, p, len);
        tok[len] = '\0';
        char *t = tok;
        while (*t == ' ') t++;
        for (size_t e = strlen(t); e > 0 && t[e - 1] == ' '; e--) t[e - 1] = '\0';
        int id = -1;
        if (!*t) {
            dm_batch_classes_free(out);
            return dm_fail(DM_ERR_ARG, "classes '%s': empty entry (expected random, balanced "
                           "or a comma list of class ids/names)", s);
        }
        if (dm_config_class_id(cfg, t, &id) != DM_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", dm_last_error());
            dm_batch_classes_free(out);
            return dm_fail(DM_ERR_ARG, "classes '%s': %s (expected random, balanced or a comma "
                           "list of class ids/names)", s, msg);
        }
        out->list[out->nlist++] = id;
        if (!comma) break;
        p = comma + 1;
    }
    return DM_OK;
}

void dm_batch_classes_free(dm_batch_classes *c)
{
    free(c->list);
    c->list = NULL;
    c->nlist = 0;
}

void dm_batch_classes_str(const dm_batch_classes *c, char *buf, size_t n)
{
    if (c->mode == DM_BATCH_RANDOM) {
        snprintf(buf, n, "random");
        return;
    }
    if (c->mode == DM_BATCH_BALANCED) {
        snprintf(buf, n, "balanced");
        return;
    }
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < c->nlist && used < n; i++) {
        int w = snprintf(buf + used, n - used, "%s%d", i ? "," : "", c->list[i]);
        if (w < 0) break;
        used += (size_t)w;
    }
}

int dm_batch_class_of(const dm_batch_classes *c, uint64_t seed, uint64_t index)
{
    if (c->mode == DM_BATCH_BALANCED) return (int)(index % (uint64_t)c->num_classes);
    if (c->mode == DM_BATCH_LIST) return c->list[index % (uint64_t)c->nlist];
    const uint32_t K = (uint32_t)c->num_classes;
    const uint32_t key[2] = {(uint32_t)seed ^ 0x9e3779b9u, (uint32_t)(seed >> 32) ^ 0xbb67ae85u};
    const uint32_t reject = (uint32_t)(0u - K) % K; /* 2^32 mod K */
    for (uint32_t draw = 0;; draw++) {
        const uint32_t ctr[4] = {draw, 0x636c6173u, (uint32_t)index, (uint32_t)(index >> 32)};
        uint32_t w[4];
        dm_philox4x32(ctr, key, w);
        for (int j = 0; j < 4; j++) {
            uint64_t m = (uint64_t)w[j] * K;
            if ((uint32_t)m >= reject) return (int)(m >> 32);
        }
    }
}

/* ------------------------------------------------------------------ files */

void dm_batch_png_path(const char *dir, uint64_t index, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%06llu.png", dir, (unsigned long long)index);
}

/* "000123.png" -> 123 (digits only, at least 6; no leading-zero ambiguity beyond the padding);
 * tail receives what follows ".png" ("" for a finished file). */
static int parse_name(const char *name, uint64_t *index, const char **tail)
{
    const char *p = name;
    uint64_t v = 0;
    int nd = 0;
    while (*p >= '0' && *p <= '9') {
        if (nd >= 19) return 0;
        v = v * 10 + (uint64_t)(*p - '0');
        p++;
        nd++;
    }
    if (nd < 6 || (nd > 6 && name[0] == '0') || strncmp(p, ".png", 4)) return 0;
    *index = v;
    *tail = p + 4;
    return 1;
}

dm_status dm_batch_scan(const char *dir, int64_t num, uint8_t *done, int64_t *ndone,
                        int clean_rank, int clean_size)
{
    DIR *d = opendir(dir);
    if (!d) return dm_fail(DM_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    if (done) memset(done, 0, (size_t)num);
    int64_t count = 0;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d)) != NULL) {
        uint64_t idx;
        const char *tail;
        if (!parse_name(e->d_name, &idx, &tail)) {
            if (clean_rank == 0 && !strncmp(e->d_name, "manifest.json.tmp.", 18)) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                unlink(path);
            }
            continue;
        }
        if (!*tail) {
            if (idx < (uint64_t)num) {
                if (done && !done[idx]) done[idx] = 1;
                count++;
            }
        } else if (clean_rank >= 0 && !strncmp(tail, ".tmp.", 5) &&
                   dm_batch_owns(idx, clean_rank, clean_size)) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (unlink(path) == 0) dm_log(DM_LOG_VERBOSE, "removed leftover %s", path);
        }
    }
    closedir(d);
    if (ndone) *ndone = count;
    return DM_OK;
}

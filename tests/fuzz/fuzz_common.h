/* fuzz_common.h — shared by the libFuzzer targets of tests/fuzz (docs/reliability.md).
 *
 * Our parsers take paths (they mmap or stream files), so each target writes the fuzzer's bytes
 * to a file in a private temp folder (on /dev/shm when it exists: fsync and rename are cheap
 * there) and calls the library on it. Every status is accepted; what fails a run is a crash, a
 * sanitizer report, a leak, a timeout or too much memory (scripts/fuzz.sh sets the limits). */
#ifndef DM_FUZZ_COMMON_H
#define DM_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ditmoe.h"

static char g_fuzz_dir[256];

static void fuzz_cleanup(void)
{
    if (!g_fuzz_dir[0]) return;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_fuzz_dir);
    if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", g_fuzz_dir);
}

/* The temp folder, made on first use and removed at exit. */
static const char *fuzz_dir(void)
{
    if (!g_fuzz_dir[0]) {
        const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(g_fuzz_dir, sizeof g_fuzz_dir, "%s/ditmoe-fuzz-XXXXXX", base);
        if (!mkdtemp(g_fuzz_dir)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(fuzz_cleanup);
        dm_set_log_level(DM_LOG_QUIET);
        dm_set_threads(1);
    }
    return g_fuzz_dir;
}

/* Write data to <dir>/<name>; returns the path (static buffer). */
static const char *fuzz_file(const char *name, const uint8_t *data, size_t n)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", fuzz_dir(), name);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
        perror("fuzz: writing the input");
        abort();
    }
    return path;
}

/* Walk every tensor of an opened file as a loader would: each listed name must be found again
 * (abort otherwise), the float ones (each up to 1 MiB) are converted to float32. */
static void fuzz_walk_tensors(dm_st_file *f)
{
    for (int i = 0; i < dm_st_count(f); i++) {
        const dm_st_tensor *t = dm_st_at(f, i);
        if (dm_st_find(f, t->name) == NULL) abort();
        if ((t->dtype == DM_F32 || t->dtype == DM_F16 || t->dtype == DM_BF16) &&
            t->nbytes <= (1u << 20)) {
            float *x = NULL;
            if (dm_st_load_f32(f, t->name, t->ndim, t->shape, &x) == DM_OK) free(x);
        }
    }
}

#endif

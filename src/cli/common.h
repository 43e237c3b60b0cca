/* CLI helpers shared by the ditmoe-* programs: number parsing with flag-named errors, a one-line
 * progress bar on stderr, default asset lookup. Not part of the library API. */
#ifndef DM_CLI_COMMON_H
#define DM_CLI_COMMON_H

#include "ditmoe.h"

#include <stdio.h>

/* Parse a whole string as a number in [lo, hi]; DM_ERR_ARG naming `flag` otherwise. */
dm_status dm_cli_int(const char *flag, const char *s, long lo, long hi, int *out);
dm_status dm_cli_u64(const char *flag, const char *s, uint64_t *out);
dm_status dm_cli_float(const char *flag, const char *s, float *out); /* finite only */

/* The sampler flags shared by ditmoe-sample and ditmoe-batch (--sampler, --steps, --cfg-scale,
 * --cfg-channels, --cfg-interval, --eta), kept as given until the model's defaults are known. */
typedef struct {
    const char *sampler, *steps, *cfg_scale, *cfg_channels, *cfg_interval, *eta;
} dm_cli_sampler_flags;
/* The slot for `flag` if it is a sampler flag, else NULL. */
const char **dm_cli_sampler_flag(dm_cli_sampler_flags *f, const char *flag);
/* p = the model's defaults (dm_sample_params_init) with the given flags and seed on top, checked
 * against the model; errors name the flag. */
dm_status dm_cli_sampler_params(const dm_cli_sampler_flags *f, const dm_config *c, uint64_t seed,
                                dm_sample_params *p);
/* Parse a whole string as an integer in [lo, hi] (64-bit). */
dm_status dm_cli_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);

/* Progress bar: "\r<label> step i/N  12.3 it/s  ETA 0:42" on stderr, redrawn at most ~10x/s.
 * total = steps over the whole run (all batches); dm_cli_progress_step() counts one step. */
typedef struct {
    int enabled;
    long total, done;
    double t0, last_draw;
    int width; /* chars of the last line, for clean overwrite */
    char label[64];
} dm_cli_progress;
void dm_cli_progress_start(dm_cli_progress *p, long total, int enabled);
void dm_cli_progress_label(dm_cli_progress *p, const char *label);
void dm_cli_progress_step(dm_cli_progress *p);
void dm_cli_progress_end(dm_cli_progress *p);
/* End the current bar line (if drawn) so other log lines start clean; the bar resumes. */
void dm_cli_progress_break(dm_cli_progress *p); /* final line + newline (or clears nothing if off) */

/* Find a default asset (e.g. DM_DEFAULT_MODEL): next to the executable (<exe dir>/../../assets,
 * i.e. <source>/assets for build/bin), then $DITMOE_ASSETS, then DITMOE_SOURCE_DIR/assets when
 * that macro is defined. Writes the first existing candidate (or, if none exists, the first
 * candidate, for the error message) to buf and returns 1 if found, 0 if not. */
int dm_default_asset(const char *name, char *buf, size_t n);
/* "a, b, c" list of the places dm_default_asset() looks, for error messages. */
void dm_default_asset_places(const char *name, char *buf, size_t n);

#endif

/* CLI helpers shared by the ditmoe-* programs: number parsing with flag-named errors, one
 * progress line on stderr, output-name patterns, default asset lookup. Not part of the library
 * API. The flag tables are in flags.h. */
#ifndef DM_CLI_COMMON_H
#define DM_CLI_COMMON_H

#include "ditmoe.h"

#include <stdio.h>

/* Parse a whole string as a number in [lo, hi]; DM_ERR_ARG naming `flag` otherwise. */
dm_status dm_cli_int(const char *flag, const char *s, long lo, long hi, int *out);
dm_status dm_cli_u64(const char *flag, const char *s, uint64_t *out);
dm_status dm_cli_float(const char *flag, const char *s, float *out); /* finite only */

/* Parse a whole string as an integer in [lo, hi] (64-bit). */
dm_status dm_cli_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);

/* One progress line on stderr for every program. On a terminal it is redrawn in place at most
 * ~10x/s; otherwise (logs, mpirun) a plain line is printed every 30 s. `done` may be fractional
 * (a batch part-way through its steps); the count shown is rounded down.
 *   "<label> 12/48 <unit>  3.21 <unit>/s  ETA 0:42" */
typedef struct {
    int enabled, tty;
    double total, done;
    double t0, last_draw;
    int width; /* chars of the last line, for clean overwrite */
    char label[64], unit[16];
} dm_cli_progress;
void dm_cli_progress_start(dm_cli_progress *p, double total, const char *unit, int enabled);
void dm_cli_progress_label(dm_cli_progress *p, const char *label);
void dm_cli_progress_set(dm_cli_progress *p, double done);
/* Final line + newline (if a line was drawn). */
void dm_cli_progress_end(dm_cli_progress *p);
/* End the current line (if drawn) so other log lines start clean; the bar resumes. */
void dm_cli_progress_break(dm_cli_progress *p);
/* A dm_progress_fn for dm_sample / dm_pipeline: ctx is a dm_cli_step_ctx. */
typedef struct {
    dm_cli_progress *bar;
    double base, per_step; /* done = base + step * per_step */
} dm_cli_step_ctx;
void dm_cli_on_step(void *ctx, int step, int nsteps);

/* A library message that names a parameter by its field ("steps 0: must be >= 1",
 * "cfg_interval ...", "classes ...") is rewritten to name the program's flag ("--steps 0: ...",
 * "--cfg-interval ..."); other messages are left as they are. Returns st. dm_cli_exit applies it. */
dm_status dm_cli_flag_prefix(dm_status st);

/* ------------------------------------------------------------------ names and files */

/* The part after the last '/'. */
const char *dm_cli_base_name(const char *path);
/* Output name patterns with at most one printf-style %d (optionally %0Nd) and %% escapes:
 * the number of conversions (0 or 1), or -1 when the pattern holds anything else. */
int dm_cli_pattern_count(const char *pat);
/* The pattern with its conversion replaced by index (checked patterns only). */
void dm_cli_pattern_format(const char *pat, uint64_t index, char *buf, size_t n);
/* Can files be created in the directory of `path`? DM_ERR_WRITE naming flag and directory. */
dm_status dm_cli_check_writable(const char *path, const char *flag);
/* A random seed short enough to type back in (/dev/urandom, else time and pid). */
uint64_t dm_cli_random_seed(void);

/* Find a default asset (e.g. DM_DEFAULT_MODEL): next to the executable (<exe dir>/../../assets,
 * i.e. <source>/assets for build/bin), then $DITMOE_ASSETS, then DITMOE_SOURCE_DIR/assets when
 * that macro is defined. Writes the first existing candidate (or, if none exists, the first
 * candidate, for the error message) to buf and returns 1 if found, 0 if not. */
int dm_default_asset(const char *name, char *buf, size_t n);
/* "a, b, c" list of the places dm_default_asset() looks, for error messages. */
void dm_default_asset_places(const char *name, char *buf, size_t n);
/* path = `given` (the flag's value) when not NULL, else the default asset `name`; when that is
 * not found either: DM_ERR_IO "no --<flag> given and the default <what> was not found (looked at:
 * <places>)". */
dm_status dm_cli_find_asset(const char *given, const char *name, const char *flag,
                            const char *what, char *path, size_t n);

#endif

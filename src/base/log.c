/* Logging, thread count, clock. */
#include "ditmoe.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static dm_log_level g_level = DM_LOG_INFO;
static int g_threads = 0;

void dm_set_log_level(dm_log_level level) { g_level = level; }
dm_log_level dm_get_log_level(void) { return g_level; }

void dm_log(dm_log_level level, const char *fmt, ...)
{
    if (level > g_level || level == DM_LOG_QUIET) return;
    va_list ap;
    va_start(ap, fmt);
    fputs(level >= DM_LOG_VERBOSE ? "[VERB] " : "[INFO] ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void dm_set_threads(int n)
{
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    g_threads = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

int dm_get_threads(void)
{
    if (g_threads == 0) dm_set_threads(0);
    return g_threads;
}

double dm_time_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

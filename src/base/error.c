/* Error messages: one per thread, set by dm_fail(), read by dm_last_error(). */
#include "ditmoe.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char g_msg[1024];

const char *dm_last_error(void) { return g_msg; }

dm_status dm_fail(dm_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return st;
}

int dm_exit_code(dm_status st)
{
    switch (st) {
    case DM_OK: return 0;
    case DM_ERR_ARG:
    case DM_ERR_IO:
    case DM_ERR_FORMAT: return 2;
    default: return 1;
    }
}

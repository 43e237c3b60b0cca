/* st_internal.h — internal helpers shared by src/io files (shape formatting, key lookups). */
#ifndef DM_IO_ST_INTERNAL_H
#define DM_IO_ST_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "ditmoe.h"

/* "[8,384]" (or "[]" for a scalar) into buf; returns buf. */
char *dm_fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape);

/* Check that tensor `name` exists in f and has exactly shape[0..ndim). The error is
 * "<path>: missing tensor <name>" or "<path>: <name>: shape [..] expected [..]". */
dm_status dm_st_check_shape(const dm_st_file *f, const char *name, int ndim, const int64_t *shape);

#endif

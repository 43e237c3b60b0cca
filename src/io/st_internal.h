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

/* ProMoE parts of the model config (config_promoe.c). `root` is the parsed "ditmoe" JSON object
 * (a cJSON*, passed as void* to keep cJSON out of this header). */
dm_status dm_promoe_meta(const char *path, const void *root, dm_config *c);
dm_status dm_promoe_infer(const dm_st_file *f, dm_config *c);
dm_status dm_promoe_check(const dm_st_file *f, const dm_config *c);

#endif

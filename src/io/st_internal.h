/* st_internal.h — internal helpers shared by src/io files (shape formatting, key lookups, the
 * tensor-table structure that both the safetensors and the PyTorch (.pt) readers fill). */
#ifndef DM_IO_ST_INTERNAL_H
#define DM_IO_ST_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "ditmoe.h"

/* One opened weights file. Safetensors (safetensors.c) and PyTorch checkpoints (pt.c) give the
 * same table: tensor data points into the read-only mapping, except tensors that had to be
 * rearranged (non-contiguous strides) or converted (float64 -> float32), which live in owned[]. */
struct dm_st_file {
    char *path;
    void *map;            /* whole file, [size] */
    size_t size;
    const uint8_t *data;  /* start of the data section, [data_size] (safetensors) */
    size_t data_size;
    int n;
    dm_st_tensor *t;      /* [n] in header / state-dict order; names owned (malloc'd) */
    int *by_name;         /* [n] indices sorted by name, for bsearch */
    int nmeta;
    char **meta_key;      /* [nmeta] */
    char **meta_val;      /* [nmeta] */
    int is_pt;            /* 1: read from a PyTorch checkpoint (no "ditmoe" metadata) */
    void **owned;         /* [n_owned] buffers freed on close */
    int n_owned;
    int has_overrides;    /* configuration overrides given at open (dm_st_open_opts) */
    dm_config_overrides ov;
};

/* The file's "quant_experts" metadata (docs/format.md): 0 absent, 8 "int8", 4 "int4", -1 any
 * other value. */
int dm_st_quant_bits(const dm_st_file *f);
/* dm_st_release (ditmoe.h): the loader lets each tensor's pages go once the backend has its copy. */

/* Sort the table by name into by_name; DM_ERR_FORMAT if a name appears twice. */
dm_status dm_st_index(dm_st_file *f);

/* PyTorch checkpoint (zip or legacy format) from f->map/f->size into the table (pt.c). */
dm_status dm_pt_fill(dm_st_file *f);
int dm_pt_magic(const uint8_t *b, size_t size); /* 1 zip, 2 legacy pickle, 0 neither */

/* The configuration JSON tools/convert_checkpoint.py would write for this tensor table and these
 * overrides (pt_config.c), as a malloc'd string. */
dm_status dm_config_infer_json(const dm_st_file *f, const dm_config_overrides *ov, char **json);
/* The file's own "ditmoe" metadata with the given overrides applied (malloc'd). */
dm_status dm_config_overlay_json(const char *path, const char *meta, const dm_config_overrides *ov,
                                 char **json);
/* A cJSON tree (const cJSON *) printed as Python's json.dumps would (pyjson.c); malloc'd, or
 * NULL when out of memory. */
char *dm_json_python(const void *json);
/* ImageNet-1k class names compiled into the library (imagenet.c): the name of class i, or NULL. */
const char *dm_imagenet_class(int i);
/* A 1000-class model without class names gets the ImageNet names. */
dm_status dm_config_default_class_names(dm_config *c);

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

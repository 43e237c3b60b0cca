/* pt_internal.h — internal: the restricted pickle reader (pickle.c) and the zip directory
 * (pt_zip.c) behind the PyTorch checkpoint reader (pt.c). */
#ifndef DM_IO_PT_INTERNAL_H
#define DM_IO_PT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "ditmoe.h"

/* ---- pickle values ---- */
typedef enum {
    PV_NONE = 0, PV_BOOL, PV_INT, PV_FLOAT, PV_STR, PV_BYTES, PV_TUPLE, PV_LIST, PV_DICT,
    PV_GLOBAL,  /* one of the allowed globals (g) */
    PV_STORAGE, /* persistent id of a storage: dtype (pt_dtype), key, numel */
    PV_TENSOR,  /* _rebuild_tensor_v2 result */
    PV_OBJECT,  /* an inert object (argparse.Namespace): its state is dropped */
    PV_MARK
} pv_kind;

/* Storage element types (torch.<X>Storage). */
typedef enum {
    PT_F32 = 0, PT_F16, PT_BF16, PT_F64, PT_I64, PT_I32, PT_I16, PT_I8, PT_U8, PT_BOOL, PT_NTYPES
} pt_dtype;
extern const char *const dm_pt_dtype_names[PT_NTYPES]; /* "float32", ... */
size_t dm_pt_dtype_size(pt_dtype t);

/* The allowed globals. */
typedef enum {
    PG_ORDERED_DICT = 0, PG_REBUILD_TENSOR_V2, PG_REBUILD_PARAMETER, PG_NAMESPACE, PG_STORAGE
} pg_kind;

typedef struct {
    pv_kind kind;
    int64_t i;          /* INT, BOOL; STORAGE: numel; TENSOR: storage offset (elements) */
    double f;           /* FLOAT */
    char *s;            /* STR, BYTES (NUL-terminated copy); STORAGE: key */
    size_t slen;
    int *items;         /* TUPLE, LIST: [n]; DICT: keys and values interleaved, [2n] */
    int n, cap;
    int g;              /* GLOBAL: pg_kind */
    int dtype;          /* GLOBAL PG_STORAGE, STORAGE, TENSOR: pt_dtype */
    int storage;        /* TENSOR: value index of its STORAGE */
    int ndim;           /* TENSOR */
    int64_t shape[DM_MAX_DIMS], stride[DM_MAX_DIMS];
} pv;

typedef struct {
    pv *v;              /* [nv] all values; index 0 is unused */
    int nv, capv;
    int root;           /* value index of the unpickled object */
} pk_graph;

/* Unpickle buf[0..len) (stops at STOP; *used = bytes consumed, may be NULL). `what` names the
 * stream in errors ("<path>: <what>: byte N: ..."). legacy: persistent ids have 6 fields. */
dm_status dm_pickle_load(const char *path, const char *what, const uint8_t *buf, size_t len,
                         int legacy, pk_graph *g, size_t *used);
void dm_pickle_free(pk_graph *g);
/* Value of string key `key` in DICT d, or 0. */
int dm_pickle_dict_get(const pk_graph *g, int d, const char *key);

/* ---- zip directory ---- */
typedef struct {
    char *name;
    uint64_t offset;    /* of the data in the file */
    uint64_t size;      /* stored == uncompressed size */
    int method;         /* 0 stored */
    int flags;
} pz_entry;
typedef struct {
    pz_entry *e;        /* [n] sorted by name */
    int n;
} pz_dir;
dm_status dm_zip_read(const char *path, const uint8_t *b, size_t size, pz_dir *z);
const pz_entry *dm_zip_find(const pz_dir *z, const char *name);
void dm_zip_free(pz_dir *z);

#endif

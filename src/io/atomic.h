/* atomic.h — internal: write an output file through a temp file beside it, then rename.
 *
 *   char tmp[DM_ATOMIC_TMP_MAX];
 *   FILE *f = dm_atomic_open(path, tmp);          // NULL + dm_fail(DM_ERR_WRITE) on failure
 *   ... fwrite(..., f) ...
 *   st = dm_atomic_commit(f, tmp, path);          // fflush, fsync, fclose, rename
 *   // or, on an error while writing: dm_atomic_abort(f, tmp);  (closes and removes tmp)
 *
 * The temp name is "<path>.tmp.<pid>", so a crash never leaves a half-written <path>.
 */
#ifndef DM_IO_ATOMIC_H
#define DM_IO_ATOMIC_H

#include <stdio.h>

#include "ditmoe.h"

#define DM_ATOMIC_TMP_MAX 4096

FILE *dm_atomic_open(const char *path, char tmp[DM_ATOMIC_TMP_MAX]);
/* Closes f in every case; on failure removes tmp and returns DM_ERR_WRITE naming path. */
dm_status dm_atomic_commit(FILE *f, const char *tmp, const char *path);
/* Closes f (if not NULL) and removes tmp. Does not touch the error message. */
void dm_atomic_abort(FILE *f, const char *tmp);

#endif

/* png_scan.h — internal: a structural pass over a PNG before libpng sees it.
 *
 * libpng allocates a chunk's declared length before reading the chunk, so a 100-byte file can
 * make it ask for 1.7 GB (found by tests/fuzz/fuzz_png). dm_png_prescan walks the chunk heads
 * with seeks (no data read): signature, every length within the bytes that follow it, an IEND.
 * Then everything libpng allocates for chunks is bounded by the file's size. */
#ifndef DM_IO_PNG_SCAN_H
#define DM_IO_PNG_SCAN_H

#include <stdio.h>

#include "ditmoe.h"

/* DM_OK and f rewound to the start, or DM_ERR_FORMAT naming path (DM_ERR_IO on a read error). */
dm_status dm_png_prescan(FILE *f, const char *path);

#endif

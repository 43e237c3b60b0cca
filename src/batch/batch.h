/* batch.h — internal parts of batch FID generation (ditmoe-batch): the SHA-256 (FIPS 180-2) and
 * CRC-32 (ISO-HDLC, zip) state, and the streaming .npz writer. What ditmoe-batch calls (classes,
 * shards, resume scan, manifest, pack, file hash) is public, in ditmoe.h "Batch runs". */
#ifndef DM_BATCH_H
#define DM_BATCH_H

#include <stdio.h>

#include "ditmoe.h"

/* ------------------------------------------------------------------ SHA-256 (sha256.c) */
typedef struct {
    uint32_t h[8];
    uint64_t nbytes;   /* message length so far */
    uint8_t buf[64];   /* partial block */
    size_t nbuf;
} dm_sha256_ctx;
void dm_sha256_init(dm_sha256_ctx *c);
void dm_sha256_update(dm_sha256_ctx *c, const void *data, size_t n);
void dm_sha256_final(dm_sha256_ctx *c, uint8_t digest[32]);

/* ------------------------------------------------------------------ CRC-32 (crc32.c) */
/* Zip / PNG CRC-32 (reflected polynomial 0xEDB88320, init and final xor 0xffffffff).
 * Running form: crc = dm_crc32(0, a, na); crc = dm_crc32(crc, b, nb); ... */
uint32_t dm_crc32(uint32_t crc, const void *data, size_t n);        /* slicing-by-8 tables */
uint32_t dm_crc32_naive(uint32_t crc, const void *data, size_t n);  /* bit by bit reference */

/* ------------------------------------------------------------------ npz (npz.c) */
/* Streaming writer of an uncompressed (STORED) zip as numpy's savez makes it; each member is
 * "<name>.npy" (format 1.0 header padded to 64 bytes). Members larger than 4 GiB - 1, or at
 * offsets past it, get ZIP64 extra fields, and then the archive gets the ZIP64 end records;
 * force_zip64 uses them for everything (tests). Written to a temp file and renamed on close. */
typedef struct dm_npz dm_npz;
dm_status dm_npz_open(const char *path, int force_zip64, dm_npz **out);
/* descr: numpy type string, "|u1" or "<i8"; shape [ndim]. */
dm_status dm_npz_begin(dm_npz *z, const char *name, const char *descr, size_t itemsize, int ndim,
                       const int64_t *shape);
dm_status dm_npz_write(dm_npz *z, const void *data, size_t n);
dm_status dm_npz_end(dm_npz *z);   /* after exactly prod(shape)*itemsize bytes */
dm_status dm_npz_close(dm_npz *z); /* central directory, rename; frees z */
void dm_npz_abort(dm_npz *z);      /* removes the temp file; frees z (NULL ok) */
/* The numpy .npy v1.0 header for (descr, fortran False, shape), padded with spaces and '\n' so
 * that its length (magic included) is a multiple of 64. Returns the length, 0 if n is small. */
size_t dm_npy_header(const char *descr, int ndim, const int64_t *shape, char *buf, size_t n);

#endif

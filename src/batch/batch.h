/* batch.h — internal: batch FID generation (ditmoe-batch). Index -> class draw, sharding, resume
 * scan, run manifest, the ADM evaluator's .npz (stored zip, ZIP64), and the two checksums that
 * need: SHA-256 (FIPS 180-2) for model files and CRC-32 (ISO-HDLC, zip) for zip members.
 *
 * Everything a generated image depends on is a function of (seed, global index): its class here,
 * its noise through dm_sample's index argument. So the set of files never depends on the batch
 * size, the number of processes or the order in which work finishes.
 */
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
/* Lower-case hex digest of a whole file; DM_ERR_IO naming the file. */
dm_status dm_sha256_file(const char *path, char hex[65]);

/* ------------------------------------------------------------------ CRC-32 (crc32.c) */
/* Zip / PNG CRC-32 (reflected polynomial 0xEDB88320, init and final xor 0xffffffff).
 * Running form: crc = dm_crc32(0, a, na); crc = dm_crc32(crc, b, nb); ... */
uint32_t dm_crc32(uint32_t crc, const void *data, size_t n);        /* slicing-by-8 tables */
uint32_t dm_crc32_naive(uint32_t crc, const void *data, size_t n);  /* bit by bit reference */

/* ------------------------------------------------------------------ classes, shards (batch.c) */
typedef enum {
    DM_BATCH_RANDOM = 0, /* uniform over [0, num_classes), Philox keyed apart from the noise  */
    DM_BATCH_BALANCED,   /* index mod num_classes                                             */
    DM_BATCH_LIST,       /* list[index mod nlist]                                             */
} dm_batch_class_mode;

typedef struct {
    dm_batch_class_mode mode;
    int num_classes; /* the model's K (null class = K) */
    int nlist;
    int *list;       /* [nlist] class ids (LIST mode), malloc'd */
} dm_batch_classes;

/* Parse "random", "balanced" or a comma list of ids/names (resolved with dm_config_class_id).
 * DM_ERR_ARG naming --classes. */
dm_status dm_batch_classes_parse(const char *s, const dm_config *cfg, dm_batch_classes *out);
void dm_batch_classes_free(dm_batch_classes *c);
/* Canonical text: "random", "balanced" or "3,5,7" (ids), for the manifest. */
void dm_batch_classes_str(const dm_batch_classes *c, char *buf, size_t n);
/* Class of image `index` under noise seed `seed`. Random mode: Philox4x32-10 with counter
 * {draw, 0x636c6173 ("clas"), index lo32, index hi32} and key {seed lo32 ^ 0x9e3779b9,
 * seed hi32 ^ 0xbb67ae85} (the noise uses key {seed lo32, seed hi32}); each 32-bit word w gives
 * a class by Lemire's multiply-shift with rejection of w*K mod 2^32 < 2^32 mod K, so every class
 * is exactly equally likely. */
int dm_batch_class_of(const dm_batch_classes *c, uint64_t seed, uint64_t index);

/* Shard r of n owns the indices i with i mod n == r. */
static inline int dm_batch_owns(uint64_t index, int rank, int size)
{
    return (int)(index % (uint64_t)size) == rank;
}

/* "DIR/000123.png" ({index:06d}, wider when needed). */
void dm_batch_png_path(const char *dir, uint64_t index, char *buf, size_t n);

/* Scan DIR once: done[i] = 1 for every i < num with DIR/{i:06d}.png present (a finished image:
 * files appear only by rename). Returns the count in *ndone. When clean_rank >= 0, also removes
 * leftover temp files "{i:06d}.png.tmp.*" of indices shard (clean_rank, clean_size) owns, and
 * "manifest.json.tmp.*" when clean_rank == 0. done may be NULL (count only). */
dm_status dm_batch_scan(const char *dir, int64_t num, uint8_t *done, int64_t *ndone,
                        int clean_rank, int clean_size);

/* ------------------------------------------------------------------ manifest (manifest.c) */
typedef struct {
    char model_file[256], vae_file[256]; /* base names, informational (not compared) */
    char model_sha256[65], vae_sha256[65];
    uint64_t seed;
    char sampler[16];
    int steps;
    float cfg_scale;
    int cfg_channels; /* 0 = all */
    float cfg_t_lo, cfg_t_hi, eta;
    char classes[4096]; /* dm_batch_classes_str() */
    int num_classes;
    int64_t num;        /* N images, indices 0..N-1 */
    int width, height, channels; /* PNG size */
} dm_batch_params;

/* Write DIR/manifest.json atomically: every parameter plus progress {done, total}. */
dm_status dm_batch_manifest_write(const char *dir, const dm_batch_params *p, int64_t done);
/* If DIR/manifest.json exists, compare it with p. DM_ERR_ARG naming the first differing
 * parameter by its flag, with both values; DM_ERR_FORMAT if unreadable. *found = 0 if absent. */
dm_status dm_batch_manifest_check(const char *dir, const dm_batch_params *p, int *found);
/* Read N, the class text and the image size back (for pack). */
dm_status dm_batch_manifest_read(const char *dir, dm_batch_params *p);

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

/* ------------------------------------------------------------------ pack (pack.c) */
/* Read DIR/000000.png .. {num-1}.png (libpng, one at a time) into OUT.npz: arr_0 uint8
 * [num, H, W, 3] (gray replicated to RGB, alpha dropped), and with labels arr_1 int64 [num] from
 * each PNG's tEXt "class" (leading integer). Refuses missing indices (naming the first) and
 * differing sizes. */
dm_status dm_batch_pack(const char *dir, int64_t num, const char *out, int labels, int force_zip64,
                        dm_progress_fn progress, void *progress_ctx);

#endif

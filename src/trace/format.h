/* format.h — internal: byte layout of a routing dump (docs/routing.md §Format).
 *
 *   [0, 8)    magic "DMROUTE1"
 *   [8, 16)   u64 offset of the JSON header (0 while the dump is being written)
 *   [16, 24)  u64 length of the JSON header
 *   [24, off) records, each:
 *               u32 tag "DMRR" | u32 batch | u32 eval | u32 step | u32 rows R | u32 flags
 *               u64 payload bytes (everything after this 32-byte head)
 *               R x { i64 image | i32 label | i32 class | f32 t | u32 kind (0 cond, 1 uncond) }
 *                 (label: fed to the model, null = num_classes; class: the image's class)
 *               ids [Lm, R*T, k]  u8 (0xFF = none) or u16 (0xFFFF = none), per header id_dtype
 *               weights [Lm, R*T, k] f16, when the header says weights "f16"
 *               token flags [Lm, R*T] u8, when flags bit 0 is set
 *   [off, off+len)  JSON header (UTF-8, no terminator)
 * All integers little endian. */
#ifndef DM_TRACE_FORMAT_H
#define DM_TRACE_FORMAT_H

#include "ditmoe.h"

#define DM_TRACE_MAGIC "DMROUTE1"
#define DM_TRACE_HEAD_BYTES 24
#define DM_TRACE_REC_TAG 0x52524D44u /* "DMRR" little endian */
#define DM_TRACE_REC_HEAD 32
#define DM_TRACE_ROW_BYTES 24
#define DM_TRACE_FLAG_TOKFLAGS 1u
#define DM_TRACE_VERSION 1
#define DM_TRACE_MAX_ROWS (1 << 20)

/* Bytes of one id: 1 when every id (and the "none" code) fits a byte. */
static inline int dm_trace_id_bytes(const dm_trace_shape *s)
{
    int X = s->uncond_expert >= 0 ? s->uncond_expert + 1 : s->num_experts;
    return X < 255 ? 1 : 2;
}

static inline void dm_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void dm_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint32_t dm_get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static inline uint64_t dm_get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

#endif

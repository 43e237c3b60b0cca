/* dtype names, sizes and float conversions (F16, BF16 <-> F32, round to nearest even). */
#include "ditmoe.h"

#include <string.h>

static const struct {
    const char *name;
    size_t size;
} k_dtypes[DM_DTYPE_COUNT] = {
    [DM_F32] = {"F32", 4}, [DM_F16] = {"F16", 2}, [DM_BF16] = {"BF16", 2},
    [DM_I32] = {"I32", 4}, [DM_I64] = {"I64", 8}, [DM_U8] = {"U8", 1}, [DM_I8] = {"I8", 1},
};

const char *dm_dtype_name(dm_dtype t)
{
    return (unsigned)t < DM_DTYPE_COUNT ? k_dtypes[t].name : "?";
}

size_t dm_dtype_size(dm_dtype t) { return (unsigned)t < DM_DTYPE_COUNT ? k_dtypes[t].size : 0; }

int dm_dtype_from_name(const char *s, dm_dtype *out)
{
    for (int i = 0; i < DM_DTYPE_COUNT; i++)
        if (strcmp(s, k_dtypes[i].name) == 0) {
            *out = (dm_dtype)i;
            return 0;
        }
    return -1;
}

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float dm_bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

float dm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0) {
        if (man == 0) return bits_to_f32(sign);
        /* subnormal: value = man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t dm_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

uint16_t dm_f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);         /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);        /* overflow -> inf */
    if (a < 0x38800000u) {                                          /* subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;                  /* < 2^-25 rounds to 0 */
        uint32_t man = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(a >> 23); /* 14..24 */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
    return (uint16_t)(sign | (r >> 13));
}

dm_status dm_convert_to_f32(dm_dtype t, const void *src, size_t n, float *dst)
{
    const unsigned char *b = (const unsigned char *)src; /* may be unaligned in a mapping */
    uint16_t h;
    switch (t) {
    case DM_F32: memcpy(dst, src, n * sizeof(float)); return DM_OK;
    case DM_F16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, b + 2 * i, 2);
            dst[i] = dm_f16_to_f32(h);
        }
        return DM_OK;
    case DM_BF16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, b + 2 * i, 2);
            dst[i] = dm_bf16_to_f32(h);
        }
        return DM_OK;
    default: return dm_fail(DM_ERR_FORMAT, "dtype %s cannot be converted to F32", dm_dtype_name(t));
    }
}

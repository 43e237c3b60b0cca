/* Values of routed experts stored quantised (docs/format.md "Quantised routed experts"), for a
 * backend that computes with float weights: dm_dequant_rows (ditmoe.h). The products are those of
 * the CPU backend's dm_lp_get (backend/cpu/lowp.c), so both backends start from the same values;
 * tests/test_quant_stored.c checks the equality bit for bit. */
#include "ditmoe.h"

#include <math.h>
#include <string.h>

#define GROUP 32 /* int4 scale group (DM_Q4_GROUP of the CPU backend) */

dm_status dm_dequant_rows(int bits, const void *q, const void *scale, int out, int in, int r0,
                          int nr, const char *name, float *y)
{
    if (!name) name = "weight";
    if ((bits != 8 && bits != 4) || out <= 0 || in <= 0 || r0 < 0 || nr < 0 || r0 > out - nr ||
        (bits == 4 && in % GROUP))
        return dm_fail(DM_ERR_ARG, "%s: cannot dequantise rows %d..%d of a stored int%d weight "
                       "[%d, %d]", name, r0, r0 + nr - 1, bits, out, in);
    const unsigned char *qb = q, *sb = scale;
    for (int r = 0; r < nr; r++) {
        const int o = r0 + r;
        float *yr = y + (size_t)r * in;
        if (bits == 8) {
            float s;
            memcpy(&s, sb + (size_t)o * 4, 4);
            if (!isfinite(s))
                return dm_fail(DM_ERR_FORMAT, "%s: scale of row %d is not finite", name, o);
            const signed char *row = (const signed char *)qb + (size_t)o * in;
            for (int k = 0; k < in; k++) {
                if (row[k] == -128)
                    return dm_fail(DM_ERR_FORMAT, "%s: value -128 at [%d, %d] (int8 experts are "
                                   "symmetric, -127..127)", name, o, k);
                yr[k] = (float)row[k] * s;
            }
            continue;
        }
        const int ng = in / GROUP;
        const unsigned char *row = qb + (size_t)o * (size_t)(in / 2);
        for (int g = 0; g < ng; g++) {
            uint16_t dh;
            memcpy(&dh, sb + ((size_t)o * ng + g) * 2, 2);
            if ((dh & 0x7f80u) == 0x7f80u)
                return dm_fail(DM_ERR_FORMAT, "%s: scale of row %d, group %d is not finite", name,
                               o, g);
            const float d = dm_bf16_to_f32(dh);
            for (int k = g * GROUP; k < (g + 1) * GROUP; k++) {
                const int nib = (row[k / 2] >> (k % 2 ? 4 : 0)) & 15;
                /* the CPU import keeps zero nibbles in a group of scale 0: value 0 * d */
                const int v = d == 0.0f ? 0 : (nib ^ 8) - 8;
                yr[k] = (float)v * d;
            }
        }
    }
    return DM_OK;
}

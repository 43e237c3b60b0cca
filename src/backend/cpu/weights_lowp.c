/* Which CPU weights are stored in low precision (lowp.h), by role: the rule the CPU backend's
 * weight() op applies under --precision bf16 and --quant-experts int8|int4 (issue 13).
 *
 *   role EXPERT (routed experts, incl. ProMoE's unconditional one), quant int8/int4 -> DM_LP_Q8/Q4;
 *   any other LINEAR weight except ROUTER, precision bf16                          -> DM_LP_BF16;
 *   ROUTER and VAE always, VECTOR / CONV uses, and everything under f32 without quant -> the
 *   backend's float32 (or 16-bit-widened) packed path, unchanged.
 * The router stays float32 so quantisation cannot flip expert choices; the shared expert keeps the
 * model precision (QuantMoE-Bench: the always-on expert deserves more bits; docs/spec/
 * moe-inference.md A3). int4 on a weight whose input width is not a multiple of 32 is an error
 * naming the tensor, found at load, never a silent fallback.
 *
 * Compiled only where backend/backend.h (the op table's roles and uses) is present. */
#if defined(__has_include)
#if __has_include("backend/backend.h")
#define DM_HAVE_BACKEND_H 1
#endif
#endif

#ifdef DM_HAVE_BACKEND_H
#include "backend/cpu/lowp.h"

#include <string.h>

dm_status dm_lp_choose(const dm_lp_policy *p, const dm_weight_desc *d, int *lowp, dm_lp_format *fmt)
{
    *lowp = 0;
    *fmt = DM_LP_BF16;
    if (!p || d->use != DM_USE_LINEAR || d->role == DM_ROLE_ROUTER || d->role == DM_ROLE_VAE)
        return DM_OK;
    const char *name = d->name ? d->name : "weight";
    if (d->role == DM_ROLE_EXPERT && p->expert_bits) {
        if (p->expert_bits != 8 && p->expert_bits != 4)
            return dm_fail(DM_ERR_ARG, "%s: expert quantisation to %d bits is not supported (int8 or int4)",
                           name, p->expert_bits);
        if (p->expert_bits == 4 && d->cols % DM_Q4_GROUP)
            return dm_fail(DM_ERR_ARG,
                           "%s: --quant-experts int4 needs the expert input width to be a multiple "
                           "of %d; this weight is [%d, %d] (use int8)",
                           name, DM_Q4_GROUP, d->rows, d->cols);
        *lowp = 1;
        *fmt = p->expert_bits == 8 ? DM_LP_Q8 : DM_LP_Q4;
        return DM_OK;
    }
    if (p->bf16) {
        *lowp = 1;
        *fmt = DM_LP_BF16;
    }
    return DM_OK;
}

dm_status dm_lp_pack_desc(const dm_lp_policy *p, const dm_weight_desc *d, dm_lpmat *m, int *lowp)
{
    dm_lp_format fmt;
    memset(m, 0, sizeof *m);
    dm_status st = dm_lp_choose(p, d, lowp, &fmt);
    if (st != DM_OK || !*lowp) return st;
    return dm_lp_pack(m, fmt, d->data, d->dtype, d->rows, d->cols, d->name);
}
#else
typedef int dm_weights_lowp_needs_backend_h; /* ISO C: a translation unit must not be empty */
#endif

/* Which CPU weights are stored in low precision (lowp.h), by role: the rule the CPU backend's
 * weight() op applies under --precision bf16 and --quant-experts int8|int4 (issue 13).
 *
 *   role EXPERT (routed experts, incl. ProMoE's unconditional one), quant int8/int4 -> DM_LP_Q8/Q4;
 *   the per-token GEMMs (ATTN, EXPERT, SHARED, MLP LINEAR weights), precision bf16  -> DM_LP_BF16;
 *   ROUTER and VAE always, the per-image / small products (EMBED: patch embedding and timestep
 *   MLP; MOD: adaLN modulation; FINAL: final adaLN and linear), VECTOR / CONV uses, and
 *   everything under f32 without quant -> the backend's float32 (or 16-bit-widened) packed path.
 * EMBED / MOD / FINAL stay float32 under bf16 because they carry most of bf16's error for almost
 * none of its time: on random S/2-8E2A at batch 16 they were 2/3 of the RMS error and 3/4 of the
 * routing flips, for about 0.1 % of the FLOPs (M = batch rows, or K = 16 / N = 32; docs/perf.md,
 * "bf16 error budget").
 * The router stays float32 so quantisation cannot flip expert choices; the shared expert keeps the
 * model precision (QuantMoE-Bench: the always-on expert deserves more bits; docs/spec/
 * moe-inference.md A3). int4 on a weight whose input width is not a multiple of 32 is an error
 * naming the tensor, found at load, never a silent fallback.
 * Files that store the routed experts quantised (docs/format.md, ditmoe-convert --quant-experts)
 * come in through dm_lp_import: the file's int8 / int4 values go straight into the packed panels
 * (no float copy), the same dm_lpmat dm_lp_pack would build from the float weights; the converter
 * quantises with dm_lp_pack itself (dm_quant_weight), so both routes give the same bits.
 *
 * Compiled only where backend/backend.h (the op table's roles and uses) is present. */
#if defined(__has_include)
#if __has_include("backend/backend.h")
#define DM_HAVE_BACKEND_H 1
#endif
#endif

#ifdef DM_HAVE_BACKEND_H
#include "backend/cpu/lowp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int dm_lp_bf16_role(dm_weight_role r)
{
    return r == DM_ROLE_ATTN || r == DM_ROLE_EXPERT || r == DM_ROLE_SHARED || r == DM_ROLE_MLP;
}

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
    if (p->bf16 && dm_lp_bf16_role(d->role)) {
        *lowp = 1;
        *fmt = DM_LP_BF16;
    }
    return DM_OK;
}

/* ---- pre-quantised weights: the file's canonical layout <-> the packed panels ----------------
 * Q8 panel layout (gemm_q8.c): int8 [np][kb = ceil(in/4)][32 columns][4 k]; corr = 128 * sum q.
 * Q4 panel layout (gemm_q4.c): per panel and group of 32 k, 8 quads of 64 bytes, byte c%16*4 + j
 * of quad t holds k = 32g + 4t + j of column c (low nibble for c < 16, high for c >= 16);
 * fcorr = 128 * 16 * sum_g d_g * sum_{k in g} q, summed in double in group order. Both exactly as
 * dm_lp_pack_q8 / dm_lp_pack_q4 build them (a group whose scale is 0 keeps zero nibbles there). */
#define Q4_QB 512 /* bytes per panel and group */

static float rd_f32(const void *p, size_t i)
{
    float v;
    memcpy(&v, (const unsigned char *)p + 4 * i, 4);
    return v;
}

static uint16_t rd_u16(const void *p, size_t i)
{
    uint16_t v;
    memcpy(&v, (const unsigned char *)p + 2 * i, 2);
    return v;
}

dm_status dm_lp_import(dm_lpmat *m, dm_lp_format fmt, int out, int in, const void *q,
                       const void *scale, const char *name)
{
    memset(m, 0, sizeof *m);
    if (!name) name = "weight";
    if ((fmt != DM_LP_Q8 && fmt != DM_LP_Q4) || out <= 0 || in <= 0 ||
        (size_t)out * (size_t)in > ((size_t)1 << 40) || (fmt == DM_LP_Q4 && in % DM_Q4_GROUP))
        return dm_fail(DM_ERR_ARG, "%s: cannot take a stored %s weight of shape [%d, %d]", name,
                       dm_lp_format_name(fmt), out, in);
    m->fmt = fmt;
    m->out = out;
    m->in = in;
    m->np = (out + DM_LP_PANEL - 1) / DM_LP_PANEL;
    const size_t cols = (size_t)m->np * DM_LP_PANEL;
    if (fmt == DM_LP_Q8) {
        m->kb = (in + 3) / 4;
        const size_t n = (size_t)m->np * m->kb * DM_LP_PANEL * 4;
        int8_t *p = aligned_alloc(64, (n + 63) / 64 * 64);
        m->w = p;
        m->scale = calloc(cols, sizeof(float));
        m->corr = calloc(cols, sizeof(int32_t));
        if (!p || !m->scale || !m->corr) goto nomem;
        memset(p, 0, n);
        const int8_t *qs = q;
        for (int o = 0; o < out; o++) {
            const float s = rd_f32(scale, (size_t)o);
            if (!isfinite(s)) {
                dm_lp_free(m);
                return dm_fail(DM_ERR_FORMAT, "%s: scale of row %d is not finite", name, o);
            }
            const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
            const int8_t *row = qs + (size_t)o * in;
            int32_t sum = 0;
            for (int i = 0; i < in; i++) {
                if (row[i] == -128) {
                    dm_lp_free(m);
                    return dm_fail(DM_ERR_FORMAT, "%s: value -128 at [%d, %d] (int8 experts are "
                                   "symmetric, -127..127)", name, o, i);
                }
                p[((j * m->kb + (size_t)i / 4) * DM_LP_PANEL + c) * 4 + (size_t)i % 4] = row[i];
                sum += row[i];
            }
            m->scale[o] = s;
            m->corr[o] = 128 * sum;
        }
        return DM_OK;
    }
    m->kb = in / DM_Q4_GROUP;
    const size_t n = (size_t)m->np * m->kb * Q4_QB;
    uint8_t *p = aligned_alloc(64, n);
    m->w = p;
    m->gscale = calloc((size_t)m->np * m->kb * DM_LP_PANEL, sizeof(uint16_t));
    m->fcorr = calloc(cols, sizeof(float));
    if (!p || !m->gscale || !m->fcorr) goto nomem;
    memset(p, 0, n);
    const uint8_t *qb = q;
    for (int o = 0; o < out; o++) {
        const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
        const uint8_t *row = qb + (size_t)o * (size_t)(in / 2);
        double corr = 0;
        for (int g = 0; g < m->kb; g++) {
            const uint16_t dh = rd_u16(scale, (size_t)o * m->kb + g);
            if ((dh & 0x7f80u) == 0x7f80u) {
                dm_lp_free(m);
                return dm_fail(DM_ERR_FORMAT, "%s: scale of row %d, group %d is not finite", name,
                               o, g);
            }
            const float d = dm_bf16_to_f32(dh);
            m->gscale[(j * m->kb + g) * DM_LP_PANEL + c] = dh;
            int sum = 0;
            /* quad t of the group: k = 32g + 4t + jj, from file bytes 16g + 2t and + 1, to bytes
             * t*64 + (c%16)*4 + jj of the panel's group block, this column's nibble */
            const uint8_t *src = row + (size_t)g * (DM_Q4_GROUP / 2);
            uint8_t *dst = p + (j * m->kb + g) * Q4_QB + (c % 16) * 4;
            const int sh = c < 16 ? 0 : 4;
            for (int t = 0; t < 8 && d != 0.0f; t++) {
                const int n[4] = {src[2 * t] & 15, src[2 * t] >> 4, src[2 * t + 1] & 15,
                                  src[2 * t + 1] >> 4};
                for (int jj = 0; jj < 4; jj++) {
                    dst[t * 64 + jj] |= (uint8_t)(n[jj] << sh);
                    sum += (n[jj] ^ 8) - 8; /* two's complement nibble */
                }
            }
            corr += (double)d * sum;
        }
        m->fcorr[o] = (float)(corr * 128.0 * 16.0);
    }
    return DM_OK;
nomem:
    dm_lp_free(m);
    return dm_fail(DM_ERR_NOMEM, "%s: no memory for the stored %s weight [%d, %d]", name,
                   dm_lp_format_name(fmt), out, in);
}

dm_status dm_lp_export(const dm_lpmat *m, void *q, void *scale)
{
    const int out = m->out, in = m->in;
    if (m->fmt == DM_LP_Q8) {
        const int8_t *p = m->w;
        int8_t *qs = q;
        for (int o = 0; o < out; o++) {
            const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
            for (int i = 0; i < in; i++)
                qs[(size_t)o * in + i] =
                    p[((j * m->kb + (size_t)i / 4) * DM_LP_PANEL + c) * 4 + (size_t)i % 4];
            memcpy((unsigned char *)scale + 4 * (size_t)o, &m->scale[o], 4);
        }
        return DM_OK;
    }
    if (m->fmt != DM_LP_Q4)
        return dm_fail(DM_ERR_ARG, "%s weights have no stored form", dm_lp_format_name(m->fmt));
    const uint8_t *p = m->w;
    uint8_t *qb = q;
    for (int o = 0; o < out; o++) {
        const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
        uint8_t *row = qb + (size_t)o * (size_t)(in / 2);
        memset(row, 0, (size_t)(in / 2));
        for (int g = 0; g < m->kb; g++) {
            const uint16_t dh = m->gscale[(j * m->kb + g) * DM_LP_PANEL + c];
            memcpy((unsigned char *)scale + 2 * ((size_t)o * m->kb + g), &dh, 2);
            for (int i = 0; i < DM_Q4_GROUP; i++) {
                const int k = g * DM_Q4_GROUP + i;
                const uint8_t byte =
                    p[(j * m->kb + g) * Q4_QB + (size_t)(i / 4) * 64 + (c % 16) * 4 + i % 4];
                const int nib = (byte >> (c < 16 ? 0 : 4)) & 15;
                row[k / 2] |= (uint8_t)(nib << (k % 2 ? 4 : 0));
            }
        }
    }
    return DM_OK;
}

dm_status dm_quant_weight(int bits, const void *W, dm_dtype dtype, int out, int in,
                          const char *name, void *q, void *scale)
{
    if (bits != 8 && bits != 4)
        return dm_fail(DM_ERR_ARG, "%s: %d-bit experts are not supported (int8 or int4)",
                       name ? name : "weight", bits);
    dm_lpmat m;
    dm_status st = dm_lp_pack(&m, bits == 8 ? DM_LP_Q8 : DM_LP_Q4, W, dtype, out, in, name);
    if (st == DM_OK) st = dm_lp_export(&m, q, scale);
    dm_lp_free(&m);
    return st;
}

dm_status dm_lp_pack_desc(const dm_lp_policy *p, const dm_weight_desc *d, dm_lpmat *m, int *lowp)
{
    dm_lp_format fmt;
    memset(m, 0, sizeof *m);
    if (d->quant) { /* stored quantised (docs/format.md): taken as is, never re-quantised */
        const char *name = d->name ? d->name : "weight";
        *lowp = 0;
        if (d->quant != 8 && d->quant != 4)
            return dm_fail(DM_ERR_ARG, "%s: stored %d-bit weights are not supported (int8 or int4)",
                           name, d->quant);
        if (d->use != DM_USE_LINEAR || d->role != DM_ROLE_EXPERT)
            return dm_fail(DM_ERR_ARG, "%s: only routed experts' matrices may be stored quantised",
                           name);
        if (p && p->expert_bits && p->expert_bits != d->quant)
            return dm_fail(DM_ERR_ARG, "%s: stored as int%d; --quant-experts int%d would "
                           "re-quantise it (load the float file, or ask for int%d)", name,
                           d->quant, p->expert_bits, d->quant);
        dm_status st = dm_lp_import(m, d->quant == 8 ? DM_LP_Q8 : DM_LP_Q4, d->rows, d->cols,
                                    d->data, d->scale, name);
        *lowp = st == DM_OK;
        return st;
    }
    dm_status st = dm_lp_choose(p, d, lowp, &fmt);
    if (st != DM_OK || !*lowp) return st;
    return dm_lp_pack(m, fmt, d->data, d->dtype, d->rows, d->cols, d->name);
}
#else
typedef int dm_weights_lowp_needs_backend_h; /* ISO C: a translation unit must not be empty */
#endif

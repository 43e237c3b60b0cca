/* Weight upload: tensors go from the (mmapped) file bytes to the device through a bounded pinned
 * staging ring of two halves (DMC_STAGE_BYTES in all), in the file dtype; conversions (fp32 ->
 * bf16 for GEMM weights, 16-bit -> fp32 for vectors) run on the device. No full host copy of a
 * model is ever built: host memory stays at the ring's size whatever the model (G/2: 33 GB of
 * 16-bit weights). The copy of half i overlaps the memcpy into half 1 - i.
 * Routed experts stored quantised (docs/format.md "Quantised routed experts": int8 / int4) are
 * dequantised on the host, a chunk of rows at a time straight into the staging ring, with the
 * CPU backend's values (dm_dequant_rows) rounded once to bf16: there is no integer GEMM on the
 * GPU yet, so they cost as much device memory as a bf16 file. */
#include "backend/cuda/cuda_be.h"

#ifdef DMC_HAVE_SEAM
#include <stdlib.h>
#include <string.h>

#define DMC_STAGE_BYTES ((size_t)64 << 20)

static dm_status stage_init(dmc_ctx *c, const char *name)
{
    if (c->pinned) return DM_OK;
    if (cudaHostAlloc(&c->pinned, DMC_STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess) {
        c->pinned = NULL;
        (void)cudaGetLastError();
        return dm_fail(DM_ERR_NOMEM, "cuda: %s: cannot pin %zu MiB of host memory for staging",
                       name, DMC_STAGE_BYTES >> 20);
    }
    c->pinned_bytes = DMC_STAGE_BYTES;
    return DM_OK;
}

/* dst (device, n elements of out_kind: 0 fp32, else the 16-bit type out_kind - 1) from host
 * `src` of file dtype `dt`, through the ring. */
static dm_status upload_convert(dmc_ctx *c, const char *name, const void *src, dm_dtype dt,
                                size_t n, void *dst, int to_f32, dmc_h16 t16)
{
    dm_status st = stage_init(c, name);
    if (st) return st;
    const size_t esz = dm_dtype_size(dt), half = c->pinned_bytes / 2;
    const size_t per = half / esz / 8 * 8; /* elements per chunk, keeps 16-B alignment */
    const int same = to_f32 ? dt == DM_F32 : (dt == DM_F16 && t16 == DMC_F16) ||
                                             (dt == DM_BF16 && t16 == DMC_BF16);
    void *dev_raw = NULL;
    if (!same && !(dev_raw = dmc_scratch(c, DMC_SCR_STAGE, 2 * half, name, &st))) return st;
    const size_t osz = to_f32 ? 4 : 2;
    for (size_t i0 = 0, chunk = 0; i0 < n; i0 += per, chunk++) {
        const size_t m = n - i0 < per ? n - i0 : per;
        const int hh = (int)(chunk & 1);
        char *pin = (char *)c->pinned + (size_t)hh * half;
        if (c->half_used[hh] && (st = dmc_err((int)cudaEventSynchronize(c->half_done[hh]), name)))
            return st;
        memcpy(pin, (const char *)src + i0 * esz, m * esz);
        char *out = (char *)dst + i0 * osz;
        if (same) {
            st = dmc_err((int)cudaMemcpyAsync(out, pin, m * esz, cudaMemcpyHostToDevice, c->stream), name);
        } else {
            char *raw = (char *)dev_raw + (size_t)hh * half;
            st = dmc_err((int)cudaMemcpyAsync(raw, pin, m * esz, cudaMemcpyHostToDevice, c->stream), name);
            if (!st)
                st = dmc_err(to_f32 ? dmc_any_to_f32(raw, (int)dt, m, (float *)out, c->stream)
                                    : dmc_any_to_h16(raw, (int)dt, m, (uint16_t *)out, t16, c->stream),
                             name);
        }
        if (!st) st = dmc_err((int)cudaEventRecord(c->half_done[hh], c->stream), name);
        if (st) return st;
        c->half_used[hh] = 1;
    }
    return DM_OK;
}

/* dst (device, bf16 [rows, cols]) = the stored-quantised weight d, dequantised on the host into
 * the ring (whole rows per chunk) with the CPU backend's values, then rounded to bf16 (RNE). */
static dm_status upload_dequant(dmc_ctx *c, const dm_weight_desc *d, const char *name,
                                uint16_t *dst)
{
    dm_status st = stage_init(c, name);
    if (st) return st;
    const int rows = d->rows, cols = d->cols;
    const size_t half = c->pinned_bytes / 2, row_bytes = (size_t)cols * 2;
    if (row_bytes > half)
        return dm_fail(DM_ERR_ARG, "cuda: %s: a row of %d values does not fit the staging buffer",
                       name, cols);
    const int per = (int)(half / row_bytes < (size_t)rows ? half / row_bytes : (size_t)rows);
    float *tmp = malloc((size_t)cols * sizeof *tmp);
    if (!tmp) return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of host memory", name);
    for (int r0 = 0, chunk = 0; r0 < rows && !st; r0 += per, chunk++) {
        const int m = rows - r0 < per ? rows - r0 : per;
        const int hh = chunk & 1;
        uint16_t *pin = (uint16_t *)((char *)c->pinned + (size_t)hh * half);
        if (c->half_used[hh] && (st = dmc_err((int)cudaEventSynchronize(c->half_done[hh]), name)))
            break;
        for (int r = 0; r < m && !st; r++) {
            st = dm_dequant_rows(d->quant, d->data, d->scale, rows, cols, r0 + r, 1, name, tmp);
            for (int k = 0; k < cols && !st; k++)
                pin[(size_t)r * cols + k] = dm_f32_to_bf16(tmp[k]);
        }
        if (!st)
            st = dmc_err((int)cudaMemcpyAsync(dst + (size_t)r0 * cols, pin, (size_t)m * row_bytes,
                                              cudaMemcpyHostToDevice, c->stream), name);
        if (!st) st = dmc_err((int)cudaEventRecord(c->half_done[hh], c->stream), name);
        if (!st) c->half_used[hh] = 1;
    }
    free(tmp);
    return st;
}

static dm_status weight_dequant(dmc_ctx *c, const dm_weight_desc *d, const char *name,
                                dm_weight **out)
{
    const int bits = d->quant;
    if ((bits != 8 && bits != 4) || d->use != DM_USE_LINEAR || d->role != DM_ROLE_EXPERT ||
        !d->scale || d->dtype != (bits == 8 ? DM_I8 : DM_U8))
        return dm_fail(DM_ERR_FORMAT, "cuda: %s: a stored-quantised weight must be a routed "
                       "expert's matrix, int8 (I8) or int4 (U8) with its scale (got int%d, %s)",
                       name, bits, dm_dtype_name(d->dtype));
    if (!c->quant_logged[bits == 8]) {
        dm_log(DM_LOG_INFO, "cuda: routed experts stored int%d: dequantised to bf16 on upload "
               "(no int%d GEMM on the GPU yet)", bits, bits);
        c->quant_logged[bits == 8] = 1;
    }
    dm_weight *w = calloc(1, sizeof *w);
    if (!w) return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of host memory", name);
    *w = (dm_weight){.rows = d->rows, .cols = d->cols, .use = d->use, .role = d->role,
                     .ab = DMC_BF16, .bytes = (size_t)d->rows * d->cols * 2};
    dm_status st = dmc_alloc(c, w->bytes, name, &w->p);
    if (!st && w->bytes) st = upload_dequant(c, d, name, w->p);
    if (st) {
        dmc_be_weight_free(c, w);
        return st;
    }
    *out = w;
    return DM_OK;
}

dm_status dmc_be_weight(void *ctx, const dm_weight_desc *d, dm_weight **out)
{
    dmc_ctx *c = ctx;
    *out = NULL;
    const char *name = d->name ? d->name : "weight";
    if (d->rows < 0 || d->cols < 0)
        return dm_fail(DM_ERR_ARG, "cuda: %s: bad shape [%d, %d]", name, d->rows, d->cols);
    if (d->quant) return weight_dequant(c, d, name, out);
    if (d->dtype != DM_F32 && d->dtype != DM_F16 && d->dtype != DM_BF16)
        return dm_fail(DM_ERR_FORMAT, "cuda: %s: dtype %s (expected F32, F16 or BF16)", name,
                       dm_dtype_name(d->dtype));
    dm_weight *w = calloc(1, sizeof *w);
    if (!w) return dm_fail(DM_ERR_NOMEM, "cuda: %s: out of host memory", name);
    *w = (dm_weight){.rows = d->rows, .cols = d->cols, .use = d->use, .role = d->role};
    const size_t n = (size_t)d->rows * d->cols;
    const int to_f32 = d->use == DM_USE_VECTOR || d->role == DM_ROLE_ROUTER ||
                       d->role == DM_ROLE_NORM;
    const dmc_h16 t16 = d->dtype == DM_F16 ? DMC_F16 : DMC_BF16;
    w->ab = to_f32 ? DMC_GEMM_F32 : (int)t16;
    w->bytes = n * (to_f32 ? 4 : 2);
    if (d->role == DM_ROLE_ATTN && w->ab == DMC_F16) c->attn_f16 = 1;
    dm_status st = dmc_alloc(c, w->bytes, name, &w->p);
    if (!st && n) st = upload_convert(c, name, d->data, d->dtype, n, w->p, to_f32, t16);
    if (st) {
        dmc_be_weight_free(c, w);
        return st;
    }
    *out = w;
    return DM_OK;
}

void dmc_be_weight_free(void *ctx, dm_weight *w)
{
    if (!w) return;
    dmc_free(ctx, w->p);
    free(w);
}

size_t dmc_be_weight_bytes(const dm_weight *w) { return w ? w->bytes : 0; }
#else
typedef int dmc_weights_needs_backend_h; /* ISO C: no empty translation unit */
#endif

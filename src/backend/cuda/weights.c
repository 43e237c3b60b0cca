/* Weight upload: tensors go from the (mmapped) file bytes to the device through a bounded pinned
 * staging ring of two halves (DMC_STAGE_BYTES in all), in the file dtype; conversions (fp32 ->
 * bf16 for GEMM weights, 16-bit -> fp32 for vectors) run on the device. No full host copy of a
 * model is ever built: host memory stays at the ring's size whatever the model (G/2: 33 GB of
 * 16-bit weights). The copy of half i overlaps the memcpy into half 1 - i. */
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

dm_status dmc_be_weight(void *ctx, const dm_weight_desc *d, dm_weight **out)
{
    dmc_ctx *c = ctx;
    *out = NULL;
    const char *name = d->name ? d->name : "weight";
    if (d->rows < 0 || d->cols < 0)
        return dm_fail(DM_ERR_ARG, "cuda: %s: bad shape [%d, %d]", name, d->rows, d->cols);
    if (d->quant) /* docs/format.md "Quantised routed experts": not mis-read as floats */
        return dm_fail(DM_ERR_FORMAT, "cuda: %s: the file stores routed experts quantised (int%d); "
                       "the CUDA backend takes F32/F16/BF16 weights only (load the float file)",
                       name, d->quant);
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

/* The CUDA op table (backend/backend.h). Activations are fp32 device buffers as the table
 * requires; every GEMM rounds its input to the weight's 16-bit type and accumulates in fp32
 * (dmc_linear, pinned cuBLASLt algorithms); row ops are own kernels (kernels_rows.cu); the MoE
 * layer is ffn.c, the VAE ops vae.c. Host arrays of the interface (timesteps, labels, routing
 * records) are copied through small scratch buffers. */
#include "backend/cuda/cuda_be.h"

#ifdef DMC_HAVE_SEAM
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- memory ---- */

static dm_status be_alloc(void *ctx, size_t bytes, dm_buf *out)
{
    out->p = NULL;
    out->bytes = 0;
    dm_status st = dmc_alloc(ctx, bytes, "alloc", &out->p);
    if (!st) out->bytes = bytes;
    return st;
}

static void be_release(void *ctx, dm_buf *b)
{
    if (!b) return;
    dmc_free(ctx, b->p);
    b->p = NULL;
    b->bytes = 0;
}

static dm_status be_upload(void *ctx, void *dst, const void *host, size_t bytes)
{
    return dmc_upload(ctx, dst, host, bytes, "upload");
}

static dm_status be_download(void *ctx, void *host, const void *src, size_t bytes)
{
    return dmc_download(ctx, host, src, bytes, "download");
}

static dm_status be_sync(void *ctx) { return dmc_sync(ctx, "sync"); }

/* ---- DiT ---- */

dm_status dmc_be_linear(void *ctx, const float *x, int N, const dm_weight *W, const dm_weight *b,
                        float *y)
{
    dmc_ctx *c = ctx;
    const char *op = "linear";
    if (N <= 0) return DM_OK;
    if (W->ab == DMC_GEMM_F32)
        return dmc_linear(c, DMC_GEMM_F32, W->p, W->rows, W->cols, x, N, dmc_vec(b), y, op);
    dm_status st;
    uint16_t *x16 = dmc_scratch(c, DMC_SCR_X16, (size_t)N * W->cols * 2, op, &st);
    if (!x16) return st;
    st = dmc_err(dmc_f32_to_h16(x, (size_t)N * W->cols, x16, (dmc_h16)W->ab, c->stream), op);
    if (st) return st;
    return dmc_linear(c, W->ab, W->p, W->rows, W->cols, x16, N, dmc_vec(b), y, op);
}

static dm_status be_layernorm_mod(void *ctx, const float *x, int B, int T, int D, float eps,
                                  const float *shift, const float *scale, int mod_stride, float *y)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_layernorm_mod(x, B, T, D, eps, shift, scale, mod_stride, y, c->stream),
                   "layernorm_mod");
}

static dm_status be_gated_add(void *ctx, float *x, const float *y, int B, int T, int D,
                              const float *gate, int mod_stride)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_gated_add(x, y, B, T, D, gate, mod_stride, c->stream), "gated_add");
}

static dm_status be_silu(void *ctx, float *x, size_t n)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_silu(x, n, c->stream), "silu");
}

/* Computed on the host exactly as the CPU backend does (float32 frequencies, libm cos/sin), then
 * uploaded: [B, 256] is tiny and the values are bit-identical to the CPU engine's. */
static dm_status be_timestep_embed(void *ctx, const float *t, int B, float *out)
{
    dmc_ctx *c = ctx;
    const int half = DM_TIME_FREQ_DIM / 2;
    const size_t bytes = (size_t)B * DM_TIME_FREQ_DIM * sizeof(float);
    float *h = malloc(bytes ? bytes : 1);
    if (!h) return dm_fail(DM_ERR_NOMEM, "cuda: timestep_embed: out of host memory");
    const float neg_log = (float)(-log(10000.0));
    for (int b = 0; b < B; b++)
        for (int k = 0; k < half; k++) {
            const float freq = expf(neg_log * (float)k / (float)half), arg = t[b] * freq;
            h[(size_t)b * DM_TIME_FREQ_DIM + k] = cosf(arg);
            h[(size_t)b * DM_TIME_FREQ_DIM + half + k] = sinf(arg);
        }
    dm_status st = dmc_upload(c, out, h, bytes, "timestep_embed");
    if (!st) st = dmc_sync(c, "timestep_embed"); /* h is pageable and freed now */
    free(h);
    return st;
}

static dm_status be_patchify(void *ctx, const float *x, int B, int C, int S, int p, float *patches)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_patchify(x, B, C, S, p, patches, c->stream), "patchify");
}

static dm_status be_unpatchify(void *ctx, const float *tok, int B, int Cout, int S, int p,
                               float *out)
{
    dmc_ctx *c = ctx;
    return dmc_err(dmc_unpatchify(tok, B, Cout, S, p, out, c->stream), "unpatchify");
}

static dm_status be_add_rows(void *ctx, float *x, int B, size_t n, const dm_weight *table)
{
    dmc_ctx *c = ctx;
    if ((size_t)table->rows * table->cols < n)
        return dm_fail(DM_ERR_ARG, "cuda: add_rows: table has %zu values, rows need %zu",
                       (size_t)table->rows * table->cols, n);
    return dmc_err(dmc_add_rows(x, B, n, dmc_vec(table), c->stream), "add_rows");
}

static dm_status be_embed_add(void *ctx, float *x, int B, int D, const dm_weight *table,
                              const int64_t *labels)
{
    dmc_ctx *c = ctx;
    const char *op = "embed_add";
    if (B <= 0) return DM_OK;
    if ((size_t)B * 4 > 65536) return dm_fail(DM_ERR_ARG, "cuda: %s: batch %d too large", op, B);
    dm_status st;
    int32_t *lab = dmc_scratch(c, DMC_SCR_SMALL, 65536, op, &st);
    if (!lab) return st;
    /* Through the pinned small buffer: the copy is asynchronous, so wait for its previous use. */
    if ((st = dmc_sync(c, op))) return st;
    int32_t *h = c->host_small;
    for (int b = 0; b < B; b++) h[b] = (int32_t)labels[b];
    if ((st = dmc_upload(c, lab, h, (size_t)B * 4, op))) return st;
    return dmc_err(dmc_embed_add(x, B, D, dmc_vec(table), lab, c->stream), op);
}

static dm_status be_attention(void *ctx, const float *qkv, int B, int T, int H, int hd,
                              const dm_attn_qk *qk, float *out)
{
    dmc_ctx *c = ctx;
    const int has = qk && qk->q_w;
    /* The 16-bit type of the cuDNN path follows the model: fp16 when its attention projections
     * are fp16 (XL, G checkpoints), else bf16. */
    return dmc_attention(c, DMC_ATTN_AUTO, qkv, B, T, H, hd, has ? dmc_vec(qk->q_w) : NULL,
                         has ? dmc_vec(qk->q_b) : NULL, has ? dmc_vec(qk->k_w) : NULL,
                         has ? dmc_vec(qk->k_b) : NULL, has ? qk->eps : 0.0f,
                         c->attn_f16 ? DMC_F16 : DMC_BF16, out);
}

static void be_close(void *ctx) { dmc_ctx_free(ctx); }

static const dm_backend_ops k_cuda_ops = {
    .name = "cuda",
    .close = be_close,
    .alloc = be_alloc,
    .release = be_release,
    .upload = be_upload,
    .download = be_download,
    .sync = be_sync,
    .weight = dmc_be_weight,
    .weight_free = dmc_be_weight_free,
    .weight_bytes = dmc_be_weight_bytes,
    .linear = dmc_be_linear,
    .layernorm_mod = be_layernorm_mod,
    .gated_add = be_gated_add,
    .silu = be_silu,
    .timestep_embed = be_timestep_embed,
    .patchify = be_patchify,
    .unpatchify = be_unpatchify,
    .add_rows = be_add_rows,
    .embed_add = be_embed_add,
    .attention = be_attention,
    .ffn = dmc_be_ffn,
    .router_scores = dmc_be_router_scores,
    .moe_grouped = dmc_be_moe_grouped,
    .mlp_add = dmc_be_mlp_add,
    .conv2d = dmc_be_conv2d,
    .group_norm = dmc_be_group_norm,
    .upsample2x = dmc_be_upsample2x,
    .vae_attention = dmc_be_vae_attention,
};

dm_status dm_backend_cuda_open_device(dm_backend *be, int device)
{
    dmc_ctx *c;
    dm_status st = dmc_ctx_create(device, &c);
    if (st) return st;
    be->ops = &k_cuda_ops;
    be->ctx = c;
    char msg[320];
    if (dmc_device_probe(device, msg, sizeof msg) == 0)
        dm_log(DM_LOG_INFO, "backend cuda: device %d: %s", device, msg);
    return DM_OK;
}

dm_status dm_backend_cuda_open(dm_backend *be, const dm_load_opts *o)
{
    return dm_backend_cuda_open_device(be, o ? o->device : 0);
}
#else
typedef int dmc_backend_needs_backend_h; /* ISO C: no empty translation unit */
#endif

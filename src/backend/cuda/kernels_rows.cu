/* Conversions, DiT row ops and attention helpers. C-style CUDA: plain __global__ functions and
 * extern "C" launchers (dmcuda.h). Row reductions: one warp per row, lane-strided fp32 partials
 * combined by a fixed xor butterfly, so a row's result never depends on the launch shape. */
#include "backend/cuda/dmcuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define WARPS 8 /* rows per 256-thread block */

static int launched(void) { return (int)cudaGetLastError(); }

static unsigned blocks_for(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 65535u * 32u ? 65535u * 32u : (b ? b : 1));
}

__device__ __forceinline__ uint16_t to_h16(float f, int t)
{
    return t == DMC_F16 ? __half_as_ushort(__float2half_rn(f))
                        : __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
__device__ __forceinline__ float from_h16(uint16_t h, int t)
{
    return t == DMC_F16 ? __half2float(__ushort_as_half(h))
                        : __bfloat162float(__ushort_as_bfloat16(h));
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---- conversions ---- */

__global__ void k_f32_to_h16(const float *x, size_t n, uint16_t *y, int t)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = to_h16(x[i], t);
}
__global__ void k_h16_to_f32(const uint16_t *x, size_t n, float *y, int t)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = from_h16(x[i], t);
}
/* src dtype: 0 F32, 1 F16, 2 BF16 (dm_dtype). Source bytes may be unaligned for 32-bit loads
 * only when a staging offset is odd; the caller stages at 16-B aligned offsets. */
__device__ __forceinline__ float load_any(const void *x, int dtype, size_t i)
{
    if (dtype == 0) return ((const float *)x)[i];
    if (dtype == 1) return __half2float(__ushort_as_half(((const uint16_t *)x)[i]));
    return __bfloat162float(__ushort_as_bfloat16(((const uint16_t *)x)[i]));
}
__global__ void k_any_to_f32(const void *x, int dtype, size_t n, float *y)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = load_any(x, dtype, i);
}
__global__ void k_any_to_h16(const void *x, int dtype, size_t n, uint16_t *y, int t)
{
    const int same = (dtype == 1 && t == DMC_F16) || (dtype == 2 && t == DMC_BF16);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = same ? ((const uint16_t *)x)[i] : to_h16(load_any(x, dtype, i), t);
}

extern "C" int dmc_f32_to_h16(const float *x, size_t n, uint16_t *y, dmc_h16 t, dmc_stream s)
{
    if (n) k_f32_to_h16<<<blocks_for(n, 256), 256, 0, s>>>(x, n, y, (int)t);
    return launched();
}
extern "C" int dmc_h16_to_f32(const uint16_t *x, size_t n, float *y, dmc_h16 t, dmc_stream s)
{
    if (n) k_h16_to_f32<<<blocks_for(n, 256), 256, 0, s>>>(x, n, y, (int)t);
    return launched();
}
extern "C" int dmc_any_to_f32(const void *x, int dtype, size_t n, float *y, dmc_stream s)
{
    if (n) k_any_to_f32<<<blocks_for(n, 256), 256, 0, s>>>(x, dtype, n, y);
    return launched();
}
extern "C" int dmc_any_to_h16(const void *x, int dtype, size_t n, uint16_t *y, dmc_h16 t,
                              dmc_stream s)
{
    if (n) k_any_to_h16<<<blocks_for(n, 256), 256, 0, s>>>(x, dtype, n, y, (int)t);
    return launched();
}
extern "C" uint16_t dmc_host_f32_to_h16(float f, dmc_h16 t)
{
    return t == DMC_F16 ? __half_as_ushort(__float2half_rn(f))
                        : __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
extern "C" float dmc_host_h16_to_f32(uint16_t h, dmc_h16 t)
{
    return t == DMC_F16 ? __half2float(__ushort_as_half(h))
                        : __bfloat162float(__ushort_as_bfloat16(h));
}

/* ---- LayerNorm + modulate, gated add, SiLU ---- */

/* Mean and 1/sqrt(var + eps) of r[0..D) by one warp: two passes (mean, centred variance). */
__device__ __forceinline__ void row_stats(const float *r, int D, float eps, float *mean,
                                          float *rstd)
{
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int i = lane; i < D; i += 32) s += r[i];
    const float m = warp_sum(s) / (float)D;
    float v = 0.0f;
    for (int i = lane; i < D; i += 32) {
        const float d = r[i] - m;
        v += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(warp_sum(v) / (float)D + eps);
}

__global__ void k_layernorm_mod(const float *x, int N, int T, int D, float eps, const float *shift,
                                const float *scale, int ms, float *y)
{
    const int row = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const float *r = x + (size_t)row * D;
    float m, rs;
    row_stats(r, D, eps, &m, &rs);
    float *o = y + (size_t)row * D;
    const int b = row / T;
    for (int i = lane; i < D; i += 32) {
        float v = (r[i] - m) * rs;
        if (shift) v = v * (1.0f + scale[(size_t)b * ms + i]) + shift[(size_t)b * ms + i];
        o[i] = v;
    }
}

extern "C" int dmc_layernorm_mod(const float *x, int B, int T, int D, float eps, const float *shift,
                                 const float *scale, int mod_stride, float *y, dmc_stream s)
{
    const int N = B * T;
    if (N > 0)
        k_layernorm_mod<<<(N + WARPS - 1) / WARPS, 32 * WARPS, 0, s>>>(x, N, T, D, eps, shift,
                                                                       scale, mod_stride, y);
    return launched();
}

__global__ void k_gated_add(float *x, const float *y, size_t n, int T, int D, const float *gate,
                            int ms)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / D;
        const int d = (int)(i % D), b = (int)(row / T);
        x[i] += gate[(size_t)b * ms + d] * y[i];
    }
}
extern "C" int dmc_gated_add(float *x, const float *y, int B, int T, int D, const float *gate,
                             int mod_stride, dmc_stream s)
{
    const size_t n = (size_t)B * T * D;
    if (n) k_gated_add<<<blocks_for(n, 256), 256, 0, s>>>(x, y, n, T, D, gate, mod_stride);
    return launched();
}

__global__ void k_silu(float *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = x[i] / (1.0f + expf(-x[i]));
}
extern "C" int dmc_silu(float *x, size_t n, dmc_stream s)
{
    if (n) k_silu<<<blocks_for(n, 256), 256, 0, s>>>(x, n);
    return launched();
}

/* ---- patches, embeddings, biases ---- */

__global__ void k_patchify(const float *x, int B, int C, int S, int p, float *out)
{
    const int G = S / p, T = G * G, P = C * p * p;
    const size_t n = (size_t)B * T * P;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(i % P);
        const size_t bt = i / P;
        const int b = (int)(bt / T), tok = (int)(bt % T), gi = tok / G, gj = tok % G;
        const int c = j / (p * p), pi = (j / p) % p, pj = j % p;
        out[i] = x[(((size_t)b * C + c) * S + gi * p + pi) * S + gj * p + pj];
    }
}
__global__ void k_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out)
{
    const int G = S / p, T = G * G, P = p * p * Cout;
    const size_t n = (size_t)B * T * P;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(i % P);
        const size_t bt = i / P;
        const int b = (int)(bt / T), t = (int)(bt % T), gi = t / G, gj = t % G;
        const int pi = j / (p * Cout), pj = (j / Cout) % p, c = j % Cout;
        out[(((size_t)b * Cout + c) * S + gi * p + pi) * S + gj * p + pj] = tok[i];
    }
}
extern "C" int dmc_patchify(const float *x, int B, int C, int S, int p, float *patches,
                            dmc_stream s)
{
    const size_t n = (size_t)B * C * S * S;
    if (n) k_patchify<<<blocks_for(n, 256), 256, 0, s>>>(x, B, C, S, p, patches);
    return launched();
}
extern "C" int dmc_unpatchify(const float *tok, int B, int Cout, int S, int p, float *out,
                              dmc_stream s)
{
    const size_t n = (size_t)B * Cout * S * S;
    if (n) k_unpatchify<<<blocks_for(n, 256), 256, 0, s>>>(tok, B, Cout, S, p, out);
    return launched();
}

__global__ void k_add_rows(float *x, size_t total, size_t n, const float *table)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += table[i % n];
}
extern "C" int dmc_add_rows(float *x, int B, size_t n, const float *table, dmc_stream s)
{
    const size_t total = (size_t)B * n;
    if (total) k_add_rows<<<blocks_for(total, 256), 256, 0, s>>>(x, total, n, table);
    return launched();
}
extern "C" int dmc_add_bias_rows(float *x, size_t R, int C, const float *b, dmc_stream s)
{
    const size_t total = R * (size_t)C;
    if (total) k_add_rows<<<blocks_for(total, 256), 256, 0, s>>>(x, total, (size_t)C, b);
    return launched();
}

__global__ void k_add_bias_chan(float *x, size_t total, size_t HW, const float *b)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += b[i / HW];
}
extern "C" int dmc_add_bias_chan(float *x, int C, size_t HW, const float *b, dmc_stream s)
{
    const size_t total = (size_t)C * HW;
    if (total) k_add_bias_chan<<<blocks_for(total, 256), 256, 0, s>>>(x, total, HW, b);
    return launched();
}

__global__ void k_embed_add(float *x, int B, int D, const float *table, const int32_t *labels)
{
    const size_t n = (size_t)B * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int b = (int)(i / D), d = (int)(i % D);
        x[i] += table[(size_t)labels[b] * D + d];
    }
}
extern "C" int dmc_embed_add(float *x, int B, int D, const float *table, const int32_t *labels,
                             dmc_stream s)
{
    const size_t n = (size_t)B * D;
    if (n) k_embed_add<<<blocks_for(n, 256), 256, 0, s>>>(x, B, D, table, labels);
    return launched();
}

/* ---- attention helpers ---- */

/* One warp per (token, head): q and k (optionally LayerNormed over hd) and v of that head.
 * mode 0: fp32 [B, H, T, hd] into q, k, v;  mode 1: 16-bit copy in the qkv layout into o16. */
__global__ void k_attn_prep(const float *qkv, int N, int T, int H, int hd, const float *qw,
                            const float *qb, const float *kw, const float *kb, float eps, int mode,
                            float *q, float *k, float *v, uint16_t *o16, int t16)
{
    const int item = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (item >= N * H) return;
    const int n = item / H, h = item % H, D = H * hd, b = n / T, tk = n % T;
    const size_t dst = (((size_t)b * H + h) * T + tk) * hd;
    for (int which = 0; which < 3; which++) {
        const float *r = qkv + (size_t)n * 3 * D + (size_t)which * D + (size_t)h * hd;
        const float *w = which == 0 ? qw : kw, *bb = which == 0 ? qb : kb;
        float m = 0.0f, rs = 1.0f;
        const int norm = which < 2 && qw != NULL;
        if (norm) row_stats(r, hd, eps, &m, &rs);
        for (int i = lane; i < hd; i += 32) {
            float val = r[i];
            if (norm) val = (val - m) * rs * w[i] + (bb ? bb[i] : 0.0f);
            if (mode == 0)
                (which == 0 ? q : which == 1 ? k : v)[dst + i] = val;
            else
                o16[(size_t)n * 3 * D + (size_t)which * D + (size_t)h * hd + i] = to_h16(val, t16);
        }
    }
}

extern "C" int dmc_attn_split(const float *qkv, int B, int T, int H, int hd, const float *qw,
                              const float *qb, const float *kw, const float *kb, float eps,
                              float *q, float *k, float *v, dmc_stream s)
{
    const int items = B * T * H;
    if (items > 0)
        k_attn_prep<<<(items + WARPS - 1) / WARPS, 32 * WARPS, 0, s>>>(
            qkv, B * T, T, H, hd, qw, qb, kw, kb, eps, 0, q, k, v, NULL, 0);
    return launched();
}

extern "C" int dmc_attn_prep16(const float *qkv, int B, int T, int H, int hd, const float *qw,
                               const float *qb, const float *kw, const float *kb, float eps,
                               uint16_t *qkv16, dmc_h16 t, dmc_stream s)
{
    const int items = B * T * H;
    if (items > 0)
        k_attn_prep<<<(items + WARPS - 1) / WARPS, 32 * WARPS, 0, s>>>(
            qkv, B * T, T, H, hd, qw, qb, kw, kb, eps, 1, NULL, NULL, NULL, qkv16, (int)t);
    return launched();
}

__global__ void k_attn_merge(const float *o, int B, int T, int H, int hd, float *out)
{
    const size_t n = (size_t)B * T * H * hd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const int d = (int)(i % hd);
        const size_t r = i / hd;
        const int tk = (int)(r % T), h = (int)((r / T) % H), b = (int)(r / ((size_t)T * H));
        out[((size_t)b * T + tk) * H * hd + (size_t)h * hd + d] = o[i];
    }
}
extern "C" int dmc_attn_merge(const float *o, int B, int T, int H, int hd, float *out,
                              dmc_stream s)
{
    const size_t n = (size_t)B * T * H * hd;
    if (n) k_attn_merge<<<blocks_for(n, 256), 256, 0, s>>>(o, B, T, H, hd, out);
    return launched();
}

/* One warp per row: max, sum of exp, normalise (as dm_softmax_rows: exp(x - max) / sum). */
__global__ void k_softmax_rows(float *x, size_t rows, int n, float scale)
{
    const size_t row = (size_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float *r = x + row * n;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, r[i] * scale);
    m = warp_max(m);
    float sum = 0.0f;
    for (int i = lane; i < n; i += 32) {
        const float e = expf(r[i] * scale - m);
        r[i] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    for (int i = lane; i < n; i += 32) r[i] = r[i] / sum;
}
extern "C" int dmc_softmax_rows(float *x, size_t rows, int n, float scale, dmc_stream s)
{
    if (rows) {
        const size_t blocks = (rows + WARPS - 1) / WARPS;
        if (blocks > 0x7fffffffu) return (int)cudaErrorInvalidValue;
        k_softmax_rows<<<(unsigned)blocks, 32 * WARPS, 0, s>>>(x, rows, n, scale);
    }
    return launched();
}

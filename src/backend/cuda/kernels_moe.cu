/* MoE kernels: fp32 router with top-k, expert-choice selection, a stable deterministic grouping
 * (count -> scan -> compact, one CTA per expert, integer work only), gather, SwiGLU / GELU-tanh
 * activations and the combine by gather in ascending expert id (no float atomics). The rules
 * are those of router/moe.c (dm_moe_route_ref, dm_moe_forward_ref). */
#include "backend/cuda/dmcuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define WARPS 8
#define MAX_E 64 /* routed experts a router kernel handles (DiT-MoE 8/16, ProMoE 12) */

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

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* In place softmax of p[E] (max-subtracted, as dm_softmax_rows). */
__device__ void softmax_small(float *p, int E)
{
    float m = p[0];
    for (int e = 1; e < E; e++) m = p[e] > m ? p[e] : m;
    float s = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = expf(p[e] - m);
        s += p[e];
    }
    for (int e = 0; e < E; e++) p[e] /= s;
}

__global__ void k_router(const float *h, int N, int T, int D, const float *Wg, int E, int k,
                         int kind, int act, const uint8_t *drop, const uint8_t *uncond, int nE,
                         float *scores, int32_t *ids, float *w, uint8_t *sel, float *pw)
{
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;
    const float *x = h + (size_t)n * D;
    float p[MAX_E];
    for (int e = 0; e < E; e++) {
        const float *g = Wg + (size_t)e * D;
        float s = 0.0f;
        for (int d = lane; d < D; d += 32) s += x[d] * g[d];
        p[e] = warp_sum(s);
        if (drop && drop[e]) p[e] = -INFINITY; /* a pruned expert: logit -inf before the act */
    }
    float inv = 1.0f;
    if (kind != 0) {
        float s = 0.0f;
        for (int d = lane; d < D; d += 32) s += x[d] * x[d];
        inv = 1.0f / fmaxf(sqrtf(warp_sum(s)), 1e-12f);
    }
    if (lane != 0) return;
    if (kind == 0) {
        softmax_small(p, E);
    } else {
        for (int e = 0; e < E; e++) p[e] *= inv;
        if (act == 1) softmax_small(p, E);
        if (act == 2)
            for (int e = 0; e < E; e++) p[e] = 1.0f / (1.0f + expf(-p[e]));
    }
    for (int e = 0; e < E; e++) scores[(size_t)n * E + e] = p[e];
    if (kind == 2 || !ids) return; /* expert choice (dmc_moe_ec_select), or scores only */
    const int unc = uncond != NULL && nE > E && uncond[n / T];
    uint8_t *sr = sel + (size_t)n * nE;
    float *pr = pw + (size_t)n * nE;
    for (int e = 0; e < nE; e++) sr[e] = 0, pr[e] = 0.0f;
    int32_t *ir = ids + (size_t)n * k;
    float *wr = w + (size_t)n * k;
    if (unc) {
        ir[0] = E, wr[0] = 1.0f;
        for (int j = 1; j < k; j++) ir[j] = -1, wr[j] = 0.0f;
        sr[E] = 1, pr[E] = 1.0f;
        return;
    }
    unsigned long long taken = 0; /* top-k, ties to the lower id (strict >) */
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!((taken >> e) & 1ull) && (best < 0 || p[e] > p[best])) best = e;
        taken |= 1ull << best;
        ir[j] = best;
        wr[j] = p[best];
        sr[best] = 1;
        pr[best] = p[best];
    }
}

extern "C" int dmc_moe_router(const float *h, int N, int T, int D, const float *Wg, int E, int k,
                              int kind, int act, const uint8_t *drop, const uint8_t *uncond,
                              int nE, float *scores, int32_t *ids, float *w, uint8_t *sel,
                              float *pw, dmc_stream s)
{
    if (E < 1 || E > MAX_E || k < 1 || k > E) return (int)cudaErrorInvalidValue;
    if (N > 0)
        k_router<<<(N + WARPS - 1) / WARPS, 32 * WARPS, 0, s>>>(h, N, T, D, Wg, E, k, kind, act,
                                                                drop, uncond, nE, scores, ids, w,
                                                                sel, pw);
    return launched();
}

/* One thread per (token, expert): count the tokens of the same image that beat it. */
__global__ void k_ec_select(const float *sc, int N, int T, int E, int cap, const uint8_t *uncond,
                            int nE, uint8_t *sel, float *pw)
{
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= (size_t)N * nE) return;
    const int n = (int)(i / nE), e = (int)(i % nE), b0 = n / T * T;
    const int unc = uncond != NULL && nE > E && uncond[n / T];
    uint8_t s = 0;
    float wt = 0.0f;
    if (unc) {
        s = e == E;
        wt = s ? 1.0f : 0.0f;
    } else if (e < E) {
        const float v = sc[(size_t)n * E + e];
        int better = 0;
        for (int m = b0; m < b0 + T; m++) {
            const float u = sc[(size_t)m * E + e];
            better += u > v || (u == v && m < n);
        }
        s = better < cap;
        wt = s ? v : 0.0f;
    }
    sel[i] = s;
    pw[i] = wt;
}

extern "C" int dmc_moe_ec_select(const float *scores, int N, int T, int E, int cap,
                                 const uint8_t *uncond, int nE, uint8_t *sel, float *pw,
                                 dmc_stream s)
{
    const size_t n = (size_t)N * nE;
    if (n) k_ec_select<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(scores, N, T, E, cap, uncond,
                                                                   nE, sel, pw);
    return launched();
}

__global__ void k_ec_record(const uint8_t *sel, const float *pw, int N, int nE, int k,
                            int32_t *ids, float *w)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int32_t *ir = ids + (size_t)n * k;
    float *wr = w + (size_t)n * k;
    for (int j = 0; j < k; j++) ir[j] = -1, wr[j] = 0.0f;
    for (int e = 0; e < nE; e++) {
        if (!sel[(size_t)n * nE + e]) continue;
        const float wt = pw[(size_t)n * nE + e];
        int at = k;
        for (int j = 0; j < k; j++)
            if (ir[j] < 0 || wt > wr[j]) {
                at = j;
                break;
            }
        if (at == k) continue;
        for (int j = k - 1; j > at; j--) ir[j] = ir[j - 1], wr[j] = wr[j - 1];
        ir[at] = e;
        wr[at] = wt;
    }
}

extern "C" int dmc_moe_ec_record(const uint8_t *sel, const float *pw, int N, int nE, int k,
                                 int32_t *ids, float *w, dmc_stream s)
{
    if (N > 0) k_ec_record<<<(N + 255) / 256, 256, 0, s>>>(sel, pw, N, nE, k, ids, w);
    return launched();
}

/* ---- grouping: count, scan, compact (one CTA of 1024 threads per expert) ---- */

__global__ void k_count(const uint8_t *sel, int N, int nE, int32_t *counts)
{
    const int e = blockIdx.x;
    int total = 0;
    for (int base = 0; base < N; base += blockDim.x) {
        const int n = base + threadIdx.x;
        total += __syncthreads_count(n < N && sel[(size_t)n * nE + e]);
    }
    if (threadIdx.x == 0) counts[e] = total;
}

__global__ void k_scan(const int32_t *counts, int nE, int32_t *offsets)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int32_t acc = 0;
    for (int e = 0; e < nE; e++) {
        offsets[e] = acc;
        acc += counts[e];
    }
    offsets[nE] = acc;
}

/* Stable compaction of expert e's tokens: within a chunk of blockDim tokens, a token's slot is
 * the number of selected tokens before it (warp ballots, then the warps' totals in warp order). */
__global__ void k_compact(const uint8_t *sel, const float *pw, int N, int nE,
                          const int32_t *offsets, int32_t *rows, float *slot_w, int32_t *inv)
{
    __shared__ int warp_tot[32];
    __shared__ int chunk_base;
    const int e = blockIdx.x, lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    if (threadIdx.x == 0) chunk_base = offsets[e];
    __syncthreads();
    for (int base = 0; base < N; base += blockDim.x) {
        const int n = base + threadIdx.x;
        const int f = n < N && sel[(size_t)n * nE + e];
        const unsigned bal = __ballot_sync(0xffffffffu, f);
        const int before = __popc(bal & ((1u << lane) - 1u));
        if (lane == 0) warp_tot[wid] = __popc(bal);
        __syncthreads();
        int wbase = 0;
        for (int w2 = 0; w2 < wid; w2++) wbase += warp_tot[w2];
        if (n < N) {
            if (f) {
                const int p = chunk_base + wbase + before;
                rows[p] = n;
                slot_w[p] = pw[(size_t)n * nE + e];
                inv[(size_t)n * nE + e] = p;
            } else {
                inv[(size_t)n * nE + e] = -1;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int t = 0;
            for (int w2 = 0; w2 < nwarps; w2++) t += warp_tot[w2];
            chunk_base += t;
        }
        __syncthreads();
    }
}

extern "C" int dmc_moe_count(const uint8_t *sel, int N, int nE, int32_t *counts, dmc_stream s)
{
    if (nE > 0) k_count<<<nE, 1024, 0, s>>>(sel, N, nE, counts);
    return launched();
}
extern "C" int dmc_moe_scan(const int32_t *counts, int nE, int32_t *offsets, dmc_stream s)
{
    k_scan<<<1, 32, 0, s>>>(counts, nE, offsets);
    return launched();
}
extern "C" int dmc_moe_compact(const uint8_t *sel, const float *pw, int N, int nE,
                               const int32_t *offsets, int32_t *rows, float *slot_w, int32_t *inv,
                               dmc_stream s)
{
    if (nE > 0) k_compact<<<nE, 1024, 0, s>>>(sel, pw, N, nE, offsets, rows, slot_w, inv);
    return launched();
}

/* ---- gather, activations, combine ---- */

__global__ void k_gather(const float *h, int D, const int32_t *rows, int n_rows, uint16_t *xg,
                         int t)
{
    const size_t n = (size_t)n_rows * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / D;
        const int d = (int)(i % D);
        const size_t src = rows ? (size_t)rows[r] : r;
        xg[i] = to_h16(h[src * D + d], t);
    }
}
extern "C" int dmc_gather_h16(const float *h, int D, const int32_t *rows, int n_rows, uint16_t *xg,
                              dmc_h16 t, dmc_stream s)
{
    const size_t n = (size_t)n_rows * D;
    if (n) k_gather<<<blocks_for(n, 256), 256, 0, s>>>(h, D, rows, n_rows, xg, (int)t);
    return launched();
}

__global__ void k_swiglu(const float *a, int n, int F, uint16_t *act, int t)
{
    const size_t total = (size_t)n * F;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / F;
        const int f = (int)(i % F);
        const float g = a[r * 2 * F + f], u = a[r * 2 * F + F + f];
        act[i] = to_h16(g / (1.0f + expf(-g)) * u, t);
    }
}
__global__ void k_gelu_tanh(const float *a, int n, int F, uint16_t *act, int t)
{
    const size_t total = (size_t)n * F;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const float u = a[i];
        const float z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
        act[i] = to_h16(0.5f * u * (1.0f + tanhf(z)), t);
    }
}
extern "C" int dmc_swiglu_h16(const float *a, int n, int F, uint16_t *act, dmc_h16 t, dmc_stream s)
{
    const size_t total = (size_t)n * F;
    if (total) k_swiglu<<<blocks_for(total, 256), 256, 0, s>>>(a, n, F, act, (int)t);
    return launched();
}
extern "C" int dmc_gelu_tanh_h16(const float *a, int n, int F, uint16_t *act, dmc_h16 t,
                                 dmc_stream s)
{
    const size_t total = (size_t)n * F;
    if (total) k_gelu_tanh<<<blocks_for(total, 256), 256, 0, s>>>(a, n, F, act, (int)t);
    return launched();
}

/* out = ((0 + w_e0 y_e0) + w_e1 y_e1 ...) + shared, experts ascending, products and sums
 * rounded separately (no FMA contraction), the order and rounding of dm_moe_apply. */
__global__ void k_combine(const float *Y, const int32_t *inv, const float *slot_w, int N, int nE,
                          int D, const float *shared, float *out)
{
    const size_t total = (size_t)N * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t n = i / D;
        const int d = (int)(i % D);
        float acc = 0.0f;
        for (int e = 0; e < nE; e++) {
            const int p = inv[n * nE + e];
            if (p >= 0) acc = __fadd_rn(acc, __fmul_rn(slot_w[p], Y[(size_t)p * D + d]));
        }
        if (shared) acc = __fadd_rn(acc, shared[i]);
        out[i] = acc;
    }
}
extern "C" int dmc_moe_combine(const float *Y, const int32_t *inv, const float *slot_w, int N,
                               int nE, int D, const float *shared, float *out, dmc_stream s)
{
    const size_t total = (size_t)N * D;
    if (total) k_combine<<<blocks_for(total, 256), 256, 0, s>>>(Y, inv, slot_w, N, nE, D, shared, out);
    return launched();
}

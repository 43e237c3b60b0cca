/* test_backend_ops: every op of the backend table (src/backend/backend.h), on every backend this
 * build compiled, against the plain references (router/moe.h, vae/vae_ref.h, dit/model.h's
 * *_ref, backend/cpu/ops.h's *_ref and the short loops below).
 *
 * Metric: err = max|backend - reference| / max(1e-12, RMS(reference)) over the op's output.
 * Tolerances (per op):
 *   linear, layernorm_mod, attention, ffn, conv2d, group_norm, vae_attention   1e-5
 *       (float32 kernels against double-accumulated references; 16-bit weights are widened
 *        exactly, so the same bound holds for BF16 / F16)
 *   ffn routing record: ids identical, weights within 1e-5 absolute
 *   gated_add, silu                                                             1e-6
 *   timestep_embed                                                              2e-4
 *       (the reference's argument t*f in double against float32 t*f; |t| <= 1000)
 *   patchify, unpatchify, add_rows, embed_add, upsample2x                       0 (exact)
 * Low-precision instances of the CPU backend (issue 13: --precision bf16, --quant-experts
 * int8|int4), on linear, attention, ffn, router_scores, moe_grouped, mlp_add only:
 *   bf16 (every GEMM with bf16 operands, fp32 accumulation)                     3e-2
 *   + int8 / int4 routed experts: ffn, moe_grouped (int8 activations per row; the reference
 *     uses the dequantised weights, dm_quant_weight, so it measures the kernels)  1.5e-1
 *   router_scores stays 1e-5 in every instance: the router is never quantised.
 * Other backends (CUDA: 16-bit weights and GEMM operands on the device): linear, attention, ffn,
 * moe_grouped, mlp_add, conv2d, vae_attention at the bf16 bound 3e-2, the rest as the CPU's;
 * not yet measured on a GPU.
 * (Measured: bf16 <= 2.4e-2; int8 <= 8.4e-2, int4 <= 9.7e-2; the kernels themselves are checked
 *  against their references in tests/test_lowp.c: integer sums exact, bf16 at fp32-accumulation
 *  error.)
 * Shapes include rows not a multiple of the 32-wide tile, T = 256 and 1024, E = 8, 12 + 1
 * (unconditional expert), 16, k = 1 and 2, expert-choice capacity (incl. capacity = T: full
 * groups) and empty expert groups (few tokens, many experts).
 *
 * Output: one line per (backend, case): PASS / FAIL / SKIP (op not in the backend's table).
 * Exit status 1 if any FAIL. Options:
 *   --op NAME       only cases of this op (a field name of dm_backend_ops)
 *   --backend NAME  only this backend (cpu, cuda)
 *   --perf          also time each case and add model-sized cases: GFLOP/s (or GB/s) of the
 *                   backend, of the reference and (other backends) of the CPU backend, measured
 *                   in the same run, with the ratios (for humans; references are timed once)
 *   --list          list the cases */
#include "backend/backend.h"
#include "backend/cpu/cpu.h" /* the CPU fast kernels' references and the MoE grouping internals */
#include "dit/model.h"
#include "router/moe.h"
#include "router/route_policy.h"
#include "vae/vae_ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ---------------------------------------------------------------------------------- */

static uint64_t g_rng;
static float frand(void) /* uniform in [-1, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float *rnd(size_t n, float scale)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p) abort();
    for (size_t i = 0; i < n; i++) p[i] = frand() * scale;
    return p;
}
static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) abort();
    return p;
}
static double rel_err(const float *a, const float *b, size_t n)
{
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates */
        s += (double)b[i] * b[i];
    }
    return m / fmax(1e-12, sqrt(s / (double)(n ? n : 1)));
}

static int g_perf;

/* Everything one case allocated on the backend, released at the end of the case. */
typedef struct {
    dm_backend *be;
    dm_buf bufs[64];
    int nbufs;
    dm_weight *w[512];
    int nw;
    dm_status st; /* first failure */
} ctx_t;

static void note(ctx_t *c, dm_status st)
{
    if (st != DM_OK && c->st == DM_OK) c->st = st;
}
/* Backend copy of host[n] (NULL host: uninitialised). */
static float *dev(ctx_t *c, const float *host, size_t n)
{
    if (c->nbufs == 64) abort();
    dm_buf *b = &c->bufs[c->nbufs++];
    note(c, c->be->ops->alloc(c->be->ctx, (n ? n : 1) * sizeof(float), b));
    if (c->st != DM_OK) return NULL;
    if (host) note(c, c->be->ops->upload(c->be->ctx, b->p, host, n * sizeof(float)));
    return b->p;
}
static void get(ctx_t *c, float *host, const float *d, size_t n)
{
    if (c->st != DM_OK) return;
    note(c, c->be->ops->download(c->be->ctx, host, d, n * sizeof(float)));
}
static const uint16_t *to16(const float *f, size_t n, dm_dtype dt, float *widened)
{
    uint16_t *h = xmalloc(n * 2);
    for (size_t i = 0; i < n; i++) {
        h[i] = dt == DM_BF16 ? dm_f32_to_bf16(f[i]) : dm_f32_to_f16(f[i]);
        widened[i] = dt == DM_BF16 ? dm_bf16_to_f32(h[i]) : dm_f16_to_f32(h[i]);
    }
    return h;
}
/* Backend weight from host f32 `f` [rows, cols] stored as dtype dt; when dt is 16-bit, `f` is
 * replaced in place by the widened values (what the reference must use). */
static dm_weight *wt(ctx_t *c, dm_weight_role role, dm_weight_use use, int rows, int cols,
                     float *f, dm_dtype dt)
{
    if (c->nw == 512) abort();
    const size_t n = (size_t)rows * cols;
    const void *data = f;
    const uint16_t *h = NULL;
    if (dt == DM_BF16 || dt == DM_F16) data = h = to16(f, n, dt, f);
    dm_weight_desc d = {.name = "test", .role = role, .use = use, .dtype = dt, .rows = rows,
                        .cols = cols, .data = data};
    dm_weight *w = NULL;
    note(c, c->be->ops->weight(c->be->ctx, &d, &w));
    free((void *)h);
    c->w[c->nw++] = w;
    return w;
}
static dm_weight *vec(ctx_t *c, float *f, int n) { return wt(c, DM_ROLE_NORM, DM_USE_VECTOR, n, 1, f, DM_F32); }
static void ctx_free(ctx_t *c)
{
    for (int i = 0; i < c->nbufs; i++) c->be->ops->release(c->be->ctx, &c->bufs[i]);
    for (int i = 0; i < c->nw; i++) c->be->ops->weight_free(c->be->ctx, c->w[i]);
    c->nbufs = c->nw = 0;
}

/* Result of one case. */
typedef struct {
    double err, tol;
    char msg[200];      /* extra failure detail */
    double work;        /* flops (or bytes when bytes_metric) of one call */
    int bytes_metric;
    double t_be, t_ref; /* seconds per call (perf mode) */
} res_t;

/* Time `stmt` (perf mode): repeat until 0.2 s or `max` calls. */
#define TIME(dst, max, stmt)                                                      \
    do {                                                                          \
        if (!g_perf) break;                                                       \
        double t0_ = dm_time_sec(), t_;                                           \
        int n_ = 0;                                                               \
        do {                                                                      \
            stmt;                                                                 \
            n_++;                                                                 \
            t_ = dm_time_sec() - t0_;                                             \
        } while (t_ < 0.2 && n_ < (max));                                         \
        (dst) = t_ / n_;                                                          \
    } while (0)

typedef struct tcase tcase;
typedef void (*run_fn)(ctx_t *, const tcase *, res_t *);
struct tcase {
    const char *op;   /* field of dm_backend_ops */
    const char *desc; /* the shape, for the report */
    run_fn run;
    int a[8];         /* shape parameters, per runner */
    int perf_only;    /* model-sized shapes, run with --perf only */
};

#define OPS(c) ((c)->be->ops)
#define CTX(c) ((c)->be->ctx)

/* ---- DiT ops ---------------------------------------------------------------------------------- */

/* a = {N, in, out, bias, dtype} */
static void run_linear(ctx_t *c, const tcase *t, res_t *r)
{
    const int N = t->a[0], in = t->a[1], out = t->a[2], bias = t->a[3];
    const dm_dtype dt = (dm_dtype)t->a[4];
    float *x = rnd((size_t)N * in, 1), *W = rnd((size_t)out * in, 0.2f), *b = rnd(out, 1);
    float *y = xmalloc(sizeof(float) * N * out), *ref = xmalloc(sizeof(float) * N * out);
    dm_weight *Wh = wt(c, DM_ROLE_ATTN, DM_USE_LINEAR, out, in, W, dt);
    dm_weight *bh = bias ? vec(c, b, out) : NULL;
    float *dx = dev(c, x, (size_t)N * in), *dy = dev(c, NULL, (size_t)N * out);
    if (c->st == DM_OK) note(c, OPS(c)->linear(CTX(c), dx, N, Wh, bh, dy));
    get(c, y, dy, (size_t)N * out);
    dm_linear_ref(x, N, in, W, bias ? b : NULL, out, ref);
    r->err = rel_err(y, ref, (size_t)N * out);
    r->work = 2.0 * N * in * out;
    TIME(r->t_be, 1000, (OPS(c)->linear(CTX(c), dx, N, Wh, bh, dy), OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_linear_ref(x, N, in, W, bias ? b : NULL, out, ref));
    free(x), free(W), free(b), free(y), free(ref);
}

/* a = {B, T, D, modulate} */
static void run_layernorm_mod(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0], T = t->a[1], D = t->a[2], mod = t->a[3], N = B * T;
    const size_t n = (size_t)N * D;
    float *x = rnd(n, 2), *m = rnd((size_t)B * 3 * D, 0.5f), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) x[i] += 0.3f; /* a mean to remove */
    float *dx = dev(c, x, n), *dm = dev(c, m, (size_t)B * 3 * D), *dy = dev(c, NULL, n);
    if (c->st == DM_OK)
        note(c, OPS(c)->layernorm_mod(CTX(c), dx, B, T, D, 1e-6f, mod ? dm + D : NULL,
                                      mod ? dm + 2 * D : NULL, 3 * D, dy));
    get(c, y, dy, n);
    dm_layernorm_ref(x, N, D, 1e-6f, NULL, NULL, ref);
    if (mod)
        for (int row = 0; row < N; row++)
            for (int i = 0; i < D; i++) {
                const float *mb = m + (size_t)(row / T) * 3 * D;
                float *v = ref + (size_t)row * D + i;
                *v = (float)((double)*v * (1.0 + mb[2 * D + i]) + mb[D + i]);
            }
    r->err = rel_err(y, ref, n);
    r->work = 3.0 * n * 4, r->bytes_metric = 1;
    TIME(r->t_be, 1000, (OPS(c)->layernorm_mod(CTX(c), dx, B, T, D, 1e-6f, mod ? dm + D : NULL,
                                               mod ? dm + 2 * D : NULL, 3 * D, dy),
                         OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_layernorm_ref(x, N, D, 1e-6f, NULL, NULL, ref));
    free(x), free(m), free(y), free(ref);
}

/* a = {B, T, D} */
static void run_gated_add(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0], T = t->a[1], D = t->a[2], N = B * T;
    const size_t n = (size_t)N * D;
    float *x = rnd(n, 1), *yv = rnd(n, 1), *g = rnd((size_t)B * 2 * D, 1), *out = xmalloc(n * 4);
    float *ref = xmalloc(n * 4);
    float *dx = dev(c, x, n), *dyv = dev(c, yv, n), *dg = dev(c, g, (size_t)B * 2 * D);
    if (c->st == DM_OK) note(c, OPS(c)->gated_add(CTX(c), dx, dyv, B, T, D, dg + D, 2 * D));
    get(c, out, dx, n);
    for (size_t i = 0; i < n; i++)
        ref[i] = (float)((double)x[i] + (double)g[(i / D / T) * 2 * D + D + i % D] * yv[i]);
    r->err = rel_err(out, ref, n);
    r->work = 3.0 * n * 4, r->bytes_metric = 1;
    TIME(r->t_be, 1000, (OPS(c)->gated_add(CTX(c), dx, dyv, B, T, D, dg + D, 2 * D), OPS(c)->sync(CTX(c))));
    free(x), free(yv), free(g), free(out), free(ref);
}

/* a = {n} */
static void run_silu(ctx_t *c, const tcase *t, res_t *r)
{
    const size_t n = (size_t)t->a[0];
    float *x = rnd(n, 8), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    float *dx = dev(c, x, n);
    if (c->st == DM_OK) note(c, OPS(c)->silu(CTX(c), dx, n));
    get(c, y, dx, n);
    for (size_t i = 0; i < n; i++) ref[i] = (float)(x[i] / (1.0 + exp(-(double)x[i])));
    r->err = rel_err(y, ref, n);
    r->work = 2.0 * n * 4, r->bytes_metric = 1;
    TIME(r->t_be, 1000, (OPS(c)->silu(CTX(c), dx, n), OPS(c)->sync(CTX(c))));
    free(x), free(y), free(ref);
}

/* a = {B} */
static void run_timestep_embed(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0];
    const size_t n = (size_t)B * DM_TIME_FREQ_DIM;
    float *tt = xmalloc(sizeof(float) * B), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    for (int b = 0; b < B; b++) tt[b] = b == 0 ? 0.0f : b == 1 ? 999.0f : 500.0f * (frand() + 1.0f);
    float *dy = dev(c, NULL, n);
    if (c->st == DM_OK) note(c, OPS(c)->timestep_embed(CTX(c), tt, B, dy));
    get(c, y, dy, n);
    dm_timestep_sinusoid_ref(tt, B, ref);
    r->err = rel_err(y, ref, n);
    r->work = (double)n * 4, r->bytes_metric = 1;
    free(tt), free(y), free(ref);
}

/* a = {B, C, S, p, unpatchify} */
static void run_patch(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0], C = t->a[1], S = t->a[2], p = t->a[3], un = t->a[4];
    const size_t n = (size_t)B * C * S * S;
    float *x = rnd(n, 1), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    float *dx = dev(c, x, n), *dy = dev(c, NULL, n);
    if (c->st == DM_OK)
        note(c, un ? OPS(c)->unpatchify(CTX(c), dx, B, C, S, p, dy)
                   : OPS(c)->patchify(CTX(c), dx, B, C, S, p, dy));
    get(c, y, dy, n);
    if (un)
        dm_unpatchify_ref(x, B, C, S, p, ref);
    else
        dm_patchify_ref(x, B, C, S, p, ref);
    r->err = rel_err(y, ref, n);
    r->work = 2.0 * n * 4, r->bytes_metric = 1;
    TIME(r->t_be, 1000, (un ? OPS(c)->unpatchify(CTX(c), dx, B, C, S, p, dy)
                            : OPS(c)->patchify(CTX(c), dx, B, C, S, p, dy), OPS(c)->sync(CTX(c))));
    free(x), free(y), free(ref);
}

/* add_rows: a = {B, n}; embed_add: a = {B, D, rows, 1} */
static void run_add(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0], embed = t->a[3];
    const size_t n = embed ? (size_t)t->a[1] : (size_t)t->a[1];
    const int rows = embed ? t->a[2] : 1;
    float *x = rnd((size_t)B * n, 1), *tab = rnd((size_t)rows * n, 1);
    float *y = xmalloc((size_t)B * n * 4), *ref = xmalloc((size_t)B * n * 4);
    int64_t *lab = xmalloc(sizeof(int64_t) * B);
    for (int b = 0; b < B; b++) lab[b] = (b * 7 + 3) % rows;
    if (embed) lab[B - 1] = rows - 1; /* the null-class row */
    dm_weight *th = wt(c, DM_ROLE_EMBED, DM_USE_VECTOR, rows * (int)n, 1, tab, DM_F32);
    float *dx = dev(c, x, (size_t)B * n);
    if (c->st == DM_OK)
        note(c, embed ? OPS(c)->embed_add(CTX(c), dx, B, (int)n, th, lab)
                      : OPS(c)->add_rows(CTX(c), dx, B, n, th));
    get(c, y, dx, (size_t)B * n);
    for (int b = 0; b < B; b++)
        for (size_t i = 0; i < n; i++)
            ref[(size_t)b * n + i] = x[(size_t)b * n + i] + tab[(embed ? (size_t)lab[b] * n : 0) + i];
    r->err = rel_err(y, ref, (size_t)B * n);
    r->work = 3.0 * B * n * 4, r->bytes_metric = 1;
    free(x), free(tab), free(y), free(ref), free(lab);
}

/* a = {B, T, H, hd, qknorm} */
static void run_attention(ctx_t *c, const tcase *t, res_t *r)
{
    const int B = t->a[0], T = t->a[1], H = t->a[2], hd = t->a[3], qkn = t->a[4], D = H * hd;
    const size_t nin = (size_t)B * T * 3 * D, nout = (size_t)B * T * D;
    float *qkv = rnd(nin, 2), *nw = rnd(4 * (size_t)hd, 1);
    float *y = xmalloc(nout * 4), *ref = xmalloc(nout * 4);
    for (int i = 0; i < hd; i++) nw[i] += 1.0f, nw[2 * hd + i] += 1.0f;
    dm_attn_qk qk = {vec(c, nw, hd), vec(c, nw + hd, hd), vec(c, nw + 2 * hd, hd),
                     vec(c, nw + 3 * hd, hd), 1e-6f};
    float *dq = dev(c, qkv, nin), *dy = dev(c, NULL, nout);
    if (c->st == DM_OK) note(c, OPS(c)->attention(CTX(c), dq, B, T, H, hd, qkn ? &qk : NULL, dy));
    get(c, y, dy, nout);
    dm_qk_norm hq = {nw, nw + hd, nw + 2 * hd, nw + 3 * hd, 1e-6f};
    dm_attention_ref(qkv, B, T, H, hd, qkn ? &hq : NULL, ref);
    r->err = rel_err(y, ref, nout);
    r->work = 4.0 * B * H * (double)T * T * hd;
    TIME(r->t_be, 1000, (OPS(c)->attention(CTX(c), dq, B, T, H, hd, qkn ? &qk : NULL, dy), OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_attention_ref(qkv, B, T, H, hd, qkn ? &hq : NULL, ref));
    free(qkv), free(nw), free(y), free(ref);
}

/* ---- ffn (the whole MoE / dense layer) -------------------------------------------------------- */

/* Routed-expert quantisation of the backend instance under test (0, 8, 4 bits; see k_variants). */
static int g_quant;

/* W [out, in] -> the values the quantised backend stores (dm_quant_weight, the CPU's own
 * --quant-experts arithmetic, dequantised: q x scale), so a reference on the result measures the
 * kernel, not the weights' quantisation. */
static void dequantise(float *W, int out, int in, int bits)
{
    const size_t n = (size_t)out * in;
    void *q = xmalloc(bits == 8 ? n : n / 2);
    void *sc = xmalloc(bits == 8 ? sizeof(float) * out : sizeof(uint16_t) * (n / 32));
    if (dm_quant_weight(bits, W, DM_F32, out, in, "test", q, sc) != DM_OK) abort();
    for (int o = 0; o < out; o++)
        for (int k = 0; k < in; k++) {
            const size_t i = (size_t)o * in + k;
            if (bits == 8) {
                W[i] = (float)((const int8_t *)q)[i] * ((const float *)sc)[o];
            } else {
                const uint8_t byte = ((const uint8_t *)q)[i / 2];
                const int nib = (k & 1) ? byte >> 4 : byte & 15;
                W[i] = (float)(nib >= 8 ? nib - 16 : nib) *
                       dm_bf16_to_f32(((const uint16_t *)sc)[(size_t)o * (in / 32) + k / 32]);
            }
        }
    free(q), free(sc);
}

/* host + backend copies of one MLP */
static void make_mlp(ctx_t *c, dm_mlp_act act, int D, int F, dm_weight_role role, dm_mlp_host *h,
                     dm_mlp_layer *l)
{
    const int F1 = act == DM_MLP_SWIGLU ? 2 * F : F, bias = act == DM_MLP_GELU_TANH;
    float *w1 = rnd((size_t)F1 * D, 0.3f), *w2 = rnd((size_t)D * F, 0.3f);
    float *b1 = bias ? rnd(F1, 0.3f) : NULL, *b2 = bias ? rnd(D, 0.3f) : NULL;
    *h = (dm_mlp_host){act, F, w1, b1, w2, b2};
    *l = (dm_mlp_layer){act, F, wt(c, role, DM_USE_LINEAR, F1, D, w1, DM_F32), bias ? vec(c, b1, F1) : NULL,
                        wt(c, role, DM_USE_LINEAR, D, F, w2, DM_F32), bias ? vec(c, b2, D) : NULL};
    if (g_quant && role == DM_ROLE_EXPERT) { /* the reference sees the stored values */
        dequantise(w1, F1, D, g_quant);
        dequantise(w2, D, F, g_quant);
    }
}
static void free_mlp_host(dm_mlp_host *h)
{
    free((void *)h->w1), free((void *)h->b1), free((void *)h->w2), free((void *)h->b2);
}

/* a = {kind, E, k, shared, act, B, T, uncond_image (-1 none)}; D = 32, F = 64 (shared 48). */
static void run_ffn(ctx_t *c, const tcase *t, res_t *r)
{
    const dm_route_kind kind = (dm_route_kind)t->a[0];
    const int E = t->a[1], k = t->a[2], shared = t->a[3], B = t->a[5], T = t->a[6], unc = t->a[7];
    const int D = 32, F = 64, Fs = 48, N = B * T;
    const int dense = kind == DM_ROUTE_DENSE, promoe = kind == DM_ROUTE_PROTO_TC || kind == DM_ROUTE_PROTO_EC;
    const int64_t null_id = 10;
    const dm_mlp_act act = kind == DM_ROUTE_SOFTMAX_TOPK ? DM_MLP_SWIGLU : DM_MLP_GELU_TANH;
    dm_moe_desc d = {.kind = kind, .E = dense ? 0 : E, .k = dense ? 1 : k, .D = D,
                     .act = (dm_gate_act)t->a[4], .n_experts = dense ? 1 : E + promoe};
    float *gate = dense ? NULL : rnd((size_t)E * D, 1);
    if (promoe) /* unit-norm prototypes, as the loader stores them */
        for (int e = 0; e < E; e++) {
            double nn = 0;
            for (int i = 0; i < D; i++) nn += (double)gate[e * D + i] * gate[e * D + i];
            for (int i = 0; i < D; i++) gate[e * D + i] /= (float)sqrt(nn);
        }
    dm_mlp_host *hx = xmalloc(sizeof *hx * d.n_experts);
    dm_mlp_layer *lx = xmalloc(sizeof *lx * d.n_experts);
    for (int e = 0; e < d.n_experts; e++)
        make_mlp(c, act, D, F, dense ? DM_ROLE_MLP : DM_ROLE_EXPERT, &hx[e], &lx[e]);
    dm_ffn_host H = {.d = d, .gate = gate, .experts = hx};
    dm_ffn_layer L = {.d = d, .gate = dense ? NULL : wt(c, DM_ROLE_ROUTER, DM_USE_LINEAR, E, D, gate, DM_F32),
                      .experts = lx};
    if (shared) make_mlp(c, act, D, Fs, DM_ROLE_SHARED, &H.shared, &L.shared);
    int64_t *y = xmalloc(sizeof(int64_t) * B);
    for (int b = 0; b < B; b++) y[b] = b == unc ? null_id : (b * 3 + 2) % 10;
    float *h = rnd((size_t)N * D, 1.5f), *out = xmalloc(sizeof(float) * N * D);
    float *ref = xmalloc(sizeof(float) * N * D);
    int32_t *ids = xmalloc(sizeof(int32_t) * N * d.k), *rids = xmalloc(sizeof(int32_t) * N * d.k);
    float *w = xmalloc(sizeof(float) * N * d.k), *rw = xmalloc(sizeof(float) * N * d.k);
    dm_route_record rec = {ids, w};
    float *dh = dev(c, h, (size_t)N * D), *dout = dev(c, NULL, (size_t)N * D);
    if (c->st == DM_OK) note(c, OPS(c)->ffn(CTX(c), &L, dh, N, T, y, null_id, dout, dense ? NULL : &rec));
    get(c, out, dout, (size_t)N * D);
    dm_ffn_forward_ref(&H, h, N, T, y, null_id, ref);
    r->err = rel_err(out, ref, (size_t)N * D);
    if (!dense && c->st == DM_OK) { /* the routing record: same experts, same weights */
        dm_moe_route_ref(&H, h, N, T, y, null_id, rids, rw);
        for (int i = 0; i < N * d.k; i++)
            if (ids[i] != rids[i] || fabsf(w[i] - rw[i]) > 1e-5f) {
                snprintf(r->msg, sizeof r->msg, "record[%d] (token %d): expert %d w %g, reference %d w %g",
                         i, i / d.k, ids[i], (double)w[i], rids[i], (double)rw[i]);
                r->err = INFINITY;
                break;
            }
        for (int n = 0; n < N && !r->msg[0]; n++) /* descending weights; null images -> E */
            for (int j = 0; j < d.k; j++) {
                if (j > 0 && ids[n * d.k + j] >= 0 && w[n * d.k + j - 1] < w[n * d.k + j])
                    snprintf(r->msg, sizeof r->msg, "token %d: weights not descending", n);
                if (promoe && n / T == unc && j == 0 && (ids[n * d.k] != E || w[n * d.k] != 1.0f))
                    snprintf(r->msg, sizeof r->msg, "token %d of the null image not sent to expert %d", n, E);
            }
        if (r->msg[0]) r->err = INFINITY;
    }
    if (c->be->kind == DM_BACKEND_CPU && !dense && !r->msg[0]) {
        /* CPU internals: each expert's group holds the tokens that chose it, ascending */
        dm_moe_scratch s = {0};
        if (dm_moe_scratch_reserve(&s, N, D, F, d.n_experts, dm_moe_rows_per_token(&d, T)) == 0) {
            dm_moe_route(&L, h, N, T, y, null_id, &s);
            for (int e = 0; e < d.n_experts && !r->msg[0]; e++)
                for (int i = s.r.offset[e], prev = -1; i < s.r.offset[e + 1]; i++) {
                    int tok = s.r.rows[i], found = kind == DM_ROUTE_PROTO_EC;
                    for (int j = 0; j < d.k; j++) found |= s.r.ids[tok * d.k + j] == e;
                    if (tok <= prev || !found)
                        snprintf(r->msg, sizeof r->msg, "cpu grouping: expert %d row %d token %d", e, i, tok);
                    prev = tok;
                }
        }
        dm_moe_scratch_free(&s);
        if (r->msg[0]) r->err = INFINITY;
    }
    /* flops: gate + every (token, expert) pair actually computed + shared */
    double pairs = 0;
    for (int i = 0; i < N * d.k; i++) pairs += !dense && ids[i] >= 0;
    if (dense) pairs = N;
    const double F1 = act == DM_MLP_SWIGLU ? 2 * F : F;
    r->work = 2.0 * N * D * E + pairs * 2.0 * D * (F1 + F) +
              (shared ? 2.0 * N * D * ((act == DM_MLP_SWIGLU ? 2 : 1) * Fs + Fs) : 0);
    TIME(r->t_be, 1000, (OPS(c)->ffn(CTX(c), &L, dh, N, T, y, null_id, dout, NULL), OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_ffn_forward_ref(&H, h, N, T, y, null_id, ref));
    for (int e = 0; e < d.n_experts; e++) free_mlp_host(&hx[e]);
    if (shared) free_mlp_host(&H.shared);
    free(hx), free(lx), free(gate), free(y), free(h), free(out), free(ref);
    free(ids), free(rids), free(w), free(rw);
}

/* ---- the ffn op in its parts (MoE lab: router_scores, moe_grouped, mlp_add) ------------------ */

/* a = {which (0 router_scores, 1 moe_grouped, 2 mlp_add), kind, E, policy (0 top-k, 1 top-p 0.6,
 * 2 threshold 0.05 = up to every expert), B, T, act, null image}. D = 32, F = 64 (shared 48).
 * router_scores against dm_linear_ref + dm_moe_token_scores; moe_grouped over a policy's CSR
 * against a per-pick loop of dm_mlp_forward_ref in ascending expert order; mlp_add against
 * out + ref MLP; and on the CPU: top-k through moe_grouped + mlp_add == the ffn op bit for bit. */
static void run_split(ctx_t *c, const tcase *t, res_t *r)
{
    const int which = t->a[0], E = t->a[2], pol = t->a[3], B = t->a[4], T = t->a[5], unc = t->a[7];
    const dm_route_kind kind = (dm_route_kind)t->a[1];
    const int D = 32, F = 64, Fs = 48, N = B * T, k = 2, promoe = kind == DM_ROUTE_PROTO_TC;
    const int64_t null_id = 10;
    const dm_mlp_act act = promoe ? DM_MLP_GELU_TANH : DM_MLP_SWIGLU;
    dm_moe_desc d = {.kind = kind, .E = E, .k = k, .D = D, .act = (dm_gate_act)t->a[6],
                     .n_experts = E + promoe};
    float *gate = rnd((size_t)E * D, 1);
    if (promoe)
        for (int e = 0; e < E; e++) {
            double nn = 0;
            for (int i = 0; i < D; i++) nn += (double)gate[e * D + i] * gate[e * D + i];
            for (int i = 0; i < D; i++) gate[e * D + i] /= (float)sqrt(nn);
        }
    dm_mlp_host *hx = xmalloc(sizeof *hx * d.n_experts);
    dm_mlp_layer *lx = xmalloc(sizeof *lx * d.n_experts);
    for (int e = 0; e < d.n_experts; e++) make_mlp(c, act, D, F, DM_ROLE_EXPERT, &hx[e], &lx[e]);
    dm_ffn_host H = {.d = d, .gate = gate, .experts = hx};
    dm_ffn_layer L = {.d = d, .gate = wt(c, DM_ROLE_ROUTER, DM_USE_LINEAR, E, D, gate, DM_F32),
                      .experts = lx};
    make_mlp(c, act, D, Fs, DM_ROLE_SHARED, &H.shared, &L.shared);
    int64_t *y = xmalloc(sizeof(int64_t) * B);
    for (int b = 0; b < B; b++) y[b] = b == unc ? null_id : (b * 3 + 2) % 10;
    const size_t ND = (size_t)N * D;
    float *h = rnd(ND, 1.5f), *out = xmalloc(sizeof(float) * ND), *ref = xmalloc(sizeof(float) * ND);
    float *sc = xmalloc(sizeof(float) * N * E), *sref = xmalloc(sizeof(float) * N * E);
    float *dh = dev(c, h, ND), *dout = dev(c, NULL, ND);
    /* router scores, both ways */
    if (c->st == DM_OK) note(c, OPS(c)->router_scores(CTX(c), &L, dh, N, NULL, sc));
    dm_linear_ref(h, N, D, gate, NULL, E, sref);
    for (int n = 0; n < N; n++) dm_moe_token_scores(&d, h + (size_t)n * D, sref + (size_t)n * E);
    if (which == 0) {
        r->err = rel_err(sc, sref, (size_t)N * E);
        r->work = 2.0 * N * D * E;
    } else if (which == 1 && c->st == DM_OK) {
        dm_route_policy p;
        dm_route_policy_init(&p);
        if (pol == 1) p.kind = DM_POLICY_TOPP, p.p = 0.6f;
        if (pol == 2) p.kind = DM_POLICY_THRESHOLD, p.p = promoe ? -1.0f : 0.05f;
        uint8_t *uf = xmalloc((size_t)N);
        for (int n = 0; n < N; n++) uf[n] = (uint8_t)dm_moe_is_uncond(&d, y, null_id, n, T);
        dm_route_csr csr = {0};
        note(c, dm_route_csr_reserve(&csr, N, dm_route_policy_max_picks(&p, E, k), d.n_experts));
        if (c->st == DM_OK) {
            dm_route_select(&p, sc, N, E, k, promoe ? uf : NULL, E, &csr);
            note(c, OPS(c)->moe_grouped(CTX(c), &L, dh, N, csr.exp_off, csr.rows, csr.row_w, dout));
            get(c, out, dout, ND);
            /* reference: every pick of every token, experts ascending */
            float *yv = xmalloc(sizeof(float) * D);
            memset(ref, 0, sizeof(float) * ND);
            for (int e = 0; e < d.n_experts; e++)
                for (int n = 0; n < N; n++)
                    for (int32_t i = csr.tok_off[n]; i < csr.tok_off[n + 1]; i++)
                        if (csr.ids[i] == e) {
                            dm_mlp_forward_ref(&hx[e], h + (size_t)n * D, 1, D, yv);
                            for (int j = 0; j < D; j++) ref[(size_t)n * D + j] += csr.weights[i] * yv[j];
                        }
            free(yv);
            r->err = rel_err(out, ref, ND);
            snprintf(r->msg, sizeof r->msg, "%.2f picks/token", (double)csr.n_picks / N);
            if (pol == 0 && c->be->kind == DM_BACKEND_CPU && c->st == DM_OK) {
                /* top-k: grouped + shared == the fused op, bit for bit */
                float *fused = xmalloc(sizeof(float) * ND), *dfused = dev(c, NULL, ND);
                note(c, OPS(c)->mlp_add(CTX(c), &L.shared, dh, N, dout));
                get(c, out, dout, ND);
                if (c->st == DM_OK)
                    note(c, OPS(c)->ffn(CTX(c), &L, dh, N, T, y, null_id, dfused, NULL));
                get(c, fused, dfused, ND);
                if (c->st == DM_OK && memcmp(fused, out, sizeof(float) * ND)) {
                    snprintf(r->msg, sizeof r->msg, "top-k grouped + shared != ffn (bits)");
                    r->err = INFINITY;
                }
                free(fused);
            }
            r->work = 2.0 * csr.n_picks * D * ((act == DM_MLP_SWIGLU ? 2 : 1) * F + F);
        }
        dm_route_csr_free(&csr);
        free(uf);
    } else if (which == 2 && c->st == DM_OK) {
        float *base = rnd(ND, 1.0f), *yv = xmalloc(sizeof(float) * ND);
        note(c, OPS(c)->upload(CTX(c), dout, base, sizeof(float) * ND));
        if (c->st == DM_OK) note(c, OPS(c)->mlp_add(CTX(c), &L.shared, dh, N, dout));
        get(c, out, dout, ND);
        dm_mlp_forward_ref(&H.shared, h, N, D, yv);
        for (size_t i = 0; i < ND; i++) ref[i] = base[i] + yv[i];
        r->err = rel_err(out, ref, ND);
        r->work = 2.0 * N * D * ((act == DM_MLP_SWIGLU ? 2 : 1) * Fs + Fs);
        free(base), free(yv);
    }
    for (int e = 0; e < d.n_experts; e++) free_mlp_host(&hx[e]);
    free_mlp_host(&H.shared);
    free(hx), free(lx), free(gate), free(y), free(h), free(out), free(ref), free(sc), free(sref);
}

/* ---- VAE ops ---------------------------------------------------------------------------------- */

/* a = {Cin, H, W, Cout, k, acc, bias} */
static void run_conv2d(ctx_t *c, const tcase *t, res_t *r)
{
    const int Cin = t->a[0], H = t->a[1], W = t->a[2], Cout = t->a[3], k = t->a[4], acc = t->a[5];
    const int bias = t->a[6];
    const size_t nx = (size_t)Cin * H * W, no = (size_t)Cout * H * W;
    float *x = rnd(nx, 1), *w = rnd((size_t)Cout * Cin * k * k, 0.3f), *b = rnd(Cout, 0.5f);
    float *o0 = rnd(no, 1), *y = xmalloc(no * 4), *ref = xmalloc(no * 4);
    dm_weight *wh = wt(c, DM_ROLE_VAE, DM_USE_CONV, Cout, Cin * k * k, w, DM_F32);
    dm_weight *bh = bias ? vec(c, b, Cout) : NULL;
    float *dx = dev(c, x, nx), *dy = dev(c, o0, no);
    if (c->st == DM_OK) note(c, OPS(c)->conv2d(CTX(c), dx, Cin, H, W, wh, bh, Cout, k, acc, dy));
    get(c, y, dy, no);
    dm_vae_conv2d_ref(x, Cin, H, W, w, bias ? b : NULL, Cout, k, ref);
    if (acc)
        for (size_t i = 0; i < no; i++) ref[i] += o0[i];
    r->err = rel_err(y, ref, no);
    r->work = 2.0 * Cout * Cin * k * k * (double)H * W;
    TIME(r->t_be, 1000, (OPS(c)->conv2d(CTX(c), dx, Cin, H, W, wh, bh, Cout, k, 0, dy), OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_vae_conv2d_ref(x, Cin, H, W, w, bias ? b : NULL, Cout, k, ref));
    free(x), free(w), free(b), free(o0), free(y), free(ref);
}

/* a = {C, HW, G, silu, inplace} */
static void run_group_norm(ctx_t *c, const tcase *t, res_t *r)
{
    const int C = t->a[0], G = t->a[2], silu = t->a[3], inplace = t->a[4];
    const size_t HW = (size_t)t->a[1], n = (size_t)C * HW;
    float *x = rnd(n, 2), *g = rnd(C, 0.5f), *b = rnd(C, 0.5f), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    for (int i = 0; i < C; i++) g[i] += 1.0f;
    for (size_t i = 0; i < n; i++) x[i] += 0.7f;
    dm_weight *gh = vec(c, g, C), *bh = vec(c, b, C);
    float *dx = dev(c, x, n), *dy = inplace ? dx : dev(c, NULL, n);
    if (c->st == DM_OK) note(c, OPS(c)->group_norm(CTX(c), dx, C, HW, G, DM_VAE_EPS, gh, bh, silu, dy));
    get(c, y, dy, n);
    dm_vae_group_norm_ref(x, C, HW, G, DM_VAE_EPS, g, b, silu, ref);
    r->err = rel_err(y, ref, n);
    r->work = 3.0 * n * 4, r->bytes_metric = 1;
    if (!inplace)
        TIME(r->t_be, 1000, (OPS(c)->group_norm(CTX(c), dx, C, HW, G, DM_VAE_EPS, gh, bh, silu, dy), OPS(c)->sync(CTX(c))));
    free(x), free(g), free(b), free(y), free(ref);
}

/* a = {C, H, W} */
static void run_upsample(ctx_t *c, const tcase *t, res_t *r)
{
    const int C = t->a[0], H = t->a[1], W = t->a[2];
    const size_t n = (size_t)C * H * W;
    float *x = rnd(n, 1), *y = xmalloc(n * 16), *ref = xmalloc(n * 16);
    float *dx = dev(c, x, n), *dy = dev(c, NULL, 4 * n);
    if (c->st == DM_OK) note(c, OPS(c)->upsample2x(CTX(c), dx, C, H, W, dy));
    get(c, y, dy, 4 * n);
    for (int ch = 0; ch < C; ch++)
        for (int i = 0; i < 2 * H; i++)
            for (int j = 0; j < 2 * W; j++)
                ref[((size_t)ch * 2 * H + i) * 2 * W + j] = x[((size_t)ch * H + i / 2) * W + j / 2];
    r->err = rel_err(y, ref, 4 * n);
    r->work = 5.0 * n * 4, r->bytes_metric = 1;
    TIME(r->t_be, 1000, (OPS(c)->upsample2x(CTX(c), dx, C, H, W, dy), OPS(c)->sync(CTX(c))));
    free(x), free(y), free(ref);
}

/* a = {C, N, G} */
static void run_vae_attention(ctx_t *c, const tcase *t, res_t *r)
{
    const int C = t->a[0], N = t->a[1], G = t->a[2];
    float *p[10];
    dm_weight *hw[10];
    for (int i = 0; i < 10; i++) {
        int mat = i >= 2 && i % 2 == 0; /* gn_g, gn_b, then (w, b) x 4 */
        p[i] = rnd(mat ? (size_t)C * C : (size_t)C, mat ? 1.0f / sqrtf((float)C) : 0.2f);
        if (i == 0)
            for (int j = 0; j < C; j++) p[0][j] += 1.0f;
        hw[i] = mat ? wt(c, DM_ROLE_VAE, DM_USE_CONV, C, C, p[i], DM_F32) : vec(c, p[i], C);
    }
    dm_vae_attn_layer L = {hw[0], hw[1], hw[2], hw[3], hw[4], hw[5], hw[6], hw[7], hw[8], hw[9]};
    dm_vae_attn_w A = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]};
    const size_t n = (size_t)C * N;
    float *x = rnd(n, 2), *y = xmalloc(n * 4), *ref = xmalloc(n * 4);
    memcpy(ref, x, n * 4);
    float *dx = dev(c, x, n);
    if (c->st == DM_OK) note(c, OPS(c)->vae_attention(CTX(c), dx, C, N, G, &L));
    get(c, y, dx, n);
    dm_vae_attention_ref(ref, C, N, G, &A);
    r->err = rel_err(y, ref, n);
    r->work = 8.0 * C * (double)C * N + 4.0 * (double)N * N * C;
    TIME(r->t_be, 1000, (OPS(c)->vae_attention(CTX(c), dx, C, N, G, &L), OPS(c)->sync(CTX(c))));
    TIME(r->t_ref, 1, dm_vae_attention_ref(ref, C, N, G, &A));
    for (int i = 0; i < 10; i++) free(p[i]);
    free(x), free(y), free(ref);
}

/* ---- the table of cases ----------------------------------------------------------------------- */

enum { TC = DM_ROUTE_PROTO_TC, EC = DM_ROUTE_PROTO_EC, SM = DM_ROUTE_SOFTMAX_TOPK, DN = DM_ROUTE_DENSE };
enum { ID = DM_GATE_IDENTITY, SMX = DM_GATE_SOFTMAX, SIG = DM_GATE_SIGMOID };

static const tcase k_cases[] = {
    {"linear", "N 37 in 70 out 45 +bias f32", run_linear, {37, 70, 45, 1, DM_F32}, 0},
    {"linear", "N 37 in 70 out 45 f32", run_linear, {37, 70, 45, 0, DM_F32}, 0},
    {"linear", "N 1 in 256 out 100 +bias f32", run_linear, {1, 256, 100, 1, DM_F32}, 0},
    {"linear", "N 256 in 96 out 288 +bias f32", run_linear, {256, 96, 288, 1, DM_F32}, 0},
    {"linear", "N 1024 in 64 out 33 +bias f32", run_linear, {1024, 64, 33, 1, DM_F32}, 0},
    {"linear", "N 61 in 48 out 70 +bias bf16", run_linear, {61, 48, 70, 1, DM_BF16}, 0},
    {"linear", "N 61 in 48 out 70 +bias f16", run_linear, {61, 48, 70, 1, DM_F16}, 0},
    {"layernorm_mod", "B 3 T 19 D 40 modulate", run_layernorm_mod, {3, 19, 40, 1}, 0},
    {"layernorm_mod", "B 2 T 256 D 96 modulate", run_layernorm_mod, {2, 256, 96, 1}, 0},
    {"layernorm_mod", "B 1 T 1024 D 64 plain", run_layernorm_mod, {1, 1024, 64, 0}, 0},
    {"gated_add", "B 3 T 19 D 40", run_gated_add, {3, 19, 40}, 0},
    {"gated_add", "B 2 T 256 D 96", run_gated_add, {2, 256, 96}, 0},
    {"silu", "n 1000", run_silu, {1000}, 0},
    {"silu", "n 65537", run_silu, {65537}, 0},
    {"timestep_embed", "B 5 (t 0, 999, random)", run_timestep_embed, {5}, 0},
    {"patchify", "B 2 C 3 S 8 p 2", run_patch, {2, 3, 8, 2, 0}, 0},
    {"patchify", "B 3 C 4 S 32 p 2 (T 256)", run_patch, {3, 4, 32, 2, 0}, 0},
    {"unpatchify", "B 2 C 3 S 8 p 2", run_patch, {2, 3, 8, 2, 1}, 0},
    {"unpatchify", "B 2 C 4 S 64 p 2 (T 1024)", run_patch, {2, 4, 64, 2, 1}, 0},
    {"add_rows", "B 3 n 256*40", run_add, {3, 256 * 40, 1, 0}, 0},
    {"embed_add", "B 5 D 40 rows 11", run_add, {5, 40, 11, 1}, 0},
    {"attention", "B 2 T 23 H 3 hd 16", run_attention, {2, 23, 3, 16, 0}, 0},
    {"attention", "B 2 T 23 H 3 hd 16 qk-norm", run_attention, {2, 23, 3, 16, 1}, 0},
    {"attention", "B 1 T 256 H 2 hd 32 qk-norm", run_attention, {1, 256, 2, 32, 1}, 0},
    {"attention", "B 1 T 1024 H 1 hd 8", run_attention, {1, 1024, 1, 8, 0}, 0},
    /* ffn: {kind, E, k, shared, act, B, T, null image} */
    {"ffn", "softmax top-2 E 8 +shared B 3 T 19", run_ffn, {SM, 8, 2, 1, 0, 3, 19, -1}, 0},
    {"ffn", "softmax top-1 E 16 B 2 T 3 (empty groups)", run_ffn, {SM, 16, 1, 0, 0, 2, 3, -1}, 0},
    {"ffn", "softmax top-2 E 16 +shared B 1 T 256", run_ffn, {SM, 16, 2, 1, 0, 1, 256, -1}, 0},
    {"ffn", "softmax top-3 E 3 (k = E) +shared B 2 T 17", run_ffn, {SM, 3, 3, 1, 0, 2, 17, -1}, 0},
    {"ffn", "proto TC top-1 E 12+1 identity +shared B 3 T 19 null 1", run_ffn, {TC, 12, 1, 1, ID, 3, 19, 1}, 0},
    {"ffn", "proto TC top-2 E 12+1 softmax +shared B 2 T 256 null 0", run_ffn, {TC, 12, 2, 1, SMX, 2, 256, 0}, 0},
    {"ffn", "proto EC k 1 E 12+1 identity +shared B 3 T 19 null 1", run_ffn, {EC, 12, 1, 1, ID, 3, 19, 1}, 0},
    {"ffn", "proto EC k 2 E 8+1 sigmoid B 2 T 256 null 1", run_ffn, {EC, 8, 2, 0, SIG, 2, 256, 1}, 0},
    {"ffn", "proto EC k 4 E 4+1 (capacity T: full groups) B 2 T 16", run_ffn, {EC, 4, 4, 1, ID, 2, 16, -1}, 0},
    {"ffn", "proto EC k 1 E 16+1 (capacity 1) B 2 T 9 null 0", run_ffn, {EC, 16, 1, 1, SMX, 2, 9, 0}, 0},
    {"ffn", "dense GELU B 3 T 19", run_ffn, {DN, 0, 1, 0, 0, 3, 19, -1}, 0},
    {"ffn", "dense GELU B 1 T 1024", run_ffn, {DN, 0, 1, 0, 0, 1, 1024, -1}, 0},
    /* the ffn op in its parts: {which, kind, E, policy, B, T, act, null image} */
    {"router_scores", "softmax E 8 B 3 T 19", run_split, {0, SM, 8, 0, 3, 19, 0, -1}, 0},
    {"router_scores", "proto cosine E 12 softmax B 2 T 17", run_split, {0, TC, 12, 0, 2, 17, SMX, -1}, 0},
    {"moe_grouped", "softmax top-2 E 8 B 3 T 19 (+ shared == ffn bits)", run_split, {1, SM, 8, 0, 3, 19, 0, -1}, 0},
    {"moe_grouped", "softmax top-p 0.6 E 8 B 2 T 37", run_split, {1, SM, 8, 1, 2, 37, 0, -1}, 0},
    {"moe_grouped", "softmax threshold 0.05 E 16 B 1 T 64", run_split, {1, SM, 16, 2, 1, 64, 0, -1}, 0},
    {"moe_grouped", "proto TC top-2 E 12+1 B 3 T 19 null 1 (+ shared == ffn)", run_split, {1, TC, 12, 0, 3, 19, ID, 1}, 0},
    {"mlp_add", "SwiGLU F 48 B 3 T 19", run_split, {2, SM, 8, 0, 3, 19, 0, -1}, 0},
    {"mlp_add", "GELU F 48 B 2 T 17", run_split, {2, TC, 8, 0, 2, 17, ID, -1}, 0},
    /* conv2d: {Cin, H, W, Cout, k, acc, bias} */
    {"conv2d", "Cin 5 7x9 Cout 6 k 3", run_conv2d, {5, 7, 9, 6, 3, 0, 1}, 0},
    {"conv2d", "Cin 5 7x9 Cout 6 k 3 acc", run_conv2d, {5, 7, 9, 6, 3, 1, 1}, 0},
    {"conv2d", "Cin 3 16x16 Cout 8 k 1 no bias", run_conv2d, {3, 16, 16, 8, 1, 0, 0}, 0},
    {"conv2d", "Cin 16 33x31 Cout 12 k 3 acc", run_conv2d, {16, 33, 31, 12, 3, 1, 1}, 0},
    {"conv2d", "Cin 8 1x1 Cout 4 k 3", run_conv2d, {8, 1, 1, 4, 3, 0, 1}, 0},
    {"group_norm", "C 64 HW 221 G 32 silu", run_group_norm, {64, 221, 32, 1, 0}, 0},
    {"group_norm", "C 48 HW 64 G 16 in place", run_group_norm, {48, 64, 16, 0, 1}, 0},
    {"upsample2x", "C 5 7x9", run_upsample, {5, 7, 9}, 0},
    {"vae_attention", "C 32 N 63 G 8", run_vae_attention, {32, 63, 8}, 0},
    {"vae_attention", "C 48 N 256 G 16", run_vae_attention, {48, 256, 16}, 0},
    /* --perf only: the shipped models' shapes (D 128, T 16, batch 32 with guidance) */
    {"linear", "N 512 in 128 out 384 (qkv)", run_linear, {512, 128, 384, 1, DM_F32}, 1},
    {"linear", "N 512 in 128 out 768 (adaLN-sized)", run_linear, {512, 128, 768, 1, DM_F32}, 1},
    {"linear", "N 512 in 128 out 384 bf16", run_linear, {512, 128, 384, 1, DM_BF16}, 1},
    {"attention", "B 32 T 16 H 4 hd 32", run_attention, {32, 16, 4, 32, 0}, 1},
    {"ffn", "softmax top-2 E 8 +shared B 32 T 16", run_ffn, {SM, 8, 2, 1, 0, 32, 16, -1}, 1},
    {"conv2d", "Cin 64 32x32 Cout 64 k 3", run_conv2d, {64, 32, 32, 64, 3, 0, 1}, 1},
};

#define TOL_BF16 3e-2 /* bf16 operands (x and W rounded), fp32 accumulation */
#define TOL_Q 1.5e-1  /* int8 / int4 routed experts: int8 activations per row (x and the expert's
                       * hidden layer), against the reference on the dequantised weights */

static double tol_of(const char *op)
{
    static const struct {
        const char *op;
        double tol;
    } t[] = {{"gated_add", 1e-6}, {"silu", 1e-6}, {"timestep_embed", 2e-4}, {"patchify", 0},
             {"unpatchify", 0},   {"add_rows", 0}, {"embed_add", 0},         {"upsample2x", 0}};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        if (!strcmp(op, t[i].op)) return t[i].tol;
    return 1e-5;
}

/* Backend instances: the file's precision (f32 arithmetic), and the low-precision instances of
 * issue 13 (dm_load_opts.precision / quant_experts), run on the GEMM-carrying ops only. */
typedef struct {
    const char *name, *tag;
    dm_precision precision;
    int quant; /* routed experts: 0, 8, 4 bits */
} variant;
static const variant k_variants[] = {
    {"f32", "", DM_PREC_F32, 0},
    {"bf16", " bf16", DM_PREC_BF16, 0},
    {"bf16+int8", " bf16+q8", DM_PREC_BF16, 8},
    {"bf16+int4", " bf16+q4", DM_PREC_BF16, 4},
};
enum { N_VARIANTS = sizeof k_variants / sizeof *k_variants };

static int lowp_op(const char *op)
{
    static const char *const ops[] = {"linear", "attention", "ffn", "router_scores", "moe_grouped",
                                      "mlp_add"};
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        if (!strcmp(op, ops[i])) return 1;
    return 0;
}
/* Tolerances of the low-precision instances (max|err| / RMS(ref), see the file's top). */
static double lowp_tol(const variant *v, const tcase *t)
{
    if (!strcmp(t->op, "router_scores")) return tol_of(t->op); /* the router stays float32 */
    if (v->quant && (!strcmp(t->op, "ffn") || !strcmp(t->op, "moe_grouped"))) return TOL_Q;
    return TOL_BF16;
}

/* Other backends keep weights 16-bit on the device and run GEMMs and convolutions with 16-bit
 * operands and fp32 accumulation (spec: the CUDA backend; fp32 files become bf16): their
 * GEMM-carrying ops are held to the bf16 bound, everything else to the CPU's. */
static double device_tol(const char *op)
{
    static const char *const ops[] = {"linear", "attention", "ffn", "moe_grouped", "mlp_add",
                                      "conv2d", "vae_attention"};
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        if (!strcmp(op, ops[i])) return TOL_BF16;
    return tol_of(op);
}

static void usage(void)
{
    fprintf(stderr, "usage: test_backend_ops [--op NAME] [--backend NAME] [--perf] [--list]\n");
}

int main(int argc, char **argv)
{
    const char *only_op = NULL, *only_be = NULL;
    int list = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--op") && i + 1 < argc) only_op = argv[++i];
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) only_be = argv[++i];
        else if (!strcmp(argv[i], "--perf")) g_perf = 1;
        else if (!strcmp(argv[i], "--list")) list = 1;
        else return usage(), 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const size_t ncases = sizeof k_cases / sizeof *k_cases;
    if (list) {
        for (size_t i = 0; i < ncases; i++) printf("%-14s %s\n", k_cases[i].op, k_cases[i].desc);
        return 0;
    }
    dm_set_log_level(DM_LOG_QUIET);
    dm_backend_kind kinds[DM_BACKEND_COUNT];
    const int nk = dm_backend_compiled(kinds, DM_BACKEND_COUNT);
    if (only_be) {
        dm_backend_kind k;
        if (dm_backend_from_name(only_be, &k)) return fprintf(stderr, "unknown backend %s\n", only_be), 2;
        dm_status st = dm_backend_check(k);
        if (st != DM_OK) return printf("SKIP %s: %s\n", only_be, dm_last_error()), 0;
    }
    int pass = 0, fail = 0, skip = 0, matched = 0;
    double t_cpu[sizeof k_cases / sizeof *k_cases] = {0}; /* --perf: the CPU backend's time */
    if (!only_op) { /* selection: a backend this build lacks is DM_ERR_ARG, never a fallback */
        for (int k = 0; k < DM_BACKEND_COUNT; k++) {
            if (dm_backend_check((dm_backend_kind)k) == DM_OK) continue;
            dm_load_opts o;
            dm_load_opts_init(&o);
            o.backend = (dm_backend_kind)k;
            dm_model *m = (dm_model *)1;
            dm_vae *v = (dm_vae *)1;
            dm_backend *be = (dm_backend *)1;
            const int ok = dm_backend_open(&o, &be) == DM_ERR_ARG && !be &&
                           dm_model_load_opts("no-such-model.safetensors", &o, &m) == DM_ERR_ARG &&
                           !m && dm_vae_load_opts("no-such-vae.safetensors", &o, &v) == DM_ERR_ARG &&
                           !v;
            printf("%s %-5s %-14s model/VAE load with a backend this build lacks: DM_ERR_ARG\n",
                   ok ? "PASS" : "FAIL", dm_backend_name(o.backend), "open");
            ok ? pass++ : fail++;
        }
    }
    for (int run = 0; run < nk * N_VARIANTS; run++) {
        const int bi = run / N_VARIANTS;
        const variant *var = &k_variants[run % N_VARIANTS];
        /* the precision instances are the CPU backend's (other backends ignore those options) */
        if (kinds[bi] != DM_BACKEND_CPU && var->precision != DM_PREC_F32) continue;
        if (only_be && strcmp(only_be, dm_backend_name(kinds[bi]))) continue;
        dm_backend *be;
        dm_load_opts o;
        dm_load_opts_init(&o);
        o.backend = kinds[bi];
        o.precision = var->precision;
        o.quant_experts = var->quant;
        g_quant = var->quant;
        dm_status ost = dm_backend_open(&o, &be);
        if (ost == DM_ERR_BACKEND && kinds[bi] != DM_BACKEND_CPU) {
            /* compiled in, but no usable device here (a CUDA build on a GPU-less machine) */
            printf("SKIP %s %s: no device: %s\n", dm_backend_name(kinds[bi]), var->name,
                   dm_last_error());
            skip++;
            continue;
        }
        if (ost != DM_OK) {
            printf("FAIL %s %s: cannot open: %s\n", dm_backend_name(kinds[bi]), var->name,
                   dm_last_error());
            fail++;
            continue;
        }
        for (size_t i = 0; i < ncases; i++) {
            const tcase *t = &k_cases[i];
            if ((only_op && strcmp(only_op, t->op)) || (t->perf_only && !g_perf)) continue;
            if (var->precision != DM_PREC_F32 && !lowp_op(t->op)) continue;
            matched++;
            if (!dm_backend_has(be, t->op)) {
                printf("SKIP %-5s %-14s %s: not in this backend's table\n", be->ops->name, t->op, t->desc);
                skip++;
                continue;
            }
            g_rng = 0x9E3779B97F4A7C15ull ^ (i * 0x632BE59BD9B4E019ull);
            ctx_t c = {.be = be};
            res_t r = {.tol = kinds[bi] != DM_BACKEND_CPU      ? device_tol(t->op)
                              : var->precision == DM_PREC_F32 ? tol_of(t->op)
                                                              : lowp_tol(var, t)};
            const double t0 = dm_time_sec();
            t->run(&c, t, &r);
            ctx_free(&c);
            const double secs = dm_time_sec() - t0;
            const int ok = c.st == DM_OK && r.err <= r.tol;
            printf("%s %-5s%-10s %-14s %-55s err %.2e (tol %.0e)", ok ? "PASS" : "FAIL",
                   be->ops->name, var->tag, t->op, t->desc, r.err, r.tol);
            if (c.st != DM_OK) printf(" status %d: %s", (int)c.st, dm_last_error());
            if (r.msg[0]) printf(" %s", r.msg);
            if (!g_perf) printf(" %.2fs", secs);
            if (g_perf && r.t_be > 0) {
                const double u = 1e-9;
                printf("  %s %.2f %s", be->ops->name, r.work * u / r.t_be, r.bytes_metric ? "GB/s" : "GFLOP/s");
                if (r.t_ref > 0)
                    printf(", reference %.3f (x%.1f)", r.work * u / r.t_ref, r.t_ref / r.t_be);
                if (be->kind == DM_BACKEND_CPU)
                    t_cpu[i] = r.t_be;
                else if (t_cpu[i] > 0)
                    printf(", cpu %.2f (x%.1f)", r.work * u / t_cpu[i], t_cpu[i] / r.t_be);
            }
            printf("\n");
            ok ? pass++ : fail++;
        }
        dm_backend_close(be);
    }
    if (only_op && !matched) return fprintf(stderr, "no case for op %s (see --list)\n", only_op), 2;
    printf("%d passed, %d failed, %d skipped\n", pass, fail, skip);
    return fail ? 1 : 0;
}

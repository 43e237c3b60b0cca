/* ditmoe-cuda-check: the device-side sections of scripts/gpu_check.sh (docs/spec/cuda.md §6).
 *
 *   ditmoe-cuda-check --section probe|ceil|inv|bench [--device N] [--quick]
 *
 * probe  device, runtime/driver/cuBLAS/cuDNN versions, which cuDNN SDPA plans finalize (hd 64/72/88
 *        x T 256/1024 x bf16/fp16), the sm_90a object.
 * ceil   device copy bandwidth (2 GiB), bf16 GEMM 8192^3 and every dense/expert GEMM shape of
 *        DiT-MoE-XL/2 and G/2 at B2 = 64 (TFLOP/s, pinned cuBLASLt algorithms).
 * inv    batch invariance through the op table: one image alone vs the same image inside batches
 *        of 2, 13 and 64 at other positions with other neighbours -> bitwise equal, for linear,
 *        attention (each path) and the whole MoE layer (XL-shaped, random weights); and 3 runs of
 *        the same batch -> bitwise equal.
 * bench  one DiT-MoE block's ops (XL/2 @256 and G/2 @512 shapes, random weights) at several B2:
 *        time per op, block TFLOP/s, projected forward time and images/s for RF-50 + CFG.
 * Each section prints "[section] ..." lines and one "SUMMARY <section>: ..." line, and exits 0 on
 * success, 1 on a failed check, 77 without a usable device (then "skipped: ..."). */
#include "backend/cuda/cuda_be.h"
#include "backend/cuda/ctx.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static dmc_ctx *C;
static int quick;

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static float frand(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static void die(const char *what)
{
    fprintf(stderr, "ditmoe-cuda-check: %s: %s\n", what, dm_last_error());
    exit(1);
}

/* Device buffer of n random values (uniform [-scale, scale)) as fp32, or 16-bit when t16 >= 0:
 * made from device Philox noise so gigabytes cost no host time. */
static void *dev_random(size_t n, float scale, int t16)
{
    static uint64_t seed = 1;
    float *f;
    if (dmc_alloc(C, n * 4, "random", (void **)&f)) die("alloc");
    const uint64_t idx = seed++;
    uint64_t *di;
    if (dmc_alloc(C, 8, "random", (void **)&di) || dmc_upload(C, di, &idx, 8, "random")) die("alloc");
    if (dmc_err(dmc_noise_normal(42, di, 1, 0, n, f, C->stream), "noise")) die("noise");
    const float s = scale / 3.0f; /* normals, clipped range roughly [-scale, scale] */
    cublasSscal(C->blas, (int)(n > 0x7fffffff ? 0x7fffffff : n), &s, f, 1);
    dmc_sync(C, "random");
    dmc_free(C, di);
    if (t16 < 0) return f;
    uint16_t *h;
    if (dmc_alloc(C, n * 2, "random", (void **)&h)) die("alloc");
    if (dmc_err(dmc_f32_to_h16(f, n, h, (dmc_h16)t16, C->stream), "convert")) die("convert");
    dmc_free(C, f);
    return h;
}

static double elapsed_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    return ms;
}

/* ---- probe ---- */

static int section_probe(int device)
{
    char msg[320];
    dmc_device_probe(device, msg, sizeof msg);
    int rt = 0, drv = 0, cb = 0;
    cudaRuntimeGetVersion(&rt);
    cudaDriverGetVersion(&drv);
    cublasGetVersion(C->blas, &cb);
    const char *why = NULL;
    const int dnn = dmc_cudnn_version(C, &why);
    printf("[probe] device %d: %s\n", device, msg);
    printf("[probe] CUDA runtime %d, driver %d, cuBLAS %d, cuBLASLt %zu, cuDNN %d%s%s\n", rt, drv,
           cb, cublasLtGetVersion(), dnn, why ? " (unusable: " : "", why ? why : "");
    if (why) printf("[probe] )\n");
    int plans = 0, tried = 0;
    const int hds[] = {64, 72, 88}, Ts[] = {256, 1024};
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 2; j++) {
                int usable = 0;
                dm_status st = dmc_sdpa(C, NULL, 2, Ts[j], 16, hds[i], (dmc_h16)t, NULL, &usable);
                tried++;
                plans += usable;
                printf("[probe] cuDNN SDPA %s hd %d T %d: %s\n", t ? "fp16" : "bf16", hds[i], Ts[j],
                       st ? dm_last_error() : usable ? "plan finalized" : "no plan");
            }
    int sm90a = -1;
    if (C->cc_major == 9 && C->cc_minor == 0) {
        float *d, h = 0;
        if (!dmc_alloc(C, 4, "probe", (void **)&d)) {
            int e = dmc_sm90a_probe(d, C->stream);
            if (!e && !dmc_download(C, &h, d, 4, "sm90a probe")) sm90a = h == 90.0f;
            else sm90a = 0, (void)cudaGetLastError();
            dmc_free(C, d);
        }
    }
    printf("[probe] sm_90a object: %s\n", sm90a < 0 ? "not a cc 9.0 device" : sm90a ? "runs" : "FAILED");
    printf("SUMMARY probe: %s | cuDNN %d | SDPA plans %d/%d | sm_90a %s\n", C->name, dnn, plans,
           tried, sm90a < 0 ? "n/a" : sm90a ? "ok" : "FAIL");
    return sm90a == 0;
}

/* ---- ceilings ---- */

typedef struct {
    const char *name;
    int M, out, in;
} shape;

static double time_linear(int out, int in, int M, int reps)
{
    void *W = dev_random((size_t)out * in, 0.05f, DMC_BF16), *x = dev_random((size_t)M * in, 1.0f, DMC_BF16);
    float *y;
    if (dmc_alloc(C, (size_t)M * out * 4, "ceil", (void **)&y)) die("alloc");
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    if (dmc_linear(C, DMC_BF16, W, out, in, x, M, NULL, y, "ceil")) die("gemm");
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(a, C->stream);
        dmc_linear(C, DMC_BF16, W, out, in, x, M, NULL, y, "ceil");
        cudaEventRecord(b, C->stream);
        cudaEventSynchronize(b);
        double ms = elapsed_ms(a, b);
        best = ms < best ? ms : best;
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    dmc_free(C, W), dmc_free(C, x), dmc_free(C, y);
    return 2.0 * M * out * in / (best * 1e-3) / 1e12;
}

static int section_ceil(void)
{
    const size_t bytes = (size_t)2 << 30;
    void *src, *dst;
    double tbs = 0;
    if (!dmc_alloc(C, bytes, "copy", &src) && !dmc_alloc(C, bytes, "copy", &dst)) {
        cudaEvent_t a, b;
        cudaEventCreate(&a), cudaEventCreate(&b);
        cudaMemsetAsync(src, 1, bytes, C->stream);
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, C->stream);
        cudaEventRecord(a, C->stream);
        for (int r = 0; r < 5; r++) cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, C->stream);
        cudaEventRecord(b, C->stream);
        cudaEventSynchronize(b);
        tbs = 5.0 * 2 * bytes / (elapsed_ms(a, b) * 1e-3) / 1e12;
        cudaEventDestroy(a), cudaEventDestroy(b);
        dmc_free(C, src), dmc_free(C, dst);
    }
    printf("[ceil] device copy 2 GiB: %.2f TB/s (read + write)\n", tbs);
    const double big = time_linear(8192, 8192, 8192, quick ? 3 : 10);
    printf("[ceil] bf16 GEMM 8192^3 (pinned cuBLASLt, fp32 out): %.0f TFLOP/s\n", big);
    const shape sh[] = {
        {"XL adaLN 64x195840x1152", 64, 195840, 1152}, {"XL qkv", 16384, 3456, 1152},
        {"XL proj", 16384, 1152, 1152},               {"XL expert1 (4096 rows)", 4096, 9216, 1152},
        {"XL expert2", 4096, 1152, 4608},             {"XL shared1", 16384, 4608, 1152},
        {"XL shared2", 16384, 1152, 2304},            {"XL final", 16384, 32, 1152},
        {"G qkv", 65536, 4224, 1408},                 {"G proj", 65536, 1408, 1408},
        {"G expert1 (8192 rows)", 8192, 11264, 1408}, {"G expert2", 8192, 1408, 5632},
        {"G shared1", 65536, 5632, 1408},             {"G shared2", 65536, 1408, 2816},
    };
    const int n = quick ? 4 : (int)(sizeof sh / sizeof *sh);
    for (int i = 0; i < n; i++) {
        const double tf = time_linear(sh[i].out, sh[i].in, sh[i].M, quick ? 2 : 5);
        printf("[ceil] %-28s M %6d out %6d in %5d: %.0f TFLOP/s (%.0f %% of 8192^3)\n", sh[i].name,
               sh[i].M, sh[i].out, sh[i].in, tf, 100.0 * tf / (big > 0 ? big : 1));
    }
    printf("SUMMARY ceil: copy %.2f TB/s | bf16 8192^3 %.0f TFLOP/s\n", tbs, big);
    return 0;
}

#ifdef DMC_HAVE_SEAM
/* ---- the op table on random XL/G-shaped layers ---- */

typedef struct {
    int D, H, hd, E, F, Fs, T;
    dm_weight *qkv_w, *qkv_b, *gate, *qn_w, *qn_b, *kn_w, *kn_b;
    dm_weight **w1, **w2, *s1, *s2;
    dm_mlp_layer *experts, shared;
    dm_ffn_layer ffn;
} layer;

static dm_weight *wrand(dm_weight_role role, dm_weight_use use, int rows, int cols, float scale,
                        dm_dtype dt, const char *name)
{
    const size_t n = (size_t)rows * cols;
    void *h = malloc(n * (dt == DM_F32 ? 4 : 2));
    if (!h) die("host memory");
    for (size_t i = 0; i < n; i++) {
        const float v = frand() * scale + (use == DM_USE_VECTOR && strstr(name, "norm.w") ? 1.0f : 0.0f);
        if (dt == DM_F32) ((float *)h)[i] = v;
        else ((uint16_t *)h)[i] = dmc_host_f32_to_h16(v, dt == DM_F16 ? DMC_F16 : DMC_BF16);
    }
    dm_weight_desc d = {name, role, use, dt, rows, cols, h, 0, NULL};
    dm_weight *w;
    if (dmc_be_weight(C, &d, &w)) die(name);
    free(h);
    return w;
}

static void layer_make(layer *L, int D, int H, int E, int T, dm_dtype dt)
{
    memset(L, 0, sizeof *L);
    L->D = D, L->H = H, L->hd = D / H, L->E = E, L->F = 4 * D, L->Fs = 2 * D, L->T = T;
    const float s = 1.0f / sqrtf((float)D);
    L->qkv_w = wrand(DM_ROLE_ATTN, DM_USE_LINEAR, 3 * D, D, s, dt, "qkv.weight");
    L->qkv_b = wrand(DM_ROLE_NORM, DM_USE_VECTOR, 3 * D, 1, 0.02f, DM_F32, "qkv.bias");
    L->qn_w = wrand(DM_ROLE_NORM, DM_USE_VECTOR, L->hd, 1, 0.1f, DM_F32, "q_norm.weight");
    L->qn_b = wrand(DM_ROLE_NORM, DM_USE_VECTOR, L->hd, 1, 0.1f, DM_F32, "q_norm.bias");
    L->kn_w = wrand(DM_ROLE_NORM, DM_USE_VECTOR, L->hd, 1, 0.1f, DM_F32, "k_norm.weight");
    L->kn_b = wrand(DM_ROLE_NORM, DM_USE_VECTOR, L->hd, 1, 0.1f, DM_F32, "k_norm.bias");
    L->gate = wrand(DM_ROLE_ROUTER, DM_USE_LINEAR, E, D, s, DM_F32, "gate.weight");
    L->experts = calloc((size_t)E, sizeof *L->experts);
    L->w1 = calloc((size_t)E, sizeof *L->w1), L->w2 = calloc((size_t)E, sizeof *L->w2);
    for (int e = 0; e < E; e++) {
        L->w1[e] = wrand(DM_ROLE_EXPERT, DM_USE_LINEAR, 2 * L->F, D, s, dt, "expert.w1");
        L->w2[e] = wrand(DM_ROLE_EXPERT, DM_USE_LINEAR, D, L->F, 1.0f / sqrtf((float)L->F), dt, "expert.w2");
        L->experts[e] = (dm_mlp_layer){DM_MLP_SWIGLU, L->F, L->w1[e], NULL, L->w2[e], NULL};
    }
    L->s1 = wrand(DM_ROLE_SHARED, DM_USE_LINEAR, 2 * L->Fs, D, s, dt, "shared.w1");
    L->s2 = wrand(DM_ROLE_SHARED, DM_USE_LINEAR, D, L->Fs, 1.0f / sqrtf((float)L->Fs), dt, "shared.w2");
    L->shared = (dm_mlp_layer){DM_MLP_SWIGLU, L->Fs, L->s1, NULL, L->s2, NULL};
    L->ffn.d = (dm_moe_desc){DM_ROUTE_SOFTMAX_TOPK, E, 2, D, DM_GATE_IDENTITY, E};
    L->ffn.gate = L->gate;
    L->ffn.experts = L->experts;
    L->ffn.shared = L->shared;
}

static void layer_free(layer *L)
{
    dm_weight *all[] = {L->qkv_w, L->qkv_b, L->gate, L->qn_w, L->qn_b, L->kn_w, L->kn_b, L->s1, L->s2};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) dmc_be_weight_free(C, all[i]);
    for (int e = 0; e < L->E; e++) dmc_be_weight_free(C, L->w1[e]), dmc_be_weight_free(C, L->w2[e]);
    free(L->w1), free(L->w2), free(L->experts);
}

/* Run op `which` (0 linear qkv, 1 attention naive, 2 attention cuDNN, 3 ffn) on x [B*T, D]
 * (attention: x is qkv [B*T, 3D]); out: device. */
static dm_status run_op(layer *L, int which, const float *x, int B, float *out)
{
    const int N = B * L->T;
    if (which == 0) return dmc_be_linear(C, x, N, L->qkv_w, L->qkv_b, out);
    if (which == 1 || which == 2)
        return dmc_attention(C, which == 1 ? DMC_ATTN_NAIVE : DMC_ATTN_CUDNN, x, B, L->T, L->H,
                             L->hd, L->qn_w->p, L->qn_b->p, L->kn_w->p, L->kn_b->p, 1e-6f,
                             DMC_BF16, out);
    int64_t *lab = calloc((size_t)B, sizeof *lab);
    dm_status st = dmc_be_ffn(C, &L->ffn, x, N, L->T, lab, 1000, out, NULL);
    free(lab);
    return st;
}

static int section_inv(void)
{
    layer L;
    layer_make(&L, 1152, 16, 8, 256, DM_BF16);
    const char *names[] = {"linear qkv", "attention naive", "attention cuDNN", "MoE layer (P1)"};
    const int batches[] = {1, 2, 13, 64};
    int fails = 0, skipped = 0;
    for (int which = 0; which < 4; which++) {
        const int in_w = which == 1 || which == 2 ? 3 * L.D : L.D;
        const int out_w = which == 0 ? 3 * L.D : L.D;
        const size_t img_in = (size_t)L.T * in_w, img_out = (size_t)L.T * out_w;
        /* 64 + 64 random images: the probe image is image 0 of `pool` */
        float *pool = dev_random(128 * img_in, 1.0f, -1), *x, *y;
        if (dmc_alloc(C, 64 * img_in * 4, "inv", (void **)&x) || dmc_alloc(C, 64 * img_out * 4, "inv", (void **)&y))
            die("alloc");
        float *alone = malloc(img_out * 4), *got = malloc(img_out * 4);
        int ok = 1, skip = 0;
        for (size_t bi = 0; bi < sizeof batches / sizeof *batches && ok && !skip; bi++) {
            const int B = batches[bi], pos = (int)((bi * 7 + 3) % (size_t)B);
            for (int b = 0; b < B; b++) { /* neighbours differ per batch size */
                const int src = b == pos ? 0 : 1 + (int)((b + 11 * bi) % 127);
                cudaMemcpyAsync(x + b * img_in, pool + src * img_in, img_in * 4, cudaMemcpyDeviceToDevice, C->stream);
            }
            dm_status st = run_op(&L, which, x, B, y);
            if (st) {
                printf("[inv] %-18s B %2d: %s\n", names[which], B, dm_last_error());
                skip = which == 2, ok = which == 2 ? ok : 0;
                break;
            }
            dmc_download(C, bi == 0 ? alone : got, y + pos * img_out, img_out * 4, "inv");
            if (bi > 0) {
                const int eq = !memcmp(alone, got, img_out * 4);
                printf("[inv] %-18s image alone vs B %2d at position %2d: %s\n", names[which], B,
                       pos, eq ? "bitwise equal" : "DIFFERENT");
                ok &= eq;
            }
        }
        if (ok && !skip) { /* three repeated runs of the same batch */
            float *r0 = malloc(64 * img_out * 4), *r1 = malloc(64 * img_out * 4);
            for (int rep = 0; rep < 3 && ok; rep++) {
                if (run_op(&L, which, x, 64, y)) die(names[which]);
                dmc_download(C, rep ? r1 : r0, y, 64 * img_out * 4, "inv");
                if (rep) ok &= !memcmp(r0, r1, 64 * img_out * 4);
            }
            printf("[inv] %-18s 3 runs of B 64: %s\n", names[which], ok ? "bitwise equal" : "DIFFERENT");
            free(r0), free(r1);
        }
        fails += !ok;
        skipped += skip;
        dmc_free(C, pool), dmc_free(C, x), dmc_free(C, y);
        free(alone), free(got);
    }
    layer_free(&L);
    printf("SUMMARY inv: %d of 4 ops batch-invariant and run-to-run identical%s\n", 4 - fails - skipped,
           skipped ? " (cuDNN path skipped: no plan)" : "");
    return fails > 0;
}

/* ---- bench: one block's ops at several batch sizes ---- */

static int section_bench(void)
{
    const struct { const char *name; int D, H, E, T, L; dm_dtype dt; } models[] = {
        {"DiT-MoE-XL/2 256px", 1152, 16, 8, 256, 28, DM_F16},
        {"DiT-MoE-G/2 512px", 1408, 16, 16, 1024, 40, DM_F16},
    };
    const int B2s[] = {2, 16, 64, 128};
    for (int mi = 0; mi < 2; mi++) {
        layer L;
        layer_make(&L, models[mi].D, models[mi].H, models[mi].E, models[mi].T, models[mi].dt);
        const int D = L.D, T = L.T;
        for (size_t bi = 0; bi < sizeof B2s / sizeof *B2s; bi++) {
            const int B2 = B2s[bi], N = B2 * T;
            if (quick && B2 > 16) break;
            if (mi == 1 && B2 > 64) break; /* G: 16 GiB of activations at 128 */
            float *x = dev_random((size_t)N * D, 1.0f, -1), *mod = dev_random((size_t)B2 * 6 * D, 0.1f, -1);
            float *h, *qkv, *att, *y;
            if (dmc_alloc(C, (size_t)N * D * 4, "bench", (void **)&h) ||
                dmc_alloc(C, (size_t)N * 3 * D * 4, "bench", (void **)&qkv) ||
                dmc_alloc(C, (size_t)N * D * 4, "bench", (void **)&att) ||
                dmc_alloc(C, (size_t)N * D * 4, "bench", (void **)&y))
                die("alloc");
            cudaEvent_t ev[8];
            for (int i = 0; i < 8; i++) cudaEventCreate(&ev[i]);
            double t_ops[7] = {0};
            const int reps = quick ? 2 : 5;
            for (int r = -1; r < reps; r++) { /* r = -1: warm-up (plans, scratch) */
                cudaEventRecord(ev[0], C->stream);
                dmc_layernorm_mod(x, B2, T, D, 1e-6f, mod, mod + D, 6 * D, h, C->stream);
                cudaEventRecord(ev[1], C->stream);
                if (dmc_be_linear(C, h, N, L.qkv_w, L.qkv_b, qkv)) die("qkv");
                cudaEventRecord(ev[2], C->stream);
                if (dmc_attention(C, DMC_ATTN_AUTO, qkv, B2, T, L.H, L.hd, L.qn_w->p, L.qn_b->p,
                                  L.kn_w->p, L.kn_b->p, 1e-6f, DMC_F16, att))
                    die("attention");
                cudaEventRecord(ev[3], C->stream);
                if (dmc_be_linear(C, att, N, L.qkv_w, NULL, qkv)) die("proj"); /* proj-sized: D of 3D rows */
                cudaEventRecord(ev[4], C->stream);
                dmc_gated_add(x, att, B2, T, D, mod + 2 * D, 6 * D, C->stream);
                dmc_layernorm_mod(x, B2, T, D, 1e-6f, mod + 3 * D, mod + 4 * D, 6 * D, h, C->stream);
                cudaEventRecord(ev[5], C->stream);
                int64_t *lab = calloc((size_t)B2, sizeof *lab);
                if (dmc_be_ffn(C, &L.ffn, h, N, T, lab, 1000, y, NULL)) die("ffn");
                free(lab);
                cudaEventRecord(ev[6], C->stream);
                dmc_gated_add(x, y, B2, T, D, mod + 5 * D, 6 * D, C->stream);
                cudaEventRecord(ev[7], C->stream);
                cudaEventSynchronize(ev[7]);
                if (r < 0) continue;
                for (int i = 0; i < 7; i++) t_ops[i] += elapsed_ms(ev[i], ev[i + 1]) / reps;
            }
            /* proj ran with the qkv weight (3D outputs): count it as a D-output GEMM by scaling */
            t_ops[3] /= 3.0;
            double block = 0;
            for (int i = 0; i < 7; i++) block += t_ops[i];
            const double fl_attn = 4.0 * B2 * L.H * (double)T * T * L.hd;
            const double fl = 2.0 * N * D * (3.0 * D + D) + fl_attn +
                              2.0 * N * 2 * (3.0 * D * L.F) + 2.0 * N * 3.0 * D * L.Fs;
            const double tf = fl / (block * 1e-3) / 1e12;
            const double fwd_ms = block * models[mi].L; /* + adaLN, embed, final: < 3 % */
            const double imgs = B2 / 2.0 / (fwd_ms * 1e-3 * 50); /* RF-50 + CFG: B2 = 2 x images */
            printf("[bench] %s B2 %3d: block %.3f ms (LN %.3f qkv %.3f attn %.3f proj %.3f "
                   "add+LN %.3f moe %.3f add %.3f) = %.0f TFLOP/s; forward ~%.1f ms; RF-50+CFG ~%.2f img/s\n",
                   models[mi].name, B2, block, t_ops[0], t_ops[1], t_ops[2], t_ops[3], t_ops[4],
                   t_ops[5], t_ops[6], tf, fwd_ms, imgs);
            if (B2 == 64 || (quick && B2 == 16))
                printf("SUMMARY bench %s B2 %d: %.0f TFLOP/s per block, RF-50+CFG ~%.2f img/s (P1 library path)\n",
                       models[mi].name, B2, tf, imgs);
            for (int i = 0; i < 8; i++) cudaEventDestroy(ev[i]);
            dmc_free(C, x), dmc_free(C, mod), dmc_free(C, h), dmc_free(C, qkv), dmc_free(C, att), dmc_free(C, y);
        }
        layer_free(&L);
    }
    return 0;
}
#endif

int main(int argc, char **argv)
{
    const char *section = NULL;
    int device = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--section") && i + 1 < argc) section = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) device = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else section = NULL, i = argc;
    }
    if (!section) {
        fprintf(stderr, "usage: ditmoe-cuda-check --section probe|ceil|inv|bench [--device N] [--quick]\n");
        return 2;
    }
    char msg[320];
    if (dmc_device_probe(device, msg, sizeof msg) != 0) {
        printf("skipped: %s\n", msg);
        return 77;
    }
    dm_set_log_level(DM_LOG_INFO);
    if (dmc_ctx_create(device, &C)) die("context");
    int rc = 2;
    if (!strcmp(section, "probe")) rc = section_probe(device);
    else if (!strcmp(section, "ceil")) rc = section_ceil();
#ifdef DMC_HAVE_SEAM
    else if (!strcmp(section, "inv")) rc = section_inv();
    else if (!strcmp(section, "bench")) rc = section_bench();
#else
    else if (!strcmp(section, "inv") || !strcmp(section, "bench")) {
        printf("SUMMARY %s: skipped (this build has no backend op table: merge the backend seam)\n", section);
        rc = 0;
    }
#endif
    else fprintf(stderr, "ditmoe-cuda-check: unknown section '%s'\n", section);
    dmc_ctx_free(C);
    return rc;
}

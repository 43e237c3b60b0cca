/* bench_gemm: our GEMMs against OpenBLAS sgemm, both measured in this run on the same inputs.
 * Prints GFLOP/s and the ratio (own / OpenBLAS; > 1 = we are faster):
 *   1. the packed-weight GEMM (dm_linear_packed) on the shapes a DiT-MoE S/2 forward runs;
 *   2. the generic GEMM (dm_gemm, B in place) on the VAE attention / 1x1-conv products;
 *   3. the VAE's 3x3 convolution: our implicit-im2col dm_vae_conv2d against im2col + sgemm (the
 *      engine's path before it dropped OpenBLAS), SD-VAE shapes of a 256x256 decode;
 *   4. DiT attention (dm_attention) against per-(image, head) sgemm calls (the old path).
 *   build/bin/bench_gemm [threads] [sections, e.g. 1234]     (default 2, all)
 * Without OpenBLAS at build time the OpenBLAS columns are skipped. */
#include "backend/cpu/gemm.h"
#include "backend/cpu/ops.h"
#include "backend/cpu/vae_kernels.h"
#include "ditmoe.h"

#include <stdio.h>
#ifdef DITMOE_BENCH_OPENBLAS
#include <cblas.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

static double time_it(int reps, void (*fn)(void *), void *ctx)
{
    fn(ctx); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = dm_time_sec();
        fn(ctx);
        double t = dm_time_sec() - t0;
        if (t < best) best = t;
    }
    return best;
}

typedef struct {
    int M, K, N;
    float *x, *W, *y;
    dm_pmat P, H; /* float32 and bf16 packings */
} job_t;

static void run_blas(void *p)
{
    job_t *j = p;
#ifdef DITMOE_BENCH_OPENBLAS
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->M, j->N, j->K, 1.0f, j->x, j->K, j->W,
                j->K, 0.0f, j->y, j->N);
#else
    dm_linear(j->x, j->M, j->K, j->W, NULL, j->N, j->y);
#endif
}
static void run_own(void *p)
{
    job_t *j = p;
    dm_linear_packed(j->x, j->M, &j->P, NULL, j->y);
}
static void run_own_bf16(void *p)
{
    job_t *j = p;
    dm_linear_packed(j->x, j->M, &j->H, NULL, j->y);
}

/* ---- 2. generic GEMM: C [M, N] = A [M, K] · B [K, N], B row-major in place ---------------- */
typedef struct {
    int M, K, N;
    float *A, *B, *C;
} gjob_t;
#ifdef DITMOE_BENCH_OPENBLAS
static void g_blas(void *p)
{
    gjob_t *j = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->M, j->N, j->K, 1.0f, j->A, j->K,
                j->B, j->N, 0.0f, j->C, j->N);
}
#endif
static void g_own(void *p)
{
    gjob_t *j = p;
    dm_gemm(j->A, (size_t)j->K, j->M, j->K, (dm_gemm_b){j->B, (size_t)j->N}, j->N, j->C,
            (size_t)j->N, NULL, 1);
}

static float *fill(size_t n, unsigned seed)
{
    float *p = malloc(sizeof(float) * (n ? n : 1));
    if (!p) exit(1);
    for (size_t i = 0; i < n; i++) p[i] = (float)(((i + seed) * 7919u) % 1000u) / 1000.0f - 0.5f;
    return p;
}

static void print_row(const char *name, double gf, double tb, double to)
{
    if (tb > 0)
        printf("%-30s %10.1f %10.1f %8.2f\n", name, gf / tb, gf / to, tb / to);
    else
        printf("%-30s %10s %10.1f %8s\n", name, "-", gf / to, "-");
}

static void section_gemm(void)
{
    /* (M, K, N): VAE attention scores q^T k and P v^T at a 32x32 latent (C 512, N 1024), its
     * projections, and a 1x1 shortcut conv at 256x256 (256 -> 128 channels). */
    const int shapes[][3] = {{1024, 512, 1024}, {1024, 1024, 512}, {512, 512, 1024},
                             {128, 256, 65536}};
    printf("\n%-30s %10s %10s %8s\n", "dm_gemm M x K x N", "BLAS GF/s", "own GF/s", "own/BLAS");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        gjob_t j = {shapes[s][0], shapes[s][1], shapes[s][2], NULL, NULL, NULL};
        j.A = fill((size_t)j.M * j.K, 1), j.B = fill((size_t)j.K * j.N, 2);
        j.C = fill((size_t)j.M * j.N, 3);
        double tb = 0;
#ifdef DITMOE_BENCH_OPENBLAS
        tb = time_it(3, g_blas, &j);
#endif
        double to = time_it(3, g_own, &j);
        char name[48];
        snprintf(name, sizeof name, "%dx%dx%d", j.M, j.K, j.N);
        print_row(name, 2.0 * j.M * j.K * j.N / 1e9, tb, to);
        free(j.A), free(j.B), free(j.C);
    }
}

/* ---- 3. VAE 3x3 convolution ------------------------------------------------------------------ */
typedef struct {
    int Cin, Cout, H, W;
    float *x, *w, *b, *col, *out;
} cjob_t;
#ifdef DITMOE_BENCH_OPENBLAS
/* im2col of the whole image into col [Cin*9, H*W], then one sgemm (bias first, beta = 1). */
static void c_blas(void *p)
{
    cjob_t *j = p;
    const int H = j->H, W = j->W, HW = H * W, K = j->Cin * 9;
#pragma omp parallel for schedule(static)
    for (int ci = 0; ci < j->Cin; ci++)
        for (int ky = 0; ky < 3; ky++)
            for (int kx = 0; kx < 3; kx++) {
                float *d = j->col + ((size_t)ci * 9 + ky * 3 + kx) * HW;
                for (int y = 0; y < H; y++)
                    for (int x = 0; x < W; x++) {
                        int iy = y + ky - 1, ix = x + kx - 1;
                        d[(size_t)y * W + x] = iy >= 0 && iy < H && ix >= 0 && ix < W ?
                                                   j->x[((size_t)ci * H + iy) * W + ix] : 0.0f;
                    }
            }
#pragma omp parallel for schedule(static)
    for (int co = 0; co < j->Cout; co++)
        for (int i = 0; i < HW; i++) j->out[(size_t)co * HW + i] = j->b[co];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->Cout, HW, K, 1.0f, j->w, K, j->col,
                HW, 1.0f, j->out, HW);
}
#endif
static void c_own(void *p)
{
    cjob_t *j = p;
    dm_vae_conv2d(j->x, j->Cin, j->H, j->W, j->w, j->b, j->Cout, 3, j->col, j->out);
}

static void section_conv(void)
{
    /* (Cin, Cout, H, W) of the SD-VAE decoder at 256x256 output */
    const int shapes[][4] = {{512, 512, 32, 32},    {512, 512, 64, 64},  {256, 256, 128, 128},
                             {512, 256, 128, 128},  {256, 256, 256, 256}, {256, 128, 256, 256},
                             {128, 128, 256, 256}};
    printf("\n%-30s %10s %10s %8s\n", "conv3x3 Cin->Cout @HxW", "BLAS GF/s", "own GF/s",
           "own/BLAS");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        cjob_t j = {shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], 0, 0, 0, 0, 0};
        const size_t HW = (size_t)j.H * j.W, K = (size_t)j.Cin * 9;
        j.x = fill((size_t)j.Cin * HW, 1), j.w = fill((size_t)j.Cout * K, 2);
        j.b = fill((size_t)j.Cout, 3), j.out = fill((size_t)j.Cout * HW, 4);
        size_t cs = dm_vae_conv_col_size(j.Cin, j.H, j.W, 3);
        j.col = fill(cs > K * HW ? cs : K * HW, 5);
        double tb = 0;
#ifdef DITMOE_BENCH_OPENBLAS
        tb = time_it(2, c_blas, &j);
#endif
        double to = time_it(2, c_own, &j);
        char name[48];
        snprintf(name, sizeof name, "%d->%d @%dx%d", j.Cin, j.Cout, j.H, j.W);
        print_row(name, 2.0 * j.Cout * K * HW / 1e9, tb, to);
        free(j.x), free(j.w), free(j.b), free(j.col), free(j.out);
    }
}

/* ---- 4. DiT attention ------------------------------------------------------------------------ */
typedef struct {
    int B, T, H, hd;
    float *qkv, *out;
} ajob_t;
#ifdef DITMOE_BENCH_OPENBLAS
static void a_blas(void *p)
{
    ajob_t *j = p;
    const int T = j->T, H = j->H, hd = j->hd, D = H * hd;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * T * T);
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < j->B * H; bh++) {
            const int b = bh / H, h = bh % H;
            const float *rows = j->qkv + (size_t)b * T * 3 * D;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, rows + h * hd,
                        3 * D, rows + D + h * hd, 3 * D, 0.0f, s, T);
            dm_softmax_rows(s, T, T);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, s, T,
                        rows + 2 * D + h * hd, 3 * D, 0.0f, j->out + (size_t)b * T * D + h * hd, D);
        }
        free(s);
    }
}
#endif
static void a_own(void *p)
{
    ajob_t *j = p;
    if (dm_attention(j->qkv, j->B, j->T, j->H, j->hd, NULL, j->out)) exit(1);
}

static void section_attention(void)
{
    /* (B, T, H, hd): S/2 at batch 2 and 16 with guidance (4 / 32 images), XL/2-like heads */
    const int shapes[][4] = {{4, 256, 6, 64}, {32, 256, 6, 64}, {4, 256, 16, 72}};
    printf("\n%-30s %10s %10s %8s\n", "attention B,T,H,hd", "BLAS GF/s", "own GF/s", "own/BLAS");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        ajob_t j = {shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], NULL, NULL};
        const size_t D = (size_t)j.H * j.hd;
        j.qkv = fill((size_t)j.B * j.T * 3 * D, 1), j.out = fill((size_t)j.B * j.T * D, 2);
        double tb = 0;
#ifdef DITMOE_BENCH_OPENBLAS
        tb = time_it(3, a_blas, &j);
#endif
        double to = time_it(3, a_own, &j);
        char name[48];
        snprintf(name, sizeof name, "%d,%d,%d,%d", j.B, j.T, j.H, j.hd);
        print_row(name, 4.0 * j.B * j.H * (double)j.T * j.T * j.hd / 1e9, tb, to);
        free(j.qkv), free(j.out);
    }
}

int main(int argc, char **argv)
{
    dm_set_threads(argc > 1 ? atoi(argv[1]) : 2);
    const char *sec = argc > 2 ? argv[2] : "1234";
#ifndef DITMOE_BENCH_OPENBLAS
    printf("(built without OpenBLAS: own figures only)\n");
#endif
    if (strchr(sec, '2')) section_gemm();
    if (strchr(sec, '3')) section_conv();
    if (strchr(sec, '4')) section_attention();
    if (!strchr(sec, '1')) return 0;
    printf("\n");
    /* (rows, in, out): one expert's gate+up and down at batch 2 / 16 with guidance, qkv, adaLN */
    const int shapes[][3] = {{256, 384, 3072}, {2048, 384, 3072}, {256, 1536, 384},
                             {2048, 1536, 384}, {1024, 384, 1152}, {4, 384, 2304}};
    printf("%-20s %10s %10s %10s %8s %8s\n", "M x K -> N", "BLAS GF/s", "own GF/s", "bf16 GF/s",
           "own/BLAS", "bf16/BLAS");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        job_t j = {.M = shapes[s][0], .K = shapes[s][1], .N = shapes[s][2]};
        j.x = malloc(sizeof(float) * j.M * j.K);
        j.W = malloc(sizeof(float) * j.N * j.K);
        j.y = malloc(sizeof(float) * j.M * j.N);
        for (long i = 0; i < (long)j.M * j.K; i++) j.x[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
        for (long i = 0; i < (long)j.N * j.K; i++) j.W[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
        if (dm_pmat_pack(&j.P, j.W, j.N, j.K)) return 1;
        uint16_t *h = malloc(sizeof(uint16_t) * j.N * j.K);
        for (long i = 0; i < (long)j.N * j.K; i++) h[i] = dm_f32_to_bf16(j.W[i]);
        if (dm_pmat_pack_half(&j.H, h, DM_BF16, j.N, j.K)) return 1;
        free(h);
        int reps = 5;
        double tb = time_it(reps, run_blas, &j), to = time_it(reps, run_own, &j);
        double th = time_it(reps, run_own_bf16, &j);
        double gf = 2.0 * j.M * j.K * j.N / 1e9;
        char name[32];
        snprintf(name, sizeof name, "%dx%d->%d", j.M, j.K, j.N);
        printf("%-20s %10.1f %10.1f %10.1f %8.2f %8.2f\n", name, gf / tb, gf / to, gf / th, tb / to,
               tb / th);
        dm_pmat_free(&j.P);
        dm_pmat_free(&j.H);
        free(j.x), free(j.W), free(j.y);
    }
    return 0;
}

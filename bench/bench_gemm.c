/* bench_gemm: our packed GEMM (dm_linear_packed) against OpenBLAS sgemm on the shapes a DiT-MoE
 * S/2 forward runs, both measured in this run on the same inputs. Prints GFLOP/s and the ratio.
 *   build/bin/bench_gemm [threads]     (default 2) */
#include "backend/cpu/ops.h"
#include "ditmoe.h"

#include <stdio.h>
#ifdef DITMOE_BENCH_OPENBLAS
#include <cblas.h>
#endif
#include <stdlib.h>

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

int main(int argc, char **argv)
{
    dm_set_threads(argc > 1 ? atoi(argv[1]) : 2);
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

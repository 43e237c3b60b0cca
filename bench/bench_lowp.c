/* bench_lowp: the low-precision GEMMs (backend/cpu/lowp.h) against our float32 packed GEMM
 * (dm_linear_packed), all measured in this run on the same inputs, on DiT-MoE S/2 shapes (D = 384)
 * at 2 and 16 images of 256 tokens. Prints GFLOP/s (2 N in out / time, the activation rounding or
 * quantisation included), the speed-up over f32, and the fraction of this CPU's peak for the
 * instruction each kernel uses, the peak measured here by a register-only loop (16 independent
 * accumulators per thread, all threads) of vfmadd231ps / vdpbf16ps / vpdpbusd.
 *   build/bin/bench_lowp [threads] [reps]     (defaults 2, 5; 1 thread: timed in thread CPU time)
 *   DITMOE_CPU_FEATURES=generic build/bin/bench_lowp   (the portable paths)
 * Columns: f32 = dm_linear_packed; bf16 / int8 = the AVX512-BF16 / VNNI kernels (AMX masked off);
 * "AMX" = the same format through the AMX tiles; int4 = VNNI; W8A32 = an experiment (below). */
#include "backend/cpu/lowp.h"
#include "backend/cpu/ops.h"
#include "ditmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* With one thread the clock is the thread's CPU time: on a shared machine that leaves out the
 * time the thread waited for a core (not what a VM host steals). With more threads, wall time. */
static int g_cpu_clock = 0;
static double now(void)
{
    if (!g_cpu_clock) return dm_time_sec();
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1
#endif

/* ---- peaks: one dependency-free loop per instruction on every thread, in short bursts taken in
 * turn (the machine is shared, so its capacity moves; the best burst of each is kept) ---------- */
#define BURST 4000000L
#ifdef X86
__attribute__((target("avx512f"))) static double burst_fma(void)
{
    __m512 a[16], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < BURST / 16; it++)
        for (int i = 0; i < 16; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    __m512 s = a[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, a[i]);
    return _mm512_reduce_add_ps(s);
}
__attribute__((target("avx512f,avx512bf16"))) static double burst_bf16(void)
{
    __m512 a[16];
    const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), w = (__m512bh)_mm512_set1_epi32(0x33d633d6);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < BURST / 16; it++)
        for (int i = 0; i < 16; i++) a[i] = _mm512_dpbf16_ps(a[i], x, w);
    __m512 s = a[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, a[i]);
    return _mm512_reduce_add_ps(s);
}
__attribute__((target("avx512f,avx512vnni"))) static double burst_vnni(void)
{
    __m512i a[16];
    const __m512i x = _mm512_set1_epi32(0x01010101), w = _mm512_set1_epi32(0x01ff01ff);
    for (int i = 0; i < 16; i++) a[i] = _mm512_set1_epi32(i);
    for (long it = 0; it < BURST / 16; it++)
        for (int i = 0; i < 16; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, w);
    __m512i s = a[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_epi32(s, a[i]);
    return (double)_mm512_reduce_add_epi32(s);
}

/* AMX: 4 independent C tiles, operands loaded once; per instruction 16 x 16 x 64 int8 MACs or
 * 16 x 16 x 32 bf16 MACs. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg;
static unsigned char g_tiles[4][1024] __attribute__((aligned(64)));
__attribute__((target("amx-tile"))) static void amx_cfg_load(void)
{
    amx_cfg c = {.palette = 1};
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    /* not _tile_loadconfig: GCC 12 declares its operand as 8 bytes, so the stores of the rest
     * of the 64-byte config can be dropped as dead (seen in a -march=x86-64 build) */
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}
#define AMX_BURST (BURST / 16)
__attribute__((target("amx-tile,amx-int8"))) static double burst_amx_int8(void)
{
    amx_cfg_load();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, g_tiles[0], 64); _tile_loadd(5, g_tiles[1], 64);
    _tile_loadd(6, g_tiles[2], 64); _tile_loadd(7, g_tiles[3], 64);
    for (long it = 0; it < AMX_BURST / 4; it++) {
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    int32_t out[256];
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}
__attribute__((target("amx-tile,amx-bf16"))) static double burst_amx_bf16(void)
{
    amx_cfg_load();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, g_tiles[0], 64); _tile_loadd(5, g_tiles[1], 64);
    _tile_loadd(6, g_tiles[2], 64); _tile_loadd(7, g_tiles[3], 64);
    for (long it = 0; it < AMX_BURST / 4; it++) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    float out[256];
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}
#endif

/* GFLOP/s of one burst over all threads; flop_per_inst counts a multiply-add as 2. */
static double burst_n(double (*fn)(void), double flop_per_inst, long n)
{
    volatile double sink = 0;
    double t0 = now();
#pragma omp parallel reduction(+ : sink)
    sink += fn();
    double t = now() - t0;
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    (void)sink;
    return (double)n * nt * flop_per_inst / t / 1e9;
}
static double burst(double (*fn)(void), double flop_per_inst)
{
    return burst_n(fn, flop_per_inst, BURST);
}

/* ---- GEMMs ----------------------------------------------------------------------------------- */
/* ---- experiment: int8 weights dequantised to fp32 in registers (W8A32), for the record --------
 * The alternative to W8A8 dot products: weights int8 [np][in][32] with a per-column scale,
 * activations stay float32, each k: 32 int8 -> 2 x 16 fp32 (vpmovsxbd + vcvtdq2ps), 8 rows x 2
 * FMAs, scale applied at the end. Not a library kernel (no reference, no portable twin). */
typedef struct {
    int out, in, np;
    int8_t *w;   /* [np][in][32] */
    float *s;    /* [np*32] */
} w8mat;
static int w8_pack(w8mat *m, const float *W, int out, int in)
{
    m->out = out, m->in = in, m->np = (out + 31) / 32;
    m->w = aligned_alloc(64, ((size_t)m->np * in * 32 + 63) / 64 * 64);
    m->s = calloc((size_t)m->np * 32, sizeof(float));
    if (!m->w || !m->s) return -1;
    memset(m->w, 0, (size_t)m->np * in * 32);
    for (int o = 0; o < out; o++) {
        float amax = 0;
        for (int i = 0; i < in; i++) amax = fabsf(W[(size_t)o * in + i]) > amax ? fabsf(W[(size_t)o * in + i]) : amax;
        const float sc = amax / 127.0f;
        m->s[o] = sc;
        for (int i = 0; i < in && sc > 0; i++)
            m->w[((size_t)(o / 32) * in + i) * 32 + o % 32] = (int8_t)rintf(W[(size_t)o * in + i] / sc);
    }
    return 0;
}
#ifdef X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) static void
w8_tile(const float *A, int K, int m, const int8_t *wp, const float *sc, float *C, int ldc, int nc)
{
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(wp + (size_t)k * 32));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        for (int r = 0; r < 8; r++)
            if (r < m) {
                const __m512 a = _mm512_set1_ps(A[(size_t)r * K + k]);
                acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
            }
    }
    const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
    const __mmask16 m0 = nc >= 16 ? 0xffff : (__mmask16)((1u << nc) - 1);
    const __mmask16 m1 = nc >= 32 ? 0xffff : nc <= 16 ? 0 : (__mmask16)((1u << (nc - 16)) - 1);
    for (int r = 0; r < m; r++) {
        _mm512_mask_storeu_ps(C + (size_t)r * ldc, m0, _mm512_mul_ps(acc[r][0], s0));
        _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16, m1, _mm512_mul_ps(acc[r][1], s1));
    }
}
static void w8_linear(const float *x, int N, const w8mat *W, float *y)
{
    const int mt = (N + 7) / 8;
#pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < W->np; j++) {
            const int m = N - i * 8 < 8 ? N - i * 8 : 8;
            const int nc = W->out - j * 32 < 32 ? W->out - j * 32 : 32;
            w8_tile(x + (size_t)i * 8 * W->in, W->in, m, W->w + (size_t)j * W->in * 32, W->s + j * 32,
                    y + (size_t)i * 8 * W->out + j * 32, W->out, nc);
        }
}
#endif

/* The kernels on one shape, taken in turn `reps` times after a warm-up; best time of each.
 * Kernel k: 0 f32 packed; then dm_lp_linear on L[fmt[k]] with the CPU features forced to mask[k]. */
#define NK 7
static const char *KNAME[NK] = {"f32", "bf16", "bf16 AMX", "int8", "int8 AMX", "int4", "W8A32 dequant"};
static const int KFMT[NK] = {-1, 0, 0, 1, 1, 2, -1};
static int time_shape(const float *x, int N, const dm_pmat *P, dm_lpmat L[3], const w8mat *Q,
                      float *y, int reps, const unsigned mask[NK], const int on[NK], double best[NK])
{
    for (int k = 0; k < NK; k++) best[k] = 1e30;
    for (int r = 0; r <= reps; r++)
        for (int k = 0; k < NK; k++) {
            if (!on[k]) continue;
            dm_cpu_force_features(mask[k]);
            double t0 = now();
            if (k == 0) dm_linear_packed(x, N, P, NULL, y);
#ifdef X86
            else if (k == 6) w8_linear(x, N, Q, y);
#endif
            else if (dm_lp_linear(x, N, &L[KFMT[k]], NULL, y) != DM_OK) return -1;
            double t = now() - t0;
            if (r > 0 && t < best[k]) best[k] = t;
        }
    dm_cpu_force_features(DM_CPU_DETECT);
    return 0;
}

int main(int argc, char **argv)
{
    const int threads = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 5;
    dm_set_threads(threads);
    g_cpu_clock = threads == 1;
    const unsigned feat = dm_cpu_features();
    double pk_fma = 0, pk_bf16 = 0, pk_vnni = 0, pk_amxb = 0, pk_amxi = 0;
#ifdef X86
    for (int r = 0; r < 40; r++) {
        double v;
        if ((feat & DM_CPU_AVX512) && (v = burst(burst_fma, 32)) > pk_fma) pk_fma = v;
        if ((feat & DM_CPU_AVX512_BF16) && (v = burst(burst_bf16, 64)) > pk_bf16) pk_bf16 = v;
        if ((feat & DM_CPU_AVX512_VNNI) && (v = burst(burst_vnni, 128)) > pk_vnni) pk_vnni = v;
        if ((feat & DM_CPU_AMX_BF16) && (v = burst_n(burst_amx_bf16, 16384, AMX_BURST)) > pk_amxb) pk_amxb = v;
        if ((feat & DM_CPU_AMX_INT8) && (v = burst_n(burst_amx_int8, 32768, AMX_BURST)) > pk_amxi) pk_amxi = v;
    }
#endif
    const double pk[NK] = {pk_fma, pk_bf16, pk_amxb, pk_vnni, pk_amxi, pk_vnni, pk_fma};
    const unsigned vec = feat & (DM_CPU_AVX512 | DM_CPU_AVX512_BF16 | DM_CPU_AVX512_VNNI);
    const unsigned mask[NK] = {feat, vec, feat, vec, feat, feat, feat};
    const int on[NK] = {1, 1, (feat & DM_CPU_AMX_BF16) != 0, 1, (feat & DM_CPU_AMX_INT8) != 0, 1,
                        (feat & DM_CPU_AVX512) != 0};
    printf("threads %d, CPU features used: %s, clock: %s\n", threads, dm_cpu_features_string(feat),
           g_cpu_clock ? "thread CPU time" : "wall");
    printf("peak (register-only loop, all threads, best of 40 bursts), GFLOP/s (int: GOP/s): fp32 FMA "
           "%.0f, vdpbf16ps %.0f, vpdpbusd %.0f, AMX tdpbf16ps %.0f, AMX tdpbusd %.0f\n",
           pk_fma, pk_bf16, pk_vnni, pk_amxb, pk_amxi);
    printf("each cell: GFLOP/s (x f32 in the same run, %% of that instruction's peak)\n");
    static const struct {
        const char *name;
        int in, out;
    } shapes[] = {{"qkv", 384, 1152},      {"proj", 384, 384}, {"expert w1 (2x1536)", 384, 3072},
                  {"expert w2", 1536, 384}, {"adaLN", 384, 2304}};
    static const int Ns[] = {2 * 256, 16 * 256};
    printf("%-19s %5s", "shape", "N");
    for (int k = 0; k < NK; k++)
        if (on[k]) printf(" | %-20s", KNAME[k]);
    printf("\n");
    for (size_t n = 0; n < sizeof Ns / sizeof *Ns; n++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            const int N = Ns[n], in = shapes[s].in, out = shapes[s].out;
            float *x = malloc(sizeof(float) * N * in), *W = malloc(sizeof(float) * out * in);
            float *y = malloc(sizeof(float) * N * out);
            for (long i = 0; i < (long)N * in; i++) x[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
            for (long i = 0; i < (long)out * in; i++) W[i] = ((float)((i * 104729) % 1000) / 1000.0f - 0.5f) * 0.05f;
            dm_pmat P;
            dm_lpmat L[3];
            if (dm_pmat_pack(&P, W, out, in)) return 1;
            const dm_lp_format fm[3] = {DM_LP_BF16, DM_LP_Q8, DM_LP_Q4};
            for (int f = 0; f < 3; f++)
                if (dm_lp_pack(&L[f], fm[f], W, DM_F32, out, in, shapes[s].name) != DM_OK) {
                    fprintf(stderr, "%s\n", dm_last_error());
                    return 1;
                }
            double t[NK];
            w8mat Q;
            if (w8_pack(&Q, W, out, in)) return 1;
            if (time_shape(x, N, &P, L, &Q, y, reps, mask, on, t)) {
                fprintf(stderr, "%s\n", dm_last_error());
                return 1;
            }
            const double gf = 2.0 * N * in * out / 1e9;
            printf("%-19s %5d", shapes[s].name, N);
            for (int k = 0; k < NK; k++)
                if (on[k])
                    printf(" | %7.1f (%5.2fx %3.0f%%)", gf / t[k], t[0] / t[k],
                           pk[k] > 0 ? 100.0 * gf / t[k] / pk[k] : 0.0);
            printf("\n");
            for (int f = 0; f < 3; f++) dm_lp_free(&L[f]);
            free(Q.w), free(Q.s);
            dm_pmat_free(&P);
            free(x), free(W), free(y);
        }
    return 0;
}

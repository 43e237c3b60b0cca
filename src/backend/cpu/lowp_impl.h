/* Internal to the low-precision kernels (lowp.c, gemm_bf16.c, gemm_q8.c, gemm_q4.c). */
#ifndef DM_BACKEND_CPU_LOWP_IMPL_H
#define DM_BACKEND_CPU_LOWP_IMPL_H

#include "backend/cpu/lowp.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define DM_LP_X86 1
/* Every AVX512 kernel function carries this (plus bf16 / vnni), so the library can be built for a
 * generic x86-64 and still use them where cpuid says they run. */
#define DM_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma"
#include <immintrin.h>

/* The columns of one 32-wide output panel of which nc are valid: the two lane masks, and the
 * bias loaded under them (zeros without a bias). Shared by every AVX512 tile epilogue. */
typedef struct {
    __mmask16 m0, m1;
    __m512 b0, b1;
} dm_lp_tail;
__attribute__((target(DM_TARGET_AVX512))) static inline dm_lp_tail dm_lp_tail_of(int nc,
                                                                                 const float *bias)
{
    dm_lp_tail t;
    t.m0 = nc >= 16 ? 0xffff : (__mmask16)((1u << nc) - 1);
    t.m1 = nc >= 32 ? 0xffff : nc <= 16 ? 0 : (__mmask16)((1u << (nc - 16)) - 1);
    t.b0 = bias ? _mm512_maskz_loadu_ps(t.m0, bias) : _mm512_setzero_ps();
    t.b1 = bias ? _mm512_maskz_loadu_ps(t.m1, bias + 16) : _mm512_setzero_ps();
    return t;
}

/* AMX: 8 tiles of 16 rows x 64 bytes (palette 1), the configuration every AMX block uses. Not
 * _tile_loadconfig: GCC 12 declares its operand as 8 bytes, so the stores of the rest of the
 * 64-byte config can be dropped as dead (seen in a -march=x86-64 build). */
__attribute__((target("amx-tile"))) static inline void dm_amx_begin(void)
{
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed)) c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}
__attribute__((target("amx-tile"))) static inline void dm_amx_end(void) { _tile_release(); }
#endif

/* 64-byte GCC vectors are passed between inline helpers only; their ABI note does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

/* Portable 16-lane vectors (GCC vector extensions); unaligned by declaration. */
typedef float dm_v16f __attribute__((vector_size(64), aligned(4)));
typedef uint32_t dm_v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t dm_v16i __attribute__((vector_size(64), aligned(4)));

static inline float dm_lp_bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Packing, per format: W is float32 [out, in]; m->fmt/out/in/np already set. */
dm_status dm_lp_pack_bf16(dm_lpmat *m, const float *W);
dm_status dm_lp_pack_q8(dm_lpmat *m, const float *W);
dm_status dm_lp_pack_q4(dm_lpmat *m, const float *W);

/* The GEMMs over converted activations (feat: the CPU features they may use; every path gives
 * the same bits).
 *   bf16: xb [N][kb] bf16 pairs;  q8 / q4: xu [ceil(N/32)*32][ceil(in/4)*4] activations + 128
 *   (pad rows and columns 128, i.e. zero), sx [N] scales. */
void dm_lp_gemm_bf16(const uint32_t *xb, int N, const dm_lpmat *W, const float *b, float *y,
                     unsigned feat);
void dm_lp_gemm_q8(const uint8_t *xu, const float *sx, int N, const dm_lpmat *W, const float *b,
                   float *y, unsigned feat);
void dm_lp_gemm_q4(const uint8_t *xu, const float *sx, int N, const dm_lpmat *W, const float *b,
                   float *y, unsigned feat);

#endif

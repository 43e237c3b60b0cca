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

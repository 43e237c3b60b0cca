/* Low-precision GEMM front end (lowp.h): packing from any source dtype, activation rounding /
 * quantisation, dispatch to the AVX512 or portable kernels, and the plain references. */
#include "backend/cpu/lowp_impl.h"

#include <math.h>
#include <stdlib.h>
#ifdef DM_LP_X86
#include <immintrin.h>
#endif

const char *dm_lp_format_name(dm_lp_format f)
{
    switch (f) {
    case DM_LP_BF16: return "bf16";
    case DM_LP_Q8: return "int8";
    case DM_LP_Q4: return "int4";
    default: return "?";
    }
}

int dm_lp_format_from_name(const char *s, dm_lp_format *out)
{
    for (int f = 0; f < DM_LP_COUNT; f++)
        if (s && !strcmp(s, dm_lp_format_name((dm_lp_format)f))) {
            *out = (dm_lp_format)f;
            return 0;
        }
    return -1;
}

uint16_t dm_lp_bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    uint16_t h = (uint16_t)(u >> 16);
    if ((h & 0x7f80u) == 0) h &= 0x8000u; /* denormal: vdpbf16ps reads it as zero (DAZ) */
    return h;
}

float dm_lp_quant_row(const float *x, int in, uint8_t *u)
{
    if (in <= 0) return 0.0f;
    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < in; i++) {
        float a = fabsf(x[i]);
        finite &= a <= 3.4028235e38f; /* false for inf and NaN */
        amax = a > amax ? a : amax;
    }
    if (!finite || amax == 0.0f) {
        memset(u, 128, (size_t)in);
        return finite ? 0.0f : NAN; /* NaN scale: the row's outputs become NaN, as in float32 */
    }
    const float inv = 127.0f / amax;
    for (int i = 0; i < in; i++) {
        float q = rintf(x[i] * inv);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        u[i] = (uint8_t)((int)q + 128);
    }
    return amax / 127.0f;
}

/* Row converters: the portable ones above, and AVX512 ones that give the same bits (the same
 * IEEE operations: |x| max, one float division, x * inv rounded to nearest even, the same integer
 * bit trick for bf16); test_lowp checks the whole GEMM output both ways. */
static void bf16_row(const float *x, int in, uint32_t *o)
{
    for (int k = 0; k < in / 2; k++)
        o[k] = (uint32_t)dm_lp_bf16_rne(x[2 * k]) | (uint32_t)dm_lp_bf16_rne(x[2 * k + 1]) << 16;
    if (in % 2) o[in / 2] = dm_lp_bf16_rne(x[in - 1]);
}

#ifdef DM_LP_X86
#define TGT __attribute__((target(DM_TARGET_AVX512)))
TGT static inline __m512i bf16_rne16(__m512 v) /* 16 floats -> 16 bf16 in the low halves */
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 den = _mm512_testn_epi32_mask(r, _mm512_set1_epi32(0x7f80));
    return _mm512_mask_and_epi32(r, den, r, _mm512_set1_epi32(0x8000));
}

TGT static void bf16_row_avx512(const float *x, int in, uint32_t *o)
{
    uint16_t *h = (uint16_t *)o; /* x86 is little-endian: pair k = h[2k] | h[2k+1] << 16 */
    for (int i = 0; i < in; i += 16) {
        const __mmask16 m = in - i >= 16 ? 0xffff : (__mmask16)((1u << (in - i)) - 1);
        const __m512i r = bf16_rne16(_mm512_maskz_loadu_ps(m, x + i));
        _mm256_mask_storeu_epi16(h + i, m, _mm512_cvtepi32_epi16(r));
    }
    if (in % 2) h[in] = 0;
}

TGT static float quant_row_avx512(const float *x, int in, uint8_t *u)
{
    if (in <= 0) return 0.0f;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int i = 0; i < in; i += 16) {
        const __mmask16 m = in - i >= 16 ? 0xffff : (__mmask16)((1u << (in - i)) - 1);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i));
        bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ);
        mx = _mm512_max_ps(mx, a);
    }
    const float amax = _mm512_reduce_max_ps(mx);
    if (bad || amax == 0.0f) {
        memset(u, 128, (size_t)in);
        return bad ? NAN : 0.0f;
    }
    const float inv = 127.0f / amax;
    const __m512 vi = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int i = 0; i < in; i += 16) {
        const __mmask16 m = in - i >= 16 ? 0xffff : (__mmask16)((1u << (in - i)) - 1);
        __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vi),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
        _mm_mask_storeu_epi8(u + i, m, _mm512_cvtepi32_epi8(qi));
    }
    return amax / 127.0f;
}
#endif

dm_status dm_lp_pack(dm_lpmat *m, dm_lp_format fmt, const void *W, dm_dtype dtype, int out, int in,
                     const char *name)
{
    memset(m, 0, sizeof *m);
    if (!name) name = "weight";
    if (fmt < 0 || fmt >= DM_LP_COUNT) return dm_fail(DM_ERR_ARG, "%s: unknown low-precision format", name);
    if (out <= 0 || in <= 0 || (size_t)out * (size_t)in > ((size_t)1 << 40))
        return dm_fail(DM_ERR_ARG, "%s: bad shape [%d, %d] for %s packing", name, out, in,
                       dm_lp_format_name(fmt));
    if (fmt == DM_LP_Q4 && in % DM_Q4_GROUP)
        return dm_fail(DM_ERR_ARG,
                       "%s: int4 needs the input width to be a multiple of %d (groups of %d with "
                       "one scale each); shape [%d, %d] has %d",
                       name, DM_Q4_GROUP, DM_Q4_GROUP, out, in, in);
    if (dtype != DM_F32 && dtype != DM_BF16 && dtype != DM_F16)
        return dm_fail(DM_ERR_FORMAT, "%s: dtype %s cannot be packed as %s (expected F32, BF16 or F16)",
                       name, dm_dtype_name(dtype), dm_lp_format_name(fmt));
    const float *Wf = W;
    float *tmp = NULL;
    if (dtype != DM_F32 || ((uintptr_t)W & 3u)) {
        tmp = malloc((size_t)out * in * sizeof(float));
        if (!tmp) return dm_fail(DM_ERR_NOMEM, "%s: no memory to convert [%d, %d] for packing", name, out, in);
        dm_status st = dm_convert_to_f32(dtype, W, (size_t)out * in, tmp);
        if (st != DM_OK) {
            free(tmp);
            return st;
        }
        Wf = tmp;
    }
    size_t bad;
    if (fmt != DM_LP_BF16 && !dm_all_finite(Wf, (size_t)out * in, &bad)) {
        /* a scale from NaN or Inf has no meaning, and converting one to an integer is undefined */
        const float v = Wf[bad];
        free(tmp);
        return dm_fail(DM_ERR_FORMAT, "%s: cannot quantise to %s: element [%zu, %zu] is %s", name,
                       dm_lp_format_name(fmt), bad / (size_t)in, bad % (size_t)in,
                       isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf");
    }
    m->fmt = fmt;
    m->out = out;
    m->in = in;
    m->np = (out + DM_LP_PANEL - 1) / DM_LP_PANEL;
    dm_status st = fmt == DM_LP_BF16 ? dm_lp_pack_bf16(m, Wf)
                 : fmt == DM_LP_Q8   ? dm_lp_pack_q8(m, Wf)
                                     : dm_lp_pack_q4(m, Wf);
    free(tmp);
    if (st != DM_OK) {
        dm_lp_free(m);
        return dm_fail(DM_ERR_NOMEM, "%s: no memory to pack [%d, %d] as %s", name, out, in,
                       dm_lp_format_name(fmt));
    }
    return DM_OK;
}

void dm_lp_free(dm_lpmat *m)
{
    if (!m) return;
    free(m->w);
    free(m->scale);
    free(m->gscale);
    free(m->corr);
    free(m->fcorr);
    memset(m, 0, sizeof *m);
}

size_t dm_lp_bytes(const dm_lpmat *m)
{
    const size_t cols = (size_t)m->np * DM_LP_PANEL, kb = (size_t)m->kb;
    switch (m->fmt) {
    case DM_LP_BF16: return cols * kb * 4;
    case DM_LP_Q8: return cols * kb * 4 + cols * (sizeof(float) + sizeof(int32_t));
    case DM_LP_Q4: return cols * kb * 16 + cols * kb * 2 + cols * sizeof(float);
    default: return 0;
    }
}

double dm_lp_bytes_per_weight(dm_lp_format f, int in)
{
    switch (f) {
    case DM_LP_BF16: return 2.0;
    case DM_LP_Q8: return 1.0 + 8.0 / in;
    case DM_LP_Q4: return 0.5 + 2.0 / DM_Q4_GROUP + 4.0 / in;
    default: return 0;
    }
}

float dm_lp_get(const dm_lpmat *m, int o, int i)
{
    const size_t j = (size_t)(o / DM_LP_PANEL), c = (size_t)(o % DM_LP_PANEL);
    switch (m->fmt) {
    case DM_LP_BF16: {
        uint32_t u = ((const uint32_t *)m->w)[(j * m->kb + i / 2) * DM_LP_PANEL + c];
        return dm_lp_bits_f(i % 2 ? u & 0xffff0000u : u << 16);
    }
    case DM_LP_Q8: {
        int8_t q = ((const int8_t *)m->w)[((j * m->kb + i / 4) * DM_LP_PANEL + c) * 4 + i % 4];
        return (float)q * m->scale[o];
    }
    case DM_LP_Q4: {
        const size_t g = (size_t)i / DM_Q4_GROUP, q = (size_t)(i % DM_Q4_GROUP) / 4;
        uint8_t byte = ((const uint8_t *)m->w)[((j * m->kb + g) * 8 + q) * 64 + (c % 16) * 4 + i % 4];
        int v = c < 16 ? byte & 15 : byte >> 4;
        v = v >= 8 ? v - 16 : v;
        float d = dm_bf16_to_f32(m->gscale[(j * m->kb + g) * DM_LP_PANEL + c]);
        return (float)v * d;
    }
    default: return 0;
    }
}

dm_status dm_lp_linear(const float *x, int N, const dm_lpmat *W, const float *b, float *y)
{
    if (N <= 0) return DM_OK;
    const unsigned feat = dm_cpu_features();
    const int in = W->in;
    if (W->fmt == DM_LP_BF16) {
        const int kb = W->kb;
        const size_t rows = (size_t)(N + 31) / 32 * 32; /* AMX tiles read 32-row blocks */
        uint32_t *xb = malloc(rows * kb * sizeof(uint32_t));
        if (!xb) return dm_fail(DM_ERR_NOMEM, "bf16 GEMM: no memory for %d x %d activations", N, in);
        memset(xb + (size_t)N * kb, 0, (rows - (size_t)N) * kb * sizeof(uint32_t));
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
#ifdef DM_LP_X86
            if (feat & DM_CPU_AVX512) bf16_row_avx512(x + (size_t)n * in, in, xb + (size_t)n * kb);
            else
#endif
                bf16_row(x + (size_t)n * in, in, xb + (size_t)n * kb);
        }
        if (!(feat & DM_CPU_AVX512_BF16)) dm_cpu_note_fallback("bf16 GEMM", DM_CPU_AVX512 | DM_CPU_AVX512_BF16);
        dm_lp_gemm_bf16(xb, N, W, b, y, feat);
        free(xb);
        return DM_OK;
    }
    /* int8 / int4: activations quantised per row, stored + 128 (unsigned, for vpdpbusd), rows
     * padded with 128 (= 0) to a multiple of 4. */
    const size_t ld = (size_t)(in + 3) / 4 * 4, rows = (size_t)(N + 31) / 32 * 32; /* AMX tiles */
    uint8_t *xu = malloc(rows * ld + (size_t)N * sizeof(float));
    if (!xu) return dm_fail(DM_ERR_NOMEM, "%s GEMM: no memory for %d x %d activations",
                            dm_lp_format_name(W->fmt), N, in);
    float *sx = (float *)(void *)(xu + rows * ld); /* rows * ld is a multiple of 4 */
    memset(xu + (size_t)N * ld, 128, (rows - (size_t)N) * ld);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        uint8_t *o = xu + (size_t)n * ld;
#ifdef DM_LP_X86
        if (feat & DM_CPU_AVX512) sx[n] = quant_row_avx512(x + (size_t)n * in, in, o);
        else
#endif
            sx[n] = dm_lp_quant_row(x + (size_t)n * in, in, o);
        for (size_t i = (size_t)in; i < ld; i++) o[i] = 128;
    }
    if (!(feat & DM_CPU_AVX512_VNNI))
        dm_cpu_note_fallback(W->fmt == DM_LP_Q8 ? "int8 GEMM" : "int4 GEMM", DM_CPU_AVX512 | DM_CPU_AVX512_VNNI);
    if (W->fmt == DM_LP_Q8) dm_lp_gemm_q8(xu, sx, N, W, b, y, feat);
    else dm_lp_gemm_q4(xu, sx, N, W, b, y, feat);
    free(xu);
    return DM_OK;
}

void dm_lp_linear_ref(const float *x, int N, const dm_lpmat *W, const float *b, float *y)
{
    const int in = W->in, out = W->out;
    uint8_t *u = malloc((size_t)in);
    double *xv = malloc((size_t)in * sizeof(double));
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * in;
        double s = 1.0;
        if (W->fmt == DM_LP_BF16) {
            for (int i = 0; i < in; i++) xv[i] = dm_bf16_to_f32(dm_lp_bf16_rne(r[i]));
        } else {
            s = dm_lp_quant_row(r, in, u);
            for (int i = 0; i < in; i++) xv[i] = (double)u[i] - 128.0;
        }
        for (int o = 0; o < out; o++) {
            double acc = 0;
            for (int i = 0; i < in; i++) acc += xv[i] * (double)dm_lp_get(W, o, i);
            y[(size_t)n * out + o] = (float)(acc * s + (b ? b[o] : 0.0));
        }
    }
    free(u);
    free(xv);
}

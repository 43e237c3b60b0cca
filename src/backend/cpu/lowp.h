/* Low-precision CPU GEMMs: y[N, out] = x[N, in] · W^T (+ b[out]) with
 *   DM_LP_BF16: bf16 operands (x rounded to bf16 on entry), fp32 accumulation (AVX512-BF16
 *               vdpbf16ps where the CPU has it);
 *   DM_LP_Q8:   int8 weights, one symmetric scale per output channel; activations quantised to
 *               int8 per row on entry (dynamic, symmetric); exact int32 dot products (AVX512-VNNI
 *               vpdpbusd where the CPU has it);
 *   DM_LP_Q4:   int4 weights in groups of 32 along the input, one bf16 scale per group and output
 *               channel; activations as for Q8; exact int32 dot product per group, then the groups
 *               summed in fp32 in order.
 * Weights are packed once (dm_lp_pack) into 32-column panels like dm_pmat (ops.h). Every output
 * element is a fixed-order computation over its own row and column only, so results are bitwise
 * independent of N, of the row's place in a tile and of the thread count. Paths, chosen per call
 * from the CPU (cpu_features.c, $DITMOE_CPU_FEATURES): AMX tiles (int8 when in % 64 == 0, bf16
 * when in % 32 == 0), else AVX512-BF16 / VNNI, else portable C. int8 and int4 give the same bits
 * on every path (exact integer sums, identical float epilogues); bf16 gives the same bits on the
 * vdpbf16ps and portable paths (the portable path emulates vdpbf16ps exactly, see gemm_bf16.c)
 * and agrees with them within 2e-5 x rms on AMX, whose tile unit sums in its own order. Each
 * kernel has a plain reference (_ref, double loops over the packed values); tests/test_lowp.c
 * checks one against the other. */
#ifndef DM_BACKEND_CPU_LOWP_H
#define DM_BACKEND_CPU_LOWP_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

/* ---- CPU features (cpu_features.c), decided at run time ------------------------------------- */
enum {
    DM_CPU_AVX512 = 1u << 0,      /* avx512f + bw + vl + dq, with OS support for the zmm state */
    DM_CPU_AVX512_BF16 = 1u << 1, /* vdpbf16ps, vcvtne2ps2bf16 */
    DM_CPU_AVX512_VNNI = 1u << 2, /* vpdpbusd */
    DM_CPU_AMX_INT8 = 1u << 3,    /* AMX tiles + tdpbusd, with the OS permission granted (Linux) */
    DM_CPU_AMX_BF16 = 1u << 4,    /* AMX tdpbf16ps (same permission) */
};
/* What the kernels may use: detected once (cpuid), masked by $DITMOE_CPU_FEATURES when set
 * ("generic" = none, i.e. the portable paths; "native" = as detected; or a comma list of
 * "avx512", "bf16", "vnni", "amx" (int8 and bf16 tiles)). Never more than the CPU has. */
unsigned dm_cpu_features(void);
/* The mask a $DITMOE_CPU_FEATURES value allows (~0u for NULL, "" or "native"). */
unsigned dm_cpu_parse_features(const char *s);
/* Tests and benchmarks: force a mask (still limited to what the CPU has); DM_CPU_DETECT goes
 * back to detection + environment. */
#define DM_CPU_DETECT (~0u)
void dm_cpu_force_features(unsigned mask);
/* "avx512,bf16,vnni,amx" or "generic", for log lines (static storage). */
const char *dm_cpu_features_string(unsigned mask);
/* Log once per process (INFO) that `what` runs on its portable path, and why. */
void dm_cpu_note_fallback(const char *what, unsigned need);

/* ---- packed low-precision weights ------------------------------------------------------------ */
typedef enum { DM_LP_BF16 = 0, DM_LP_Q8, DM_LP_Q4, DM_LP_COUNT } dm_lp_format;
const char *dm_lp_format_name(dm_lp_format f); /* "bf16", "int8", "int4" */
int dm_lp_format_from_name(const char *s, dm_lp_format *out); /* 0, or -1 if unknown */

#define DM_LP_PANEL 32 /* output columns per panel */
#define DM_Q4_GROUP 32 /* int4: input elements per scale group */

typedef struct {
    dm_lp_format fmt;
    int out, in;
    int np;       /* panels: ceil(out / 32) */
    int kb;       /* k blocks per panel: bf16 ceil(in/2) pairs, int8 ceil(in/4) quads, int4 in/32 */
    void *w;      /* bf16: uint32 [np][kb][32] (low half k even, high half k odd);
                   * int8: int8 [np][kb][32][4];
                   * int4: uint8 [np][kb][8][64]: quad q, byte c*4+j holds k = 32g+4q+j of column
                   *       c (low nibble) and c+16 (high nibble), two's complement */
    float *scale; /* int8: [np*32] per column; int4: NULL */
    uint16_t *gscale; /* int4: bf16 [np][kb][32] per group and column; else NULL */
    int32_t *corr;    /* int8: [np*32] = 128 * sum_k w[o][k] (activations are stored +128) */
    float *fcorr;     /* int4: [np*32] = 128 * sum_g gscale * sum_{k in g} 16 w (same reason) */
} dm_lpmat;

/* Pack W [out, in] given as F32, BF16 or F16 (src may be unaligned). Quantisation: int8
 * q = rint(w / s), s = max|w| / 127 per output row; int4 per group of 32: d = bf16(m / -8) where m
 * is the group's value of largest magnitude, q = clamp(rint(w / d), -8, 7). bf16: RNE.
 * DM_ERR_ARG (naming `name`) when fmt is int4 and in is not a multiple of 32, or a shape is bad;
 * DM_ERR_FORMAT for another source dtype; DM_ERR_NOMEM. */
dm_status dm_lp_pack(dm_lpmat *m, dm_lp_format fmt, const void *W, dm_dtype dtype, int out, int in,
                     const char *name);
void dm_lp_free(dm_lpmat *m); /* NULL-safe, zeroes *m */
size_t dm_lp_bytes(const dm_lpmat *m); /* storage of the packed weight with its scales */
/* Bytes per weight for a large matrix in format f (the footprint estimate): bf16 2, int8 1
 * (+4/in scale), int4 0.5 + 2/32 (bf16 group scales). */
double dm_lp_bytes_per_weight(dm_lp_format f, int in);
/* The dequantised weight W[o, i] as the kernels see it (bf16 value, or q * scale). */
float dm_lp_get(const dm_lpmat *m, int o, int i);

/* y [N, out] = x [N, in] · W^T (+ b [out] when b != NULL). DM_ERR_NOMEM when the per-call
 * scratch (the activations in bf16 / int8, N * in * 2 or 1 bytes) cannot be allocated. */
dm_status dm_lp_linear(const float *x, int N, const dm_lpmat *W, const float *b, float *y);
/* The same semantics in plain double loops: activations rounded / quantised exactly as the fast
 * path does (dm_lp_quant_row), products and sums in double. */
void dm_lp_linear_ref(const float *x, int N, const dm_lpmat *W, const float *b, float *y);

/* Activation rounding shared by both paths and the reference. */
uint16_t dm_lp_bf16_rne(float f); /* RNE, NaN stays NaN, results below FLT_MIN flushed to +-0 */
/* One row x[in] to u[in] = q + 128 with q = clamp(rint(x * (127 / amax)), -127, 127); returns the
 * scale amax / 127 (0 for an all-zero row, NaN when the row is not finite). */
float dm_lp_quant_row(const float *x, int in, uint8_t *u);

/* ---- pre-quantised weights of a file (weights_lowp.c; docs/format.md) ------------------------ */
/* The packed matrix from a file's canonical layout (backend.h dm_weight_desc.quant): fmt Q8:
 * q int8 [out, in], scale float32 [out]; Q4: q uint8 [out, in / 2] (even k low nibble), scale bf16
 * bits [out, in / 32]. The result is the dm_lpmat dm_lp_pack builds from the weights those values
 * came from (same layout, scales and corrections), so the GEMM gives the same bits. Sources may be
 * unaligned. DM_ERR_FORMAT naming `name` for a non-finite scale or an int8 value of -128;
 * DM_ERR_ARG for a bad shape; DM_ERR_NOMEM. */
dm_status dm_lp_import(dm_lpmat *m, dm_lp_format fmt, int out, int in, const void *q,
                       const void *scale, const char *name);
/* The canonical layout of a packed Q8 / Q4 matrix (the inverse of dm_lp_import): q and scale as
 * above. DM_ERR_ARG for a BF16 matrix. */
dm_status dm_lp_export(const dm_lpmat *m, void *q, void *scale);

/* ---- which weights are stored in low precision (weights_lowp.c) ------------------------------ */
typedef struct {
    int bf16;        /* --precision bf16: the per-token GEMMs' weights (dm_lp_bf16_role) in bf16 */
    int expert_bits; /* --quant-experts: 0 (none), 8 or 4: routed experts only */
} dm_lp_policy;
#if defined(__has_include)
#if __has_include("backend/backend.h")
#include "backend/backend.h"
/* For one weight the backend is creating: *lowp = 1 and *fmt when it is to be packed with
 * dm_lp_pack, 0 when the backend keeps its float path. DM_ERR_ARG naming the tensor for int4 on an
 * input width that is not a multiple of 32 (or an unsupported bit count). p == NULL: f32. */
dm_status dm_lp_choose(const dm_lp_policy *p, const dm_weight_desc *d, int *lowp, dm_lp_format *fmt);
/* 1 for the roles whose LINEAR weights --precision bf16 stores in bf16: ATTN, EXPERT, SHARED, MLP
 * (the per-token GEMMs, ~all of the FLOPs); 0 for EMBED, MOD, FINAL (per-image or tiny products,
 * kept float32: most of the bf16 error, no measurable time), ROUTER, NORM and VAE. */
int dm_lp_bf16_role(dm_weight_role r);
/* dm_lp_choose, then dm_lp_pack of d->data when chosen (*lowp says which; m zeroed otherwise).
 * A pre-quantised desc (d->quant 8 / 4) goes to dm_lp_import whatever the policy's precision;
 * DM_ERR_ARG when the policy asks for the other expert format (re-quantising is not done) or the
 * desc is not a routed expert's LINEAR weight. */
dm_status dm_lp_pack_desc(const dm_lp_policy *p, const dm_weight_desc *d, dm_lpmat *m, int *lowp);
#endif
#endif

#endif

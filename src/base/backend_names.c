/* Backend names and availability (the enum <-> string table shared by the CLI and library). */
#include "ditmoe.h"

#include <string.h>
#include <strings.h>

static const char *const k_backend_names[DM_BACKEND_COUNT] = {"cpu", "cuda"};

const char *dm_backend_name(dm_backend_kind k)
{
    return (unsigned)k < DM_BACKEND_COUNT ? k_backend_names[k] : "?";
}

int dm_backend_from_name(const char *s, dm_backend_kind *out)
{
    for (int i = 0; i < DM_BACKEND_COUNT; i++)
        if (s && !strcasecmp(s, k_backend_names[i])) {
            *out = (dm_backend_kind)i;
            return 0;
        }
    return -1;
}

dm_status dm_backend_check(dm_backend_kind k)
{
    switch (k) {
    case DM_BACKEND_CPU: return DM_OK;
    case DM_BACKEND_CUDA:
#ifdef DITMOE_HAVE_CUDA
        return DM_OK;
#else
        return dm_fail(DM_ERR_ARG, "backend cuda: this build has no CUDA (configure with "
                                   "-DDITMOE_CUDA=ON on a machine with the CUDA toolkit)");
#endif
    default: return dm_fail(DM_ERR_ARG, "backend %d: unknown", (int)k);
    }
}

void dm_load_opts_init(dm_load_opts *o)
{
    o->backend = DM_BACKEND_CPU;
    o->device = 0;
    o->cfg = NULL;
    o->precision = DM_PREC_F32;
    o->quant_experts = 0;
}

const char *dm_precision_name(dm_precision p)
{
    return p == DM_PREC_BF16 ? "bf16" : p == DM_PREC_F32 ? "f32" : "?";
}

int dm_precision_from_name(const char *s, dm_precision *out)
{
    if (!s) return -1;
    if (!strcmp(s, "f32") || !strcmp(s, "fp32")) *out = DM_PREC_F32;
    else if (!strcmp(s, "bf16")) *out = DM_PREC_BF16;
    else return -1;
    return 0;
}

const char *dm_quant_name(int bits)
{
    return bits == 0 ? "none" : bits == 8 ? "int8" : bits == 4 ? "int4" : "?";
}

int dm_quant_from_name(const char *s, int *bits)
{
    if (!s) return -1;
    if (!strcmp(s, "none")) *bits = 0;
    else if (!strcmp(s, "int8")) *bits = 8;
    else if (!strcmp(s, "int4")) *bits = 4;
    else return -1;
    return 0;
}

/* Backend registry: open / close an instance, list the compiled backends, check required ops. */
#include "backend/backend.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

dm_status dm_backend_open(const dm_load_opts *o, dm_backend **out)
{
    *out = NULL;
    const dm_backend_kind kind = o->backend;
    dm_status st = dm_backend_check(kind);
    if (st != DM_OK) return st;
    dm_backend *be = calloc(1, sizeof *be);
    if (!be) return dm_fail(DM_ERR_NOMEM, "backend %s: out of memory", dm_backend_name(kind));
    be->kind = kind;
    switch (kind) {
    case DM_BACKEND_CPU: st = dm_backend_cpu_open(be, o); break;
#ifdef DITMOE_HAVE_CUDA
    case DM_BACKEND_CUDA: st = dm_backend_cuda_open(be, o); break;
#endif
    default:
        st = dm_fail(DM_ERR_BACKEND, "backend %s: no implementation in this build",
                     dm_backend_name(kind));
    }
    if (st != DM_OK) {
        free(be);
        return st;
    }
    *out = be;
    return DM_OK;
}

void dm_backend_close(dm_backend *be)
{
    if (!be) return;
    if (be->ops && be->ops->close) be->ops->close(be->ctx);
    free(be);
}

int dm_backend_compiled(dm_backend_kind *kinds, int cap)
{
    int n = 0;
    for (int k = 0; k < DM_BACKEND_COUNT; k++)
        if (dm_backend_check((dm_backend_kind)k) == DM_OK) {
            if (n < cap) kinds[n] = (dm_backend_kind)k;
            n++;
        }
    return n;
}

/* Offsets of the op pointers, by field name. */
#define OP(f) {#f, offsetof(dm_backend_ops, f)}
static const struct {
    const char *name;
    size_t off;
} k_ops[] = {
    OP(alloc), OP(release), OP(upload), OP(download), OP(sync), OP(weight), OP(weight_free),
    OP(weight_bytes), OP(linear), OP(layernorm_mod), OP(gated_add), OP(silu), OP(timestep_embed),
    OP(patchify), OP(unpatchify), OP(add_rows), OP(embed_add), OP(attention), OP(ffn),
    OP(router_scores), OP(moe_grouped), OP(mlp_add), OP(conv2d), OP(group_norm), OP(upsample2x), OP(vae_attention),
};

int dm_backend_has(const dm_backend *be, const char *op)
{
    for (size_t i = 0; i < sizeof k_ops / sizeof *k_ops; i++)
        if (!strcmp(k_ops[i].name, op)) {
            void *fn;
            memcpy(&fn, (const char *)be->ops + k_ops[i].off, sizeof fn);
            return fn != NULL;
        }
    return 0;
}

dm_status dm_backend_require(const dm_backend *be, const char *ops, const char *who)
{
    char name[32];
    for (const char *p = ops; *p;) {
        size_t n = strcspn(p, ",");
        if (n >= sizeof name) n = sizeof name - 1;
        memcpy(name, p, n);
        name[n] = 0;
        if (!dm_backend_has(be, name))
            return dm_fail(DM_ERR_BACKEND, "%s: backend %s has no op %s", who, be->ops->name, name);
        p += n;
        if (*p == ',') p++;
    }
    return DM_OK;
}

dm_status dm_backend_weight_f32(dm_backend *be, const char *name, dm_weight_role role,
                                dm_weight_use use, int rows, int cols, const float *data,
                                dm_weight **out)
{
    dm_weight_desc d = {.name = name, .role = role, .use = use, .dtype = DM_F32, .rows = rows,
                        .cols = cols, .data = data};
    return be->ops->weight(be->ctx, &d, out);
}

/* ProMoE model config (promoe.md §1.3, §4.1): the "promoe" metadata fields, inference from
 * tensor names/shapes, and checks of every block against the config. Odd blocks are MoE blocks
 * (mlp.cluster_centers, mlp.experts.0..E with E the unconditional expert, mlp.shared_expert),
 * even blocks dense GELU-tanh MLPs (mlp.fc1/fc2). */
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const k_router_names[DM_ROUTER_COUNT] = {
    [DM_ROUTER_IDENTITY] = "identity", [DM_ROUTER_SOFTMAX] = "softmax",
    [DM_ROUTER_SIGMOID] = "sigmoid"};

const char *dm_router_act_name(dm_router_act a)
{
    return (unsigned)a < DM_ROUTER_COUNT ? k_router_names[a] : "?";
}

int dm_router_act_from_name(const char *s, dm_router_act *out)
{
    for (int i = 0; s && i < DM_ROUTER_COUNT; i++)
        if (!strcmp(s, k_router_names[i])) {
            *out = (dm_router_act)i;
            return 0;
        }
    return -1;
}

static void promoe_defaults(dm_config *c)
{
    c->moe_interleave = 1;
    c->qk_norm_eps = 1e-5f; /* nn.LayerNorm(hd) default, not DiT-MoE's 1e-6 */
    c->time_scale = 1000.0f;
    c->objective = DM_OBJ_RF;
}

dm_status dm_promoe_meta(const char *path, const void *root_, dm_config *c)
{
    const cJSON *root = root_;
    promoe_defaults(c);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "mlp_hidden");
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1 && v->valuedouble <= (1 << 24)) ||
        v->valuedouble != floor(v->valuedouble))
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": mlp_hidden: expected a positive "
                       "integer (the dense blocks' MLP width)", path);
    c->mlp_hidden = (int)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(root, "time_scale");
    if (v) {
        if (!cJSON_IsNumber(v) || !(v->valuedouble > 0 && v->valuedouble <= FLT_MAX))
            return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": time_scale: expected a "
                           "positive number", path);
        c->time_scale = (float)v->valuedouble;
    }
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "promoe");
    if (!p) return DM_OK; /* released defaults: token choice, identity router */
    if (!cJSON_IsObject(p))
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": promoe: expected an object", path);
    const cJSON *var = cJSON_GetObjectItemCaseSensitive(p, "variant");
    if (var) {
        if (!cJSON_IsString(var) || (strcmp(var->valuestring, "tc") && strcmp(var->valuestring, "ec")))
            return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": promoe.variant: expected "
                           "\"tc\" or \"ec\"", path);
        c->promoe_ec = strcmp(var->valuestring, "ec") == 0;
    }
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(p, "router");
    if (r) {
        if (!cJSON_IsString(r) || dm_router_act_from_name(r->valuestring, &c->router_act) != 0)
            return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": promoe.router: expected "
                           "\"identity\", \"softmax\" or \"sigmoid\"", path);
    }
    return DM_OK;
}

static dm_status rows_of(const dm_st_file *f, const char *name, int *out)
{
    const dm_st_tensor *t = dm_st_find(f, name);
    if (!t) return dm_fail(DM_ERR_FORMAT, "%s: missing tensor %s", dm_st_path(f), name);
    if (t->ndim != 2 || t->shape[0] < 1 || t->shape[0] > 1000000000)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: expected a 2-D tensor", dm_st_path(f), name);
    *out = (int)t->shape[0];
    return DM_OK;
}

dm_status dm_promoe_infer(const dm_st_file *f, dm_config *c)
{
    promoe_defaults(c);
    dm_status st;
    if ((st = rows_of(f, "blocks.1.mlp.cluster_centers", &c->num_experts)) ||
        (st = rows_of(f, "blocks.1.mlp.experts.0.up_proj.weight", &c->expert_hidden)) ||
        (st = rows_of(f, "blocks.0.mlp.fc1.weight", &c->mlp_hidden)))
        return st;
    c->shared_hidden = 0;
    if (dm_st_find(f, "blocks.1.mlp.shared_expert.up_proj.weight") &&
        (st = rows_of(f, "blocks.1.mlp.shared_expert.up_proj.weight", &c->shared_hidden)))
        return st;
    c->top_k = 1; /* released configs: top-1, identity router, token choice */
    c->router_act = DM_ROUTER_IDENTITY;
    c->promoe_ec = 0;
    return DM_OK;
}

dm_status dm_promoe_check(const dm_st_file *f, const dm_config *c)
{
    const int64_t D = c->hidden, E = c->num_experts;
    char k[256];
    int64_t s[2];
    dm_status st;
    if (c->top_k > c->num_experts)
        return dm_fail(DM_ERR_FORMAT, "%s: top_k %d exceeds num_experts %d", dm_st_path(f),
                       c->top_k, c->num_experts);
#define CHECK2(a, b, ...)                                     \
    do {                                                      \
        snprintf(k, sizeof k, __VA_ARGS__);                   \
        s[0] = (a), s[1] = (b);                               \
        if ((st = dm_st_check_shape(f, k, 2, s))) return st;  \
    } while (0)
    for (int i = 0; i < c->depth; i++) {
        if (i % 2 == 0) {
            CHECK2(c->mlp_hidden, D, "blocks.%d.mlp.fc1.weight", i);
            CHECK2(D, c->mlp_hidden, "blocks.%d.mlp.fc2.weight", i);
            continue;
        }
        CHECK2(E, D, "blocks.%d.mlp.cluster_centers", i);
        for (int e = 0; e <= E; e++) /* e == E: the unconditional expert */
            CHECK2(c->expert_hidden, D, "blocks.%d.mlp.experts.%d.up_proj.weight", i, e);
        snprintf(k, sizeof k, "blocks.%d.mlp.experts.%lld.up_proj.weight", i, (long long)E + 1);
        if (dm_st_find(f, k))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: present but num_experts is %lld (+1 "
                           "unconditional)", dm_st_path(f), k, (long long)E);
        if (c->shared_hidden > 0)
            CHECK2(c->shared_hidden, D, "blocks.%d.mlp.shared_expert.up_proj.weight", i);
    }
#undef CHECK2
    return DM_OK;
}

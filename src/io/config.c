/* Model configuration: the "ditmoe" metadata JSON (docs/format.md), validated and cross-checked
 * against the tensors; or, without metadata, inferred from tensor names/shapes and the released
 * config table (docs/spec/ditmoe.md §1, §3.1). Also class-id parsing and the arch/objective name
 * tables. Sampling defaults are not filled here: dm_sample_params_init owns them. */
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- enum <-> name tables ---- */
static const char *const k_arch_names[] = {[DM_ARCH_DITMOE] = "dit-moe", [DM_ARCH_PROMOE] = "promoe"};
static const char *const k_obj_names[] = {[DM_OBJ_DDPM] = "ddpm", [DM_OBJ_RF] = "rf"};
static const char *const k_attn_names[] = {[DM_ATTN_TIMM] = "timm", [DM_ATTN_QKNORM] = "qknorm"};

const char *dm_arch_name(dm_arch a) { return (unsigned)a <= DM_ARCH_PROMOE ? k_arch_names[a] : "?"; }
const char *dm_objective_name(dm_objective o)
{
    return (unsigned)o <= DM_OBJ_RF ? k_obj_names[o] : "?";
}

int dm_objective_from_name(const char *s, dm_objective *out)
{
    for (int i = 0; i <= DM_OBJ_RF; i++)
        if (strcmp(s, k_obj_names[i]) == 0) {
            *out = (dm_objective)i;
            return 0;
        }
    return -1;
}

/* ---- released-config table (docs/spec/ditmoe.md §1) ---- */
static const struct {
    int hidden, heads;
    const char *size;
} k_released[] = {{384, 6, "S"}, {768, 12, "B"}, {1024, 16, "L"}, {1152, 16, "XL"}, {1408, 16, "G"}};
/* (L, D 1024, is a ProMoE size; DiT-MoE has no L release.) */

static int released_index(int hidden)
{
    for (int i = 0; i < (int)(sizeof k_released / sizeof k_released[0]); i++)
        if (k_released[i].hidden == hidden) return i;
    return -1;
}

void dm_config_free(dm_config *cfg)
{
    if (!cfg) return;
    free(cfg->class_names);
    cfg->class_names = NULL;
}

/* ---- metadata parsing ---- */
typedef struct {
    const char *path;
} meta_ctx;

static dm_status get_int(const meta_ctx *m, const cJSON *obj, const char *key, int required,
                         int minv, int *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j) {
        if (!required) return DM_OK;
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": %s: missing", m->path, key);
    }
    double d = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!(d == floor(d)) || d < minv || d > (1 << 24))
        return dm_fail(DM_ERR_FORMAT,
                       "%s: metadata \"ditmoe\": %s: expected an integer >= %d (at most %d), "
                       "found %s", m->path, key, minv, 1 << 24,
                       cJSON_IsNumber(j) ? "a non-integer or out-of-range number"
                                                    : "a non-number");
    *out = (int)d;
    return DM_OK;
}

static dm_status get_str(const meta_ctx *m, const cJSON *obj, const char *key, int required,
                         const char **out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j) {
        if (!required) return DM_OK;
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": %s: missing", m->path, key);
    }
    if (!cJSON_IsString(j))
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": %s: expected a string", m->path,
                       key);
    *out = j->valuestring;
    return DM_OK;
}

static dm_status get_float(const meta_ctx *m, const cJSON *obj, const char *key, double minv,
                           int strict, float *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j) return DM_OK;
    double d = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!isfinite(d) || fabs(d) > FLT_MAX || (strict ? !(d > minv) : !(d >= minv)))
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": %s: expected a number %s %g",
                       m->path, key, strict ? ">" : ">=", minv);
    *out = (float)d;
    return DM_OK;
}

#define TRY(x)                          \
    do {                                \
        dm_status st_ = (x);            \
        if (st_ != DM_OK) return st_;   \
    } while (0)

/* Copy a class name into [DM_MAX_CLASS_NAME]; long names (ImageNet's synonym lists) are cut
 * after the last whole ", "-separated synonym that fits, else at a UTF-8 character boundary. */
static void copy_class_name(char *dst, const char *src)
{
    size_t n = strlen(src), cap = DM_MAX_CLASS_NAME - 1;
    if (n > cap) {
        size_t cut = 0;
        for (size_t i = 1; i + 1 <= cap; i++)
            if (src[i] == ',' && src[i + 1] == ' ') cut = i;
        if (!cut) {
            cut = cap;
            while (cut > 0 && ((unsigned char)src[cut] & 0xC0) == 0x80) cut--;
        }
        n = cut;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static dm_status parse_meta(const char *path, const char *text, dm_config *c)
{
    cJSON *root = cJSON_Parse(text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": not a JSON object", path);
    }
    meta_ctx m = {path};
    dm_status st = DM_OK;
    const char *s = NULL;
    int v = 1;
#define CHK(x)                     \
    do {                           \
        if ((st = (x)) != DM_OK) { \
            goto done;             \
        }                          \
    } while (0)
    CHK(get_int(&m, root, "format_version", 0, 0, &v));
    if (v != 1) {
        st = dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": format_version: expected 1, found %d",
                     path, v);
        goto done;
    }
    s = "dit-moe";
    CHK(get_str(&m, root, "arch", 0, &s));
    if (strcmp(s, "dit-moe") == 0) c->arch = DM_ARCH_DITMOE;
    else if (strcmp(s, "promoe") == 0) c->arch = DM_ARCH_PROMOE;
    else {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": arch: expected \"dit-moe\" or \"promoe\", found \"%s\"",
                     path, s);
        goto done;
    }
    s = "";
    CHK(get_str(&m, root, "name", 0, &s));
    if (strlen(s) >= sizeof c->name) {
        st = dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": name: longer than %zu characters",
                     path, sizeof c->name - 1);
        goto done;
    }
    snprintf(c->name, sizeof c->name, "%s", s);
    CHK(get_int(&m, root, "hidden_size", 1, 1, &c->hidden));
    CHK(get_int(&m, root, "depth", 1, 1, &c->depth));
    CHK(get_int(&m, root, "num_heads", 1, 1, &c->heads));
    if (c->hidden % c->heads != 0) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": num_heads: hidden_size %d is not divisible by %d",
                     path, c->hidden, c->heads);
        goto done;
    }
    const int moe_req = 1;
    CHK(get_int(&m, root, "num_experts", moe_req, 1, &c->num_experts));
    CHK(get_int(&m, root, "top_k", moe_req, 1, &c->top_k));
    if (moe_req && c->top_k > c->num_experts) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": top_k: expected 1 <= top_k <= num_experts (%d), "
                     "found %d",
                     path, c->num_experts, c->top_k);
        goto done;
    }
    CHK(get_int(&m, root, "expert_hidden", moe_req, 1, &c->expert_hidden));
    CHK(get_int(&m, root, "shared_hidden", moe_req, 0, &c->shared_hidden));
    s = "timm";
    CHK(get_str(&m, root, "attention", moe_req, &s));
    if (strcmp(s, "timm") == 0) c->attn = DM_ATTN_TIMM;
    else if (strcmp(s, "qknorm") == 0) c->attn = DM_ATTN_QKNORM;
    else {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": attention: expected \"timm\" or \"qknorm\", found "
                     "\"%s\"",
                     path, s);
        goto done;
    }
    CHK(get_int(&m, root, "patch_size", 1, 1, &c->patch));
    CHK(get_int(&m, root, "input_size", 1, 1, &c->input_size));
    if (c->input_size % c->patch != 0) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": input_size: %d is not a multiple of patch_size %d",
                     path, c->input_size, c->patch);
        goto done;
    }
    CHK(get_int(&m, root, "in_channels", 1, 1, &c->in_channels));
    const cJSON *ls = cJSON_GetObjectItemCaseSensitive(root, "learn_sigma");
    if (!cJSON_IsBool(ls)) {
        st = dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": learn_sigma: %s", path,
                     ls ? "expected true or false" : "missing");
        goto done;
    }
    c->learn_sigma = cJSON_IsTrue(ls);
    c->out_channels = c->learn_sigma ? 2 * c->in_channels : c->in_channels;
    CHK(get_int(&m, root, "num_classes", 1, 1, &c->num_classes));
    if (c->num_classes > DM_MAX_CLASSES) {
        st = dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": num_classes: %d is more than %d",
                     path, c->num_classes, DM_MAX_CLASSES);
        goto done;
    }
    s = "ddpm";
    CHK(get_str(&m, root, "objective", moe_req, &s));
    if (dm_objective_from_name(s, &c->objective) != 0) {
        st = dm_fail(DM_ERR_FORMAT,
                     "%s: metadata \"ditmoe\": objective: expected \"ddpm\" or \"rf\", found \"%s\"",
                     path, s);
        goto done;
    }
    c->vae_scale = 0.18215f;
    CHK(get_float(&m, root, "vae_scale", 0.0, 1, &c->vae_scale));

    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(root, "class_names");
    if (cn && !cJSON_IsNull(cn)) {
        if (!cJSON_IsArray(cn) || cJSON_GetArraySize(cn) != c->num_classes) {
            st = dm_fail(DM_ERR_FORMAT,
                         "%s: metadata \"ditmoe\": class_names: expected an array of %d strings, "
                         "found %s of %d",
                         path, c->num_classes, cJSON_IsArray(cn) ? "an array" : "a non-array",
                         cJSON_IsArray(cn) ? cJSON_GetArraySize(cn) : 0);
            goto done;
        }
        c->class_names = calloc((size_t)c->num_classes, DM_MAX_CLASS_NAME);
        if (!c->class_names) {
            st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        int i = 0;
        for (const cJSON *e = cn->child; e; e = e->next, i++) {
            if (!cJSON_IsString(e)) {
                st = dm_fail(DM_ERR_FORMAT,
                             "%s: metadata \"ditmoe\": class_names[%d]: expected a string", path, i);
                goto done;
            }
            copy_class_name(c->class_names[i], e->valuestring);
        }
    }

    if (c->arch == DM_ARCH_PROMOE) CHK(dm_promoe_meta(path, root, c));
    const cJSON *sm = cJSON_GetObjectItemCaseSensitive(root, "sampling");
    if (sm && !cJSON_IsNull(sm)) {
        if (!cJSON_IsObject(sm)) {
            st = dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": sampling: expected an object",
                         path);
            goto done;
        }
        s = NULL;
        CHK(get_str(&m, sm, "sampler", 0, &s));
        if (s) {
            dm_sampler_kind k;
            if (dm_sampler_from_name(s, &k) != 0 || strcmp(s, dm_sampler_name(k)) != 0) {
                st = dm_fail(DM_ERR_FORMAT,
                             "%s: metadata \"ditmoe\": sampling.sampler: expected ddpm, ddim, euler "
                             "or heun, found \"%s\"",
                             path, s);
                goto done;
            }
            c->default_sampler = k;
        }
        CHK(get_int(&m, sm, "steps", 0, 1, &c->default_steps));
        CHK(get_float(&m, sm, "cfg_scale", 0.0, 0, &c->default_cfg_scale));
        CHK(get_int(&m, sm, "cfg_channels", 0, 0, &c->cfg_channels));
        if (c->cfg_channels > c->in_channels) {
            st = dm_fail(DM_ERR_FORMAT,
                         "%s: metadata \"ditmoe\": sampling.cfg_channels: expected 0..%d, found %d",
                         path, c->in_channels, c->cfg_channels);
            goto done;
        }
    }
#undef CHK
done:
    cJSON_Delete(root);
    return st;
}

/* ---- tensor helpers ---- */
/* 1 + the largest N over keys "blocks.N.", or 0 if there are none; -1 when `key_suffix` is given
 * and some block lacks "blocks.N.<key_suffix>" (reported by the caller). */
static int max_block_index(const dm_st_file *f)
{
    int mx = -1;
    for (int i = 0; i < dm_st_count(f); i++) {
        const char *n = dm_st_at(f, i)->name;
        if (strncmp(n, "blocks.", 7) != 0 || !isdigit((unsigned char)n[7])) continue;
        char *end;
        errno = 0;
        long v = strtol(n + 7, &end, 10);
        if (errno || *end != '.' || v > 1000000) continue;
        if (v > mx) mx = (int)v;
    }
    return mx + 1;
}

static int has_promoe_key(const dm_st_file *f)
{
    for (int i = 0; i < dm_st_count(f); i++) {
        const char *n = dm_st_at(f, i)->name;
        if (strncmp(n, "blocks.", 7) != 0) continue;
        const char *d = strchr(n + 7, '.');
        if (d && strcmp(d, ".mlp.cluster_centers") == 0) return 1;
    }
    return 0;
}

static const dm_st_tensor *need(const dm_st_file *f, const char *name, int ndim, dm_status *st)
{
    const dm_st_tensor *t = dm_st_find(f, name);
    if (!t) {
        *st = dm_fail(DM_ERR_FORMAT, "%s: missing tensor %s", dm_st_path(f), name);
        return NULL;
    }
    if (t->ndim != ndim) {
        char sh[160];
        *st = dm_fail(DM_ERR_FORMAT, "%s: %s: rank %d (shape %s) expected rank %d", dm_st_path(f),
                      name, t->ndim, dm_fmt_shape(sh, sizeof sh, t->ndim, t->shape), ndim);
        return NULL;
    }
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] <= 0 || t->shape[i] > 1000000000) {
            char sh[160];
            *st = dm_fail(DM_ERR_FORMAT, "%s: %s: shape %s has an empty or huge dimension",
                          dm_st_path(f), name, dm_fmt_shape(sh, sizeof sh, t->ndim, t->shape));
            return NULL;
        }
    return t;
}

/* Routed experts of DiT-MoE block i given its router `gate`: the router's rows when they lie in
 * [top_k, num_experts) (a model pruned in some layers only, ditmoe-prune --layers; num_experts is
 * the largest layer's), else num_experts (whose shape check then names the tensor). */
static int block_experts(const dm_st_file *f, const char *gate, const dm_config *c)
{
    const dm_st_tensor *t = dm_st_find(f, gate);
    if (t && t->ndim == 2 && t->shape[0] >= c->top_k && t->shape[0] < c->num_experts)
        return (int)t->shape[0];
    return c->num_experts;
}

static dm_status check2(const dm_st_file *f, const char *name, int64_t a, int64_t b)
{
    int64_t s[2] = {a, b};
    return dm_st_check_shape(f, name, 2, s);
}

/* Everything the metadata claims, checked against the tensors. */
static dm_status cross_check(const dm_st_file *f, const dm_config *c)
{
    const char *p = dm_st_path(f);
    const int64_t D = c->hidden, C = c->in_channels, P = c->patch, hd = c->hidden / c->heads;
    const int64_t T = (int64_t)(c->input_size / c->patch) * (c->input_size / c->patch);
    char k[256];
    int64_t s4[4] = {D, C, P, P}, s3[3] = {1, T, D};
    TRY(dm_st_check_shape(f, "x_embedder.proj.weight", 4, s4));
    TRY(dm_st_check_shape(f, "pos_embed", 3, s3));
    TRY(check2(f, "y_embedder.embedding_table.weight", c->num_classes + 1, D));
    TRY(check2(f, "final_layer.linear.weight", P * P * c->out_channels, D));
    int nb = max_block_index(f), full_layers = 0;
    if (nb != c->depth)
        return dm_fail(DM_ERR_FORMAT, "%s: blocks.*: block count %d expected depth %d", p, nb,
                       c->depth);
    for (int i = 0; i < c->depth; i++) {
        /* DiT-MoE XL/G name their qk-norm attention Wqkv/out_proj; ProMoE keeps qkv/proj. */
        const int flash = c->attn == DM_ATTN_QKNORM && c->arch == DM_ARCH_DITMOE;
        if (!flash) {
            snprintf(k, sizeof k, "blocks.%d.attn.qkv.weight", i);
            TRY(check2(f, k, 3 * D, D));
            snprintf(k, sizeof k, "blocks.%d.attn.proj.weight", i);
            TRY(check2(f, k, D, D));
        }
        if (c->attn == DM_ATTN_QKNORM) {
            if (flash) {
                snprintf(k, sizeof k, "blocks.%d.attn.Wqkv.weight", i);
                TRY(check2(f, k, 3 * D, D));
            }
            snprintf(k, sizeof k, "blocks.%d.attn.q_norm.weight", i);
            TRY(dm_st_check_shape(f, k, 1, &hd));
            snprintf(k, sizeof k, "blocks.%d.attn.k_norm.weight", i);
            TRY(dm_st_check_shape(f, k, 1, &hd));
            if (flash) {
                snprintf(k, sizeof k, "blocks.%d.attn.out_proj.weight", i);
                TRY(check2(f, k, D, D));
            }
        }
        if (c->arch != DM_ARCH_DITMOE) continue; /* ProMoE blocks: dm_promoe_check */
        snprintf(k, sizeof k, "blocks.%d.moe.gate.weight", i);
        const int Ei = block_experts(f, k, c);
        full_layers += Ei == c->num_experts;
        TRY(check2(f, k, Ei, D));
        snprintf(k, sizeof k, "blocks.%d.moe.experts.%d.gate_proj.weight", i, Ei - 1);
        TRY(check2(f, k, c->expert_hidden, D));
        snprintf(k, sizeof k, "blocks.%d.moe.experts.%d.gate_proj.weight", i, Ei);
        if (dm_st_find(f, k))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: present but the layer's router has %d rows", p,
                           k, Ei);
        snprintf(k, sizeof k, "blocks.%d.moe.shared_experts.gate_proj.weight", i);
        if (c->shared_hidden > 0) TRY(check2(f, k, c->shared_hidden, D));
        else if (dm_st_find(f, k))
            return dm_fail(DM_ERR_FORMAT, "%s: %s: present but shared_hidden is 0", p, k);
    }
    /* num_experts is the largest layer's: some layer must have it (else the metadata and every
     * router disagree, reported at block 0) */
    if (c->arch == DM_ARCH_DITMOE && !full_layers)
        TRY(check2(f, "blocks.0.moe.gate.weight", c->num_experts, D));
    return c->arch == DM_ARCH_PROMOE ? dm_promoe_check(f, c) : DM_OK;
}

/* ---- inference from tensors (no metadata) ---- */
static dm_status infer(const dm_st_file *f, dm_config *c)
{
    const char *p = dm_st_path(f);
    dm_status st = DM_OK;
    const dm_st_tensor *t;
    if (!(t = need(f, "x_embedder.proj.weight", 4, &st))) return st;
    if (t->shape[2] != t->shape[3])
        return dm_fail(DM_ERR_FORMAT, "%s: x_embedder.proj.weight: non-square patch %lldx%lld", p,
                       (long long)t->shape[2], (long long)t->shape[3]);
    c->hidden = (int)t->shape[0];
    c->in_channels = (int)t->shape[1];
    c->patch = (int)t->shape[2];
    if (!(t = need(f, "pos_embed", 3, &st))) return st;
    int64_t T = t->shape[1], side = (int64_t)llround(sqrt((double)T));
    if (t->shape[0] != 1 || t->shape[2] != c->hidden || side * side != T) {
        char sh[160];
        return dm_fail(DM_ERR_FORMAT, "%s: pos_embed: shape %s expected [1,T,%d] with T a square",
                       p, dm_fmt_shape(sh, sizeof sh, t->ndim, t->shape), c->hidden);
    }
    c->input_size = (int)(side * c->patch);
    c->depth = max_block_index(f);
    if (c->depth < 1) return dm_fail(DM_ERR_FORMAT, "%s: no tensors named blocks.N.*", p);
    c->arch = has_promoe_key(f) ? DM_ARCH_PROMOE : DM_ARCH_DITMOE;
    if (c->arch == DM_ARCH_DITMOE) {
        if (!(t = need(f, "blocks.0.moe.gate.weight", 2, &st))) return st;
        c->num_experts = (int)t->shape[0];
        if (!(t = need(f, "blocks.0.moe.experts.0.gate_proj.weight", 2, &st))) return st;
        c->expert_hidden = (int)t->shape[0];
        t = dm_st_find(f, "blocks.0.moe.shared_experts.gate_proj.weight");
        if (t && !(t = need(f, "blocks.0.moe.shared_experts.gate_proj.weight", 2, &st))) return st;
        c->shared_hidden = t ? (int)t->shape[0] : 0;
        c->top_k = c->num_experts < 2 ? c->num_experts : 2;
    }
    const dm_st_tensor *qn = dm_st_find(f, "blocks.0.attn.q_norm.weight");
    c->attn = dm_st_find(f, "blocks.0.attn.Wqkv.weight") || qn ? DM_ATTN_QKNORM : DM_ATTN_TIMM;
    int ri = released_index(c->hidden);
    if (ri >= 0) {
        c->heads = k_released[ri].heads;
    } else if (qn && qn->ndim == 1 && qn->shape[0] > 0 && c->hidden % qn->shape[0] == 0) {
        c->heads = (int)(c->hidden / qn->shape[0]); /* the head dim is stored for qk-norm models */
    } else {
        return dm_fail(DM_ERR_FORMAT,
                       "%s: cannot infer num_heads for hidden size %d; convert with --heads", p,
                       c->hidden);
    }
    if (qn && (qn->ndim != 1 || qn->shape[0] * c->heads != c->hidden)) {
        char sh[160];
        return dm_fail(DM_ERR_FORMAT,
                       "%s: blocks.0.attn.q_norm.weight: shape %s expected [%d] (hidden %d / %d heads)",
                       p, dm_fmt_shape(sh, sizeof sh, qn->ndim, qn->shape), c->hidden / c->heads,
                       c->hidden, c->heads);
    }
    if (!(t = need(f, "final_layer.linear.weight", 2, &st))) return st;
    int64_t pp = (int64_t)c->patch * c->patch;
    if (t->shape[0] % pp != 0 ||
        (t->shape[0] / pp != c->in_channels && t->shape[0] / pp != 2 * c->in_channels)) {
        return dm_fail(DM_ERR_FORMAT,
                       "%s: final_layer.linear.weight: %lld rows expected %lld or %lld (p*p*C or "
                       "p*p*2C)",
                       p, (long long)t->shape[0], (long long)(pp * c->in_channels),
                       (long long)(pp * 2 * c->in_channels));
    }
    c->out_channels = (int)(t->shape[0] / pp);
    c->learn_sigma = c->out_channels == 2 * c->in_channels;
    if (!(t = need(f, "y_embedder.embedding_table.weight", 2, &st))) return st;
    if (t->shape[0] < 2)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: y_embedder.embedding_table.weight: %lld rows expected >= 2 "
                       "(classes + the null class)",
                       p, (long long)t->shape[0]);
    if (t->shape[0] - 1 > DM_MAX_CLASSES)
        return dm_fail(DM_ERR_FORMAT, "%s: y_embedder.embedding_table.weight: %lld classes, more "
                       "than %d", p, (long long)(t->shape[0] - 1), DM_MAX_CLASSES);
    c->num_classes = (int)(t->shape[0] - 1);
    c->objective = c->attn == DM_ATTN_QKNORM ? DM_OBJ_RF : DM_OBJ_DDPM;
    c->vae_scale = 0.18215f;
    if (c->arch == DM_ARCH_PROMOE && (st = dm_promoe_infer(f, c)) != DM_OK) return st;
    if (ri >= 0 && c->arch == DM_ARCH_DITMOE)
        snprintf(c->name, sizeof c->name, "DiT-MoE-%s/%d-%dE%dA", k_released[ri].size, c->patch,
                 c->num_experts, c->top_k);
    dm_log(DM_LOG_INFO,
           "%s: no \"ditmoe\" metadata; inferred config from tensors: %s%s%s D=%d L=%d H=%d E=%d "
           "k=%d attention=%s objective=%s",
           p, dm_arch_name(c->arch), c->name[0] ? " " : "", c->name, c->hidden, c->depth, c->heads,
           c->num_experts, c->top_k, k_attn_names[c->attn], dm_objective_name(c->objective));
    return DM_OK;
}

dm_status dm_config_from_file(const dm_st_file *f, dm_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->qk_norm_eps = 1e-6f;
    cfg->time_scale = 1.0f;
    cfg->default_sampler = DM_SAMPLER_UNSET; /* sampling fields: only what the file says */
    cfg->cfg_channels = -1;
    const char *meta = dm_st_meta(f, "ditmoe");
    char *json = NULL; /* .pt files and overrides: the converter's JSON (pt_config.c) */
    dm_status st;
    if ((f->is_pt || f->has_overrides) && (st = dm_config_json(f, &json)) != DM_OK) return st;
    if (json) meta = json;
    if (meta) {
        st = parse_meta(dm_st_path(f), meta, cfg);
        if (st == DM_OK) st = cross_check(f, cfg);
    } else {
        st = infer(f, cfg);
        if (st == DM_OK) st = cross_check(f, cfg);
    }
    free(json);
    if (st == DM_OK) st = dm_config_default_class_names(cfg); /* ImageNet for 1000 classes */
    if (st != DM_OK) dm_config_free(cfg);
    return st;
}

/* ---- class ids ---- */
/* Lowercase; ' ', '_', '-', '/' all become '_'; surrounding spaces trimmed. */
static void norm_name(const char *s, size_t len, char *out, size_t cap)
{
    while (len && isspace((unsigned char)*s)) s++, len--;
    while (len && isspace((unsigned char)s[len - 1])) len--;
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < cap; i++) {
        char ch = (char)tolower((unsigned char)s[i]);
        out[n++] = (ch == ' ' || ch == '-' || ch == '/') ? '_' : ch;
    }
    out[n] = '\0';
}

/* A table entry matches the whole normalised name or one of its comma-separated synonyms
 * (ImageNet names look like "tench, Tinca tinca"). */
static int name_matches(const char *entry, const char *want)
{
    char buf[DM_MAX_CLASS_NAME + 8];
    norm_name(entry, strlen(entry), buf, sizeof buf);
    if (strcmp(buf, want) == 0) return 1;
    const char *s = entry;
    while (strchr(s, ',')) {
        const char *e = strchr(s, ',');
        norm_name(s, (size_t)(e - s), buf, sizeof buf);
        if (strcmp(buf, want) == 0) return 1;
        s = e + 1;
    }
    if (s != entry) {
        norm_name(s, strlen(s), buf, sizeof buf);
        if (strcmp(buf, want) == 0) return 1;
    }
    return 0;
}

/* " (expected an id in 0..N-1 or one of: "a", "b")" into msg. */
static void class_hint(const dm_config *cfg, char *msg, size_t cap)
{
    int n = snprintf(msg, cap, "expected an id in 0..%d", cfg->num_classes - 1);
    if (cfg->class_names && cfg->num_classes <= 20) {
        n += snprintf(msg + n, cap - (size_t)n, " or one of:");
        for (int i = 0; i < cfg->num_classes && n < (int)cap; i++)
            n += snprintf(msg + n, cap - (size_t)n, "%s \"%s\"", i ? "," : "", cfg->class_names[i]);
    } else if (cfg->class_names) {
        n += snprintf(msg + n, cap - (size_t)n, " or a class name from the model's table");
    } else {
        n += snprintf(msg + n, cap - (size_t)n, "; this model has no class names");
    }
}

dm_status dm_config_class_id(const dm_config *cfg, const char *s, int *out)
{
    *out = -1;
    char hint[900];
    const char *q = s;
    while (isspace((unsigned char)*q)) q++;
    if (isdigit((unsigned char)*q) || ((*q == '-' || *q == '+') && isdigit((unsigned char)q[1]))) {
        char *end;
        errno = 0;
        long v = strtol(q, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (*end == '\0') {
            if (errno || v < 0 || v >= cfg->num_classes) {
                class_hint(cfg, hint, sizeof hint);
                const char *in = cfg->num_classes != 1000 && !errno ? dm_imagenet_class((int)v) : NULL;
                if (in) /* e.g. --class 207 on the default 10-class model */
                    return dm_fail(DM_ERR_ARG,
                                   "class id %s out of range (%s); %ld is an ImageNet class (%s): "
                                   "pass --model with an ImageNet checkpoint, e.g. --model "
                                   "dit_moe_s_8E2A.pt",
                                   s, hint, v, in);
                return dm_fail(DM_ERR_ARG, "class id %s out of range (%s)", s, hint);
            }
            *out = (int)v;
            return DM_OK;
        }
    }
    if (cfg->class_names) {
        char want[256];
        norm_name(s, strlen(s), want, sizeof want);
        for (int i = 0; i < cfg->num_classes && want[0]; i++)
            if (name_matches(cfg->class_names[i], want)) {
                *out = i;
                return DM_OK;
            }
    }
    class_hint(cfg, hint, sizeof hint);
    return dm_fail(DM_ERR_ARG, "unknown class \"%s\" (%s)", s, hint);
}

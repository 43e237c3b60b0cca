/* The configuration tools/convert_checkpoint.py writes, computed in C from a tensor table and the
 * converter's flags (dm_config_overrides): the same inference, defaults, checks and messages, and
 * the same JSON object (key order included), so that a .pt loaded directly configures the model
 * exactly as the safetensors the converter makes from it. Also the overlay of overrides on a
 * file's own "ditmoe" metadata, and the default-free init of the overrides. */
#include "io/st_internal.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dm_config_overrides_init(dm_config_overrides *o)
{
    memset(o, 0, sizeof *o);
    o->heads = o->top_k = o->num_classes = -1;
    o->steps = -1;
    o->cfg_scale = NAN;
    o->cfg_channels = -1;
}

int dm_config_overrides_any(const dm_config_overrides *o)
{
    return o->heads != -1 || o->top_k != -1 || o->num_classes != -1 || o->objective ||
           o->class_names || o->name || o->promoe_variant || o->router || o->vae_scale != 0 ||
           o->sampler || o->steps != -1 || !isnan(o->cfg_scale) || o->cfg_channels != -1;
}

/* Released configs: hidden -> (size, heads); DiT-MoE and ProMoE tables (the converter's). */
static const struct { int d; const char *size; int heads; } k_dit[] = {
    {384, "S", 6}, {768, "B", 12}, {1152, "XL", 16}, {1408, "G", 16}};
static const struct { int d; const char *size; int heads; } k_pro[] = {
    {384, "S", 6}, {768, "B", 12}, {1024, "L", 16}, {1152, "XL", 16}};

typedef struct {
    const dm_st_file *f;
    const char *p;
    const dm_config_overrides *ov;
} ictx;

#define ERR(...) dm_fail(DM_ERR_FORMAT, __VA_ARGS__)
#define TRY(x)                        \
    do {                              \
        dm_status st_ = (x);          \
        if (st_ != DM_OK) return st_; \
    } while (0)

static const dm_st_tensor *get(const ictx *c, const char *name) { return dm_st_find(c->f, name); }

static dm_status missing(const ictx *c, const char *name, const char *kind)
{
    return kind ? ERR("%s: missing tensor %s (not a %s state dict?)", c->p, name, kind)
                : ERR("%s: missing tensor %s", c->p, name);
}

static char *shp(char *buf, const dm_st_tensor *t) { return dm_fmt_shape(buf, 160, t->ndim, t->shape); }

typedef struct {
    int D, C, P, grid, depth;
} embed;

static dm_status embed_shapes(const ictx *c, const char *const *req, int nreq, const char *kind,
                              embed *e)
{
    char sh[160];
    for (int i = 0; i < nreq; i++)
        if (!get(c, req[i])) return missing(c, req[i], kind);
    const dm_st_tensor *xw = get(c, "x_embedder.proj.weight");
    if (xw->ndim != 4 || xw->shape[2] != xw->shape[3])
        return ERR("%s: x_embedder.proj.weight: shape %s expected [D,C,p,p]", c->p, shp(sh, xw));
    e->D = (int)xw->shape[0], e->C = (int)xw->shape[1], e->P = (int)xw->shape[2];
    const dm_st_tensor *pe = get(c, "pos_embed");
    int64_t T = pe->ndim == 3 ? pe->shape[1] : -1;
    int64_t g = T > 0 ? llround(sqrt((double)T)) : 0;
    if (pe->ndim != 3 || pe->shape[0] != 1 || pe->shape[2] != e->D || g * g != T)
        return ERR("%s: pos_embed: shape %s expected [1,G*G,%d]", c->p, shp(sh, pe), e->D);
    e->grid = (int)g;
    long mx = -1;
    for (int i = 0; i < dm_st_count(c->f); i++) {
        const char *n = dm_st_at(c->f, i)->name;
        if (strncmp(n, "blocks.", 7) || !isdigit((unsigned char)n[7])) continue;
        char *end;
        errno = 0;
        long v = strtol(n + 7, &end, 10);
        if (!errno && *end == '.' && v > mx && v < 1000000) mx = v;
    }
    if (mx < 0) return ERR("%s: no tensors named blocks.N.* (not a %s state dict?)", c->p, kind);
    e->depth = (int)mx + 1;
    return DM_OK;
}

static dm_status rows(const ictx *c, const char *name, int *out)
{
    char sh[160];
    const dm_st_tensor *t = get(c, name);
    if (!t) return missing(c, name, NULL);
    if (t->ndim != 2) return ERR("%s: %s: shape %s expected a 2-D tensor", c->p, name, shp(sh, t));
    *out = (int)t->shape[0];
    return DM_OK;
}

static dm_status read_class_names(const ictx *c, int num_classes, cJSON *cfg)
{
    const char *path = c->ov->class_names;
    FILE *fp = fopen(path, "rb");
    if (!fp) return dm_fail(DM_ERR_IO, "%s: --class-names %s: %s", c->p, path, strerror(errno));
    cJSON *arr = cJSON_AddArrayToObject(cfg, "class_names");
    char *line = NULL;
    size_t lcap = 0;
    ssize_t got;
    int n = 0, last_nonblank = 0;
    while (arr && (got = getline(&line, &lcap, fp)) >= 0) {
        size_t len = (size_t)got;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        cJSON_AddItemToArray(arr, cJSON_CreateString(line));
        n++;
        int blank = 1;
        for (size_t i = 0; i < len; i++) blank &= isspace((unsigned char)line[i]) != 0;
        if (!blank) last_nonblank = n;
    }
    free(line);
    fclose(fp);
    if (!arr) return dm_fail(DM_ERR_NOMEM, "out of memory");
    while (n > last_nonblank) cJSON_DeleteItemFromArray(arr, --n); /* trailing blank lines */
    if (n != num_classes)
        return dm_fail(DM_ERR_ARG, "%s: --class-names %s: %d names, expected %d (num_classes)",
                       c->p, path, n, num_classes);
    return DM_OK;
}

static dm_status learn_sigma(const ictx *c, const embed *e, int *ls)
{
    char sh[160];
    const dm_st_tensor *fw = get(c, "final_layer.linear.weight");
    int64_t r = fw->shape[0], pp = (int64_t)e->P * e->P;
    if (r == pp * 2 * e->C) *ls = 1;
    else if (r == pp * e->C) *ls = 0;
    else
        return ERR("%s: final_layer.linear.weight: shape %s expected [%lld,%d] or [%lld,%d]", c->p,
                   shp(sh, fw), (long long)(pp * 2 * e->C), e->D, (long long)(pp * e->C), e->D);
    return DM_OK;
}

static dm_status num_classes(const ictx *c, int *out)
{
    const dm_st_tensor *t = get(c, "y_embedder.embedding_table.weight");
    int table = (int)t->shape[0];
    int n = c->ov->num_classes != -1 ? c->ov->num_classes : table - 1;
    if (n < 1 || table != n + 1)
        return dm_fail(c->ov->num_classes != -1 ? DM_ERR_ARG : DM_ERR_FORMAT,
                       "%s: --num-classes %d: y_embedder.embedding_table.weight has %d rows, "
                       "expected num_classes + 1 (null class last)",
                       c->p, n, table);
    *out = n;
    return DM_OK;
}

static dm_status heads(const ictx *c, int D, int released, const char *table, int *out)
{
    if (c->ov->heads != -1) *out = c->ov->heads;
    else if (released > 0) *out = released;
    else
        return ERR("%s: hidden size %d is not in the %sreleased-config table (%s): pass --heads N",
                   c->p, D, strcmp(table, "384/768/1024/1152") ? "" : "ProMoE ", table);
    if (*out < 1 || D % *out)
        return dm_fail(DM_ERR_ARG, "%s: --heads %d: hidden size %d is not divisible by it", c->p,
                       *out, D);
    return DM_OK;
}

/* sampling block: the objective's defaults with the given fields replaced, checked. */
static dm_status sampling(const ictx *c, cJSON *cfg, const char *sampler, int steps, double cfgs,
                          int chans, int C, int promoe)
{
    const dm_config_overrides *o = c->ov;
    if (o->sampler) sampler = o->sampler;
    if (o->steps != -1) steps = o->steps;
    if (!isnan(o->cfg_scale)) cfgs = o->cfg_scale;
    if (o->cfg_channels != -1) chans = o->cfg_channels;
    if (promoe && strcmp(sampler, "euler") && strcmp(sampler, "heun"))
        return dm_fail(DM_ERR_ARG, "%s: --sampler %s: ProMoE (rf) needs euler or heun", c->p, sampler);
    if (steps < 1) return dm_fail(DM_ERR_ARG, "%s: --steps %d: expected >= 1", c->p, steps);
    if (!(cfgs >= 0)) return dm_fail(DM_ERR_ARG, "%s: --cfg-scale %g: expected >= 0", c->p, cfgs);
    if (chans < 0 || chans > C)
        return dm_fail(DM_ERR_ARG, "%s: --cfg-channels %d: expected 0..%d", c->p, chans, C);
    cJSON *s = cJSON_AddObjectToObject(cfg, "sampling");
    if (!s || !cJSON_AddStringToObject(s, "sampler", sampler) ||
        !cJSON_AddNumberToObject(s, "steps", steps) || !cJSON_AddNumberToObject(s, "cfg_scale", cfgs) ||
        !cJSON_AddNumberToObject(s, "cfg_channels", chans))
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    return DM_OK;
}

/* check_shapes: every expected tensor present, of its shape, floating point. */
static dm_status expect(const ictx *c, const char *name, int nd, int64_t a, int64_t b, int64_t d2,
                        int64_t d3)
{
    const dm_st_tensor *t = get(c, name);
    int64_t s[4] = {a, b, d2, d3};
    if (!t) return missing(c, name, NULL);
    int same = t->ndim == nd;
    for (int i = 0; same && i < nd; i++) same = t->shape[i] == s[i];
    if (!same) {
        char x[160], y[160];
        return ERR("%s: %s: shape %s expected %s", c->p, name, shp(x, t), dm_fmt_shape(y, 160, nd, s));
    }
    if (t->dtype != DM_F32 && t->dtype != DM_F16 && t->dtype != DM_BF16)
        return ERR("%s: %s: dtype %s expected a floating-point tensor", c->p, name,
                   dm_dtype_name(t->dtype));
    return DM_OK;
}

#define E1(n, a) TRY(expect(c, n, 1, a, 0, 0, 0))
#define E2(n, a, b) TRY(expect(c, n, 2, a, b, 0, 0))

static dm_status check_common_head(const ictx *c, const embed *e, int ncls, int T)
{
    const int64_t D = e->D;
    TRY(expect(c, "pos_embed", 3, 1, T, D, 0));
    TRY(expect(c, "x_embedder.proj.weight", 4, D, e->C, e->P, e->P));
    E1("x_embedder.proj.bias", D);
    E2("t_embedder.mlp.0.weight", D, 256);
    E1("t_embedder.mlp.0.bias", D);
    E2("t_embedder.mlp.2.weight", D, D);
    E1("t_embedder.mlp.2.bias", D);
    E2("y_embedder.embedding_table.weight", ncls + 1, D);
    return DM_OK;
}

static dm_status check_tail(const ictx *c, const embed *e, int cout)
{
    const int64_t D = e->D, pp = (int64_t)e->P * e->P;
    E2("final_layer.linear.weight", pp * cout, D);
    E1("final_layer.linear.bias", pp * cout);
    E2("final_layer.adaLN_modulation.1.weight", 2 * D, D);
    E1("final_layer.adaLN_modulation.1.bias", 2 * D);
    return DM_OK;
}

static dm_status mlp(const ictx *c, const char *pre, const char *up, const char *down, int64_t F,
                     int64_t D)
{
    char k[256];
    snprintf(k, sizeof k, "%s.%s.weight", pre, up);
    E2(k, F, D);
    snprintf(k, sizeof k, "%s.%s.bias", pre, up);
    E1(k, F);
    snprintf(k, sizeof k, "%s.%s.weight", pre, down);
    E2(k, D, F);
    snprintf(k, sizeof k, "%s.%s.bias", pre, down);
    E1(k, D);
    return DM_OK;
}

static dm_status check_ditmoe(const ictx *c, const embed *e, int H, int E, int Fe, int Fs,
                              int qk, int ls, int ncls)
{
    const int64_t D = e->D, hd = D / H;
    char k[256];
    TRY(check_common_head(c, e, ncls, e->grid * e->grid));
    for (int i = 0; i < e->depth; i++) {
#define K(...) (snprintf(k, sizeof k, __VA_ARGS__), k)
        if (!qk) {
            E2(K("blocks.%d.attn.qkv.weight", i), 3 * D, D);
            E1(K("blocks.%d.attn.qkv.bias", i), 3 * D);
            E2(K("blocks.%d.attn.proj.weight", i), D, D);
            E1(K("blocks.%d.attn.proj.bias", i), D);
        } else {
            E2(K("blocks.%d.attn.Wqkv.weight", i), 3 * D, D);
            E1(K("blocks.%d.attn.Wqkv.bias", i), 3 * D);
            E1(K("blocks.%d.attn.q_norm.weight", i), hd);
            E1(K("blocks.%d.attn.q_norm.bias", i), hd);
            E1(K("blocks.%d.attn.k_norm.weight", i), hd);
            E1(K("blocks.%d.attn.k_norm.bias", i), hd);
            E2(K("blocks.%d.attn.out_proj.weight", i), D, D);
            E1(K("blocks.%d.attn.out_proj.bias", i), D);
        }
        for (int x = 0; x < E; x++) {
            E2(K("blocks.%d.moe.experts.%d.gate_proj.weight", i, x), Fe, D);
            E2(K("blocks.%d.moe.experts.%d.up_proj.weight", i, x), Fe, D);
            E2(K("blocks.%d.moe.experts.%d.down_proj.weight", i, x), D, Fe);
        }
        E2(K("blocks.%d.moe.gate.weight", i), E, D);
        if (Fs > 0) {
            E2(K("blocks.%d.moe.shared_experts.gate_proj.weight", i), Fs, D);
            E2(K("blocks.%d.moe.shared_experts.up_proj.weight", i), Fs, D);
            E2(K("blocks.%d.moe.shared_experts.down_proj.weight", i), D, Fs);
        }
        E2(K("blocks.%d.adaLN_modulation.1.weight", i), 6 * D, D);
        E1(K("blocks.%d.adaLN_modulation.1.bias", i), 6 * D);
    }
    return check_tail(c, e, ls ? 2 * e->C : e->C);
}

static dm_status check_promoe(const ictx *c, const embed *e, int H, int E, int Fe, int Fs, int Fm,
                              int qk, int ls, int ncls)
{
    const int64_t D = e->D, hd = D / H;
    char k[256], pre[128];
    TRY(check_common_head(c, e, ncls, e->grid * e->grid));
    for (int i = 0; i < e->depth; i++) {
        E2(K("blocks.%d.attn.qkv.weight", i), 3 * D, D);
        E1(K("blocks.%d.attn.qkv.bias", i), 3 * D);
        if (qk) {
            E1(K("blocks.%d.attn.q_norm.weight", i), hd);
            E1(K("blocks.%d.attn.q_norm.bias", i), hd);
            E1(K("blocks.%d.attn.k_norm.weight", i), hd);
            E1(K("blocks.%d.attn.k_norm.bias", i), hd);
        }
        E2(K("blocks.%d.attn.proj.weight", i), D, D);
        E1(K("blocks.%d.attn.proj.bias", i), D);
        if (i % 2 == 0) {
            snprintf(pre, sizeof pre, "blocks.%d.mlp", i);
            TRY(mlp(c, pre, "fc1", "fc2", Fm, D));
        } else {
            E2(K("blocks.%d.mlp.cluster_centers", i), E, D);
            for (int x = 0; x <= E; x++) {
                snprintf(pre, sizeof pre, "blocks.%d.mlp.experts.%d", i, x);
                TRY(mlp(c, pre, "up_proj", "down_proj", Fe, D));
            }
            if (Fs > 0) {
                snprintf(pre, sizeof pre, "blocks.%d.mlp.shared_expert", i);
                TRY(mlp(c, pre, "up_proj", "down_proj", Fs, D));
            }
        }
        E2(K("blocks.%d.adaLN_modulation.1.weight", i), 6 * D, D);
        E1(K("blocks.%d.adaLN_modulation.1.bias", i), 6 * D);
#undef K
    }
    return check_tail(c, e, ls ? 2 * e->C : e->C);
}

static int add_common(cJSON *cfg, const char *arch, const embed *e, int H, int E, int k, int Fe,
                      int Fs)
{
    return cJSON_AddNumberToObject(cfg, "format_version", 1) && cJSON_AddStringToObject(cfg, "arch", arch) &&
           cJSON_AddStringToObject(cfg, "name", "") && cJSON_AddNumberToObject(cfg, "hidden_size", e->D) &&
           cJSON_AddNumberToObject(cfg, "depth", e->depth) && cJSON_AddNumberToObject(cfg, "num_heads", H) &&
           cJSON_AddNumberToObject(cfg, "num_experts", E) && cJSON_AddNumberToObject(cfg, "top_k", k) &&
           cJSON_AddNumberToObject(cfg, "expert_hidden", Fe) &&
           cJSON_AddNumberToObject(cfg, "shared_hidden", Fs);
}

static int add_shape(cJSON *cfg, const char *attn, const embed *e, int ls, int ncls)
{
    return cJSON_AddStringToObject(cfg, "attention", attn) &&
           cJSON_AddNumberToObject(cfg, "patch_size", e->P) &&
           cJSON_AddNumberToObject(cfg, "input_size", e->grid * e->P) &&
           cJSON_AddNumberToObject(cfg, "in_channels", e->C) &&
           cJSON_AddBoolToObject(cfg, "learn_sigma", ls) &&
           cJSON_AddNumberToObject(cfg, "num_classes", ncls);
}

static void set_name(cJSON *cfg, const char *name)
{
    cJSON_ReplaceItemInObjectCaseSensitive(cfg, "name", cJSON_CreateString(name));
}

static double vae_scale(const ictx *c) { return c->ov->vae_scale != 0 ? c->ov->vae_scale : 0.18215; }

static dm_status infer_ditmoe(const ictx *c, cJSON *cfg)
{
    const dm_config_overrides *o = c->ov;
    if (o->promoe_variant)
        return dm_fail(DM_ERR_ARG, "%s: --promoe-variant: only for ProMoE checkpoints (no "
                       "blocks.N.mlp.cluster_centers tensor found)", c->p);
    if (o->router)
        return dm_fail(DM_ERR_ARG, "%s: --router: only for ProMoE checkpoints (no "
                       "blocks.N.mlp.cluster_centers tensor found)", c->p);
    static const char *const req[] = {"x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight",
                                      "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
                                      "blocks.0.moe.gate.weight", "final_layer.linear.weight",
                                      "final_layer.adaLN_modulation.1.weight"};
    embed e;
    TRY(embed_shapes(c, req, 8, "DiT-MoE", &e));
    int E = (int)get(c, "blocks.0.moe.gate.weight")->shape[0];
    int qk = get(c, "blocks.0.attn.Wqkv.weight") != NULL;
    const dm_st_tensor *eg = get(c, "blocks.0.moe.experts.0.gate_proj.weight");
    if (!eg) return missing(c, "blocks.0.moe.experts.0.gate_proj.weight", NULL);
    int Fe = (int)eg->shape[0];
    const dm_st_tensor *sg = get(c, "blocks.0.moe.shared_experts.gate_proj.weight");
    int Fs = sg ? (int)sg->shape[0] : 0;
    int ls = 0;
    TRY(learn_sigma(c, &e, &ls));
    int ri = -1;
    for (int i = 0; i < 4; i++)
        if (k_dit[i].d == e.D) ri = i;
    int H = 1;
    TRY(heads(c, e.D, ri >= 0 ? k_dit[ri].heads : 0, "384/768/1152/1408", &H));
    if (qk) {
        const dm_st_tensor *qn = get(c, "blocks.0.attn.q_norm.weight");
        if (qn && (qn->ndim != 1 || qn->shape[0] != e.D / H)) {
            char sh[160];
            return dm_fail(o->heads != -1 ? DM_ERR_ARG : DM_ERR_FORMAT,
                           "%s: %s %d: head dim %d does not match blocks.0.attn.q_norm.weight %s",
                           c->p, o->heads != -1 ? "--heads" : "heads from the table", H, e.D / H,
                           shp(sh, qn));
        }
    }
    int k = o->top_k != -1 ? o->top_k : 2;
    if (k < 1 || k > E)
        return dm_fail(DM_ERR_ARG, "%s: --top-k %d: expected 1..%d (num_experts from "
                       "blocks.0.moe.gate.weight)", c->p, k, E);
    int ncls = 0;
    TRY(num_classes(c, &ncls));
    const char *obj = o->objective ? o->objective : qk ? "rf" : "ddpm";
    if (strcmp(obj, "rf") && strcmp(obj, "ddpm"))
        return dm_fail(DM_ERR_ARG, "%s: --objective %s: expected ddpm or rf", c->p, obj);
    if (!add_common(cfg, "dit-moe", &e, H, E, k, Fe, Fs) ||
        !add_shape(cfg, qk ? "qknorm" : "timm", &e, ls, ncls))
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    char name[96];
    if (o->name) set_name(cfg, o->name);
    else if (ri >= 0) {
        snprintf(name, sizeof name, "DiT-MoE-%s/%d-%dE%dA", k_dit[ri].size, e.P, E, k);
        set_name(cfg, name);
    }
    if (o->class_names) TRY(read_class_names(c, ncls, cfg));
    cJSON_AddStringToObject(cfg, "objective", obj);
    cJSON_AddNumberToObject(cfg, "vae_scale", vae_scale(c));
    if (o->sampler || o->steps != -1 || !isnan(o->cfg_scale) || o->cfg_channels != -1) {
        int rf = !strcmp(obj, "rf");
        TRY(sampling(c, cfg, rf ? "euler" : "ddpm", rf ? 50 : 250, 4.0, rf ? 0 : 3, e.C, 0));
    }
    return check_ditmoe(c, &e, H, E, Fe, Fs, qk, ls, ncls);
}

static int promoe_key(const char *n)
{
    if (strncmp(n, "blocks.", 7) || !isdigit((unsigned char)n[7])) return -1;
    char *end;
    long v = strtol(n + 7, &end, 10);
    return strcmp(end, ".mlp.cluster_centers") == 0 && v < 1000000 ? (int)v : -1;
}

static dm_status infer_promoe(const ictx *c, cJSON *cfg)
{
    const dm_config_overrides *o = c->ov;
    static const char *const req[] = {"x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight",
                                      "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
                                      "final_layer.linear.weight",
                                      "final_layer.adaLN_modulation.1.weight"};
    embed e;
    TRY(embed_shapes(c, req, 7, "ProMoE", &e));
    /* MoE blocks must be exactly the odd ones. */
    char *seen = calloc((size_t)e.depth + 1, 1);
    if (!seen) return dm_fail(DM_ERR_NOMEM, "out of memory");
    int bad = 0;
    for (int i = 0; i < dm_st_count(c->f); i++) {
        int b = promoe_key(dm_st_at(c->f, i)->name);
        if (b >= 0 && b < e.depth) seen[b] = 1;
        else if (b >= 0) bad = 1;
    }
    for (int i = 0; i < e.depth; i++) bad |= seen[i] != (i % 2 == 1);
    if (bad) {
        char got[256] = "", want[256] = "";
        size_t g = 0, w = 0;
        for (int i = 0; i < e.depth; i++) {
            if (seen[i] && g < sizeof got) g += (size_t)snprintf(got + g, sizeof got - g, "%s%d", g ? ", " : "", i);
            if (i % 2 && w < sizeof want) w += (size_t)snprintf(want + w, sizeof want - w, "%s%d", w ? ", " : "", i);
        }
        free(seen);
        return ERR("%s: MoE blocks (with mlp.cluster_centers) are [%s], expected the odd blocks "
                   "[%s] of %d", c->p, got, want, e.depth);
    }
    free(seen);
    int E = 0, Fe = 0, Fm = 0, Fs = 0;
    TRY(rows(c, "blocks.1.mlp.cluster_centers", &E));
    TRY(rows(c, "blocks.1.mlp.experts.0.up_proj.weight", &Fe));
    TRY(rows(c, "blocks.0.mlp.fc1.weight", &Fm));
    if (get(c, "blocks.1.mlp.shared_expert.up_proj.weight"))
        TRY(rows(c, "blocks.1.mlp.shared_expert.up_proj.weight", &Fs));
    int qk = get(c, "blocks.0.attn.q_norm.weight") != NULL;
    int ls = 0;
    TRY(learn_sigma(c, &e, &ls));
    int ri = -1;
    for (int i = 0; i < 4; i++)
        if (k_pro[i].d == e.D) ri = i;
    int H = 1;
    TRY(heads(c, e.D, ri >= 0 ? k_pro[ri].heads : 0, "384/768/1024/1152", &H));
    int k = o->top_k != -1 ? o->top_k : 1;
    if (k < 1 || k > E)
        return dm_fail(DM_ERR_ARG, "%s: --top-k %d: expected 1..%d (num_experts from "
                       "blocks.1.mlp.cluster_centers)", c->p, k, E);
    int ncls = 0;
    TRY(num_classes(c, &ncls));
    if (o->objective && strcmp(o->objective, "rf"))
        return dm_fail(DM_ERR_ARG, "%s: --objective %s: ProMoE models are rectified flow (rf)",
                       c->p, o->objective);
    const char *variant = o->promoe_variant ? o->promoe_variant : "tc";
    const char *router = o->router ? o->router : "identity";
    if (strcmp(variant, "tc") && strcmp(variant, "ec"))
        return dm_fail(DM_ERR_ARG, "%s: --promoe-variant %s: expected tc or ec", c->p, variant);
    if (strcmp(router, "identity") && strcmp(router, "softmax") && strcmp(router, "sigmoid"))
        return dm_fail(DM_ERR_ARG, "%s: --router %s: expected identity, softmax or sigmoid", c->p,
                       router);
    if (!add_common(cfg, "promoe", &e, H, E, k, Fe, Fs) ||
        !cJSON_AddNumberToObject(cfg, "mlp_hidden", Fm) ||
        !add_shape(cfg, qk ? "qknorm" : "timm", &e, ls, ncls))
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    char name[96];
    if (o->name) set_name(cfg, o->name);
    else if (ri >= 0) {
        snprintf(name, sizeof name, "ProMoE-%s/%d-%dE%dA-%s", k_pro[ri].size, e.P, E, k,
                 strcmp(variant, "ec") ? "TC" : "EC");
        set_name(cfg, name);
    }
    if (o->class_names) TRY(read_class_names(c, ncls, cfg));
    cJSON_AddStringToObject(cfg, "objective", "rf");
    cJSON_AddNumberToObject(cfg, "time_scale", 1000.0);
    cJSON_AddNumberToObject(cfg, "vae_scale", vae_scale(c));
    cJSON *pm = cJSON_AddObjectToObject(cfg, "promoe");
    if (!pm || !cJSON_AddStringToObject(pm, "variant", variant) ||
        !cJSON_AddStringToObject(pm, "router", router))
        return dm_fail(DM_ERR_NOMEM, "out of memory");
    TRY(sampling(c, cfg, "euler", 250, 1.5, 0, e.C, 1));
    return check_promoe(c, &e, H, E, Fe, Fs, Fm, qk, ls, ncls);
}

static dm_status print_json(cJSON *cfg, dm_status st, char **json)
{
    *json = NULL;
    if (st == DM_OK && !(*json = dm_json_python(cfg))) st = dm_fail(DM_ERR_NOMEM, "out of memory");
    cJSON_Delete(cfg);
    return st;
}

dm_status dm_config_infer_json(const dm_st_file *f, const dm_config_overrides *ov, char **json)
{
    dm_config_overrides none;
    if (!ov) {
        dm_config_overrides_init(&none);
        ov = &none;
    }
    if (ov->vae_scale != 0 && !(ov->vae_scale > 0))
        return dm_fail(DM_ERR_ARG, "--vae-scale must be a positive number");
    ictx c = {f, dm_st_path(f), ov};
    cJSON *cfg = cJSON_CreateObject();
    if (!cfg) return dm_fail(DM_ERR_NOMEM, "out of memory");
    int promoe = 0;
    for (int i = 0; i < dm_st_count(f) && !promoe; i++) promoe = promoe_key(dm_st_at(f, i)->name) >= 0;
    return print_json(cfg, promoe ? infer_promoe(&c, cfg) : infer_ditmoe(&c, cfg), json);
}

static int set_num(cJSON *o, const char *k, double v)
{
    cJSON *n = cJSON_CreateNumber(v);
    if (!n) return 0;
    if (cJSON_HasObjectItem(o, k)) return cJSON_ReplaceItemInObjectCaseSensitive(o, k, n);
    return cJSON_AddItemToObject(o, k, n);
}

static int set_str(cJSON *o, const char *k, const char *v)
{
    cJSON *n = cJSON_CreateString(v);
    if (!n) return 0;
    if (cJSON_HasObjectItem(o, k)) return cJSON_ReplaceItemInObjectCaseSensitive(o, k, n);
    return cJSON_AddItemToObject(o, k, n);
}

static cJSON *sub(cJSON *o, const char *k)
{
    cJSON *s = cJSON_GetObjectItemCaseSensitive(o, k);
    if (cJSON_IsObject(s)) return s;
    cJSON_DeleteItemFromObjectCaseSensitive(o, k);
    return cJSON_AddObjectToObject(o, k);
}

dm_status dm_config_overlay_json(const char *path, const char *meta, const dm_config_overrides *o,
                                 char **json)
{
    *json = NULL;
    cJSON *cfg = cJSON_Parse(meta);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return dm_fail(DM_ERR_FORMAT, "%s: metadata \"ditmoe\": not a JSON object", path);
    }
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(cfg, "arch");
    int promoe = cJSON_IsString(arch) && !strcmp(arch->valuestring, "promoe");
    dm_status st = DM_OK;
    int ok = 1;
    if ((o->promoe_variant || o->router) && !promoe)
        st = dm_fail(DM_ERR_ARG, "%s: %s: only for ProMoE models", path,
                     o->promoe_variant ? "--promoe-variant" : "--router");
    if (o->heads != -1) ok &= set_num(cfg, "num_heads", o->heads);
    if (o->top_k != -1) ok &= set_num(cfg, "top_k", o->top_k);
    if (o->num_classes != -1) ok &= set_num(cfg, "num_classes", o->num_classes);
    if (o->objective) ok &= set_str(cfg, "objective", o->objective);
    if (o->name) ok &= set_str(cfg, "name", o->name);
    if (o->vae_scale != 0) ok &= set_num(cfg, "vae_scale", o->vae_scale);
    if (promoe && (o->promoe_variant || o->router)) {
        cJSON *pm = sub(cfg, "promoe");
        ok &= pm != NULL;
        if (pm && o->promoe_variant) ok &= set_str(pm, "variant", o->promoe_variant);
        if (pm && o->router) ok &= set_str(pm, "router", o->router);
    }
    if (o->sampler || o->steps != -1 || !isnan(o->cfg_scale) || o->cfg_channels != -1) {
        cJSON *s = sub(cfg, "sampling");
        ok &= s != NULL;
        if (s && o->sampler) ok &= set_str(s, "sampler", o->sampler);
        if (s && o->steps != -1) ok &= set_num(s, "steps", o->steps);
        if (s && !isnan(o->cfg_scale)) ok &= set_num(s, "cfg_scale", o->cfg_scale);
        if (s && o->cfg_channels != -1) ok &= set_num(s, "cfg_channels", o->cfg_channels);
    }
    if (st == DM_OK && o->class_names) {
        const cJSON *nc = cJSON_GetObjectItemCaseSensitive(cfg, "num_classes");
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "class_names");
        dm_st_file dummy = {.path = (char *)path};
        ictx c = {&dummy, path, o};
        st = read_class_names(&c, cJSON_IsNumber(nc) ? nc->valueint : -1, cfg);
    }
    if (st == DM_OK && !ok) st = dm_fail(DM_ERR_NOMEM, "out of memory");
    return print_json(cfg, st, json);
}

dm_status dm_config_json(const dm_st_file *f, char **json)
{
    const char *meta = dm_st_meta(f, "ditmoe");
    const dm_config_overrides *ov = f->has_overrides ? &f->ov : NULL;
    if (!meta) return dm_config_infer_json(f, ov, json);
    if (ov) return dm_config_overlay_json(dm_st_path(f), meta, ov, json);
    *json = strdup(meta);
    return *json ? DM_OK : dm_fail(DM_ERR_NOMEM, "out of memory");
}

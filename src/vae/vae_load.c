/* VAE decoder loading: naming-scheme detection (diffusers current / diffusers 0.4.2 legacy / ldm,
 * with or without "first_stage_model."), configuration inferred from tensor shapes (plus the
 * optional "__metadata__" key "ditmoe.vae"), weights converted to float32. Encoder tensors are
 * ignored. See docs/vae.md and docs/spec/vae_samplers.md A.8-A.9. Weights become backend handles
 * (float32). */
#include "vae/vae_internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { SCHEME_DIFFUSERS = 0, SCHEME_LEGACY, SCHEME_LDM } scheme_t;
static const char *scheme_name[] = {"diffusers", "diffusers-legacy (query/key/value/proj_attn)",
                                    "ldm"};

typedef struct {
    const dm_st_file *f;
    dm_backend *be;
    const char *path;
    scheme_t scheme;
    const char *prefix; /* "" or "first_stage_model." */
    int L;              /* up levels, needed for ldm index reversal */
    char **used;        /* names consumed, to report unexpected decoder tensors */
    int nused, capused;
} loader;

static int starts(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

/* Replace the leading `from` of s (already known to match) by `to`; result in out. */
static void subst(char *out, size_t cap, const char *s, const char *from, const char *to)
{
    snprintf(out, cap, "%s%s", to, s + strlen(from));
}

/* diffusers-current name -> the file's spelling (prefix included). */
static void file_name(const loader *ld, const char *dname, char *out, size_t cap)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s", dname);
    if (ld->scheme == SCHEME_LEGACY) {
        static const char *pairs[][2] = {{".to_q.", ".query."}, {".to_k.", ".key."},
                                         {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
        for (int i = 0; i < 4; i++) {
            char *p = strstr(tmp, pairs[i][0]);
            if (p) {
                char rest[256];
                snprintf(rest, sizeof rest, "%s", p + strlen(pairs[i][0]));
                snprintf(p, sizeof tmp - (size_t)(p - tmp), "%s%s", pairs[i][1], rest);
            }
        }
    } else if (ld->scheme == SCHEME_LDM) {
        static const char *pairs[][2] = {
            {"decoder.mid_block.resnets.0.", "decoder.mid.block_1."},
            {"decoder.mid_block.resnets.1.", "decoder.mid.block_2."},
            {"decoder.mid_block.attentions.0.group_norm.", "decoder.mid.attn_1.norm."},
            {"decoder.mid_block.attentions.0.to_q.", "decoder.mid.attn_1.q."},
            {"decoder.mid_block.attentions.0.to_k.", "decoder.mid.attn_1.k."},
            {"decoder.mid_block.attentions.0.to_v.", "decoder.mid.attn_1.v."},
            {"decoder.mid_block.attentions.0.to_out.0.", "decoder.mid.attn_1.proj_out."},
            {"decoder.conv_norm_out.", "decoder.norm_out."}};
        char t2[256];
        for (int i = 0; i < 8; i++)
            if (starts(tmp, pairs[i][0])) {
                subst(t2, sizeof t2, tmp, pairs[i][0], pairs[i][1]);
                snprintf(tmp, sizeof tmp, "%s", t2);
                break;
            }
        int lvl, j, n = 0;
        if (sscanf(tmp, "decoder.up_blocks.%d.resnets.%d.%n", &lvl, &j, &n) == 2 && n > 0) {
            const char *rest = tmp + n;
            if (starts(rest, "conv_shortcut."))
                snprintf(t2, sizeof t2, "decoder.up.%d.block.%d.nin_shortcut.%s", ld->L - 1 - lvl, j,
                         rest + strlen("conv_shortcut."));
            else
                snprintf(t2, sizeof t2, "decoder.up.%d.block.%d.%s", ld->L - 1 - lvl, j, rest);
            snprintf(tmp, sizeof tmp, "%s", t2);
        } else if (sscanf(tmp, "decoder.up_blocks.%d.upsamplers.0.conv.%n", &lvl, &n) == 1 && n > 0) {
            snprintf(t2, sizeof t2, "decoder.up.%d.upsample.conv.%s", ld->L - 1 - lvl, tmp + n);
            snprintf(tmp, sizeof tmp, "%s", t2);
        }
    }
    snprintf(out, cap, "%s%s", ld->prefix, tmp);
}

static const dm_st_tensor *find(const loader *ld, const char *dname, char *fname, size_t cap)
{
    file_name(ld, dname, fname, cap);
    return dm_st_find(ld->f, fname);
}

static void fmt_shape(char *out, size_t cap, int ndim, const int64_t *shape)
{
    size_t o = 0;
    o += (size_t)snprintf(out + o, cap - o, "[");
    for (int i = 0; i < ndim && o < cap; i++)
        o += (size_t)snprintf(out + o, cap - o, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (o < cap) snprintf(out + o, cap - o, "]");
}

static dm_status note_used(loader *ld, const char *fname)
{
    if (ld->nused == ld->capused) {
        int nc = ld->capused ? 2 * ld->capused : 256;
        char **nu = realloc(ld->used, sizeof(char *) * (size_t)nc);
        if (!nu) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", ld->path);
        ld->used = nu;
        ld->capused = nc;
    }
    ld->used[ld->nused] = strdup(fname);
    if (!ld->used[ld->nused]) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", ld->path);
    ld->nused++;
    return DM_OK;
}

/* Load the tensor named (diffusers-current) `dname` with shape shape[0..ndim); when alt_ndim > 0
 * the file may instead hold it with the trailing unit dims (ldm 1x1 convs for attention). */
static dm_status load_f32(loader *ld, const char *dname, int ndim, const int64_t *shape,
                          float **out, char *fname_out, size_t cap)
{
    char fname[256], want[96], got[96];
    const dm_st_tensor *t = find(ld, dname, fname, sizeof fname);
    fmt_shape(want, sizeof want, ndim, shape);
    if (!t) return dm_fail(DM_ERR_FORMAT, "%s: %s: missing tensor (expected shape %s)", ld->path,
                           fname, want);
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    int64_t sh4[4];
    if (!ok && ndim == 2 && t->ndim == 4 && t->shape[0] == shape[0] && t->shape[1] == shape[1] &&
        t->shape[2] == 1 && t->shape[3] == 1) {
        /* [out, in, 1, 1] 1x1 conv form of a linear weight: same memory layout. */
        sh4[0] = shape[0]; sh4[1] = shape[1]; sh4[2] = sh4[3] = 1;
        shape = sh4;
        ndim = 4;
        ok = 1;
    }
    if (!ok) {
        fmt_shape(got, sizeof got, t->ndim, t->shape);
        return dm_fail(DM_ERR_FORMAT, "%s: %s: shape %s expected %s", ld->path, fname, got, want);
    }
    if (t->dtype != DM_F32 && t->dtype != DM_F16 && t->dtype != DM_BF16)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: dtype %s expected F32, F16 or BF16", ld->path, fname,
                       dm_dtype_name(t->dtype));
    dm_status st = dm_st_load_f32(ld->f, fname, ndim, shape, out);
    if (st != DM_OK) return st;
    snprintf(fname_out, cap, "%s", fname);
    return note_used(ld, fname);
}

/* As load_f32, into a backend weight: 1-D tensors are VECTOR [n], others CONV [shape[0], rest]. */
static dm_status load(loader *ld, const char *dname, int ndim, const int64_t *shape,
                      dm_weight **out)
{
    char fname[256];
    float *f = NULL;
    dm_status st = load_f32(ld, dname, ndim, shape, &f, fname, sizeof fname);
    if (st != DM_OK) return st;
    int64_t cols = 1;
    for (int i = 1; i < ndim; i++) cols *= shape[i];
    st = dm_backend_weight_f32(ld->be, fname, DM_ROLE_VAE, ndim == 1 ? DM_USE_VECTOR : DM_USE_CONV,
                               (int)shape[0], (int)cols, f, out);
    free(f);
    return st;
}

static dm_status load_conv(loader *ld, const char *base, int cout, int cin, int k, dm_vae_conv *c)
{
    char n[224];
    c->cin = cin; c->cout = cout; c->k = k;
    int64_t ws[4] = {cout, cin, k, k}, bs[1] = {cout};
    snprintf(n, sizeof n, "%s.weight", base);
    dm_status st = load(ld, n, 4, ws, &c->w);
    if (st != DM_OK) return st;
    snprintf(n, sizeof n, "%s.bias", base);
    return load(ld, n, 1, bs, &c->b);
}

static dm_status load_linear(loader *ld, const char *base, int C, dm_weight **w, dm_weight **b)
{
    char n[224];
    int64_t ws[2] = {C, C}, bs[1] = {C};
    snprintf(n, sizeof n, "%s.weight", base);
    dm_status st = load(ld, n, 2, ws, w);
    if (st != DM_OK) return st;
    snprintf(n, sizeof n, "%s.bias", base);
    return load(ld, n, 1, bs, b);
}

static dm_status load_gn(loader *ld, const char *base, int c, int groups, dm_vae_gn *g)
{
    char n[224];
    if (c % groups != 0)
        return dm_fail(DM_ERR_FORMAT, "%s: %s: %d channels not divisible by %d norm groups",
                       ld->path, base, c, groups);
    g->c = c;
    int64_t s[1] = {c};
    snprintf(n, sizeof n, "%s.weight", base);
    dm_status st = load(ld, n, 1, s, &g->g);
    if (st != DM_OK) return st;
    snprintf(n, sizeof n, "%s.bias", base);
    return load(ld, n, 1, s, &g->b);
}

static dm_status load_res(loader *ld, const char *base, int cin, int cout, int groups, dm_vae_res *r)
{
    char n[160];
    dm_status st;
    r->cin = cin; r->cout = cout;
    snprintf(n, sizeof n, "%s.norm1", base);
    if ((st = load_gn(ld, n, cin, groups, &r->norm1)) != DM_OK) return st;
    snprintf(n, sizeof n, "%s.conv1", base);
    if ((st = load_conv(ld, n, cout, cin, 3, &r->conv1)) != DM_OK) return st;
    snprintf(n, sizeof n, "%s.norm2", base);
    if ((st = load_gn(ld, n, cout, groups, &r->norm2)) != DM_OK) return st;
    snprintf(n, sizeof n, "%s.conv2", base);
    if ((st = load_conv(ld, n, cout, cout, 3, &r->conv2)) != DM_OK) return st;
    if (cin != cout) {
        snprintf(n, sizeof n, "%s.conv_shortcut", base);
        if ((st = load_conv(ld, n, cout, cin, 1, &r->shortcut)) != DM_OK) return st;
    }
    return DM_OK;
}

/* A required 4-D tensor's shape, for config inference. */
static dm_status probe4(loader *ld, const char *dname, const dm_st_tensor **t)
{
    char fname[256];
    *t = find(ld, dname, fname, sizeof fname);
    if (!*t) return dm_fail(DM_ERR_FORMAT, "%s: %s: missing tensor", ld->path, fname);
    if ((*t)->ndim != 4) {
        char got[96];
        fmt_shape(got, sizeof got, (*t)->ndim, (*t)->shape);
        return dm_fail(DM_ERR_FORMAT, "%s: %s: shape %s expected a 4-D conv weight", ld->path,
                       fname, got);
    }
    return DM_OK;
}

static dm_status read_metadata(loader *ld, dm_vae *v, int *groups)
{
    v->info.scale = 0.18215f;
    *groups = 0;
    const char *m = dm_st_meta(ld->f, "ditmoe.vae");
    if (!m) return DM_OK;
    cJSON *j = cJSON_Parse(m);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return dm_fail(DM_ERR_FORMAT, "%s: __metadata__ \"ditmoe.vae\": not a JSON object", ld->path);
    }
    dm_status st = DM_OK;
    const cJSON *sf = cJSON_GetObjectItemCaseSensitive(j, "scaling_factor");
    const cJSON *ng = cJSON_GetObjectItemCaseSensitive(j, "norm_groups");
    if (sf) {
        if (!cJSON_IsNumber(sf) || !(sf->valuedouble > 0))
            st = dm_fail(DM_ERR_FORMAT, "%s: __metadata__ ditmoe.vae.scaling_factor: expected a "
                         "positive number", ld->path);
        else
            v->info.scale = (float)sf->valuedouble;
    }
    if (st == DM_OK && ng) {
        if (!cJSON_IsNumber(ng) || ng->valueint < 1 || ng->valuedouble != (double)ng->valueint)
            st = dm_fail(DM_ERR_FORMAT, "%s: __metadata__ ditmoe.vae.norm_groups: expected a "
                         "positive integer", ld->path);
        else
            *groups = ng->valueint;
    }
    cJSON_Delete(j);
    return st;
}

static dm_status detect(loader *ld)
{
    const int n = dm_st_count(ld->f);
    ld->prefix = NULL;
    for (int i = 0; i < n && !ld->prefix; i++) {
        const char *nm = dm_st_at(ld->f, i)->name;
        if (starts(nm, "decoder.")) ld->prefix = "";
        else if (starts(nm, "first_stage_model.decoder.")) ld->prefix = "first_stage_model.";
    }
    if (!ld->prefix)
        return dm_fail(DM_ERR_FORMAT, "%s: not a VAE decoder file (no decoder.* or "
                       "first_stage_model.decoder.* tensors)", ld->path);
    char a[128], b[128];
    snprintf(a, sizeof a, "%sdecoder.mid.", ld->prefix);
    snprintf(b, sizeof b, "%sdecoder.up.", ld->prefix);
    ld->scheme = SCHEME_DIFFUSERS;
    for (int i = 0; i < n; i++) {
        const char *nm = dm_st_at(ld->f, i)->name;
        if (starts(nm, a) || starts(nm, b)) { ld->scheme = SCHEME_LDM; break; }
    }
    if (ld->scheme == SCHEME_DIFFUSERS) {
        snprintf(a, sizeof a, "%sdecoder.mid_block.attentions.0.query.weight", ld->prefix);
        if (dm_st_find(ld->f, a)) ld->scheme = SCHEME_LEGACY;
    }
    return DM_OK;
}

/* Every decoder-side tensor in the file must have been consumed (otherwise it is a variant we do
 * not implement, e.g. attention in the up path, and decoding it silently would be wrong). */
static dm_status check_unused(loader *ld)
{
    char d[128], p[128];
    snprintf(d, sizeof d, "%sdecoder.", ld->prefix);
    snprintf(p, sizeof p, "%spost_quant_conv.", ld->prefix);
    for (int i = 0; i < dm_st_count(ld->f); i++) {
        const char *nm = dm_st_at(ld->f, i)->name;
        if (!starts(nm, d) && !starts(nm, p)) continue;
        int found = 0;
        for (int k = 0; k < ld->nused && !found; k++) found = strcmp(ld->used[k], nm) == 0;
        if (!found)
            return dm_fail(DM_ERR_FORMAT, "%s: %s: unexpected decoder tensor (unsupported VAE "
                           "variant for the %s naming scheme)", ld->path, nm, scheme_name[ld->scheme]);
    }
    return DM_OK;
}

static dm_status load_all(loader *ld, dm_vae *v)
{
    dm_status st;
    int meta_groups;
    if ((st = detect(ld)) != DM_OK) return st;
    if ((st = read_metadata(ld, v, &meta_groups)) != DM_OK) return st;

    /* Shapes that define the configuration. */
    const dm_st_tensor *t;
    if ((st = probe4(ld, "decoder.conv_in.weight", &t)) != DM_OK) return st;
    v->top = (int)t->shape[0];
    v->latent_ch = (int)t->shape[1];
    if ((st = probe4(ld, "post_quant_conv.weight", &t)) != DM_OK) return st;
    v->info.z_channels = (int)t->shape[1];
    if ((st = probe4(ld, "decoder.conv_out.weight", &t)) != DM_OK) return st;
    v->info.out_channels = (int)t->shape[0];

    /* Count levels (same count in both index orders). */
    int L = 0;
    for (;; L++) {
        char nm[200];
        if (ld->scheme == SCHEME_LDM)
            snprintf(nm, sizeof nm, "%sdecoder.up.%d.block.0.conv1.weight", ld->prefix, L);
        else
            snprintf(nm, sizeof nm, "%sdecoder.up_blocks.%d.resnets.0.conv1.weight", ld->prefix, L);
        if (!dm_st_find(ld->f, nm)) break;
    }
    if (L < 1)
        return dm_fail(DM_ERR_FORMAT, "%s: no up blocks (decoder.%s.0...) found", ld->path,
                       ld->scheme == SCHEME_LDM ? "up" : "up_blocks");
    if (L > DM_VAE_MAX_LEVELS)
        return dm_fail(DM_ERR_FORMAT, "%s: %d up blocks, at most %d supported", ld->path, L,
                       DM_VAE_MAX_LEVELS);
    ld->L = v->levels = L;
    int nres = 0;
    for (;; nres++) {
        char d[200], fname[256];
        snprintf(d, sizeof d, "decoder.up_blocks.0.resnets.%d.conv1.weight", nres);
        if (!find(ld, d, fname, sizeof fname)) break;
    }
    if (nres > DM_VAE_MAX_RES)
        return dm_fail(DM_ERR_FORMAT, "%s: %d resnets per up block, at most %d supported", ld->path,
                       nres, DM_VAE_MAX_RES);
    for (int i = 0; i < L; i++) {
        char d[200];
        snprintf(d, sizeof d, "decoder.up_blocks.%d.resnets.0.conv1.weight", i);
        if ((st = probe4(ld, d, &t)) != DM_OK) return st;
        v->level[i].width = (int)t->shape[0];
        v->level[i].nres = nres;
        v->level[i].has_up = i < L - 1;
    }
    {
        char fname[256];
        v->has_attn = find(ld, "decoder.mid_block.attentions.0.group_norm.weight", fname,
                           sizeof fname) != NULL;
    }
    v->info.factor = 1 << (L - 1);

    /* GroupNorm groups: metadata, else 32 when it divides every width, else the largest common
     * divisor <= 32 (the rule tests/ref/vae_ref.py uses for tiny configs). */
    int g = meta_groups;
    if (!g) {
        for (g = 32; g > 1; g--) {
            int ok = v->top % g == 0;
            for (int i = 0; i < L; i++) ok = ok && v->level[i].width % g == 0;
            if (ok) break;
        }
    }
    v->groups = g;

    /* Weights. */
    const int T = v->top;
    if ((st = load_conv(ld, "post_quant_conv", v->latent_ch, v->info.z_channels, 1, &v->post_quant)))
        return st;
    if ((st = load_conv(ld, "decoder.conv_in", T, v->latent_ch, 3, &v->conv_in))) return st;
    if ((st = load_res(ld, "decoder.mid_block.resnets.0", T, T, g, &v->mid[0]))) return st;
    if (v->has_attn) {
        dm_vae_attn *a = &v->attn;
        a->c = T;
        const char *b = "decoder.mid_block.attentions.0";
        char n[160];
        snprintf(n, sizeof n, "%s.group_norm", b);
        if ((st = load_gn(ld, n, T, g, &a->norm))) return st;
        snprintf(n, sizeof n, "%s.to_q", b);
        if ((st = load_linear(ld, n, T, &a->wq, &a->bq))) return st;
        snprintf(n, sizeof n, "%s.to_k", b);
        if ((st = load_linear(ld, n, T, &a->wk, &a->bk))) return st;
        snprintf(n, sizeof n, "%s.to_v", b);
        if ((st = load_linear(ld, n, T, &a->wv, &a->bv))) return st;
        snprintf(n, sizeof n, "%s.to_out.0", b);
        if ((st = load_linear(ld, n, T, &a->wo, &a->bo))) return st;
    }
    if ((st = load_res(ld, "decoder.mid_block.resnets.1", T, T, g, &v->mid[1]))) return st;
    int prev = T;
    for (int i = 0; i < L; i++) {
        dm_vae_level *lv = &v->level[i];
        for (int j = 0; j < nres; j++) {
            char n[160];
            snprintf(n, sizeof n, "decoder.up_blocks.%d.resnets.%d", i, j);
            if ((st = load_res(ld, n, j == 0 ? prev : lv->width, lv->width, g, &lv->res[j])))
                return st;
        }
        if (lv->has_up) {
            char n[160];
            snprintf(n, sizeof n, "decoder.up_blocks.%d.upsamplers.0.conv", i);
            if ((st = load_conv(ld, n, lv->width, lv->width, 3, &lv->up))) return st;
        }
        prev = lv->width;
    }
    if ((st = load_gn(ld, "decoder.conv_norm_out", prev, g, &v->norm_out))) return st;
    if ((st = load_conv(ld, "decoder.conv_out", v->info.out_channels, prev, 3, &v->conv_out)))
        return st;
    if ((st = check_unused(ld))) return st;
    dm_log(DM_LOG_VERBOSE,
           "%s: VAE decoder, %s names%s, z %d, top width %d, %d levels x %d resnets, %d groups, "
           "attention %s, out %d, factor %d, scale %g", ld->path, scheme_name[ld->scheme],
           ld->prefix[0] ? " (first_stage_model.)" : "", v->info.z_channels, T, L, nres, g,
           v->has_attn ? "yes" : "no", v->info.out_channels, v->info.factor, (double)v->info.scale);
    return DM_OK;
}

dm_status dm_vae_load_weights(const char *path, dm_vae *v)
{
    dm_st_file *f = NULL;
    dm_status st = dm_st_open(path, &f);
    if (st != DM_OK) return st;
    loader ld = {.f = f, .be = v->be, .path = path};
    snprintf(v->path, sizeof v->path, "%s", path);
    st = load_all(&ld, v);
    for (int i = 0; i < ld.nused; i++) free(ld.used[i]);
    free(ld.used);
    dm_st_close(f);
    return st;
}

static void wfree(dm_vae *v, dm_weight **w)
{
    v->be->ops->weight_free(v->be->ctx, *w);
    *w = NULL;
}
static void free_conv(dm_vae *v, dm_vae_conv *c) { wfree(v, &c->w); wfree(v, &c->b); }
static void free_gn(dm_vae *v, dm_vae_gn *g) { wfree(v, &g->g); wfree(v, &g->b); }
static void free_res(dm_vae *v, dm_vae_res *r)
{
    free_gn(v, &r->norm1); free_gn(v, &r->norm2);
    free_conv(v, &r->conv1); free_conv(v, &r->conv2); free_conv(v, &r->shortcut);
}

void dm_vae_free_weights(dm_vae *v)
{
    if (!v->be) return;
    free_conv(v, &v->post_quant);
    free_conv(v, &v->conv_in);
    free_res(v, &v->mid[0]);
    free_res(v, &v->mid[1]);
    dm_vae_attn *a = &v->attn;
    free_gn(v, &a->norm);
    dm_weight **ws[] = {&a->wq, &a->bq, &a->wk, &a->bk, &a->wv, &a->bv, &a->wo, &a->bo};
    for (size_t i = 0; i < sizeof ws / sizeof *ws; i++) wfree(v, ws[i]);
    for (int i = 0; i < DM_VAE_MAX_LEVELS; i++) {
        for (int j = 0; j < DM_VAE_MAX_RES; j++) free_res(v, &v->level[i].res[j]);
        free_conv(v, &v->level[i].up);
    }
    free_gn(v, &v->norm_out);
    free_conv(v, &v->conv_out);
}

/* ditmoe-convert: an official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe
 * .safetensors, without Python: what tools/convert_checkpoint.py does, with the same flags, the
 * same inference and the same "ditmoe" metadata JSON (docs/format.md). The checkpoint is read by
 * the library's restricted pickle reader (nothing in it is executed).
 *
 *   ditmoe-convert IN.pt|IN.safetensors OUT.safetensors [--dtype f32|f16|bf16]
 *                  [--quant-experts int8|int4] [--heads N] [--top-k K] ...
 *
 * --quant-experts stores the routed experts' matrices quantised (docs/format.md "Quantised routed
 * experts"): the library's dm_quant_weight, i.e. the CPU backend's own --quant-experts arithmetic
 * on the source values, so the file computes the same bits as the float file quantised at load.
 * The output is written tensor by tensor (dm_st_write_stream): one tensor in memory at a time.
 * A safetensors input already quantised passes its experts through (same kind or none asked);
 * another kind is refused (re-quantising would compound the rounding).
 *
 * Flags from the shared table (flags.h: the override group every model-loading program takes);
 * one exit path (dm_cli_exit). A missing output folder is created (as the Python converter's
 * os.makedirs), after the checkpoint has been read and checked.
 * Exit status: 0 ok, 2 bad input (one line on stderr, no output file), 1 other failure. */
#include "ditmoe.h"
#include "flags.h"

#include <errno.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROG "ditmoe-convert"

typedef struct {
    dm_cli_overrides ov;
    const char *dtype, *name, *sampler, *cfg_scale, *quant;
    int steps, cfg_channels, quiet;
    dm_cli_list pos;
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    {'\0', "dtype", DM_OPT_STR, &A.dtype, 0, 0, "f32|f16|bf16", "keep f32/f16/bf16, f64 -> f32",
     "convert floating tensors", NULL},
    {'\0', "quant-experts", DM_OPT_STR, &A.quant, 0, 0, "int8|int4", "float experts",
     "store routed experts int8 (per channel) or int4 (groups of 32)", NULL},
    DM_CLI_OVERRIDE_OPTS(A.ov),
    {'\0', "name", DM_OPT_STR, &A.ov.ov.name, 0, 0, "TEXT", "DiT-MoE-<size>/<p>-<E>E<k>A if released",
     "model name", NULL},
    {'\0', "sampler", DM_OPT_STR, &A.sampler, 0, 0, "ddpm|ddim|euler|heun", "ddpm -> ddpm, rf -> euler",
     "default sampler stored in the model", NULL},
    {'\0', "steps", DM_OPT_INT, &A.steps, 0, 1e9, "N", "ddpm 250, rf 50",
     "default sampling steps stored in the model", NULL},
    {'\0', "cfg-scale", DM_OPT_STR, &A.cfg_scale, 0, 0, "F", "4.0",
     "default guidance scale stored in the model", NULL},
    {'\0', "cfg-channels", DM_OPT_INT, &A.cfg_channels, 0, 1e9, "N", "ddpm 3, rf 0",
     "guided channels stored in the model (0 = all)", NULL},
    {'q', NULL, DM_OPT_SET, &A.quiet, 1, 0, NULL, "off", "no summary line", NULL},
    DM_CLI_HELP_OPTS,
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "IN.pt|IN.safetensors OUT.safetensors [options]",
    "An official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe .safetensors, as\n"
    "tools/convert_checkpoint.py does, without Python, or a ditmoe .safetensors rewritten (other\n"
    "dtype, quantised experts). The checkpoint is read by a restricted pickle reader: nothing in\n"
    "it is executed. A missing output folder is created.",
    OPTS, &A.pos,
    "exit status: 0 ok, 2 bad input (one line on stderr, no output file), 1 other failure\n"};

static dm_status check_one_of(const char *flag, const char *v, const char *const *choices,
                              const char *list)
{
    for (int i = 0; v && choices[i]; i++)
        if (!strcmp(v, choices[i])) return DM_OK;
    return v ? dm_fail(DM_ERR_ARG, "%s '%s': expected %s", flag, v, list) : DM_OK;
}

/* mkdir -p of the folder that holds `path` (as the Python converter's os.makedirs). */
static dm_status make_parent(const char *path)
{
    char dir[4096];
    size_t n = strlen(path);
    if (n >= sizeof dir) return dm_fail(DM_ERR_ARG, "%s: path too long", path);
    memcpy(dir, path, n + 1);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return DM_OK;
    *slash = 0;
    for (char *p = dir + 1;; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = 0;
            struct stat sb;
            if (stat(dir, &sb) != 0) {
                if (mkdir(dir, 0777) != 0 && errno != EEXIST)
                    return dm_fail(DM_ERR_WRITE, "%s: cannot create the output folder %s: %s", path,
                                   dir, strerror(errno));
            } else if (!S_ISDIR(sb.st_mode)) {
                return dm_fail(DM_ERR_WRITE, "%s: cannot create the output folder: %s is not a "
                               "folder", path, dir);
            }
            *p = c;
            if (!c) break;
        }
    }
    return DM_OK;
}

/* ---- the output plan: which tensor is copied, converted or quantised ---- */

enum { K_PASS = 0, K_CONVERT, K_QUANT, K_SCALE };
typedef struct {
    dm_st_file *f;
    dm_dtype target; /* --dtype */
    int convert;     /* --dtype given */
    int bits;        /* --quant-experts: 0, 8, 4 */
    int out_bits;    /* the output's kind: bits, or the input's stored kind */
    int n, n_quant;
    dm_st_tensor *t; /* [n] output tensors (data NULL: made by fill) */
    int *src, *kind; /* [n] input index, K_* */
    char **names;    /* [n] owned names of the ".scale" tensors (else NULL) */
    void *buf, *qbuf, *sbuf; /* the tensor being written (one at a time) */
    int released;            /* outputs [0, released) written and their sources let go */
} plan_t;

/* Is `name` a routed expert's matrix (DiT-MoE gate/up/down_proj of experts 0..E-1; ProMoE
 * up/down_proj of experts 0..E, E the unconditional one)? */
static int routed_expert(const dm_config *c, const char *name)
{
    int blk, e, len = 0;
    char part[16];
    const int promoe = c->arch == DM_ARCH_PROMOE;
    const char *fmt = promoe ? "blocks.%d.mlp.experts.%d.%15[a-z_].weight%n"
                             : "blocks.%d.moe.experts.%d.%15[a-z_].weight%n";
    if (sscanf(name, fmt, &blk, &e, part, &len) != 3 || name[len] || blk < 0 || blk >= c->depth ||
        e < 0 || e > c->num_experts - (promoe ? 0 : 1))
        return 0;
    return !strcmp(part, "up_proj") || !strcmp(part, "down_proj") ||
           (!promoe && !strcmp(part, "gate_proj"));
}

/* "<expert weight>.scale" of a stored-quantised input? */
static int stored_scale(const dm_config *c, const char *name)
{
    size_t n = strlen(name);
    char base[256];
    if (n <= 6 || n - 6 >= sizeof base || strcmp(name + n - 6, ".scale")) return 0;
    memcpy(base, name, n - 6);
    base[n - 6] = 0;
    return routed_expert(c, base);
}

static void plan_free(plan_t *P)
{
    for (int i = 0; P->names && i < P->n; i++) free(P->names[i]);
    free(P->names);
    free(P->t);
    free(P->src);
    free(P->kind);
    free(P->buf);
    free(P->qbuf);
    free(P->sbuf);
}

static dm_status plan(plan_t *P, const dm_config *c)
{
    const char *in = dm_st_path(P->f);
    const int n = dm_st_count(P->f);
    const char *qm = dm_st_meta(P->f, "quant_experts");
    const int in_bits = !qm ? 0 : !strcmp(qm, "int8") ? 8 : !strcmp(qm, "int4") ? 4 : -1;
    if (in_bits < 0)
        return dm_fail(DM_ERR_FORMAT,
                       "%s: metadata \"quant_experts\": '%s' (expected int8 or int4)", in, qm);
    if (in_bits && P->bits && P->bits != in_bits)
        return dm_fail(DM_ERR_ARG, "%s: the routed experts are stored as int%d; --quant-experts "
                       "int%d would re-quantise them (convert from the float file)", in, in_bits,
                       P->bits);
    P->out_bits = in_bits ? in_bits : P->bits;
    const int cap = 2 * n + 1;
    P->t = calloc((size_t)cap, sizeof *P->t);
    P->src = calloc((size_t)cap, sizeof *P->src);
    P->kind = calloc((size_t)cap, sizeof *P->kind);
    P->names = calloc((size_t)cap, sizeof *P->names);
    if (!P->t || !P->src || !P->kind || !P->names) return dm_fail(DM_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n; i++) {
        const dm_st_tensor *t = dm_st_at(P->f, i);
        const int fp = t->dtype == DM_F32 || t->dtype == DM_F16 || t->dtype == DM_BF16;
        int j = P->n++;
        P->t[j] = *t;
        P->src[j] = i;
        if (in_bits && (stored_scale(c, t->name) || routed_expert(c, t->name)))
            continue; /* stored experts and their scales: as they are */
        if (P->bits && fp && routed_expert(c, t->name)) {
            if (t->ndim != 2 || t->shape[0] <= 0 || t->shape[1] <= 0 || t->shape[0] > INT32_MAX ||
                t->shape[1] > INT32_MAX)
                return dm_fail(DM_ERR_FORMAT, "%s: %s: expected a 2-D weight", in, t->name);
            const int64_t rows = t->shape[0], cols = t->shape[1];
            if (P->bits == 4 && cols % 32)
                return dm_fail(DM_ERR_ARG, "%s: %s: --quant-experts int4 needs the expert input "
                               "width to be a multiple of 32; the weight is [%lld, %lld] (use "
                               "int8)", in, t->name, (long long)rows, (long long)cols);
            P->kind[j] = K_QUANT;
            P->t[j].data = NULL;
            P->t[j].dtype = P->bits == 8 ? DM_I8 : DM_U8;
            P->t[j].shape[1] = P->bits == 8 ? cols : cols / 2;
            P->t[j].nbytes = (size_t)rows * (size_t)P->t[j].shape[1];
            const int k = P->n++;
            size_t len = strlen(t->name) + 7;
            if (!(P->names[k] = malloc(len))) return dm_fail(DM_ERR_NOMEM, "out of memory");
            snprintf(P->names[k], len, "%s.scale", t->name);
            P->src[k] = i;
            P->kind[k] = K_SCALE;
            P->t[k] = (dm_st_tensor){.name = P->names[k], .dtype = P->bits == 8 ? DM_F32 : DM_BF16,
                                     .ndim = P->bits == 8 ? 1 : 2, .shape = {rows, cols / 32}};
            P->t[k].nbytes = P->bits == 8 ? (size_t)rows * 4
                                          : (size_t)rows * (size_t)(cols / 32) * 2;
            P->n_quant++;
            continue;
        }
        if (!P->convert || !fp || t->dtype == P->target) continue;
        P->kind[j] = K_CONVERT;
        P->t[j].data = NULL;
        P->t[j].dtype = P->target;
        P->t[j].nbytes = t->nbytes / dm_dtype_size(t->dtype) * dm_dtype_size(P->target);
    }
    if (in_bits) /* the stored experts passed through */
        for (int i = 0; i < n; i++) P->n_quant += routed_expert(c, dm_st_at(P->f, i)->name);
    return DM_OK;
}

/* dm_st_fill_fn: the bytes of output tensor i, made now (one tensor in memory at a time). */
static dm_status fill(void *ud, int i, const void **data)
{
    plan_t *P = ud;
    const dm_st_tensor *s = dm_st_at(P->f, P->src[i]);
    for (; P->released < i; P->released++) /* written: the input's pages may go */
        dm_st_release(P->f, dm_st_at(P->f, P->src[P->released]));
    if (P->kind[i] == K_SCALE) { /* made with its matrix, just before */
        *data = P->sbuf;
        return DM_OK;
    }
    if (P->kind[i] == K_QUANT) {
        free(P->qbuf);
        free(P->sbuf);
        P->qbuf = malloc(P->t[i].nbytes);
        P->sbuf = malloc(P->t[i + 1].nbytes);
        if (!P->qbuf || !P->sbuf) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", s->name);
        dm_status st = dm_quant_weight(P->bits, s->data, s->dtype, (int)s->shape[0],
                                       (int)s->shape[1], s->name, P->qbuf, P->sbuf);
        *data = P->qbuf;
        return st;
    }
    /* K_CONVERT: float32, then narrowed in place (round to nearest even as torch .to()) */
    const size_t cnt = s->nbytes / dm_dtype_size(s->dtype);
    free(P->buf);
    float *f32 = P->buf = malloc(cnt ? cnt * 4 : 1);
    if (!f32) return dm_fail(DM_ERR_NOMEM, "%s: out of memory", s->name);
    dm_status st = dm_convert_to_f32(s->dtype, s->data, cnt, f32);
    if (st != DM_OK) return st;
    if (P->target != DM_F32) {
        uint16_t *h = (uint16_t *)f32;
        for (size_t k = 0; k < cnt; k++)
            h[k] = P->target == DM_F16 ? dm_f32_to_f16(f32[k]) : dm_f32_to_bf16(f32[k]);
    }
    *data = f32;
    return DM_OK;
}

static dm_status convert(void);

int main(int argc, char **argv)
{
    dm_cli_overrides_init(&A.ov);
    A.steps = -1;
    A.cfg_channels = -1;
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    return dm_cli_exit(PROG, convert());
}

static dm_status convert(void)
{
    static const char *const dtypes[] = {"f32", "f16", "bf16", NULL};
    static const char *const samplers[] = {"ddpm", "ddim", "euler", "heun", NULL};
    dm_status st;
    if (A.pos.n != 2)
        return dm_fail(DM_ERR_ARG, "expected IN.pt OUT.safetensors (IN may be a .safetensors), "
                       "got %d argument%s (see --help)", A.pos.n, A.pos.n == 1 ? "" : "s");
    static const char *const quants[] = {"int8", "int4", NULL};
    if ((st = check_one_of("--dtype", A.dtype, dtypes, "f32, f16 or bf16")) ||
        (st = check_one_of("--quant-experts", A.quant, quants, "int8 or int4")) ||
        (st = check_one_of("--sampler", A.sampler, samplers, "ddpm, ddim, euler or heun")))
        return st;
    dm_config_overrides ov;
    const dm_config_overrides *got;
    if ((st = dm_cli_overrides_get(&A.ov, &got))) return st;
    (void)got;
    ov = A.ov.ov;
    ov.sampler = A.sampler;
    ov.steps = A.steps;
    ov.cfg_channels = A.cfg_channels;
    if (A.cfg_scale) {
        char *end;
        double x = strtod(A.cfg_scale, &end);
        if (end == A.cfg_scale || *end || !isfinite(x))
            return dm_fail(DM_ERR_ARG, "--cfg-scale '%s': expected a number", A.cfg_scale);
        ov.cfg_scale = x;
    }
    const char *in = A.pos.v[0], *out = A.pos.v[1], *dtype = A.dtype;
    const int qbits = !A.quant ? 0 : !strcmp(A.quant, "int8") ? 8 : !strcmp(A.quant, "int4") ? 4 : 0;
    const int quiet = A.quiet;

    dm_st_file *f = NULL;
    st = dm_st_open_opts(in, &ov, &f);
    if (st) return st;
    char *json = NULL;
    dm_config cfg;
    if ((st = dm_config_json(f, &json)) || (st = dm_config_from_file(f, &cfg))) {
        free(json);
        dm_st_close(f);
        return st;
    }
    plan_t P = {.f = f, .target = DM_F32, .convert = dtype != NULL, .bits = qbits};
    if (dtype) P.target = !strcmp(dtype, "f16") ? DM_F16 : !strcmp(dtype, "bf16") ? DM_BF16 : DM_F32;
    st = plan(&P, &cfg);
    char qname[8] = "";
    if (P.out_bits) snprintf(qname, sizeof qname, "int%d", P.out_bits);
    const char *meta[] = {"ditmoe", json, "format", "pt", P.out_bits ? "quant_experts" : NULL,
                          qname, NULL};
    if (st == DM_OK) st = make_parent(out);
    if (st == DM_OK) st = dm_st_write_stream(out, P.n, P.t, meta, fill, &P);
    if (st == DM_OK && !quiet) {
        char extra[64] = "";
        if (cfg.arch == DM_ARCH_PROMOE)
            snprintf(extra, sizeof extra, " %s %s", cfg.promoe_ec ? "ec" : "tc",
                     cfg.router_act == 0 ? "identity" : cfg.router_act == 1 ? "softmax" : "sigmoid");
        char qx[48] = "";
        if (P.out_bits) snprintf(qx, sizeof qx, ", %d expert matrices int%d", P.n_quant, P.out_bits);
        printf("ditmoe-convert: wrote %s: %s %s D=%d L=%d H=%d E=%d k=%d %s %s%s, %d tensors%s\n",
               out, dm_arch_name(cfg.arch), cfg.name[0] ? cfg.name : "model", cfg.hidden, cfg.depth,
               cfg.heads, cfg.num_experts, cfg.top_k, cfg.attn == DM_ATTN_QKNORM ? "qknorm" : "timm",
               dm_objective_name(cfg.objective), extra, P.n, qx);
    }
    plan_free(&P);
    free(json);
    dm_config_free(&cfg);
    dm_st_close(f);
    return st;
}

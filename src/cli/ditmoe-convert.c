/* ditmoe-convert: an official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe
 * .safetensors, without Python: what tools/convert_checkpoint.py does, with the same flags, the
 * same inference and the same "ditmoe" metadata JSON (docs/format.md). The checkpoint is read by
 * the library's restricted pickle reader (nothing in it is executed).
 *
 *   ditmoe-convert IN.pt OUT.safetensors [--dtype f32|f16|bf16] [--heads N] [--top-k K] ...
 *
 * Flags from the shared table (flags.h: the override group every model-loading program takes);
 * one exit path (dm_cli_exit). A missing output folder is created (as the Python converter's
 * os.makedirs), after the checkpoint has been read and checked.
 * Exit status: 0 ok, 2 bad input (one line on stderr, no output file), 1 other failure. */
#include "ditmoe.h"
#include "flags.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROG "ditmoe-convert"

typedef struct {
    dm_cli_overrides ov;
    const char *dtype, *name, *sampler, *cfg_scale;
    int steps, cfg_channels, quiet;
    dm_cli_list pos;
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    {'\0', "dtype", DM_OPT_STR, &A.dtype, 0, 0, "f32|f16|bf16", "keep f32/f16/bf16, f64 -> f32",
     "convert floating tensors", NULL},
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
    PROG, "IN.pt OUT.safetensors [options]",
    "An official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe .safetensors, as\n"
    "tools/convert_checkpoint.py does, without Python. The checkpoint is read by a restricted\n"
    "pickle reader: nothing in it is executed. A missing output folder is created.",
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
        return dm_fail(DM_ERR_ARG, "expected IN.pt OUT.safetensors, got %d argument%s (see --help)",
                       A.pos.n, A.pos.n == 1 ? "" : "s");
    if ((st = check_one_of("--dtype", A.dtype, dtypes, "f32, f16 or bf16")) ||
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
    int n = dm_st_count(f);
    dm_st_tensor *t = calloc((size_t)n + 1, sizeof *t);
    void **bufs = calloc((size_t)n + 1, sizeof *bufs);
    if (!t || !bufs) st = dm_fail(DM_ERR_NOMEM, "out of memory");
    dm_dtype target = DM_F32;
    if (dtype) target = !strcmp(dtype, "f16") ? DM_F16 : !strcmp(dtype, "bf16") ? DM_BF16 : DM_F32;
    for (int i = 0; st == DM_OK && i < n; i++) {
        t[i] = *dm_st_at(f, i);
        int fp = t[i].dtype == DM_F32 || t[i].dtype == DM_F16 || t[i].dtype == DM_BF16;
        if (!dtype || !fp || t[i].dtype == target) continue;
        size_t cnt = t[i].nbytes / dm_dtype_size(t[i].dtype);
        float *f32 = malloc(cnt ? cnt * 4 : 1);
        if (!f32 || (st = dm_convert_to_f32(t[i].dtype, t[i].data, cnt, f32)) != DM_OK) {
            free(f32);
            if (st == DM_OK) st = dm_fail(DM_ERR_NOMEM, "%s: out of memory", t[i].name);
            break;
        }
        if (target != DM_F32) { /* narrow in place, round to nearest even as torch .to() */
            uint16_t *h = (uint16_t *)f32;
            for (size_t k = 0; k < cnt; k++)
                h[k] = target == DM_F16 ? dm_f32_to_f16(f32[k]) : dm_f32_to_bf16(f32[k]);
        }
        bufs[i] = f32;
        t[i].data = f32;
        t[i].dtype = target;
        t[i].nbytes = cnt * dm_dtype_size(target);
    }
    const char *meta[] = {"ditmoe", json, "format", "pt", NULL};
    if (st == DM_OK) st = make_parent(out);
    if (st == DM_OK) st = dm_st_write(out, n, t, meta);
    if (st == DM_OK && !quiet) {
        char extra[64] = "";
        if (cfg.arch == DM_ARCH_PROMOE)
            snprintf(extra, sizeof extra, " %s %s", cfg.promoe_ec ? "ec" : "tc",
                     cfg.router_act == 0 ? "identity" : cfg.router_act == 1 ? "softmax" : "sigmoid");
        printf("ditmoe-convert: wrote %s: %s %s D=%d L=%d H=%d E=%d k=%d %s %s%s, %d tensors\n", out,
               dm_arch_name(cfg.arch), cfg.name[0] ? cfg.name : "model", cfg.hidden, cfg.depth,
               cfg.heads, cfg.num_experts, cfg.top_k, cfg.attn == DM_ATTN_QKNORM ? "qknorm" : "timm",
               dm_objective_name(cfg.objective), extra, n);
    }
    for (int i = 0; i < n && bufs; i++) free(bufs[i]);
    free(bufs);
    free(t);
    free(json);
    dm_config_free(&cfg);
    dm_st_close(f);
    return st;
}

/* ditmoe-convert: an official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe
 * .safetensors, without Python: what tools/convert_checkpoint.py does, with the same flags, the
 * same inference and the same "ditmoe" metadata JSON (docs/format.md). The checkpoint is read by
 * the library's restricted pickle reader (nothing in it is executed).
 *
 *   ditmoe-convert IN.pt OUT.safetensors [--dtype f32|f16|bf16] [--heads N] [--top-k K] ...
 *
 * Exit status: 0 ok, 2 bad input (one line on stderr, no output file), 1 other failure. */
#include "ditmoe.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static const char *k_usage =
    "usage: ditmoe-convert IN.pt OUT.safetensors [options]\n"
    "  --dtype f32|f16|bf16      convert floating tensors (default: keep f32/f16/bf16 as stored,\n"
    "                            f64 -> f32)\n"
    "  --heads N                 attention heads (default: released-config table)\n"
    "  --top-k K                 experts per token (default: DiT-MoE 2, ProMoE 1)\n"
    "  --objective ddpm|rf       default: rf for qknorm attention, ddpm for timm; ProMoE: rf\n"
    "  --num-classes N           default: rows of y_embedder.embedding_table.weight - 1\n"
    "  --class-names FILE        text file, one class name per line\n"
    "  --name TEXT               model name (default: DiT-MoE-<size>/<p>-<E>E<k>A if released)\n"
    "  --sampler ddpm|ddim|euler|heun, --steps N, --cfg-scale F, --cfg-channels N\n"
    "                            default sampling stored in the model\n"
    "  --vae-scale F             latent scale of the VAE (default 0.18215, SD-VAE)\n"
    "  --promoe-variant tc|ec    ProMoE routing (default tc)\n"
    "  --router identity|softmax|sigmoid  ProMoE router activation (default identity)\n"
    "  -q                        no summary line\n";

static int bad(const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "ditmoe-convert: error: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    return 2;
}

static int parse_int(const char *flag, const char *v, int *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < 0 || x > 1000000000)
        return bad("%s '%s': expected a non-negative integer", flag, v);
    *out = (int)x;
    return 0;
}

static int parse_double(const char *flag, const char *v, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !isfinite(x)) return bad("%s '%s': expected a number", flag, v);
    *out = x;
    return 0;
}

static int one_of(const char *flag, const char *v, const char *const *choices)
{
    for (int i = 0; choices[i]; i++)
        if (!strcmp(v, choices[i])) return 0;
    return bad("%s '%s': not one of the allowed values (see --help)", flag, v);
}

static int fail(dm_status st)
{
    fprintf(stderr, "ditmoe-convert: error: %s\n", dm_last_error());
    return dm_exit_code(st);
}

int main(int argc, char **argv)
{
    dm_config_overrides ov;
    dm_config_overrides_init(&ov);
    const char *pos[2] = {NULL, NULL}, *dtype = NULL;
    int npos = 0, quiet = 0;
    static const char *const dtypes[] = {"f32", "f16", "bf16", NULL};
    static const char *const objs[] = {"ddpm", "rf", NULL};
    static const char *const samplers[] = {"ddpm", "ddim", "euler", "heun", NULL};
    static const char *const variants[] = {"tc", "ec", NULL};
    static const char *const routers[] = {"identity", "softmax", "sigmoid", NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(k_usage, stdout);
            return 0;
        }
        if (!strcmp(a, "-q")) {
            quiet = 1;
            continue;
        }
        if (a[0] != '-' || !a[1]) {
            if (npos == 2) return bad("unexpected argument '%s'%s", a, " (expected IN OUT)");
            pos[npos++] = a;
            continue;
        }
        if (i + 1 >= argc) return bad("%s: missing value%s", a, "");
        const char *v = argv[++i];
        int r = 0;
        if (!strcmp(a, "--dtype")) r = one_of(a, v, dtypes), dtype = v;
        else if (!strcmp(a, "--heads")) r = parse_int(a, v, &ov.heads);
        else if (!strcmp(a, "--top-k")) r = parse_int(a, v, &ov.top_k);
        else if (!strcmp(a, "--objective")) r = one_of(a, v, objs), ov.objective = v;
        else if (!strcmp(a, "--num-classes")) r = parse_int(a, v, &ov.num_classes);
        else if (!strcmp(a, "--class-names")) ov.class_names = v;
        else if (!strcmp(a, "--name")) ov.name = v;
        else if (!strcmp(a, "--sampler")) r = one_of(a, v, samplers), ov.sampler = v;
        else if (!strcmp(a, "--steps")) r = parse_int(a, v, &ov.steps);
        else if (!strcmp(a, "--cfg-scale")) r = parse_double(a, v, &ov.cfg_scale);
        else if (!strcmp(a, "--cfg-channels")) r = parse_int(a, v, &ov.cfg_channels);
        else if (!strcmp(a, "--vae-scale")) {
            r = parse_double(a, v, &ov.vae_scale);
            if (!r && !(ov.vae_scale > 0)) return bad("--vae-scale '%s': must be a positive number%s", v, "");
        } else if (!strcmp(a, "--promoe-variant")) r = one_of(a, v, variants), ov.promoe_variant = v;
        else if (!strcmp(a, "--router")) r = one_of(a, v, routers), ov.router = v;
        else return bad("unknown flag %s%s (see --help)", a, "");
        if (r) return r;
    }
    if (npos != 2) return bad("expected IN.pt OUT.safetensors%s%s (see --help)", "", "");
    const char *in = pos[0], *out = pos[1];

    dm_st_file *f = NULL;
    dm_status st = dm_st_open_opts(in, &ov, &f);
    if (st) return fail(st);
    char *json = NULL;
    dm_config cfg;
    if ((st = dm_config_json(f, &json)) || (st = dm_config_from_file(f, &cfg))) {
        free(json);
        dm_st_close(f);
        return fail(st);
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
    return st == DM_OK ? 0 : fail(st);
}

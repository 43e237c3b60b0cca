/* flags.h — one flag table per program drives both the parser and --help (CLI only, not part of
 * the library API).
 *
 *   static args_t A;                                   // destinations live in static storage
 *   static const dm_cli_opt OPTS[] = {
 *       DM_CLI_MODEL_OPTS(A.model, A.vae),              // shared groups are spliced in as rows
 *       {'n', NULL, DM_OPT_INT, &A.n, 1, 1e6, "N", "1", "images per class"},
 *       DM_CLI_COMMON_OPTS(A.common, "0 = all cores"),
 *       DM_CLI_END};
 *   static const dm_cli_prog PROGRAM = {PROG, "[options]", "what it does", OPTS, NULL, NULL};
 *   int main(int argc, char **argv) {
 *       int done = 0;
 *       dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
 *       if (st || done) return dm_cli_exit(PROG, st);  // --help / --version: done = 1, exit 0
 *       ...
 *       return dm_cli_exit(PROG, st);                   // the one place dm_exit_code is applied
 *   }
 *
 * Every row has a default text, shown in --help as "(default: ...)"; help and parser read the
 * same rows, so they cannot drift apart. Ranges of numeric kinds are inclusive [lo, hi].
 */
#ifndef DM_CLI_FLAGS_H
#define DM_CLI_FLAGS_H

#include "ditmoe.h"

#include <stdio.h>

typedef enum {
    DM_OPT_END = 0, /* terminates a table                                                  */
    DM_OPT_STR,     /* const char *                                                         */
    DM_OPT_INT,     /* int, range [lo, hi]                                                  */
    DM_OPT_I64,     /* int64_t, range [lo, hi]                                              */
    DM_OPT_U64,     /* uint64_t (any value below 2^64)                                      */
    DM_OPT_FLOAT,   /* float, finite, range [lo, hi]                                        */
    DM_OPT_SET,     /* no value: int dest = (int)lo (flags: lo = 1; -q/-v: log levels)      */
    DM_OPT_LIST,    /* repeatable: appended to a dm_cli_list                                */
    DM_OPT_BACKEND, /* dm_backend_kind by name; a backend this build lacks is an error      */
    DM_OPT_HELP,    /* --help: print the usage on stdout, stop (exit 0)                     */
    DM_OPT_VERSION, /* --version                                                            */
} dm_cli_kind;

#define DM_CLI_LIST_MAX 64
typedef struct {
    const char *v[DM_CLI_LIST_MAX];
    int n;
} dm_cli_list;

typedef struct {
    char short_name;       /* 'o' for -o, 0 if none                                           */
    const char *long_name; /* "output" for --output, NULL if none                             */
    dm_cli_kind kind;
    void *dest;            /* see dm_cli_kind; NULL for HELP/VERSION                           */
    double lo, hi;         /* numeric range (INT, I64, FLOAT), value of SET                   */
    const char *metavar;   /* value name in --help ("FILE"); NULL for SET/HELP/VERSION        */
    const char *dflt;      /* default, as shown in --help (every row has one)                 */
    const char *help;      /* one or more lines ('\n' separated)                               */
    int *seen;             /* optional: set to 1 when the flag is given                        */
} dm_cli_opt;
#define DM_CLI_END {0, NULL, DM_OPT_END, NULL, 0, 0, NULL, NULL, NULL, NULL}

typedef struct {
    const char *name;       /* "ditmoe-sample"                                                  */
    const char *synopsis;   /* after "usage: NAME " (may hold '\n' + more usage lines)          */
    const char *about;      /* a paragraph under the usage line, or NULL                        */
    const dm_cli_opt *opts;
    dm_cli_list *positional;/* arguments that are not flags; NULL: none accepted                */
    const char *footer;     /* printed after the flags, or NULL                                 */
} dm_cli_prog;

/* Parse argv[first..argc) into the table's destinations. Unknown flags, missing or bad values
 * and unexpected arguments fail with DM_ERR_ARG naming the flag. --help / --version print and
 * set *done = 1 (return DM_OK). "--flag=value" is accepted for long flags. */
dm_status dm_cli_parse_from(const dm_cli_prog *p, int first, int argc, char **argv, int *done);
static inline dm_status dm_cli_parse(const dm_cli_prog *p, int argc, char **argv, int *done)
{
    return dm_cli_parse_from(p, 1, argc, argv, done);
}
/* The --help text, from the same table. */
void dm_cli_usage(const dm_cli_prog *p, FILE *f);
/* The single exit point: 0 for DM_OK; else prints "prog: <dm_last_error()>" once on stderr and
 * returns dm_exit_code(st) (2 bad input, 1 runtime failure; see ditmoe.h). */
int dm_cli_exit(const char *prog, dm_status st);

/* ------------------------------------------------------------------ shared groups */

/* Threads, backend, device, log level: every program that computes. */
typedef struct {
    int threads;             /* 0 = all cores                                                 */
    int have_threads;
    dm_backend_kind backend; /* DM_BACKEND_CPU                                                */
    int device;
    int log_level;           /* DM_LOG_INFO; -q QUIET, -v VERBOSE (last one wins)             */
    const char *precision;     /* --precision f32 | bf16 (DM_CLI_PRECISION_OPTS), "f32"        */
    const char *quant_experts; /* --quant-experts none | int8 | int4, "none"                   */
} dm_cli_common;
void dm_cli_common_init(dm_cli_common *c);
/* dm_set_log_level, dm_set_threads (when threads_default < 0: the flag's value, else
 * threads_default unless --threads was given). */
void dm_cli_common_apply(const dm_cli_common *c, int threads_default);
void dm_cli_common_load_opts(const dm_cli_common *c, dm_load_opts *o);

/* --precision / --quant-experts (issue 13): the programs that run the transformer. */
#define DM_CLI_PRECISION_OPTS(c)                                                                 \
    {'\0', "precision", DM_OPT_STR, &(c).precision, 0, 0, "P", "f32",                           \
     "GEMM arithmetic: f32 | bf16 (attention and expert GEMMs with bf16 operands, fp32 "       \
     "accumulation; router, embedders, adaLN and final layer stay f32)", NULL},                 \
    {'\0', "quant-experts", DM_OPT_STR, &(c).quant_experts, 0, 0, "Q", "none",                  \
     "routed experts' weights: none | int8 (per channel) | int4 (groups of 32)", NULL}
/* The values of --precision / --quant-experts, checked (DM_ERR_ARG naming the flag). */
dm_status dm_cli_precision(const dm_cli_common *c, dm_precision *prec, int *quant_bits);

#define DM_CLI_THREADS_OPT(c, dflt)                                                              \
    {'\0', "threads", DM_OPT_INT, &(c).threads, 0, 4096, "N", dflt, "threads", &(c).have_threads}
#define DM_CLI_BACKEND_OPTS(c)                                                                   \
    {'\0', "backend", DM_OPT_BACKEND, &(c).backend, 0, 0, "NAME", "cpu",                        \
     "compute backend: cpu | cuda (cuda: a build with -DDITMOE_CUDA=ON)", NULL},                \
    {'\0', "device", DM_OPT_INT, &(c).device, 0, 1024, "N", "0",                                \
     "accelerator ordinal (--backend cuda)", NULL}
#define DM_CLI_LOG_OPTS(c)                                                                       \
    {'q', NULL, DM_OPT_SET, &(c).log_level, DM_LOG_QUIET, 0, NULL, "off",                        \
     "quiet: no progress line, no info", NULL},                                                  \
    {'v', NULL, DM_OPT_SET, &(c).log_level, DM_LOG_VERBOSE, 0, NULL, "off",                      \
     "verbose: timings, sizes", NULL}
#define DM_CLI_HELP_OPTS                                                                         \
    {'h', "help", DM_OPT_HELP, NULL, 0, 0, NULL, "-", "this help", NULL},                        \
    {'\0', "version", DM_OPT_VERSION, NULL, 0, 0, NULL, "-", "print the version", NULL}
/* threads + backend + device + -q/-v + --help/--version */
#define DM_CLI_COMMON_OPTS(c, threads_dflt)                                                      \
    DM_CLI_THREADS_OPT(c, threads_dflt), DM_CLI_BACKEND_OPTS(c), DM_CLI_LOG_OPTS(c),             \
        DM_CLI_HELP_OPTS

/* Model + VAE files (default: the shipped assets, see dm_default_asset). */
#define DM_CLI_MODEL_OPTS(model, vae)                                                            \
    {'\0', "model", DM_OPT_STR, &(model), 0, 0, "FILE", DM_DEFAULT_MODEL " in the assets dir",   \
     "DiT-MoE / ProMoE .safetensors or PyTorch .pt/.pth\n(assets dir: <exe>/../../assets, then $DITMOE_ASSETS)",     \
     NULL},                                                                                      \
    {'\0', "vae", DM_OPT_STR, &(vae), 0, 0, "FILE", DM_DEFAULT_VAE " in the assets dir",         \
     "VAE decoder .safetensors", NULL}

/* What a PyTorch checkpoint's weights cannot tell: the converter's flags (tools/convert_checkpoint.py,
 * ditmoe-convert), same names, meanings and defaults, for every program that loads a model. On a
 * .safetensors they replace the file's own metadata. Filled by DM_CLI_OVERRIDE_OPTS; text kept
 * for --vae-scale (a double, as the converter stores it). */
typedef struct {
    dm_config_overrides ov;
    const char *vae_scale;
} dm_cli_overrides;
void dm_cli_overrides_init(dm_cli_overrides *o);
/* Check the choices and numbers (errors name the flag); *out = &o->ov, or NULL when no flag was
 * given (pass it as dm_load_opts.cfg / dm_pipeline_opts.cfg). */
dm_status dm_cli_overrides_get(dm_cli_overrides *o, const dm_config_overrides **out);
#define DM_CLI_OVERRIDE_OPTS(o)                                                                  \
    {'\0', "heads", DM_OPT_INT, &(o).ov.heads, 0, 1e9, "N", "released-config table",            \
     "attention heads (.pt: the weights cannot tell)", NULL},                                    \
    {'\0', "top-k", DM_OPT_INT, &(o).ov.top_k, 0, 1e9, "K", "DiT-MoE 2, ProMoE 1",              \
     "experts per token", NULL},                                                                 \
    {'\0', "objective", DM_OPT_STR, &(o).ov.objective, 0, 0, "ddpm|rf",                          \
     "rf for qknorm attention, ddpm for timm; ProMoE rf", "training objective", NULL},          \
    {'\0', "num-classes", DM_OPT_INT, &(o).ov.num_classes, 0, 1e9, "N",                          \
     "rows of y_embedder.embedding_table.weight - 1", "number of classes", NULL},                \
    {'\0', "class-names", DM_OPT_STR, &(o).ov.class_names, 0, 0, "FILE",                         \
     "ImageNet's for 1000 classes, else none", "text file, one class name per line", NULL},      \
    {'\0', "promoe-variant", DM_OPT_STR, &(o).ov.promoe_variant, 0, 0, "tc|ec", "tc",            \
     "ProMoE routing: token choice or expert choice", NULL},                                     \
    {'\0', "router", DM_OPT_STR, &(o).ov.router, 0, 0, "identity|softmax|sigmoid", "identity",   \
     "ProMoE router score activation", NULL},                                                    \
    {'\0', "vae-scale", DM_OPT_STR, &(o).vae_scale, 0, 0, "F", "0.18215, SD-VAE",               \
     "latent scaling factor of the VAE the model was trained with", NULL}

/* The sampler flags of ditmoe-sample and ditmoe-batch, kept as text until the model's defaults
 * are known (dm_cli_sampler_params). */
typedef struct {
    const char *sampler, *steps, *cfg_scale, *cfg_channels, *cfg_interval, *eta;
} dm_cli_sampler_flags;
#define DM_CLI_SAMPLER_OPTS(f)                                                                   \
    {'\0', "steps", DM_OPT_STR, &(f).steps, 0, 0, "N", "model metadata; ddpm 250, rf 50",        \
     "sampling steps", NULL},                                                                    \
    {'\0', "sampler", DM_OPT_STR, &(f).sampler, 0, 0, "S",                                       \
     "model metadata; ddpm -> ddpm, rf -> euler",                                                \
     "ddpm | ddim (ddpm models), euler | heun (rf models)", NULL},                               \
    {'\0', "cfg-scale", DM_OPT_STR, &(f).cfg_scale, 0, 0, "S", "model metadata, 4.0",            \
     "classifier-free guidance scale, 1 = off", NULL},                                           \
    {'\0', "cfg-channels", DM_OPT_STR, &(f).cfg_channels, 0, 0, "K", "model metadata; ddpm 3, rf all", \
     "guided latent channels: 3 (DiT's DDPM reference) or all", NULL},                           \
    {'\0', "cfg-interval", DM_OPT_STR, &(f).cfg_interval, 0, 0, "L,H", "0,1",                    \
     "guide only while L <= t <= H, t in [0,1] with 1 = noise\n"                                 \
     "(ddpm/ddim: t = timestep/999; euler/heun: flow time)", NULL},                              \
    {'\0', "eta", DM_OPT_STR, &(f).eta, 0, 0, "E", "0", "DDIM eta", NULL}
/* p = the model's defaults (dm_sample_params_init) with the given flags and seed on top, checked
 * against the model; errors name the flag. */
dm_status dm_cli_sampler_params(const dm_cli_sampler_flags *f, const dm_config *c, uint64_t seed,
                                dm_sample_params *p);

/* The MoE-lab flags (issue 14, docs/moe-lab.md) of ditmoe-sample, ditmoe-forward and
 * ditmoe-batch. --skip-routed is repeatable (joined with ';'). */
typedef struct {
    const char *route, *expert_cache, *self_contrast;
    dm_cli_list skip;
    char skip_joined[1024];
} dm_cli_lab_flags;
#define DM_CLI_LAB_OPTS(f)                                                                       \
    {'\0', "route", DM_OPT_STR, &(f).route, 0, 0, "SPEC", "top-k",                               \
     "routing policy: top-k[=K] | top-p=P[,max=K][,renorm] |\n"                                  \
     "threshold=T[,max=K][,renorm] | rank2=TAU[,margin=D] (ProMoE)", NULL},                     \
    {'\0', "skip-routed", DM_OPT_LIST, &(f).skip, 0, 0, "L@T0-T1", "none",                       \
     "skip the routed experts of blocks L (e.g. 2,3 or all) while\n"                             \
     "T0 <= t <= T1 (t: flow time or timestep/999); repeatable", NULL},                          \
    {'\0', "expert-cache", DM_OPT_STR, &(f).expert_cache, 0, 0, "K[,refresh=R][,mem=MiB][,ffn]", \
     "off", "reuse routed-expert outputs for K evaluations; R = fixed |\n"                       \
     "route | delta:EPS; ffn: cache routed + shared", NULL},                                     \
    {'\0', "self-contrast", DM_OPT_STR, &(f).self_contrast, 0, 0, "W[,weak=..][,mode=..]", "off", \
     "weak-routing guidance: weak = rank2|rank3|top1|shared,\n"                                  \
     "mode = add (with CFG) | replace (instead of the uncond pass)", NULL}
/* Fill o (points into f) from the flags; the skip rules are joined into f->skip_joined. */
dm_status dm_cli_lab_opts(dm_cli_lab_flags *f, dm_lab_opts *o);
/* p->sc_* from --self-contrast (errors name the flag). */
dm_status dm_cli_lab_sample(const dm_cli_lab_flags *f, dm_sample_params *p);
/* [INFO] line with the lab options when any is on; -v line with the expert cache's counts. */
void dm_cli_lab_log(dm_pipeline *pl, const dm_sample_params *p);
void dm_cli_lab_stats(dm_pipeline *pl);

#endif

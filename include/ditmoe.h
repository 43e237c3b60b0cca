/* ditmoe.h — the one public header of the ditmoe library.
 *
 * ditmoe runs Mixture-of-Experts diffusion transformers (DiT-MoE, ProMoE) and the SD KL-f8 VAE
 * decoder on the CPU. Every fallible call returns a dm_status; on failure dm_last_error() holds a
 * one-line message naming the file, tensor or flag and what was expected vs found.
 *
 * Layout conventions: tensors are row-major (PyTorch order), float32 unless stated, shapes written
 * next to every pointer as [dim0, dim1, ...].
 */
#ifndef DITMOE_H
#define DITMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DITMOE_VERSION "0.1.0"

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */
typedef enum {
    DM_OK = 0,
    DM_ERR_ARG,     /* bad argument, flag value or input value (user error)            */
    DM_ERR_IO,      /* an input file could not be opened or read (missing, directory)   */
    DM_ERR_FORMAT,  /* a file is malformed: bad header, dtype, shape, missing tensor    */
    DM_ERR_NOMEM,   /* allocation failed                                                */
    DM_ERR_NUMERIC, /* a non-finite value appeared during computation                   */
    DM_ERR_WRITE,   /* an output could not be written (disk full, read-only folder)     */
    DM_ERR_BACKEND, /* the compute backend failed (device error, driver, library)      */
} dm_status;

/* The message of the last failure on this thread ("" if none). */
const char *dm_last_error(void);
/* Set the message (printf-style) and return `st`, so callers can `return dm_fail(...)`. */
dm_status dm_fail(dm_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The exit policy of every ditmoe program, applied in one place (dm_exit_code):
 *   0  success;
 *   2  bad input: ARG (unknown flag, bad value, non-finite input), IO (an input file missing or
 *      unreadable), FORMAT (a malformed file);
 *   1  runtime failure: NOMEM, NUMERIC (non-finite values appeared while computing), WRITE
 *      (an output could not be written), BACKEND. */
int dm_exit_code(dm_status st);

/* ---------------------------------------------------------------------------------------------
 * Logging and threads
 * ------------------------------------------------------------------------------------------- */
typedef enum { DM_LOG_QUIET = 0, DM_LOG_INFO = 1, DM_LOG_VERBOSE = 2 } dm_log_level;
void dm_set_log_level(dm_log_level level);
dm_log_level dm_get_log_level(void);
/* "[INFO] ..." on stderr when level >= INFO; "[VERB] ..." when level >= VERBOSE. */
void dm_log(dm_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Threads for matrix work (OpenBLAS) and for our own parallel loops. 0 = all cores. */
void dm_set_threads(int n);
int dm_get_threads(void);
double dm_time_sec(void); /* monotonic clock */

/* ---------------------------------------------------------------------------------------------
 * Input limits and checks (hardening, docs/reliability.md). Every reader range-checks a field
 * before converting it, and sizes what it allocates from what the file can actually hold.
 * ------------------------------------------------------------------------------------------- */
#define DM_MAX_CLASSES (1 << 15)     /* num_classes of a model or a routing dump              */
#define DM_SAMPLE_MAX_STEPS 100000   /* sampler steps (dm_sample_params_check, trace headers) */
/* 1 when all n values of x are finite; else 0 with *first_bad (may be NULL) = the index of the
 * first NaN or infinity. For checking inputs where they enter (a non-finite input is DM_ERR_ARG,
 * exit 2) and outputs where they leave a stage (DM_ERR_NUMERIC, exit 1). */
int dm_all_finite(const float *x, size_t n, size_t *first_bad);
/* (harden2) In this thread, make dm_model_forward fail with DM_ERR_NUMERIC when its output is
 * non-finite, naming the first stage (patch embedding, conditioning, block N) where non-finite
 * values appear (src/dit/finite_check.c). Off by default: the samplers report a non-finite latent
 * with its step and image themselves. ditmoe-forward turns it on. */
void dm_forward_report_nonfinite(int on);
/* Resume's test of a finished image (src/batch/pngcheck.c). DM_OK when path is a complete PNG
 * of w x h, 8-bit, `channels` (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA): signature, IHDR first with
 * that size and colour type, every chunk's CRC, at least one IDAT, IEND last and nothing after
 * it. Else DM_ERR_FORMAT (DM_ERR_IO if unreadable) naming the file and what is wrong. */
dm_status dm_batch_png_check(const char *path, int w, int h, int channels);
/* dm_batch_scan (the resume scan of a batch output folder), then every image found that the
 * shard (clean_rank, clean_size) owns (all of them when clean_rank < 0) is checked with
 * dm_batch_png_check; one that fails is logged, not counted and not marked done, so resume makes
 * it again (its rename replaces the bad file). */
dm_status dm_batch_scan_complete(const char *dir, int64_t num, int w, int h, int channels,
                                 uint8_t *done, int64_t *ndone, int clean_rank, int clean_size);

/* ---------------------------------------------------------------------------------------------
 * Backends (src/backend): where the transformer and the VAE compute. Chosen explicitly when a
 * model or VAE is loaded; asking for one this build lacks is an error, never a silent fallback.
 * ------------------------------------------------------------------------------------------- */
typedef enum { DM_BACKEND_CPU = 0, DM_BACKEND_CUDA, DM_BACKEND_COUNT } dm_backend_kind;
const char *dm_backend_name(dm_backend_kind k);                 /* "cpu", "cuda" */
int dm_backend_from_name(const char *s, dm_backend_kind *out);  /* 0 ok, -1 unknown */
/* DM_OK when this build has backend k; else DM_ERR_ARG with a message saying how to get it. */
dm_status dm_backend_check(dm_backend_kind k);

/* Options of dm_model_load_opts / dm_vae_load_opts; dm_load_opts_init fills every default. */
typedef struct dm_config_overrides dm_config_overrides; /* see "PyTorch checkpoints" below */
/* ---- precision (issue 13): arithmetic of the transformer's GEMMs ---- */
typedef enum { DM_PREC_F32 = 0, DM_PREC_BF16 } dm_precision;
const char *dm_precision_name(dm_precision p);              /* "f32", "bf16" */
int dm_precision_from_name(const char *s, dm_precision *out); /* 0, or -1 if unknown */
/* --quant-experts: "none" 0, "int8" 8, "int4" 4 (bits of the routed experts' weights). */
const char *dm_quant_name(int bits);
int dm_quant_from_name(const char *s, int *bits);             /* 0, or -1 if unknown */
typedef struct {
    dm_backend_kind backend; /* DM_BACKEND_CPU                                            */
    int device;              /* accelerator ordinal (cuda), 0                             */
    const dm_config_overrides *cfg; /* what the weights cannot tell (.pt files), NULL = none */
    /* issue 13 (CPU backend): bf16 = every GEMM but the router's with bf16 operands, fp32
     * accumulation; quant_experts 8/4 = routed experts int8 per channel / int4 per group of 32.
     * Defaults DM_PREC_F32 and 0: the exact float path. */
    dm_precision precision;
    int quant_experts;
} dm_load_opts;
void dm_load_opts_init(dm_load_opts *o);

/* ---------------------------------------------------------------------------------------------
 * Data types (enum <-> string tables shared by CLI and library)
 * ------------------------------------------------------------------------------------------- */
typedef enum { DM_F32 = 0, DM_F16, DM_BF16, DM_I32, DM_I64, DM_U8, DM_I8, DM_DTYPE_COUNT } dm_dtype;
const char *dm_dtype_name(dm_dtype t);          /* "F32", "F16", ... (safetensors spelling) */
int dm_dtype_from_name(const char *s, dm_dtype *out); /* 0 on success, -1 if unknown */
size_t dm_dtype_size(dm_dtype t);
float dm_f16_to_f32(uint16_t h);
float dm_bf16_to_f32(uint16_t h);
uint16_t dm_f32_to_f16(float f);   /* round to nearest even */
uint16_t dm_f32_to_bf16(float f);  /* round to nearest even */
/* Convert n elements of F32/F16/BF16 `src` into float32 `dst`. */
dm_status dm_convert_to_f32(dm_dtype t, const void *src, size_t n, float *dst);

#define DM_MAX_DIMS 8

/* ---------------------------------------------------------------------------------------------
 * Safetensors (src/io/safetensors.c): mmap'd, every offset/length/shape checked against the file.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const char *name;
    dm_dtype dtype;
    int ndim;
    int64_t shape[DM_MAX_DIMS];
    const void *data; /* points into the mapping */
    size_t nbytes;
} dm_st_tensor;

typedef struct dm_st_file dm_st_file;
dm_status dm_st_open(const char *path, dm_st_file **out);
void dm_st_close(dm_st_file *f);
const char *dm_st_path(const dm_st_file *f);
int dm_st_count(const dm_st_file *f);
const dm_st_tensor *dm_st_at(const dm_st_file *f, int i);
const dm_st_tensor *dm_st_find(const dm_st_file *f, const char *name); /* NULL if absent */
/* A string value of the header's "__metadata__" object, or NULL. */
const char *dm_st_meta(const dm_st_file *f, const char *key);
/* Look up `name`, check its shape equals shape[0..ndim) (error names file, tensor, both shapes),
 * convert to float32 into a new malloc'd buffer *out (caller frees). */
dm_status dm_st_load_f32(const dm_st_file *f, const char *name, int ndim, const int64_t *shape,
                         float **out);

/* ---------------------------------------------------------------------------------------------
 * PyTorch checkpoints and configuration overrides (src/io/pt*.c, pickle.c, pt_config.c,
 * st_write.c). dm_st_open also takes the .pt/.pth files torch.save writes (zip format, and the
 * legacy pre-1.6 format): recognised by their magic bytes, the tensors are mapped from the file
 * like safetensors ones. The pickle is read by a small interpreter that only builds tensors,
 * storages, dicts, lists and tuples and refuses every global outside an allowlist: nothing in the
 * file is ever executed (unlike torch.load). The state dict is found as
 * tools/convert_checkpoint.py finds it (ema_model_state_dict / ema / model / module / state_dict
 * / model_state_dict wrappers, "module." / "model." prefixes); other entries (optimizer state,
 * args) are skipped without touching their tensors.
 * What the weights cannot tell comes from overrides (the converter's flags); unset fields
 * default from the released-config table exactly as the converter does, so loading a .pt gives
 * the configuration (and the bits) of the safetensors the converter makes from it.
 * ------------------------------------------------------------------------------------------- */
struct dm_config_overrides {
    int heads;                  /* --heads, -1 = released table                                 */
    int top_k;                  /* --top-k, -1 = 2 (DiT-MoE), 1 (ProMoE)                        */
    int num_classes;            /* --num-classes, -1 = embedding rows - 1                       */
    const char *objective;      /* --objective "ddpm" | "rf", NULL = from the attention layout  */
    const char *class_names;    /* --class-names FILE (one name a line), NULL = none            */
    const char *name;           /* --name, NULL = released name or ""                           */
    const char *promoe_variant; /* --promoe-variant "tc" | "ec" (ProMoE only), NULL = tc       */
    const char *router;         /* --router "identity" | "softmax" | "sigmoid", NULL = identity */
    double vae_scale;           /* --vae-scale, 0 = 0.18215                                     */
    const char *sampler;        /* stored sampling defaults: NULL / -1 / NaN = objective's      */
    int steps;
    double cfg_scale;
    int cfg_channels;
};
void dm_config_overrides_init(dm_config_overrides *o); /* everything unset */
int dm_config_overrides_any(const dm_config_overrides *o); /* 1 if some field is set */
/* dm_st_open with overrides kept with the file for dm_config_from_file (ov may be NULL). */
dm_status dm_st_open_opts(const char *path, const dm_config_overrides *ov, dm_st_file **out);
int dm_st_is_pt(const dm_st_file *f); /* 1: the file is a PyTorch checkpoint */
/* The "ditmoe" configuration JSON of f as the converter writes it (its metadata, or inferred
 * from the tensors for .pt / metadata-less files; f's overrides applied). malloc'd string. */
dm_status dm_config_json(const dm_st_file *f, char **json);
/* Write a safetensors file atomically (temp file + rename): the n tensors in order, contiguous
 * data, and the metadata pairs meta = {key, value, key, value, ..., NULL} (may be NULL). */
dm_status dm_st_write(const char *path, int n, const dm_st_tensor *t, const char *const *meta);

/* ---------------------------------------------------------------------------------------------
 * .npy (src/io/npy.c): float32 / int32 / int64 / uint8, C order, little endian.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    dm_dtype dtype;
    int ndim;
    int64_t shape[DM_MAX_DIMS];
    void *data; /* malloc'd */
    size_t count; /* number of elements */
} dm_npy;
dm_status dm_npy_read(const char *path, dm_npy *out);
/* Read and require a dtype and (when ndim_expect >= 0) a rank; the error names file and flag. */
dm_status dm_npy_read_expect(const char *path, dm_dtype dtype, int ndim_expect, dm_npy *out);
/* Atomic: written to a temp file beside `path`, then renamed. */
dm_status dm_npy_write(const char *path, dm_dtype dtype, int ndim, const int64_t *shape,
                       const void *data);
void dm_npy_free(dm_npy *a);

/* ---------------------------------------------------------------------------------------------
 * Model configuration (src/io/config.c). Read from the safetensors "__metadata__" key "ditmoe"
 * (a JSON object, docs/format.md), else inferred from tensor names/shapes + the released table.
 * ------------------------------------------------------------------------------------------- */
typedef enum { DM_ARCH_DITMOE = 0, DM_ARCH_PROMOE } dm_arch;
typedef enum { DM_ATTN_TIMM = 0, DM_ATTN_QKNORM } dm_attn_layout; /* qkv/proj vs Wqkv/out_proj+qk LN */
typedef enum { DM_OBJ_DDPM = 0, DM_OBJ_RF } dm_objective;
const char *dm_arch_name(dm_arch a);             /* "dit-moe", "promoe" */
const char *dm_objective_name(dm_objective o);   /* "ddpm", "rf" */
int dm_objective_from_name(const char *s, dm_objective *out);
/* Samplers (src/sampler, see the sampling section below); the one name table. */
typedef enum {
    DM_SAMPLER_UNSET = -1, /* dm_config.default_sampler: the file names none                 */
    DM_SAMPLER_DDPM = 0, /* ancestral p_sample loop, learned-range variance (ddpm models)      */
    DM_SAMPLER_DDIM,     /* DDIM with eta (ddpm models)                                         */
    DM_SAMPLER_EULER,    /* rectified-flow Euler z <- z - v/N from t=1 down to 1/N (rf models)  */
    DM_SAMPLER_HEUN,     /* rectified-flow Heun; last step Euler so t=0 is never evaluated (rf) */
    DM_SAMPLER_COUNT
} dm_sampler_kind;
const char *dm_sampler_name(dm_sampler_kind k);                 /* "ddpm", "ddim", "euler", "heun" */
int dm_sampler_from_name(const char *s, dm_sampler_kind *out);  /* 0 ok, -1 unknown */
dm_objective dm_sampler_objective(dm_sampler_kind k);           /* the objective it samples */
/* ProMoE prototype-score activation (promoe.md §4.1); the metadata's promoe.router names. */
typedef enum {
    DM_ROUTER_IDENTITY = 0, /* raw cosine scores (released configs) */
    DM_ROUTER_SOFTMAX = 1,
    DM_ROUTER_SIGMOID = 2,
    DM_ROUTER_COUNT
} dm_router_act;
const char *dm_router_act_name(dm_router_act a);                /* "identity", "softmax", ... */
int dm_router_act_from_name(const char *s, dm_router_act *out); /* 0 ok, -1 unknown */

#define DM_MAX_CLASS_NAME 64
typedef struct {
    dm_arch arch;
    dm_attn_layout attn;
    int hidden;        /* D */
    int depth;         /* L */
    int heads;         /* H; head dim = D/H */
    int num_experts;   /* E routed experts */
    int top_k;         /* k */
    int expert_hidden; /* routed expert width, 4D in DiT-MoE */
    int shared_hidden; /* shared expert width, 2D in DiT-MoE (0 = none) */
    int patch;         /* p */
    int input_size;    /* latent H = W */
    int in_channels;   /* C */
    int out_channels;  /* 2C when learn_sigma else C */
    int learn_sigma;
    int num_classes;   /* null class id = num_classes */
    char (*class_names)[DM_MAX_CLASS_NAME]; /* [num_classes] or NULL */
    dm_objective objective;
    float vae_scale;   /* latent scaling factor, 0.18215 for SD-VAE */
    char name[64];     /* e.g. "DiT-MoE-S/2-8E2A" or "" */
    /* ProMoE (arch == DM_ARCH_PROMOE; promoe.md). DiT-MoE leaves these at their defaults. */
    int moe_interleave;  /* 0: every block is MoE (DiT-MoE); 1: odd blocks MoE, even dense */
    int mlp_hidden;      /* dense blocks' GELU-tanh MLP width (4D), 0 when no dense block */
    int promoe_ec;       /* 1: expert-choice routing, 0: token-choice */
    dm_router_act router_act; /* prototype score activation (DM_ROUTER_IDENTITY default)  */
    float qk_norm_eps;   /* q/k LayerNorm eps: 1e-6 DiT-MoE, 1e-5 ProMoE */
    float time_scale;    /* samplers feed time_scale * flow time: 1 DiT-MoE, 1000 ProMoE */
    /* Sampling defaults as the file states them (metadata "sampling" object), nothing filled
     * in: dm_sample_params_init holds the defaults per (arch, objective) for what is unset. */
    dm_sampler_kind default_sampler; /* DM_SAMPLER_UNSET when the file names none          */
    int default_steps;               /* 0 = unset                                           */
    float default_cfg_scale;         /* 0 = unset                                           */
    int cfg_channels;                /* channels guided: 3 = DiT's DDPM quirk, 0 = all,
                                        -1 = unset                                          */
} dm_config;

/* Fill `cfg` from an opened file (metadata first, then inference). */
dm_status dm_config_from_file(const dm_st_file *f, dm_config *cfg);
void dm_config_free(dm_config *cfg); /* frees class_names */
/* Class id from "207", or from a name in the table (case-insensitive); -1 and error if none. */
dm_status dm_config_class_id(const dm_config *cfg, const char *s, int *out);

/* ---------------------------------------------------------------------------------------------
 * Diffusion transformer (src/dit, src/router)
 * ------------------------------------------------------------------------------------------- */
typedef struct dm_model dm_model;
dm_status dm_model_load(const char *path, dm_model **out);
/* Same with explicit options (backend, device); dm_model_load uses the defaults. */
dm_status dm_model_load_opts(const char *path, const dm_load_opts *o, dm_model **out);
void dm_model_free(dm_model *m);
const dm_config *dm_model_config(const dm_model *m);
const char *dm_model_path(const dm_model *m);

/* Optional routing record of one forward: for every MoE layer and token, the k chosen experts
 * (descending gate weight, -1 = none) and their gate weights. Caller allocates (or passes
 * NULL). ProMoE: the unconditional expert has id num_experts (weight 1, tokens of null-class
 * images); only the odd (MoE) blocks are recorded; expert-choice records the first k experts
 * that picked the token. */
typedef struct {
    int32_t *ids;     /* [L_moe, B*T, k] */
    float *weights;   /* [L_moe, B*T, k] (may be NULL) */
} dm_routes;
/* Number of MoE layers (depth for DiT-MoE, depth/2 for interleaved ProMoE). */
int dm_config_moe_layers(const dm_config *cfg);

/* out = model(x, t, y): x [B,C,H,W], t [B] (fed to the timestep embedder as given),
 * y [B] with null class = num_classes; out [B,Cout,H,W]. */
dm_status dm_model_forward(dm_model *m, int B, const float *x, const float *t, const int64_t *y,
                           float *out, dm_routes *routes);

/* ---------------------------------------------------------------------------------------------
 * VAE decoder (src/vae)
 * ------------------------------------------------------------------------------------------- */
typedef struct dm_vae dm_vae;
typedef struct {
    int z_channels;   /* 4 for SD */
    int out_channels; /* 3 */
    int factor;       /* spatial upsampling, 2^(len(ch_mult)-1) = 8 for SD */
    float scale;      /* scaling factor, default 0.18215 */
} dm_vae_info;
dm_status dm_vae_load(const char *path, dm_vae **out);
dm_status dm_vae_load_opts(const char *path, const dm_load_opts *o, dm_vae **out);
void dm_vae_free(dm_vae *v);
const dm_vae_info *dm_vae_get_info(const dm_vae *v);
/* img = decoder(z / scale): z [B,zc,h,w] in the diffusion model's latent space,
 * img [B,out_ch,h*factor,w*factor] roughly in [-1,1]. Decodes image by image. */
dm_status dm_vae_decode(dm_vae *v, int B, int h, int w, const float *z, float *img);

/* ---------------------------------------------------------------------------------------------
 * Images (src/io/png.c)
 * ------------------------------------------------------------------------------------------- */
/* Write an 8-bit PNG atomically (temp file + rename). channels: 1 gray, 3 RGB, 4 RGBA;
 * pix [h, w, channels]. text: NULL-terminated list key, value, key, value, ..., NULL stored as
 * tEXt chunks (or NULL for none). */
dm_status dm_png_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                       const char *const *text);
/* Float image [channels, h, w] in [-1,1] -> uint8 [h, w, channels] the way DiT's sample_ddp.py
 * does it: clamp(127.5*x + 128, 0, 255), truncated. */
void dm_image_to_u8(int channels, int h, int w, const float *chw, uint8_t *hwc);

/* Default model files, relative to the source tree's assets/ (see dm_default_asset()). */
#define DM_DEFAULT_MODEL "ditmoe-fmnist.safetensors"
#define DM_DEFAULT_VAE "vae-fmnist.safetensors"

/* ---------------------------------------------------------------------------------------------
 * Sampling (src/sampler): DDPM / DDIM (Gaussian diffusion, DiT's respaced tables), rectified-flow
 * Euler / Heun (DiT-MoE convention: t = 1 is noise, v = noise - data), classifier-free guidance
 * on one doubled batch, and a counter-based noise generator (Philox4x32-10 + Box-Muller).
 *
 * Time convention for --cfg-interval (cfg_t_lo, cfg_t_hi): the fraction t in [0,1] where 1 is
 * pure noise, for every sampler: DDPM/DDIM t = timestep / (num_train_steps - 1) (999 -> 1.0,
 * 0 -> 0.0); Euler/Heun t = the flow time itself (i/N, and the Heun corrector's t - 1/N).
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    dm_sampler_kind sampler;
    int steps;            /* sampler steps N (respaced DDPM steps, or flow steps)          */
    float cfg_scale;      /* guidance scale s; 1 = no guidance (no doubled batch)          */
    int cfg_channels;     /* latent channels guided: 3 = DiT's DDPM quirk, 0 = all         */
    float cfg_t_lo;       /* guidance only while cfg_t_lo <= t <= cfg_t_hi (t: see above)  */
    float cfg_t_hi;
    float eta;            /* DDIM eta (0 = deterministic)                                  */
    uint64_t seed;        /* noise key; image i's noise depends only on (seed, index, step)*/
    int num_train_steps;  /* T of the base DDPM schedule (1000)                            */
    /* MoE lab (issue 14), --self-contrast W[,weak=...][,mode=...]: see that section below */
    float sc_w;           /* self-contrast weight W; 0 = off                                 */
    int sc_weak;          /* dm_weak_kind of the weak conditional pass (DM_WEAK_RANK2 = 0)  */
    int sc_replace;       /* 1: the weak pass replaces the unconditional branch; 0: added   */
} dm_sample_params;
/* Every default in one place: sampler, steps, cfg scale and cfg channels from the one table
 * of defaults per (arch, objective) (DiT-MoE ddpm: ddpm 250 4.0 3; DiT-MoE rf: euler 50 4.0 all;
 * ProMoE: the same samplers and channels, 250 steps, cfg 1.5), overridden by what cfg's file
 * sets; cfg may be NULL (DiT-MoE ddpm). Interval [0,1], eta 0, seed 0, 1000 train steps. */
void dm_sample_params_init(dm_sample_params *p, const dm_config *cfg);
/* Check p against a model: sampler/objective pair, steps, channels, interval. DM_ERR_ARG. */
dm_status dm_sample_params_check(const dm_sample_params *p, const dm_config *cfg);

/* The denoiser the sampler drives: out = model(x, t, y), x [B,C,H,W], t [B], y [B] (null class
 * = num_classes), out [B,out_channels,H,W]; out_channels is C or 2C (learned variance). */
struct dm_forward_rows;
typedef dm_status (*dm_denoise_fn)(void *ctx, int B, const float *x, const float *t,
                                   const int64_t *y, float *out);
typedef struct {
    dm_denoise_fn fn;
    void *ctx;
    int channels, out_channels, height, width;
    int num_classes; /* null class id */
    float time_scale; /* flow samplers feed time_scale * t (ProMoE 1000); 0 means 1 */
    /* MoE lab (optional, NULL = absent; see "MoE lab" below): the same evaluation with per-row
     * keys (image index, branch, normalised time), which the sampler then always uses; and
     * the start of each dm_sample call (a trajectory) with the most rows one evaluation has. */
    dm_status (*fn_rows)(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                         const struct dm_forward_rows *rows, float *out);
    dm_status (*begin)(void *ctx, int max_rows);
} dm_denoiser;
/* A denoiser calling dm_model_forward(m, ...) (no routing record). */
void dm_model_denoiser(dm_model *m, dm_denoiser *d);

/* Called after each sampler step s = 1..N (may be NULL). */
typedef void (*dm_progress_fn)(void *ctx, int step, int nsteps);

/* Sample B images. y [B] class ids, index [B] global image indices (noise keys),
 * init [B,C,H,W] initial noise or NULL (then drawn as stream 0 of (seed, index[b])),
 * z [B,C,H,W] the final latent. With guidance the denoiser runs on 2B rows
 * ([x; x] with labels [y; null]) in ONE call per evaluation.
 * A non-finite latent fails with DM_ERR_NUMERIC naming the step. */
dm_status dm_sample(const dm_denoiser *d, const dm_sample_params *p, int B, const int64_t *y,
                    const uint64_t *index, const float *init, float *z, dm_progress_fn progress,
                    void *progress_ctx);

/* Philox4x32-10 (Salmon et al. 2011): one block of 4 words from counter ctr and key key. */
void dm_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);
/* n standard normals for (seed, image index, stream): block j uses counter
 * {j, stream, index lo32, index hi32} and key {seed lo32, seed hi32}; each block gives two
 * Box-Muller pairs (u = (w + 0.5) / 2^32, computed in double, rounded to float):
 * out[4j+0] = r0 cos(2pi u1), out[4j+1] = r0 sin(2pi u1), r0 = sqrt(-2 ln u0) from words 0,1,
 * out[4j+2], out[4j+3] likewise from words 2,3. Stream 0 = initial noise, stream s = noise of
 * sampler step s (1-based, in run order). */
void dm_noise_normal(uint64_t seed, uint64_t index, uint32_t stream, size_t n, float *out);

/* DiT / IDDPM Gaussian-diffusion tables (float64): linear betas 1e-4..0.02 over T steps, respaced
 * to `steps` with DiT's space_timesteps (float stride accumulation, half-to-even rounding). */
typedef struct {
    int n;                    /* respaced steps */
    int64_t *timestep;        /* [n] original timesteps fed to the model (ascending) */
    double *beta, *ac, *ac_prev, *sqrt_recip_ac, *sqrt_recipm1_ac;   /* each [n] */
    double *post_var, *post_logvar_clipped, *log_beta, *coef1, *coef2; /* each [n] */
} dm_ddpm_schedule;
dm_status dm_ddpm_schedule_init(dm_ddpm_schedule *s, int num_train_steps, int steps);
void dm_ddpm_schedule_free(dm_ddpm_schedule *s);

/* ---------------------------------------------------------------------------------------------
 * MoE lab: run-time routing options (issue 14; docs/moe-lab.md has the exact rules). Set per
 * model with dm_model_set_lab (strings as the CLI flags take them); every option off is the
 * trained model and the fast `ffn` op. With any option on, each MoE layer runs router scores ->
 * policy (router/route_policy.h) -> per-token mask (skipped / cached) -> grouped expert GEMMs
 * over the picks -> expert cache -> + shared expert. ProMoE expert choice takes none of them.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const char *route;        /* --route: top-k[=K] | top-p=P[,max=K][,renorm] |
                               * threshold=T[,max=K][,renorm] | rank2=TAU[,margin=D] (ProMoE);
                               * NULL or "" = top-k (the trained behaviour)                     */
    const char *skip_routed;  /* --skip-routed: LAYERS@T0-T1 rules joined by ';'; NULL = none  */
    const char *expert_cache; /* --expert-cache: K[,refresh=fixed|route|delta:EPS][,mem=MiB];
                               * NULL or "" = off                                               */
} dm_lab_opts;
void dm_lab_opts_init(dm_lab_opts *o); /* everything off */
/* Parse and check o against the model and install it (NULL: back to defaults). DM_ERR_ARG with
 * one line naming the flag; DM_ERR_BACKEND when the backend lacks the split MoE ops. */
dm_status dm_model_set_lab(dm_model *m, const dm_lab_opts *o);
/* Free the lab state (back to the trained behaviour); dm_model_free does it too. NULL-safe. */
void dm_model_lab_free(dm_model *m);
/* Canonical string of "route" ("top-k" by default), "skip_routed", "expert_cache" ("" = off). */
const char *dm_model_lab_string(const dm_model *m, const char *key);
/* k slots per token of dm_routes records: the policy's most picks (the model's k by default). */
int dm_model_route_slots(const dm_model *m);
/* Start of a trajectory: the expert cache is (re)created for max_rows rows and emptied. */
dm_status dm_model_lab_begin(dm_model *m, int max_rows);
/* Expert cache counters since the last dm_model_set_lab (token-layer outputs) and its bytes. */
void dm_model_lab_stats(const dm_model *m, int64_t *computed, int64_t *reused, size_t *bytes);

/* Weak routing of a self-contrast pass: only the 2nd / 3rd / 1st ranked expert, or none. */
typedef enum { DM_WEAK_RANK2 = 0, DM_WEAK_RANK3, DM_WEAK_TOP1, DM_WEAK_SHARED } dm_weak_kind;
/* Row branches (expert-cache keys, dump row kinds). */
#define DM_BRANCH_COND 0
#define DM_BRANCH_UNCOND 1
#define DM_BRANCH_WEAK 2
/* Token flags of routing dumps: the routed output came from the expert cache; the routed
 * experts were skipped (--skip-routed). The ids keep the router's picks either way. */
#define DM_TRACE_TOK_CACHED 4u
#define DM_TRACE_TOK_SKIPPED 8u

/* Per-row facts of one evaluation (the sampler fills them; every pointer may be NULL). */
typedef struct dm_forward_rows {
    const int64_t *image;  /* [B] global image index: the expert-cache key (NULL: no cache)    */
    const uint8_t *branch; /* [B] DM_BRANCH_*; NULL = all conditional/unconditional by label */
    const float *t01;      /* [B] normalised time, 1 = noise (--skip-routed); NULL = no skip    */
    dm_weak_kind weak;     /* routing of DM_BRANCH_WEAK rows                                   */
    uint8_t *token_flags;  /* out [L_moe, B*T]: DM_TRACE_TOK_CACHED / _SKIPPED bits, or NULL   */
} dm_forward_rows;
/* dm_model_forward with per-row facts (rows may be NULL: then exactly dm_model_forward). */
dm_status dm_model_forward_rows(dm_model *m, int B, const float *x, const float *t,
                                const int64_t *y, const dm_forward_rows *rows, float *out,
                                dm_routes *routes);
/* --self-contrast W[,weak=rank2|rank3|top1|shared][,mode=add|replace] into p's sc_* fields
 * (DM_ERR_ARG with one line); and its canonical string ("" when off). */
dm_status dm_self_contrast_set(dm_sample_params *p, const char *spec);
void dm_self_contrast_string(const dm_sample_params *p, char *buf, size_t n);
/* Records of these options: dm_gen_text_init adds "route" (always) and "skip-routed",
 * "expert-cache", "self-contrast" (when on); the tracing denoiser adds "route", "skip_routed",
 * "expert_cache" (and the sampler object "self_contrast") to a dump's header, whose shape.top_k
 * must be dm_model_route_slots; ditmoe-batch appends them to params.engine. */
/* Write one evaluation with explicit row kinds (0 cond, 1 uncond, 2 weak) into a dump. */
typedef struct dm_trace dm_trace;
dm_status dm_trace_write_rows(dm_trace *tr, int R, const float *t, const int64_t *y,
                              const uint8_t *kind, const int32_t *ids, const float *weights,
                              const uint8_t *token_flags);

/* ---------------------------------------------------------------------------------------------
 * Routing traces (src/trace): dumps of the router's decisions during sampling, their reader and
 * the aggregation behind the DiT-MoE paper's routing figures (ditmoe.md §7; docs/routing.md has
 * the byte layout). One record per denoiser evaluation ("eval"; Heun makes two per step except
 * the last), holding for every recorded MoE layer, row and token the k chosen experts
 * (descending gate weight, -1 = no expert) and, optionally, their gate weights (stored float16).
 * Rows are marked conditional or unconditional (label == null class, the second half of a
 * guided batch). ProMoE fits the same records: its unconditional expert is id E
 * (uncond_expert), expert-choice drops are id -1, and optional per-token flags carry the rest.
 * Records stream to "<path>.tmp.<pid>" (bounded memory); dm_trace_close() appends the JSON
 * header and renames the file into place.
 * ------------------------------------------------------------------------------------------- */
#define DM_TRACE_MAX_LAYERS 256
typedef struct {
    int layers;        /* Lm: MoE layers recorded                                             */
    int moe_layers[DM_TRACE_MAX_LAYERS]; /* [Lm] transformer block of each recorded layer     */
    int grid_h, grid_w;/* token grid; T = grid_h * grid_w tokens in raster order              */
    int top_k;         /* k slots per token                                                    */
    int num_experts;   /* E routed experts (ids 0..E-1)                                        */
    int uncond_expert; /* ProMoE: id of the unconditional expert (= E); -1 = none (DiT-MoE)    */
    int num_classes;   /* null label = num_classes                                             */
    int steps;         /* sampler steps N (0 = unknown: step = eval)                           */
    int heun;          /* 1: evals 2s, 2s+1 belong to step s, the last step has one            */
    int weights;       /* 1: gate weights stored (float16)                                     */
} dm_trace_shape;
/* Token flag bits (optional [Lm, R*T] bytes per record; ProMoE only). */
#define DM_TRACE_TOK_UNCOND 1u  /* routed to the unconditional expert                        */
#define DM_TRACE_TOK_DROPPED 2u /* no routed expert (expert-choice capacity)                  */

/* Shape of a model's trace: every MoE block (DiT-MoE: all; ProMoE: the odd ones), its token
 * grid, k, E, classes; steps/heun from p (may be NULL); weights on. */
void dm_trace_shape_from_model(dm_trace_shape *s, const dm_config *cfg, const dm_sample_params *p);
int dm_trace_tokens(const dm_trace_shape *s); /* grid_h * grid_w */
/* Step of evaluation `eval` of one image's trajectory (see heun above). */
int dm_trace_step_of_eval(const dm_trace_shape *s, int eval);

typedef struct dm_trace dm_trace;
/* Start a dump. cfg, model_path and p only feed the JSON header (each may be NULL). */
dm_status dm_trace_open(const char *path, const dm_trace_shape *s, const dm_config *cfg,
                        const char *model_path, const dm_sample_params *p, dm_trace **out);
/* A string kept in the header's "notes" object, e.g. ("images", "out-%03d.png"). */
dm_status dm_trace_note(dm_trace *tr, const char *key, const char *value);
/* Start a batch (call before each dm_sample): B images, classes y [B], global indices
 * index [B]. Evaluations count from 0 again. Rows of the following evals map to images by
 * row % B. */
dm_status dm_trace_batch(dm_trace *tr, int B, const int64_t *y, const uint64_t *index);
/* Append one evaluation of R rows: t [R], labels y [R], routes with ids/weights
 * [Lm, R*T, k] (weights may be NULL; ignored unless shape.weights), token_flags [Lm, R*T] or
 * NULL. Ids must be in [-1, E) (or == uncond_expert). */
dm_status dm_trace_write(dm_trace *tr, int R, const float *t, const int64_t *y,
                         const int32_t *ids, const float *weights, const uint8_t *token_flags);
/* Finish: header, fsync, rename. Frees tr (also on failure, removing the temp file). */
dm_status dm_trace_close(dm_trace *tr);
/* Drop an unfinished dump (temp file removed); NULL is fine. */
void dm_trace_abort(dm_trace *tr);
/* Seconds spent inside the tracing (copying, converting, writing), for overhead reports. */
double dm_trace_seconds(const dm_trace *tr);

/* A denoiser that runs dm_model_forward(m) with a routing record and appends each evaluation
 * to tr (shape from dm_trace_shape_from_model). tr and m must outlive it. */
void dm_trace_denoiser(dm_trace *tr, dm_model *m, dm_denoiser *out);

/* Reading a dump back. Every length, id and count is checked against the header; a truncated
 * or corrupt file gives DM_ERR_FORMAT naming the file and the record. */
typedef struct {
    int batch, eval, step, rows; /* R rows                                                   */
    const int64_t *image;        /* [R] global image index (-1 = unknown)                    */
    const int64_t *label;        /* [R] label fed to the model (null = num_classes)          */
    const int64_t *cls;          /* [R] class of the row's image (also for unconditional rows)*/
    const float *t;              /* [R] time fed to the model                                */
    const uint8_t *uncond;       /* [R] 1 = unconditional row                                */
    const int32_t *ids;          /* [Lm, R*T, k], -1 = none                                  */
    const float *weights;        /* [Lm, R*T, k] or NULL                                     */
    const uint8_t *token_flags;  /* [Lm, R*T] or NULL                                        */
} dm_trace_record;
typedef struct dm_trace_reader dm_trace_reader;
dm_status dm_trace_read_open(const char *path, dm_trace_reader **out);
const dm_trace_shape *dm_trace_read_shape(const dm_trace_reader *r);
const char *dm_trace_read_header(const dm_trace_reader *r); /* the JSON text */
long dm_trace_read_count(const dm_trace_reader *r);         /* records in the file */
/* Next record into *rec (valid until the next call); *rec = NULL after the last one. */
dm_status dm_trace_read_next(dm_trace_reader *r, const dm_trace_record **rec);
void dm_trace_read_close(dm_trace_reader *r);

/* Aggregated counts (src/trace/aggregate.c), every pick counted (both of top-2), weights not
 * used. X = E, or E + 1 when an unconditional expert exists (its column is index E). */
typedef struct {
    dm_trace_shape shape;
    int X;               /* expert columns                                                    */
    int S;               /* step rows (shape.steps, or evals seen when steps is 0)            */
    int count_uncond;    /* 0: conditional rows counted (paper), 1: unconditional rows       */
    int64_t *by_class;   /* [Lm, num_classes, X]                                              */
    int64_t *by_pos;     /* [Lm, T, X]                                                        */
    int64_t *by_step;    /* [Lm, S, X]                                                        */
    int64_t *by_step_pos;/* [Lm, S, T, X] or NULL when too large (> 2^24 cells)              */
    int64_t rows, tokens, picks, none; /* counted rows, row-tokens, picks, empty slots      */
    int64_t skipped_rows;/* rows of the other half                                            */
} dm_route_counts;
dm_status dm_route_counts_init(dm_route_counts *c, const dm_trace_shape *s, int count_uncond);
/* Add one record; DM_ERR_FORMAT if it does not fit the shape (label or step out of range). */
dm_status dm_route_counts_add(dm_route_counts *c, const dm_trace_record *rec);
void dm_route_counts_free(dm_route_counts *c);
/* Mutual information I(A; expert) in bits of a count table [nA, X] (picks as samples), and
 * the entropy H(expert) in bits; either pointer may be NULL. */
void dm_route_table_info(const int64_t *tab, int nA, int X, double *mi_bits, double *h_bits);

/* ---------------------------------------------------------------------------------------------
 * Image files (src/io/png.c, src/io/image_write.c): PNG (libpng, tEXt chunks), JPEG and BMP
 * (stb_image_write). Every writer is atomic (temp file beside the target + rename) and fails
 * with DM_ERR_WRITE when the output cannot be written. pix [h, w, channels], channels 1 or 3
 * (PNG also 4); text: NULL-terminated key, value, ..., NULL list or NULL.
 * ------------------------------------------------------------------------------------------- */
typedef enum { DM_IMAGE_PNG = 0, DM_IMAGE_JPEG, DM_IMAGE_BMP } dm_image_format;
/* From the file name's extension (.png, .jpg/.jpeg, .bmp, case-insensitive); -1 otherwise. */
int dm_image_format_from_path(const char *path, dm_image_format *out);
const char *dm_image_format_name(dm_image_format f); /* "png", "jpeg", "bmp" */
/* Baseline JPEG at quality 1..100; text is stored as one COM segment right after SOI, one
 * "key=value" line per pair (at most 65533 bytes). */
dm_status dm_jpeg_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                        int quality, const char *const *text);
/* Uncompressed BMP (no metadata: BMP has no place for it). */
dm_status dm_bmp_write(const char *path, int w, int h, int channels, const uint8_t *pix);
/* Write n bytes to path atomically (temp file + rename); DM_ERR_WRITE naming path. */
dm_status dm_write_file_atomic(const char *path, const void *data, size_t n);
/* Pick the writer from the extension (quality: JPEG only; BMP drops text). */
dm_status dm_image_write(const char *path, int w, int h, int channels, const uint8_t *pix,
                         int quality, const char *const *text);
/* Read a PNG as 8-bit RGB [h, w, 3] (malloc'd; gray and alpha converted). DM_ERR_IO when the
 * file cannot be opened, DM_ERR_FORMAT when it is not a readable PNG. */
dm_status dm_png_read_rgb(const char *path, int *w, int *h, uint8_t **rgb);

/* A tiny RGB canvas for figures (src/trace/render.c, ditmoe-routes): filled rectangles, a 5x7
 * bitmap font, the routing figures' colour scales. */
typedef struct {
    int w, h;
    uint8_t *pix; /* [h, w, 3] */
} dm_canvas;
dm_status dm_canvas_init(dm_canvas *c, int w, int h); /* white */
void dm_canvas_free(dm_canvas *c);
void dm_canvas_rect(dm_canvas *c, int x, int y, int w, int h, const uint8_t rgb[3]);
/* Text in the 5x7 font at integer scale (glyph cell 6x8 * scale); lower case is drawn as upper
 * case, unknown characters as a box. Returns the width drawn. */
int dm_canvas_text(dm_canvas *c, int x, int y, int scale, const char *s, const uint8_t rgb[3]);
int dm_text_width(const char *s, int scale);
/* Diverging scale for a ratio r to uniform (r = P * E, 1 = uniform): log2 r clipped to
 * [-2, 2], blue (1/4x) - white (1x) - red (4x). */
void dm_color_ratio(double r, uint8_t rgb[3]);
/* Distinct colour of expert e (a fixed 16-colour palette, cycled). */
void dm_color_expert(int e, uint8_t rgb[3]);

/* ---------------------------------------------------------------------------------------------
 * Batch runs (src/batch): many images for FID, sharded and resumable (ditmoe-batch). Everything
 * an image depends on is a function of (seed, global index): its class here, its noise through
 * dm_sample's index argument, so the set of files never depends on the batch size, the number
 * of processes or the order in which work finishes. The ADM evaluator's .npz is written as a
 * stored zip (ZIP64 when large).
 * ------------------------------------------------------------------------------------------- */
/* Lower-case hex SHA-256 (FIPS 180-2) of a whole file; DM_ERR_IO naming the file. */
dm_status dm_sha256_file(const char *path, char hex[65]);

typedef enum {
    DM_BATCH_RANDOM = 0, /* uniform over [0, num_classes), Philox keyed apart from the noise  */
    DM_BATCH_BALANCED,   /* index mod num_classes                                             */
    DM_BATCH_LIST,       /* list[index mod nlist]                                             */
} dm_batch_class_mode;

typedef struct {
    dm_batch_class_mode mode;
    int num_classes; /* the model's K (null class = K) */
    int nlist;
    int *list;       /* [nlist] class ids (LIST mode), malloc'd */
} dm_batch_classes;

/* Parse "random", "balanced" or a comma list of ids/names (resolved with dm_config_class_id).
 * DM_ERR_ARG naming --classes. */
dm_status dm_batch_classes_parse(const char *s, const dm_config *cfg, dm_batch_classes *out);
void dm_batch_classes_free(dm_batch_classes *c);
/* Canonical text: "random", "balanced" or "3,5,7" (ids), for the manifest. */
void dm_batch_classes_str(const dm_batch_classes *c, char *buf, size_t n);
/* Class of image `index` under noise seed `seed`. Random mode: Philox4x32-10 with counter
 * {draw, 0x636c6173 ("clas"), index lo32, index hi32} and key {seed lo32 ^ 0x9e3779b9,
 * seed hi32 ^ 0xbb67ae85} (the noise uses key {seed lo32, seed hi32}); each 32-bit word w gives
 * a class by Lemire's multiply-shift with rejection of w*K mod 2^32 < 2^32 mod K, so every class
 * is exactly equally likely. */
int dm_batch_class_of(const dm_batch_classes *c, uint64_t seed, uint64_t index);

/* Shard r of n owns the indices i with i mod n == r. */
static inline int dm_batch_owns(uint64_t index, int rank, int size)
{
    return (int)(index % (uint64_t)size) == rank;
}

/* "DIR/000123.png" ({index:06d}, wider when needed). */
void dm_batch_png_path(const char *dir, uint64_t index, char *buf, size_t n);

/* Scan DIR once: done[i] = 1 for every i < num with DIR/{i:06d}.png present (a finished image:
 * files appear only by rename). Returns the count in *ndone. When clean_rank >= 0, also removes
 * leftover temp files "{i:06d}.png.tmp.*" of indices shard (clean_rank, clean_size) owns, and
 * "manifest.json.tmp.*" when clean_rank == 0. done may be NULL (count only). */
dm_status dm_batch_scan(const char *dir, int64_t num, uint8_t *done, int64_t *ndone,
                        int clean_rank, int clean_size);

typedef struct {
    char model_file[256], vae_file[256]; /* base names, informational (not compared) */
    char model_sha256[65], vae_sha256[65];
    uint64_t seed;
    char sampler[16];
    int steps;
    float cfg_scale;
    int cfg_channels; /* 0 = all */
    float cfg_t_lo, cfg_t_hi, eta;
    char classes[4096]; /* dm_batch_classes_str() */
    int num_classes;
    int64_t num;        /* N images, indices 0..N-1 */
    int width, height, channels; /* PNG size */
    /* Everything else that changes the pixels besides the files and the sampling parameters:
     * the effective model configuration (config overrides of .pt files) and engine options,
     * as one "key=value;..." string compared verbatim on resume ("" = none recorded). */
    char engine[512];
} dm_batch_params;

/* Write DIR/manifest.json atomically: every parameter plus progress {done, total}. */
dm_status dm_batch_manifest_write(const char *dir, const dm_batch_params *p, int64_t done);
/* If DIR/manifest.json exists, compare it with p. DM_ERR_ARG naming the first differing
 * parameter by its flag, with both values; DM_ERR_FORMAT if unreadable. *found = 0 if absent. */
dm_status dm_batch_manifest_check(const char *dir, const dm_batch_params *p, int *found);
/* Read N, the class text and the image size back (for pack). */
dm_status dm_batch_manifest_read(const char *dir, dm_batch_params *p);

/* Read DIR/000000.png .. {num-1}.png (libpng, one at a time) into OUT.npz: arr_0 uint8
 * [num, H, W, 3] (gray replicated to RGB, alpha dropped), and with labels arr_1 int64 [num] from
 * each PNG's tEXt "class" (leading integer). Refuses missing indices (naming the first) and
 * differing sizes. */
dm_status dm_batch_pack(const char *dir, int64_t num, const char *out, int labels, int force_zip64,
                        dm_progress_fn progress, void *progress_ctx);

/* ---------------------------------------------------------------------------------------------
 * MoE lab: analysis and pruning (src/trace/analysis.c, src/router/prune.c; docs/moe-lab.md,
 * spec docs/spec/moe-inference.md A4, A6, A8). What ditmoe-routes and ditmoe-prune compute.
 * ------------------------------------------------------------------------------------------- */
/* Statistics of routing dumps, accumulated record by record (dm_trace_read_next), over the
 * counted half (conditional rows, or unconditional with count_uncond). X = E, or E + 1 with
 * ProMoE's unconditional expert (last column); at most 64.
 *  - ExFlow affinity: per adjacent MoE-layer pair (l, l+1), counts of (expert e picked at l,
 *    expert f picked at l+1) over every token's picks (a top-2 token adds 4 pairs);
 *    P(f | e) = count(e, f) / sum_f count(e, f).
 *  - top-k set persistence: per layer and step s >= 1, the tokens whose SET of experts (order
 *    ignored) at step s equals step s-1's (first evaluation of each step, same image and
 *    half), and those with the same top-1.
 *  - experts per token per layer and step (variable-k dumps: its mean).
 *  - co-activation per layer: coact[e][f] = tokens that picked both e and f (e != f), the
 *    diagonal = tokens that picked e; mass[e] = sum of e's gate weights (dumps with weights). */
typedef struct dm_route_analysis dm_route_analysis;
dm_status dm_route_analysis_new(const dm_trace_shape *s, int count_uncond, dm_route_analysis **out);
void dm_route_analysis_free(dm_route_analysis *a); /* NULL ok */
/* Add one record (records in file order). DM_ERR_FORMAT if it does not fit the shape. */
dm_status dm_route_analysis_add(dm_route_analysis *a, const dm_trace_record *rec);
int dm_route_analysis_experts(const dm_route_analysis *a); /* X */
/* Affinity counts of layer pair (l, l+1), [X, X] (row e = expert at l); P(f | e) into p. */
const int64_t *dm_route_affinity_counts(const dm_route_analysis *a, int l);
void dm_route_affinity_prob(const dm_route_analysis *a, int l, double *p /* [X, X] */);
/* Persistence summed over steps [s0, s1] of layer l (l < 0: all layers): returns the tokens
 * compared; keep_set / keep_top1 (either may be NULL) the tokens that kept them. */
int64_t dm_route_persist_band(const dm_route_analysis *a, int l, int s0, int s1, int64_t *keep_set,
                              int64_t *keep_top1);
/* Mean routed experts per token over steps [s0, s1] of layer l (l < 0: all layers). */
double dm_route_mean_experts(const dm_route_analysis *a, int l, int s0, int s1);
const int64_t *dm_route_coact(const dm_route_analysis *a, int l); /* [X, X] */
const double *dm_route_mass(const dm_route_analysis *a, int l);   /* [X]    */
/* Everything as one JSON object (malloc'd text; docs/moe-lab.md §6 lists the keys), the
 * per-step tables also in `bands` equal step bands. */
dm_status dm_route_analysis_json(const dm_route_analysis *a, int bands, char **json);

/* What routing policy `spec` (the --route syntax: top-k[=K], top-p=P[,max=K][,renorm],
 * threshold=T[,...], rank2=TAU[,margin=D]) selects on recorded router scores
 * scores [L, M, E] (M = S steps x tokens, step-major; tools/moe_lab/router_probs.py): the mean
 * experts per token of each layer in `bands` equal step bands, mean [L, bands]. cosine = 1:
 * ProMoE cosine scores (rank2 only), else softmax probabilities; top_k = the model's k.
 * DM_ERR_ARG naming the spec, or --steps when S does not divide M. */
dm_status dm_route_policy_experts(const char *spec, const float *scores, int L, int64_t M, int E,
                                  int S, int top_k, int cosine, int bands, double *mean);

/* Structured expert pruning of a DiT-MoE or ProMoE model. Per MoE layer two ways of choosing
 * experts:
 *  - STUN: distance(e, f) = -coact(e, f) / its mean over pairs + lambda x |router_e - router_f|
 *    / its mean, greedy complete-linkage clustering to `keep` clusters, one representative per
 *    cluster: the member closest to the centroid of the flattened expert weights (ties within
 *    relative 1e-9, e.g. any 2-member cluster: the larger gate mass, then the lower id).
 *  - exhaustive: every keep-subset, scored by the objective "lost top-k mass": the mean over
 *    calibration tokens (full router probabilities p [E]) of (sum of the k largest p) - (sum of
 *    the k largest p among the kept experts); the lowest wins (ties: lexicographically first).
 * The rewrite drops the pruned experts' tensors, renumbers the kept ones 0..keep-1 in ascending
 * original id and keeps the same rows of the router (DiT-MoE blocks.L.moe.gate.weight, ProMoE
 * blocks.L.mlp.cluster_centers): the pruned router is exactly the original with the dropped
 * experts' logits (ProMoE: cosine scores) at -inf; DiT-MoE's softmax is renormalised over the
 * kept experts. DiT-MoE layers may keep different numbers (metadata num_experts = the largest);
 * ProMoE (token choice only) keeps the same number in every MoE layer and its unconditional
 * expert, renumbered to keep. */
#define DM_PRUNE_MAX_E 64
/* kept [keep] ascending and, when cluster is not NULL, cluster [E] (0..keep-1, numbered by the
 * smallest member). coact [E, E]; router [E, D] rows or NULL; weights[e] n floats each or NULL
 * (then the largest mass[e] represents a cluster); mass [E] or NULL. */
dm_status dm_prune_stun(int E, const int64_t *coact, const float *router, int D, double lambda,
                        const float *const *weights, size_t n, const double *mass, int keep,
                        int *kept, int *cluster);
/* The objective of a keep-set (mask [E], 1 = kept) on M tokens of probs [M, E], top-k. */
double dm_prune_lost_mass(const float *probs, int64_t M, int E, int k, const uint8_t *mask);
/* The best `keep` experts by the objective; kept [keep] ascending; returns the objective. */
double dm_prune_exhaustive(const float *probs, int64_t M, int E, int k, int keep, int *kept);

typedef struct {
    int layers;                      /* MoE layers (dm_config_moe_layers)                     */
    int block[DM_TRACE_MAX_LAYERS];  /* [layers] transformer block of each (ProMoE: 2l + 1)   */
    int E;                           /* experts per layer before                              */
    int keep[DM_TRACE_MAX_LAYERS];   /* [layers] experts kept (E: layer unchanged)            */
    int kept[DM_TRACE_MAX_LAYERS][DM_PRUNE_MAX_E]; /* [layers][keep[l]] ascending original ids */
} dm_prune_plan;
/* Write the pruned model of f (config cfg) to path atomically: tensors per the plan, metadata
 * "ditmoe" = f's with num_experts = max keep and "pruned": {"from_experts", "kept": [[ids] per
 * layer], "method"}, and f's "format" key. DM_ERR_ARG for a plan that does not fit cfg or
 * ProMoE expert choice (one line naming it). */
dm_status dm_prune_write(const dm_st_file *f, const dm_config *cfg, const dm_prune_plan *p,
                         const char *method, const char *path);

/* ---------------------------------------------------------------------------------------------
 * Quantised files (docs/format.md "Quantised routed experts"): routed expert weights stored as
 * int8 (I8 [out, in] + F32 "<name>.scale" [out]) or int4 (U8 [out, in/2], two per byte, even k in
 * the low nibble, + BF16 "<name>.scale" [out, in/32]), metadata "quant_experts" = "int8"|"int4".
 * The quantisation is the CPU backend's --quant-experts arithmetic, so a stored file computes the
 * same bits as the float file quantised at load. ditmoe-convert --quant-experts writes them.
 * ------------------------------------------------------------------------------------------- */
/* Quantise W [out, in] (F32, F16 or BF16, may be unaligned) as --quant-experts `bits` does:
 * bits 8: q int8 [out * in], scale float32 [out]; bits 4: q uint8 [out * in / 2], scale bf16 bit
 * patterns (uint16) [out * in / 32]. DM_ERR_ARG naming `name` for int4 with in % 32 != 0. */
dm_status dm_quant_weight(int bits, const void *W, dm_dtype dtype, int out, int in,
                          const char *name, void *q, void *scale);
/* Rows [r0, r0 + nr) of a stored-quantised weight [out, in] (layouts above; q and scale may be
 * unaligned) as float32 y [nr, in]: int8 q[o, k] * s[o], int4 q[o, k] * d[o, k / 32] (d the bf16
 * scale widened), each one float32 product: the values the CPU backend's kernels use (dm_lp_get;
 * a group whose scale is +-0 gives 0 * d). For a backend without integer kernels (CUDA: it stores
 * them as bf16). DM_ERR_FORMAT naming `name` and the row for an int8 -128 or a scale that is not
 * finite, as at load; DM_ERR_ARG for a bad shape or range (int4: in % 32 != 0). */
dm_status dm_dequant_rows(int bits, const void *q, const void *scale, int out, int in, int r0,
                          int nr, const char *name, float *y);
/* dm_st_write, except that a tensor whose data is NULL gets its bytes from fill(ud, i, &data)
 * just before they are written (data must stay valid until the next call): a file can be written
 * with one tensor in memory at a time. */
typedef dm_status (*dm_st_fill_fn)(void *ud, int i, const void **data);
dm_status dm_st_write_stream(const char *path, int n, const dm_st_tensor *t,
                             const char *const *meta, dm_st_fill_fn fill, void *ud);
/* Done with tensor t of f: its pages of the read-only mapping may leave memory (they are read
 * from the file again if touched), so streaming a model through keeps resident memory bounded. */
void dm_st_release(const dm_st_file *f, const dm_st_tensor *t);

/* ---------------------------------------------------------------------------------------------
 * Generation pipeline (src/pipeline): model + VAE opened together and checked against each other
 * -> batches of class-conditional images as uint8 pixels -> the metadata that reproduces each
 * image. What ditmoe-sample and ditmoe-batch share; also the interface for bindings (plain
 * structs; every callback optional).
 *
 *   dm_pipeline_opts o; dm_pipeline_opts_init(&o); o.model_path = ...; o.vae_path = ...;
 *   dm_pipeline *pl; dm_pipeline_open(&o, &pl);
 *   dm_sample_params sp; dm_sample_params_init(&sp, dm_pipeline_config(pl)); sp.seed = 7;
 *   const dm_pipeline_info *in = dm_pipeline_get_info(pl);
 *   uint8_t *pix = malloc((size_t)B * in->height * in->width * in->channels);
 *   dm_pipeline_generate(pl, &sp, B, labels, indices, NULL, pix);   // [B, H, W, C]
 *   dm_gen_text t; dm_gen_text_init(&t, pl, &sp, "my-tool 1.0", labels[0], indices[0]);
 *   dm_image_write("0.png", in->width, in->height, in->channels, pix, 90, t.kv);
 *   dm_pipeline_free(pl);
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const char *model_path;  /* DiT-MoE / ProMoE .safetensors (required)                      */
    const char *vae_path;    /* VAE decoder .safetensors; NULL = latents only (no pixels)      */
    dm_backend_kind backend; /* DM_BACKEND_CPU                                                 */
    int device;              /* accelerator ordinal, 0                                         */
    int threads;             /* dm_set_threads(threads) at open; -1 (default) leaves it as is  */
    const dm_config_overrides *cfg; /* the model's config overrides (.pt files), NULL = none   */
    dm_precision precision;  /* issue 13: DM_PREC_F32 (default) | DM_PREC_BF16 (dm_load_opts)  */
    int quant_experts;       /* issue 13: 0 (default) | 8 | 4 bits for the routed experts      */
    dm_lab_opts lab;         /* issue 14: MoE-lab options (dm_model_set_lab); all off = trained */
} dm_pipeline_opts;
void dm_pipeline_opts_init(dm_pipeline_opts *o);

typedef struct {
    int latent_channels, latent_size; /* C, S: latents are [C, S, S]                         */
    int width, height, channels;      /* output pixels [height, width, channels]; 0 w/o VAE  */
    float latent_rescale; /* the model's latents are multiplied by this before decoding
                           * (VAE scale / model scale; 1 when they agree or the model has none) */
} dm_pipeline_info;

/* Seconds and counts accumulated over every dm_pipeline_generate call. */
typedef struct {
    double sample_sec;  /* sampler + transformer                                              */
    double forward_sec; /* of which inside the transformer                                    */
    double decode_sec;  /* VAE decoder + conversion to uint8                                  */
    long forwards, rows;/* transformer calls and the rows they ran                            */
    long images;
} dm_pipeline_stats;

typedef struct dm_pipeline dm_pipeline;
/* Load both files with the backend, check that the VAE's latent channels equal the model's
 * and that it makes 1 or 3 channels (DM_ERR_ARG naming both files), work out the latent scale
 * (the model's metadata wins over the VAE's; logged when they differ), set the threads. */
dm_status dm_pipeline_open(const dm_pipeline_opts *o, dm_pipeline **out);
void dm_pipeline_free(dm_pipeline *p); /* NULL ok */
const dm_config *dm_pipeline_config(const dm_pipeline *p);
const dm_pipeline_info *dm_pipeline_get_info(const dm_pipeline *p);
const dm_pipeline_stats *dm_pipeline_get_stats(const dm_pipeline *p);
const char *dm_pipeline_model_path(const dm_pipeline *p);
const char *dm_pipeline_vae_path(const dm_pipeline *p);  /* "" without a VAE */
dm_backend_kind dm_pipeline_backend(const dm_pipeline *p);
dm_model *dm_pipeline_model(dm_pipeline *p);
dm_vae *dm_pipeline_vae(dm_pipeline *p); /* NULL without a VAE */

/* Optional parts of a generate call (pass NULL for none; zero-fill for "none" too). */
typedef struct {
    dm_progress_fn progress; /* after each sampler step (step 1..N of this batch)              */
    void *progress_ctx;
    dm_trace *trace;         /* append every evaluation's routing record (dm_trace_open with
                              * dm_trace_shape_from_model); the call does dm_trace_batch      */
    const float *init;       /* [B,C,S,S] initial noise instead of the (seed, index) draw      */
    float *latents;          /* out: [B,C,S,S] the final latents as sampled (before rescale)   */
} dm_pipeline_hooks;

/* B images: class y[b] with noise key index[b] (global image index, so an image is the same
 * whatever the batch it is made in), sampled with sp (checked against the model), decoded and
 * converted like DiT's sample_ddp.py into pixels [B, H, W, C] (may be NULL: latents only, then
 * hooks->latents should be set). A non-finite latent fails with DM_ERR_NUMERIC naming the step. */
dm_status dm_pipeline_generate(dm_pipeline *p, const dm_sample_params *sp, int B, const int64_t *y,
                               const uint64_t *index, const dm_pipeline_hooks *hooks,
                               uint8_t *pixels);

/* The metadata that reproduces one image: key/value pairs in kv (NULL-terminated, as
 * dm_image_write's text), strings held in the struct itself. Keys: Software, ditmoe-version,
 * model, vae (base names), backend, class ("3 (Dress)" or "3"), sampler, steps, cfg-scale,
 * cfg-channels ("3" or "all"), cfg-interval ("lo,hi"), eta, seed, num-train-steps,
 * image-index. Floats are written with the fewest digits that read back to the same float.
 * kv points into the struct itself, so use it in place (do not copy the struct); bindings can
 * read keys[i] / vals[i] for i < n directly. */
#define DM_GEN_TEXT_MAX 24
typedef struct {
    const char *kv[2 * DM_GEN_TEXT_MAX + 1];
    int n;                       /* pairs                                                       */
    char keys[DM_GEN_TEXT_MAX][32];
    char vals[DM_GEN_TEXT_MAX][256];
} dm_gen_text;
/* software: e.g. "ditmoe-sample 0.1.0" (NULL: "ditmoe <version>"); cls < 0: no class field. */
void dm_gen_text_init(dm_gen_text *t, const dm_pipeline *p, const dm_sample_params *sp,
                      const char *software, int64_t cls, uint64_t index);
/* Replace (or append) one field, e.g. ("class", "1,2") for a contact sheet. DM_ERR_ARG when
 * full or too long. */
dm_status dm_gen_text_set(dm_gen_text *t, const char *key, const char *value);
/* The text of one field, or NULL. */
const char *dm_gen_text_get(const dm_gen_text *t, const char *key);

#ifdef __cplusplus
}
#endif
#endif /* DITMOE_H */

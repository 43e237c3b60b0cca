/* ditmoe-sample: class-conditional images from a DiT-MoE model and a VAE decoder.
 *   ditmoe-sample [--model M] [--vae V] --class 3,bag -n 4 [--steps N] [--sampler S]
 *                 [--cfg-scale S] [--seed N] [-o out-%03d.png | --grid -o sheet.png]
 * Defaults (sampler, steps, guidance) come from the model's metadata. Exit codes: 0 ok,
 * 2 bad input (flags, files, classes, non-finite latent), 1 runtime failure. */
#include "cli/common.h"
#include "cli/common_grid.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PROG "ditmoe-sample"
#define MAX_CLASS_ARGS 64

static void usage(FILE *f)
{
    fprintf(f,
"usage: " PROG " [options]\n"
"  --model FILE        DiT-MoE .safetensors (default: " DM_DEFAULT_MODEL " from the assets dir:\n"
"                      <exe>/../../assets, then $DITMOE_ASSETS)\n"
"  --vae FILE          VAE decoder .safetensors (default: " DM_DEFAULT_VAE ", same lookup)\n"
"  --class C           class id or name from the model's table; comma-separated and/or\n"
"                      repeated; 'all' = every class (default: 0)\n"
"  -n N                images per class (default: 1)\n"
"  --steps N           sampling steps (default: model metadata; ddpm 250, rf 50)\n"
"  --sampler S         ddpm | ddim (ddpm models), euler | heun (rf models)\n"
"                      (default: model metadata; ddpm -> ddpm, rf -> euler)\n"
"  --cfg-scale S       classifier-free guidance scale, 1 = off (default: metadata, 4.0)\n"
"  --cfg-channels K    guided latent channels: 3 (DiT's DDPM reference) or all\n"
"                      (default: metadata; ddpm 3, rf all)\n"
"  --cfg-interval L,H  guide only while L <= t <= H, t in [0,1] with 1 = noise\n"
"                      (ddpm/ddim: t = timestep/999; euler/heun: flow time) (default: 0,1)\n"
"  --eta E             DDIM eta (default: 0)\n"
"  --seed N            noise seed (default: random, always printed)\n"
"  --batch B           images per forward batch; 2B rows with guidance (default: 4)\n"
"  -o FILE             output PNG; a printf %%d (e.g. out-%%03d.png) gives one file per image\n"
"                      (default: sample.png for one image or --grid, else sample-%%03d.png)\n"
"  --grid              one contact sheet (a row per class, labelled) instead of files\n"
"  --init-noise F.npy  float32 [N,C,H,W] initial latents for the N images (parity work)\n"
"  --save-latent F.npy write the final latents float32 [N,C,H,W]\n"
"  --latent-only       skip the VAE and PNGs (needs --save-latent)\n"
"  --dump-routing F    write every evaluation's expert choices and gate weights to F\n"
"                      (read it with ditmoe-routes; format in docs/routing.md)\n"
"  --threads N         threads (default: 0 = all cores)\n"
"  -q, -v              quiet (no progress bar, no info) / verbose (timings, sizes)\n"
"  --help, --version\n");
}

typedef struct {
    const char *model, *vae, *out, *init_noise, *save_latent, *dump_routing;
    const char *classes[MAX_CLASS_ARGS];
    int nclass_args;
    int n, batch, threads, grid, latent_only, quiet;
    int have_seed;
    uint64_t seed;
    dm_cli_sampler_flags sf; /* sampler overrides, applied on the model's defaults */
} args_t;

static dm_status parse(int argc, char **argv, args_t *a)
{
    a->n = 1;
    a->batch = 4;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char **str = !strcmp(s, "--model")          ? &a->model
                           : !strcmp(s, "--vae")          ? &a->vae
                           : !strcmp(s, "-o")             ? &a->out
                           : !strcmp(s, "--output")       ? &a->out
                           : !strcmp(s, "--init-noise")   ? &a->init_noise
                           : !strcmp(s, "--save-latent")  ? &a->save_latent
                           : !strcmp(s, "--dump-routing") ? &a->dump_routing
                                                          : dm_cli_sampler_flag(&a->sf, s);
        int takes = str || !strcmp(s, "--class") || !strcmp(s, "-n") || !strcmp(s, "--batch") ||
                    !strcmp(s, "--threads") || !strcmp(s, "--seed");
        if (!strcmp(s, "-q")) {
            a->quiet = 1;
            dm_set_log_level(DM_LOG_QUIET);
            continue;
        }
        if (!strcmp(s, "-v")) {
            dm_set_log_level(DM_LOG_VERBOSE);
            continue;
        }
        if (!strcmp(s, "--grid")) {
            a->grid = 1;
            continue;
        }
        if (!strcmp(s, "--latent-only")) {
            a->latent_only = 1;
            continue;
        }
        if (!takes) return dm_fail(DM_ERR_ARG, "unknown flag '%s' (see --help)", s);
        if (i + 1 >= argc) return dm_fail(DM_ERR_ARG, "%s needs a value (see --help)", s);
        const char *v = argv[++i];
        dm_status st = DM_OK;
        if (str)
            *str = v;
        else if (!strcmp(s, "--class")) {
            if (a->nclass_args >= MAX_CLASS_ARGS)
                return dm_fail(DM_ERR_ARG, "--class: at most %d occurrences", MAX_CLASS_ARGS);
            a->classes[a->nclass_args++] = v;
        } else if (!strcmp(s, "-n"))
            st = dm_cli_int("-n", v, 1, 1000000, &a->n);
        else if (!strcmp(s, "--batch"))
            st = dm_cli_int("--batch", v, 1, 4096, &a->batch);
        else if (!strcmp(s, "--threads"))
            st = dm_cli_int("--threads", v, 0, 4096, &a->threads);
        else if (!strcmp(s, "--seed")) {
            st = dm_cli_u64("--seed", v, &a->seed);
            a->have_seed = 1;
        }
        if (st) return st;
    }
    if (a->latent_only && !a->save_latent)
        return dm_fail(DM_ERR_ARG, "--latent-only needs --save-latent FILE");
    return DM_OK;
}

/* Classes: comma lists and repeats, "all", names via dm_config_class_id. */
static dm_status parse_classes(const args_t *a, const dm_config *c, int **ids, int *count)
{
    int cap = 16, k = 0;
    int *v = malloc((size_t)cap * sizeof(int));
    if (!v) return dm_fail(DM_ERR_NOMEM, "out of memory");
    const char *dflt[1] = {"0"};
    const char *const *src = a->nclass_args ? a->classes : dflt;
    int nsrc = a->nclass_args ? a->nclass_args : 1;
    for (int i = 0; i < nsrc; i++) {
        const char *p = src[i];
        for (;;) {
            const char *comma = strchr(p, ',');
            size_t len = comma ? (size_t)(comma - p) : strlen(p);
            char tok[256];
            if (len >= sizeof tok) {
                free(v);
                return dm_fail(DM_ERR_ARG, "--class: name too long");
            }
            memcpy(tok, p, len);
            tok[len] = '\0';
            char *t = tok;
            while (*t == ' ') t++;
            for (size_t e = strlen(t); e > 0 && t[e - 1] == ' '; e--) t[e - 1] = '\0';
            int lo = 0, hi = -1, id = -1;
            if (!*t) {
                free(v);
                return dm_fail(DM_ERR_ARG, "--class '%s': empty class", src[i]);
            }
            if (!strcmp(t, "all")) {
                hi = c->num_classes - 1;
            } else {
                dm_status st = dm_config_class_id(c, t, &id);
                if (st) {
                    char msg[1024]; /* copy: dm_fail writes the buffer dm_last_error() returns */
                    snprintf(msg, sizeof msg, "%s", dm_last_error());
                    free(v);
                    return dm_fail(DM_ERR_ARG, "--class: %s", msg);
                }
                lo = hi = id;
            }
            for (int q = lo; q <= hi; q++) {
                if (k == cap) {
                    int *nv = realloc(v, (size_t)(cap *= 2) * sizeof(int));
                    if (!nv) {
                        free(v);
                        return dm_fail(DM_ERR_NOMEM, "out of memory");
                    }
                    v = nv;
                }
                v[k++] = q;
            }
            if (!comma) break;
            p = comma + 1;
        }
    }
    *ids = v;
    *count = k;
    return DM_OK;
}

/* Output names: exactly one %d-style conversion (optionally 0-padded width), %% allowed. */
static int count_conversions(const char *pat, int *bad)
{
    int k = 0;
    *bad = 0;
    for (const char *s = pat; *s; s++) {
        if (*s != '%') continue;
        if (s[1] == '%') {
            s++;
            continue;
        }
        const char *q = s + 1;
        while (*q >= '0' && *q <= '9') q++;
        if (*q != 'd') {
            *bad = 1;
            return k;
        }
        k++;
        s = q;
    }
    return k;
}

static void out_name(const char *pat, int per_image, int index, char *buf, size_t n)
{
    if (per_image) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        snprintf(buf, n, pat, index); /* validated: exactly one %d conversion */
#pragma GCC diagnostic pop
    } else {
        snprintf(buf, n, "%s", pat);
    }
}

/* Can we create files in the directory of `path`? (checked before any work) */
static dm_status check_writable(const char *path, const char *flag)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    char probe[PATH_MAX + 32];
    snprintf(probe, sizeof probe, "%s/.ditmoe-probe-XXXXXX", dir);
    int fd = mkstemp(probe);
    if (fd < 0)
        return dm_fail(DM_ERR_ARG, "%s %s: cannot write in directory %s", flag, path, dir);
    close(fd);
    unlink(probe);
    return DM_OK;
}

static uint64_t random_seed(void)
{
    uint64_t s = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
        close(fd);
    }
    if (!s) s = (uint64_t)time(NULL) * 6364136223846793005ull ^ (uint64_t)getpid();
    return s >> 1 & 0xffffffffffull; /* short enough to type back in */
}

/* The denoiser the sampler drives, wrapped to time the transformer and count progress. */
typedef struct {
    dm_denoiser inner;
    double seconds;
    long calls, rows;
} timed_t;

static dm_status timed_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                          float *out)
{
    timed_t *tm = ctx;
    double t0 = dm_time_sec();
    dm_status st = tm->inner.fn(tm->inner.ctx, B, x, t, y, out);
    tm->seconds += dm_time_sec() - t0;
    tm->calls++;
    tm->rows += B;
    return st;
}

static void on_step(void *ctx, int step, int nsteps)
{
    (void)step;
    (void)nsteps;
    dm_cli_progress_step(ctx);
}

/* Files written so far, removed if the run fails later. */
typedef struct {
    char **paths;
    int n, cap;
} written_t;

static void remember(written_t *w, const char *path)
{
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 16;
        char **np = realloc(w->paths, (size_t)cap * sizeof(char *));
        if (!np) return;
        w->paths = np;
        w->cap = cap;
    }
    w->paths[w->n] = strdup(path);
    if (w->paths[w->n]) w->n++;
}

static void forget(written_t *w, int unlink_files)
{
    for (int i = 0; i < w->n; i++) {
        if (unlink_files) unlink(w->paths[i]);
        free(w->paths[i]);
    }
    free(w->paths);
    memset(w, 0, sizeof *w);
}

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static int fail_code(dm_status st)
{
    fprintf(stderr, PROG ": %s\n", dm_last_error());
    return st == DM_ERR_NOMEM ? 1 : 2; /* input errors, unreadable files, non-finite latents: 2 */
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf(PROG " %s\n", DITMOE_VERSION);
            return 0;
        }
    }
    args_t a = {0};
    dm_status st = parse(argc, argv, &a);
    if (st) return fail_code(st);
    dm_set_threads(a.threads);

    char model_path[PATH_MAX], vae_path[PATH_MAX] = "", places[3 * PATH_MAX];
    if (a.model) {
        snprintf(model_path, sizeof model_path, "%s", a.model);
    } else if (!dm_default_asset(DM_DEFAULT_MODEL, model_path, sizeof model_path)) {
        dm_default_asset_places(DM_DEFAULT_MODEL, places, sizeof places);
        fprintf(stderr, PROG ": no --model given and the default model was not found (looked "
                "at: %s)\n", places);
        return 2;
    }
    if (!a.latent_only) {
        if (a.vae) {
            snprintf(vae_path, sizeof vae_path, "%s", a.vae);
        } else if (!dm_default_asset(DM_DEFAULT_VAE, vae_path, sizeof vae_path)) {
            dm_default_asset_places(DM_DEFAULT_VAE, places, sizeof places);
            fprintf(stderr, PROG ": no --vae given and the default VAE was not found (looked "
                    "at: %s)\n", places);
            return 2;
        }
    }

    int rc = 0;
    dm_model *m = NULL;
    dm_vae *vae = NULL;
    int *cls = NULL, ncls = 0;
    dm_npy init = {0};
    float *z = NULL, *img = NULL, *lat_all = NULL, *init_b = NULL;
    uint8_t *u8 = NULL;
    dm_cli_grid grid = {0};
    char (*labels)[48] = NULL; /* [ncls] grid labels */
    int64_t *yb = NULL;
    uint64_t *ib = NULL;
    written_t written = {0};
    dm_trace *trace = NULL;
    dm_cli_progress prog;
    memset(&prog, 0, sizeof prog);
    const double t_start = dm_time_sec();

#define CHECK(expr)                                                                            \
    do {                                                                                       \
        if ((st = (expr)) != DM_OK) {                                                          \
            rc = fail_code(st);                                                                \
            goto done;                                                                         \
        }                                                                                      \
    } while (0)

    CHECK(dm_model_load(model_path, &m));
    const dm_config *c = dm_model_config(m);
    dm_sample_params p;
    CHECK(dm_cli_sampler_params(&a.sf, c, a.seed, &p));
    CHECK(parse_classes(&a, c, &cls, &ncls));
    if ((long)ncls * a.n > 10000000L) CHECK(dm_fail(DM_ERR_ARG, "too many images (%ld)", (long)ncls * a.n));
    const int total = ncls * a.n, C = c->in_channels, S = c->input_size;
    const size_t per_lat = (size_t)C * S * S;

    int oc = 0, f = 1, H = S, W = S;
    if (!a.latent_only) {
        CHECK(dm_vae_load(vae_path, &vae));
        const dm_vae_info *vi = dm_vae_get_info(vae);
        if (vi->z_channels != C)
            CHECK(dm_fail(DM_ERR_ARG, "latent channels differ: model %s has %d, VAE %s has %d",
                          model_path, C, vae_path, vi->z_channels));
        if (vi->out_channels != 1 && vi->out_channels != 3)
            CHECK(dm_fail(DM_ERR_ARG, "%s: the VAE has %d output channels (PNG needs 1 or 3)",
                          vae_path, vi->out_channels));
        oc = vi->out_channels;
        f = vi->factor;
        H = S * f;
        W = S * f;
        if (c->vae_scale > 0 && vi->scale != c->vae_scale)
            dm_log(DM_LOG_INFO, "latent scale: model says %g, VAE file says %g; using the model's",
                   (double)c->vae_scale, (double)vi->scale);
    }

    /* Output names, checked before any work. */
    char pattern[PATH_MAX];
    int per_image = 0;
    if (!a.latent_only) {
        snprintf(pattern, sizeof pattern, "%s",
                 a.out ? a.out : (total == 1 || a.grid) ? "sample.png" : "sample-%03d.png");
        int bad = 0, conv = count_conversions(pattern, &bad);
        if (bad || conv > 1)
            CHECK(dm_fail(DM_ERR_ARG, "-o %s: only one %%d (e.g. %%03d) conversion is allowed",
                          pattern));
        if (a.grid && conv)
            CHECK(dm_fail(DM_ERR_ARG, "-o %s: --grid writes one file; drop the %%d", pattern));
        if (!a.grid && total > 1 && !conv)
            CHECK(dm_fail(DM_ERR_ARG, "-o %s: %d images need a %%d in the name (e.g. out-%%03d.png) "
                          "or --grid", pattern, total));
        per_image = conv == 1;
        char first[PATH_MAX];
        out_name(pattern, per_image, 0, first, sizeof first);
        CHECK(check_writable(first, "-o"));
    }
    if (a.save_latent) CHECK(check_writable(a.save_latent, "--save-latent"));
    if (a.dump_routing) CHECK(check_writable(a.dump_routing, "--dump-routing"));
    if (a.init_noise) {
        CHECK(dm_npy_read_expect(a.init_noise, DM_F32, 4, &init));
        if (init.shape[0] < total || init.shape[1] != C || init.shape[2] != S || init.shape[3] != S)
            CHECK(dm_fail(DM_ERR_ARG, "--init-noise %s: shape [%lld,%lld,%lld,%lld], expected "
                          "[%d,%d,%d,%d] (images, channels, size, size)", a.init_noise,
                          (long long)init.shape[0], (long long)init.shape[1],
                          (long long)init.shape[2], (long long)init.shape[3], total, C, S, S));
    }
    if (!a.have_seed) a.seed = random_seed();
    p.seed = a.seed;
    dm_log(DM_LOG_INFO, "seed %llu", (unsigned long long)p.seed);
    if (a.quiet && !a.have_seed) fprintf(stderr, PROG ": seed %llu\n", (unsigned long long)p.seed);

    char cfgch[16];
    snprintf(cfgch, sizeof cfgch, p.cfg_channels ? "%d" : "all", p.cfg_channels);
    dm_log(DM_LOG_INFO, "%s: %s, %d image(s) of %dx%d, sampler %s, %d steps, cfg %g on %s "
           "channels (interval %g..%g), batch %d, %d threads", base_name(model_path),
           c->name[0] ? c->name : dm_objective_name(c->objective), total, W, H,
           dm_sampler_name(p.sampler), p.steps, (double)p.cfg_scale, cfgch, (double)p.cfg_t_lo,
           (double)p.cfg_t_hi, a.batch, dm_get_threads());

    const int B = a.batch < total ? a.batch : total;
    const int guided_rows = p.cfg_scale != 1.0f ? 2 * B : B;
    dm_log(DM_LOG_VERBOSE, "buffers: latent %zu floats/image, forward on up to %d rows (%s)",
           per_lat, guided_rows, p.cfg_scale != 1.0f ? "guidance doubles the batch" : "no guidance");
    z = malloc((size_t)B * per_lat * sizeof(float));
    yb = malloc((size_t)B * sizeof(int64_t));
    ib = malloc((size_t)B * sizeof(uint64_t));
    if (a.save_latent) lat_all = malloc((size_t)total * per_lat * sizeof(float));
    if (a.init_noise) init_b = malloc((size_t)B * per_lat * sizeof(float));
    if (!a.latent_only) {
        img = malloc((size_t)B * oc * H * W * sizeof(float));
        u8 = malloc((size_t)oc * H * W);
    }
    if (!z || !yb || !ib || (a.save_latent && !lat_all) || (a.init_noise && !init_b) ||
        (!a.latent_only && (!img || !u8)))
        CHECK(dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d", B));
    /* Grid: a row per class with -n columns; one class wraps into a near-square sheet. */
    int gcols = a.n, grows = ncls;
    if (ncls == 1) {
        gcols = 1;
        while (gcols * gcols < total) gcols++;
        grows = (total + gcols - 1) / gcols;
    }
    if (a.grid) {
        labels = malloc((size_t)ncls * sizeof *labels);
        if (!labels) CHECK(dm_fail(DM_ERR_NOMEM, "out of memory"));
        for (int k = 0; k < ncls; k++) {
            if (c->class_names)
                snprintf(labels[k], sizeof labels[k], "%d %s", cls[k], c->class_names[cls[k]]);
            else
                snprintf(labels[k], sizeof labels[k], "%d", cls[k]);
        }
        CHECK(dm_cli_grid_init(&grid, grows, gcols, W, H, oc, 1));
    }

    timed_t tm = {0};
    dm_model_denoiser(m, &tm.inner);
    if (a.dump_routing) { /* the transformer with a routing record, appended per evaluation */
        dm_trace_shape ts;
        dm_trace_shape_from_model(&ts, c, &p);
        CHECK(dm_trace_open(a.dump_routing, &ts, c, model_path, &p, &trace));
        if (!a.latent_only && !a.grid) CHECK(dm_trace_note(trace, "images", pattern));
        dm_trace_denoiser(trace, m, &tm.inner);
    }
    dm_denoiser d = tm.inner;
    d.fn = timed_fn;
    d.ctx = &tm;
    double vae_sec = 0;
    const int nbatch = (total + B - 1) / B;
    dm_cli_progress_start(&prog, (long)nbatch * p.steps, !a.quiet && dm_get_log_level() > 0);
    for (int bi = 0; bi < nbatch; bi++) {
        const int i0 = bi * B, nb = (total - i0) < B ? (total - i0) : B;
        for (int b = 0; b < nb; b++) {
            ib[b] = (uint64_t)(i0 + b);
            yb[b] = cls[(i0 + b) / a.n];
        }
        if (a.init_noise)
            memcpy(init_b, (const float *)init.data + (size_t)i0 * per_lat,
                   (size_t)nb * per_lat * sizeof(float));
        char lab[64];
        snprintf(lab, sizeof lab, "batch %d/%d", bi + 1, nbatch);
        dm_cli_progress_label(&prog, lab);
        if (trace) CHECK(dm_trace_batch(trace, nb, yb, ib));
        st = dm_sample(&d, &p, nb, yb, ib, a.init_noise ? init_b : NULL, z, on_step, &prog);
        if (st) {
            dm_cli_progress_end(&prog);
            CHECK(st);
        }
        if (lat_all) memcpy(lat_all + (size_t)i0 * per_lat, z, (size_t)nb * per_lat * sizeof(float));
        if (a.latent_only) continue;
        /* Decode with the model's latent scale (dm_vae_decode divides by the VAE's own). */
        const dm_vae_info *vi = dm_vae_get_info(vae);
        if (c->vae_scale > 0 && vi->scale != c->vae_scale) {
            const float r = vi->scale / c->vae_scale;
            for (size_t j = 0; j < (size_t)nb * per_lat; j++) z[j] *= r;
        }
        if (dm_get_log_level() >= DM_LOG_VERBOSE) dm_cli_progress_break(&prog);
        double t0 = dm_time_sec();
        st = dm_vae_decode(vae, nb, S, S, z, img);
        vae_sec += dm_time_sec() - t0;
        if (st) {
            dm_cli_progress_end(&prog);
            CHECK(st);
        }
        for (int b = 0; b < nb; b++) {
            const int index = i0 + b, k = yb[b];
            const float *chw = img + (size_t)b * oc * H * W;
            if (a.grid) {
                const int row = ncls == 1 ? index / gcols : index / a.n;
                const int col = ncls == 1 ? index % gcols : index % a.n;
                dm_cli_grid_put(&grid, row, col, chw, labels[index / a.n]);
                continue;
            }
            dm_image_to_u8(oc, H, W, chw, u8);
            char path[PATH_MAX + 32], seed_s[32], steps_s[16], scale_s[32], idx_s[16], cls_s[96];
            out_name(pattern, per_image, index, path, sizeof path);
            snprintf(seed_s, sizeof seed_s, "%llu", (unsigned long long)p.seed);
            snprintf(steps_s, sizeof steps_s, "%d", p.steps);
            snprintf(scale_s, sizeof scale_s, "%g", (double)p.cfg_scale);
            snprintf(idx_s, sizeof idx_s, "%d", index);
            if (c->class_names)
                snprintf(cls_s, sizeof cls_s, "%d (%s)", k, c->class_names[k]);
            else
                snprintf(cls_s, sizeof cls_s, "%d", k);
            const char *text[] = {"Software", PROG " " DITMOE_VERSION, "model", base_name(model_path),
                                  "vae", base_name(vae_path), "class", cls_s, "seed", seed_s,
                                  "steps", steps_s, "sampler", dm_sampler_name(p.sampler),
                                  "cfg-scale", scale_s, "cfg-channels", cfgch, "image-index", idx_s,
                                  NULL};
            CHECK(dm_png_write(path, W, H, oc, u8, text));
            remember(&written, path);
        }
    }
    dm_cli_progress_end(&prog);
    if (a.grid) {
        char seed_s[32], steps_s[16], scale_s[32], cls_s[512] = "", n_s[16];
        size_t used = 0;
        for (int k = 0; k < ncls && used < sizeof cls_s - 16; k++)
            used += (size_t)snprintf(cls_s + used, sizeof cls_s - used, "%s%d", k ? "," : "", cls[k]);
        snprintf(seed_s, sizeof seed_s, "%llu", (unsigned long long)p.seed);
        snprintf(steps_s, sizeof steps_s, "%d", p.steps);
        snprintf(scale_s, sizeof scale_s, "%g", (double)p.cfg_scale);
        snprintf(n_s, sizeof n_s, "0-%d", total - 1);
        const char *text[] = {"Software", PROG " " DITMOE_VERSION, "model", base_name(model_path),
                              "vae", base_name(vae_path), "class", cls_s, "seed", seed_s,
                              "steps", steps_s, "sampler", dm_sampler_name(p.sampler),
                              "cfg-scale", scale_s, "cfg-channels", cfgch, "image-index", n_s,
                              NULL};
        CHECK(dm_cli_grid_write(&grid, pattern, text));
        remember(&written, pattern);
    }
    if (a.save_latent) {
        int64_t shape[4] = {total, C, S, S};
        CHECK(dm_npy_write(a.save_latent, DM_F32, 4, shape, lat_all));
        remember(&written, a.save_latent);
    }
    if (trace) {
        const double trace_sec = dm_trace_seconds(trace);
        st = dm_trace_close(trace);
        trace = NULL;
        CHECK(st);
        remember(&written, a.dump_routing);
        dm_log(DM_LOG_VERBOSE, "routing dump %s: %.3f s writing", a.dump_routing, trace_sec);
    }
    {
        const double wall = dm_time_sec() - t_start;
        const long steps_total = (long)nbatch * p.steps;
        char last[PATH_MAX + 64] = "";
        if (!a.latent_only && per_image && !a.grid && total > 1) {
            char tmp[PATH_MAX + 32];
            out_name(pattern, 1, total - 1, tmp, sizeof tmp);
            snprintf(last, sizeof last, " .. %s", tmp);
        }
        char first[PATH_MAX + 32];
        out_name(pattern, per_image, 0, first, sizeof first);
        dm_log(DM_LOG_INFO, "wrote %s%s (%d image(s), %.2f s)",
               a.latent_only ? a.save_latent : first, last, total, wall);
        dm_log(DM_LOG_VERBOSE, "transformer: %.3f s over %ld steps (%ld forwards, %ld rows): "
               "%.2f ms/step per batch, %.3f s per image", tm.seconds, steps_total, tm.calls,
               tm.rows, 1e3 * tm.seconds / (double)steps_total, tm.seconds / total);
        if (!a.latent_only)
            dm_log(DM_LOG_VERBOSE, "VAE decode: %.3f s total, %.3f s per image", vae_sec,
                   vae_sec / total);
        dm_log(DM_LOG_VERBOSE, "one image: transformer %.3f s + VAE %.3f s", tm.seconds / total,
               vae_sec / total);
    }
done:
    dm_trace_abort(trace);
    forget(&written, rc != 0);
    dm_cli_grid_free(&grid);
    free(labels);
    free(z);
    free(img);
    free(u8);
    free(lat_all);
    free(init_b);
    free(yb);
    free(ib);
    free(cls);
    dm_npy_free(&init);
    dm_vae_free(vae);
    dm_model_free(m);
    return rc;
}

/* ditmoe-sample: class-conditional images from a DiT-MoE / ProMoE model and a VAE decoder.
 *   ditmoe-sample [--model M] [--vae V] --class 3,bag -n 4 [--steps N] [--sampler S]
 *                 [--cfg-scale S] [--seed N] [-o out-%03d.png | --grid -o sheet.png | -o a.jpg]
 * Generation is the library's pipeline (dm_pipeline_*); this program keeps its own jobs: class
 * lists, output names, the contact sheet, latents in and out. Exit codes (ditmoe.h
 * dm_exit_code): 0 ok, 2 bad input (flags, files, classes), 1 runtime failure (memory,
 * non-finite values while sampling, an output that cannot be written). */
#include "common.h"
#include "common_grid.h"
#include "flags.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROG "ditmoe-sample"

typedef struct {
    const char *model, *vae, *out, *init_noise, *save_latent, *dump_routing;
    dm_cli_list classes;
    int n, batch, grid, latent_only, quality;
    int have_seed;
    uint64_t seed;
    dm_cli_sampler_flags sf; /* sampler overrides, applied on the model's defaults */
    dm_cli_common common;
    dm_cli_overrides ov; /* what a .pt's weights cannot tell */
    dm_cli_lab_flags lab; /* MoE lab (issue 14) */
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    DM_CLI_MODEL_OPTS(A.model, A.vae),
    DM_CLI_OVERRIDE_OPTS(A.ov),
    {'\0', "class", DM_OPT_LIST, &A.classes, 0, 0, "C", "0",
     "class id or name from the model's table; comma-separated and/or repeated;\n"
     "'all' = every class", NULL},
    {'n', NULL, DM_OPT_INT, &A.n, 1, 1000000, "N", "1", "images per class", NULL},
    DM_CLI_SAMPLER_OPTS(A.sf),
    {'\0', "seed", DM_OPT_U64, &A.seed, 0, 0, "N", "random, always printed", "noise seed",
     &A.have_seed},
    {'\0', "batch", DM_OPT_INT, &A.batch, 1, 4096, "B", "4",
     "images per forward batch; 2B rows with guidance", NULL},
    {'o', "output", DM_OPT_STR, &A.out, 0, 0, "FILE",
     "sample.png for one image or --grid, else sample-%03d.png",
     "output image: .png (tEXt metadata), .jpg/.jpeg (metadata in a COM\n"
     "comment) or .bmp; a printf %d (e.g. out-%03d.png) gives one file per image", NULL},
    {'\0', "quality", DM_OPT_INT, &A.quality, 1, 100, "Q", "90", "JPEG quality", NULL},
    {'\0', "grid", DM_OPT_SET, &A.grid, 1, 0, NULL, "off",
     "one contact sheet (a row per class, labelled) instead of files", NULL},
    {'\0', "init-noise", DM_OPT_STR, &A.init_noise, 0, 0, "F.npy", "drawn from (seed, index)",
     "float32 [N,C,H,W] initial latents for the N images (parity work)", NULL},
    {'\0', "save-latent", DM_OPT_STR, &A.save_latent, 0, 0, "F.npy", "none",
     "write the final latents float32 [N,C,H,W]", NULL},
    {'\0', "latent-only", DM_OPT_SET, &A.latent_only, 1, 0, NULL, "off",
     "skip the VAE and the images (needs --save-latent)", NULL},
    {'\0', "dump-routing", DM_OPT_STR, &A.dump_routing, 0, 0, "F", "none",
     "write every evaluation's expert choices and gate weights to F\n"
     "(read it with ditmoe-routes; format in docs/routing.md)", NULL},
    DM_CLI_LAB_OPTS(A.lab),
    DM_CLI_PRECISION_OPTS(A.common),
    DM_CLI_COMMON_OPTS(A.common, "0 = all cores"),
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "[options]",
    "Class-conditional images from a DiT-MoE / ProMoE model and a VAE decoder. Defaults\n"
    "(sampler, steps, guidance) come from the model's metadata; every image file carries the\n"
    "parameters that reproduce it.",
    OPTS, NULL, NULL};

/* Classes: comma lists and repeats, "all", names via dm_config_class_id. */
static dm_status parse_classes(const dm_config *c, int **ids, int *count)
{
    int cap = 16, k = 0;
    int *v = malloc((size_t)cap * sizeof(int));
    if (!v) return dm_fail(DM_ERR_NOMEM, "out of memory");
    const char *dflt[1] = {"0"};
    const char *const *src = A.classes.n ? A.classes.v : dflt;
    int nsrc = A.classes.n ? A.classes.n : 1;
    dm_status st = DM_OK;
    for (int i = 0; i < nsrc && !st; i++) {
        const char *p = src[i];
        for (;;) {
            const char *comma = strchr(p, ',');
            size_t len = comma ? (size_t)(comma - p) : strlen(p);
            char tok[256];
            if (len >= sizeof tok) {
                st = dm_fail(DM_ERR_ARG, "--class: name too long");
                break;
            }
            memcpy(tok, p, len);
            tok[len] = '\0';
            char *t = tok;
            while (*t == ' ') t++;
            for (size_t e = strlen(t); e > 0 && t[e - 1] == ' '; e--) t[e - 1] = '\0';
            int lo = 0, hi = -1, id = -1;
            if (!*t) {
                st = dm_fail(DM_ERR_ARG, "--class '%s': empty class", src[i]);
                break;
            }
            if (!strcmp(t, "all")) {
                hi = c->num_classes - 1;
            } else {
                if (dm_config_class_id(c, t, &id)) {
                    char msg[1024]; /* copy: dm_fail writes the buffer dm_last_error() returns */
                    snprintf(msg, sizeof msg, "%s", dm_last_error());
                    st = dm_fail(DM_ERR_ARG, "--class: %s", msg);
                    break;
                }
                lo = hi = id;
            }
            for (int q = lo; q <= hi; q++) {
                if (k == cap) {
                    int *nv = realloc(v, (size_t)(cap *= 2) * sizeof(int));
                    if (!nv) {
                        st = dm_fail(DM_ERR_NOMEM, "out of memory");
                        break;
                    }
                    v = nv;
                }
                v[k++] = q;
            }
            if (st || !comma) break;
            p = comma + 1;
        }
    }
    if (st) {
        free(v);
        return st;
    }
    *ids = v;
    *count = k;
    return DM_OK;
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

/* Everything one run holds. */
typedef struct {
    char model_path[PATH_MAX], vae_path[PATH_MAX];
    dm_pipeline *pl;
    const dm_config *c;
    dm_sample_params p;
    int *cls, ncls, total;
    char pattern[PATH_MAX];
    int per_image;
    dm_npy init;
    float *lat_all;
    uint8_t *pix;     /* [B, H, W, oc] */
    int64_t *yb;
    uint64_t *ib;
    dm_cli_grid grid;
    char (*labels)[48];
    int gcols, grows;
    dm_trace *trace;
    written_t written;
    dm_cli_progress prog;
} run_t;

static dm_status find_assets(run_t *r)
{
    dm_status st = dm_cli_find_asset(A.model, DM_DEFAULT_MODEL, "model", "model", r->model_path,
                                     sizeof r->model_path);
    if (st) return st;
    if (A.latent_only) return DM_OK;
    return dm_cli_find_asset(A.vae, DM_DEFAULT_VAE, "vae", "VAE", r->vae_path,
                             sizeof r->vae_path);
}

/* Output names and files, checked before any work. */
static dm_status plan_outputs(run_t *r)
{
    dm_status st;
    const int C = r->c->in_channels, S = r->c->input_size;
    if (!A.latent_only) {
        snprintf(r->pattern, sizeof r->pattern, "%s",
                 A.out ? A.out : (r->total == 1 || A.grid) ? "sample.png" : "sample-%03d.png");
        const int conv = dm_cli_pattern_count(r->pattern);
        if (conv < 0)
            return dm_fail(DM_ERR_ARG, "-o %s: only one %%d (e.g. %%03d) conversion is allowed",
                           r->pattern);
        if (A.grid && conv)
            return dm_fail(DM_ERR_ARG, "-o %s: --grid writes one file; drop the %%d", r->pattern);
        if (!A.grid && r->total > 1 && !conv)
            return dm_fail(DM_ERR_ARG, "-o %s: %d images need a %%d in the name (e.g. "
                           "out-%%03d.png) or --grid", r->pattern, r->total);
        dm_image_format fmt;
        if (dm_image_format_from_path(r->pattern, &fmt))
            return dm_fail(DM_ERR_ARG, "-o %s: unknown image type (name it .png, .jpg, .jpeg or "
                           ".bmp)", r->pattern);
        r->per_image = conv == 1;
        char first[PATH_MAX + 32];
        dm_cli_pattern_format(r->pattern, 0, first, sizeof first);
        if ((st = dm_cli_check_writable(first, "-o"))) return st;
    }
    if (A.save_latent && (st = dm_cli_check_writable(A.save_latent, "--save-latent"))) return st;
    if (A.dump_routing && (st = dm_cli_check_writable(A.dump_routing, "--dump-routing")))
        return st;
    if (A.init_noise) {
        if ((st = dm_npy_read_expect(A.init_noise, DM_F32, 4, &r->init))) return st;
        const int64_t *sh = r->init.shape;
        if (sh[0] < r->total || sh[1] != C || sh[2] != S || sh[3] != S)
            return dm_fail(DM_ERR_ARG, "--init-noise %s: shape [%lld,%lld,%lld,%lld], expected "
                           "[%d,%d,%d,%d] (images, channels, size, size)", A.init_noise,
                           (long long)sh[0], (long long)sh[1], (long long)sh[2], (long long)sh[3],
                           r->total, C, S, S);
        const float *x = r->init.data;
        const size_t per = (size_t)C * S * S;
        for (size_t j = 0; j < (size_t)r->total * per; j++)
            if (!isfinite(x[j]))
                return dm_fail(DM_ERR_ARG, "--init-noise %s: non-finite value %g at image %zu",
                               A.init_noise, (double)x[j], j / per);
    }
    return DM_OK;
}

static dm_status alloc_buffers(run_t *r, int B)
{
    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    const size_t per_lat = (size_t)in->latent_channels * in->latent_size * in->latent_size;
    r->yb = malloc((size_t)B * sizeof(int64_t));
    r->ib = malloc((size_t)B * sizeof(uint64_t));
    if (A.save_latent) r->lat_all = malloc((size_t)r->total * per_lat * sizeof(float));
    if (!A.latent_only) r->pix = malloc((size_t)B * in->channels * in->height * in->width);
    if (!r->yb || !r->ib || (A.save_latent && !r->lat_all) || (!A.latent_only && !r->pix))
        return dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d", B);
    if (!A.grid) return DM_OK;
    /* Grid: a row per class with -n columns; one class wraps into a near-square sheet. */
    r->gcols = A.n;
    r->grows = r->ncls;
    if (r->ncls == 1) {
        r->gcols = 1;
        while (r->gcols * r->gcols < r->total) r->gcols++;
        r->grows = (r->total + r->gcols - 1) / r->gcols;
    }
    r->labels = malloc((size_t)r->ncls * sizeof *r->labels);
    if (!r->labels) return dm_fail(DM_ERR_NOMEM, "out of memory");
    for (int k = 0; k < r->ncls; k++) {
        if (r->c->class_names)
            snprintf(r->labels[k], sizeof r->labels[k], "%d %s", r->cls[k],
                     r->c->class_names[r->cls[k]]);
        else
            snprintf(r->labels[k], sizeof r->labels[k], "%d", r->cls[k]);
    }
    return dm_cli_grid_init(&r->grid, r->grows, r->gcols, in->width, in->height, in->channels, 1);
}

/* Batches of B: generate, then file each image or place it in the sheet. */
static dm_status run_batches(run_t *r, int B)
{
    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    const size_t per_lat = (size_t)in->latent_channels * in->latent_size * in->latent_size;
    const size_t per_img = (size_t)in->channels * in->height * in->width;
    const int nbatch = (r->total + B - 1) / B;
    dm_status st;
    dm_cli_progress_start(&r->prog, (double)nbatch * r->p.steps, "steps",
                          dm_get_log_level() > DM_LOG_QUIET);
    for (int bi = 0; bi < nbatch; bi++) {
        const int i0 = bi * B, nb = (r->total - i0) < B ? (r->total - i0) : B;
        for (int b = 0; b < nb; b++) {
            r->ib[b] = (uint64_t)(i0 + b);
            r->yb[b] = r->cls[(i0 + b) / A.n];
        }
        char lab[64];
        snprintf(lab, sizeof lab, "batch %d/%d", bi + 1, nbatch);
        dm_cli_progress_label(&r->prog, lab);
        dm_cli_step_ctx sc = {&r->prog, (double)bi * r->p.steps, 1.0};
        dm_pipeline_hooks h = {dm_cli_on_step, &sc, r->trace, NULL, NULL};
        if (A.init_noise) h.init = (const float *)r->init.data + (size_t)i0 * per_lat;
        if (r->lat_all) h.latents = r->lat_all + (size_t)i0 * per_lat;
        st = dm_pipeline_generate(r->pl, &r->p, nb, r->yb, r->ib, &h, r->pix);
        if (st) {
            dm_cli_progress_end(&r->prog);
            return st;
        }
        if (A.latent_only) continue;
        for (int b = 0; b < nb; b++) {
            const int index = i0 + b;
            const uint8_t *hwc = r->pix + (size_t)b * per_img;
            if (A.grid) {
                const int row = r->ncls == 1 ? index / r->gcols : index / A.n;
                const int col = r->ncls == 1 ? index % r->gcols : index % A.n;
                dm_cli_grid_put(&r->grid, row, col, hwc, r->labels[index / A.n]);
                continue;
            }
            char path[PATH_MAX + 32];
            dm_cli_pattern_format(r->pattern, (uint64_t)index, path, sizeof path);
            dm_gen_text t;
            dm_gen_text_init(&t, r->pl, &r->p, PROG " " DITMOE_VERSION, r->yb[b],
                             (uint64_t)index);
            if ((st = dm_image_write(path, in->width, in->height, in->channels, hwc, A.quality,
                                     t.kv))) {
                dm_cli_progress_end(&r->prog);
                return st;
            }
            remember(&r->written, path);
        }
    }
    dm_cli_progress_end(&r->prog);
    return DM_OK;
}

static dm_status finish(run_t *r, double t_start)
{
    dm_status st;
    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    if (A.grid) {
        char cls_s[200] = "", n_s[32];
        size_t used = 0;
        for (int k = 0; k < r->ncls && used < sizeof cls_s - 16; k++)
            used += (size_t)snprintf(cls_s + used, sizeof cls_s - used, "%s%d", k ? "," : "",
                                     r->cls[k]);
        snprintf(n_s, sizeof n_s, "0-%d", r->total - 1);
        dm_gen_text t;
        dm_gen_text_init(&t, r->pl, &r->p, PROG " " DITMOE_VERSION, -1, 0);
        dm_gen_text_set(&t, "class", cls_s);
        dm_gen_text_set(&t, "image-index", n_s);
        if ((st = dm_cli_grid_write(&r->grid, r->pattern, A.quality, t.kv))) return st;
        remember(&r->written, r->pattern);
    }
    if (A.save_latent) {
        int64_t shape[4] = {r->total, in->latent_channels, in->latent_size, in->latent_size};
        if ((st = dm_npy_write(A.save_latent, DM_F32, 4, shape, r->lat_all))) return st;
        remember(&r->written, A.save_latent);
    }
    if (r->trace) {
        const double trace_sec = dm_trace_seconds(r->trace);
        st = dm_trace_close(r->trace);
        r->trace = NULL;
        if (st) return st;
        remember(&r->written, A.dump_routing);
        dm_log(DM_LOG_VERBOSE, "routing dump %s: %.3f s writing", A.dump_routing, trace_sec);
    }
    const dm_pipeline_stats *ps = dm_pipeline_get_stats(r->pl);
    const double wall = dm_time_sec() - t_start;
    const long steps_total = (long)((r->total + A.batch - 1) / A.batch) * r->p.steps;
    char first[PATH_MAX + 32], last[PATH_MAX + 64] = "";
    if (!A.latent_only && r->per_image && !A.grid && r->total > 1) {
        char tmp[PATH_MAX + 32];
        dm_cli_pattern_format(r->pattern, (uint64_t)r->total - 1, tmp, sizeof tmp);
        snprintf(last, sizeof last, " .. %s", tmp);
    }
    dm_cli_pattern_format(r->pattern, 0, first, sizeof first);
    dm_log(DM_LOG_INFO, "wrote %s%s (%d image(s), %.2f s)", A.latent_only ? A.save_latent : first,
           last, r->total, wall);
    dm_log(DM_LOG_VERBOSE, "transformer: %.3f s over %ld steps (%ld forwards, %ld rows): "
           "%.2f ms/step per batch, %.3f s per image", ps->forward_sec, steps_total, ps->forwards,
           ps->rows, 1e3 * ps->forward_sec / (double)steps_total, ps->forward_sec / r->total);
    if (!A.latent_only)
        dm_log(DM_LOG_VERBOSE, "VAE decode: %.3f s total, %.3f s per image", ps->decode_sec,
               ps->decode_sec / r->total);
    dm_cli_lab_stats(r->pl);
    return DM_OK;
}

static dm_status run(run_t *r)
{
    const double t_start = dm_time_sec();
    dm_status st;
    if ((st = find_assets(r))) return st;
    dm_pipeline_opts po;
    dm_pipeline_opts_init(&po);
    po.model_path = r->model_path;
    po.vae_path = A.latent_only ? NULL : r->vae_path;
    po.backend = A.common.backend;
    po.device = A.common.device;
    if ((st = dm_cli_overrides_get(&A.ov, &po.cfg))) return st;
    if ((st = dm_cli_precision(&A.common, &po.precision, &po.quant_experts))) return st;
    if ((st = dm_cli_lab_opts(&A.lab, &po.lab))) return st;
    if ((st = dm_pipeline_open(&po, &r->pl))) return st;
    r->c = dm_pipeline_config(r->pl);
    if ((st = dm_cli_sampler_params(&A.sf, r->c, A.seed, &r->p))) return st;
    if ((st = dm_cli_lab_sample(&A.lab, &r->p))) return st;
    dm_cli_lab_log(r->pl, &r->p);
    if ((st = parse_classes(r->c, &r->cls, &r->ncls))) return st;
    if ((long)r->ncls * A.n > 10000000L)
        return dm_fail(DM_ERR_ARG, "too many images (%ld)", (long)r->ncls * A.n);
    r->total = r->ncls * A.n;
    if ((st = plan_outputs(r))) return st;
    if (!A.have_seed) r->p.seed = dm_cli_random_seed();
    dm_log(DM_LOG_INFO, "seed %llu", (unsigned long long)r->p.seed);
    if (dm_get_log_level() == DM_LOG_QUIET && !A.have_seed)
        fprintf(stderr, PROG ": seed %llu\n", (unsigned long long)r->p.seed);

    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    const dm_config *c = r->c;
    char cfgch[16];
    snprintf(cfgch, sizeof cfgch, r->p.cfg_channels ? "%d" : "all", r->p.cfg_channels);
    const int W = A.latent_only ? c->input_size : in->width;
    dm_log(DM_LOG_INFO, "%s: %s, %d image(s) of %dx%d, sampler %s, %d steps, cfg %g on %s "
           "channels (interval %g..%g), batch %d, %d threads, backend %s",
           dm_cli_base_name(r->model_path), c->name[0] ? c->name : dm_objective_name(c->objective),
           r->total, W, W, dm_sampler_name(r->p.sampler), r->p.steps, (double)r->p.cfg_scale,
           cfgch, (double)r->p.cfg_t_lo, (double)r->p.cfg_t_hi, A.batch, dm_get_threads(),
           dm_backend_name(A.common.backend));
    const int B = A.batch < r->total ? A.batch : r->total;
    if ((st = alloc_buffers(r, B))) return st;
    if (A.dump_routing) { /* the transformer with a routing record, appended per evaluation */
        dm_trace_shape ts;
        dm_trace_shape_from_model(&ts, c, &r->p);
        ts.top_k = dm_model_route_slots(dm_pipeline_model(r->pl)); /* the policy's most picks */
        if ((st = dm_trace_open(A.dump_routing, &ts, c, r->model_path, &r->p, &r->trace)))
            return st;
        if (!A.latent_only && !A.grid && (st = dm_trace_note(r->trace, "images", r->pattern)))
            return st;
    }
    if ((st = run_batches(r, B))) return st;
    return finish(r, t_start);
}

int main(int argc, char **argv)
{
    A.n = 1;
    A.batch = 4;
    A.quality = 90;
    dm_cli_common_init(&A.common);
    dm_cli_overrides_init(&A.ov);
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    if (A.latent_only && !A.save_latent)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "--latent-only needs --save-latent FILE"));
    dm_cli_common_apply(&A.common, -1);

    static run_t r; /* large path buffers */
    st = run(&r);
    dm_trace_abort(r.trace);
    forget(&r.written, st != DM_OK);
    dm_cli_grid_free(&r.grid);
    free(r.labels);
    free(r.pix);
    free(r.lat_all);
    free(r.yb);
    free(r.ib);
    free(r.cls);
    dm_npy_free(&r.init);
    dm_pipeline_free(r.pl);
    return dm_cli_exit(PROG, st);
}

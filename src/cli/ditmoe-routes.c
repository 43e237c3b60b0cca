/* ditmoe-routes: turn routing dumps (ditmoe-sample --dump-routing) into the DiT-MoE paper's three
 * views per MoE layer — class x expert, token position x expert (on the token grid), step x
 * expert — plus per-layer load statistics, as JSON and heatmap PNGs, and an overlay of one
 * sample's image tinted by the expert each token chose. The MoE lab's statistics on request
 * (docs/moe-lab.md): --affinity (ExFlow P(expert at l+1 | expert at l), co-activation, gate
 * mass; affinity.png), --persistence (top-k set persistence between adjacent steps, experts per
 * token, per layer and step band), and --policies (what routing policies would select on
 * recorded router probabilities; no dump needed).
 *   ditmoe-routes [-o DIR] [--uncond] [--sample N] [--image PNG] [--affinity] [--persistence]
 *                 DUMP [DUMP...]
 *   ditmoe-routes [-o DIR] --policies P.npy --steps S --route SPEC [--route SPEC...]
 * Exit codes (ditmoe.h dm_exit_code): 0 ok, 2 bad input (flags, missing or malformed dumps),
 * 1 runtime failure (memory, an output that cannot be written). */
#include "common.h"
#include "flags.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROG "ditmoe-routes"
#define MAX_OV_STEPS 16

typedef struct {
    dm_cli_list dumps, specs;
    const char *out, *image, *ov_steps, *policies;
    int uncond, no_png, cell, have_sample, affinity, persistence, bands, steps, top_k, cosine;
    uint64_t sample;
    dm_cli_common common;
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    {'o', "output", DM_OPT_STR, &A.out, 0, 0, "DIR", "routes",
     "output directory, created if missing; writes routes.json, class_expert.png,\n"
     "position_expert.png, step_expert.png, overlay.png", NULL},
    {'\0', "uncond", DM_OPT_SET, &A.uncond, 1, 0, NULL, "off (conditional, as the paper)",
     "count the unconditional half of guided batches instead of the conditional one", NULL},
    {'\0', "sample", DM_OPT_U64, &A.sample, 0, 0, "N", "first image of the first dump",
     "image index for the overlay", &A.have_sample},
    {'\0', "image", DM_OPT_STR, &A.image, 0, 0, "PNG",
     "the dump's \"images\" note, e.g. out-%03d.png",
     "that image (the note is taken relative to the working directory, then to the\n"
     "dump's directory)", NULL},
    {'\0', "overlay-steps", DM_OPT_STR, &A.ov_steps, 0, 0, "L", "5 spread evenly",
     "comma list of steps shown in the overlay", NULL},
    {'\0', "cell", DM_OPT_INT, &A.cell, 2, 64, "N", "14", "heatmap cell size in pixels", NULL},
    {'\0', "no-png", DM_OPT_SET, &A.no_png, 1, 0, NULL, "off", "JSON only", NULL},
    {'\0', "affinity", DM_OPT_SET, &A.affinity, 1, 0, NULL, "off",
     "add ExFlow affinity P(expert at l+1 | expert at l) per layer pair, co-activation and gate\n"
     "mass to routes.json, and affinity.png", NULL},
    {'\0', "persistence", DM_OPT_SET, &A.persistence, 1, 0, NULL, "off",
     "add top-k set persistence between adjacent steps and experts per token (per layer, per\n"
     "step and per step band) to routes.json", NULL},
    {'\0', "bands", DM_OPT_INT, &A.bands, 1, 1000, "N", "5",
     "step bands of --persistence and --policies", NULL},
    {'\0', "policies", DM_OPT_STR, &A.policies, 0, 0, "P.npy", "none",
     "router probabilities [L, S*B*T, E] float32 (tools/moe_lab/router_probs.py): write\n"
     "policies.json, the experts per token each --route would select", NULL},
    {'\0', "steps", DM_OPT_INT, &A.steps, 1, 100000, "S", "- (required by --policies)",
     "sampler steps recorded in --policies", NULL},
    {'\0', "route", DM_OPT_LIST, &A.specs, 0, 0, "SPEC", "none",
     "routing policy for --policies (repeatable): top-k[=K], top-p=P[,max=K][,renorm],\n"
     "threshold=T[,max=K][,renorm], rank2=TAU[,margin=D] (with --cosine)", NULL},
    {'\0', "top-k", DM_OPT_INT, &A.top_k, 1, 64, "K", "2 (1 with --cosine)",
     "the model's trained k, for --policies", NULL},
    {'\0', "cosine", DM_OPT_SET, &A.cosine, 1, 0, NULL, "off",
     "--policies holds ProMoE cosine scores (tools/moe_lab/promoe_scores.py)", NULL},
    DM_CLI_LOG_OPTS(A.common),
    DM_CLI_HELP_OPTS,
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "[options] DUMP [DUMP...]\n"
    "       " PROG " [-o DIR] --policies P.npy --steps S --route SPEC [--route SPEC...]",
    "Routing dumps (ditmoe-sample/ditmoe-batch --dump-routing) -> the DiT-MoE paper's views per\n"
    "MoE layer (class x expert, token position x expert, step x expert), load statistics as\n"
    "JSON and heatmap PNGs, and an overlay of one sample tinted by the expert each token chose.",
    OPTS, &A.dumps,
    "Colour scale of the heatmaps: P(expert | row) x E, i.e. the share of the row's picks relative\n"
    "to uniform, log scale, blue 1/4x - white 1x - red 4x (clipped).\n"};

static int same_shape(const dm_trace_shape *a, const dm_trace_shape *b)
{
    return a->layers == b->layers && a->grid_h == b->grid_h && a->grid_w == b->grid_w &&
           a->top_k == b->top_k && a->num_experts == b->num_experts &&
           a->uncond_expert == b->uncond_expert && a->num_classes == b->num_classes &&
           a->steps == b->steps && a->heun == b->heun &&
           !memcmp(a->moe_layers, b->moe_layers, (size_t)a->layers * sizeof(int));
}

/* Everything gathered from the dumps. */
typedef struct {
    dm_route_counts c;
    cJSON *head0;       /* header of the first dump */
    double *step_t;     /* [S] t of each step's first eval (NAN if unseen) */
    int32_t *ov;        /* [Lm, S, T] top-1 expert of the overlay sample per step (-2 unseen) */
    int64_t ov_class;
    const char *ov_dump;/* dump holding the overlay sample */
    uint64_t sample;
    int have_sample;
    dm_route_analysis *an; /* --affinity / --persistence, else NULL */
} gathered_t;

/* The current error message prefixed (dm_fail formats into the buffer dm_last_error reads, so
 * the old message is copied first). */
static dm_status prefixed(dm_status st, const char *dump, long record)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", dm_last_error());
    if (record < 0) return dm_fail(st, "%s: %s", dump, msg);
    return dm_fail(st, "%s: record %ld: %s", dump, record, msg);
}

static dm_status gather(const args_t *a, gathered_t *g)
{
    dm_status st = DM_OK;
    dm_trace_reader *r = NULL;
    dm_trace_shape shape0;
    g->have_sample = a->have_sample;
    g->sample = a->sample;
    g->ov_class = -1;
    for (int d = 0; d < a->dumps.n; d++) {
        if ((st = dm_trace_read_open(a->dumps.v[d], &r))) return st;
        const dm_trace_shape *s = dm_trace_read_shape(r);
        if (d == 0) {
            shape0 = *s;
            g->head0 = cJSON_Parse(dm_trace_read_header(r));
            if ((st = dm_route_counts_init(&g->c, s, a->uncond))) goto fail;
            const int S = g->c.S > 0 ? g->c.S : 1, T = dm_trace_tokens(s);
            g->step_t = malloc((size_t)S * sizeof(double));
            g->ov = malloc((size_t)s->layers * S * T * sizeof(int32_t));
            if (!g->head0 || !g->step_t || !g->ov) {
                st = dm_fail(DM_ERR_NOMEM, "out of memory");
                goto fail;
            }
            for (int i = 0; i < S; i++) g->step_t[i] = NAN;
            if ((a->affinity || a->persistence) && (st = dm_route_analysis_new(s, a->uncond, &g->an))) {
                st = prefixed(st, a->dumps.v[d], -1);
                goto fail;
            }
            for (size_t i = 0; i < (size_t)s->layers * S * T; i++) g->ov[i] = -2;
            if (s->steps <= 0) {
                st = dm_fail(DM_ERR_FORMAT, "%s: the dump does not record the number of sampler "
                             "steps", a->dumps.v[d]);
                goto fail;
            }
        } else if (!same_shape(&shape0, s)) {
            st = dm_fail(DM_ERR_ARG, "%s: routing shape (layers %d, grid %dx%d, k %d, E %d, "
                         "classes %d, steps %d) differs from %s's (layers %d, grid %dx%d, k %d, "
                         "E %d, classes %d, steps %d)", a->dumps.v[d], s->layers, s->grid_h,
                         s->grid_w, s->top_k, s->num_experts, s->num_classes, s->steps,
                         a->dumps.v[0], shape0.layers, shape0.grid_h, shape0.grid_w, shape0.top_k,
                         shape0.num_experts, shape0.num_classes, shape0.steps);
            goto fail;
        }
        const int T = dm_trace_tokens(s), k = s->top_k, S = g->c.S;
        long n = 0;
        for (;;) {
            const dm_trace_record *rec;
            if ((st = dm_trace_read_next(r, &rec))) goto fail;
            if (!rec) break;
            if ((st = dm_route_counts_add(&g->c, rec)) || (g->an && (st = dm_route_analysis_add(g->an, rec)))) {
                st = prefixed(st, a->dumps.v[d], n);
                goto fail;
            }
            if (d == 0 && rec->step < S && isnan(g->step_t[rec->step])) g->step_t[rec->step] = rec->t[0];
            if (!g->have_sample && d == 0 && rec->rows > 0) {
                g->sample = (uint64_t)rec->image[0];
                g->have_sample = 1;
            }
            if (g->ov_dump && g->ov_dump != a->dumps.v[d]) continue; /* first dump with it */
            const size_t RT = (size_t)rec->rows * T;
            for (int row = 0; row < rec->rows; row++) {
                if ((uint64_t)rec->image[row] != g->sample || rec->uncond[row] != a->uncond) continue;
                g->ov_dump = a->dumps.v[d];
                g->ov_class = rec->cls[row];
                for (int l = 0; l < s->layers; l++) {
                    int32_t *dst = g->ov + ((size_t)l * S + rec->step) * T;
                    if (dst[0] != -2) continue; /* first eval of the step */
                    for (int j = 0; j < T; j++)
                        dst[j] = rec->ids[((size_t)l * RT + (size_t)row * T + j) * k];
                }
            }
            n++;
        }
        dm_log(DM_LOG_VERBOSE, "%s: %ld records", a->dumps.v[d], n);
        dm_trace_read_close(r);
        r = NULL;
    }
    return DM_OK;
fail:
    dm_trace_read_close(r);
    return st;
}

/* ------------------------------------------------------------------ JSON */

static cJSON *table_json(const int64_t *t, int rows, int X)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < rows; i++) {
        cJSON *row = cJSON_CreateArray();
        for (int e = 0; row && e < X; e++)
            cJSON_AddItemToArray(row, cJSON_CreateNumber((double)t[(size_t)i * X + e]));
        cJSON_AddItemToArray(a, row);
    }
    return a;
}

static cJSON *layer_stats(const dm_route_counts *c, int l, int Xc)
{
    const dm_trace_shape *s = &c->shape;
    const int X = c->X, T = dm_trace_tokens(s), S = c->S, C = s->num_classes;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "layer", l);
    cJSON_AddNumberToObject(o, "block", s->moe_layers[l]);
    double load[X];
    double total = 0, mx = 0;
    for (int e = 0; e < X; e++) load[e] = 0;
    for (int j = 0; j < T; j++)
        for (int e = 0; e < X; e++) load[e] += (double)c->by_pos[((size_t)l * T + j) * X + e];
    cJSON *tpe = cJSON_AddArrayToObject(o, "picks_per_expert");
    for (int e = 0; e < X; e++) cJSON_AddItemToArray(tpe, cJSON_CreateNumber(load[e]));
    double h = 0;
    for (int e = 0; e < Xc; e++) {
        total += load[e];
        if (load[e] > mx) mx = load[e];
    }
    for (int e = 0; e < Xc; e++)
        if (load[e] > 0) h -= load[e] / total * log2(load[e] / total);
    cJSON_AddNumberToObject(o, "max_mean_ratio", total > 0 ? mx / (total / Xc) : 0);
    cJSON_AddNumberToObject(o, "entropy_bits", h);
    cJSON_AddNumberToObject(o, "entropy_norm", Xc > 1 ? h / log2(Xc) : 0);
    double mi, hx;
    dm_route_table_info(c->by_class + (size_t)l * C * X, C, X, &mi, &hx);
    cJSON_AddNumberToObject(o, "mi_class_bits", mi);
    dm_route_table_info(c->by_pos + (size_t)l * T * X, T, X, &mi, NULL);
    cJSON_AddNumberToObject(o, "mi_position_bits", mi);
    dm_route_table_info(c->by_step + (size_t)l * S * X, S, X, &mi, NULL);
    cJSON_AddNumberToObject(o, "mi_step_bits", mi);
    /* finite-sample bias of those plug-in estimates (Miller-Madow): (A-1)(X-1) / (2 N ln 2) */
    double npk = 0;
    for (int e = 0; e < X; e++) npk += load[e];
    cJSON *bias = cJSON_AddObjectToObject(o, "mi_bias_bits");
    const int nA[3] = {C, T, S};
    const char *nm[3] = {"class", "position", "step"};
    for (int i = 0; i < 3; i++)
        cJSON_AddNumberToObject(bias, nm[i], npk > 0 ? (nA[i] - 1.0) * (Xc - 1.0) / (2.0 * npk * log(2.0)) : 0);
    if (c->by_step_pos) {
        cJSON *ms = cJSON_AddArrayToObject(o, "mi_position_by_step_bits");
        for (int q = 0; q < S; q++) {
            dm_route_table_info(c->by_step_pos + ((size_t)l * S + q) * T * X, T, X, &mi, NULL);
            cJSON_AddItemToArray(ms, cJSON_CreateNumber(mi));
        }
    }
    /* total-variation distance of each step's expert distribution from the layer's */
    cJSON *tv = cJSON_AddArrayToObject(o, "step_tv");
    double all = 0;
    for (int e = 0; e < X; e++) all += load[e];
    for (int q = 0; q < S; q++) {
        const int64_t *row = c->by_step + ((size_t)l * S + q) * X;
        double rt = 0, d = 0;
        for (int e = 0; e < X; e++) rt += (double)row[e];
        for (int e = 0; rt > 0 && all > 0 && e < X; e++) d += fabs((double)row[e] / rt - load[e] / all);
        cJSON_AddItemToArray(tv, cJSON_CreateNumber(0.5 * d));
    }
    return o;
}

static dm_status write_json(const args_t *a, const gathered_t *g, int Xc, const char *path)
{
    const dm_route_counts *c = &g->c;
    const dm_trace_shape *s = &c->shape;
    const int Lm = s->layers, X = c->X, T = dm_trace_tokens(s), S = c->S, C = s->num_classes;
    cJSON *o = cJSON_CreateObject();
    cJSON *dumps = cJSON_AddArrayToObject(o, "dumps");
    for (int d = 0; d < a->dumps.n; d++) cJSON_AddItemToArray(dumps, cJSON_CreateString(a->dumps.v[d]));
    cJSON_AddStringToObject(o, "counted", a->uncond ? "unconditional" : "conditional");
    cJSON_AddStringToObject(o, "counting", "every pick of every token (all k), weights unused");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(g->head0, "model");
    const cJSON *sampler = cJSON_GetObjectItemCaseSensitive(g->head0, "sampler");
    const cJSON *names = cJSON_GetObjectItemCaseSensitive(g->head0, "class_names");
    if (model) cJSON_AddItemToObject(o, "model", cJSON_Duplicate(model, 1));
    if (sampler) cJSON_AddItemToObject(o, "sampler", cJSON_Duplicate(sampler, 1));
    if (cJSON_IsArray(names)) cJSON_AddItemToObject(o, "class_names", cJSON_Duplicate(names, 1));
    cJSON_AddNumberToObject(o, "layers", Lm);
    cJSON *ml = cJSON_AddArrayToObject(o, "moe_layers");
    for (int l = 0; l < Lm; l++) cJSON_AddItemToArray(ml, cJSON_CreateNumber(s->moe_layers[l]));
    cJSON_AddNumberToObject(o, "experts", X);
    cJSON_AddNumberToObject(o, "routed_experts", s->num_experts);
    cJSON_AddNumberToObject(o, "uncond_expert", s->uncond_expert);
    cJSON_AddNumberToObject(o, "top_k", s->top_k);
    cJSON *grid = cJSON_AddArrayToObject(o, "grid");
    cJSON_AddItemToArray(grid, cJSON_CreateNumber(s->grid_h));
    cJSON_AddItemToArray(grid, cJSON_CreateNumber(s->grid_w));
    cJSON_AddNumberToObject(o, "tokens", T);
    cJSON_AddNumberToObject(o, "steps", S);
    cJSON_AddNumberToObject(o, "num_classes", C);
    cJSON_AddNumberToObject(o, "rows_counted", (double)c->rows);
    cJSON_AddNumberToObject(o, "rows_skipped", (double)c->skipped_rows);
    cJSON_AddNumberToObject(o, "picks", (double)c->picks);
    cJSON_AddNumberToObject(o, "empty_slots", (double)c->none);
    cJSON *ts = cJSON_AddArrayToObject(o, "step_t");
    for (int q = 0; q < S; q++)
        cJSON_AddItemToArray(ts, isnan(g->step_t[q]) ? cJSON_CreateNull() : cJSON_CreateNumber(g->step_t[q]));
    cJSON *rows_per_class = cJSON_AddArrayToObject(o, "picks_per_class");
    for (int k = 0; k < C; k++) {
        double n = 0;
        for (int e = 0; e < X; e++) n += (double)c->by_class[(size_t)k * X + e];
        cJSON_AddItemToArray(rows_per_class, cJSON_CreateNumber(n));
    }
    cJSON *cl = cJSON_AddArrayToObject(o, "class_expert");       /* [Lm][C][X] */
    cJSON *po = cJSON_AddArrayToObject(o, "position_expert");    /* [Lm][T][X] */
    cJSON *st = cJSON_AddArrayToObject(o, "step_expert");        /* [Lm][S][X] */
    cJSON *ld = cJSON_AddArrayToObject(o, "layer_stats");
    for (int l = 0; l < Lm; l++) {
        cJSON_AddItemToArray(cl, table_json(c->by_class + (size_t)l * C * X, C, X));
        cJSON_AddItemToArray(po, table_json(c->by_pos + (size_t)l * T * X, T, X));
        cJSON_AddItemToArray(st, table_json(c->by_step + (size_t)l * S * X, S, X));
        cJSON_AddItemToArray(ld, layer_stats(c, l, Xc));
    }
    if (g->an) {
        /* the lab's statistics, under the keys docs/moe-lab.md lists */
        char *text = NULL;
        dm_status st2 = dm_route_analysis_json(g->an, a->bands, &text);
        cJSON *lab = st2 ? NULL : cJSON_Parse(text);
        free(text);
        if (!lab) {
            cJSON_Delete(o);
            return st2 ? st2 : dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
        }
        static const char *const aff[] = {"affinity", "coactivation", "mass", NULL};
        static const char *const per[] = {"persistence_bands", "set_kept_by_step", "mean_experts_by_step", NULL};
        for (int grp = 0; grp < 2; grp++) {
            if (!(grp ? a->persistence : a->affinity)) continue;
            for (const char *const *k = grp ? per : aff; *k; k++) {
                cJSON *it = cJSON_DetachItemFromObjectCaseSensitive(lab, *k);
                if (it) cJSON_AddItemToObject(o, *k, it);
            }
        }
        if (a->persistence) cJSON_AddNumberToObject(o, "bands", a->bands);
        cJSON_Delete(lab);
    }
    cJSON *ov = cJSON_AddObjectToObject(o, "overlay");
    cJSON_AddNumberToObject(ov, "image_index", (double)g->sample);
    cJSON_AddNumberToObject(ov, "class", (double)g->ov_class);
    cJSON *top1 = cJSON_AddArrayToObject(ov, "top1"); /* [Lm][S][T], -2 = not seen */
    for (int l = 0; l < Lm; l++) {
        cJSON *ls = cJSON_CreateArray();
        for (int q = 0; q < S; q++) {
            cJSON *row = cJSON_CreateArray();
            for (int j = 0; j < T; j++)
                cJSON_AddItemToArray(row, cJSON_CreateNumber(g->ov[((size_t)l * S + q) * T + j]));
            cJSON_AddItemToArray(ls, row);
        }
        cJSON_AddItemToArray(top1, ls);
    }
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!text) return dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
    const size_t len = strlen(text);
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
    }
    withnl[len] = '\n';
    withnl[len + 1] = '\0';
    dm_status st2 = dm_write_file_atomic(path, withnl, len + 1);
    free(withnl);
    return st2;
}

/* ------------------------------------------------------------------ figures */

static const uint8_t BLACK[3] = {0, 0, 0}, GRAY[3] = {110, 110, 110};

/* ratio of cell (row, e): count * Xc / row total */
static double ratio(const int64_t *row, int X, int Xc, int e)
{
    double t = 0;
    for (int i = 0; i < X; i++) t += (double)row[i];
    return t > 0 ? (double)row[e] * Xc / t : NAN;
}

static void cell_color(double r, uint8_t rgb[3])
{
    if (isnan(r)) {
        rgb[0] = rgb[1] = rgb[2] = 200; /* no data */
        return;
    }
    dm_color_ratio(r, rgb);
}

/* Colour bar with ticks 1/4 .. 4 and a caption, at (x, y); returns its height. */
static int legend(dm_canvas *cv, int x, int y, const char *caption)
{
    const int w = 240, h = 12;
    for (int i = 0; i < w; i++) {
        uint8_t rgb[3];
        dm_color_ratio(pow(2.0, -2.0 + 4.0 * (i + 0.5) / w), rgb);
        dm_canvas_rect(cv, x + i, y, 1, h, rgb);
    }
    const char *ticks[5] = {"1/4", "1/2", "1", "2", "4"};
    for (int i = 0; i < 5; i++) {
        const int tx = x + i * (w - 1) / 4;
        dm_canvas_rect(cv, tx, y + h, 1, 3, BLACK);
        dm_canvas_text(cv, tx - dm_text_width(ticks[i], 1) / 2, y + h + 5, 1, ticks[i], BLACK);
    }
    dm_canvas_text(cv, x + w + 12, y + 2, 1, caption, BLACK);
    return h + 16;
}

static dm_status save(const dm_canvas *cv, const char *dir, const char *name, const args_t *a,
                      const char *what)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    const char *text[] = {"Software", PROG " " DITMOE_VERSION, "Description", what, "counted",
                          a->uncond ? "unconditional half" : "conditional half", "dump",
                          a->dumps.v[0], NULL};
    dm_status st = dm_png_write(path, cv->w, cv->h, 3, cv->pix, text);
    if (!st) dm_log(DM_LOG_INFO, "wrote %s", path);
    return st;
}

/* One panel per layer (pair = 1: per adjacent layer pair, Lm - 1 panels) of a [rows, X] table;
 * row labels every `every` rows (label(i) text). */
static dm_status table_figure(const args_t *a, const gathered_t *g, int Xc, const int64_t *tab,
                              int rows, int pair, const char *what, const char *name,
                              const char *caption, const char *(*label)(const gathered_t *, int,
                                                                        char *, size_t))
{
    const dm_route_counts *c = &g->c;
    const int Lm = c->shape.layers - (pair ? 1 : 0), X = c->X;
    const int cw = a->cell, ch = rows * a->cell <= 420 ? a->cell : (420 / rows > 0 ? 420 / rows : 1);
    const int every = ch >= 9 ? 1 : (9 + ch - 1) / ch <= 5 ? 5 : (9 + ch - 1) / ch <= 10 ? 10 : 50;
    const int lab_w = 6 * 14 + 6, pw = lab_w + X * cw + 16, ph = 14 + rows * ch + 22;
    const int cols = Lm < 6 ? Lm : 6, prow = (Lm + cols - 1) / cols;
    dm_canvas cv;
    char title[200];
    snprintf(title, sizeof title, "%s, %s HALF", what, a->uncond ? "UNCONDITIONAL" : "CONDITIONAL");
    int W = cols * pw + 20 > 520 ? cols * pw + 20 : 520;
    if (W < dm_text_width(title, 2) + 20) W = dm_text_width(title, 2) + 20;
    dm_status st = dm_canvas_init(&cv, W, 28 + prow * ph + 40);
    if (st) return st;
    dm_canvas_text(&cv, 10, 8, 2, title, BLACK);
    for (int l = 0; l < Lm; l++) {
        const int x0 = 10 + (l % cols) * pw, y0 = 32 + (l / cols) * ph;
        char t[64];
        if (pair)
            snprintf(t, sizeof t, "LAYER %d -> %d", c->shape.moe_layers[l], c->shape.moe_layers[l + 1]);
        else
            snprintf(t, sizeof t, "LAYER %d", c->shape.moe_layers[l]);
        dm_canvas_text(&cv, x0 + lab_w, y0, 1, t, BLACK);
        const int64_t *T0 = tab + (size_t)l * rows * X;
        for (int i = 0; i < rows; i++) {
            for (int e = 0; e < X; e++) {
                uint8_t rgb[3];
                cell_color(ratio(T0 + (size_t)i * X, X, Xc, e), rgb);
                dm_canvas_rect(&cv, x0 + lab_w + e * cw, y0 + 12 + i * ch, cw, ch, rgb);
            }
            if (i % every == 0) {
                char buf[64];
                const char *s = label(g, i, buf, sizeof buf);
                dm_canvas_text(&cv, x0 + lab_w - 4 - dm_text_width(s, 1), y0 + 12 + i * ch +
                               (ch >= 7 ? (ch - 7) / 2 : 0), 1, s, GRAY);
            }
        }
        for (int e = 0; e < X; e++) {
            char buf[16];
            snprintf(buf, sizeof buf, "%d", e);
            if (cw >= 8 || e % 2 == 0)
                dm_canvas_text(&cv, x0 + lab_w + e * cw + (cw - dm_text_width(buf, 1)) / 2,
                               y0 + 14 + rows * ch, 1, buf, GRAY);
        }
    }
    legend(&cv, 20, 30 + prow * ph, caption);
    st = save(&cv, a->out, name, a, title);
    dm_canvas_free(&cv);
    return st;
}

static const char *class_label(const gathered_t *g, int i, char *buf, size_t n)
{
    const cJSON *names = cJSON_GetObjectItemCaseSensitive(g->head0, "class_names");
    const cJSON *nm = cJSON_IsArray(names) ? cJSON_GetArrayItem(names, i) : NULL;
    if (cJSON_IsString(nm))
        snprintf(buf, n, "%.9s %d", nm->valuestring, i);
    else
        snprintf(buf, n, "%d", i);
    return buf;
}

static const char *step_label(const gathered_t *g, int i, char *buf, size_t n)
{
    (void)g;
    snprintf(buf, n, "%d", i);
    return buf;
}

/* Token grid maps: a row per layer, a column per expert. */
static dm_status position_figure(const args_t *a, const gathered_t *g, int Xc)
{
    const dm_route_counts *c = &g->c;
    const int Lm = c->shape.layers, X = c->X, gh = c->shape.grid_h, gw = c->shape.grid_w;
    int px = 96 / (gw > gh ? gw : gh);
    if (px < 2) px = 2;
    const int mw = gw * px, mh = gh * px, gap = 6, left = 70;
    dm_canvas cv;
    dm_status st = dm_canvas_init(&cv, left + X * (mw + gap) + 20 > 560 ? left + X * (mw + gap) + 20 : 560,
                                  48 + Lm * (mh + gap) + 40);
    if (st) return st;
    char title[160];
    snprintf(title, sizeof title, "TOKEN POSITION X EXPERT (%dX%d GRID), %s HALF", gh, gw,
             a->uncond ? "UNCONDITIONAL" : "CONDITIONAL");
    dm_canvas_text(&cv, 10, 8, 2, title, BLACK);
    for (int e = 0; e < X; e++) {
        char buf[16];
        snprintf(buf, sizeof buf, "E%d", e);
        dm_canvas_text(&cv, left + e * (mw + gap) + (mw - dm_text_width(buf, 1)) / 2, 32, 1, buf, BLACK);
    }
    for (int l = 0; l < Lm; l++) {
        const int y0 = 44 + l * (mh + gap);
        char buf[32];
        snprintf(buf, sizeof buf, "LAYER %d", c->shape.moe_layers[l]);
        dm_canvas_text(&cv, 10, y0 + (mh - 7) / 2, 1, buf, BLACK);
        for (int e = 0; e < X; e++)
            for (int j = 0; j < gh * gw; j++) {
                uint8_t rgb[3];
                cell_color(ratio(c->by_pos + ((size_t)l * gh * gw + j) * X, X, Xc, e), rgb);
                dm_canvas_rect(&cv, left + e * (mw + gap) + (j % gw) * px, y0 + (j / gw) * px, px,
                               px, rgb);
            }
    }
    legend(&cv, 20, 50 + Lm * (mh + gap), "P(EXPERT | POSITION) X E");
    st = save(&cv, a->out, "position_expert.png", a, title);
    dm_canvas_free(&cv);
    return st;
}

/* Find the sample's PNG: --image, else the dump's "images" note (one %d), relative to the
 * working directory, then to the dump's directory. */
static int find_image(const args_t *a, const gathered_t *g, char *path, size_t n)
{
    if (a->image) {
        snprintf(path, n, "%s", a->image);
        return 1;
    }
    const cJSON *notes = cJSON_GetObjectItemCaseSensitive(g->head0, "notes");
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(notes, "images");
    if (!cJSON_IsString(pat) || g->ov_dump != a->dumps.v[0]) return 0;
    char name[PATH_MAX];
    if (dm_cli_pattern_count(pat->valuestring) < 0) return 0; /* at most one %[0N]d */
    dm_cli_pattern_format(pat->valuestring, g->sample, name, sizeof name);
    struct stat sb;
    snprintf(path, n, "%s", name);
    if (stat(path, &sb) == 0) return 1;
    const char *slash = strrchr(a->dumps.v[0], '/');
    if (name[0] != '/' && slash) {
        const int dl = (int)(slash - a->dumps.v[0]);
        if ((size_t)dl + 2 + strlen(name) > n) return 0;
        memcpy(path, a->dumps.v[0], (size_t)dl);
        path[dl] = '/';
        memcpy(path + dl + 1, name, strlen(name) + 1);
        if (stat(path, &sb) == 0) return 1;
    }
    snprintf(path, n, "%s", name);
    return 1; /* reported as missing by the reader */
}

static dm_status overlay_figure(const args_t *a, const gathered_t *g)
{
    const dm_route_counts *c = &g->c;
    const int Lm = c->shape.layers, X = c->X, S = c->S, gh = c->shape.grid_h,
              gw = c->shape.grid_w, T = gh * gw;
    if (!g->ov_dump) {
        dm_log(DM_LOG_INFO, "overlay: image %llu is not in the %s half of the dumps; skipped",
               (unsigned long long)g->sample, a->uncond ? "unconditional" : "conditional");
        return a->have_sample ? dm_fail(DM_ERR_ARG, "--sample %llu: no such image in the dumps",
                                        (unsigned long long)g->sample)
                              : DM_OK;
    }
    int steps[MAX_OV_STEPS], ns = 0;
    if (a->ov_steps) {
        const char *p = a->ov_steps;
        while (*p && ns < MAX_OV_STEPS) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 0 || v >= S || (*end && *end != ','))
                return dm_fail(DM_ERR_ARG, "--overlay-steps '%s': expected steps in [0,%d) "
                               "separated by commas", a->ov_steps, S);
            steps[ns++] = (int)v;
            p = *end ? end + 1 : end;
        }
    } else {
        ns = S < 5 ? S : 5;
        for (int i = 0; i < ns; i++) steps[i] = ns > 1 ? (int)((long)i * (S - 1) / (ns - 1)) : 0;
    }
    char path[PATH_MAX];
    int iw = 0, ih = 0;
    uint8_t *img = NULL;
    if (find_image(a, g, path, sizeof path)) {
        dm_status st = dm_png_read_rgb(path, &iw, &ih, &img);
        if (st) {
            if (a->image) return st;
            dm_log(DM_LOG_INFO, "overlay: %s (give --image); drawing the routes on gray",
                   dm_last_error());
        }
    } else {
        dm_log(DM_LOG_INFO, "overlay: the dump names no per-image PNG for image %llu (give "
               "--image); drawing the routes on gray", (unsigned long long)g->sample);
    }
    if (!img) {
        iw = gw * 8;
        ih = gh * 8;
    }
    int up = 1;
    while ((up + 1) * iw <= 112 && (up + 1) * ih <= 112) up++;
    const int cw = iw * up, chh = ih * up, gap = 8, left = 70, top = 56;
    dm_canvas cv;
    dm_status st = dm_canvas_init(&cv, left + (ns + 1) * (cw + gap) + 20 > 600 ? left + (ns + 1) * (cw + gap) + 20 : 600,
                                  top + Lm * (chh + gap) + 40);
    if (st) {
        free(img);
        return st;
    }
    char title[160];
    snprintf(title, sizeof title, "IMAGE %llu (CLASS %lld): TOP-1 EXPERT PER TOKEN",
             (unsigned long long)g->sample, (long long)g->ov_class);
    dm_canvas_text(&cv, 10, 8, 2, title, BLACK);
    dm_canvas_text(&cv, left, 36, 1, "IMAGE", BLACK);
    for (int q = 0; q < ns; q++) {
        char buf[48];
        snprintf(buf, sizeof buf, "STEP %d", steps[q]);
        dm_canvas_text(&cv, left + (q + 1) * (cw + gap), 30, 1, buf, BLACK);
        if (!isnan(g->step_t[steps[q]])) {
            snprintf(buf, sizeof buf, "T=%.4g", g->step_t[steps[q]]);
            dm_canvas_text(&cv, left + (q + 1) * (cw + gap), 41, 1, buf, BLACK);
        }
    }
    for (int l = 0; l < Lm; l++) {
        const int y0 = top + l * (chh + gap);
        char buf[32];
        snprintf(buf, sizeof buf, "LAYER %d", c->shape.moe_layers[l]);
        dm_canvas_text(&cv, 10, y0 + (chh - 7) / 2, 1, buf, BLACK);
        for (int q = -1; q < ns; q++) {
            const int x0 = left + (q + 1) * (cw + gap);
            const int32_t *ids = q >= 0 ? g->ov + ((size_t)l * S + steps[q]) * T : NULL;
            for (int y = 0; y < chh; y++)
                for (int x = 0; x < cw; x++) {
                    uint8_t base[3] = {160, 160, 160}, rgb[3];
                    if (img) memcpy(base, img + ((size_t)(y / up) * iw + x / up) * 3, 3);
                    if (!ids) {
                        memcpy(rgb, base, 3);
                    } else {
                        const int j = (y * gh / chh) * gw + x * gw / cw;
                        uint8_t ec[3];
                        dm_color_expert(ids[j] >= 0 ? ids[j] : -1, ec);
                        if (ids[j] == -2) ec[0] = ec[1] = ec[2] = 255;
                        for (int i = 0; i < 3; i++)
                            rgb[i] = (uint8_t)((45 * base[i] + 55 * ec[i]) / 100);
                    }
                    dm_canvas_rect(&cv, x0 + x, y0 + y, 1, 1, rgb);
                }
        }
    }
    const int ly = top + Lm * (chh + gap) + 6;
    for (int e = 0; e < X; e++) {
        uint8_t ec[3];
        char buf[16];
        dm_color_expert(e, ec);
        dm_canvas_rect(&cv, left + e * 44, ly, 12, 12, ec);
        snprintf(buf, sizeof buf, "E%d", e);
        dm_canvas_text(&cv, left + e * 44 + 16, ly + 3, 1, buf, BLACK);
    }
    st = save(&cv, a->out, "overlay.png", a, title);
    dm_canvas_free(&cv);
    free(img);
    return st;
}

/* --policies: policies.json with the mean experts per token each --route selects on the
 * recorded router scores, per layer and step band. */
static dm_status policies(const args_t *a, const char *path)
{
    dm_npy x = {0};
    dm_status st = dm_npy_read_expect(a->policies, DM_F32, 3, &x);
    if (st) return st;
    const int L = (int)x.shape[0], E = (int)x.shape[2], bands = a->bands;
    const int k = a->top_k ? a->top_k : a->cosine ? 1 : 2;
    double *mean = malloc((size_t)(L ? L : 1) * bands * sizeof(double));
    cJSON *o = cJSON_CreateObject();
    if (!mean || !o) st = dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
    if (!st) {
        cJSON_AddStringToObject(o, "probs", a->policies);
        cJSON_AddNumberToObject(o, "layers", L);
        cJSON_AddNumberToObject(o, "experts", E);
        cJSON_AddNumberToObject(o, "steps", a->steps);
        cJSON_AddNumberToObject(o, "top_k", k);
        cJSON_AddStringToObject(o, "scores", a->cosine ? "cosine" : "softmax");
        cJSON_AddNumberToObject(o, "bands", bands);
    }
    cJSON *pol = st ? NULL : cJSON_AddArrayToObject(o, "policies");
    for (int i = 0; !st && i < a->specs.n; i++) {
        st = dm_route_policy_experts(a->specs.v[i], x.data, L, x.shape[1], E, a->steps, k,
                                     a->cosine, bands, mean);
        if (st) break;
        cJSON *it = cJSON_CreateObject();
        cJSON_AddItemToArray(pol, it);
        cJSON_AddStringToObject(it, "route", a->specs.v[i]);
        cJSON *m = cJSON_AddArrayToObject(it, "mean_experts"); /* [L][bands] */
        for (int l = 0; l < L; l++) {
            cJSON *row = cJSON_CreateArray();
            for (int b = 0; b < bands; b++)
                cJSON_AddItemToArray(row, cJSON_CreateNumber(mean[(size_t)l * bands + b]));
            cJSON_AddItemToArray(m, row);
        }
        dm_log(DM_LOG_VERBOSE, "--route %s: %.4f experts per token", a->specs.v[i],
               L ? mean[0] : 0.0);
    }
    char *text = st ? NULL : cJSON_PrintUnformatted(o);
    if (!st && !text) st = dm_fail(DM_ERR_NOMEM, "out of memory for %s", path);
    if (!st) {
        const size_t len = strlen(text);
        text[len] = '\n'; /* cJSON's buffer holds the terminator: write len + 1 bytes */
        st = dm_write_file_atomic(path, text, len + 1);
        if (!st) dm_log(DM_LOG_INFO, "wrote %s", path);
    }
    free(text);
    cJSON_Delete(o);
    free(mean);
    dm_npy_free(&x);
    return st;
}

int main(int argc, char **argv)
{
    A.out = "routes";
    A.cell = 14;
    A.bands = 5;
    dm_cli_common_init(&A.common);
    int done_now = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done_now);
    if (st || done_now) return dm_cli_exit(PROG, st);
    if (!A.dumps.n && !A.policies)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "no dump given (see --help)"));
    if (A.policies && !A.specs.n)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "--policies needs at least one --route SPEC"));
    if (A.policies && !A.steps)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "--policies needs --steps S (the sampler steps it records)"));
    if (!A.policies && (A.specs.n || A.steps || A.cosine || A.top_k))
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "--route, --steps, --top-k and --cosine go with --policies P.npy"));
    dm_cli_common_apply(&A.common, -1);
    const args_t a = A;
    gathered_t g;
    memset(&g, 0, sizeof g);
    char path[PATH_MAX];
    if (!a.dumps.n) { /* --policies only */
        if (mkdir(a.out, 0777) != 0 && errno != EEXIST)
            return dm_cli_exit(PROG, dm_fail(DM_ERR_WRITE, "-o %s: cannot create the directory: %s",
                                             a.out, strerror(errno)));
        snprintf(path, sizeof path, "%s/policies.json", a.out);
        return dm_cli_exit(PROG, policies(&a, path));
    }
    const double t0 = dm_time_sec();
    if ((st = gather(&a, &g))) goto done; /* read every dump before creating anything */
    if (a.have_sample && !g.ov_dump && !a.no_png) {
        st = dm_fail(DM_ERR_ARG, "--sample %llu: no such image in the %s half of the dumps",
                     (unsigned long long)a.sample, a.uncond ? "unconditional" : "conditional");
        goto done;
    }
    const dm_trace_shape *s = &g.c.shape;
    const int Xc = a.uncond && s->uncond_expert >= 0 ? g.c.X : s->num_experts;
    dm_log(DM_LOG_INFO, "%d dump(s): %lld %s rows, %lld picks over %d layers, %d steps, %.2f s",
           a.dumps.n, (long long)g.c.rows, a.uncond ? "unconditional" : "conditional",
           (long long)g.c.picks, s->layers, g.c.S, dm_time_sec() - t0);
    if (g.c.rows == 0)
        dm_log(DM_LOG_INFO, "no %s rows in the dumps%s", a.uncond ? "unconditional" : "conditional",
               a.uncond ? " (was guidance off?)" : "");
    if (mkdir(a.out, 0777) != 0 && errno != EEXIST) {
        st = dm_fail(DM_ERR_WRITE, "-o %s: cannot create the directory: %s", a.out, strerror(errno));
        goto done;
    }
    if (a.policies) {
        snprintf(path, sizeof path, "%s/policies.json", a.out);
        if ((st = policies(&a, path))) goto done;
    }
    snprintf(path, sizeof path, "%s/routes.json", a.out);
    if ((st = write_json(&a, &g, Xc, path))) goto done;
    dm_log(DM_LOG_INFO, "wrote %s", path);
    if (a.no_png) goto done;
    if ((st = table_figure(&a, &g, Xc, g.c.by_class, s->num_classes, 0, "CLASS X EXPERT",
                           "class_expert.png", "P(EXPERT | CLASS) X E", class_label)))
        goto done;
    if ((st = position_figure(&a, &g, Xc))) goto done;
    if ((st = table_figure(&a, &g, Xc, g.c.by_step, g.c.S, 0, "STEP (0 = NOISE) X EXPERT",
                           "step_expert.png", "P(EXPERT | STEP) X E", step_label)))
        goto done;
    /* rows: expert at layer l, columns: expert at l+1; the [Lm-1, X, X] counts are contiguous */
    if (g.an && a.affinity && s->layers > 1 &&
        (st = table_figure(&a, &g, Xc, dm_route_affinity_counts(g.an, 0), g.c.X, 1,
                           "AFFINITY: EXPERT AT L (ROWS) X AT L+1", "affinity.png",
                           "P(EXPERT AT L+1 | EXPERT AT L) X E", step_label)))
        goto done;
    st = overlay_figure(&a, &g);
done:
    dm_route_counts_free(&g.c);
    dm_route_analysis_free(g.an);
    cJSON_Delete(g.head0);
    free(g.step_t);
    free(g.ov);
    return dm_cli_exit(PROG, st);
}

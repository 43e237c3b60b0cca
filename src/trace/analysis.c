/* Routing-dump analyses: affinity, set persistence, experts per token, co-activation
 * (trace/analysis.h). */
#include "trace/analysis.h"

#include <stdlib.h>
#include <string.h>

static void *zalloc(size_t n, size_t sz) { return calloc(n ? n : 1, sz); }

/* Each [Lm, S] table is refused beyond this many cells (32 MiB), so that a small dump cannot ask
 * for gigabytes (real models: 40 layers x 1000 steps = 40 k cells). */
#define STEP_MAX_CELLS (1ll << 22)

void dm_route_analysis_free(dm_route_analysis *a)
{
    if (!a) return;
    free(a->affinity);
    free(a->coact);
    free(a->mass);
    free(a->keep_set);
    free(a->keep_top1);
    free(a->compared);
    free(a->picks);
    free(a->tokens);
    free(a->prev_image);
    free(a->prev_unc);
    free(a->prev_ids);
    free(a);
}

dm_status dm_route_analysis_new(const dm_trace_shape *s, int count_uncond, dm_route_analysis **out)
{
    *out = NULL;
    dm_route_analysis *a = calloc(1, sizeof *a);
    if (!a) return dm_fail(DM_ERR_NOMEM, "routing analysis");
    a->shape = *s;
    a->X = s->uncond_expert >= 0 ? s->uncond_expert + 1 : s->num_experts;
    a->S = s->steps > 0 ? s->steps : 1;
    a->count_uncond = count_uncond ? 1 : 0;
    a->prev_batch = a->last_batch = -1;
    if (a->X > 64 || a->X < 1 || s->layers < 1 || s->layers > DM_TRACE_MAX_LAYERS ||
        (long long)s->layers * a->S > STEP_MAX_CELLS) {
        const int X = a->X, S = a->S;
        free(a);
        return dm_fail(DM_ERR_ARG, "routing analysis: %d layers x %d experts x %d steps (at most %d "
                       "x 64 experts, %lld layer-steps)", s->layers, X, S, DM_TRACE_MAX_LAYERS,
                       STEP_MAX_CELLS);
    }
    const size_t Lm = (size_t)s->layers, X = (size_t)a->X, S = (size_t)a->S;
    a->affinity = zalloc((Lm > 1 ? Lm - 1 : 0) * X * X, sizeof(int64_t));
    a->coact = zalloc(Lm * X * X, sizeof(int64_t));
    a->mass = zalloc(Lm * X, sizeof(double));
    a->keep_set = zalloc(Lm * S, sizeof(int64_t));
    a->keep_top1 = zalloc(Lm * S, sizeof(int64_t));
    a->compared = zalloc(Lm * S, sizeof(int64_t));
    a->picks = zalloc(Lm * S, sizeof(int64_t));
    a->tokens = zalloc(Lm * S, sizeof(int64_t));
    if (!a->affinity || !a->coact || !a->mass || !a->keep_set || !a->keep_top1 || !a->compared ||
        !a->picks || !a->tokens) {
        dm_route_analysis_free(a);
        return dm_fail(DM_ERR_NOMEM, "routing analysis");
    }
    *out = a;
    return DM_OK;
}

int dm_route_analysis_experts(const dm_route_analysis *a) { return a->X; }

const int64_t *dm_route_affinity_counts(const dm_route_analysis *a, int l)
{
    return a->affinity + (size_t)l * a->X * a->X;
}

const int64_t *dm_route_coact(const dm_route_analysis *a, int l)
{
    return a->coact + (size_t)l * a->X * a->X;
}

const double *dm_route_mass(const dm_route_analysis *a, int l) { return a->mass + (size_t)l * a->X; }

/* Grow the [Lm, S] tables to hold step `step`. */
static int grow_steps(dm_route_analysis *a, int step)
{
    if (step < a->S) return 0;
    const int Lm = a->shape.layers, S2 = step + 1 > 2 * a->S ? step + 1 : 2 * a->S;
    if ((long long)Lm * S2 > STEP_MAX_CELLS) return -2;
    int64_t **tabs[] = {&a->keep_set, &a->keep_top1, &a->compared, &a->picks, &a->tokens};
    for (size_t i = 0; i < sizeof tabs / sizeof *tabs; i++) {
        int64_t *n = zalloc((size_t)Lm * S2, sizeof(int64_t));
        if (!n) return -1;
        for (int l = 0; l < Lm; l++)
            memcpy(n + (size_t)l * S2, *tabs[i] + (size_t)l * a->S, (size_t)a->S * sizeof(int64_t));
        free(*tabs[i]);
        *tabs[i] = n;
    }
    a->S = S2;
    return 0;
}

static uint64_t set_of(const int32_t *ids, int k)
{
    uint64_t m = 0;
    for (int j = 0; j < k; j++)
        if (ids[j] >= 0) m |= 1ull << ids[j];
    return m;
}

dm_status dm_route_analysis_add(dm_route_analysis *a, const dm_trace_record *rec)
{
    const dm_trace_shape *s = &a->shape;
    const int Lm = s->layers, T = dm_trace_tokens(s), k = s->top_k, X = a->X, E = s->num_experts;
    if (rec->step < 0 || rec->step > (1 << 24) || (s->steps > 0 && rec->step >= s->steps))
        return dm_fail(DM_ERR_FORMAT, "routing analysis: record of step %d (steps %d)", rec->step, s->steps);
    const int g = grow_steps(a, rec->step);
    if (g == -2)
        return dm_fail(DM_ERR_FORMAT, "routing analysis: record of step %d: more than %lld "
                       "layer-steps", rec->step, STEP_MAX_CELLS);
    if (g) return dm_fail(DM_ERR_NOMEM, "routing analysis");
    const size_t RT = (size_t)rec->rows * T;
    a->records++;
    for (int r = 0; r < rec->rows; r++) {
        if (rec->uncond[r] != a->count_uncond) continue;
        a->rows++;
        for (int l = 0; l < Lm; l++)
            for (int t = 0; t < T; t++) {
                const int32_t *id = rec->ids + ((size_t)l * RT + (size_t)r * T + t) * k;
                const float *w = rec->weights ? rec->weights + ((size_t)l * RT + (size_t)r * T + t) * k : NULL;
                int64_t *co = a->coact + (size_t)l * X * X;
                a->tokens[(size_t)l * a->S + rec->step]++;
                for (int j = 0; j < k; j++) {
                    const int e = id[j];
                    if (e < 0) continue;
                    if (e >= X) return dm_fail(DM_ERR_FORMAT, "routing analysis: expert id %d", e);
                    if (e < E) a->picks[(size_t)l * a->S + rec->step]++;
                    if (w) a->mass[(size_t)l * X + e] += w[j];
                    for (int i = 0; i < k; i++)
                        if (id[i] >= 0 && (i == j || id[i] != e)) co[(size_t)e * X + id[i]]++;
                    if (l + 1 < Lm) {
                        const int32_t *nx = rec->ids + ((size_t)(l + 1) * RT + (size_t)r * T + t) * k;
                        int64_t *af = a->affinity + (size_t)l * X * X + (size_t)e * X;
                        for (int i = 0; i < k; i++)
                            if (nx[i] >= 0 && nx[i] < X) af[nx[i]]++;
                    }
                }
            }
    }
    /* (b) persistence: the first evaluation of each step against the previous step's */
    const int first_of_step = rec->batch != a->last_batch || rec->step != a->last_step;
    a->last_batch = rec->batch;
    a->last_step = rec->step;
    if (!first_of_step) return DM_OK;
    if (a->prev_batch == rec->batch && a->prev_step == rec->step - 1) {
        for (int r = 0; r < rec->rows; r++) {
            if (rec->uncond[r] != a->count_uncond) continue;
            int q = -1;
            for (int i = 0; i < a->prev_rows; i++) {
                const int c = (r + i) % a->prev_rows; /* same position first */
                if (a->prev_image[c] == rec->image[r] && a->prev_unc[c] == rec->uncond[r] &&
                    (rec->image[r] >= 0 || c == r)) {
                    q = c;
                    break;
                }
            }
            if (q < 0) continue;
            for (int l = 0; l < Lm; l++)
                for (int t = 0; t < T; t++) {
                    const int32_t *now = rec->ids + ((size_t)l * RT + (size_t)r * T + t) * k;
                    const int32_t *then = a->prev_ids + (((size_t)l * a->prev_cap + q) * T + t) * k;
                    const size_t cell = (size_t)l * a->S + rec->step;
                    a->compared[cell]++;
                    a->keep_set[cell] += set_of(now, k) == set_of(then, k);
                    a->keep_top1[cell] += now[0] == then[0];
                }
        }
    }
    if (rec->rows > a->prev_cap) {
        free(a->prev_image), free(a->prev_unc), free(a->prev_ids);
        a->prev_cap = rec->rows;
        a->prev_image = malloc((size_t)a->prev_cap * sizeof(int64_t));
        a->prev_unc = malloc((size_t)a->prev_cap);
        a->prev_ids = malloc((size_t)Lm * a->prev_cap * T * k * sizeof(int32_t));
        if (!a->prev_image || !a->prev_unc || !a->prev_ids) {
            a->prev_cap = 0;
            return dm_fail(DM_ERR_NOMEM, "routing analysis");
        }
    }
    if (rec->rows > 0) { /* a record of no rows may carry NULL arrays (no NULL + 0, no memcpy) */
        memcpy(a->prev_image, rec->image, (size_t)rec->rows * sizeof(int64_t));
        memcpy(a->prev_unc, rec->uncond, (size_t)rec->rows);
        for (int l = 0; l < Lm; l++)
            memcpy(a->prev_ids + (size_t)l * a->prev_cap * T * k, rec->ids + (size_t)l * RT * k,
                   RT * k * sizeof(int32_t));
    }
    a->prev_rows = rec->rows;
    a->prev_batch = rec->batch;
    a->prev_step = rec->step;
    return DM_OK;
}

void dm_route_affinity_prob(const dm_route_analysis *a, int l, double *p)
{
    const int X = a->X;
    const int64_t *af = a->affinity + (size_t)l * X * X;
    for (int e = 0; e < X; e++) {
        int64_t sum = 0;
        for (int f = 0; f < X; f++) sum += af[(size_t)e * X + f];
        for (int f = 0; f < X; f++) p[(size_t)e * X + f] = sum ? (double)af[(size_t)e * X + f] / sum : 0.0;
    }
}

int64_t dm_route_persist_band(const dm_route_analysis *a, int l, int s0, int s1, int64_t *keep_set,
                              int64_t *keep_top1)
{
    int64_t ks = 0, k1 = 0, n = 0;
    for (int ll = l < 0 ? 0 : l; ll < (l < 0 ? a->shape.layers : l + 1); ll++)
        for (int s = s0 < 0 ? 0 : s0; s <= s1 && s < a->S; s++) {
            const size_t c = (size_t)ll * a->S + s;
            ks += a->keep_set[c], k1 += a->keep_top1[c], n += a->compared[c];
        }
    if (keep_set) *keep_set = ks;
    if (keep_top1) *keep_top1 = k1;
    return n;
}

double dm_route_mean_experts(const dm_route_analysis *a, int l, int s0, int s1)
{
    int64_t p = 0, t = 0;
    for (int ll = l < 0 ? 0 : l; ll < (l < 0 ? a->shape.layers : l + 1); ll++)
        for (int s = s0 < 0 ? 0 : s0; s <= s1 && s < a->S; s++) {
            p += a->picks[(size_t)ll * a->S + s];
            t += a->tokens[(size_t)ll * a->S + s];
        }
    return t ? (double)p / t : 0.0;
}

/* Steps actually seen (the last step with tokens + 1). */
static int steps_seen(const dm_route_analysis *a)
{
    int S = 0;
    for (int l = 0; l < a->shape.layers; l++)
        for (int s = 0; s < a->S; s++)
            if (a->tokens[(size_t)l * a->S + s] && s + 1 > S) S = s + 1;
    return S;
}

dm_status dm_route_analysis_write_json(const dm_route_analysis *a, int bands, FILE *f)
{
    const int Lm = a->shape.layers, X = a->X, S = steps_seen(a);
    if (bands < 1) bands = 1;
    double *p = malloc((size_t)X * X * sizeof(double));
    if (!p) return dm_fail(DM_ERR_NOMEM, "routing analysis");
    fprintf(f, "{\"layers\": %d, \"experts\": %d, \"steps\": %d, \"counted\": \"%s\", \"rows\": %lld,\n",
            Lm, X, S, a->count_uncond ? "uncond" : "cond", (long long)a->rows);
    fprintf(f, " \"moe_layers\": [");
    for (int l = 0; l < Lm; l++) fprintf(f, "%s%d", l ? ", " : "", a->shape.moe_layers[l]);
    fprintf(f, "],\n \"affinity\": [");
    for (int l = 0; l + 1 < Lm; l++) {
        dm_route_affinity_prob(a, l, p);
        fprintf(f, "%s\n  [", l ? "," : "");
        for (int e = 0; e < X; e++) {
            fprintf(f, "%s[", e ? ", " : "");
            for (int g = 0; g < X; g++) fprintf(f, "%s%.4f", g ? ", " : "", p[(size_t)e * X + g]);
            fprintf(f, "]");
        }
        fprintf(f, "]");
    }
    fprintf(f, "],\n \"persistence_bands\": [");
    for (int b = 0; b < bands && S > 1; b++) {
        /* steps 1..S-1 (transitions s-1 -> s) in `bands` equal parts */
        const int s0 = 1 + (int)((long long)(S - 1) * b / bands), s1 = (int)((long long)(S - 1) * (b + 1) / bands);
        fprintf(f, "%s\n  {\"steps\": [%d, %d], \"set_kept\": [", b ? "," : "", s0, s1);
        for (int l = 0; l < Lm; l++) {
            int64_t ks, k1, n = dm_route_persist_band(a, l, s0, s1, &ks, &k1);
            fprintf(f, "%s%.4f", l ? ", " : "", n ? (double)ks / n : 0.0);
        }
        fprintf(f, "], \"top1_kept\": [");
        for (int l = 0; l < Lm; l++) {
            int64_t ks, k1, n = dm_route_persist_band(a, l, s0, s1, &ks, &k1);
            fprintf(f, "%s%.4f", l ? ", " : "", n ? (double)k1 / n : 0.0);
        }
        fprintf(f, "], \"mean_experts\": [");
        for (int l = 0; l < Lm; l++) fprintf(f, "%s%.4f", l ? ", " : "", dm_route_mean_experts(a, l, s0, s1));
        fprintf(f, "]}");
    }
    fprintf(f, "],\n \"set_kept_by_step\": [");
    for (int l = 0; l < Lm; l++) {
        fprintf(f, "%s\n  [", l ? "," : "");
        for (int s = 1; s < S; s++) {
            int64_t ks, n = dm_route_persist_band(a, l, s, s, &ks, NULL);
            fprintf(f, "%s%.4f", s > 1 ? ", " : "", n ? (double)ks / n : 0.0);
        }
        fprintf(f, "]");
    }
    fprintf(f, "],\n \"mean_experts_by_step\": [");
    for (int l = 0; l < Lm; l++) {
        fprintf(f, "%s\n  [", l ? "," : "");
        for (int s = 0; s < S; s++) fprintf(f, "%s%.4f", s ? ", " : "", dm_route_mean_experts(a, l, s, s));
        fprintf(f, "]");
    }
    fprintf(f, "],\n \"coactivation\": [");
    for (int l = 0; l < Lm; l++) {
        fprintf(f, "%s\n  [", l ? "," : "");
        for (int e = 0; e < X; e++) {
            fprintf(f, "%s[", e ? ", " : "");
            for (int g = 0; g < X; g++)
                fprintf(f, "%s%lld", g ? ", " : "", (long long)a->coact[((size_t)l * X + e) * X + g]);
            fprintf(f, "]");
        }
        fprintf(f, "]");
    }
    fprintf(f, "],\n \"mass\": [");
    for (int l = 0; l < Lm; l++) {
        fprintf(f, "%s[", l ? ", " : "");
        for (int e = 0; e < X; e++) fprintf(f, "%s%.2f", e ? ", " : "", a->mass[(size_t)l * X + e]);
        fprintf(f, "]");
    }
    fprintf(f, "]}\n");
    free(p);
    return ferror(f) ? dm_fail(DM_ERR_WRITE, "routing analysis: write failed") : DM_OK;
}

dm_status dm_route_analysis_json(const dm_route_analysis *a, int bands, char **json)
{
    char *buf = NULL;
    size_t len = 0;
    *json = NULL;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return dm_fail(DM_ERR_NOMEM, "routing analysis");
    dm_status st = dm_route_analysis_write_json(a, bands, f);
    if (fclose(f) && !st) st = dm_fail(DM_ERR_NOMEM, "routing analysis");
    if (st) {
        free(buf);
        return st;
    }
    *json = buf;
    return DM_OK;
}

/* Aggregation of routing records into the DiT-MoE paper's count tables (ditmoe.md §7):
 * class x expert, token position x expert, step x expert (and step x position x expert), every
 * pick of the counted half (conditional by default) counted once, gate weights ignored. */
#include "ditmoe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define STEP_POS_MAX_CELLS (1ll << 24) /* 128 MB of counts */
/* Each of by_class, by_pos, by_step is refused beyond this many cells (128 MiB), before
 * anything is allocated: a small dump must not be able to ask for gigabytes. Real models stay
 * far below (ImageNet-21k: 28 layers x 21843 classes x 17 experts = 10.4 M cells). */
#define TABLE_MAX_CELLS (1ll << 24)

static int64_t *zeros(size_t n) { return calloc(n ? n : 1, sizeof(int64_t)); }

/* Re-lay [Lm, S, inner] tables for a larger S. */
static int64_t *grow_steps(int64_t *old, int Lm, int S_old, int S_new, size_t inner)
{
    int64_t *nt = zeros((size_t)Lm * S_new * inner);
    if (!nt) return NULL;
    for (int l = 0; old && l < Lm; l++)
        memcpy(nt + (size_t)l * S_new * inner, old + (size_t)l * S_old * inner,
               (size_t)S_old * inner * sizeof(int64_t));
    free(old);
    return nt;
}

dm_status dm_route_counts_init(dm_route_counts *c, const dm_trace_shape *s, int count_uncond)
{
    memset(c, 0, sizeof *c);
    const long long X_ = s->uncond_expert >= 0 ? (long long)s->uncond_expert + 1 : s->num_experts;
    const long long T_ = (long long)s->grid_h * s->grid_w;
    if (s->layers < 1 || s->layers > DM_TRACE_MAX_LAYERS || s->grid_h < 1 || s->grid_w < 1 ||
        T_ > (1 << 20) || s->top_k < 1 || X_ < 1 || X_ > 65535 || s->num_classes < 1 ||
        s->num_classes > DM_MAX_CLASSES || s->steps < 0 || s->steps > DM_SAMPLE_MAX_STEPS)
        return dm_fail(DM_ERR_FORMAT, "routing counts: shape out of range (layers %d, grid %dx%d, "
                       "k %d, experts %lld, classes %d, steps %d)", s->layers, s->grid_h,
                       s->grid_w, s->top_k, X_, s->num_classes, s->steps);
    const struct {
        const char *what;
        long long n;
    } tab[3] = {{"classes", s->num_classes}, {"tokens", T_}, {"steps", s->steps > 0 ? s->steps : 1}};
    for (int i = 0; i < 3; i++)
        if (s->layers * tab[i].n * X_ > TABLE_MAX_CELLS)
            return dm_fail(DM_ERR_FORMAT, "routing counts: %d layers x %lld %s x %lld experts is "
                           "more than %lld table cells (shape.num_classes, shape.grid or "
                           "shape.steps too large for a real model)", s->layers, tab[i].n,
                           tab[i].what, X_, TABLE_MAX_CELLS);
    c->shape = *s;
    c->X = (int)X_;
    c->S = s->steps > 0 ? s->steps : 0;
    c->count_uncond = count_uncond ? 1 : 0;
    const size_t Lm = (size_t)s->layers, T = (size_t)dm_trace_tokens(s), X = (size_t)c->X;
    c->by_class = zeros(Lm * s->num_classes * X);
    c->by_pos = zeros(Lm * T * X);
    c->by_step = zeros(Lm * c->S * X);
    if ((long long)Lm * (c->S ? c->S : 1) * T * X <= STEP_POS_MAX_CELLS)
        c->by_step_pos = zeros(Lm * c->S * T * X);
    if (!c->by_class || !c->by_pos || !c->by_step ||
        (!c->by_step_pos && (long long)Lm * (c->S ? c->S : 1) * T * X <= STEP_POS_MAX_CELLS)) {
        dm_route_counts_free(c);
        return dm_fail(DM_ERR_NOMEM, "out of memory for routing counts");
    }
    return DM_OK;
}

dm_status dm_route_counts_add(dm_route_counts *c, const dm_trace_record *rec)
{
    const dm_trace_shape *s = &c->shape;
    const int Lm = s->layers, T = dm_trace_tokens(s), k = s->top_k, X = c->X;
    if (rec->step < 0 || (s->steps > 0 && rec->step >= s->steps) || rec->step >= DM_SAMPLE_MAX_STEPS)
        return dm_fail(DM_ERR_FORMAT, "record of step %d outside [0,%d)", rec->step,
                       s->steps > 0 ? s->steps : DM_SAMPLE_MAX_STEPS);
    if (rec->step >= c->S) { /* unknown step count: grow */
        int S_new = rec->step + 1 > 2 * c->S ? rec->step + 1 : 2 * c->S;
        if (S_new > DM_SAMPLE_MAX_STEPS) S_new = DM_SAMPLE_MAX_STEPS;
        if ((long long)Lm * S_new * X > TABLE_MAX_CELLS)
            return dm_fail(DM_ERR_FORMAT, "record of step %d: layers x steps x experts (%d x %d x "
                           "%d) is more than %lld table cells", rec->step, Lm, S_new, X,
                           TABLE_MAX_CELLS);
        const size_t TX = (size_t)T * X;
        int64_t *bs = grow_steps(c->by_step, Lm, c->S, S_new, (size_t)X);
        if (!bs) return dm_fail(DM_ERR_NOMEM, "out of memory for routing counts");
        c->by_step = bs;
        if (c->by_step_pos && (long long)Lm * S_new * TX <= STEP_POS_MAX_CELLS) {
            int64_t *bp = grow_steps(c->by_step_pos, Lm, c->S, S_new, TX);
            if (!bp) return dm_fail(DM_ERR_NOMEM, "out of memory for routing counts");
            c->by_step_pos = bp;
        } else {
            free(c->by_step_pos);
            c->by_step_pos = NULL;
        }
        c->S = S_new;
    }
    const size_t RT = (size_t)rec->rows * T;
    for (int r = 0; r < rec->rows; r++) {
        if (rec->uncond[r] != c->count_uncond) {
            c->skipped_rows++;
            continue;
        }
        const int64_t cls = rec->cls[r];
        if (cls < 0 || cls >= s->num_classes)
            return dm_fail(DM_ERR_FORMAT, "class %lld outside [0,%d)", (long long)cls,
                           s->num_classes);
        c->rows++;
        c->tokens += T;
        for (int l = 0; l < Lm; l++) {
            const int32_t *ids = rec->ids + ((size_t)l * RT + (size_t)r * T) * k;
            int64_t *bc = c->by_class + ((size_t)l * s->num_classes + cls) * X;
            int64_t *bs = c->by_step + ((size_t)l * c->S + rec->step) * X;
            int64_t *bp = c->by_pos + (size_t)l * T * X;
            int64_t *bsp = c->by_step_pos ? c->by_step_pos + ((size_t)l * c->S + rec->step) * T * X
                                          : NULL;
            for (int j = 0; j < T; j++)
                for (int q = 0; q < k; q++) {
                    const int32_t e = ids[(size_t)j * k + q];
                    if (e < 0) {
                        c->none++;
                        continue;
                    }
                    if (e >= X) return dm_fail(DM_ERR_FORMAT, "expert id %d outside [0,%d)", e, X);
                    bc[e]++;
                    bs[e]++;
                    bp[(size_t)j * X + e]++;
                    if (bsp) bsp[(size_t)j * X + e]++;
                    c->picks++;
                }
        }
    }
    return DM_OK;
}

void dm_route_counts_free(dm_route_counts *c)
{
    free(c->by_class);
    free(c->by_pos);
    free(c->by_step);
    free(c->by_step_pos);
    memset(c, 0, sizeof *c);
}

void dm_route_table_info(const int64_t *tab, int nA, int X, double *mi_bits, double *h_bits)
{
    double total = 0;
    double *pe = calloc((size_t)X, sizeof(double));
    if (!pe) {
        if (mi_bits) *mi_bits = NAN;
        if (h_bits) *h_bits = NAN;
        return;
    }
    for (int a = 0; a < nA; a++)
        for (int e = 0; e < X; e++) {
            pe[e] += (double)tab[(size_t)a * X + e];
            total += (double)tab[(size_t)a * X + e];
        }
    double h = 0, mi = 0;
    if (total > 0) {
        for (int e = 0; e < X; e++)
            if (pe[e] > 0) h -= pe[e] / total * log2(pe[e] / total);
        for (int a = 0; a < nA; a++) {
            double pa = 0;
            for (int e = 0; e < X; e++) pa += (double)tab[(size_t)a * X + e];
            for (int e = 0; e < X; e++) {
                const double n = (double)tab[(size_t)a * X + e];
                if (n > 0) mi += n / total * log2(n * total / (pa * pe[e]));
            }
        }
    }
    free(pe);
    if (mi_bits) *mi_bits = mi < 0 ? 0 : mi;
    if (h_bits) *h_bits = h;
}

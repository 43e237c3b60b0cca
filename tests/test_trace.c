/* Routing dumps (src/trace): hand-made routes written with the C writer, read back and
 * aggregated. Every count is checked against a naive recount of the hand-made arrays done here;
 * gate weights against float16 rounding (relative 2^-11); truncated and corrupted files must
 * give an error, never a crash (run under ASan as well). */
#include "ditmoe.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

/* A synthetic run kept in memory: per record, everything the writer was given. */
#define NREC_MAX 64
typedef struct {
    dm_trace_shape s;
    int nrec;
    int batch[NREC_MAX], eval[NREC_MAX], rows[NREC_MAX], B[NREC_MAX];
    int64_t *y[NREC_MAX];    /* [R] labels */
    int64_t *cls[NREC_MAX];  /* [R] image class */
    int64_t *img[NREC_MAX];  /* [R] image index */
    float *t[NREC_MAX];      /* [R] */
    int32_t *ids[NREC_MAX];  /* [Lm, R*T, k] */
    float *w[NREC_MAX];      /* [Lm, R*T, k] */
    uint8_t *fl[NREC_MAX];   /* [Lm, R*T] or NULL */
} synth_t;

static void synth_free(synth_t *q)
{
    for (int i = 0; i < q->nrec; i++) {
        free(q->y[i]);
        free(q->cls[i]);
        free(q->img[i]);
        free(q->t[i]);
        free(q->ids[i]);
        free(q->w[i]);
        free(q->fl[i]);
    }
}

static void base_shape(dm_trace_shape *s)
{
    memset(s, 0, sizeof *s);
    s->layers = 3;
    for (int l = 0; l < 3; l++) s->moe_layers[l] = l;
    s->grid_h = 2;
    s->grid_w = 3;
    s->top_k = 2;
    s->num_experts = 5;
    s->uncond_expert = -1;
    s->num_classes = 4;
    s->steps = 4;
    s->heun = 0;
    s->weights = 1;
}

/* Two batches (3 then 2 images); evals 0..2 guided (2B rows), eval 3 unguided (B rows).
 * promoe: unconditional rows all go to expert E with flags; some conditional slots are -1. */
static void make_synth(synth_t *q, const char *path, int promoe)
{
    memset(q, 0, sizeof *q);
    base_shape(&q->s);
    if (promoe) {
        q->s.uncond_expert = q->s.num_experts;
        q->s.top_k = 1;
    }
    dm_trace_shape *s = &q->s;
    const int T = s->grid_h * s->grid_w, k = s->top_k, Lm = s->layers;
    dm_trace *tr = NULL;
    ck_assert_int_eq(dm_trace_open(path, s, NULL, "synthetic", NULL, &tr), DM_OK);
    ck_assert_int_eq(dm_trace_note(tr, "images", "img-%03d.png"), DM_OK);
    uint32_t seed = promoe ? 99 : 7;
    const int Bs[2] = {3, 2};
    int next_index = 10;
    for (int b = 0; b < 2; b++) {
        const int B = Bs[b];
        int64_t y[3];
        uint64_t index[3];
        for (int i = 0; i < B; i++) {
            y[i] = (int64_t)(lcg(&seed) % (uint32_t)s->num_classes);
            index[i] = (uint64_t)next_index++;
        }
        ck_assert_int_eq(dm_trace_batch(tr, B, y, index), DM_OK);
        for (int e = 0; e < 4; e++) {
            const int guided = e < 3, R = guided ? 2 * B : B, i = q->nrec++;
            ck_assert_int_lt(i, NREC_MAX);
            q->batch[i] = b;
            q->eval[i] = e;
            q->rows[i] = R;
            q->B[i] = B;
            q->y[i] = malloc(R * sizeof(int64_t));
            q->cls[i] = malloc(R * sizeof(int64_t));
            q->img[i] = malloc(R * sizeof(int64_t));
            q->t[i] = malloc(R * sizeof(float));
            const size_t n = (size_t)Lm * R * T * k;
            q->ids[i] = malloc(n * sizeof(int32_t));
            q->w[i] = malloc(n * sizeof(float));
            q->fl[i] = promoe ? calloc((size_t)Lm * R * T, 1) : NULL;
            for (int r = 0; r < R; r++) {
                q->cls[i][r] = y[r % B];
                q->y[i][r] = r < B ? y[r] : s->num_classes;
                q->img[i][r] = (int64_t)index[r % B];
                q->t[i][r] = 1.0f - 0.25f * (float)e + 1e-3f * (float)r;
            }
            for (int l = 0; l < Lm; l++)
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < T; j++) {
                        const size_t at = (((size_t)l * R + r) * T + j) * k;
                        if (promoe && r >= B) {
                            q->ids[i][at] = s->uncond_expert;
                            q->w[i][at] = 1.0f;
                            q->fl[i][at] = DM_TRACE_TOK_UNCOND;
                            continue;
                        }
                        int a = (int)(lcg(&seed) % (uint32_t)s->num_experts);
                        int c = (a + 1 + (int)(lcg(&seed) % (uint32_t)(s->num_experts - 1))) %
                                s->num_experts;
                        float wa = 0.2f + (float)(lcg(&seed) % 1000) / 1500.0f;
                        q->ids[i][at] = a;
                        q->w[i][at] = wa;
                        if (k > 1) {
                            q->ids[i][at + 1] = c;
                            q->w[i][at + 1] = wa * 0.5f;
                        }
                        if (promoe && lcg(&seed) % 5 == 0) { /* expert-choice drop */
                            q->ids[i][at] = -1;
                            q->w[i][at] = 0.0f;
                            q->fl[i][(size_t)(l * R + r) * T + j] = DM_TRACE_TOK_DROPPED;
                        }
                    }
            ck_assert_int_eq(dm_trace_write(tr, R, q->t[i], q->y[i], q->ids[i], q->w[i], q->fl[i]),
                             DM_OK);
        }
    }
    ck_assert_int_eq(dm_trace_close(tr), DM_OK);
    ck_assert_int_ne(access(path, F_OK), -1);
}

static char *tmp_path(const char *name)
{
    static char buf[4][512];
    static int at;
    char *p = buf[at++ % 4];
    snprintf(p, 512, "%s/ditmoe-test-trace-%ld-%s", P_tmpdir, (long)getpid(), name);
    return p;
}

START_TEST(test_roundtrip)
{
    for (int promoe = 0; promoe < 2; promoe++) {
        const char *path = tmp_path(promoe ? "rt-promoe.dmr" : "rt.dmr");
        synth_t q;
        make_synth(&q, path, promoe);
        dm_trace_reader *r = NULL;
        ck_assert_msg(dm_trace_read_open(path, &r) == DM_OK, "%s", dm_last_error());
        const dm_trace_shape *s = dm_trace_read_shape(r);
        ck_assert_int_eq(s->layers, q.s.layers);
        ck_assert_int_eq(s->grid_h, 2);
        ck_assert_int_eq(s->grid_w, 3);
        ck_assert_int_eq(s->top_k, q.s.top_k);
        ck_assert_int_eq(s->num_experts, 5);
        ck_assert_int_eq(s->uncond_expert, promoe ? 5 : -1);
        ck_assert_int_eq(s->steps, 4);
        ck_assert_int_eq(dm_trace_read_count(r), q.nrec);
        ck_assert_ptr_nonnull(strstr(dm_trace_read_header(r), "\"images\":\"img-%03d.png\""));
        const int T = 6, k = q.s.top_k, Lm = 3;
        for (int i = 0;; i++) {
            const dm_trace_record *rec;
            ck_assert_msg(dm_trace_read_next(r, &rec) == DM_OK, "%s", dm_last_error());
            if (!rec) {
                ck_assert_int_eq(i, q.nrec);
                break;
            }
            ck_assert_int_lt(i, q.nrec);
            ck_assert_int_eq(rec->batch, q.batch[i]);
            ck_assert_int_eq(rec->eval, q.eval[i]);
            ck_assert_int_eq(rec->step, q.eval[i]); /* not heun: step = eval */
            ck_assert_int_eq(rec->rows, q.rows[i]);
            for (int row = 0; row < rec->rows; row++) {
                ck_assert_int_eq(rec->image[row], q.img[i][row]);
                ck_assert_int_eq(rec->label[row], q.y[i][row]);
                ck_assert_int_eq(rec->cls[row], q.cls[i][row]);
                ck_assert_int_eq(rec->uncond[row], row >= q.B[i]);
                ck_assert(memcmp(&rec->t[row], &q.t[i][row], 4) == 0);
            }
            const size_t n = (size_t)Lm * rec->rows * T * k;
            ck_assert_ptr_nonnull(rec->weights);
            for (size_t j = 0; j < n; j++) {
                ck_assert_int_eq(rec->ids[j], q.ids[i][j]);
                const float w = q.w[i][j];
                ck_assert_msg(fabsf(rec->weights[j] - w) <= ldexpf(fabsf(w), -11),
                              "weight %zu: %g vs %g", j, (double)rec->weights[j], (double)w);
            }
            if (promoe) {
                ck_assert_ptr_nonnull(rec->token_flags);
                ck_assert(memcmp(rec->token_flags, q.fl[i], (size_t)Lm * rec->rows * T) == 0);
            } else {
                ck_assert_ptr_null(rec->token_flags);
            }
        }
        dm_trace_read_close(r);
        synth_free(&q);
        unlink(path);
    }
}
END_TEST

/* Naive recount of the hand-made arrays, then compare every cell of every table. */
static void check_counts(const synth_t *q, const char *path, int count_uncond)
{
    const dm_trace_shape *s = &q->s;
    const int Lm = s->layers, T = 6, k = s->top_k, C = s->num_classes, S = s->steps;
    const int X = s->uncond_expert >= 0 ? s->uncond_expert + 1 : s->num_experts;
    int64_t *cc = calloc((size_t)Lm * C * X, 8), *pc = calloc((size_t)Lm * T * X, 8);
    int64_t *sc = calloc((size_t)Lm * S * X, 8), *spc = calloc((size_t)Lm * S * T * X, 8);
    int64_t picks = 0, none = 0, rows = 0;
    for (int i = 0; i < q->nrec; i++)
        for (int r = 0; r < q->rows[i]; r++) {
            if ((r >= q->B[i]) != count_uncond) continue;
            rows++;
            for (int l = 0; l < Lm; l++)
                for (int j = 0; j < T; j++)
                    for (int z = 0; z < k; z++) {
                        int e = q->ids[i][(((size_t)l * q->rows[i] + r) * T + j) * k + z];
                        if (e < 0) {
                            none++;
                            continue;
                        }
                        picks++;
                        cc[((size_t)l * C + q->cls[i][r]) * X + e]++;
                        pc[((size_t)l * T + j) * X + e]++;
                        sc[((size_t)l * S + q->eval[i]) * X + e]++;
                        spc[(((size_t)l * S + q->eval[i]) * T + j) * X + e]++;
                    }
        }
    dm_trace_reader *r = NULL;
    ck_assert_int_eq(dm_trace_read_open(path, &r), DM_OK);
    dm_route_counts c;
    ck_assert_int_eq(dm_route_counts_init(&c, dm_trace_read_shape(r), count_uncond), DM_OK);
    ck_assert_int_eq(c.X, X);
    ck_assert_int_eq(c.S, S);
    for (;;) {
        const dm_trace_record *rec;
        ck_assert_int_eq(dm_trace_read_next(r, &rec), DM_OK);
        if (!rec) break;
        ck_assert_int_eq(dm_route_counts_add(&c, rec), DM_OK);
    }
    ck_assert_int_eq(c.rows, rows);
    ck_assert_int_eq(c.picks, picks);
    ck_assert_int_eq(c.none, none);
    ck_assert_int_eq(c.tokens, rows * T);
    for (size_t i = 0; i < (size_t)Lm * C * X; i++) ck_assert_int_eq(c.by_class[i], cc[i]);
    for (size_t i = 0; i < (size_t)Lm * T * X; i++) ck_assert_int_eq(c.by_pos[i], pc[i]);
    for (size_t i = 0; i < (size_t)Lm * S * X; i++) ck_assert_int_eq(c.by_step[i], sc[i]);
    ck_assert_ptr_nonnull(c.by_step_pos);
    for (size_t i = 0; i < (size_t)Lm * S * T * X; i++) ck_assert_int_eq(c.by_step_pos[i], spc[i]);
    /* consistency: every table sums to the picks, per layer */
    for (int l = 0; l < Lm; l++) {
        int64_t a = 0, b = 0, d = 0;
        for (int i = 0; i < C * X; i++) a += c.by_class[(size_t)l * C * X + i];
        for (int i = 0; i < T * X; i++) b += c.by_pos[(size_t)l * T * X + i];
        for (int i = 0; i < S * X; i++) d += c.by_step[(size_t)l * S * X + i];
        ck_assert_int_eq(a, b);
        ck_assert_int_eq(a, d);
    }
    dm_route_counts_free(&c);
    dm_trace_read_close(r);
    free(cc);
    free(pc);
    free(sc);
    free(spc);
}

START_TEST(test_counts_exact)
{
    for (int promoe = 0; promoe < 2; promoe++) {
        const char *path = tmp_path("counts.dmr");
        synth_t q;
        make_synth(&q, path, promoe);
        check_counts(&q, path, 0);
        check_counts(&q, path, 1);
        synth_free(&q);
        unlink(path);
    }
}
END_TEST

/* A case small enough to count by hand: one image of class 2, one unguided eval, T = 6, k = 2,
 * layer 0: every token picks (1, 3); layer 1: token j picks (j % 5, (j + 1) % 5). */
START_TEST(test_counts_by_hand)
{
    const char *path = tmp_path("hand.dmr");
    dm_trace_shape s;
    base_shape(&s);
    s.layers = 2;
    s.steps = 2;
    dm_trace *tr;
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, NULL, NULL, &tr), DM_OK);
    int64_t y = 2;
    uint64_t idx = 5;
    ck_assert_int_eq(dm_trace_batch(tr, 1, &y, &idx), DM_OK);
    int32_t ids[2 * 6 * 2];
    for (int j = 0; j < 6; j++) {
        ids[j * 2] = 1;
        ids[j * 2 + 1] = 3;
        ids[12 + j * 2] = j % 5;
        ids[12 + j * 2 + 1] = (j + 1) % 5;
    }
    float t = 1.0f;
    ck_assert_int_eq(dm_trace_write(tr, 1, &t, &y, ids, NULL, NULL), DM_OK);
    t = 0.5f;
    ck_assert_int_eq(dm_trace_write(tr, 1, &t, &y, ids, NULL, NULL), DM_OK);
    ck_assert_int_eq(dm_trace_close(tr), DM_OK);
    dm_trace_reader *r;
    ck_assert_int_eq(dm_trace_read_open(path, &r), DM_OK);
    dm_route_counts c;
    ck_assert_int_eq(dm_route_counts_init(&c, dm_trace_read_shape(r), 0), DM_OK);
    const dm_trace_record *rec;
    while (dm_trace_read_next(r, &rec) == DM_OK && rec) {
        ck_assert_ptr_nonnull(rec->weights); /* stored, all zero: none were given */
        ck_assert(rec->weights[0] == 0.0f);
        ck_assert_int_eq(dm_route_counts_add(&c, rec), DM_OK);
    }
    /* layer 0, class 2: experts 1 and 3 each 6 tokens x 2 evals = 12 */
    const int64_t want0[5] = {0, 12, 0, 12, 0};
    /* layer 1: picks j%5 and (j+1)%5 for j = 0..5: {0,1},{1,2},{2,3},{3,4},{4,0},{0,1}
     * -> expert 0: 3, 1: 3, 2: 2, 3: 2, 4: 2, per eval; x2 */
    const int64_t want1[5] = {6, 6, 4, 4, 4};
    for (int e = 0; e < 5; e++) {
        ck_assert_int_eq(c.by_class[(0 * 4 + 2) * 5 + e], want0[e]);
        ck_assert_int_eq(c.by_class[(1 * 4 + 2) * 5 + e], want1[e]);
        ck_assert_int_eq(c.by_class[(0 * 4 + 1) * 5 + e], 0);
        ck_assert_int_eq(c.by_step[(1 * 2 + 1) * 5 + e], want1[e] / 2);
    }
    /* layer 1, position 4 picks {4, 0} in both evals */
    ck_assert_int_eq(c.by_pos[(1 * 6 + 4) * 5 + 4], 2);
    ck_assert_int_eq(c.by_pos[(1 * 6 + 4) * 5 + 0], 2);
    ck_assert_int_eq(c.by_pos[(1 * 6 + 4) * 5 + 1], 0);
    ck_assert_int_eq(c.picks, 2 * 2 * 6 * 2);
    dm_route_counts_free(&c);
    dm_trace_read_close(r);
    unlink(path);
}
END_TEST

START_TEST(test_heun_steps)
{
    dm_trace_shape s;
    base_shape(&s);
    s.steps = 3;
    s.heun = 1;
    const int want[5] = {0, 0, 1, 1, 2};
    for (int e = 0; e < 5; e++) ck_assert_int_eq(dm_trace_step_of_eval(&s, e), want[e]);
    s.heun = 0;
    for (int e = 0; e < 3; e++) ck_assert_int_eq(dm_trace_step_of_eval(&s, e), e);
}
END_TEST

START_TEST(test_table_info)
{
    const int64_t diag[4] = {10, 0, 0, 10}, flat[4] = {5, 5, 5, 5}, one[4] = {7, 0, 9, 0};
    double mi, h;
    dm_route_table_info(diag, 2, 2, &mi, &h);
    ck_assert(fabs(mi - 1.0) < 1e-12 && fabs(h - 1.0) < 1e-12);
    dm_route_table_info(flat, 2, 2, &mi, &h);
    ck_assert(fabs(mi) < 1e-12 && fabs(h - 1.0) < 1e-12);
    dm_route_table_info(one, 2, 2, &mi, &h);
    ck_assert(fabs(mi) < 1e-12 && fabs(h) < 1e-12);
}
END_TEST

START_TEST(test_writer_errors)
{
    const char *path = tmp_path("bad.dmr");
    dm_trace_shape s;
    base_shape(&s);
    dm_trace *tr;
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, NULL, NULL, &tr), DM_OK);
    int32_t ids[3 * 2 * 6 * 2] = {0};
    float t[2] = {1, 1};
    int64_t y[2] = {0, 4};
    uint64_t idx = 0;
    ck_assert_int_eq(dm_trace_write(tr, 1, t, y, ids, NULL, NULL), DM_ERR_ARG); /* no batch */
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "dm_trace_batch"));
    ck_assert_int_eq(dm_trace_batch(tr, 1, y, &idx), DM_OK);
    ids[5] = 5; /* E = 5: out of range */
    ck_assert_int_eq(dm_trace_write(tr, 2, t, y, ids, NULL, NULL), DM_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "expert id 5"));
    ids[5] = -2;
    ck_assert_int_eq(dm_trace_write(tr, 2, t, y, ids, NULL, NULL), DM_ERR_ARG);
    ids[5] = 0;
    y[1] = 5; /* label beyond the null class */
    ck_assert_int_eq(dm_trace_write(tr, 2, t, y, ids, NULL, NULL), DM_ERR_ARG);
    dm_trace_abort(tr);
    ck_assert_int_eq(access(path, F_OK), -1); /* nothing left behind */
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    ck_assert_int_eq(access(tmp, F_OK), -1);
    s.top_k = 0;
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, NULL, NULL, &tr), DM_ERR_ARG);
    base_shape(&s);
    s.uncond_expert = 2; /* must be >= E */
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, NULL, NULL, &tr), DM_ERR_ARG);
}
END_TEST

static uint8_t *slurp(const char *path, long *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    *n = ftell(f);
    rewind(f);
    uint8_t *b = malloc((size_t)*n);
    ck_assert_int_eq(fread(b, 1, (size_t)*n, f), (size_t)*n);
    fclose(f);
    return b;
}

static void spit(const char *path, const uint8_t *b, long n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
}

/* Read the whole dump; DM_OK only if every record read. */
static dm_status read_all(const char *path, long *nrec)
{
    dm_trace_reader *r = NULL;
    dm_status st = dm_trace_read_open(path, &r);
    *nrec = 0;
    if (st) return st;
    dm_route_counts c;
    st = dm_route_counts_init(&c, dm_trace_read_shape(r), 0);
    for (const dm_trace_record *rec = NULL; !st;) {
        st = dm_trace_read_next(r, &rec);
        if (st || !rec) break;
        st = dm_route_counts_add(&c, rec);
        (*nrec)++;
    }
    dm_route_counts_free(&c);
    dm_trace_read_close(r);
    return st;
}

START_TEST(test_truncated_and_corrupt)
{
    const char *path = tmp_path("good.dmr"), *bad = tmp_path("bad.dmr");
    synth_t q;
    make_synth(&q, path, 1);
    long n, nrec;
    uint8_t *b = slurp(path, &n);
    ck_assert_int_eq(read_all(path, &nrec), DM_OK);
    ck_assert_int_eq(nrec, q.nrec);
    /* every truncation fails with a message naming the file */
    for (long len = 0; len < n; len += (len < 64 ? 1 : 7)) {
        spit(bad, b, len);
        dm_status st = read_all(bad, &nrec);
        ck_assert_msg(st == DM_ERR_FORMAT, "truncated to %ld bytes: status %d", len, st);
        ck_assert_ptr_nonnull(strstr(dm_last_error(), bad));
    }
    /* an unfinished dump (offset still 0) */
    uint8_t *c = malloc((size_t)n);
    memcpy(c, b, (size_t)n);
    memset(c + 8, 0, 8);
    spit(bad, c, n);
    ck_assert_int_eq(read_all(bad, &nrec), DM_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(dm_last_error(), "unfinished"));
    /* records cut out, header moved to match: the record count no longer fits */
    const uint64_t off = (uint64_t)b[8] | (uint64_t)b[9] << 8 | (uint64_t)b[10] << 16;
    const long jlen = n - (long)off, cut = 100;
    memcpy(c, b, (size_t)n);
    memmove(c + off - cut, c + off, (size_t)jlen);
    const uint64_t noff = off - cut;
    for (int i = 0; i < 8; i++) c[8 + i] = (uint8_t)(noff >> (8 * i));
    spit(bad, c, n - cut);
    ck_assert_int_eq(read_all(bad, &nrec), DM_ERR_FORMAT);
    /* single-byte corruption anywhere: an error or a clean read, never a crash; corruption of
     * record heads and ids must be detected */
    int detected = 0, total = 0;
    for (long i = 0; i < n; i++) {
        memcpy(c, b, (size_t)n);
        c[i] ^= 0xA5;
        spit(bad, c, n);
        dm_status st = read_all(bad, &nrec);
        ck_assert(st == DM_OK || st == DM_ERR_FORMAT);
        total++;
        detected += st != DM_OK;
        if (i < 24 || (i >= 24 && i < 24 + 32)) /* file head and first record head */
            ck_assert_msg(st != DM_OK, "byte %ld not caught", i);
    }
    ck_assert_int_gt(detected, total / 4);
    /* a header that does not parse, a wrong format name */
    memcpy(c, b, (size_t)n);
    c[off] = 'x';
    spit(bad, c, n);
    ck_assert_int_eq(read_all(bad, &nrec), DM_ERR_FORMAT);
    ck_assert_int_eq(dm_trace_read_open("/nonexistent/dir/x.dmr", &(dm_trace_reader *){NULL}),
                     DM_ERR_IO);
    free(c);
    free(b);
    synth_free(&q);
    unlink(path);
    unlink(bad);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("trace");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_counts_exact);
    tcase_add_test(tc, test_counts_by_hand);
    tcase_add_test(tc, test_heun_steps);
    tcase_add_test(tc, test_table_info);
    tcase_add_test(tc, test_writer_errors);
    tcase_add_test(tc, test_truncated_and_corrupt);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* Routing-dump analyses (src/trace/analysis.c) on small synthetic dumps written with the C
 * writer and read back: persistence, experts per token and co-activation checked against
 * numbers worked out by hand in the comments; affinity against hand totals and a recount. */
#include "ditmoe.h"
#include "trace/analysis.h"

#include <check.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *tmp_path(const char *name)
{
    static char buf[256];
    snprintf(buf, sizeof buf, "/tmp/test_trace_analysis_%d_%s", (int)getpid(), name);
    return buf;
}

enum { T = 6, K = 2, E = 5, LM = 2 };

static void shape(dm_trace_shape *s, int steps, int heun)
{
    memset(s, 0, sizeof *s);
    s->layers = LM;
    s->moe_layers[0] = 0, s->moe_layers[1] = 1;
    s->grid_h = 2, s->grid_w = 3;
    s->top_k = K, s->num_experts = E, s->uncond_expert = -1, s->num_classes = 4;
    s->steps = steps, s->heun = heun, s->weights = 1;
}

/* Picks of (layer, step, token) for conditional rows:
 *  layer 0: always (1, 3)
 *  layer 1: step 0: (j%5, (j+1)%5); step 1: tokens 0-2 swapped ((j+1)%5, j%5), tokens 3-5
 *           (j%5, (j+2)%5); step 2: as step 1 but token 5 has one pick (0, -1).
 * Unconditional rows: (0, 4) everywhere (not counted by default). */
static void picks(int l, int s, int j, int unc, int32_t *p)
{
    if (unc) { p[0] = 0, p[1] = 4; return; }
    if (l == 0) { p[0] = 1, p[1] = 3; return; }
    if (s == 0 || j < 3) {
        p[0] = j % 5, p[1] = (j + 1) % 5;
        if (s > 0) { int x = p[0]; p[0] = p[1], p[1] = x; }
    } else {
        p[0] = j % 5, p[1] = (j + 2) % 5;
    }
    if (s == 2 && j == 5) p[1] = -1;
}

/* B = 2 images, guided (4 rows: cond 0, cond 1, uncond 0, uncond 1), steps 0..2. */
static void write_dump(const char *path)
{
    dm_trace_shape s;
    shape(&s, 3, 0);
    dm_trace *tr;
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, "synthetic", NULL, &tr), DM_OK);
    int64_t ycls[2] = {1, 2};
    uint64_t idx[2] = {10, 11};
    ck_assert_int_eq(dm_trace_batch(tr, 2, ycls, idx), DM_OK);
    const int R = 4;
    int32_t ids[LM * R * T * K];
    float w[LM * R * T * K];
    for (int st = 0; st < 3; st++) {
        int64_t y[4] = {1, 2, 4, 4};
        float t[4];
        for (int r = 0; r < R; r++) t[r] = 1.0f - st / 3.0f;
        for (int l = 0; l < LM; l++)
            for (int r = 0; r < R; r++)
                for (int j = 0; j < T; j++) {
                    int32_t *p = ids + ((l * R + r) * T + j) * K;
                    picks(l, st, j, r >= 2, p);
                    w[((l * R + r) * T + j) * K] = 0.5f;
                    w[((l * R + r) * T + j) * K + 1] = p[1] < 0 ? 0.0f : 0.25f;
                }
        ck_assert_int_eq(dm_trace_write(tr, R, t, y, ids, w, NULL), DM_OK);
    }
    ck_assert_int_eq(dm_trace_close(tr), DM_OK);
}

static dm_route_analysis *analyse(const char *path, int uncond)
{
    dm_trace_reader *r;
    dm_route_analysis *a;
    ck_assert_int_eq(dm_trace_read_open(path, &r), DM_OK);
    ck_assert_int_eq(dm_route_analysis_new(dm_trace_read_shape(r), uncond, &a), DM_OK);
    const dm_trace_record *rec;
    while (dm_trace_read_next(r, &rec) == DM_OK && rec) ck_assert_int_eq(dm_route_analysis_add(a, rec), DM_OK);
    dm_trace_read_close(r);
    return a;
}

START_TEST(test_by_hand)
{
    const char *path = tmp_path("hand.dmr");
    write_dump(path);
    dm_route_analysis *a = analyse(path, 0);
    ck_assert_int_eq(a->rows, 6); /* 2 conditional rows x 3 steps */
    int64_t ks, k1, n;
    /* layer 0: nothing changes; 12 tokens compared at each of steps 1, 2 */
    n = dm_route_persist_band(a, 0, 1, 2, &ks, &k1);
    ck_assert_int_eq(n, 24);
    ck_assert_int_eq(ks, 24);
    ck_assert_int_eq(k1, 24);
    /* layer 1, step 1: tokens 0-2 keep the set but not the top-1, 3-5 the reverse (x2 images) */
    n = dm_route_persist_band(a, 1, 1, 1, &ks, &k1);
    ck_assert_int_eq(n, 12);
    ck_assert_int_eq(ks, 6);
    ck_assert_int_eq(k1, 6);
    /* layer 1, step 2: token 5 lost its second pick */
    n = dm_route_persist_band(a, 1, 2, 2, &ks, &k1);
    ck_assert_int_eq(n, 12);
    ck_assert_int_eq(ks, 10);
    ck_assert_int_eq(k1, 12);
    ck_assert_int_eq(dm_route_persist_band(a, -1, 0, 0, &ks, &k1), 0); /* step 0: nothing before */
    /* experts per token */
    ck_assert(dm_route_mean_experts(a, 0, 0, 2) == 2.0);
    ck_assert(dm_route_mean_experts(a, 1, 2, 2) == 22.0 / 12.0);
    ck_assert(dm_route_mean_experts(a, 1, 0, 1) == 2.0);
    /* co-activation, layer 0: 36 tokens all pick {1, 3} */
    const int64_t *co0 = dm_route_coact(a, 0);
    ck_assert(co0 == a->coact && dm_route_analysis_experts(a) == E);
    ck_assert_int_eq(co0[1 * E + 3], 36);
    ck_assert_int_eq(co0[3 * E + 1], 36);
    ck_assert_int_eq(co0[1 * E + 1], 36);
    ck_assert_int_eq(co0[0 * E + 0], 0);
    /* layer 1, step 0: sets {0,1},{1,2},{2,3},{3,4},{4,0},{0,1}; step 1: {0,1},{1,2},{2,3},
     * {3,0},{4,1},{0,2}; step 2 as step 1 but token 5 = {0}: pair (0,1) (2+1+1) x 2 images */
    const int64_t *co1 = dm_route_coact(a, 1);
    ck_assert_int_eq(co1[0 * E + 1], 8);
    ck_assert_int_eq(co1[1 * E + 0], 8);
    ck_assert_int_eq(co1[0 * E + 0], 2 * (3 + 3 + 3)); /* tokens with expert 0, per step */
    /* mass: weights 0.5 (first) and 0.25 (second) */
    ck_assert(dm_route_mass(a, 0)[1] == 36 * 0.5 && dm_route_mass(a, 0)[3] == 36 * 0.25);
    /* affinity (0 -> 1): every token picks 1 and 3 at layer 0, so rows 1 and 3 are the layer-1
     * pick histogram; its sum is the layer-1 picks: 72 - 2 (token 5 at step 2) */
    const int64_t *af = dm_route_affinity_counts(a, 0);
    int64_t sum1 = 0, hist[E] = {0};
    for (int f = 0; f < E; f++) sum1 += af[1 * E + f];
    ck_assert_int_eq(sum1, 70);
    for (int s = 0; s < 3; s++)
        for (int j = 0; j < T; j++) {
            int32_t p[2];
            picks(1, s, j, 0, p);
            for (int i = 0; i < 2; i++)
                if (p[i] >= 0) hist[p[i]] += 2;
        }
    for (int f = 0; f < E; f++) {
        ck_assert_int_eq(af[1 * E + f], hist[f]);
        ck_assert_int_eq(af[3 * E + f], hist[f]);
        ck_assert_int_eq(af[0 * E + f], 0);
    }
    double p[E * E];
    dm_route_affinity_prob(a, 0, p);
    ck_assert(p[1 * E + 0] == (double)hist[0] / 70 && p[0] == 0.0);
    /* JSON: the keys ditmoe-routes merges, with the numbers above */
    char *js;
    ck_assert_int_eq(dm_route_analysis_json(a, 2, &js), DM_OK);
    cJSON *o = cJSON_Parse(js);
    ck_assert(o != NULL);
    const char *keys[] = {"affinity", "coactivation", "mass", "persistence_bands", "set_kept_by_step",
                          "mean_experts_by_step"};
    for (int i = 0; i < 6; i++) ck_assert_msg(cJSON_GetObjectItem(o, keys[i]) != NULL, "no %s", keys[i]);
    cJSON *sk = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "set_kept_by_step"), 1); /* layer 1 */
    ck_assert(cJSON_GetArraySize(sk) == 2 && cJSON_GetArrayItem(sk, 0)->valuedouble == 0.5);
    ck_assert(fabs(cJSON_GetArrayItem(sk, 1)->valuedouble - 10.0 / 12) < 1e-4);
    cJSON *a01 = cJSON_GetArrayItem(cJSON_GetArrayItem(cJSON_GetObjectItem(o, "affinity"), 0), 1);
    ck_assert(fabs(cJSON_GetArrayItem(a01, 0)->valuedouble - (double)hist[0] / 70) < 1e-4);
    cJSON_Delete(o);
    free(js);
    dm_route_analysis_free(a);

    /* the unconditional half: (0, 4) everywhere */
    a = analyse(path, 1);
    n = dm_route_persist_band(a, -1, 1, 2, &ks, &k1);
    ck_assert_int_eq(n, 48);
    ck_assert_int_eq(ks, 48);
    ck_assert_int_eq(dm_route_coact(a, 0)[0 * E + 4], 36);
    dm_route_analysis_free(a);
    unlink(path);
}
END_TEST

/* Heun: evals 0, 1 are step 0, eval 2 is step 1. Persistence compares eval 2 with eval 0 (the
 * first of each step), never with eval 1; a new batch never compares with the previous one. */
START_TEST(test_heun_and_batches)
{
    const char *path = tmp_path("heun.dmr");
    dm_trace_shape s;
    shape(&s, 2, 1);
    dm_trace *tr;
    ck_assert_int_eq(dm_trace_open(path, &s, NULL, "synthetic", NULL, &tr), DM_OK);
    int32_t same[LM * T * K], other[LM * T * K];
    for (int i = 0; i < LM * T; i++) same[i * K] = 0, same[i * K + 1] = 1, other[i * K] = 2, other[i * K + 1] = 3;
    for (int b = 0; b < 2; b++) {
        int64_t y = 1;
        uint64_t idx = (uint64_t)b;
        float t = 1.0f;
        ck_assert_int_eq(dm_trace_batch(tr, 1, &y, &idx), DM_OK);
        ck_assert_int_eq(dm_trace_write(tr, 1, &t, &y, b ? other : same, NULL, NULL), DM_OK);
        ck_assert_int_eq(dm_trace_write(tr, 1, &t, &y, b ? same : other, NULL, NULL), DM_OK);
        ck_assert_int_eq(dm_trace_write(tr, 1, &t, &y, b ? other : same, NULL, NULL), DM_OK);
    }
    ck_assert_int_eq(dm_trace_close(tr), DM_OK);
    dm_route_analysis *a = analyse(path, 0);
    int64_t ks, k1, n = dm_route_persist_band(a, -1, 0, 1, &ks, &k1);
    ck_assert_int_eq(n, 2 * LM * T); /* one comparison per batch */
    ck_assert_int_eq(ks, n);
    ck_assert(dm_route_mean_experts(a, -1, 0, 1) == 2.0);
    dm_route_analysis_free(a);
    unlink(path);
}
END_TEST

/* Shapes a small dump may claim but that would need gigabytes, or more than 64 experts: refused
 * before allocating. */
START_TEST(test_limits)
{
    dm_trace_shape s;
    shape(&s, 100000, 0);
    s.layers = 256;
    dm_route_analysis *a = NULL;
    ck_assert_int_eq(dm_route_analysis_new(&s, 0, &a), DM_ERR_ARG);
    ck_assert(a == NULL && strstr(dm_last_error(), "layer-steps"));
    shape(&s, 3, 0);
    s.num_experts = 65;
    ck_assert_int_eq(dm_route_analysis_new(&s, 0, &a), DM_ERR_ARG);
    shape(&s, 0, 0); /* steps unknown: the tables grow with the records, within the same bound */
    ck_assert_int_eq(dm_route_analysis_new(&s, 0, &a), DM_OK);
    dm_trace_record rec = {.step = 1 << 22, .rows = 0};
    ck_assert_int_eq(dm_route_analysis_add(a, &rec), DM_ERR_FORMAT);
    rec.step = 5;
    ck_assert_int_eq(dm_route_analysis_add(a, &rec), DM_OK);
    dm_route_analysis_free(a);
}
END_TEST

/* dm_route_policy_experts on hand-made scores: 2 steps x 2 tokens, E = 4. Step 0 tokens are
 * (0.5, 0.25, 0.125, 0.125): top-p=0.5 keeps 2 (0.5 does not exceed 0.5), 0.75 keeps 3; step 1
 * tokens are all mass on expert 2 (1 expert for any P < 1). */
START_TEST(test_policy_experts)
{
    const float sc[16] = {0.5f, 0.25f, 0.125f, 0.125f, 0.5f, 0.25f, 0.125f, 0.125f,
                          0, 0, 1, 0, 0, 0, 1, 0};
    double m[2];
    ck_assert_int_eq(dm_route_policy_experts("top-p=0.5", sc, 1, 4, 4, 2, 2, 0, 2, m), DM_OK);
    ck_assert(m[0] == 2.0 && m[1] == 1.0);
    ck_assert_int_eq(dm_route_policy_experts("top-p=0.75", sc, 1, 4, 4, 2, 2, 0, 2, m), DM_OK);
    ck_assert(m[0] == 3.0 && m[1] == 1.0);
    ck_assert_int_eq(dm_route_policy_experts("top-p=0.75", sc, 1, 4, 4, 2, 2, 0, 1, m), DM_OK);
    ck_assert(m[0] == 2.0); /* one band: (3 + 3 + 1 + 1) / 4 */
    ck_assert_int_eq(dm_route_policy_experts("top-k", sc, 1, 4, 4, 2, 2, 0, 2, m), DM_OK);
    ck_assert(m[0] == 2.0 && m[1] == 2.0);
    ck_assert_int_eq(dm_route_policy_experts("top-p=2", sc, 1, 4, 4, 2, 2, 0, 2, m), DM_ERR_ARG);
    ck_assert_int_eq(dm_route_policy_experts("top-k", sc, 1, 4, 4, 3, 2, 0, 1, m), DM_ERR_ARG);
    ck_assert(strstr(dm_last_error(), "--steps 3"));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("trace_analysis");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_by_hand);
    tcase_add_test(tc, test_heun_and_batches);
    tcase_add_test(tc, test_policy_experts);
    tcase_add_test(tc, test_limits);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* Expert-output cache (src/router/expert_cache.c) on a simulated trajectory: a fake MoE layer
 * whose "routed output" of a token is a known function of (image, branch, layer, token, eval),
 * so every served value can be traced back to the evaluation that computed it. Checks: K = 1 is
 * the uncached computation bit for bit; fixed K serves each output exactly K evaluations;
 * route/delta refresh early; CFG-interval evaluations without the unconditional half do not
 * age it; results do not depend on batch composition or row order; the memory bound. */
#include "router/expert_cache.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { L = 3, T = 5, D = 4, E = 8, K2 = 2 };

/* Value computed at evaluation `ev` (an exact integer in float): ev * 4096 + a cell id, so a
 * served value tells which evaluation computed it. */
static float fresh(int64_t img, int br, int l, int t, int d, int ev)
{
    return (float)(ev * 4096 + ((img * 2 + br) * L * T * D + (l * T + t) * D + d) % 4096);
}
static int ev_of(float v) { return (int)v / 4096; }

/* Router probabilities: the top-2 set of (img, t) changes at evaluation `flip_at` (if >= 0;
 * -2: at img % 4 + 2, a per-image time). */
static void probs_of(int64_t img, int t, int ev, int flip_at, float *p)
{
    if (flip_at == -2) flip_at = (int)(img % 4) + 2;
    for (int e = 0; e < E; e++) p[e] = 0.05f;
    int a = (int)((img + t) % E), b = (a + 1) % E;
    if (flip_at >= 0 && ev >= flip_at) b = (a + 3) % E;
    p[a] = 0.4f, p[b] = 0.3f;
}

/* One evaluation of R rows through the cache: returns outputs [R*T*L, D] into out. */
static int eval_rows(dm_expert_cache *c, int R, const int64_t *img, const uint8_t *br, int ev,
                     int flip_at, float *out)
{
    ck_assert_int_eq(dm_expert_cache_begin(c, R, img, br), DM_OK);
    float *pr = malloc(sizeof(float) * R * T * E), *y = malloc(sizeof(float) * R * T * D);
    uint8_t *re = malloc((size_t)R * T);
    int computed = 0;
    for (int l = 0; l < L; l++) {
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) probs_of(img[r], t, ev, flip_at, pr + ((size_t)r * T + t) * E);
        computed += dm_expert_cache_decide(c, l, pr, re);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                for (int d = 0; d < D; d++)
                    y[((size_t)r * T + t) * D + d] = re[r * T + t] ? fresh(img[r], br[r], l, t, d, ev) : -1.0f;
        dm_expert_cache_update(c, l, pr, re, y);
        for (int i = 0; i < R * T * D; i++) out[(size_t)l * R * T * D + i] = y[i];
    }
    free(pr), free(y), free(re);
    return computed;
}

START_TEST(test_k1_is_uncached)
{
    dm_expert_cache_opts o;
    ck_assert_int_eq(dm_expert_cache_parse("1", &o), DM_OK);
    dm_expert_cache *c;
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 4, &c), DM_OK);
    ck_assert_uint_lt(dm_expert_cache_bytes(c), 64); /* nothing but the row map */
    int64_t img[4] = {0, 1, 0, 1};
    uint8_t br[4] = {0, 0, 1, 1};
    float out[L * 4 * T * D];
    for (int ev = 0; ev < 6; ev++) {
        ck_assert_int_eq(eval_rows(c, 4, img, br, ev, -1, out), L * 4 * T);
        for (int l = 0; l < L; l++)
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < D; d++)
                        ck_assert(out[((l * 4 + r) * T + t) * D + d] == fresh(img[r], br[r], l, t, d, ev));
    }
    dm_expert_cache_stats st;
    dm_expert_cache_get_stats(c, &st);
    ck_assert_int_eq(st.reused, 0);
    dm_expert_cache_free(c);
}
END_TEST

START_TEST(test_fixed_k)
{
    for (int K = 2; K <= 4; K++) {
        dm_expert_cache_opts o;
        dm_expert_cache_opts_init(&o);
        o.K = K;
        dm_expert_cache *c;
        ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 2, &c), DM_OK);
        int64_t img[2] = {7, 7};
        uint8_t br[2] = {0, 1};
        float out[L * 2 * T * D];
        for (int ev = 0; ev < 10; ev++) {
            int n = eval_rows(c, 2, img, br, ev, -1, out);
            ck_assert_int_eq(n, ev % K == 0 ? L * 2 * T : 0);
            for (int i = 0; i < L * 2 * T * D; i++) ck_assert_int_eq(ev_of(out[i]), ev - ev % K);
        }
        dm_expert_cache_free(c);
    }
}
END_TEST

/* DM_CACHE_LEAVE (a token whose routed part the caller skipped): neither stored nor served, the
 * caller's value stays, the entry keeps its value and age. K = 3, one row, token 0 left alone at
 * evaluation 1: its output of evaluation 0 is then served at evaluations 2 and 3 (the left one
 * did not count), while the other tokens follow the plain K = 3 schedule (recomputed at 3). */
START_TEST(test_leave)
{
    dm_expert_cache_opts o;
    dm_expert_cache_opts_init(&o);
    o.K = 3;
    dm_expert_cache *c;
    ck_assert_int_eq(dm_expert_cache_create(&o, 1, T, D, E, 2, 1, &c), DM_OK);
    int64_t img = 4;
    uint8_t br = 0, re[T];
    float pr[T * E], y[T * D];
    for (int t = 0; t < T; t++) probs_of(img, t, 0, -1, pr + t * E);
    for (int ev = 0; ev < 4; ev++) {
        ck_assert_int_eq(dm_expert_cache_begin(c, 1, &img, &br), DM_OK);
        dm_expert_cache_decide(c, 0, pr, re);
        if (ev == 1) re[0] = DM_CACHE_LEAVE;
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++)
                y[t * D + d] = re[t] == 1 ? fresh(img, 0, 0, t, d, ev) : re[t] ? -7.0f : -1.0f;
        dm_expert_cache_update(c, 0, pr, re, y);
        for (int t = 0; t < T; t++) {
            const int want = t == 0 ? 0 : ev < 3 ? 0 : 3;
            if (ev == 1 && t == 0)
                ck_assert(y[0] == -7.0f); /* left alone: the caller's value */
            else
                ck_assert_int_eq(ev_of(y[t * D]), want);
        }
    }
    dm_expert_cache_stats st;
    dm_expert_cache_get_stats(c, &st);
    ck_assert_int_eq(st.computed + st.reused, 4 * T - 1);
    dm_expert_cache_free(c);
}
END_TEST

START_TEST(test_cfg_interval_ages_per_half)
{
    dm_expert_cache_opts o;
    ck_assert_int_eq(dm_expert_cache_parse("3", &o), DM_OK);
    dm_expert_cache *c;
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 2, &c), DM_OK);
    int64_t img[2] = {3, 3};
    uint8_t br[2] = {0, 1};
    float out[L * 2 * T * D];
    /* evals 0, 1: both halves; 2, 3: conditional only; 4: both again */
    eval_rows(c, 2, img, br, 0, -1, out);
    eval_rows(c, 2, img, br, 1, -1, out);
    eval_rows(c, 1, img, br, 2, -1, out);
    ck_assert_int_eq(ev_of(out[0]), 0); /* third use of the cond output */
    eval_rows(c, 1, img, br, 3, -1, out);
    ck_assert_int_eq(ev_of(out[0]), 3); /* recomputed */
    eval_rows(c, 2, img, br, 4, -1, out);
    ck_assert_int_eq(ev_of(out[0]), 3);           /* cond: second use */
    ck_assert_int_eq(ev_of(out[T * D]), 0);       /* uncond: its third presence */
    dm_expert_cache_free(c);
}
END_TEST

START_TEST(test_adaptive)
{
    dm_expert_cache_opts o;
    ck_assert_int_eq(dm_expert_cache_parse("100,refresh=route", &o), DM_OK);
    dm_expert_cache *c;
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 1, &c), DM_OK);
    int64_t img[1] = {5};
    uint8_t br[1] = {0};
    float out[L * T * D];
    for (int ev = 0; ev < 8; ev++) {
        int n = eval_rows(c, 1, img, br, ev, 4, out);
        ck_assert_int_eq(n, ev == 0 || ev == 4 ? L * T : 0); /* the top-2 set flips at eval 4 */
        ck_assert_int_eq(ev_of(out[0]), ev < 4 ? 0 : 4);
    }
    dm_expert_cache_free(c);
    /* delta: the flip moves 0.25 of probability out of one expert and into another: L1 = 0.5 */
    ck_assert_int_eq(dm_expert_cache_parse("100,refresh=delta:0.49", &o), DM_OK);
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 1, &c), DM_OK);
    for (int ev = 0; ev < 6; ev++) ck_assert_int_eq(eval_rows(c, 1, img, br, ev, 3, out), ev == 0 || ev == 3 ? L * T : 0);
    dm_expert_cache_free(c);
    ck_assert_int_eq(dm_expert_cache_parse("100,refresh=delta:0.51", &o), DM_OK);
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 1, &c), DM_OK);
    for (int ev = 0; ev < 6; ev++) ck_assert_int_eq(eval_rows(c, 1, img, br, ev, 3, out), ev == 0 ? L * T : 0);
    dm_expert_cache_free(c);
}
END_TEST

/* Six images x (cond, uncond): one batch of 12 rows vs two batches of 3 images, rows shuffled
 * differently every evaluation; every (image, branch, layer, token) output must agree. */
START_TEST(test_batch_invariance)
{
    const char *specs[] = {"3", "4,refresh=route", "5,refresh=delta:0.2"};
    for (int si = 0; si < 3; si++) {
        dm_expert_cache_opts o;
        ck_assert_int_eq(dm_expert_cache_parse(specs[si], &o), DM_OK);
        enum { NI = 6, EV = 9 };
        static float ref[NI][2][EV][L][T][D];
        for (int pass = 0; pass < 2; pass++) {
            dm_expert_cache *c;
            ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 2 * NI, &c), DM_OK);
            for (int g = 0; g < (pass ? 2 : 1); g++) {
                dm_expert_cache_reset(c);
                const int n_img = pass ? 3 : NI, R = 2 * n_img;
                for (int ev = 0; ev < EV; ev++) {
                    int64_t img[2 * NI];
                    uint8_t br[2 * NI];
                    for (int r = 0; r < R; r++) {
                        int rr = pass ? (r * 5 + ev) % R : r; /* a permutation of rows (R = 6) */
                        img[rr] = g * 3 + r % n_img;
                        br[rr] = (uint8_t)(r / n_img);
                    }
                    float out[L * 2 * NI * T * D];
                    eval_rows(c, R, img, br, ev, -2, out);
                    for (int l = 0; l < L; l++)
                        for (int r = 0; r < R; r++)
                            for (int t = 0; t < T; t++)
                                for (int d = 0; d < D; d++) {
                                    float v = out[((l * R + r) * T + t) * D + d];
                                    if (!pass) ref[img[r]][br[r]][ev][l][t][d] = v;
                                    else ck_assert(v == ref[img[r]][br[r]][ev][l][t][d]);
                                }
                }
            }
            dm_expert_cache_free(c);
        }
    }
}
END_TEST

START_TEST(test_memory_and_parse)
{
    dm_expert_cache_opts o;
    ck_assert_int_eq(dm_expert_cache_parse("2,refresh=route,mem=1", &o), DM_OK);
    ck_assert_int_eq(o.K, 2);
    ck_assert(o.refresh == DM_CACHE_ROUTE && o.max_bytes == (1u << 20));
    dm_expert_cache *c;
    /* 64 rows x 4 layers x 256 tokens x (128 + 8 floats + 5 bytes) = 36 MiB > 1 MiB */
    ck_assert_int_eq(dm_expert_cache_create(&o, 4, 256, 128, 8, 2, 64, &c), DM_ERR_ARG);
    ck_assert(strstr(dm_last_error(), "needs") && strstr(dm_last_error(), "mem="));
    o.max_bytes = (size_t)1 << 30;
    ck_assert_int_eq(dm_expert_cache_create(&o, 4, 16, 128, 8, 2, 20, &c), DM_OK);
    const size_t cells = 20 * 4 * 16;
    ck_assert_uint_eq(dm_expert_cache_bytes(c), cells * (128 * 4 + 8 * 4 + 1 + 4) + 20 * 17 + 20 * sizeof(int));
    int64_t img[21] = {0};
    uint8_t br[21] = {0};
    ck_assert_int_eq(dm_expert_cache_begin(c, 21, img, br), DM_ERR_ARG); /* more rows than room */
    for (int i = 0; i < 2; i++) img[i] = 4;
    ck_assert_int_eq(dm_expert_cache_begin(c, 2, img, br), DM_ERR_ARG); /* a key twice */
    ck_assert(strstr(dm_last_error(), "share image 4"));
    dm_expert_cache_free(c);

    ck_assert_int_eq(dm_expert_cache_parse("3,refresh=delta:0.1", &o), DM_OK);
    ck_assert(o.refresh == DM_CACHE_DELTA && fabsf(o.eps - 0.1f) < 1e-7f && !o.whole);
    char str[64];
    dm_expert_cache_str(&o, str, sizeof str); /* canonical: the shortest float that reads back */
    ck_assert_str_eq(str, "3,refresh=delta:0.1");
    ck_assert_int_eq(dm_expert_cache_parse("2,ffn,mem=8", &o), DM_OK);
    ck_assert(o.whole && o.K == 2 && o.refresh == DM_CACHE_FIXED);
    dm_expert_cache_str(&o, str, sizeof str);
    ck_assert_str_eq(str, "2,refresh=fixed,ffn");
    const char *bad[] = {"0", "-1", "x", "", "2,refresh=foo", "2,refresh=delta:5", "2,mem=0", "2,what"};
    const char *why[] = {"K must be", "K must be", "K must be", "empty", "refresh='foo'", "EPS in",
                         "mem=MiB", "unexpected field 'what'"};
    for (int i = 0; i < 8; i++) {
        ck_assert_int_eq(dm_expert_cache_parse(bad[i], &o), DM_ERR_ARG);
        ck_assert_msg(strstr(dm_last_error(), why[i]), "%s: %s", bad[i], dm_last_error());
    }
}
END_TEST

START_TEST(test_eviction)
{
    dm_expert_cache_opts o;
    ck_assert_int_eq(dm_expert_cache_parse("4", &o), DM_OK);
    dm_expert_cache *c;
    ck_assert_int_eq(dm_expert_cache_create(&o, L, T, D, E, 2, 2, &c), DM_OK);
    float out[L * 2 * T * D];
    int64_t a[2] = {0, 1}, b[2] = {2, 3};
    uint8_t br[2] = {0, 0};
    eval_rows(c, 2, a, br, 0, -1, out);
    ck_assert_int_eq(eval_rows(c, 2, b, br, 1, -1, out), L * 2 * T); /* new images: computed */
    ck_assert_int_eq(eval_rows(c, 2, a, br, 2, -1, out), L * 2 * T); /* evicted: computed again */
    dm_expert_cache_stats st;
    dm_expert_cache_get_stats(c, &st);
    ck_assert_int_eq(st.evictions, 4);
    dm_expert_cache_free(c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("expert_cache");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_k1_is_uncached);
    tcase_add_test(tc, test_fixed_k);
    tcase_add_test(tc, test_leave);
    tcase_add_test(tc, test_cfg_interval_ages_per_half);
    tcase_add_test(tc, test_adaptive);
    tcase_add_test(tc, test_batch_invariance);
    tcase_add_test(tc, test_memory_and_parse);
    tcase_add_test(tc, test_eviction);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

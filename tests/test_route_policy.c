/* Routing policies (src/router/route_policy.c): the CSR path against the _ref on random router
 * outputs (with forced ties), hand-checked answers at the rule boundaries (P exactly reached,
 * ties, all mass on one expert, a threshold above every probability), top-k against an
 * independent copy of today's top_k() rule, and the spec parsers' error lines. */
#include "router/moe.h"
#include "router/route_policy.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

/* Random softmax-like rows; quantised to multiples of 1/64 half of the time to force ties. */
static void random_probs(float *p, int N, int E, uint32_t seed)
{
    for (int n = 0; n < N; n++) {
        float *r = p + (size_t)n * E, sum = 0;
        int quant = lcg(&seed) & 1;
        for (int e = 0; e < E; e++) {
            float v = (float)(lcg(&seed) % 1000) / 1000.0f;
            r[e] = quant ? floorf(v * 4) : expf(4 * v);
            sum += r[e];
        }
        if (sum == 0) r[0] = sum = 1;
        for (int e = 0; e < E; e++) r[e] = quant ? r[e] / 64.0f : r[e] / sum;
    }
}

/* Today's rule (router/moe.c top_k), written again here: repeated argmax, strict '>'. */
static void top_k_today(const float *p, int E, int k, int32_t *ids, float *w)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        w[j] = p[best];
    }
}

/* Run the CSR path; return padded [N, kmax] ids/weights and check the grouping invariants. */
static void run_csr(const dm_route_policy *p, const float *sc, int N, int E, int mk,
                    const uint8_t *unc, int kmax, int32_t *ids, float *w)
{
    dm_route_csr c = {0};
    const int nE = unc ? E + 1 : E;
    ck_assert_int_eq(dm_route_csr_reserve(&c, N, dm_route_policy_max_picks(p, E, mk), nE), DM_OK);
    dm_route_select(p, sc, N, E, mk, unc, E, &c);
    ck_assert_int_eq(c.tok_off[0], 0);
    ck_assert_int_eq(c.tok_off[N], c.n_picks);
    ck_assert_int_eq(c.exp_off[nE], c.n_picks);
    for (int e = 0; e < nE; e++)
        for (int i = c.exp_off[e]; i < c.exp_off[e + 1]; i++) {
            int n = c.rows[i];
            if (i > c.exp_off[e]) ck_assert_int_lt(c.rows[i - 1], n); /* ascending tokens */
            int found = 0;
            for (int j = c.tok_off[n]; j < c.tok_off[n + 1]; j++)
                found += c.ids[j] == e && c.weights[j] == c.row_w[i];
            ck_assert_int_eq(found, 1);
        }
    dm_route_csr_to_padded(&c, kmax, ids, w);
    dm_route_csr_free(&c);
}

static void one_row(const dm_route_policy *p, const float *s, int E, int mk, int expect_n,
                    const int *expect_ids)
{
    int32_t ids[16], rid[16], cnt;
    float w[16], rw[16];
    run_csr(p, s, 1, E, mk, NULL, E, ids, w);
    dm_route_select_ref(p, s, 1, E, mk, NULL, E, E, rid, rw, &cnt);
    ck_assert_int_eq(cnt, expect_n);
    for (int j = 0; j < E; j++) {
        ck_assert_int_eq(ids[j], j < expect_n ? expect_ids[j] : -1);
        ck_assert_int_eq(rid[j], ids[j]);
        ck_assert(rw[j] == w[j]);
    }
}

START_TEST(test_topk_is_today)
{
    for (int E = 8; E <= 16; E += 8) {
        const int N = 301, k = 2;
        float *sc = malloc(sizeof(float) * N * E), w[2], *pw = malloc(sizeof(float) * N * k);
        int32_t ids[2], *pid = malloc(sizeof(int32_t) * N * k);
        random_probs(sc, N, E, 7u + E);
        dm_route_policy p;
        dm_route_policy_init(&p);
        run_csr(&p, sc, N, E, k, NULL, k, pid, pw);
        for (int n = 0; n < N; n++) {
            top_k_today(sc + (size_t)n * E, E, k, ids, w);
            for (int j = 0; j < k; j++) {
                ck_assert_int_eq(pid[n * k + j], ids[j]);
                ck_assert(pw[n * k + j] == w[j]); /* bit-identical */
            }
            dm_moe_top_k(sc + (size_t)n * E, E, k, ids, w); /* the engine's own rule */
            for (int j = 0; j < k; j++) {
                ck_assert_int_eq(pid[n * k + j], ids[j]);
                ck_assert(pw[n * k + j] == w[j]);
            }
        }
        free(sc), free(pw), free(pid);
    }
}
END_TEST

/* dm_route_csr_mix: per token the picks of the chosen CSR, regrouped by expert with tokens
 * ascending (strong rows + self-contrast weak rows in one grouping). */
START_TEST(test_mix)
{
    const int N = 57, E = 8, k = 2;
    float *sc = malloc(sizeof(float) * N * E);
    random_probs(sc, N, E, 1234u);
    dm_route_policy p;
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.6", &p), DM_OK);
    dm_route_csr a = {0}, b = {0}, m = {0};
    ck_assert_int_eq(dm_route_csr_reserve(&a, N, E, E), DM_OK);
    ck_assert_int_eq(dm_route_csr_reserve(&b, N, E, E), DM_OK);
    ck_assert_int_eq(dm_route_csr_reserve(&m, N, E, E), DM_OK);
    dm_route_select(&p, sc, N, E, k, NULL, E, &a);
    dm_route_select_weak(DM_WEAK_RANK2, sc, N, E, NULL, E, &b);
    uint8_t use_b[57];
    for (int n = 0; n < N; n++) use_b[n] = n % 3 == 1;
    dm_route_csr_mix(&a, &b, use_b, &m);
    int picks = 0;
    for (int n = 0; n < N; n++) {
        const dm_route_csr *s = use_b[n] ? &b : &a;
        const int c = s->tok_off[n + 1] - s->tok_off[n];
        ck_assert_int_eq(m.tok_off[n + 1] - m.tok_off[n], c);
        for (int j = 0; j < c; j++) {
            ck_assert_int_eq(m.ids[m.tok_off[n] + j], s->ids[s->tok_off[n] + j]);
            ck_assert(m.weights[m.tok_off[n] + j] == s->weights[s->tok_off[n] + j]);
        }
        picks += c;
    }
    ck_assert_int_eq(m.n_picks, picks);
    ck_assert_int_eq(m.exp_off[E], picks);
    for (int e = 0; e < E; e++) /* grouping: each row's token really picked e, tokens ascending */
        for (int32_t i = m.exp_off[e]; i < m.exp_off[e + 1]; i++) {
            const int n = m.rows[i];
            int found = 0;
            for (int32_t q = m.tok_off[n]; q < m.tok_off[n + 1]; q++)
                found |= m.ids[q] == e && m.weights[q] == m.row_w[i];
            ck_assert(found);
            if (i > m.exp_off[e]) ck_assert_int_lt(m.rows[i - 1], n);
        }
    dm_route_csr_free(&a), dm_route_csr_free(&b), dm_route_csr_free(&m);
    free(sc);
}
END_TEST

START_TEST(test_fast_equals_ref)
{
    const char *specs[] = {"top-k", "top-k=1", "top-k=3", "top-p=0.5", "top-p=0.3,max=2",
                           "top-p=0.9,renorm", "top-p=1", "top-p=0.25", "threshold=0.2",
                           "threshold=0.125,max=3,renorm", "threshold=1", "top-p=0.75,max=4,renorm"};
    for (size_t si = 0; si < sizeof specs / sizeof *specs; si++)
        for (int E = 8; E <= 16; E += 8) {
            const int N = 203, mk = 2;
            dm_route_policy p;
            ck_assert_int_eq(dm_route_policy_parse(specs[si], &p), DM_OK);
            ck_assert_int_eq(dm_route_policy_check(&p, 1, E, mk), DM_OK);
            float *sc = malloc(sizeof(float) * N * E), *w = malloc(sizeof(float) * N * E),
                  *rw = malloc(sizeof(float) * N * E);
            int32_t *ids = malloc(sizeof(int32_t) * N * E), *rid = malloc(sizeof(int32_t) * N * E),
                    *cnt = malloc(sizeof(int32_t) * N);
            uint8_t *unc = calloc(N, 1);
            for (int n = 0; n < N; n += 5) unc[n] = 1; /* ProMoE-style null tokens ride along */
            random_probs(sc, N, E, 99u + (uint32_t)si * 31u + E);
            run_csr(&p, sc, N, E, mk, unc, E, ids, w);
            dm_route_select_ref(&p, sc, N, E, mk, unc, E, E, rid, rw, cnt);
            for (int i = 0; i < N * E; i++) {
                ck_assert_int_eq(ids[i], rid[i]);
                ck_assert(w[i] == rw[i]);
            }
            /* batch invariance: a sub-range routed alone gives the same rows */
            run_csr(&p, sc + 50 * E, 31, E, mk, unc + 50, E, ids, w);
            for (int i = 0; i < 31 * E; i++) ck_assert_int_eq(ids[i], rid[50 * E + i]);
            free(sc), free(w), free(rw), free(ids), free(rid), free(cnt), free(unc);
        }
}
END_TEST

START_TEST(test_topp_boundaries)
{
    dm_route_policy p;
    const float a[4] = {0.125f, 0.5f, 0.125f, 0.25f}; /* sorted: 1, 3, 0, 2 */
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.5", &p), DM_OK);
    one_row(&p, a, 4, 2, 2, (int[]){1, 3}); /* 0.5 does not exceed 0.5: the next is taken */
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.49", &p), DM_OK);
    one_row(&p, a, 4, 2, 1, (int[]){1});
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.75", &p), DM_OK);
    one_row(&p, a, 4, 2, 3, (int[]){1, 3, 0}); /* tie 0 vs 2 at the crossing: lower id */
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.75,max=2", &p), DM_OK);
    one_row(&p, a, 4, 2, 2, (int[]){1, 3});
    ck_assert_int_eq(dm_route_policy_parse("top-p=1", &p), DM_OK);
    one_row(&p, a, 4, 2, 4, (int[]){1, 3, 0, 2}); /* the sum never exceeds 1: all */
    /* all mass on one expert */
    const float one[4] = {0, 0, 1, 0};
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.9", &p), DM_OK);
    one_row(&p, one, 4, 2, 1, (int[]){2});
    ck_assert_int_eq(dm_route_policy_parse("threshold=0.5", &p), DM_OK);
    one_row(&p, one, 4, 2, 1, (int[]){2});
    /* renorm: 3 kept (0.875) rescaled to the top-2 mass (0.75) */
    int32_t ids[4];
    float w[4];
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.75,renorm", &p), DM_OK);
    run_csr(&p, a, 1, 4, 2, NULL, 4, ids, w);
    ck_assert_float_eq_tol(w[0] + w[1] + w[2], 0.75f, 1e-7f);
    ck_assert_float_eq_tol(w[0], 0.5f * 0.75f / 0.875f, 1e-7f);
    ck_assert_int_eq(ids[3], -1);
}
END_TEST

START_TEST(test_threshold_and_rank2)
{
    dm_route_policy p;
    const float a[4] = {0.125f, 0.5f, 0.125f, 0.25f};
    ck_assert_int_eq(dm_route_policy_parse("threshold=0.25", &p), DM_OK);
    one_row(&p, a, 4, 2, 2, (int[]){1, 3}); /* >= T */
    ck_assert_int_eq(dm_route_policy_parse("threshold=0.125", &p), DM_OK);
    one_row(&p, a, 4, 2, 4, (int[]){1, 3, 0, 2});
    ck_assert_int_eq(dm_route_policy_parse("threshold=0.9", &p), DM_OK);
    one_row(&p, a, 4, 2, 1, (int[]){1}); /* above every probability: the top one */
    const float tie[3] = {0.4f, 0.4f, 0.2f};
    one_row(&p, tie, 3, 2, 1, (int[]){0}); /* tie: the lower id */
    /* ProMoE cosines (may be negative) */
    ck_assert_int_eq(dm_route_policy_parse("rank2=0.5,margin=0.1", &p), DM_OK);
    ck_assert_int_eq(dm_route_policy_check(&p, 0, 3, 1), DM_OK);
    one_row(&p, (float[]){0.1f, 0.6f, 0.55f}, 3, 1, 2, (int[]){1, 2}); /* margin 0.05 < 0.1 */
    one_row(&p, (float[]){0.9f, 0.2f, -0.3f}, 3, 1, 1, (int[]){0});
    one_row(&p, (float[]){-0.2f, 0.3f, 0.4f}, 3, 1, 2, (int[]){2, 1}); /* cos1 0.4 < 0.5 */
    /* null-class tokens: the unconditional expert alone, weight 1 */
    int32_t ids[4];
    float w[4];
    const uint8_t unc[2] = {1, 0};
    const float two[6] = {0.1f, 0.2f, 0.3f, 0.9f, 0.85f, 0.0f};
    run_csr(&p, two, 2, 3, 1, unc, 2, ids, w);
    ck_assert_int_eq(ids[0], 3);
    ck_assert(w[0] == 1.0f);
    ck_assert_int_eq(ids[1], -1);
    ck_assert_int_eq(ids[2], 0);
    ck_assert_int_eq(ids[3], 1); /* margin 0.05 */
}
END_TEST

START_TEST(test_weak)
{
    const float s[8] = {0.1f, 0.3f, 0.05f, 0.2f, 0.2f, 0.05f, 0.05f, 0.05f}; /* 1, 3, 4, ... */
    const dm_weak_kind kinds[4] = {DM_WEAK_TOP1, DM_WEAK_RANK2, DM_WEAK_RANK3, DM_WEAK_SHARED};
    const int expect[4] = {1, 3, 4, -1};
    for (int i = 0; i < 4; i++) {
        dm_route_csr c = {0};
        ck_assert_int_eq(dm_route_csr_reserve(&c, 1, 1, 8), DM_OK);
        dm_route_select_weak(kinds[i], s, 1, 8, NULL, 8, &c);
        ck_assert_int_eq(c.n_picks, expect[i] < 0 ? 0 : 1);
        if (expect[i] >= 0) {
            ck_assert_int_eq(c.ids[0], expect[i]);
            ck_assert(c.weights[0] == s[expect[i]]);
        }
        dm_route_csr_free(&c);
    }
}
END_TEST

/* Filtering (skip-routed / expert cache compute view) equals routing the kept tokens alone. */
START_TEST(test_filter)
{
    const int N = 97, E = 8;
    float *sc = malloc(sizeof(float) * N * E);
    random_probs(sc, N, E, 5u);
    uint8_t keep[97];
    for (int n = 0; n < N; n++) keep[n] = (n * 7 + 3) % 5 != 0;
    dm_route_policy p;
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.6", &p), DM_OK);
    dm_route_csr c = {0}, f = {0};
    ck_assert_int_eq(dm_route_csr_reserve(&c, N, E, E), DM_OK);
    ck_assert_int_eq(dm_route_csr_reserve(&f, N, E, E), DM_OK);
    dm_route_select(&p, sc, N, E, 2, NULL, E, &c);
    dm_route_csr_filter(&c, keep, &f);
    int kept_picks = 0;
    for (int n = 0; n < N; n++) {
        const int cn = c.tok_off[n + 1] - c.tok_off[n], fn = f.tok_off[n + 1] - f.tok_off[n];
        ck_assert_int_eq(fn, keep[n] ? cn : 0);
        for (int j = 0; j < fn; j++) {
            ck_assert_int_eq(f.ids[f.tok_off[n] + j], c.ids[c.tok_off[n] + j]);
            ck_assert(f.weights[f.tok_off[n] + j] == c.weights[c.tok_off[n] + j]);
        }
        kept_picks += fn;
    }
    ck_assert_int_eq(f.n_picks, kept_picks);
    ck_assert_int_eq(f.exp_off[E], kept_picks);
    for (int e = 0; e < E; e++)
        for (int i = f.exp_off[e]; i < f.exp_off[e + 1]; i++) {
            ck_assert(keep[f.rows[i]]);
            if (i > f.exp_off[e]) ck_assert_int_lt(f.rows[i - 1], f.rows[i]);
        }
    dm_route_csr_free(&c);
    dm_route_csr_free(&f);
    free(sc);
}
END_TEST

START_TEST(test_self_contrast_combine)
{
    const float dc[3] = {1, 2, 3}, du[3] = {0, 1, 1}, dw[3] = {0.5f, 2, 1};
    float out[3];
    dm_self_contrast sc = {2.0f, DM_WEAK_RANK2, 1};
    dm_self_contrast_combine(&sc, 4.0f, 3, dc, NULL, dw, out); /* Dw + 2 (Dc - Dw) */
    ck_assert(out[0] == 1.5f && out[1] == 2.0f && out[2] == 5.0f);
    sc.replace_uncond = 0;
    dm_self_contrast_combine(&sc, 1.5f, 3, dc, du, dw, out); /* Du + 1.5 (Dc-Du) + (Dc-Dw) */
    ck_assert(out[0] == 2.0f && out[1] == 2.5f && out[2] == 6.0f);
    sc.w = 1.0f; /* W = 1: plain CFG */
    dm_self_contrast_combine(&sc, 1.5f, 3, dc, du, dw, out);
    ck_assert(out[0] == 1.5f && out[1] == 2.5f && out[2] == 4.0f);
}
END_TEST

static void bad(dm_status st, const char *needle)
{
    ck_assert_int_eq(st, DM_ERR_ARG);
    ck_assert_msg(strstr(dm_last_error(), needle), "'%s' lacks '%s'", dm_last_error(), needle);
}

START_TEST(test_parse)
{
    dm_route_policy p;
    char b[96];
    const char *ok[] = {"top-k", "top-k=3", "top-p=0.5", "top-p=0.5,max=3,renorm", "threshold=0.2",
                        "threshold=0.2,max=2", "rank2=0.5", "rank2=0.5,margin=0.1"};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        ck_assert_int_eq(dm_route_policy_parse(ok[i], &p), DM_OK);
        dm_route_policy_str(&p, b, sizeof b);
        ck_assert_str_eq(b, ok[i]); /* canonical form round-trips */
    }
    bad(dm_route_policy_parse("top-p=0", &p), "P must be in (0, 1]");
    bad(dm_route_policy_parse("top-p=1.5", &p), "P must be in (0, 1]");
    bad(dm_route_policy_parse("top-p=-0.1", &p), "P must be");
    bad(dm_route_policy_parse("top-p=abc", &p), "top-p needs a number");
    bad(dm_route_policy_parse("top-p", &p), "top-p needs a number");
    bad(dm_route_policy_parse("top-k=0", &p), "K must be an integer >= 1");
    bad(dm_route_policy_parse("top-p=0.5,max=0", &p), "max=K");
    bad(dm_route_policy_parse("threshold=2", &p), "T must be in (0, 1]");
    bad(dm_route_policy_parse("top-p=0.5,bogus", &p), "unexpected field 'bogus'");
    bad(dm_route_policy_parse("top-k,renorm", &p), "unexpected field 'renorm'");
    bad(dm_route_policy_parse("nearest", &p), "unknown policy 'nearest'");
    bad(dm_route_policy_parse("", &p), "empty");
    ck_assert_int_eq(dm_route_policy_parse("top-k=9", &p), DM_OK);
    bad(dm_route_policy_check(&p, 1, 8, 2), "exceeds the 8 experts");
    ck_assert_int_eq(dm_route_policy_parse("top-p=0.5", &p), DM_OK);
    bad(dm_route_policy_check(&p, 0, 12, 1), "cosines");
    ck_assert_int_eq(dm_route_policy_parse("rank2=0.3", &p), DM_OK);
    bad(dm_route_policy_check(&p, 1, 8, 2), "rank2 is for ProMoE");

    dm_self_contrast sc;
    ck_assert_int_eq(dm_self_contrast_parse("1.5", &sc), DM_OK);
    ck_assert(sc.w == 1.5f && sc.weak == DM_WEAK_RANK2 && !sc.replace_uncond);
    ck_assert_int_eq(dm_self_contrast_parse("2,weak=shared,mode=replace", &sc), DM_OK);
    ck_assert(sc.w == 2.0f && sc.weak == DM_WEAK_SHARED && sc.replace_uncond);
    bad(dm_self_contrast_parse("0", &sc), "W must be a number > 0");
    bad(dm_self_contrast_parse("1.5,weak=rank9", &sc), "weak='rank9'");
    bad(dm_self_contrast_parse("1.5,mode=both", &sc), "mode='both'");
}
END_TEST

START_TEST(test_skip_routed)
{
    const int all4[4] = {0, 1, 2, 3}, odd[2] = {1, 3};
    dm_skip_routed s;
    memset(&s, 0, sizeof s);
    ck_assert_int_eq(dm_skip_routed_parse("2,3@0.0-0.5", 4, all4, 4, &s), DM_OK);
    ck_assert_int_eq(s.n, 1);
    ck_assert(dm_skip_routed_active(&s, 2, 0.25f) && dm_skip_routed_active(&s, 3, 0.5f) &&
              dm_skip_routed_active(&s, 3, 0.0f));
    ck_assert(!dm_skip_routed_active(&s, 2, 0.5001f) && !dm_skip_routed_active(&s, 1, 0.25f));
    memset(&s, 0, sizeof s);
    ck_assert_int_eq(dm_skip_routed_parse("all@0.8-1;1@0-0.1", 4, odd, 2, &s), DM_OK);
    ck_assert_int_eq(s.n, 2);
    ck_assert(dm_skip_routed_active(&s, 3, 0.9f) && dm_skip_routed_active(&s, 1, 0.05f));
    ck_assert(!dm_skip_routed_active(&s, 0, 0.9f) && !dm_skip_routed_active(&s, 3, 0.5f));
    memset(&s, 0, sizeof s);
    bad(dm_skip_routed_parse("4@0-1", 4, all4, 4, &s), "layer 4 does not exist (depth 4");
    bad(dm_skip_routed_parse("2@0-1", 4, odd, 2, &s), "block 2 has no routed experts");
    bad(dm_skip_routed_parse("2,3", 4, all4, 4, &s), "lacks '@'");
    bad(dm_skip_routed_parse("2,@0-1", 4, all4, 4, &s), "trailing ','");
    bad(dm_skip_routed_parse("x@0-1", 4, all4, 4, &s), "layer 'x' is not an integer");
    bad(dm_skip_routed_parse("1@0.5-0.2", 4, all4, 4, &s), "0 <= T0 <= T1 <= 1");
    bad(dm_skip_routed_parse("1@0-1.5", 4, all4, 4, &s), "0 <= T0 <= T1 <= 1");
    bad(dm_skip_routed_parse("1@0.5", 4, all4, 4, &s), "is not T0-T1");
    bad(dm_skip_routed_parse("@0-1", 4, all4, 4, &s), "no layers");
    bad(dm_skip_routed_parse("1@0-1;", 4, all4, 4, &s), "trailing ';'");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("route_policy");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_topk_is_today);
    tcase_add_test(tc, test_fast_equals_ref);
    tcase_add_test(tc, test_topp_boundaries);
    tcase_add_test(tc, test_threshold_and_rank2);
    tcase_add_test(tc, test_weak);
    tcase_add_test(tc, test_filter);
    tcase_add_test(tc, test_mix);
    tcase_add_test(tc, test_self_contrast_combine);
    tcase_add_test(tc, test_parse);
    tcase_add_test(tc, test_skip_routed);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

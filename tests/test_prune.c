/* Expert pruning (src/router/prune.c): clustering and search on hand-made inputs with known
 * answers, and the rewrite of the shipped DiT-MoE: for every MoE layer, the pruned layer's
 * output (softmax router over the kept rows, top-2, experts renumbered) equals the original
 * layer's with the dropped experts' router logits at -inf, bit for bit, on real weights; a model
 * pruned in some layers only loads and routes within each layer's count; the ProMoE rewrite's
 * ops. (Whole-model equality with the masked original: tests/test_moe_lab_cli.sh.) */
#include "router/prune.h"

#include <check.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

START_TEST(test_cluster)
{
    /* 5 items on a line at 0, 1, 10, 11, 30: complete linkage to 3 clusters gives {0,1}, {2,3},
     * {4}; to 2: {0,1,2,3} (max distance 11) beats {2,3,4} (20). */
    const double x[5] = {0, 1, 10, 11, 30};
    double d[25];
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 5; j++) d[i * 5 + j] = fabs(x[i] - x[j]);
    int c[5];
    dm_prune_cluster(5, d, 3, c);
    ck_assert(c[0] == 0 && c[1] == 0 && c[2] == 1 && c[3] == 1 && c[4] == 2);
    dm_prune_cluster(5, d, 2, c);
    ck_assert(c[0] == 0 && c[1] == 0 && c[2] == 0 && c[3] == 0 && c[4] == 1);
    /* chain 0, 4, 8, 12 (+ single linkage would chain): complete linkage pairs them 2 + 2 */
    const double y[4] = {0, 4, 8, 12.5};
    double e[16];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) e[i * 4 + j] = fabs(y[i] - y[j]);
    dm_prune_cluster(4, e, 2, c);
    ck_assert(c[0] == 0 && c[1] == 0 && c[2] == 1 && c[3] == 1);
    /* representatives: by mass, then by centroid */
    const int cl[5] = {0, 0, 1, 1, 2};
    const double mass[5] = {1, 3, 5, 2, 1};
    int kept[3];
    dm_prune_representatives(5, cl, 3, NULL, 0, mass, kept);
    ck_assert(kept[0] == 1 && kept[1] == 2 && kept[2] == 4);
    const float w0[2] = {0, 0}, w1[2] = {1, 0}, w2[2] = {0.4f, 0}, w3[2] = {5, 5}, w4[2] = {9, 9};
    const float *const W[5] = {w0, w1, w2, w3, w4};
    const int cl2[5] = {0, 0, 0, 1, 1}; /* centroid of {0,1,0.4} = 0.467: item 2 */
    dm_prune_representatives(5, cl2, 2, W, 2, mass, kept);
    ck_assert(kept[0] == 2 && kept[1] == 3); /* tie 3 vs 4 (both at 8 from (7,7)): mass 2 > 1 */
    const double mass2[5] = {1, 3, 5, 2, 4};
    dm_prune_representatives(5, cl2, 2, W, 2, mass2, kept);
    ck_assert(kept[0] == 2 && kept[1] == 4); /* the same tie, now mass 4 > 2 */
    /* behaviour distance: the most co-activated pair is the closest */
    int64_t co[9] = {0, 10, 1, 10, 0, 2, 1, 2, 0};
    double dd[9];
    dm_prune_distance(3, co, NULL, 0, 0, dd);
    ck_assert(dd[1] < dd[5] && dd[5] < dd[2] && dd[0] == 0);
}
END_TEST

START_TEST(test_objective_and_search)
{
    /* 3 tokens over 4 experts, top-2 */
    const float p[12] = {0.5f, 0.3f, 0.15f, 0.05f,   /* top-2 mass 0.8 */
                         0.1f, 0.6f, 0.25f, 0.05f,   /* 0.85 */
                         0.4f, 0.1f, 0.45f, 0.05f};  /* 0.85 */
    const uint8_t drop3[4] = {1, 1, 1, 0}, drop0[4] = {0, 1, 1, 1};
    ck_assert(dm_prune_lost_mass(p, 3, 4, 2, drop3) == 0.0); /* expert 3 is never in a top-2 */
    /* without expert 0: 0.8 -> 0.45, 0.85 -> 0.85, 0.85 -> 0.55: lost (0.35 + 0.3) / 3 */
    ck_assert(fabs(dm_prune_lost_mass(p, 3, 4, 2, drop0) - 0.65 / 3) < 1e-7);
    int kept[3];
    double v = dm_prune_exhaustive(p, 3, 4, 2, 3, kept);
    ck_assert(v == 0.0 && kept[0] == 0 && kept[1] == 1 && kept[2] == 2);
    /* keep 2: the best pair by brute force over masks */
    double best = INFINITY;
    int bi = -1, bj = -1;
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++) {
            uint8_t m[4] = {0};
            m[i] = m[j] = 1;
            double l = dm_prune_lost_mass(p, 3, 4, 2, m);
            if (l < best) best = l, bi = i, bj = j;
        }
    v = dm_prune_exhaustive(p, 3, 4, 2, 2, kept);
    ck_assert(v == best && kept[0] == bi && kept[1] == bj);
}
END_TEST

/* ---- the rewrite on the shipped model ------------------------------------------------------- */

static const float *tensor(const dm_st_file *f, const dm_st_tensor *t, int n, const char *name)
{
    for (int i = 0; t && i < n; i++)
        if (!strcmp(t[i].name, name)) return t[i].data;
    const dm_st_tensor *x = f ? dm_st_find(f, name) : NULL;
    ck_assert_msg(x != NULL, "no tensor %s", name);
    return x->data;
}

static void swiglu(const float *g, const float *u, const float *dn, int D, int F, const float *h, float *acc, float w)
{
    float *a = malloc(sizeof(float) * F);
    for (int i = 0; i < F; i++) {
        double sg = 0, su = 0;
        for (int d = 0; d < D; d++) sg += (double)g[(size_t)i * D + d] * h[d], su += (double)u[(size_t)i * D + d] * h[d];
        a[i] = (float)(sg / (1 + exp(-sg)) * su);
    }
    for (int d = 0; d < D; d++) {
        double s = 0;
        for (int i = 0; i < F; i++) s += (double)dn[(size_t)d * F + i] * a[i];
        acc[d] += w * (float)s;
    }
    free(a);
}

/* DiT-MoE layer b on token h: softmax(gate h) over E rows (mask: logit -inf where 0), top-2,
 * weighted routed SwiGLUs (ascending expert id) + shared expert. Tensors from (t, n) or f. */
static void moe_layer(const dm_st_file *f, const dm_st_tensor *t, int n, int b, int E, int D, int F,
                      const uint8_t *mask, const float *h, float *out)
{
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.moe.gate.weight", b);
    const float *G = tensor(f, t, n, name);
    float p[64];
    double mx = -INFINITY, sum = 0;
    for (int e = 0; e < E; e++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += (double)G[(size_t)e * D + d] * h[d];
        p[e] = mask && !mask[e] ? -INFINITY : (float)s;
        if (p[e] > mx) mx = p[e];
    }
    for (int e = 0; e < E; e++) sum += p[e] = (float)exp(p[e] - mx);
    for (int e = 0; e < E; e++) p[e] = (float)(p[e] / sum);
    int i0 = 0, i1 = -1;
    for (int e = 1; e < E; e++)
        if (p[e] > p[i0]) i0 = e;
    for (int e = 0; e < E; e++)
        if (e != i0 && (i1 < 0 || p[e] > p[i1])) i1 = e;
    memset(out, 0, sizeof(float) * D);
    for (int e = 0; e < E; e++) {
        if (e != i0 && e != i1) continue;
        const char *part[3] = {"gate_proj", "up_proj", "down_proj"};
        const float *w[3];
        for (int q = 0; q < 3; q++) {
            snprintf(name, sizeof name, "blocks.%d.moe.experts.%d.%s.weight", b, e, part[q]);
            w[q] = tensor(f, t, n, name);
        }
        swiglu(w[0], w[1], w[2], D, F, h, out, p[e]);
    }
    const char *sp[3] = {"gate_proj", "up_proj", "down_proj"};
    const float *w[3];
    for (int q = 0; q < 3; q++) {
        snprintf(name, sizeof name, "blocks.%d.moe.shared_experts.%s.weight", b, sp[q]);
        w[q] = tensor(f, t, n, name);
    }
    swiglu(w[0], w[1], w[2], D, F, h, out, 1.0f);
}

static char model_path[512];
static const char *shipped(void)
{
    const char *src = getenv("DITMOE_SRC");
    snprintf(model_path, sizeof model_path, "%s/assets/ditmoe-fmnist.safetensors", src ? src : "..");
    return model_path;
}

START_TEST(test_rewrite_equals_masked_router)
{
    dm_st_file *f;
    ck_assert_int_eq(dm_st_open(shipped(), &f), DM_OK);
    dm_config cfg;
    ck_assert_int_eq(dm_config_from_file(f, &cfg), DM_OK);
    const int E = cfg.num_experts, D = cfg.hidden, F = cfg.expert_hidden, L = cfg.depth;
    ck_assert_int_eq(E, 8);
    static dm_prune_plan p;
    p.layers = L, p.E = E;
    const int drop[4][2] = {{2, 5}, {0, 7}, {3, 4}, {1, 6}};
    for (int l = 0; l < L; l++) {
        p.block[l] = l, p.keep[l] = 6;
        for (int e = 0, j = 0; e < E; e++)
            if (e != drop[l % 4][0] && e != drop[l % 4][1]) p.kept[l][j++] = e;
    }
    dm_prune_op *ops;
    int n_ops;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_OK);
    int nd = 0, nr = 0, nrows = 0;
    for (int i = 0; i < n_ops; i++) {
        nd += ops[i].op == DM_PRUNE_DROP;
        nr += ops[i].op == DM_PRUNE_RENAME;
        nrows += ops[i].op == DM_PRUNE_ROWS;
        if (!strcmp(ops[i].src, "blocks.0.moe.experts.3.up_proj.weight")) {
            ck_assert_int_eq(ops[i].op, DM_PRUNE_RENAME);
            ck_assert_str_eq(ops[i].dst, "blocks.0.moe.experts.2.up_proj.weight");
        }
    }
    ck_assert_int_eq(nd, L * 2 * 3);
    ck_assert_int_eq(nrows, L);
    ck_assert_int_gt(nr, 0);
    dm_st_tensor *t;
    int nt;
    void *owned;
    ck_assert_int_eq(dm_prune_apply(f, ops, n_ops, &t, &nt, &owned), DM_OK);
    ck_assert_int_eq(nt, dm_st_count(f) - L * 2 * 3);
    uint32_t seed = 1;
    for (int l = 0; l < L; l++) {
        uint8_t mask[8];
        for (int e = 0; e < E; e++) mask[e] = e != drop[l % 4][0] && e != drop[l % 4][1];
        for (int trial = 0; trial < 4; trial++) {
            float h[512], a[512], b[512];
            for (int d = 0; d < D; d++) {
                seed = seed * 1664525u + 1013904223u;
                h[d] = (float)((seed >> 8) % 2001) / 1000.0f - 1.0f;
            }
            moe_layer(f, NULL, 0, l, E, D, F, mask, h, a);        /* original, logits at -inf */
            moe_layer(NULL, t, nt, l, p.keep[l], D, F, NULL, h, b);  /* pruned model */
            for (int d = 0; d < D; d++) ck_assert_msg(a[d] == b[d], "layer %d d %d: %g vs %g", l, d, a[d], b[d]);
            /* and it is not the unpruned layer (the test can fail) */
            moe_layer(f, NULL, 0, l, E, D, F, NULL, h, b);
            double diff = 0;
            for (int d = 0; d < D; d++) diff += fabs(a[d] - b[d]);
            ck_assert(diff > 0); /* renormalised over the kept experts: never the same */
        }
    }
    char *js;
    ck_assert_int_eq(dm_prune_metadata(f, &p, "test", &js), DM_OK);
    cJSON *root = cJSON_Parse(js);
    ck_assert_int_eq(cJSON_GetObjectItem(root, "num_experts")->valueint, 6);
    ck_assert_int_eq(cJSON_GetObjectItem(root, "depth")->valueint, L);
    cJSON *kept = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "pruned"), "kept");
    ck_assert_int_eq(cJSON_GetArraySize(kept), L);
    ck_assert_int_eq(cJSON_GetArrayItem(cJSON_GetArrayItem(kept, 0), 2)->valueint, 3);
    cJSON_Delete(root);
    free(js);
    dm_prune_tensors_free(t, nt, owned);
    /* bad plans */
    p.keep[1] = 1;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_ERR_ARG); /* ops untouched */
    ck_assert(strstr(dm_last_error(), "--keep 1"));
    free(ops);
    dm_config_free(&cfg);
    dm_st_close(f);
}
END_TEST

/* --layers: only layers 0 and 1 pruned to 6. The file loads (each layer's expert count from its
 * router rows), its routes stay below each layer's count, the dump shape keeps E = 8; a layer
 * with fewer rows than top_k is refused by the loader with one line naming the tensor. */
START_TEST(test_some_layers)
{
    dm_st_file *f;
    ck_assert_int_eq(dm_st_open(shipped(), &f), DM_OK);
    dm_config cfg;
    ck_assert_int_eq(dm_config_from_file(f, &cfg), DM_OK);
    const int E = cfg.num_experts, L = cfg.depth;
    static dm_prune_plan p;
    p.layers = L, p.E = E;
    for (int l = 0; l < L; l++) {
        p.block[l] = l;
        p.keep[l] = l < 2 ? 6 : E;
        for (int e = 0, j = 0; e < E; e++)
            if (l >= 2 || (e != 1 + l && e != 5)) p.kept[l][j++] = e; /* drop {1,5}, {2,5} */
    }
    dm_prune_op *ops;
    int n_ops, nd = 0, nrows = 0;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_OK);
    for (int i = 0; i < n_ops; i++) nd += ops[i].op == DM_PRUNE_DROP, nrows += ops[i].op == DM_PRUNE_ROWS;
    ck_assert_int_eq(nd, 2 * 2 * 3);
    ck_assert_int_eq(nrows, 2);
    char *js;
    ck_assert_int_eq(dm_prune_metadata(f, &p, "test", &js), DM_OK);
    cJSON *root = cJSON_Parse(js);
    ck_assert_int_eq(cJSON_GetObjectItem(root, "num_experts")->valueint, E); /* the largest */
    cJSON *kept = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "pruned"), "kept");
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetArrayItem(kept, 0)), 6);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetArrayItem(kept, 3)), E);
    cJSON_Delete(root);
    free(js);
    char path[256], bad[256];
    snprintf(path, sizeof path, "/tmp/test_prune_%d_some.safetensors", (int)getpid());
    snprintf(bad, sizeof bad, "/tmp/test_prune_%d_bad.safetensors", (int)getpid());
    ck_assert_int_eq(dm_prune_write(f, &cfg, &p, "test", path), DM_OK);

    dm_model *m, *m0;
    ck_assert_msg(dm_model_load(path, &m) == DM_OK, "%s", dm_last_error());
    ck_assert_int_eq(dm_model_load(shipped(), &m0), DM_OK);
    ck_assert_int_eq(dm_model_config(m)->num_experts, E);
    const int B = 2, C = cfg.in_channels, S = cfg.input_size, T = (S / cfg.patch) * (S / cfg.patch);
    const int k = cfg.top_k, Co = cfg.out_channels;
    float *x = malloc(sizeof(float) * B * C * S * S), *o = malloc(sizeof(float) * B * Co * S * S);
    float *o0 = malloc(sizeof(float) * B * Co * S * S);
    int32_t *ids = malloc(sizeof(int32_t) * L * B * T * k), *ids0 = malloc(sizeof(int32_t) * L * B * T * k);
    uint32_t seed = 7;
    for (int i = 0; i < B * C * S * S; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) % 2001) / 1000.0f - 1.0f;
    }
    const float t[2] = {0.7f, 0.3f};
    const int64_t y[2] = {3, cfg.num_classes};
    dm_routes r = {.ids = ids}, r0 = {.ids = ids0};
    ck_assert_int_eq(dm_model_forward(m, B, x, t, y, o, &r), DM_OK);
    ck_assert_int_eq(dm_model_forward(m0, B, x, t, y, o0, &r0), DM_OK);
    int seen[4][8] = {{0}};
    for (int l = 0; l < L; l++)
        for (int i = 0; i < B * T * k; i++) {
            const int e = ids[(size_t)l * B * T * k + i];
            ck_assert_msg(e >= 0 && e < p.keep[l], "layer %d: expert %d", l, e);
            if (l < 4 && e < 8) seen[l][e] = 1;
        }
    ck_assert(seen[2][6] || seen[2][7] || seen[3][6] || seen[3][7]); /* unpruned layers use 6, 7 */
    double diff = 0;
    for (int i = 0; i < B * Co * S * S; i++) {
        ck_assert(isfinite(o[i]));
        diff += fabs(o[i] - o0[i]);
    }
    ck_assert(diff > 0); /* the pruned layers change the output */
    dm_model_free(m);
    dm_model_free(m0);
    free(x), free(o), free(o0), free(ids), free(ids0);

    /* a layer below top_k: the loader names the router */
    for (int i = 0; i < n_ops; i++)
        if (!strcmp(ops[i].src, "blocks.1.moe.gate.weight")) ops[i].n_rows = 1;
    dm_st_tensor *tt;
    int nt;
    void *owned;
    ck_assert_int_eq(dm_prune_apply(f, ops, n_ops, &tt, &nt, &owned), DM_OK);
    const char *meta = dm_st_meta(f, "ditmoe");
    const char *kv[] = {"ditmoe", meta, NULL};
    ck_assert_int_eq(dm_st_write(bad, nt, tt, kv), DM_OK);
    dm_prune_tensors_free(tt, nt, owned);
    ck_assert_int_eq(dm_model_load(bad, &m), DM_ERR_FORMAT);
    ck_assert_msg(strstr(dm_last_error(), "blocks.1.moe.gate.weight") &&
                  strstr(dm_last_error(), "[1,128] expected [8,128]"), "%s", dm_last_error());
    free(ops);
    unlink(path);
    unlink(bad);
    dm_config_free(&cfg);
    dm_st_close(f);
}
END_TEST

/* ProMoE (token choice): prototype rows and experts dropped in the MoE blocks 1 and 3, the
 * unconditional expert (id 8) kept and renumbered to 6; expert choice and unequal layers are
 * refused. */
START_TEST(test_promoe_ops)
{
    char path[512];
    const char *src = getenv("DITMOE_SRC");
    snprintf(path, sizeof path, "%s/assets/promoe-fmnist.safetensors", src ? src : "..");
    dm_st_file *f;
    ck_assert_int_eq(dm_st_open(path, &f), DM_OK);
    dm_config cfg;
    ck_assert_int_eq(dm_config_from_file(f, &cfg), DM_OK);
    ck_assert_int_eq(cfg.num_experts, 8);
    static dm_prune_plan p;
    p.layers = 2, p.E = 8;
    for (int l = 0; l < 2; l++) {
        p.block[l] = 2 * l + 1, p.keep[l] = 6;
        for (int e = 0, j = 0; e < 8; e++)
            if (e != 2 + l && e != 7) p.kept[l][j++] = e;
    }
    dm_prune_op *ops;
    int n_ops, nd = 0, nrows = 0, uncond = 0;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_OK);
    for (int i = 0; i < n_ops; i++) {
        nd += ops[i].op == DM_PRUNE_DROP;
        if (ops[i].op == DM_PRUNE_ROWS) {
            nrows++;
            ck_assert(strstr(ops[i].src, "cluster_centers") && ops[i].n_rows == 6);
        }
        if (!strcmp(ops[i].src, "blocks.3.mlp.experts.8.down_proj.bias")) {
            uncond++;
            ck_assert_str_eq(ops[i].dst, "blocks.3.mlp.experts.6.down_proj.bias");
        }
        if (!strcmp(ops[i].src, "blocks.1.mlp.experts.3.up_proj.weight"))
            ck_assert_str_eq(ops[i].dst, "blocks.1.mlp.experts.2.up_proj.weight");
        ck_assert(strncmp(ops[i].src, "blocks.0.", 9) || ops[i].op == DM_PRUNE_COPY); /* dense */
    }
    ck_assert_int_eq(nd, 2 * 2 * 4); /* 2 experts x (up, down) x (weight, bias) per layer */
    ck_assert_int_eq(nrows, 2);
    ck_assert_int_eq(uncond, 1);
    free(ops);
    p.keep[1] = 7, p.kept[1][6] = 7;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_ERR_ARG);
    ck_assert(strstr(dm_last_error(), "same number of experts"));
    p.keep[1] = 6;
    cfg.promoe_ec = 1;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, &p, &ops, &n_ops), DM_ERR_ARG);
    ck_assert(strstr(dm_last_error(), "expert choice"));
    dm_config_free(&cfg);
    dm_st_close(f);
}
END_TEST

/* dm_prune_stun is distance + clustering + representatives. */
START_TEST(test_stun_composed)
{
    const int64_t co[16] = {0, 9, 1, 0, 9, 0, 2, 1, 1, 2, 0, 8, 0, 1, 8, 0};
    const double mass[4] = {1, 2, 3, 4};
    int kept[2], cl[4], c2[4], k2[2];
    ck_assert_int_eq(dm_prune_stun(4, co, NULL, 0, 0, NULL, 0, mass, 2, kept, cl), DM_OK);
    double d[16];
    dm_prune_distance(4, co, NULL, 0, 0, d);
    dm_prune_cluster(4, d, 2, c2);
    dm_prune_representatives(4, c2, 2, NULL, 0, mass, k2);
    ck_assert(!memcmp(cl, c2, sizeof cl) && kept[0] == k2[0] && kept[1] == k2[1]);
    ck_assert(cl[0] == cl[1] && cl[2] == cl[3] && cl[0] != cl[2]); /* {0,1} and {2,3} */
    ck_assert(kept[0] == 1 && kept[1] == 3);                       /* the larger masses */
    ck_assert_int_eq(dm_prune_stun(4, co, NULL, 0, 0, NULL, 0, mass, 5, kept, NULL), DM_ERR_ARG);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("prune");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_cluster);
    tcase_add_test(tc, test_objective_and_search);
    tcase_add_test(tc, test_rewrite_equals_masked_router);
    tcase_add_test(tc, test_some_layers);
    tcase_add_test(tc, test_stun_composed);
    tcase_add_test(tc, test_promoe_ops);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

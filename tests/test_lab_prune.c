/* Model-level pruning check (docs/moe-lab.md §5, §7.9): the forward of a pruned DiT-MoE file
 * (dm_prune_ops / dm_prune_apply / dm_st_write, as ditmoe-prune writes it) equals the ORIGINAL
 * model run with the dropped experts' router logits at -inf (dm_lab_set_drop: softmax over the
 * kept experts, the split MoE path), bit for bit, for conditional and null-class rows at several
 * timesteps; and differs from the unmasked original (so the check can fail). */
#include "ditmoe.h"
#include "dit/model.h"
#include "router/prune.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_model[4096];

/* Drop experts {l, 7 - l} of MoE layer l (E = 8): a different pair in every layer. */
static void drops_of(int l, int E, uint8_t *drop)
{
    memset(drop, 0, (size_t)E);
    drop[l % E] = 1;
    drop[(E - 1 - l) % E] = 1;
}

static void write_pruned(const char *out)
{
    dm_st_file *f = NULL;
    dm_config cfg = {0};
    ck_assert_int_eq(dm_st_open(g_model, &f), DM_OK);
    ck_assert_int_eq(dm_config_from_file(f, &cfg), DM_OK);
    ck_assert_int_eq(cfg.num_experts, 8);
    dm_prune_plan *plan = calloc(1, sizeof *plan);
    ck_assert_ptr_nonnull(plan);
    plan->layers = cfg.depth;
    plan->E = cfg.num_experts;
    plan->keep = 6;
    for (int l = 0; l < cfg.depth; l++) {
        uint8_t drop[8];
        drops_of(l, 8, drop);
        plan->block[l] = l;
        for (int e = 0, j = 0; e < 8; e++)
            if (!drop[e]) plan->kept[l][j++] = e;
    }
    dm_prune_op *ops = NULL;
    dm_st_tensor *t = NULL;
    void *owned = NULL;
    char *meta = NULL;
    int n_ops = 0, nt = 0;
    ck_assert_int_eq(dm_prune_ops(f, &cfg, plan, &ops, &n_ops), DM_OK);
    ck_assert_int_eq(dm_prune_apply(f, ops, n_ops, &t, &nt, &owned), DM_OK);
    ck_assert_int_eq(dm_prune_metadata(f, plan, "test", &meta), DM_OK);
    const char *fmt = dm_st_meta(f, "format");
    const char *kv[] = {"ditmoe", meta, fmt ? "format" : NULL, fmt, NULL};
    ck_assert_int_eq(dm_st_write(out, nt, t, kv), DM_OK);
    free(meta);
    dm_prune_tensors_free(t, nt, owned);
    free(ops);
    free(plan);
    dm_config_free(&cfg);
    dm_st_close(f);
}

START_TEST(test_pruned_equals_masked)
{
    char out[64];
    snprintf(out, sizeof out, "/tmp/ditmoe-lab-prune-%d.safetensors", (int)getpid());
    write_pruned(out);
    dm_model *orig = NULL, *pruned = NULL;
    ck_assert_int_eq(dm_model_load(g_model, &orig), DM_OK);
    ck_assert_int_eq(dm_model_load(out, &pruned), DM_OK);
    unlink(out);
    const dm_config *c = dm_model_config(orig);
    ck_assert_int_eq(dm_model_config(pruned)->num_experts, 6);
    const int B = 6, n = c->in_channels * c->input_size * c->input_size;
    const int no = c->out_channels * c->input_size * c->input_size;
    float *x = malloc(sizeof(float) * B * n), t[6] = {0.98f, 0.5f, 0.02f, 0.75f, 0.3f, 0.5f};
    int64_t y[6] = {0, 3, 7, 9, c->num_classes, c->num_classes};
    float *a = malloc(sizeof(float) * B * no), *b = malloc(sizeof(float) * B * no);
    float *u = malloc(sizeof(float) * B * no);
    uint64_t r = 0x243F6A8885A308D3ull;
    for (int i = 0; i < B * n; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(r >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    }
    ck_assert_int_eq(dm_model_forward(orig, B, x, t, y, u, NULL), DM_OK); /* unmasked */
    for (int l = 0; l < dm_config_moe_layers(c); l++) {
        uint8_t drop[8];
        drops_of(l, 8, drop);
        ck_assert_int_eq(dm_lab_set_drop(orig, l, drop), DM_OK);
    }
    ck_assert_int_eq(dm_model_forward(pruned, B, x, t, y, a, NULL), DM_OK);
    ck_assert_int_eq(dm_model_forward(orig, B, x, t, y, b, NULL), DM_OK);
    int first = -1;
    for (int i = 0; i < B * no && first < 0; i++)
        if (memcmp(&a[i], &b[i], sizeof(float))) first = i;
    ck_assert_msg(first < 0, "pruned != masked original at element %d: %.9g vs %.9g", first,
                  first >= 0 ? (double)a[first] : 0.0, first >= 0 ? (double)b[first] : 0.0);
    ck_assert_msg(memcmp(a, u, sizeof(float) * B * no) != 0, "masking changed nothing");
    /* a layer that keeps fewer than k experts is refused */
    uint8_t all[8];
    memset(all, 1, sizeof all);
    all[0] = 0;
    ck_assert_int_eq(dm_lab_set_drop(orig, 0, all), DM_ERR_ARG);
    ck_assert_int_eq(dm_lab_set_drop(orig, 99, all), DM_ERR_ARG);
    dm_model_lab_free(orig);
    dm_model_lab_free(pruned);
    dm_model_free(orig);
    dm_model_free(pruned);
    free(x), free(a), free(b), free(u);
}
END_TEST

int main(void)
{
    const char *src = getenv("DITMOE_SRC");
    snprintf(g_model, sizeof g_model, "%s/assets/ditmoe-fmnist.safetensors", src ? src : "..");
    dm_set_log_level(DM_LOG_QUIET);
    Suite *s = suite_create("lab_prune");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_pruned_equals_masked);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

/* Model-level pruning check (docs/moe-lab.md §5, §7.7): the forward of a pruned DiT-MoE file
 * (written by the ditmoe-prune program, 6 of 8 experts per layer) equals the ORIGINAL
 * model run with the dropped experts' router logits at -inf (dm_lab_set_drop: softmax over the
 * kept experts, the split MoE path), bit for bit, for conditional and null-class rows at several
 * timesteps; and differs from the unmasked original (so the check can fail). */
#include "ditmoe.h"
#include "dit/model.h"

#include <check.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_model[4096], g_bin[4096];

/* Prune the shipped model with the ditmoe-prune program (STUN, co-activation from a short dump
 * of ditmoe-sample), into dir/p.safetensors; drop [L][8] from its "pruned" metadata. */
static void write_pruned(const char *dir, const char *out, uint8_t drop[][8], int L)
{
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "'%s/ditmoe-sample' --model '%s' --class 0,7 -n 2 --steps 6 --seed 3 "
             "--latent-only --save-latent '%s/z.npy' --dump-routing '%s/r.dmr' -q", g_bin, g_model,
             dir, dir);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "'%s/ditmoe-prune' '%s' --keep 6 --method stun --routes '%s/r.dmr' "
             "-o '%s' -q", g_bin, g_model, dir, out);
    ck_assert_int_eq(system(cmd), 0);
    dm_st_file *f = NULL;
    ck_assert_int_eq(dm_st_open(out, &f), DM_OK);
    const char *meta = dm_st_meta(f, "ditmoe");
    ck_assert_ptr_nonnull(meta);
    cJSON *root = cJSON_Parse(meta);
    const cJSON *kept = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "pruned"), "kept");
    ck_assert_int_eq(cJSON_GetArraySize(kept), L);
    for (int l = 0; l < L; l++) {
        memset(drop[l], 1, 8);
        const cJSON *row = cJSON_GetArrayItem(kept, l), *id;
        ck_assert_int_eq(cJSON_GetArraySize(row), 6);
        cJSON_ArrayForEach(id, row) drop[l][id->valueint] = 0;
    }
    cJSON_Delete(root);
    dm_st_close(f);
}

START_TEST(test_pruned_equals_masked)
{
    char dir[] = "/tmp/ditmoe-lab-prune-XXXXXX", out[64];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(out, sizeof out, "%s/p.safetensors", dir);
    uint8_t drop[4][8];
    write_pruned(dir, out, drop, 4);
    dm_model *orig = NULL, *pruned = NULL;
    ck_assert_int_eq(dm_model_load(g_model, &orig), DM_OK);
    ck_assert_int_eq(dm_model_load(out, &pruned), DM_OK);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
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
    for (int l = 0; l < dm_config_moe_layers(c); l++)
        ck_assert_int_eq(dm_lab_set_drop(orig, l, drop[l]), DM_OK);
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
    const char *src = getenv("DITMOE_SRC"), *bin = getenv("DITMOE_BIN");
    snprintf(g_model, sizeof g_model, "%s/assets/ditmoe-fmnist.safetensors", src ? src : "..");
    snprintf(g_bin, sizeof g_bin, "%s", bin ? bin : "bin");
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

/* ditmoe-forward: one forward pass of a DiT-MoE model on inputs from .npy files.
 *   ditmoe-forward --model M.safetensors --x x.npy --t t.npy --y y.npy --out out.npy
 *                  [--routes routes.npy] [--threads N] [--bench N] [--backend cpu]
 * Exit codes (ditmoe.h dm_exit_code): 0 ok, 2 bad input (flags, missing or malformed files,
 * shapes), 1 runtime failure. */
#include "flags.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROG "ditmoe-forward"

typedef struct {
    const char *model, *x, *t, *y, *out, *routes;
    int bench;
    dm_cli_common common;
    dm_cli_overrides ov; /* what a .pt's weights cannot tell */
    dm_cli_lab_flags lab; /* MoE lab (issue 14) */
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    {'\0', "model", DM_OPT_STR, &A.model, 0, 0, "FILE", "none (required)",
     "DiT-MoE / ProMoE .safetensors or PyTorch .pt/.pth", NULL},
    DM_CLI_OVERRIDE_OPTS(A.ov),
    {'\0', "x", DM_OPT_STR, &A.x, 0, 0, "FILE", "none (required)",
     "float32 [B,C,H,W] latent input (.npy)", NULL},
    {'\0', "t", DM_OPT_STR, &A.t, 0, 0, "FILE", "none (required)",
     "float32 [B] timesteps, fed to the embedder as given", NULL},
    {'\0', "y", DM_OPT_STR, &A.y, 0, 0, "FILE", "none (required)",
     "int64 (or int32) [B] labels, null class = number of classes", NULL},
    {'\0', "out", DM_OPT_STR, &A.out, 0, 0, "FILE", "none (required unless --bench)",
     "float32 [B,Cout,H,W] output", NULL},
    {'\0', "routes", DM_OPT_STR, &A.routes, 0, 0, "FILE", "none",
     "int32 [layers,B*T,k] chosen experts, descending gate weight", NULL},
    {'\0', "bench", DM_OPT_INT, &A.bench, 0, 100000, "N", "0",
     "time N forwards after one warm-up; print forward_ms_median", NULL},
    DM_CLI_LAB_OPTS(A.lab),
    DM_CLI_PRECISION_OPTS(A.common),
    DM_CLI_COMMON_OPTS(A.common, "0 = all cores"),
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "--model M.safetensors --x x.npy --t t.npy --y y.npy --out out.npy [options]",
    "One forward pass of a DiT-MoE / ProMoE model on inputs from .npy files.", OPTS, NULL, NULL};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Read x, t, y and check them against the model: shapes, dtypes. y may be int64 or int32. */
static dm_status read_inputs(const args_t *a, const dm_config *c, dm_npy *x, dm_npy *t, dm_npy *y,
                             int64_t **labels)
{
    dm_status st = dm_npy_read_expect(a->x, DM_F32, 4, x);
    if (st) return st;
    int B = (int)x->shape[0];
    if (x->shape[1] != c->in_channels || x->shape[2] != c->input_size || x->shape[3] != c->input_size)
        return dm_fail(DM_ERR_ARG, "%s: --x shape [%lld,%lld,%lld,%lld] expected [B,%d,%d,%d]", a->x,
                       (long long)x->shape[0], (long long)x->shape[1], (long long)x->shape[2],
                       (long long)x->shape[3], c->in_channels, c->input_size, c->input_size);
    if (B < 1) return dm_fail(DM_ERR_ARG, "%s: --x has batch size 0", a->x);
    size_t bad = 0;
    if (!dm_all_finite((const float *)x->data, (size_t)B * c->in_channels * c->input_size * c->input_size, &bad))
        return dm_fail(DM_ERR_ARG, "%s: element %zu of --x is not finite", a->x, bad);
    if ((st = dm_npy_read_expect(a->t, DM_F32, 1, t))) return st;
    if (t->shape[0] == B && !dm_all_finite((const float *)t->data, (size_t)B, &bad))
        return dm_fail(DM_ERR_ARG, "%s: element %zu of --t is not finite", a->t, bad);
    if (t->shape[0] != B)
        return dm_fail(DM_ERR_ARG, "%s: --t has %lld timesteps, expected %d (batch of --x)", a->t,
                       (long long)t->shape[0], B);
    if ((st = dm_npy_read(a->y, y))) return st;
    if ((y->dtype != DM_I64 && y->dtype != DM_I32) || y->ndim != 1)
        return dm_fail(DM_ERR_ARG, "%s: --y must be int64 [B], found %s with %d dims", a->y,
                       dm_dtype_name(y->dtype), y->ndim);
    if (y->shape[0] != B)
        return dm_fail(DM_ERR_ARG, "%s: --y has %lld labels, expected %d (batch of --x)", a->y,
                       (long long)y->shape[0], B);
    *labels = malloc((size_t)B * sizeof(int64_t));
    if (!*labels) return dm_fail(DM_ERR_NOMEM, "out of memory");
    for (int b = 0; b < B; b++)
        (*labels)[b] = y->dtype == DM_I64 ? ((int64_t *)y->data)[b] : ((int32_t *)y->data)[b];
    return DM_OK;
}

int main(int argc, char **argv)
{
    dm_cli_common_init(&A.common);
    dm_cli_overrides_init(&A.ov);
    int done = 0;
    dm_status st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    const char *missing = !A.model ? "--model" : !A.x ? "--x" : !A.t ? "--t" : !A.y ? "--y"
                          : (!A.out && !A.bench) ? "--out" : NULL;
    if (missing)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "missing required flag %s (see --help)",
                                         missing));
    if (A.lab.self_contrast)
        return dm_cli_exit(PROG, dm_fail(DM_ERR_ARG, "--self-contrast: a sampling option "
                                         "(ditmoe-sample, ditmoe-batch), not a single forward"));
    dm_cli_common_apply(&A.common, -1);
    {
        dm_precision prec;
        int qb;
        if ((st = dm_cli_precision(&A.common, &prec, &qb))) return dm_cli_exit(PROG, st);
    }
    const args_t a = A;

    dm_model *m = NULL;
    dm_npy x = {0}, t = {0}, y = {0};
    int64_t *labels = NULL;
    float *out = NULL, *t01 = NULL;
    int64_t *image = NULL;
    uint8_t *branch = NULL;
    dm_routes routes = {0};
    dm_load_opts lo;
    dm_cli_common_load_opts(&a.common, &lo);
    if ((st = dm_cli_overrides_get(&A.ov, &lo.cfg))) goto done;
    if ((st = dm_model_load_opts(a.model, &lo, &m))) goto done;
    dm_lab_opts lab;
    if ((st = dm_cli_lab_opts(&A.lab, &lab)) || (st = dm_model_set_lab(m, &lab))) goto done;
    const dm_config *c = dm_model_config(m);
    if ((st = read_inputs(&a, c, &x, &t, &y, &labels))) goto done;
    const int B = (int)x.shape[0], T = (c->input_size / c->patch) * (c->input_size / c->patch);
    size_t n_out = (size_t)B * c->out_channels * c->input_size * c->input_size;
    out = malloc(n_out * sizeof(float));
    const int L_moe = dm_config_moe_layers(c), K = dm_model_route_slots(m);
    if (a.routes) routes.ids = malloc((size_t)L_moe * B * T * K * sizeof(int32_t));
    /* MoE lab rows: image b, branch by label, t01 = t / time_scale (flow) or t / 999 (DDPM) */
    image = malloc((size_t)B * sizeof(int64_t));
    branch = malloc((size_t)B);
    t01 = malloc((size_t)B * sizeof(float));
    if (!out || (a.routes && !routes.ids) || !image || !branch || !t01) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory");
        goto done;
    }
    const float tdiv = c->objective == DM_OBJ_RF ? (c->time_scale > 0 ? c->time_scale : 1.0f) : 999.0f;
    for (int b = 0; b < B; b++) {
        image[b] = b;
        branch[b] = labels[b] == c->num_classes ? DM_BRANCH_UNCOND : DM_BRANCH_COND;
        t01[b] = ((const float *)t.data)[b] / tdiv;
    }
    const dm_forward_rows rows = {image, branch, t01, DM_WEAK_RANK2, NULL};
    if ((st = dm_model_lab_begin(m, B))) goto done;
    dm_forward_report_nonfinite(1);
    if ((st = dm_model_forward_rows(m, B, x.data, t.data, labels, &rows, out,
                                    a.routes ? &routes : NULL)))
        goto done;
    if (a.bench > 0) {
        double *ms = malloc((size_t)a.bench * sizeof(double));
        if (!ms) {
            st = dm_fail(DM_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (int i = 0; i < a.bench && st == DM_OK; i++) {
            double t0 = dm_time_sec();
            st = dm_model_forward_rows(m, B, x.data, t.data, labels, &rows, out, NULL);
            ms[i] = 1e3 * (dm_time_sec() - t0);
        }
        qsort(ms, (size_t)a.bench, sizeof *ms, cmp_double);
        if (st == DM_OK)
            printf("forward_ms_median=%.3f batch=%d threads=%d\n", ms[a.bench / 2], B, dm_get_threads());
        free(ms);
        if (st) goto done;
    }
    if (a.out) {
        int64_t shape[4] = {B, c->out_channels, c->input_size, c->input_size};
        if ((st = dm_npy_write(a.out, DM_F32, 4, shape, out))) goto done;
    }
    if (a.routes) {
        int64_t shape[3] = {L_moe, (int64_t)B * T, K};
        if ((st = dm_npy_write(a.routes, DM_I32, 3, shape, routes.ids))) goto done;
    }
done:
    free(out);
    free(t01);
    free(image);
    free(branch);
    dm_model_lab_free(m);
    free(routes.ids);
    free(labels);
    dm_npy_free(&x);
    dm_npy_free(&t);
    dm_npy_free(&y);
    dm_model_free(m);
    return dm_cli_exit(PROG, st);
}

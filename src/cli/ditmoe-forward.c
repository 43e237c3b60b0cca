/* ditmoe-forward: one forward pass of a DiT-MoE model on inputs from .npy files.
 *   ditmoe-forward --model M.safetensors --x x.npy --t t.npy --y y.npy --out out.npy
 *                  [--routes routes.npy] [--threads N] [--bench N] */
#include "ditmoe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ditmoe-forward --model M.safetensors --x x.npy --t t.npy --y y.npy --out out.npy\n"
            "  --model FILE    DiT-MoE safetensors file (required)\n"
            "  --x FILE        float32 [B,C,H,W] latent input (required)\n"
            "  --t FILE        float32 [B] timesteps, fed to the embedder as given (required)\n"
            "  --y FILE        int64 [B] labels, null class = number of classes (required)\n"
            "  --out FILE      float32 [B,Cout,H,W] output (required unless --bench)\n"
            "  --routes FILE   int32 [layers,B*T,k] chosen experts, descending gate weight\n"
            "  --threads N     threads (default: all cores)\n"
            "  --bench N       time N forwards after one warm-up; print forward_ms_median\n"
            "  -v, -q          verbose / quiet\n"
            "  --help, --version\n");
}

static int fail(dm_status st)
{
    fprintf(stderr, "ditmoe-forward: %s\n", dm_last_error());
    return dm_exit_code(st);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    const char *model, *x, *t, *y, *out, *routes;
    int threads, bench;
} args_t;

static dm_status parse(int argc, char **argv, args_t *a)
{
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char **dst = !strcmp(s, "--model")    ? &a->model
                           : !strcmp(s, "--x")      ? &a->x
                           : !strcmp(s, "--t")      ? &a->t
                           : !strcmp(s, "--y")      ? &a->y
                           : !strcmp(s, "--out")    ? &a->out
                           : !strcmp(s, "--routes") ? &a->routes
                                                    : NULL;
        int *num = !strcmp(s, "--threads") ? &a->threads : !strcmp(s, "--bench") ? &a->bench : NULL;
        if (!strcmp(s, "-v")) {
            dm_set_log_level(DM_LOG_VERBOSE);
        } else if (!strcmp(s, "-q")) {
            dm_set_log_level(DM_LOG_QUIET);
        } else if (dst || num) {
            if (i + 1 >= argc) return dm_fail(DM_ERR_ARG, "%s needs a value", s);
            const char *v = argv[++i];
            if (dst) {
                *dst = v;
            } else {
                char *end;
                long n = strtol(v, &end, 10);
                if (*end || n < 0 || n > 100000)
                    return dm_fail(DM_ERR_ARG, "%s: '%s' is not a non-negative integer", s, v);
                *num = (int)n;
            }
        } else {
            return dm_fail(DM_ERR_ARG, "unknown flag '%s' (see --help)", s);
        }
    }
    const char *missing = !a->model ? "--model" : !a->x ? "--x" : !a->t ? "--t" : !a->y ? "--y"
                          : (!a->out && !a->bench) ? "--out" : NULL;
    if (missing) return dm_fail(DM_ERR_ARG, "missing required flag %s (see --help)", missing);
    return DM_OK;
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
    if ((st = dm_npy_read_expect(a->t, DM_F32, 1, t))) return st;
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
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("ditmoe-forward %s\n", DITMOE_VERSION);
            return 0;
        }
    }
    args_t a = {0};
    dm_status st = parse(argc, argv, &a);
    if (st) return fail(st);
    dm_set_threads(a.threads);

    dm_model *m = NULL;
    dm_npy x = {0}, t = {0}, y = {0};
    int64_t *labels = NULL;
    float *out = NULL;
    dm_routes routes = {0};
    if ((st = dm_model_load(a.model, &m))) goto done;
    const dm_config *c = dm_model_config(m);
    if ((st = read_inputs(&a, c, &x, &t, &y, &labels))) goto done;
    const int B = (int)x.shape[0], T = (c->input_size / c->patch) * (c->input_size / c->patch);
    size_t n_out = (size_t)B * c->out_channels * c->input_size * c->input_size;
    out = malloc(n_out * sizeof(float));
    const int L_moe = dm_config_moe_layers(c);
    if (a.routes) routes.ids = malloc((size_t)L_moe * B * T * c->top_k * sizeof(int32_t));
    if (!out || (a.routes && !routes.ids)) {
        st = dm_fail(DM_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = dm_model_forward(m, B, x.data, t.data, labels, out, a.routes ? &routes : NULL)))
        goto done;
    if (a.bench > 0) {
        double *ms = malloc((size_t)a.bench * sizeof(double));
        if (!ms) {
            st = dm_fail(DM_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (int i = 0; i < a.bench && st == DM_OK; i++) {
            double t0 = dm_time_sec();
            st = dm_model_forward(m, B, x.data, t.data, labels, out, NULL);
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
        int64_t shape[3] = {L_moe, (int64_t)B * T, c->top_k};
        if ((st = dm_npy_write(a.routes, DM_I32, 3, shape, routes.ids))) goto done;
    }
done:
    free(out);
    free(routes.ids);
    free(labels);
    dm_npy_free(&x);
    dm_npy_free(&t);
    dm_npy_free(&y);
    dm_model_free(m);
    return st ? fail(st) : 0;
}

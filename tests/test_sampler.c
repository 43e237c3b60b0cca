/* Sampler unit tests (Check): Philox4x32-10 known-answer vectors, noise statistics and keying,
 * DDPM respacing and tables against vae_samplers.md B.1, and every sampler loop driven by an
 * analytic fake model whose exact answer is known (point-mass data). */
#include "ditmoe.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- Philox / noise */

/* Published Philox4x32-10 known-answer vectors (Random123 kat_vectors). */
START_TEST(test_philox_kat)
{
    static const uint32_t ctr[3][4] = {{0, 0, 0, 0},
                                       {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                       {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
    static const uint32_t key[3][2] = {{0, 0}, {0xffffffffu, 0xffffffffu},
                                       {0xa4093822u, 0x299f31d0u}};
    static const uint32_t want[3][4] = {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
                                        {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
                                        {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
    for (int v = 0; v < 3; v++) {
        uint32_t out[4];
        dm_philox4x32(ctr[v], key[v], out);
        for (int k = 0; k < 4; k++)
            ck_assert_msg(out[k] == want[v][k], "vector %d word %d: %08x expected %08x", v, k,
                          out[k], want[v][k]);
    }
}
END_TEST

START_TEST(test_noise_stats_and_keys)
{
    const size_t n = 200003; /* not a multiple of 4: the tail block is cut */
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    dm_noise_normal(42, 7, 3, n, a);
    double m = 0, m2 = 0, m4 = 0;
    for (size_t i = 0; i < n; i++) {
        m += a[i];
        m2 += (double)a[i] * a[i];
        m4 += (double)a[i] * a[i] * a[i] * a[i];
    }
    m /= n;
    m2 /= n;
    m4 /= n;
    /* N(0,1): mean 0 (sd 1/sqrt(n) = 0.0022), var 1 (sd 0.0032), 4th moment 3 (sd ~0.022). */
    ck_assert_msg(fabs(m) < 0.012, "mean %g", m);
    ck_assert_msg(fabs(m2 - 1) < 0.016, "var %g", m2);
    ck_assert_msg(fabs(m4 - 3) < 0.12, "4th moment %g", m4);
    /* deterministic, and a prefix of a longer draw */
    dm_noise_normal(42, 7, 3, 10, b);
    ck_assert(!memcmp(a, b, 10 * sizeof(float)));
    /* seed, index and stream each change the stream (and the high 32 bits count) */
    const uint64_t keys[][3] = {{43, 7, 3}, {42, 8, 3}, {42, 7, 4}, {42 + (1ull << 32), 7, 3},
                                {42, 7 + (1ull << 32), 3}};
    for (int k = 0; k < 5; k++) {
        dm_noise_normal(keys[k][0], keys[k][1], (uint32_t)keys[k][2], 10, b);
        int same = 0;
        for (int i = 0; i < 10; i++) same += a[i] == b[i];
        ck_assert_msg(same == 0, "key variant %d shares %d of 10 values", k, same);
    }
    free(a);
    free(b);
}
END_TEST

/* ---------------------------------------------------------------- DDPM tables (B.1) */

START_TEST(test_respacing)
{
    dm_ddpm_schedule s;
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 250), DM_OK);
    ck_assert_int_eq(s.n, 250);
    ck_assert_int_eq(s.timestep[0], 0);
    ck_assert_int_eq(s.timestep[249], 999);
    /* 0,4,8,...,160,164,169,...,497,502,...,826,830,835,...,995,999 */
    for (int i = 0; i <= 41; i++) ck_assert_int_eq(s.timestep[i], 4 * i);
    ck_assert_int_eq(s.timestep[42], 169);
    int gaps5 = 0, at[3] = {0};
    for (int i = 1; i < 250; i++) {
        int64_t d = s.timestep[i] - s.timestep[i - 1];
        ck_assert_msg(d == 4 || d == 5, "gap %lld at %d", (long long)d, i);
        if (d == 5 && gaps5 < 3) at[gaps5++] = (int)s.timestep[i];
        else if (d == 5) gaps5++;
    }
    ck_assert_int_eq(gaps5, 3);
    ck_assert_int_eq(at[0], 169);
    ck_assert_int_eq(at[1], 502);
    ck_assert_int_eq(at[2], 835);
    ck_assert_int_eq(s.timestep[248], 995);
    dm_ddpm_schedule_free(&s);

    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 100), DM_OK);
    ck_assert_int_eq(s.timestep[1], 10);
    ck_assert_int_eq(s.timestep[98], 989);
    ck_assert_int_eq(s.timestep[99], 999);
    dm_ddpm_schedule_free(&s);

    static const int want50[] = {0, 20, 41, 61, 82, 102};
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 50), DM_OK);
    for (int i = 0; i < 6; i++) ck_assert_int_eq(s.timestep[i], want50[i]);
    ck_assert_int_eq(s.timestep[47], 958);
    ck_assert_int_eq(s.timestep[48], 979);
    ck_assert_int_eq(s.timestep[49], 999);
    dm_ddpm_schedule_free(&s);

    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 1000), DM_OK);
    for (int i = 0; i < 1000; i++) ck_assert_int_eq(s.timestep[i], i);
    dm_ddpm_schedule_free(&s);
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 1001), DM_ERR_ARG);
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 0), DM_ERR_ARG);
}
END_TEST

/* Relative tolerance 2e-7 for values the spec gives to 8 significant digits (the last printed
 * digit is +-0.5 ulp of the print, <= 1.3e-7 relative for 8 digits). */
#define RELTOL 2e-7
static void near(double got, double want, const char *what)
{
    ck_assert_msg(fabs(got - want) <= RELTOL * fabs(want) + 1e-15, "%s: %.10g expected %.10g", what,
                  got, want);
}

START_TEST(test_tables_250)
{
    dm_ddpm_schedule s;
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 250), DM_OK);
    near(s.beta[0], 1e-4, "beta[0]");
    ck_assert_msg(fabs(s.coef1[0] - 1.0) < 1e-15, "coef1[0] %.17g", s.coef1[0]);
    ck_assert_msg(fabs(s.coef2[0]) < 1e-15, "coef2[0] %.17g", s.coef2[0]);
    ck_assert(s.post_var[0] == 0.0);
    near(s.post_logvar_clipped[0], -9.3646282, "post_logvar_clipped[0]");
    near(s.log_beta[0], -9.2103404, "log beta[0]");
    near(s.beta[1], 5.9906556e-4, "beta[1]");
    near(s.post_var[1], 8.5702534e-05, "post_var[1]");
    near(s.coef1[1], 0.85698249, "coef1[1]");
    near(s.coef2[1], 0.1430175, "coef2[1]");
    near(s.beta[249], 0.077519345, "beta[249]");
    near(s.ac[249], 4.0358298e-05, "ac[249]");
    near(s.post_logvar_clipped[249], -2.5572312, "post_logvar_clipped[249]");
    near(s.log_beta[249], -2.5572278, "log beta[249]");
    near(s.coef1[249], 5.127615e-4, "coef1[249]");
    near(s.coef2[249], 0.96045531, "coef2[249]");
    /* ac_new[i] == ac[S_i] up to rounding; sqrt tables consistent */
    for (int i = 0; i < 250; i++) {
        near(s.sqrt_recip_ac[i], sqrt(1.0 / s.ac[i]), "sqrt_recip_ac");
        ck_assert(s.ac_prev[i] == (i ? s.ac[i - 1] : 1.0));
    }
    dm_ddpm_schedule_free(&s);
    /* base schedule (1000 steps = no respacing): ac[0], ac[499], ac[999] */
    ck_assert_int_eq(dm_ddpm_schedule_init(&s, 1000, 1000), DM_OK);
    near(s.ac[0], 0.9999, "ac[0]");
    ck_assert_msg(fabs(s.ac[499] - 0.0785872) < 1e-7, "ac[499] %.10g", s.ac[499]);
    near(s.ac[999], 4.0358298e-05, "ac[999]");
    dm_ddpm_schedule_free(&s);
}
END_TEST

/* ---------------------------------------------------------------- fake models */

/* Point-mass data: class c's data latent is xstar(c, j) = 0.5 + 0.1 c + 0.01 (j % 7); the null
 * class's is 0. For such data the exact predictions are
 *   RF:   v = (z - x*) / t                            (z_t = (1-t) x* + t eps, v = eps - x*)
 *   DDPM: eps = (x - sqrt(ac_t) x*) / sqrt(1 - ac_t)   (x_t = sqrt(ac) x* + sqrt(1-ac) eps)
 * so every deterministic sampler lands exactly on x* (guided: on s * x* for the guided channels,
 * since the guided prediction is the exact one for x_u* + s (x_c* - x_u*)). */
typedef struct {
    int rf, C, Cout, HW, ncls;
    double ac[1000];
    int calls, rows[4096]; /* batch size of each call */
    int nan_at_call;       /* return NaN output at this call (1-based), 0 = never */
} fake_t;

static double xstar(const fake_t *f, int64_t c, int j)
{
    return c == f->ncls ? 0.0 : 0.5 + 0.1 * (double)c + 0.01 * (double)(j % 7);
}

static dm_status fake_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                         float *out)
{
    fake_t *f = ctx;
    if (f->calls < 4096) f->rows[f->calls] = B;
    f->calls++;
    const int n = f->C * f->HW;
    for (int b = 0; b < B; b++)
        for (int ch = 0; ch < f->Cout; ch++)
            for (int p = 0; p < f->HW; p++) {
                int j = ch * f->HW + p;
                double v;
                if (ch >= f->C) {
                    v = 0.25; /* variance channel */
                } else if (f->rf) {
                    v = ((double)x[(size_t)b * n + j] - xstar(f, y[b], j)) / (double)t[b];
                } else {
                    double ac = f->ac[(int)t[b]];
                    v = ((double)x[(size_t)b * n + j] - sqrt(ac) * xstar(f, y[b], j)) / sqrt(1 - ac);
                }
                if (f->nan_at_call == f->calls) v = NAN;
                out[((size_t)b * f->Cout + ch) * f->HW + p] = (float)v;
            }
    return DM_OK;
}

/* Independent base schedule for the fake DDPM model: linear betas, cumulative product. */
static void fake_init(fake_t *f, int rf)
{
    memset(f, 0, sizeof *f);
    f->rf = rf;
    f->C = 4;
    f->Cout = 8;
    f->HW = 3 * 5;
    f->ncls = 10;
    double cum = 1.0;
    for (int i = 0; i < 1000; i++) {
        cum *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999.0);
        f->ac[i] = cum;
    }
}

static dm_denoiser fake_denoiser(fake_t *f)
{
    dm_denoiser d = {fake_fn, f, f->C, f->Cout, 3, 5, f->ncls, 1.0f, NULL, NULL};
    return d;
}

static void run_point_mass(dm_sampler_kind k, int steps, float cfg, int cfg_channels, double tol)
{
    fake_t f;
    fake_init(&f, dm_sampler_objective(k) == DM_OBJ_RF);
    dm_denoiser d = fake_denoiser(&f);
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.sampler = k;
    p.steps = steps;
    p.cfg_scale = cfg;
    p.cfg_channels = cfg_channels;
    p.seed = 5;
    const int B = 3, n = f.C * f.HW;
    int64_t y[3] = {0, 4, 9};
    uint64_t idx[3] = {0, 1, 2};
    float *z = malloc(sizeof(float) * B * n);
    ck_assert_int_eq(dm_sample(&d, &p, B, y, idx, NULL, z, NULL, NULL), DM_OK);
    const int kch = cfg_channels == 0 ? f.C : cfg_channels;
    double worst = 0;
    for (int b = 0; b < B; b++)
        for (int j = 0; j < n; j++) {
            double s = (cfg != 1.0f && j / f.HW < kch) ? cfg : 1.0;
            double want = s * xstar(&f, y[b], j), err = fabs(z[b * n + j] - want);
            if (err > worst) worst = err;
        }
    ck_assert_msg(worst <= tol, "%s steps %d cfg %g/%d: max error %g > %g", dm_sampler_name(k),
                  steps, (double)cfg, cfg_channels, worst, tol);
    /* one forward per evaluation, on 2B rows when guided */
    int evals = k == DM_SAMPLER_HEUN ? 2 * steps - 1 : steps;
    ck_assert_int_eq(f.calls, evals);
    for (int c = 0; c < f.calls; c++) ck_assert_int_eq(f.rows[c], cfg != 1.0f ? 2 * B : B);
    free(z);
}

/* ---- MoE lab: the rows-aware denoiser and self-contrast (docs/moe-lab.md §4, §7.5) ---- */

/* Velocity per branch, constant in time: cond 3, uncond 1, weak 2 (per channel c: + c). */
typedef struct {
    int calls, begin_rows, bad, weak, ddpm;
    int rows[64];
    char why[160];
} rows_fake_t;

static dm_status rows_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                         const dm_forward_rows *rows, float *out)
{
    rows_fake_t *f = ctx;
    (void)x;
    if (f->calls < 64) f->rows[f->calls] = B;
    f->calls++;
    for (int r = 0; r < B; r++) {
        const int br = rows->branch[r];
        const int want_null = br == DM_BRANCH_UNCOND;
        if ((y[r] == 10) != want_null || rows->image[r] != 40 + r % 2 ||
            rows->t01[r] != (f->ddpm ? (float)((double)t[r] / 999.0) : t[r]) ||
            (int)rows->weak != f->weak) {
            f->bad = 1;
            snprintf(f->why, sizeof f->why, "call %d row %d: branch %d label %lld image %lld t01 %g t %g",
                     f->calls, r, br, (long long)y[r], (long long)rows->image[r],
                     (double)rows->t01[r], (double)t[r]);
        }
        for (int i = 0; i < 4 * 15; i++)
            out[(size_t)r * 4 * 15 + i] = (br == 0 ? 3.0f : br == 1 ? 1.0f : 2.0f) + (float)(i / 15);
    }
    return DM_OK;
}
static dm_status rows_plain_fn(void *ctx, int B, const float *x, const float *t, const int64_t *y,
                               float *out)
{
    (void)ctx, (void)B, (void)x, (void)t, (void)y, (void)out;
    return dm_fail(DM_ERR_ARG, "plain fn called although fn_rows exists");
}
static dm_status rows_begin(void *ctx, int max_rows)
{
    ((rows_fake_t *)ctx)->begin_rows = max_rows;
    return DM_OK;
}

/* Euler with constant velocities: z = z0 - D, D the guided velocity; rows per evaluation. */
static void run_sc(const char *spec, float cfg, float lo, float hi, double want_in, int rows_in)
{
    rows_fake_t f = {.weak = spec ? DM_WEAK_RANK3 : DM_WEAK_RANK2};
    dm_denoiser d = {rows_plain_fn, &f, 4, 4, 3, 5, 10, 1.0f, rows_fn, rows_begin};
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.sampler = DM_SAMPLER_EULER;
    p.steps = 8;
    p.cfg_scale = cfg;
    p.cfg_t_lo = lo, p.cfg_t_hi = hi;
    p.cfg_channels = 0; /* every channel guided */
    if (spec) ck_assert_int_eq(dm_self_contrast_set(&p, spec), DM_OK);
    const int B = 2, n = 4 * 15;
    int64_t y[2] = {1, 6};
    uint64_t idx[2] = {40, 41};
    float z0[2 * 60], z[2 * 60];
    for (int i = 0; i < B * n; i++) z0[i] = (float)(i % 7) * 0.25f;
    ck_assert_int_eq(dm_sample(&d, &p, B, y, idx, z0, z, NULL, NULL), DM_OK);
    ck_assert_msg(!f.bad, "%s", f.why);
    ck_assert_int_eq(f.begin_rows, rows_in * B);
    /* steps with t in [lo, hi] are guided: t = 1, 7/8, ..., 1/8 */
    int in = 0;
    for (int i = 8; i >= 1; i--) in += i / 8.0 >= lo - 1e-9 && i / 8.0 <= hi + 1e-9;
    for (int c = 0; c < f.calls; c++) {
        const double t = (8 - c) / 8.0;
        const int inside = t >= lo - 1e-9 && t <= hi + 1e-9;
        ck_assert_int_eq(f.rows[c], inside ? rows_in * B : B);
    }
    for (int b = 0; b < B; b++)
        for (int i = 0; i < n; i++) {
            /* per channel the same offset on every branch: guidance keeps it, the sum is 1 */
            const double v_in = want_in + i / 15, v_out = 3.0 + i / 15;
            const double want = z0[b * n + i] - (in * v_in + (8 - in) * v_out) / 8.0;
            ck_assert_msg(fabs(z[b * n + i] - want) < 1e-5, "%s: z %g want %g", spec ? spec : "cfg",
                          (double)z[b * n + i], want);
        }
}

START_TEST(test_self_contrast_rows)
{
    /* add with CFG s = 2, W = 1.5: 1 + 2 (3 - 1) + 0.5 (3 - 2) = 5.5; rows [cond; uncond; weak] */
    run_sc("1.5,weak=rank3", 2.0f, 0.0f, 1.0f, 5.5, 3);
    /* replace: 2 + 1.5 (3 - 2) = 3.5; rows [cond; weak] */
    run_sc("1.5,weak=rank3,mode=replace", 2.0f, 0.0f, 1.0f, 3.5, 2);
    /* add at cfg-scale 1: the uncond term cancels, rows [cond; weak]: 3 + 0.5 (3 - 2) = 3.5 */
    run_sc("1.5,weak=rank3", 1.0f, 0.0f, 1.0f, 3.5, 2);
    /* only inside --cfg-interval (t = 0.5 .. 0.75: 3 of 8 steps), conditional rows outside */
    run_sc("2,weak=rank3", 2.0f, 0.5f, 0.75f, 1 + 2 * 2 + 1 * 1, 3);
    /* no self-contrast: CFG through fn_rows, rows [cond; uncond]: 1 + 2 (3 - 1) = 5 */
    run_sc(NULL, 2.0f, 0.0f, 1.0f, 5.0, 2);
    /* DDIM: t01 = timestep / 999 on every row */
    rows_fake_t f = {.weak = DM_WEAK_RANK3, .ddpm = 1};
    dm_denoiser d = {rows_plain_fn, &f, 4, 4, 3, 5, 10, 1.0f, rows_fn, rows_begin};
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.sampler = DM_SAMPLER_DDIM;
    p.steps = 10;
    p.cfg_scale = 2.0f;
    ck_assert_int_eq(dm_self_contrast_set(&p, "1.5,weak=rank3"), DM_OK);
    int64_t y[2] = {1, 6};
    uint64_t idx[2] = {40, 41};
    float z[2 * 60];
    ck_assert_int_eq(dm_sample(&d, &p, 2, y, idx, NULL, z, NULL, NULL), DM_OK);
    ck_assert_msg(!f.bad, "ddim: %s", f.why);
    ck_assert_int_eq(f.calls, 10);
}
END_TEST

/* Tolerances: float32 state, values O(1); DDPM divides by sqrt(1-ac) ~ 1e-2 at t = 0, so its
 * last x0-prediction amplifies float32 rounding of x (~6e-8 * |x| / 0.01). */
START_TEST(test_point_mass_rf)
{
    run_point_mass(DM_SAMPLER_EULER, 10, 1.0f, 0, 1e-5);
    run_point_mass(DM_SAMPLER_EULER, 7, 2.0f, 0, 1e-5);
    run_point_mass(DM_SAMPLER_HEUN, 6, 1.0f, 0, 1e-5);
    run_point_mass(DM_SAMPLER_HEUN, 5, 3.0f, 0, 2e-5);
    run_point_mass(DM_SAMPLER_EULER, 4, 2.5f, 3, 1e-5); /* channel 3 unguided */
}
END_TEST

START_TEST(test_point_mass_ddpm)
{
    run_point_mass(DM_SAMPLER_DDIM, 50, 1.0f, 0, 1e-4);
    run_point_mass(DM_SAMPLER_DDIM, 25, 4.0f, 3, 4e-4);
    run_point_mass(DM_SAMPLER_DDPM, 250, 1.0f, 0, 1e-4); /* last step returns the x0-prediction */
    run_point_mass(DM_SAMPLER_DDPM, 100, 1.5f, 0, 2e-4);
    run_point_mass(DM_SAMPLER_DDPM, 30, 4.0f, 3, 4e-4);
}
END_TEST

/* One DDPM step written out by hand (spec B.1 "one p_sample step") from respaced "2"
 * (timesteps 0, 999): x1 = mean + exp(0.5 logvar) * noise(stream 1); x0 = x0-prediction. */
START_TEST(test_ddpm_step_formula)
{
    fake_t f;
    fake_init(&f, 0);
    dm_denoiser d = fake_denoiser(&f);
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.steps = 2;
    p.cfg_scale = 1.0f;
    p.seed = 99;
    const int n = f.C * f.HW;
    int64_t y[1] = {3};
    uint64_t idx[1] = {17};
    float init[60], z[60], noise[60];
    for (int j = 0; j < n; j++) init[j] = (float)(0.3 * sin(j + 1.0));
    ck_assert_int_eq(dm_sample(&d, &p, 1, y, idx, init, z, NULL, NULL), DM_OK);
    dm_noise_normal(99, 17, 1, n, noise);
    /* tables by hand from the base schedule: respaced betas {1-ac[0], 1-ac[999]/ac[0]} */
    const double ac0 = f.ac[0], ac1 = f.ac[999];
    const double b1 = 1 - ac1 / ac0;
    const double pv1 = b1 * (1 - ac0) / (1 - ac1);
    const double c1 = b1 * sqrt(ac0) / (1 - ac1), c2 = (1 - ac0) * sqrt(1 - b1) / (1 - ac1);
    const double frac = (0.25 + 1) / 2, logv = frac * log(b1) + (1 - frac) * log(pv1);
    double worst = 0;
    for (int j = 0; j < n; j++) {
        double x = init[j];
        double eps = (x - sqrt(ac1) * xstar(&f, 3, j)) / sqrt(1 - ac1);
        double x0 = sqrt(1 / ac1) * x - sqrt(1 / ac1 - 1) * eps;
        double x1 = c1 * x0 + c2 * x + exp(0.5 * logv) * noise[j];
        double e2 = (x1 - sqrt(ac0) * xstar(&f, 3, j)) / sqrt(1 - ac0);
        double want = sqrt(1 / ac0) * x1 - sqrt(1 / ac0 - 1) * e2;
        double err = fabs(z[j] - want);
        if (err > worst) worst = err;
    }
    ck_assert_msg(worst < 1e-4, "DDPM 2-step max error %g", worst);
}
END_TEST

/* Same images whatever the batch size or order (noise keyed by image index, not batch slot). */
START_TEST(test_batch_invariance)
{
    const dm_sampler_kind kinds[] = {DM_SAMPLER_DDPM, DM_SAMPLER_DDIM, DM_SAMPLER_EULER};
    for (int kk = 0; kk < 3; kk++) {
        fake_t f;
        fake_init(&f, dm_sampler_objective(kinds[kk]) == DM_OBJ_RF);
        dm_denoiser d = fake_denoiser(&f);
        dm_sample_params p;
        dm_sample_params_init(&p, NULL);
        p.sampler = kinds[kk];
        p.steps = 12;
        p.cfg_scale = 2.0f;
        p.eta = kinds[kk] == DM_SAMPLER_DDIM ? 0.7f : 0.0f;
        p.seed = 1234;
        const int n = f.C * f.HW;
        int64_t y[3] = {1, 2, 3}, yr[3] = {3, 1, 2};
        uint64_t idx[3] = {10, 11, 12}, idxr[3] = {12, 10, 11};
        float z3[180], zr[180], z1[60];
        ck_assert_int_eq(dm_sample(&d, &p, 3, y, idx, NULL, z3, NULL, NULL), DM_OK);
        ck_assert_int_eq(dm_sample(&d, &p, 3, yr, idxr, NULL, zr, NULL, NULL), DM_OK);
        for (int b = 0; b < 3; b++) {
            ck_assert_int_eq(dm_sample(&d, &p, 1, &y[b], &idx[b], NULL, z1, NULL, NULL), DM_OK);
            ck_assert_msg(!memcmp(z1, z3 + b * n, sizeof z1), "%s: image %d differs batch 1 vs 3",
                          dm_sampler_name(kinds[kk]), b);
        }
        ck_assert(!memcmp(zr, z3 + 2 * n, n * sizeof(float)));
        ck_assert(!memcmp(zr + n, z3, n * sizeof(float)));
    }
}
END_TEST

START_TEST(test_cfg_interval)
{
    fake_t f;
    fake_init(&f, 1);
    dm_denoiser d = fake_denoiser(&f);
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.sampler = DM_SAMPLER_EULER;
    p.steps = 10;
    p.cfg_scale = 2.0f;
    p.cfg_t_lo = 0.0f;
    p.cfg_t_hi = 0.5f;
    int64_t y = 2;
    uint64_t idx = 0;
    float z[60];
    ck_assert_int_eq(dm_sample(&d, &p, 1, &y, &idx, NULL, z, NULL, NULL), DM_OK);
    /* t = 1.0 .. 0.6 unguided (1 row), t = 0.5 .. 0.1 guided (2 rows) */
    ck_assert_int_eq(f.calls, 10);
    for (int c = 0; c < 10; c++) ck_assert_int_eq(f.rows[c], c < 5 ? 1 : 2);
    /* DDPM: t fraction = timestep / 999; 10 steps -> timesteps 999, 888, ..., 0 */
    fake_init(&f, 0);
    d = fake_denoiser(&f);
    p.sampler = DM_SAMPLER_DDPM;
    p.cfg_t_lo = 0.3f;
    p.cfg_t_hi = 0.7f;
    ck_assert_int_eq(dm_sample(&d, &p, 1, &y, &idx, NULL, z, NULL, NULL), DM_OK);
    /* timesteps 999 888 777 666 555 444 333 222 111 0 -> guided for 666..333 */
    for (int c = 0; c < 10; c++) ck_assert_int_eq(f.rows[c], (c >= 3 && c <= 6) ? 2 : 1);
}
END_TEST

START_TEST(test_nonfinite)
{
    fake_t f;
    fake_init(&f, 1);
    f.nan_at_call = 3;
    dm_denoiser d = fake_denoiser(&f);
    dm_sample_params p;
    dm_sample_params_init(&p, NULL);
    p.sampler = DM_SAMPLER_EULER;
    p.steps = 8;
    int64_t y = 2;
    uint64_t idx = 5;
    float z[60];
    ck_assert_int_eq(dm_sample(&d, &p, 1, &y, &idx, NULL, z, NULL, NULL), DM_ERR_NUMERIC);
    ck_assert_msg(strstr(dm_last_error(), "step 3/8") != NULL, "%s", dm_last_error());
}
END_TEST

START_TEST(test_names_and_checks)
{
    for (int k = 0; k < DM_SAMPLER_COUNT; k++) {
        dm_sampler_kind o;
        ck_assert_int_eq(dm_sampler_from_name(dm_sampler_name((dm_sampler_kind)k), &o), 0);
        ck_assert_int_eq(o, k);
    }
    dm_sampler_kind o;
    ck_assert_int_eq(dm_sampler_from_name("dpm++", &o), -1);
    dm_config c;
    memset(&c, 0, sizeof c);
    c.in_channels = 4;
    c.objective = DM_OBJ_RF;
    c.default_sampler = DM_SAMPLER_HEUN;
    c.default_steps = 20;
    c.default_cfg_scale = 1.5f;
    c.cfg_channels = 0;
    dm_sample_params p;
    dm_sample_params_init(&p, &c);
    ck_assert_int_eq(p.sampler, DM_SAMPLER_HEUN);
    ck_assert_int_eq(p.steps, 20);
    ck_assert(p.cfg_scale == 1.5f);
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_OK);
    p.sampler = DM_SAMPLER_DDPM;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    ck_assert_msg(strstr(dm_last_error(), "rf") != NULL, "%s", dm_last_error());
    c.objective = DM_OBJ_DDPM;
    p.sampler = DM_SAMPLER_EULER;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    p.sampler = DM_SAMPLER_DDPM;
    p.steps = 0;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    /* the library names the field, not a CLI flag (the programs add "--", dm_cli_flag_prefix) */
    ck_assert_msg(!strncmp(dm_last_error(), "steps 0: must be >= 1", 21), "%s", dm_last_error());
    p.steps = 1001;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    p.steps = 10;
    p.cfg_channels = 5;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    p.cfg_channels = 3;
    p.cfg_t_lo = 0.8f;
    p.cfg_t_hi = 0.2f;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG);
    p.cfg_t_lo = 0.0f;
    p.cfg_t_hi = 1.0f;
    p.eta = 0.5f;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_ERR_ARG); /* eta needs ddim */
    p.sampler = DM_SAMPLER_DDIM;
    ck_assert_int_eq(dm_sample_params_check(&p, &c), DM_OK);
    dm_sample_params_init(&p, NULL);
    ck_assert_int_eq(p.sampler, DM_SAMPLER_DDPM);
    ck_assert_int_eq(p.steps, 250);
    ck_assert_int_eq(p.cfg_channels, 3);
    /* the table of defaults, one row per (arch, objective); unset fields fall through to it */
    const struct {
        dm_arch arch;
        dm_objective obj;
        dm_sampler_kind k;
        int steps;
        float cfg;
        int ch;
    } rows[] = {{DM_ARCH_DITMOE, DM_OBJ_DDPM, DM_SAMPLER_DDPM, 250, 4.0f, 3},
                {DM_ARCH_DITMOE, DM_OBJ_RF, DM_SAMPLER_EULER, 50, 4.0f, 0},
                {DM_ARCH_PROMOE, DM_OBJ_DDPM, DM_SAMPLER_DDPM, 250, 1.5f, 3},
                {DM_ARCH_PROMOE, DM_OBJ_RF, DM_SAMPLER_EULER, 250, 1.5f, 0}};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        memset(&c, 0, sizeof c);
        c.arch = rows[i].arch;
        c.objective = rows[i].obj;
        c.default_sampler = DM_SAMPLER_UNSET;
        c.cfg_channels = -1;
        dm_sample_params_init(&p, &c);
        ck_assert_int_eq(p.sampler, rows[i].k);
        ck_assert_int_eq(p.steps, rows[i].steps);
        ck_assert(p.cfg_scale == rows[i].cfg);
        ck_assert_int_eq(p.cfg_channels, rows[i].ch);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("sampler");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_philox_kat);
    tcase_add_test(tc, test_noise_stats_and_keys);
    tcase_add_test(tc, test_respacing);
    tcase_add_test(tc, test_tables_250);
    tcase_add_test(tc, test_point_mass_rf);
    tcase_add_test(tc, test_point_mass_ddpm);
    tcase_add_test(tc, test_ddpm_step_formula);
    tcase_add_test(tc, test_batch_invariance);
    tcase_add_test(tc, test_cfg_interval);
    tcase_add_test(tc, test_nonfinite);
    tcase_add_test(tc, test_names_and_checks);
    tcase_add_test(tc, test_self_contrast_rows);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}

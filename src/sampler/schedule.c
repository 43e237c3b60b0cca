/* DiT / IDDPM Gaussian-diffusion tables (spec vae_samplers.md B.1), all in float64:
 * linear betas over T steps, respaced with DiT's space_timesteps (float-accumulated stride,
 * Python round = half-to-even), then every derived table rebuilt from the respaced betas. */
#include "ditmoe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void dm_ddpm_schedule_free(dm_ddpm_schedule *s)
{
    free(s->timestep);
    free(s->beta); /* one block holds every double table */
    memset(s, 0, sizeof *s);
}

/* space_timesteps(T, [steps]) for a single section: sorted kept original timesteps. */
static dm_status respace(int T, int steps, int64_t *keep)
{
    if (steps > T)
        return dm_fail(DM_ERR_ARG, "--steps %d: cannot respace a %d-step schedule to more than %d "
                       "steps", steps, T, T);
    double stride = steps <= 1 ? 1.0 : (double)(T - 1) / (double)(steps - 1);
    double cur = 0.0;
    for (int i = 0; i < steps; i++) {
        keep[i] = (int64_t)nearbyint(cur); /* default rounding mode: half to even */
        cur += stride;
    }
    /* Python builds a set; for steps <= T the values are strictly increasing already. */
    for (int i = 1; i < steps; i++)
        if (keep[i] <= keep[i - 1])
            return dm_fail(DM_ERR_ARG, "--steps %d: respacing produced a repeated timestep", steps);
    return DM_OK;
}

dm_status dm_ddpm_schedule_init(dm_ddpm_schedule *s, int T, int steps)
{
    memset(s, 0, sizeof *s);
    if (T < 2 || T > 100000) return dm_fail(DM_ERR_ARG, "num_train_steps %d out of range [2,100000]", T);
    if (steps < 1) return dm_fail(DM_ERR_ARG, "--steps %d: must be at least 1", steps);
    const int n = steps;
    s->timestep = malloc((size_t)n * sizeof(int64_t));
    double *blk = malloc((size_t)n * 10 * sizeof(double) + (size_t)T * sizeof(double));
    if (!s->timestep || !blk) {
        free(s->timestep);
        free(blk);
        s->timestep = NULL;
        return dm_fail(DM_ERR_NOMEM, "out of memory for the DDPM schedule");
    }
    s->n = n;
    s->beta = blk;
    s->ac = blk + n;
    s->ac_prev = blk + 2 * n;
    s->sqrt_recip_ac = blk + 3 * n;
    s->sqrt_recipm1_ac = blk + 4 * n;
    s->post_var = blk + 5 * n;
    s->post_logvar_clipped = blk + 6 * n;
    s->log_beta = blk + 7 * n;
    s->coef1 = blk + 8 * n;
    s->coef2 = blk + 9 * n;
    double *base_ac = blk + 10 * n; /* [T] */
    dm_status st = respace(T, steps, s->timestep);
    if (st) {
        dm_ddpm_schedule_free(s);
        return st;
    }
    /* Base schedule: numpy linspace(start, stop, T): i*step + start, last element = stop. */
    const double scale = 1000.0 / T, start = 0.0001 * scale, stop = 0.02 * scale;
    const double step = (stop - start) / (double)(T - 1);
    double cum = 1.0;
    for (int i = 0; i < T; i++) {
        double beta = i == T - 1 ? stop : (double)i * step + start;
        cum *= 1.0 - beta;
        base_ac[i] = cum;
    }
    /* Respaced betas: 1 - ac[S_i] / ac[S_{i-1}], then the base recursion again. */
    double last = 1.0;
    for (int i = 0; i < n; i++) {
        double a = base_ac[s->timestep[i]];
        s->beta[i] = 1.0 - a / last;
        last = a;
    }
    cum = 1.0;
    for (int i = 0; i < n; i++) {
        double alpha = 1.0 - s->beta[i];
        cum *= alpha;
        s->ac[i] = cum;
        s->ac_prev[i] = i == 0 ? 1.0 : s->ac[i - 1];
        s->sqrt_recip_ac[i] = sqrt(1.0 / s->ac[i]);
        s->sqrt_recipm1_ac[i] = sqrt(1.0 / s->ac[i] - 1.0);
        s->post_var[i] = s->beta[i] * (1.0 - s->ac_prev[i]) / (1.0 - s->ac[i]);
        s->log_beta[i] = log(s->beta[i]);
        s->coef1[i] = s->beta[i] * sqrt(s->ac_prev[i]) / (1.0 - s->ac[i]);
        s->coef2[i] = (1.0 - s->ac_prev[i]) * sqrt(alpha) / (1.0 - s->ac[i]);
    }
    for (int i = 0; i < n; i++) {
        /* entry 0 replaced by entry 1 before the log (post_var[0] = 0). With one step there is
         * no entry 1: log(0) = -inf, as numpy gives; it is only used where noise is masked. */
        double v = i == 0 ? (n > 1 ? s->post_var[1] : s->post_var[0]) : s->post_var[i];
        s->post_logvar_clipped[i] = log(v);
    }
    return DM_OK;
}

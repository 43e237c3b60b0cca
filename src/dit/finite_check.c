/* Non-finite checks of dm_model_forward (docs/reliability.md): inputs refused at the top; when the
 * output is non-finite, the forward is run once more with a check after every stage, to name the
 * first stage where non-finite values appear. The success path only checks the output. */
#include "dit/finite_check.h"

#include <stdlib.h>

_Thread_local int dm_fwd_diag;
static _Thread_local int report_output;

void dm_forward_report_nonfinite(int on) { report_output = on; }

dm_status dm_fwd_check_inputs(const dm_model *m, int B, const float *x)
{
    const dm_config *c = &m->cfg;
    const size_t per = (size_t)c->in_channels * c->input_size * c->input_size;
    size_t bad = 0;
    if (!dm_all_finite(x, (size_t)B * per, &bad))
        return dm_fail(DM_ERR_ARG, "input x: element %zu (image %zu) is not finite", bad, bad / per);
    return DM_OK;
}

dm_status dm_fwd_check_stage(dm_model *m, const void *dev, size_t n, const char *stage, int index)
{
    float *h = malloc(n * sizeof(float));
    if (!h) return dm_fail(DM_ERR_NOMEM, "out of memory checking stage %s", stage);
    dm_status st = m->be->ops->download(m->be->ctx, h, dev, n * sizeof(float));
    size_t bad = 0;
    if (st == DM_OK && !dm_all_finite(h, n, &bad)) {
        if (index >= 0)
            st = dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in block %d (%s), element %zu",
                         m->path, index, stage, bad);
        else
            st = dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in the %s, element %zu",
                         m->path, stage, bad);
    }
    free(h);
    return st;
}

dm_status dm_fwd_check_output(dm_model *m, int B, const float *x, const float *t, const int64_t *y,
                              float *out, dm_routes *routes)
{
    const dm_config *c = &m->cfg;
    const size_t n = (size_t)B * c->out_channels * c->input_size * c->input_size;
    size_t bad = 0;
    if (!report_output || dm_fwd_diag || dm_all_finite(out, n, &bad)) return DM_OK;
    dm_fwd_diag = 1;
    dm_status st = dm_model_forward(m, B, x, t, y, out, routes);
    dm_fwd_diag = 0;
    if (st != DM_OK) return st;
    return dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in the output, element %zu",
                   m->path, bad);
}

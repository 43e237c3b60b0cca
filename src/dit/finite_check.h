/* Non-finite checks of dm_model_forward (src/dit/finite_check.c). Internal to src/dit. */
#ifndef DM_DIT_FINITE_CHECK_H
#define DM_DIT_FINITE_CHECK_H
#include "dit/model.h"

extern _Thread_local int dm_fwd_diag; /* set while re-running a failed forward stage by stage */
dm_status dm_fwd_check_inputs(const dm_model *m, int B, const float *x);
/* Downloads n floats of `dev` and fails with DM_ERR_NUMERIC naming the stage (index >= 0: a block). */
dm_status dm_fwd_check_stage(dm_model *m, const void *dev, size_t n, const char *stage, int index);
dm_status dm_fwd_check_output(dm_model *m, int B, const float *x, const float *t, const int64_t *y,
                              float *out, dm_routes *routes);
#endif

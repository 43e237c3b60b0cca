/* Finiteness check for inputs and stage outputs (ditmoe.h, docs/reliability.md). */
#include "ditmoe.h"

#include <math.h>

int dm_all_finite(const float *x, size_t n, size_t *first_bad)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) {
            if (first_bad) *first_bad = i;
            return 0;
        }
    return 1;
}

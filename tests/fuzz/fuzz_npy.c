/* libFuzzer target: the .npy reader (src/io/npy.c), plain and with a dtype/rank expectation. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("in.npy", data, size);
    dm_npy a;
    if (dm_npy_read(path, &a) == DM_OK) {
        size_t n = 1;
        for (int i = 0; i < a.ndim; i++) n *= (size_t)a.shape[i];
        if (n != a.count || a.ndim < 0 || a.ndim > DM_MAX_DIMS) abort();
        if (a.dtype == DM_F32 && a.count) (void)dm_all_finite(a.data, a.count, NULL);
        dm_npy_free(&a);
    }
    if (dm_npy_read_expect(path, DM_F32, 4, &a) == DM_OK) dm_npy_free(&a);
    return 0;
}

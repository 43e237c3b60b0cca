/* libFuzzer target: the torch.save reader (src/io/pt.c, pt_zip.c, pickle.c, pt_config.c), reached
 * through dm_st_open as a user's .pt/.pth would be: open, walk every tensor, convert the float
 * ones to float32 (each up to 1 MiB), read the configuration. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("in.pt", data, size);
    dm_st_file *f = NULL;
    if (dm_st_open(path, &f) != DM_OK) return 0;
    fuzz_walk_tensors(f);
    dm_config cfg;
    if (dm_config_from_file(f, &cfg) == DM_OK) dm_config_free(&cfg);
    dm_st_close(f);
    return 0;
}

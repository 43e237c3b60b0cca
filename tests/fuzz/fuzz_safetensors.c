/* libFuzzer target: the safetensors reader (src/io/safetensors.c) and the model configuration
 * read from it (src/io/config.c, config_promoe.c): open, walk every tensor, convert the float
 * ones to float32 (each up to 1 MiB), read the metadata. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("in.safetensors", data, size);
    dm_st_file *f = NULL;
    if (dm_st_open(path, &f) != DM_OK) return 0;
    fuzz_walk_tensors(f);
    (void)dm_st_meta(f, "ditmoe");
    dm_config cfg;
    if (dm_config_from_file(f, &cfg) == DM_OK) {
        dm_sample_params p;
        dm_sample_params_init(&p, &cfg);
        (void)dm_sample_params_check(&p, &cfg);
        dm_config_free(&cfg);
    }
    dm_st_close(f);
    return 0;
}

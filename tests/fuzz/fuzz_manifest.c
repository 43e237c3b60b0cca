/* libFuzzer target: a batch run's manifest.json (src/batch/manifest.c), read back for pack and
 * compared with a run's parameters for resume. */
#include "batch/batch.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    (void)fuzz_file("manifest.json", data, size);
    const char *dir = fuzz_dir();
    dm_batch_params p;
    (void)dm_batch_manifest_read(dir, &p);
    dm_batch_params q;
    memset(&q, 0, sizeof q);
    snprintf(q.model_sha256, sizeof q.model_sha256, "%064d", 0);
    snprintf(q.vae_sha256, sizeof q.vae_sha256, "%064d", 1);
    snprintf(q.sampler, sizeof q.sampler, "ddpm");
    snprintf(q.classes, sizeof q.classes, "random");
    q.steps = 250;
    q.cfg_scale = 4.0f;
    q.cfg_t_hi = 1.0f;
    q.num_classes = 10;
    q.num = 100;
    q.width = q.height = 32;
    q.channels = 1;
    int found = 0;
    (void)dm_batch_manifest_check(dir, &q, &found);
    return 0;
}

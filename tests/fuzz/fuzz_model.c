/* libFuzzer target: a whole model file — configuration, weight loading (src/dit/load.c) and,
 * when the model is small, one forward pass of one image (src/dit/forward.c, src/router) with
 * its routing record. Work is bounded by the weights, which the file must hold. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("model.safetensors", data, size);
    dm_model *m = NULL;
    if (dm_model_load(path, &m) != DM_OK) return 0;
    const dm_config *c = dm_model_config(m);
    const int64_t S = c->input_size, T = (S / c->patch) * (S / c->patch);
    const int64_t work = T * T * c->hidden * c->depth + T * c->hidden * c->expert_hidden * c->depth;
    if (work <= 20000000 && S * S * c->in_channels <= (1 << 16)) {
        const size_t nx = (size_t)(c->in_channels * S * S), no = (size_t)(c->out_channels * S * S);
        const int Lm = dm_config_moe_layers(c);
        float *x = malloc(nx * sizeof *x), *out = malloc(no * sizeof *out);
        dm_routes r = {malloc((size_t)Lm * T * c->top_k * sizeof(int32_t)),
                       malloc((size_t)Lm * T * c->top_k * sizeof(float))};
        for (size_t i = 0; i < nx; i++) x[i] = (float)((int)(i * 7919 % 200) - 100) / 50.0f;
        const float t = 500.0f;
        const int64_t y = size % (size_t)(c->num_classes + 1); /* sometimes the null class */
        if (x && out && r.ids && r.weights) (void)dm_model_forward(m, 1, x, &t, &y, out, &r);
        free(x);
        free(out);
        free(r.ids);
        free(r.weights);
    }
    dm_model_free(m);
    return 0;
}

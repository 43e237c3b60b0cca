/* ditmoe-routestats: the MoE lab's statistics of routing dumps as JSON on stdout
 * (trace/analysis.h; docs/moe-lab.md): ExFlow affinity P(expert at l+1 | expert at l), top-k set
 * persistence between adjacent steps per layer and step band, mean experts per token per layer
 * and step, co-activation and gate mass per layer.
 *
 *   ditmoe-routestats [--uncond] [--bands N] DUMP [DUMP...] > stats.json
 *
 * Dumps must share a shape (layers, experts, k, steps). Exit 0, 2 bad input, 1 runtime. Meant
 * to become `ditmoe-routes --affinity` after the CLI merge. */
#include "ditmoe.h"
#include "cli/common.h"
#include "trace/analysis.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    int uncond = 0, bands = 5, n = 0;
    const char *dumps[64];
    dm_status st = DM_OK;
    for (int i = 1; i < argc && !st; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            puts("usage: ditmoe-routestats [--uncond] [--bands N (default 5)] DUMP [DUMP...] > stats.json");
            return 0;
        } else if (!strcmp(argv[i], "--uncond")) {
            uncond = 1;
        } else if (!strcmp(argv[i], "--bands")) {
            st = i + 1 < argc ? dm_cli_int("--bands", argv[++i], 1, 1000, &bands)
                              : dm_fail(DM_ERR_ARG, "--bands needs a value");
        } else if (argv[i][0] == '-') {
            st = dm_fail(DM_ERR_ARG, "unknown flag %s (see --help)", argv[i]);
        } else if (n == 64) {
            st = dm_fail(DM_ERR_ARG, "at most 64 dumps");
        } else {
            dumps[n++] = argv[i];
        }
    }
    if (!st && !n) st = dm_fail(DM_ERR_ARG, "no DUMP (see --help)");
    dm_route_analysis a;
    int have = 0;
    for (int d = 0; !st && d < n; d++) {
        dm_trace_reader *r = NULL;
        const dm_trace_record *rec;
        st = dm_trace_read_open(dumps[d], &r);
        if (!st && !have) {
            st = dm_route_analysis_init(&a, dm_trace_read_shape(r), uncond);
            have = !st;
        } else if (!st) {
            const dm_trace_shape *s = dm_trace_read_shape(r);
            if (s->layers != a.shape.layers || s->num_experts != a.shape.num_experts ||
                s->top_k != a.shape.top_k || s->steps != a.shape.steps ||
                s->uncond_expert != a.shape.uncond_expert)
                st = dm_fail(DM_ERR_FORMAT, "%s: shape differs from %s", dumps[d], dumps[0]);
        }
        while (!st && !(st = dm_trace_read_next(r, &rec)) && rec) st = dm_route_analysis_add(&a, rec);
        if (st == DM_ERR_FORMAT) {
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", dm_last_error());
            st = dm_fail(DM_ERR_FORMAT, "%s: %s", dumps[d], msg);
        }
        dm_trace_read_close(r);
    }
    if (!st) st = dm_route_analysis_write_json(&a, bands, stdout);
    if (have) dm_route_analysis_free(&a);
    if (st) {
        fprintf(stderr, "ditmoe-routestats: %s\n", dm_last_error());
        return dm_exit_code(st);
    }
    return 0;
}

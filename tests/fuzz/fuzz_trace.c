/* libFuzzer target: the routing-dump reader (src/trace/reader.c) and the aggregation behind
 * ditmoe-routes (src/trace/aggregate.c), both halves, every record. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_file("in.dmr", data, size);
    dm_trace_reader *r = NULL;
    if (dm_trace_read_open(path, &r) != DM_OK) return 0;
    dm_route_counts c[2];
    const int ok0 = dm_route_counts_init(&c[0], dm_trace_read_shape(r), 0) == DM_OK;
    const int ok1 = ok0 && dm_route_counts_init(&c[1], dm_trace_read_shape(r), 1) == DM_OK;
    for (;;) {
        const dm_trace_record *rec = NULL;
        if (dm_trace_read_next(r, &rec) != DM_OK || !rec) break;
        if (ok0 && dm_route_counts_add(&c[0], rec) != DM_OK) break;
        if (ok1 && dm_route_counts_add(&c[1], rec) != DM_OK) break;
    }
    if (ok0) {
        double mi, h;
        dm_route_table_info(c[0].by_class, c[0].shape.num_classes, c[0].X, &mi, &h);
        dm_route_counts_free(&c[0]);
    }
    if (ok1) dm_route_counts_free(&c[1]);
    dm_trace_read_close(r);
    return 0;
}

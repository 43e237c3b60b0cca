/* Expert-output caching across denoising evaluations (MoECa-style; docs/moe-lab.md, spec
 * docs/spec/moe-inference.md A8): for every MoE layer and every token of every row, the ROUTED
 * part of the layer's output (sum over picks of weight x expert(h); the shared expert and the
 * residual are always recomputed) from the evaluation that last computed it, reused until a
 * refresh rule asks for a new computation.
 *
 * Entries are keyed by (global image index, branch), never by row position, so results do not
 * depend on how images are grouped into batches: branch 0 = conditional rows, 1 = the
 * unconditional half of CFG, 2 = a self-contrast weak pass (each half its own entry). Every
 * decision for a token depends only on that token's own entry and router probabilities.
 *
 * Refresh rules ("--expert-cache K[,refresh=fixed|route|delta:EPS][,mem=MiB][,ffn]"):
 *  - fixed (default): a computed output serves K evaluations (the computing one included), then
 *    is recomputed; K = 1 means always recompute (nothing is stored: 0 bytes).
 *  - route: as fixed, and also recompute a token as soon as its top-k SET (the model's k, from
 *    the current router probabilities) differs from the set when its output was computed.
 *  - delta:EPS: as fixed, and also recompute when sum_e |p_now(e) - p_then(e)| > EPS (the L1
 *    drift of the token's router distribution since its output was computed).
 * "Evaluation" counts denoiser calls in which the entry's row is present (Heun: 2 per step; a
 * CFG-interval step without the unconditional half does not age that half). Call
 * dm_expert_cache_reset at the start of every sampling trajectory. */
#ifndef DM_ROUTER_EXPERT_CACHE_H
#define DM_ROUTER_EXPERT_CACHE_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { DM_CACHE_FIXED = 0, DM_CACHE_ROUTE, DM_CACHE_DELTA } dm_cache_refresh;

typedef struct {
    int K;                    /* evaluations one computed output serves; 0 = cache off          */
    dm_cache_refresh refresh;
    float eps;                /* delta: L1 drift bound                                          */
    size_t max_bytes;         /* memory bound (default 1 GiB, "mem=MiB")                        */
    int whole;                /* ",ffn": the cached value is the whole feed-forward output (routed
                               * + shared expert), so a served token skips the shared expert too;
                               * default 0: routed part only, shared always recomputed          */
} dm_expert_cache_opts;

void dm_expert_cache_opts_init(dm_expert_cache_opts *o); /* off */
dm_status dm_expert_cache_parse(const char *s, dm_expert_cache_opts *o);
void dm_expert_cache_str(const dm_expert_cache_opts *o, char *buf, size_t n);

typedef struct dm_expert_cache dm_expert_cache;

/* A cache for `layers` MoE layers of T tokens x D hidden, router over E <= 64 experts with
 * trained top model_k, holding up to max_rows (image, branch) entries (the most rows one
 * evaluation has, e.g. 2B with CFG). DM_ERR_ARG when the bound max_bytes is too small (the
 * message says how much is needed). */
dm_status dm_expert_cache_create(const dm_expert_cache_opts *o, int layers, int T, int D, int E,
                                 int model_k, int max_rows, dm_expert_cache **out);
void dm_expert_cache_free(dm_expert_cache *c); /* NULL-safe */
size_t dm_expert_cache_bytes(const dm_expert_cache *c); /* everything allocated */
void dm_expert_cache_reset(dm_expert_cache *c);         /* every entry invalid */

/* Start an evaluation of R rows: image [R] global indices (>= 0), branch [R] (0..3). Rows map
 * to entries; an unseen key takes a free entry or evicts the one least recently used (never
 * one of this evaluation). DM_ERR_ARG if R > max_rows or a key repeats. */
dm_status dm_expert_cache_begin(dm_expert_cache *c, int R, const int64_t *image,
                                const uint8_t *branch);
/* Layer `layer` of this evaluation: probs [R*T, E] the router probabilities (scores) of every
 * token (needed by route/delta; may be NULL for fixed). recompute [R*T] = 1 where the routed
 * output must be computed. Returns how many. */
int dm_expert_cache_decide(dm_expert_cache *c, int layer, const float *probs, uint8_t *recompute);
/* After the grouped GEMMs ran on the recompute tokens: routed [R*T, D] holds their fresh routed
 * outputs (other tokens' values are ignored); stores them and fills the other tokens from the
 * cache. probs as in decide. A token whose recompute is DM_CACHE_LEAVE (2; the caller skipped its
 * routed part, --skip-routed) is neither stored nor served: its entry stays as it was and does
 * not age, and routed keeps the caller's value. */
#define DM_CACHE_LEAVE 2
void dm_expert_cache_update(dm_expert_cache *c, int layer, const float *probs,
                            const uint8_t *recompute, float *routed);

typedef struct {
    int64_t computed, reused; /* token-layer outputs computed / served from the cache */
    int64_t evictions;
} dm_expert_cache_stats;
void dm_expert_cache_get_stats(const dm_expert_cache *c, dm_expert_cache_stats *s);

#endif

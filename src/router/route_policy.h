/* Inference-time routing policies (docs/moe-lab.md; spec docs/spec/moe-inference.md A1, A2, A7,
 * A8) as pure host functions: router scores of N tokens in, a variable number of experts per
 * token out, in a CSR form that the grouped expert GEMMs consume directly (the picks grouped by
 * expert, tokens ascending within an expert: no per-token expert loop).
 *
 * Scores are what the router produced for each token: DiT-MoE softmax probabilities [N, E]
 * (ditmoe.md §2.8, weights not renormalised), ProMoE activated cosine scores [N, E] (promoe.md
 * §3). ProMoE's null-class tokens are marked in `uncond` and get exactly one pick: the
 * unconditional expert `uncond_id` with weight 1, whatever the policy.
 *
 * Every policy orders a token's experts by descending score, ties to the LOWER expert id (the
 * rule of top_k() in router/moe.c), so `top-k` reproduces today's picks bit for bit.
 *
 * Also here: the parsers of the lab's run-time specs (--route, --skip-routed, --self-contrast;
 * --expert-cache is parsed in router/expert_cache.h). They return DM_ERR_ARG with one line
 * naming the flag and the field (dm_last_error()). */
#ifndef DM_ROUTER_ROUTE_POLICY_H
#define DM_ROUTER_ROUTE_POLICY_H

#include "ditmoe.h"

#include <stddef.h>
#include <stdint.h>

/* ---- policies ---------------------------------------------------------------------------- */

#define DM_ROUTE_MAX_E 256 /* routed experts per layer the selection handles (checked by _check) */

typedef enum {
    DM_POLICY_TOPK = 0,  /* "top-k[=K]": the K best (K = 0: the model's k)                   */
    DM_POLICY_TOPP,      /* "top-p=P[,max=K][,renorm]": the smallest prefix of the sorted scores
                          * whose running sum EXCEEDS P (the crossing expert included); if the
                          * sum never exceeds P, all E (then capped by max)                    */
    DM_POLICY_THRESHOLD, /* "threshold=T[,max=K][,renorm]": every expert with score >= T, at
                          * least the top one                                                  */
    DM_POLICY_PROTO2,    /* "rank2=TAU[,margin=DELTA]" (ProMoE): the top prototype, plus the
                          * second when cos1 < TAU or cos1 - cos2 < DELTA                      */
} dm_policy_kind;

typedef struct {
    dm_policy_kind kind;
    int k;        /* top-k: K (0 = model's k); top-p/threshold: max picks (0 = no cap)      */
    float p;      /* top-p: P in (0, 1]; threshold: T in (0, 1]; rank2: TAU                  */
    float margin; /* rank2: DELTA (< 0 = unused)                                             */
    int renorm;   /* top-p/threshold: scale the kept weights so that they sum to the mass of
                   * the model's top-k (the scale the model was trained with)               */
} dm_route_policy;

void dm_route_policy_init(dm_route_policy *p); /* top-k with the model's k */

/* Parse a --route value. ProMoE-only and DiT-MoE-only kinds are checked by _check. */
dm_status dm_route_policy_parse(const char *s, dm_route_policy *out);
/* Check `p` against a model: prob_router = 1 for softmax routers (DiT-MoE), 0 for cosine
 * scores (ProMoE: top-p/threshold have no meaning there, rank2 only there), E routed experts,
 * model_k trained picks per token. */
dm_status dm_route_policy_check(const dm_route_policy *p, int prob_router, int E, int model_k);
/* The canonical string ("top-p=0.5,max=3,renorm"), for PNG metadata and dump headers. */
void dm_route_policy_str(const dm_route_policy *p, char *buf, size_t n);
/* Most picks one token can get under p (uncond tokens: 1). */
int dm_route_policy_max_picks(const dm_route_policy *p, int E, int model_k);

/* ---- the output: CSR over tokens, and the same picks grouped by expert ---------------------- */

typedef struct {
    int N, E;          /* tokens, routed experts                                            */
    int n_experts;     /* columns of the grouping: E, or E + 1 with ProMoE's uncond expert  */
    int n_picks;       /* total picks                                                       */
    int32_t *tok_off;  /* [N+1] picks of token n are [tok_off[n], tok_off[n+1])             */
    int32_t *ids;      /* [cap] expert of each pick, per token in descending weight         */
    float *weights;    /* [cap] its gate weight                                             */
    int32_t *exp_off;  /* [n_experts+1] grouped rows of expert e are [exp_off[e], exp_off[e+1]) */
    int32_t *rows;     /* [cap] token of each grouped row (expert-major, tokens ascending)   */
    float *row_w;      /* [cap] weight of each grouped row                                  */
    /* storage */
    int cap_tokens, cap_picks, cap_experts;
} dm_route_csr;

/* Grow to N tokens, `max_picks` per token, n_experts columns; 0 or DM_ERR_NOMEM. */
dm_status dm_route_csr_reserve(dm_route_csr *c, int N, int max_picks, int n_experts);
void dm_route_csr_free(dm_route_csr *c);

/* Select experts for N tokens under p (already checked). scores [N, E]; uncond [N] (NULL = no
 * null-class tokens) with uncond_id (E for ProMoE); model_k is the trained k (top-k default,
 * renorm mass). c must be reserved for N, dm_route_policy_max_picks, n_experts = E or E+1
 * (uncond_id must be E when uncond is given). */
void dm_route_select(const dm_route_policy *p, const float *scores, int N, int E, int model_k,
                     const uint8_t *uncond, int uncond_id, dm_route_csr *c);
/* Obviously-correct reference: per token, experts ranked by counting, rule applied literally.
 * Fills ids/weights [N, kmax] (-1 / 0 padded) and counts [N]. */
void dm_route_select_ref(const dm_route_policy *p, const float *scores, int N, int E, int model_k,
                         const uint8_t *uncond, int uncond_id, int kmax, int32_t *ids,
                         float *weights, int32_t *counts);
/* The CSR as padded records [N, kmax] (-1 / 0 beyond a token's count; a token with more than
 * kmax picks keeps its first kmax), the layout of dm_routes and of routing dumps. */
void dm_route_csr_to_padded(const dm_route_csr *c, int kmax, int32_t *ids, float *weights);

/* out = in with the picks of tokens where keep_tok[n] == 0 removed (their count becomes 0),
 * regrouped by expert. The compute view for --skip-routed (keep = not skipped) and for the
 * expert cache (keep = recompute); `in` stays the routing record. out reserved like in. */
void dm_route_csr_filter(const dm_route_csr *in, const uint8_t *keep_tok, dm_route_csr *out);

/* out = per token the picks of b where use_b[n], else of a (both over the same N tokens and
 * n_experts), regrouped by expert (tokens ascending): strong and weak rows in one CSR. out
 * reserved for the larger of the two. */
void dm_route_csr_mix(const dm_route_csr *a, const dm_route_csr *b, const uint8_t *use_b,
                      dm_route_csr *out);

/* ---- --skip-routed LAYERS@T0-T1 ------------------------------------------------------------ */

#define DM_SKIP_MAX_RULES 8
typedef struct {
    uint8_t block[DM_TRACE_MAX_LAYERS]; /* 1: this transformer block's routed experts skipped  */
    float t0, t1;                       /* while t01 in [t0, t1] (flow time, or DDPM t/999)    */
} dm_skip_rule;
typedef struct {
    int n; /* rules */
    dm_skip_rule rule[DM_SKIP_MAX_RULES];
} dm_skip_routed;

/* Parse one or more rules separated by ';' ("2,3@0.0-0.5", "all@0.8-1", "1@0.5-1;3@0-0.2").
 * Layers are transformer block indices; each must be an MoE block of the model (moe_blocks
 * [n_moe], e.g. ProMoE's odd blocks) below depth. Appends to *out (zero it first). */
dm_status dm_skip_routed_parse(const char *s, int depth, const int *moe_blocks, int n_moe,
                               dm_skip_routed *out);
/* 1 when block's routed experts are skipped at normalised time t01. */
int dm_skip_routed_active(const dm_skip_routed *s, int block, float t01);

/* ---- --self-contrast W[,weak=rank2|rank3|top1|shared] ---------------------------------------- */

/* dm_weak_kind: in ditmoe.h (MoE lab section) */
typedef struct {
    float w;           /* D = D_weak + w (D_strong - D_weak); 0 = off                        */
    dm_weak_kind weak; /* the weak conditional pass's routing (default rank2)                */
    int replace_uncond;/* 1: "mode=replace" (the weak pass replaces the unconditional branch),
                        * 0: "mode=add" (default: on top of CFG, a third batch half)          */
} dm_self_contrast;
dm_status dm_self_contrast_parse(const char *s, dm_self_contrast *out);
/* The weak pass as a routing policy-like rule on one token's sorted experts: which ranks
 * (0-based) it keeps; returns the count (0 for shared: routed part skipped). E experts. */
int dm_weak_ranks(dm_weak_kind k, int E, int *ranks /* [2] */);
/* The guided prediction, elementwise over n values:
 *   mode=replace: out = Dw + W (Dc - Dw)                       (du unused, may be NULL)
 *   mode=add:     out = Du + s (Dc - Du) + (W - 1) (Dc - Dw)    (s = cfg_scale; W = 1 is CFG)
 * Dc: conditional strong pass, Du: unconditional, Dw: conditional weak pass. */
void dm_self_contrast_combine(const dm_self_contrast *sc, float cfg_scale, size_t n, const float *dc,
                              const float *du, const float *dw, float *out);
/* Weak routing of N tokens into c (same contract as dm_route_select; weights = raw scores of
 * the kept ranks). */
void dm_route_select_weak(dm_weak_kind k, const float *scores, int N, int E, const uint8_t *uncond,
                          int uncond_id, dm_route_csr *c);

#endif

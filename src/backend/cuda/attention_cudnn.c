/* cuDNN fused attention (SDPA_FWD operation of the backend C API, cuDNN >= 9.13), with cuDNN
 * loaded at run time (dlopen of libcudnn.so.9): a build with the CUDA backend starts and runs
 * everything else on a machine without cuDNN, and says so once when attention falls back to the
 * naive path at plan time.
 *
 * Graph per (B, T, H, hd, dtype): Q, K, V [B, H, T, hd] read in place from the 16-bit qkv rows
 * by strides (token stride 3*H*hd, head stride hd), O [B, H, T, hd] written as [B*T, H*hd],
 * scale 1/sqrt(hd) by value, no Stats tensor (inference). Heuristics mode A; engines with the
 * NONDETERMINISTIC numerical note are skipped; the first plan that finalizes is kept. */
#include "backend/cuda/ctx.h"

#include <cudnn.h>
#include <dlfcn.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PLANS 16
#define MAX_CFG 16

typedef struct {
    int B, T, H, hd, t, usable;
    cudnnBackendDescriptor_t plan;
    int64_t ws;
} sdpa_plan;

struct dmc_cudnn {
    void *lib;
    size_t version;
    cudnnHandle_t h;
    const char *why; /* why cuDNN is unusable (NULL when usable) */
    sdpa_plan plans[MAX_PLANS];
    int n_plans;
    cudnnStatus_t (*Create)(cudnnHandle_t *);
    cudnnStatus_t (*Destroy)(cudnnHandle_t);
    cudnnStatus_t (*SetStream)(cudnnHandle_t, cudaStream_t);
    size_t (*GetVersion)(void);
    const char *(*GetErrorString)(cudnnStatus_t);
    cudnnStatus_t (*CreateDesc)(cudnnBackendDescriptorType_t, cudnnBackendDescriptor_t *);
    cudnnStatus_t (*DestroyDesc)(cudnnBackendDescriptor_t);
    cudnnStatus_t (*SetAttr)(cudnnBackendDescriptor_t, cudnnBackendAttributeName_t,
                             cudnnBackendAttributeType_t, int64_t, const void *);
    cudnnStatus_t (*GetAttr)(cudnnBackendDescriptor_t const, cudnnBackendAttributeName_t,
                             cudnnBackendAttributeType_t, int64_t, int64_t *, void *);
    cudnnStatus_t (*Finalize)(cudnnBackendDescriptor_t);
    cudnnStatus_t (*Execute)(cudnnHandle_t, cudnnBackendDescriptor_t, cudnnBackendDescriptor_t);
};

/* Load libcudnn.so.9 once per context; d->why says what is missing. */
static dmc_cudnn *dnn_get(dmc_ctx *c)
{
    if (c->dnn) return c->dnn;
    dmc_cudnn *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    c->dnn = d;
    d->lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
    if (!d->lib) d->lib = dlopen("libcudnn.so", RTLD_NOW | RTLD_LOCAL);
    if (!d->lib) {
        d->why = "libcudnn.so.9 not found (LD_LIBRARY_PATH)";
        return d;
    }
    /* dlsym returns void *; POSIX guarantees the conversion to a function pointer works. */
#define SYM(field, name)                                                                           \
    do {                                                                                           \
        void *s_ = dlsym(d->lib, name);                                                            \
        if (!s_) {                                                                                 \
            d->why = "libcudnn.so.9 lacks " name;                                                  \
            return d;                                                                              \
        }                                                                                          \
        memcpy(&d->field, &s_, sizeof s_);                                                         \
    } while (0)
    SYM(Create, "cudnnCreate");
    SYM(Destroy, "cudnnDestroy");
    SYM(SetStream, "cudnnSetStream");
    SYM(GetVersion, "cudnnGetVersion");
    SYM(GetErrorString, "cudnnGetErrorString");
    SYM(CreateDesc, "cudnnBackendCreateDescriptor");
    SYM(DestroyDesc, "cudnnBackendDestroyDescriptor");
    SYM(SetAttr, "cudnnBackendSetAttribute");
    SYM(GetAttr, "cudnnBackendGetAttribute");
    SYM(Finalize, "cudnnBackendFinalize");
    SYM(Execute, "cudnnBackendExecute");
#undef SYM
    d->version = d->GetVersion();
    if (d->version < 91300) {
        d->why = "cuDNN older than 9.13 (no SDPA_FWD operation)";
        return d;
    }
    if (d->Create(&d->h) != CUDNN_STATUS_SUCCESS) {
        d->h = NULL;
        d->why = "cudnnCreate failed";
        return d;
    }
    if (d->SetStream(d->h, c->stream) != CUDNN_STATUS_SUCCESS) d->why = "cudnnSetStream failed";
    return d;
}

int dmc_cudnn_version(dmc_ctx *c, const char **why)
{
    dmc_cudnn *d = dnn_get(c);
    if (why) *why = d ? d->why : "out of host memory";
    return d && d->lib && d->GetVersion ? (int)d->version : 0;
}

void dmc_cudnn_free(dmc_ctx *c)
{
    dmc_cudnn *d = c->dnn;
    if (!d) return;
    for (int i = 0; i < d->n_plans; i++)
        if (d->plans[i].plan) d->DestroyDesc(d->plans[i].plan);
    if (d->h) d->Destroy(d->h);
    if (d->lib) dlclose(d->lib);
    free(d);
    c->dnn = NULL;
}

/* A finalized tensor descriptor. */
static cudnnStatus_t tensor(dmc_cudnn *d, int64_t uid, cudnnDataType_t dt, const int64_t *dims,
                            const int64_t *strides, int by_value, cudnnBackendDescriptor_t *out)
{
    cudnnStatus_t s = d->CreateDesc(CUDNN_BACKEND_TENSOR_DESCRIPTOR, out);
    const int64_t align = 16;
    const bool bv = by_value != 0;
    if (!s) s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    if (!s) s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims);
    if (!s) s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides);
    if (!s) s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    if (!s) s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    if (!s && by_value)
        s = d->SetAttr(*out, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &bv);
    if (!s) s = d->Finalize(*out);
    return s;
}

enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_SCALE };

/* Build the plan of one shape; DM_OK with p->usable = 0 when no engine finalizes. */
static void build_plan(dmc_cudnn *d, sdpa_plan *p)
{
    const int64_t B = p->B, T = p->T, H = p->H, hd = p->hd, D = H * hd;
    const cudnnDataType_t dt = p->t == DMC_F16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
    const int64_t dims[4] = {B, H, T, hd};
    const int64_t s_qkv[4] = {T * 3 * D, hd, 3 * D, 1}, s_o[4] = {T * D, hd, D, 1};
    const int64_t one4[4] = {1, 1, 1, 1};
    cudnnBackendDescriptor_t q = NULL, k = NULL, v = NULL, o = NULL, sc = NULL, op = NULL,
                             graph = NULL, heur = NULL, cfg[MAX_CFG] = {0};
    int n_cfg = 0;
    cudnnStatus_t s = tensor(d, UID_Q, dt, dims, s_qkv, 0, &q);
    if (!s) s = tensor(d, UID_K, dt, dims, s_qkv, 0, &k);
    if (!s) s = tensor(d, UID_V, dt, dims, s_qkv, 0, &v);
    if (!s) s = tensor(d, UID_O, dt, dims, s_o, 0, &o);
    if (!s) s = tensor(d, UID_SCALE, CUDNN_DATA_FLOAT, one4, one4, 1, &sc);
    if (!s) s = d->CreateDesc(CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, &op);
    if (!s) s = d->SetAttr(op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &q);
    if (!s) s = d->SetAttr(op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &k);
    if (!s) s = d->SetAttr(op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
    if (!s) s = d->SetAttr(op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &o);
    if (!s) s = d->SetAttr(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &sc);
    if (!s) s = d->Finalize(op);
    if (!s) s = d->CreateDesc(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, &graph);
    if (!s) s = d->SetAttr(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &op);
    if (!s) s = d->SetAttr(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &d->h);
    if (!s) s = d->Finalize(graph);
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    if (!s) s = d->CreateDesc(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur);
    if (!s) s = d->SetAttr(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
    if (!s) s = d->SetAttr(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (!s) s = d->Finalize(heur);
    for (int i = 0; !s && i < MAX_CFG; i++)
        if ((s = d->CreateDesc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]))) cfg[i] = NULL;
    int64_t got = 0;
    if (!s)
        s = d->GetAttr(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, MAX_CFG,
                       &got, cfg);
    n_cfg = (int)got;
    for (int i = 0; !s && i < n_cfg && !p->usable; i++) {
        /* Skip nondeterministic engines (docs/spec/cuda.md §4 rule 7). */
        cudnnBackendDescriptor_t eng = NULL;
        if (d->CreateDesc(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng)) continue;
        int64_t ne = 0, nn = 0;
        cudnnBackendNumericalNote_t notes[16];
        int nondet = 0;
        if (!d->GetAttr(cfg[i], CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &ne, &eng) &&
            !d->GetAttr(eng, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE, 16, &nn, notes))
            for (int j = 0; j < nn; j++) nondet |= notes[j] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC;
        d->DestroyDesc(eng);
        if (nondet) continue;
        cudnnBackendDescriptor_t plan = NULL;
        if (d->CreateDesc(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan)) continue;
        if (!d->SetAttr(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &d->h) &&
            !d->SetAttr(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg[i]) &&
            !d->Finalize(plan)) {
            int64_t ws = 0, nw = 0;
            if (!d->GetAttr(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &nw, &ws)) {
                p->plan = plan;
                p->ws = ws;
                p->usable = 1;
                continue;
            }
        }
        d->DestroyDesc(plan);
    }
    for (int i = 0; i < MAX_CFG; i++)
        if (cfg[i]) d->DestroyDesc(cfg[i]);
    cudnnBackendDescriptor_t all[] = {heur, graph, op, sc, o, v, k, q};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]) d->DestroyDesc(all[i]);
    dm_log(p->usable ? DM_LOG_VERBOSE : DM_LOG_INFO,
           "[%s] cuda: attention B %d T %d H %d hd %d %s: %s", p->usable ? "INFO" : "WARN", p->B,
           p->T, p->H, p->hd, p->t == DMC_F16 ? "fp16" : "bf16",
           p->usable ? "cuDNN SDPA plan" : "no cuDNN SDPA plan: naive attention for this shape");
    if (s && !p->usable)
        dm_log(DM_LOG_VERBOSE, "cuda: cuDNN: %s", d->GetErrorString(s));
}

dm_status dmc_sdpa(dmc_ctx *c, const uint16_t *qkv16, int B, int T, int H, int hd, dmc_h16 t,
                   uint16_t *o16, int *usable)
{
    *usable = 0;
    dmc_cudnn *d = dnn_get(c);
    if (!d) return dm_fail(DM_ERR_NOMEM, "cuda: attention: out of host memory");
    if (d->why) {
        static int said;
        if (!said)
            dm_log(DM_LOG_INFO, "[WARN] cuda: cuDNN unusable (%s): naive attention", d->why);
        said = 1;
        return DM_OK;
    }
    sdpa_plan *p = NULL;
    for (int i = 0; i < d->n_plans; i++) {
        sdpa_plan *q = &d->plans[i];
        if (q->B == B && q->T == T && q->H == H && q->hd == hd && q->t == (int)t) p = q;
    }
    if (!p) {
        if (d->n_plans == MAX_PLANS) { /* evict the oldest */
            if (d->plans[0].plan) d->DestroyDesc(d->plans[0].plan);
            memmove(d->plans, d->plans + 1, (MAX_PLANS - 1) * sizeof *d->plans);
            d->n_plans--;
        }
        p = &d->plans[d->n_plans++];
        memset(p, 0, sizeof *p);
        p->B = B, p->T = T, p->H = H, p->hd = hd, p->t = (int)t;
        build_plan(d, p);
    }
    *usable = p->usable;
    if (!p->usable || !qkv16) return DM_OK;
    dm_status st;
    void *ws = p->ws > 0 ? dmc_scratch(c, DMC_SCR_COL, (size_t)p->ws, "attention (cuDNN)", &st) : NULL;
    if (p->ws > 0 && !ws) return st;
    const size_t D = (size_t)H * hd;
    float scale = 1.0f / sqrtf((float)hd);
    void *ptrs[5] = {(void *)qkv16, (void *)(qkv16 + D), (void *)(qkv16 + 2 * D), o16, &scale};
    const int64_t uids[5] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE};
    cudnnBackendDescriptor_t vp = NULL;
    cudnnStatus_t s = d->CreateDesc(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp);
    if (!s) s = d->SetAttr(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 5, uids);
    if (!s) s = d->SetAttr(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 5, ptrs);
    if (!s) s = d->SetAttr(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
    if (!s) s = d->Finalize(vp);
    if (!s) s = d->Execute(d->h, p->plan, vp);
    if (vp) d->DestroyDesc(vp);
    if (s)
        return dm_fail(DM_ERR_BACKEND, "cuda: attention: cuDNN SDPA execute: %s",
                       d->GetErrorString(s));
    *usable = 1;
    return DM_OK;
}

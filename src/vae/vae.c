/* VAE decoder forward (docs/spec/vae_samplers.md A.2-A.6, docs/vae.md) and the public dm_vae_* API,
 * through the backend's ops (backend/backend.h). One image at a time: three activation buffers of
 * the largest map (the backend keeps its own conv/attention scratch), so memory is bounded for any
 * batch. */
#include "vae/vae_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif

dm_status dm_vae_load(const char *path, dm_vae **out)
{
    dm_load_opts o;
    dm_load_opts_init(&o);
    return dm_vae_load_opts(path, &o, out);
}

dm_status dm_vae_load_opts(const char *path, const dm_load_opts *o, dm_vae **out)
{
    *out = NULL;
    dm_backend *be = NULL;
    dm_status st = dm_backend_open(o, &be);
    if (st != DM_OK) return st;
    st = dm_backend_require(be, "alloc,release,upload,download,sync,weight,weight_free,conv2d,"
                            "group_norm,upsample2x,vae_attention", path);
    if (st != DM_OK) {
        dm_backend_close(be);
        return st;
    }
    dm_vae *v = calloc(1, sizeof *v);
    if (!v) {
        dm_backend_close(be);
        return dm_fail(DM_ERR_NOMEM, "%s: out of memory", path);
    }
    v->be = be;
    v->opts = *o;
    v->opts.cfg = NULL;
    struct stat sb;
    if (stat(path, &sb) == 0) v->file_size = (long long)sb.st_size, v->file_mtime = (long long)sb.st_mtime;
    st = dm_vae_load_weights(path, v);
    if (st != DM_OK) {
        dm_vae_free(v);
        return st;
    }
    *out = v;
    return DM_OK;
}

static void free_ws(dm_vae *v)
{
    if (!v->be) return;
    for (int i = 0; i < 3; i++) v->be->ops->release(v->be->ctx, &v->act[i]);
    v->be->ops->release(v->be->ctx, &v->zbuf);
    v->be->ops->release(v->be->ctx, &v->obuf);
    v->ws_h = v->ws_w = 0;
}

void dm_vae_free(dm_vae *v)
{
    if (!v) return;
    for (int i = 0; i < v->n_copies; i++) dm_vae_free(v->copies[i]);
    free(v->copies);
    dm_vae_free_weights(v);
    free_ws(v);
    dm_backend_close(v->be);
    free(v);
}

const dm_vae_info *dm_vae_get_info(const dm_vae *v) { return &v->info; }

static size_t maxz(size_t a, size_t b) { return a > b ? a : b; }

/* Largest activation (C*H*W) over the whole network for latent h x w. */
static size_t plan(const dm_vae *v, int h, int w)
{
    size_t hw = (size_t)h * w;
    size_t A = maxz((size_t)v->info.z_channels, (size_t)v->latent_ch) * hw;
    A = maxz(A, (size_t)v->top * hw);
    int H = h, W = w, prev = v->top;
    for (int i = 0; i < v->levels; i++) {
        const dm_vae_level *lv = &v->level[i];
        A = maxz(A, (size_t)maxz((size_t)prev, (size_t)lv->width) * H * W);
        if (lv->has_up) {
            H *= 2; W *= 2;
            A = maxz(A, (size_t)lv->width * H * W);
        }
        prev = lv->width;
    }
    return A;
}

static dm_status ensure_ws(dm_vae *v, int h, int w)
{
    if (v->ws_h == h && v->ws_w == w) return DM_OK;
    free_ws(v);
    const size_t act = plan(v, h, w), f = (size_t)v->info.factor;
    const size_t zn = (size_t)v->info.z_channels * h * w;
    const size_t on = (size_t)v->info.out_channels * h * f * w * f;
    dm_status st = DM_OK;
    for (int i = 0; i < 3 && st == DM_OK; i++)
        st = v->be->ops->alloc(v->be->ctx, sizeof(float) * act, &v->act[i]);
    if (st == DM_OK) st = v->be->ops->alloc(v->be->ctx, sizeof(float) * zn, &v->zbuf);
    if (st == DM_OK) st = v->be->ops->alloc(v->be->ctx, sizeof(float) * on, &v->obuf);
    if (st != DM_OK) {
        free_ws(v);
        return dm_fail(st, "%s: cannot allocate decoder workspace for a %dx%d latent (%zu MiB)",
                       v->path, h, w, (3 * act + zn + on) * sizeof(float) >> 20);
    }
    dm_log(DM_LOG_VERBOSE, "VAE workspace for %dx%d latent: 3 x %zu MiB activations", h, w,
           act * 4 >> 20);
    v->ws_h = h;
    v->ws_w = w;
    return DM_OK;
}

#define TRY(call)                     \
    do {                              \
        dm_status st_ = (call);       \
        if (st_ != DM_OK) return st_; \
    } while (0)

/* Per-op wall time of the current decode (v->prof_t), reported with -v. */
enum { T_CONV, T_NORM, T_ATTN, T_OTHER };

static dm_status conv_any(dm_vae *v, const dm_vae_conv *c, const float *x, int H, int W,
                          float *out, int acc)
{
    double t0 = dm_time_sec();
    TRY(v->be->ops->conv2d(v->be->ctx, x, c->cin, H, W, c->w, c->b, c->cout, c->k, acc, out));
    v->prof_t[T_CONV] += dm_time_sec() - t0;
    v->prof_flops += 2.0 * c->cout * c->cin * c->k * c->k * (double)H * W;
    return DM_OK;
}
static dm_status conv(dm_vae *v, const dm_vae_conv *c, const float *x, int H, int W, float *out)
{
    return conv_any(v, c, x, H, W, out, 0);
}

static dm_status norm(dm_vae *v, const float *x, int C, size_t HW, const dm_vae_gn *g, float *y)
{
    double t0 = dm_time_sec();
    TRY(v->be->ops->group_norm(v->be->ctx, x, C, HW, v->groups, DM_VAE_EPS, g->g, g->b, 1, y));
    v->prof_t[T_NORM] += dm_time_sec() - t0;
    return DM_OK;
}

/* x [cin, H, W] in *a -> [cout, H, W] in *a (buffers may be swapped); *b, c scratch of the same
 * capacity. The residual add is fused into conv2 (accumulating sgemm). */
static dm_status resblock(dm_vae *v, const dm_vae_res *r, int H, int W, float **a, float **b,
                          float *c)
{
    const size_t HW = (size_t)H * W;
    TRY(norm(v, *a, r->cin, HW, &r->norm1, *b));
    TRY(conv(v, &r->conv1, *b, H, W, c));                             /* c [cout, HW] */
    TRY(norm(v, c, r->cout, HW, &r->norm2, c));
    if (r->shortcut.w) {
        TRY(conv(v, &r->shortcut, *a, H, W, *b));                    /* b = shortcut(x) */
        TRY(conv_any(v, &r->conv2, c, H, W, *b, 1));                 /* b += conv2(h) */
        float *t = *a; *a = *b; *b = t;
    } else {
        TRY(conv_any(v, &r->conv2, c, H, W, *a, 1));                 /* a = x + conv2(h) */
    }
    return DM_OK;
}

/* Set while a failed decode is re-run with a check after every stage (docs/reliability.md). */
static _Thread_local int vae_diag;

static dm_status vae_stage_check(dm_vae *v, const float *dev, size_t n, const char *stage, int i)
{
    float *hb = malloc(n * sizeof(float));
    if (!hb) return dm_fail(DM_ERR_NOMEM, "dm_vae_decode: out of memory");
    dm_status st = v->be->ops->download(v->be->ctx, hb, dev, n * sizeof(float));
    size_t bad = 0;
    if (st == DM_OK && !dm_all_finite(hb, n, &bad))
        st = i >= 0 ? dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in %s %d, element %zu",
                              v->path, stage, i, bad)
                    : dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in %s, element %zu",
                              v->path, stage, bad);
    free(hb);
    return st;
}
#define VAE_STAGE(buf, n, stage, i) \
    do { if (vae_diag) TRY(vae_stage_check(v, (buf), (n), (stage), (i))); } while (0)

dm_status dm_vae_decode_one(dm_vae *v, int h, int w, const float *z, float *img)
{
    float *a = v->act[0].p, *b = v->act[1].p, *c = v->act[2].p;
    const size_t hw = (size_t)h * w;
    for (int i = 0; i < 4; i++) v->prof_t[i] = 0;
    v->prof_flops = 0;
    const double t_start = dm_time_sec();
    TRY(conv(v, &v->post_quant, z, h, w, b));            /* b [latent_ch, h, w] */
    TRY(conv(v, &v->conv_in, b, h, w, a));               /* a [top, h, w] */
    VAE_STAGE(a, (size_t)v->top * hw, "conv_in", -1);
    TRY(resblock(v, &v->mid[0], h, w, &a, &b, c));
    VAE_STAGE(a, (size_t)v->top * hw, "mid block", 0);
    if (v->has_attn) {
        const dm_vae_attn *at = &v->attn;
        dm_vae_attn_layer aw = {at->norm.g, at->norm.b, at->wq, at->bq, at->wk, at->bk,
                                at->wv, at->bv, at->wo, at->bo};
        double t0 = dm_time_sec();
        TRY(v->be->ops->vae_attention(v->be->ctx, a, v->top, (int)hw, v->groups, &aw));
        v->prof_t[T_ATTN] += dm_time_sec() - t0;
    }
    VAE_STAGE(a, (size_t)v->top * hw, "mid attention", -1);
    TRY(resblock(v, &v->mid[1], h, w, &a, &b, c));
    VAE_STAGE(a, (size_t)v->top * hw, "mid block", 1);
    int H = h, W = w;
    for (int i = 0; i < v->levels; i++) {
        const dm_vae_level *lv = &v->level[i];
        for (int j = 0; j < lv->nres; j++) TRY(resblock(v, &lv->res[j], H, W, &a, &b, c));
        if (lv->has_up) {
            double t0 = dm_time_sec();
            TRY(v->be->ops->upsample2x(v->be->ctx, a, lv->width, H, W, c)); /* c [width, 2H, 2W] */
            v->prof_t[T_OTHER] += dm_time_sec() - t0;
            H *= 2; W *= 2;
            TRY(conv(v, &lv->up, c, H, W, a));
        }
        VAE_STAGE(a, (size_t)lv->width * H * W, "up level", i);
    }
    TRY(norm(v, a, v->norm_out.c, (size_t)H * W, &v->norm_out, b));
    TRY(conv(v, &v->conv_out, b, H, W, img));            /* img [out_ch, H, W] */
    const double tt = dm_time_sec() - t_start;
    const double *t = v->prof_t;
    dm_log(DM_LOG_VERBOSE, "VAE image %dx%d: %.3f s: conv %.3f s (%.1f GFLOP, %.1f GFLOP/s), "
           "group norm+silu %.3f s, attention %.3f s, upsample %.3f s", H, W, tt, t[T_CONV],
           v->prof_flops * 1e-9, v->prof_flops * 1e-9 / (t[T_CONV] > 0 ? t[T_CONV] : 1), t[T_NORM],
           t[T_ATTN], t[T_OTHER]);
    return DM_OK;
}

/* Image bi of the batch: z / scale, decode, download; a non-finite output is decoded again
 * with a check after every stage to name where it first appears. zs: host scratch [zc*h*w]. */
static dm_status decode_image(dm_vae *v, int bi, int h, int w, const float *z, float *img, float *zs)
{
    const long long f = v->info.factor;
    const size_t zn = (size_t)v->info.z_channels * h * w;
    const size_t on = (size_t)v->info.out_channels * (size_t)(h * f) * (size_t)(w * f);
    const float *zb = z + (size_t)bi * zn;
    for (size_t i = 0; i < zn; i++) zs[i] = zb[i] / v->info.scale; /* z / scaling_factor */
    float *ob = img + (size_t)bi * on;
    dm_status st = v->be->ops->upload(v->be->ctx, v->zbuf.p, zs, sizeof(float) * zn);
    if (st == DM_OK) st = dm_vae_decode_one(v, h, w, v->zbuf.p, v->obuf.p);
    if (st == DM_OK) st = v->be->ops->download(v->be->ctx, ob, v->obuf.p, sizeof(float) * on);
    if (st != DM_OK) return st;
    size_t obad = 0;
    if (!dm_all_finite(ob, on, &obad)) {
        vae_diag = 1; /* run this image again, checking every stage */
        st = dm_vae_decode_one(v, h, w, v->zbuf.p, v->obuf.p);
        vae_diag = 0;
        if (st == DM_OK)
            st = dm_fail(DM_ERR_NUMERIC, "%s: non-finite values first appear in the output of "
                         "image %d, element %zu", v->path, bi, obad);
    }
    return st;
}

/* Images decoded side by side (one per thread, each on one thread) when one image is too small
 * to keep the threads busy: the shipped Fashion-MNIST VAE's 8x8 .. 32x32 maps give every
 * kernel a few microseconds of work, so splitting each op over threads cost more in barriers
 * than it gained (on a loaded machine, 2 threads took 15x the CPU time of 1). Each image's bits
 * are the same either way (every kernel is thread invariant). Only for the CPU backend, small
 * weights (each copy holds its own) and a file unchanged since load. */
#ifndef DM_VAE_SPLIT_MACS
#define DM_VAE_SPLIT_MACS 1e9 /* multiply-adds of one image's convolutions */
#endif
#define DM_VAE_COPY_BYTES ((double)(64 << 20)) /* conv weight bytes per copy at most */

static int image_workers(const dm_vae *v, int B, int h, int w)
{
    int nt = 1;
#ifdef _OPENMP
    nt = omp_in_parallel() ? 1 : dm_get_threads();
#endif
    if (B < 2 || nt < 2 || v->opts.backend != DM_BACKEND_CPU) return 1;
    double macs = 0, bytes = 0;
    int H = h, W = w;
#define CONV(c, hh, ww)                                                                \
    do {                                                                               \
        if ((c).w) {                                                                   \
            macs += (double)(c).cin * (c).cout * (c).k * (c).k * (double)(hh) * (ww); \
            bytes += 4.0 * (c).cin * (c).cout * (c).k * (c).k;                         \
        }                                                                              \
    } while (0)
#define RES(r, hh, ww) \
    do { CONV((r).conv1, hh, ww); CONV((r).conv2, hh, ww); CONV((r).shortcut, hh, ww); } while (0)
    CONV(v->post_quant, H, W);
    CONV(v->conv_in, H, W);
    RES(v->mid[0], H, W);
    RES(v->mid[1], H, W);
    if (v->has_attn) macs += (double)v->top * h * w * (4.0 * v->top + 2.0 * h * w);
    for (int i = 0; i < v->levels; i++) {
        const dm_vae_level *lv = &v->level[i];
        for (int j = 0; j < lv->nres; j++) RES(lv->res[j], H, W);
        if (lv->has_up) {
            H *= 2, W *= 2;
            CONV(lv->up, H, W);
        }
    }
    CONV(v->conv_out, H, W);
#undef RES
#undef CONV
    if (macs > DM_VAE_SPLIT_MACS || bytes > DM_VAE_COPY_BYTES) return 1;
    return nt < B ? nt : B;
}

/* v->copies[0 .. n-1], loaded from v->path when it is still the file loaded. */
static dm_status ensure_copies(dm_vae *v, int n)
{
    if (v->n_copies >= n) return DM_OK;
    struct stat sb;
    if (stat(v->path, &sb) != 0 || (long long)sb.st_size != v->file_size ||
        (long long)sb.st_mtime != v->file_mtime)
        return dm_fail(DM_ERR_IO, "%s: changed since it was loaded", v->path);
    dm_vae **c = realloc(v->copies, sizeof *c * n);
    if (!c) return dm_fail(DM_ERR_NOMEM, "dm_vae_decode: out of memory");
    v->copies = c;
    while (v->n_copies < n) {
        dm_status st = dm_vae_load_opts(v->path, &v->opts, &v->copies[v->n_copies]);
        if (st != DM_OK) return st;
        v->n_copies++;
    }
    return DM_OK;
}

dm_status dm_vae_decode(dm_vae *v, int B, int h, int w, const float *z, float *img)
{
    if (!v || !z || !img || B < 1 || h < 1 || w < 1)
        return dm_fail(DM_ERR_ARG, "dm_vae_decode: bad arguments (B=%d, h=%d, w=%d)", B, h, w);
    const long long f = v->info.factor;
    if ((long long)h * w * f * f > (1LL << 31) / 4)
        return dm_fail(DM_ERR_ARG, "dm_vae_decode: latent %dx%d too large", h, w);
    const int zc = v->info.z_channels;
    const size_t zn = (size_t)zc * h * w;
    size_t zbad = 0;
    if (!dm_all_finite(z, (size_t)B * zn, &zbad))
        return dm_fail(DM_ERR_ARG, "latent z: element %zu (image %zu) is not finite", zbad, zbad / zn);
    int nw = image_workers(v, B, h, w);
    if (nw > 1 && ensure_copies(v, nw - 1) != DM_OK) {
        dm_log(DM_LOG_VERBOSE, "VAE: decoding images one after another (%s)", dm_last_error());
        nw = 1;
    }
    if (nw == 1) {
        dm_status st = ensure_ws(v, h, w);
        if (st != DM_OK) return st;
        float *zs = malloc(sizeof(float) * zn);
        if (!zs) return dm_fail(DM_ERR_NOMEM, "dm_vae_decode: out of memory");
        for (int bi = 0; bi < B && st == DM_OK; bi++) st = decode_image(v, bi, h, w, z, img, zs);
        free(zs);
        return st;
    }
    dm_log(DM_LOG_VERBOSE, "VAE: %d images side by side (one per thread)", nw);
    /* The failure of the lowest image index is reported, as the serial loop would. */
    int bad = B;
    dm_status bad_st = DM_OK;
    char bad_msg[1024] = "";
#pragma omp parallel num_threads(nw)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        omp_set_num_threads(1); /* this thread's kernels run on it alone */
#endif
        dm_vae *u = tid == 0 ? v : v->copies[tid - 1];
        float *zs = malloc(sizeof(float) * zn);
        dm_status st = zs ? ensure_ws(u, h, w) : dm_fail(DM_ERR_NOMEM, "dm_vae_decode: out of memory");
#pragma omp for schedule(dynamic, 1)
        for (int bi = 0; bi < B; bi++) {
            int stop;
#pragma omp atomic read
            stop = bad;
            if (stop < bi) continue;
            if (st == DM_OK) st = decode_image(u, bi, h, w, z, img, zs);
            if (st != DM_OK) {
#pragma omp critical(dm_vae_decode_err)
                if (bi < bad) {
                    bad = bi, bad_st = st;
                    snprintf(bad_msg, sizeof bad_msg, "%s", dm_last_error());
                }
                st = DM_OK; /* reported; this thread goes on only if an earlier image fails */
            }
        }
        free(zs);
    }
    return bad < B ? dm_fail(bad_st, "%s", bad_msg) : DM_OK;
}

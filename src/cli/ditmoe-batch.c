#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
/* ditmoe-batch: many class-conditional samples for FID, sharded over processes, resumable.
 *   ditmoe-batch [--model M] [--vae V] --num N [--classes random|balanced|LIST] [--seed S]
 *                [--steps N] [--sampler S] [--cfg-scale S] [--batch B] -o DIR
 *   ditmoe-batch pack DIR OUT.npz [--labels] [--num N]
 * Image i's class and noise depend only on (seed, i), so the files are the same whatever the batch
 * size, the number of processes (mpirun, Slurm, --shard I/N) or the order work finishes in.
 * Generation is the library's pipeline (dm_pipeline_*); this program keeps its own jobs: shards,
 * the manifest and resume. Exit codes (ditmoe.h dm_exit_code): 0 ok, 2 bad input (flags, files,
 * mismatched manifest), 1 runtime failure (memory, non-finite values, unwritable output). */
#include "common.h"
#include "flags.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef DITMOE_HAVE_MPI
#include <mpi.h>
#endif

#define PROG "ditmoe-batch"

typedef struct {
    const char *model, *vae, *out, *classes, *shard, *dump_routing;
    dm_cli_sampler_flags sf; /* sampler overrides, applied on the model's defaults */
    int64_t num;
    int batch;
    uint64_t seed;
    dm_cli_common common;
    dm_cli_overrides ov; /* what a .pt's weights cannot tell */
    dm_cli_lab_flags lab; /* MoE lab (issue 14) */
} args_t;

static args_t A;

static const dm_cli_opt OPTS[] = {
    DM_CLI_MODEL_OPTS(A.model, A.vae),
    DM_CLI_OVERRIDE_OPTS(A.ov),
    {'n', "num", DM_OPT_I64, &A.num, 1, 1e9, "N", "none (required)", "number of images", NULL},
    {'\0', "classes", DM_OPT_STR, &A.classes, 0, 0, "C", "random",
     "random (uniform, as DiT's FID runs) | balanced (index mod K) |\n"
     "a comma list of ids/names cycled over the indices", NULL},
    {'\0', "seed", DM_OPT_U64, &A.seed, 0, 0, "N", "0", "seed of the noise and the class draw",
     NULL},
    DM_CLI_SAMPLER_OPTS(A.sf),
    {'\0', "batch", DM_OPT_INT, &A.batch, 1, 4096, "B", "8",
     "images per transformer batch, 2B rows with guidance", NULL},
    {'o', "output", DM_OPT_STR, &A.out, 0, 0, "DIR", "none (required)",
     "output directory (created; reruns resume it)", NULL},
    {'\0', "dump-routing", DM_OPT_STR, &A.dump_routing, 0, 0, "F", "none",
     "every evaluation's expert choices to F (F.<rank>of<size> per MPI rank or\n"
     "shard; covers the images this run makes; read with ditmoe-routes)", NULL},
    {'\0', "shard", DM_OPT_STR, &A.shard, 0, 0, "I/N",
     "MPI rank/size under mpirun, else SLURM_PROCID/SLURM_NTASKS, else 0/1",
     "this process does the indices i with i mod N == I", NULL},
    DM_CLI_LAB_OPTS(A.lab),
    DM_CLI_PRECISION_OPTS(A.common),
    DM_CLI_COMMON_OPTS(A.common, "the CPUs this process may use, shared among the MPI ranks of "
                                 "a node"),
    DM_CLI_END};

static const dm_cli_prog PROGRAM = {
    PROG, "[options] --num N -o DIR      generate DIR/{index:06d}.png, index 0..N-1\n"
          "       " PROG " pack DIR OUT.npz [--labels]  pack them for the ADM evaluator",
    "Many class-conditional samples for FID, sharded over processes, resumable. Image i's class\n"
    "and noise depend only on (seed, i); every PNG carries the parameters that reproduce it.",
    OPTS, NULL, "'" PROG " pack --help' lists the pack options.\n"};

/* pack */
typedef struct {
    int labels;
    int64_t num;
    dm_cli_list pos;
    dm_cli_common common;
} pack_args_t;
static pack_args_t P;
static const dm_cli_opt PACK_OPTS[] = {
    {'\0', "labels", DM_OPT_SET, &P.labels, 1, 0, NULL, "off",
     "also store the class ids (tEXt \"class\") as arr_1, int64 [N]", NULL},
    {'n', "num", DM_OPT_I64, &P.num, 1, 1e9, "N", "the manifest's",
     "image count when DIR has no manifest.json", NULL},
    DM_CLI_LOG_OPTS(P.common),
    DM_CLI_HELP_OPTS,
    DM_CLI_END};
static const dm_cli_prog PACK = {
    PROG " pack", "DIR OUT.npz [--labels] [--num N]",
    "Pack DIR/000000.png .. into OUT.npz (arr_0 uint8 [N,H,W,3]) for the ADM evaluator\n"
    "(DITMOE_FORCE_ZIP64=1 writes ZIP64 records even for small files).",
    PACK_OPTS, &P.pos, NULL};

/* ------------------------------------------------------------------ who does what */

typedef struct {
    int rank, size;
    int mpi;          /* MPI initialised by us */
    char source[64];  /* where rank/size came from, for the log */
} shard_t;

static int env_int(const char *name, int *out)
{
    const char *s = getenv(name);
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*end || errno || v < 0 || v > 1000000) return 0;
    *out = (int)v;
    return 1;
}

#ifdef DITMOE_HAVE_MPI
/* Launched by an MPI launcher? (Only then MPI_Init: a singleton init may need a daemon.) */
static int under_mpi_launcher(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK") ||
           getenv("MPI_LOCALNRANKS");
}
#endif

static dm_status pick_shard(const args_t *a, int *argc, char ***argv, shard_t *sh)
{
    sh->rank = 0;
    sh->size = 1;
    snprintf(sh->source, sizeof sh->source, "single process");
#ifdef DITMOE_HAVE_MPI
    if (under_mpi_launcher()) {
        int ok = MPI_Init(argc, argv) == MPI_SUCCESS;
        if (!ok) return dm_fail(DM_ERR_BACKEND, "MPI_Init failed");
        sh->mpi = 1;
        MPI_Comm_rank(MPI_COMM_WORLD, &sh->rank);
        MPI_Comm_size(MPI_COMM_WORLD, &sh->size);
        snprintf(sh->source, sizeof sh->source, "MPI");
    }
#else
    (void)argc;
    (void)argv;
    /* Built without MPI but started by mpirun: take rank and size from the launcher's
     * environment (no barrier or gather then; each rank reports only its own count). */
    int r, n;
    if ((env_int("OMPI_COMM_WORLD_RANK", &r) && env_int("OMPI_COMM_WORLD_SIZE", &n)) ||
        (env_int("PMI_RANK", &r) && env_int("PMI_SIZE", &n))) {
        if (n >= 1 && r < n) {
            sh->rank = r;
            sh->size = n;
            snprintf(sh->source, sizeof sh->source, "MPI launcher environment (built without MPI)");
        }
    }
#endif
    if (a->shard) {
        int r = -1, n = -1;
        char tail;
        if (sscanf(a->shard, "%d/%d%c", &r, &n, &tail) != 2 || n < 1 || r < 0 || r >= n)
            return dm_fail(DM_ERR_ARG, "--shard '%s': expected I/N with 0 <= I < N", a->shard);
        if (sh->mpi && sh->size > 1)
            return dm_fail(DM_ERR_ARG, "--shard: not with %d MPI ranks (MPI already splits the "
                           "work)", sh->size);
        sh->rank = r;
        sh->size = n;
        snprintf(sh->source, sizeof sh->source, "--shard");
    } else if (!sh->mpi && sh->size == 1) {
        int r, n;
        if (env_int("SLURM_PROCID", &r) && env_int("SLURM_NTASKS", &n) && n >= 1 && r < n) {
            sh->rank = r;
            sh->size = n;
            snprintf(sh->source, sizeof sh->source, "SLURM_PROCID/SLURM_NTASKS");
        }
    }
    return DM_OK;
}

/* Default threads: the CPUs we may run on, divided among the ranks of this node when the
 * launcher did not bind us (bound ranks already see only their own CPUs). */
static int default_threads(void)
{
    cpu_set_t set;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int n = (int)(online > 0 ? online : 1);
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) n = CPU_COUNT(&set);
    int local = 1;
    if ((env_int("OMPI_COMM_WORLD_LOCAL_SIZE", &local) || env_int("MPI_LOCALNRANKS", &local)) &&
        local > 1 && n == online)
        n = n / local;
    return n > 0 ? n : 1;
}

/* ------------------------------------------------------------------ helpers */

/* mkdir -p (tolerates a concurrent rank creating the same directory). */
static dm_status make_dir(const char *dir)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return dm_fail(DM_ERR_ARG, "-o %s: path too long", dir);
    struct stat s;
    if (stat(dir, &s) == 0 && !S_ISDIR(s.st_mode))
        return dm_fail(DM_ERR_ARG, "-o %s: not a directory", dir);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return dm_fail(DM_ERR_WRITE, "-o %s: cannot create directory %s: %s", dir, buf,
                               strerror(errno));
            *p = c;
            if (!c) break;
        }
    }
    if (stat(dir, &s) != 0 || !S_ISDIR(s.st_mode))
        return dm_fail(DM_ERR_ARG, "-o %s: not a directory", dir);
    if (access(dir, W_OK) != 0) return dm_fail(DM_ERR_WRITE, "-o %s: not writable", dir);
    return DM_OK;
}

static void on_pack(void *ctx, int i, int n)
{
    dm_cli_progress *p = ctx;
    p->total = n;
    dm_cli_progress_set(p, i);
}

/* ------------------------------------------------------------------ pack */

static dm_status pack_main(int argc, char **argv, int *done)
{
    P.num = -1;
    dm_cli_common_init(&P.common);
    dm_status st = dm_cli_parse_from(&PACK, 2, argc, argv, done);
    if (st || *done) return st;
    dm_cli_common_apply(&P.common, 0);
    if (P.pos.n != 2)
        return dm_fail(DM_ERR_ARG, "pack: usage: " PROG " pack DIR OUT.npz [--labels]%s",
                       P.pos.n > 2 ? " (too many arguments)" : "");
    const char *dir = P.pos.v[0], *out = P.pos.v[1];
    int64_t num = P.num;
    if (num < 0) {
        dm_batch_params bp;
        if ((st = dm_batch_manifest_read(dir, &bp))) return st;
        num = bp.num;
    }
    const char *fz = getenv("DITMOE_FORCE_ZIP64");
    const int force = fz && *fz && strcmp(fz, "0");
    dm_cli_progress prog;
    dm_cli_progress_start(&prog, (double)num, "images", dm_get_log_level() > DM_LOG_QUIET);
    st = dm_batch_pack(dir, num, out, P.labels, force, on_pack, &prog);
    dm_cli_progress_end(&prog);
    if (st) return st;
    dm_log(DM_LOG_INFO, "wrote %s: arr_0 uint8 [%lld,H,W,3]%s%s in %.1f s", out, (long long)num,
           P.labels ? ", arr_1 int64 labels" : "", force ? " (ZIP64 forced)" : "",
           dm_time_sec() - prog.t0);
    return DM_OK;
}

/* ------------------------------------------------------------------ generate */

typedef struct {
    shard_t sh;
    char model_path[PATH_MAX], vae_path[PATH_MAX];
    dm_pipeline *pl;
    dm_sample_params p;
    dm_batch_classes cls;
    dm_batch_params bp;
    uint8_t *done, *pix;
    uint64_t *todo, *ib;
    int64_t *yb;
    int64_t ntodo;
    dm_trace *trace;
    dm_cli_progress prog;
    long long made, skipped;
} run_t;

static dm_status find_assets(run_t *r)
{
    dm_status st = dm_cli_find_asset(A.model, DM_DEFAULT_MODEL, "model", "model", r->model_path,
                                     sizeof r->model_path);
    if (st) return st;
    return dm_cli_find_asset(A.vae, DM_DEFAULT_VAE, "vae", "VAE", r->vae_path,
                             sizeof r->vae_path);
}

/* The run's identity: hashes of both files and every parameter an image depends on. */
static dm_status identity(run_t *r)
{
    const dm_config *c = dm_pipeline_config(r->pl);
    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    dm_batch_params *bp = &r->bp;
    memset(bp, 0, sizeof *bp);
    snprintf(bp->model_file, sizeof bp->model_file, "%.255s", dm_cli_base_name(r->model_path));
    snprintf(bp->vae_file, sizeof bp->vae_file, "%.255s", dm_cli_base_name(r->vae_path));
    double th = dm_time_sec();
    dm_status st;
    if ((st = dm_sha256_file(r->model_path, bp->model_sha256))) return st;
    if ((st = dm_sha256_file(r->vae_path, bp->vae_sha256))) return st;
    dm_log(DM_LOG_VERBOSE, "SHA-256 of model and VAE in %.2f s", dm_time_sec() - th);
    /* What the weights did not tell (the .pt config overrides) and engine options that change
     * pixels: a resumed run must use the same. */
    snprintf(bp->engine, sizeof bp->engine,
             "arch=%s;heads=%d;top_k=%d;num_classes=%d;objective=%s;promoe_ec=%d;router=%d;"
             "vae_scale=%.9g;time_scale=%.9g",
             dm_arch_name(c->arch), c->heads, c->top_k, c->num_classes,
             dm_objective_name(c->objective), c->promoe_ec, (int)c->router_act,
             (double)c->vae_scale, (double)c->time_scale);
    dm_precision prec;
    int qbits;
    if ((st = dm_cli_precision(&A.common, &prec, &qbits))) return st;
    size_t len = strlen(bp->engine);
    snprintf(bp->engine + len, sizeof bp->engine - len, ";precision=%s;quant_experts=%d",
             dm_precision_name(prec), qbits);
    /* MoE lab options that change pixels (only when not the trained default, so manifests of
     * earlier runs still match) */
    dm_model *m = dm_pipeline_model(r->pl);
    char sc[96];
    dm_self_contrast_string(&r->p, sc, sizeof sc);
    const char *lab[][2] = {{"route", dm_model_lab_string(m, "route")},
                            {"skip_routed", dm_model_lab_string(m, "skip_routed")},
                            {"expert_cache", dm_model_lab_string(m, "expert_cache")},
                            {"self_contrast", sc}};
    for (int i = 0; i < 4; i++) {
        if (!*lab[i][1] || (i == 0 && !strcmp(lab[i][1], "top-k"))) continue;
        len = strlen(bp->engine);
        const int w = snprintf(bp->engine + len, sizeof bp->engine - len, ";%s=%s", lab[i][0],
                               lab[i][1]);
        if (w < 0 || (size_t)w >= sizeof bp->engine - len)
            return dm_fail(DM_ERR_ARG, "--%s: options too long for the manifest", lab[i][0]);
    }
    bp->seed = r->p.seed;
    snprintf(bp->sampler, sizeof bp->sampler, "%s", dm_sampler_name(r->p.sampler));
    bp->steps = r->p.steps;
    bp->cfg_scale = r->p.cfg_scale;
    bp->cfg_channels = r->p.cfg_channels;
    bp->cfg_t_lo = r->p.cfg_t_lo;
    bp->cfg_t_hi = r->p.cfg_t_hi;
    bp->eta = r->p.eta;
    dm_batch_classes_str(&r->cls, bp->classes, sizeof bp->classes);
    bp->num_classes = c->num_classes;
    bp->num = A.num;
    bp->width = in->width;
    bp->height = in->height;
    bp->channels = in->channels;
    return DM_OK;
}

/* Open, check the manifest, find what is left to do (finished indices are the files present:
 * they appear only by rename). */
static dm_status setup(run_t *r)
{
    dm_status st;
    const shard_t *sh = &r->sh;
    if ((st = find_assets(r))) return st;
    dm_pipeline_opts po;
    dm_pipeline_opts_init(&po);
    po.model_path = r->model_path;
    po.vae_path = r->vae_path;
    po.backend = A.common.backend;
    po.device = A.common.device;
    if ((st = dm_cli_overrides_get(&A.ov, &po.cfg))) return st;
    if ((st = dm_cli_precision(&A.common, &po.precision, &po.quant_experts))) return st;
    if ((st = dm_cli_lab_opts(&A.lab, &po.lab))) return st;
    if ((st = dm_pipeline_open(&po, &r->pl))) return st;
    const dm_config *c = dm_pipeline_config(r->pl);
    if ((st = dm_cli_sampler_params(&A.sf, c, A.seed, &r->p))) return st;
    if ((st = dm_cli_lab_sample(&A.lab, &r->p))) return st;
    dm_cli_lab_log(r->pl, &r->p);
    if ((st = dm_batch_classes_parse(A.classes, c, &r->cls))) return st;
    if ((st = make_dir(A.out))) return st;
    if ((st = identity(r))) return st;
    int found = 0;
    if ((st = dm_batch_manifest_check(A.out, &r->bp, &found))) return st;
    r->done = malloc((size_t)A.num);
    if (!r->done) return dm_fail(DM_ERR_NOMEM, "out of memory for %lld flags", (long long)A.num);
    int64_t ndone_all = 0;
    if ((st = dm_batch_scan_complete(A.out, A.num, r->bp.width, r->bp.height, r->bp.channels,
                                     r->done, &ndone_all, sh->rank, sh->size)))
        return st;
    if (sh->rank == 0 && (st = dm_batch_manifest_write(A.out, &r->bp, ndone_all))) return st;
    int64_t nown = 0;
    for (int64_t i = sh->rank; i < A.num; i += sh->size) nown++;
    r->todo = malloc((size_t)(nown ? nown : 1) * sizeof *r->todo);
    if (!r->todo) return dm_fail(DM_ERR_NOMEM, "out of memory");
    for (int64_t i = sh->rank; i < A.num; i += sh->size)
        if (!r->done[i]) r->todo[r->ntodo++] = (uint64_t)i;
    r->skipped = nown - r->ntodo;

    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    char cfgch[16];
    snprintf(cfgch, sizeof cfgch, r->p.cfg_channels ? "%d" : "all", r->p.cfg_channels);
    dm_log(DM_LOG_INFO, "%s: %s, %lld images of %dx%d into %s (%s), classes %s, sampler %s, "
           "%d steps, cfg %g on %s channels, seed %llu, batch %d, %d threads, backend %s",
           dm_cli_base_name(r->model_path), c->name[0] ? c->name : dm_objective_name(c->objective),
           (long long)A.num, in->width, in->height, A.out, found ? "resuming" : "new",
           r->bp.classes, dm_sampler_name(r->p.sampler), r->p.steps, (double)r->p.cfg_scale,
           cfgch, (unsigned long long)r->p.seed, A.batch, dm_get_threads(),
           dm_backend_name(A.common.backend));
    dm_log(DM_LOG_INFO, "shard %d of %d (%s): %lld indices, %lld already done, %lld to make",
           sh->rank, sh->size, sh->source, (long long)nown, r->skipped, (long long)r->ntodo);

    const int B = A.batch;
    r->pix = malloc((size_t)B * in->channels * in->height * in->width);
    r->yb = malloc((size_t)B * sizeof(int64_t));
    r->ib = malloc((size_t)B * sizeof(uint64_t));
    if (!r->pix || !r->yb || !r->ib)
        return dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d", B);
    if (A.dump_routing) { /* every evaluation's expert choices; one file per process */
        char path[PATH_MAX + 32];
        if (sh->size > 1)
            snprintf(path, sizeof path, "%s.%dof%d", A.dump_routing, sh->rank, sh->size);
        else
            snprintf(path, sizeof path, "%s", A.dump_routing);
        dm_trace_shape tshape;
        dm_trace_shape_from_model(&tshape, c, &r->p);
        tshape.top_k = dm_model_route_slots(dm_pipeline_model(r->pl)); /* the policy's most picks */
        if ((st = dm_trace_open(path, &tshape, c, r->model_path, &r->p, &r->trace))) return st;
        char pattern[PATH_MAX + 16];
        snprintf(pattern, sizeof pattern, "%s/%%06d.png", A.out); /* the overlay finds images */
        if ((st = dm_trace_note(r->trace, "images", pattern))) return st;
    }
    return DM_OK;
}

/* Batches of the indices still to make, each image written as it is finished. */
static dm_status run_batches(run_t *r)
{
    const dm_pipeline_info *in = dm_pipeline_get_info(r->pl);
    const int B = A.batch;
    const size_t per_img = (size_t)in->channels * in->height * in->width;
    dm_status st;
    dm_cli_progress_start(&r->prog, (double)r->ntodo, "images",
                          r->sh.rank == 0 && dm_get_log_level() > DM_LOG_QUIET);
    double png_sec = 0, last_manifest = dm_time_sec();
    for (int64_t t0 = 0; t0 < r->ntodo; t0 += B) {
        const int nb = (int)(r->ntodo - t0 < B ? r->ntodo - t0 : B);
        for (int b = 0; b < nb; b++) {
            r->ib[b] = r->todo[t0 + b];
            r->yb[b] = dm_batch_class_of(&r->cls, r->p.seed, r->ib[b]);
        }
        dm_cli_step_ctx sc = {&r->prog, (double)r->made, (double)nb / r->p.steps};
        dm_pipeline_hooks h = {dm_cli_on_step, &sc, r->trace, NULL, NULL};
        if ((st = dm_pipeline_generate(r->pl, &r->p, nb, r->yb, r->ib, &h, r->pix))) return st;
        double tp = dm_time_sec();
        for (int b = 0; b < nb; b++) {
            char path[PATH_MAX + 32];
            dm_batch_png_path(A.out, r->ib[b], path, sizeof path);
            dm_gen_text t;
            dm_gen_text_init(&t, r->pl, &r->p, PROG " " DITMOE_VERSION, r->yb[b], r->ib[b]);
            if ((st = dm_png_write(path, in->width, in->height, in->channels,
                                   r->pix + (size_t)b * per_img, t.kv)))
                return st;
        }
        const double te = dm_time_sec();
        png_sec += te - tp;
        r->made += nb;
        dm_cli_progress_set(&r->prog, (double)r->made);
        /* Progress of the whole job (all shards: the files present) every 30 s. */
        if (r->sh.rank == 0 && te - last_manifest > 30) {
            int64_t n = 0;
            if (dm_batch_scan(A.out, A.num, NULL, &n, -1, 1) == DM_OK)
                dm_batch_manifest_write(A.out, &r->bp, n);
            last_manifest = te;
        }
    }
    dm_cli_progress_end(&r->prog);
    const dm_pipeline_stats *ps = dm_pipeline_get_stats(r->pl);
    if (r->made > 0)
        dm_log(DM_LOG_VERBOSE, "this process: %.3f img/s (transformer+sampler %.3f s/img, VAE "
               "%.3f s/img, PNG %.4f s/img)", (double)r->made / (ps->sample_sec + ps->decode_sec +
               png_sec), ps->sample_sec / r->made, ps->decode_sec / r->made, png_sec / r->made);
    dm_cli_lab_stats(r->pl);
    return DM_OK;
}

/* All the communication: a barrier and a gather of counts; then the final manifest. */
static dm_status finish(run_t *r, double t_start)
{
    const shard_t *sh = &r->sh;
    long long counts[2] = {r->made, r->skipped}, total_made = r->made, total_skipped = r->skipped;
#ifdef DITMOE_HAVE_MPI
    if (sh->mpi) {
        long long *all = sh->rank == 0 ? malloc((size_t)sh->size * 2 * sizeof *all) : NULL;
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Gather(counts, 2, MPI_LONG_LONG, all, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
        if (all) {
            total_made = total_skipped = 0;
            for (int q = 0; q < sh->size; q++) {
                total_made += all[2 * q];
                total_skipped += all[2 * q + 1];
            }
            free(all);
        }
    }
#else
    (void)counts;
#endif
    dm_status st;
    if (r->trace) {
        st = dm_trace_close(r->trace);
        r->trace = NULL;
        if (st) return st;
    }
    if (sh->rank != 0) return DM_OK;
    int64_t n = 0;
    if ((st = dm_batch_scan(A.out, A.num, NULL, &n, -1, 1))) return st;
    if ((st = dm_batch_manifest_write(A.out, &r->bp, n))) return st;
    const double wall = dm_time_sec() - t_start;
    const int all_known = sh->mpi || sh->size == 1;
    dm_log(DM_LOG_INFO, "%s %lld images (%lld were already there) in %.1f s%s; %s holds "
           "%lld of %lld", all_known ? "made" : "this shard made", all_known ? total_made : r->made,
           all_known ? total_skipped : r->skipped, wall, sh->size > 1 && !sh->mpi ?
           " (other shards run separately)" : "", A.out, (long long)n, (long long)A.num);
    return DM_OK;
}

int main(int argc, char **argv)
{
    int done = 0;
    dm_status st;
    if (argc >= 2 && !strcmp(argv[1], "pack")) {
        st = pack_main(argc, argv, &done);
        return dm_cli_exit(PROG, st);
    }
    A.batch = 8;
    A.num = -1;
    dm_cli_common_init(&A.common);
    dm_cli_overrides_init(&A.ov);
    st = dm_cli_parse(&PROGRAM, argc, argv, &done);
    if (st || done) return dm_cli_exit(PROG, st);
    if (A.num < 0) st = dm_fail(DM_ERR_ARG, "--num N is required (the number of images)");
    else if (!A.out) st = dm_fail(DM_ERR_ARG, "-o DIR is required (the output directory)");
    if (st) return dm_cli_exit(PROG, st);
    static run_t r;
    if ((st = pick_shard(&A, &argc, &argv, &r.sh))) return dm_cli_exit(PROG, st);
    const double t_start = dm_time_sec();
    dm_cli_common_apply(&A.common, default_threads());
    if (r.sh.rank != 0) /* other ranks: quiet unless -v */
        dm_set_log_level(dm_get_log_level() > DM_LOG_INFO ? DM_LOG_VERBOSE : DM_LOG_QUIET);

    st = setup(&r);
    if (!st) st = run_batches(&r);
    if (!st) st = finish(&r, t_start);
    dm_trace_abort(r.trace);
    dm_cli_progress_end(&r.prog);
    free(r.done);
    free(r.todo);
    free(r.pix);
    free(r.yb);
    free(r.ib);
    dm_batch_classes_free(&r.cls);
    dm_pipeline_free(r.pl);
    const int rc = dm_cli_exit(PROG, st);
#ifdef DITMOE_HAVE_MPI
    if (r.sh.mpi) {
        if (rc && r.sh.size > 1) MPI_Abort(MPI_COMM_WORLD, rc); /* never leave ranks in a barrier */
        MPI_Finalize();
    }
#endif
    return rc;
}

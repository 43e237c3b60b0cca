#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
/* ditmoe-batch: many class-conditional samples for FID, sharded over processes, resumable.
 *   ditmoe-batch [--model M] [--vae V] --num N [--classes random|balanced|LIST] [--seed S]
 *                [--steps N] [--sampler S] [--cfg-scale S] [--batch B] -o DIR
 *   ditmoe-batch pack DIR OUT.npz [--labels] [--num N]
 * Image i's class and noise depend only on (seed, i), so the files are the same whatever the batch
 * size, the number of processes (mpirun, Slurm, --shard I/N) or the order work finishes in.
 * Exit codes: 0 ok, 2 bad input (flags, files, mismatched manifest), 1 runtime failure. */
#include "batch/batch.h"
#include "cli/common.h"

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

static void usage(FILE *f)
{
    fprintf(f,
"usage: " PROG " [options] --num N -o DIR      generate DIR/{index:06d}.png, index 0..N-1\n"
"       " PROG " pack DIR OUT.npz [--labels]  pack them for the ADM evaluator\n"
"  --model FILE        DiT-MoE .safetensors (default: " DM_DEFAULT_MODEL " from the assets dir)\n"
"  --vae FILE          VAE decoder .safetensors (default: " DM_DEFAULT_VAE ")\n"
"  --num N             number of images (required)\n"
"  --classes C         random (uniform, as DiT's FID runs) | balanced (index mod K) |\n"
"                      a comma list of ids/names cycled over the indices (default: random)\n"
"  --seed N            seed of the noise and the class draw (default: 0)\n"
"  --steps N, --sampler S, --cfg-scale S, --cfg-channels K|all, --cfg-interval L,H, --eta E\n"
"                      as in ditmoe-sample (defaults: the model's metadata)\n"
"  --batch B           images per transformer batch, 2B rows with guidance (default: 8)\n"
"  -o DIR              output directory (required; created; reruns resume it)\n"
"  --dump-routing F    every evaluation's expert choices to F (F.<rank>of<size> per MPI rank or\n"
"                      shard; covers the images this run makes; read with ditmoe-routes)\n"
"  --shard I/N         this process does the indices i with i mod N == I (default: MPI rank\n"
"                      and size under mpirun, else SLURM_PROCID/SLURM_NTASKS, else 0/1)\n"
"  --threads N         threads (default: the CPUs this process may use, shared among the\n"
"                      MPI ranks of a node)\n"
"  -q, -v              quiet (no progress line, no info) / verbose\n"
"  --help, --version\n"
"pack options:\n"
"  --labels            also store the class ids (tEXt \"class\") as arr_1, int64 [N]\n"
"  --num N             image count when DIR has no manifest.json (default: the manifest's)\n"
"  (DITMOE_FORCE_ZIP64=1 writes ZIP64 records even for small files)\n");
}

typedef struct {
    const char *model, *vae, *out, *classes, *shard, *dump_routing;
    dm_cli_sampler_flags sf; /* sampler overrides, applied on the model's defaults */
    int64_t num;
    int batch, threads, have_threads, quiet;
    uint64_t seed;
} args_t;

static dm_status parse(int argc, char **argv, args_t *a)
{
    a->batch = 8;
    a->num = -1;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char **str = !strcmp(s, "--model")          ? &a->model
                           : !strcmp(s, "--vae")          ? &a->vae
                           : !strcmp(s, "-o")             ? &a->out
                           : !strcmp(s, "--output")       ? &a->out
                           : !strcmp(s, "--classes")      ? &a->classes
                           : !strcmp(s, "--shard")        ? &a->shard
                           : !strcmp(s, "--dump-routing") ? &a->dump_routing
                                                          : dm_cli_sampler_flag(&a->sf, s);
        int takes = str || !strcmp(s, "--num") || !strcmp(s, "-n") || !strcmp(s, "--batch") ||
                    !strcmp(s, "--threads") || !strcmp(s, "--seed");
        if (!strcmp(s, "-q")) {
            a->quiet = 1;
            dm_set_log_level(DM_LOG_QUIET);
            continue;
        }
        if (!strcmp(s, "-v")) {
            dm_set_log_level(DM_LOG_VERBOSE);
            continue;
        }
        if (!takes) return dm_fail(DM_ERR_ARG, "unknown flag '%s' (see --help)", s);
        if (i + 1 >= argc) return dm_fail(DM_ERR_ARG, "%s needs a value (see --help)", s);
        const char *v = argv[++i];
        dm_status st = DM_OK;
        if (str)
            *str = v;
        else if (!strcmp(s, "--num") || !strcmp(s, "-n"))
            st = dm_cli_i64("--num", v, 1, 1000000000LL, &a->num);
        else if (!strcmp(s, "--batch"))
            st = dm_cli_int("--batch", v, 1, 4096, &a->batch);
        else if (!strcmp(s, "--threads")) {
            st = dm_cli_int("--threads", v, 0, 4096, &a->threads);
            a->have_threads = 1;
        } else if (!strcmp(s, "--seed"))
            st = dm_cli_u64("--seed", v, &a->seed);
        if (st) return st;
    }
    if (a->num < 0) return dm_fail(DM_ERR_ARG, "--num N is required (the number of images)");
    if (!a->out) return dm_fail(DM_ERR_ARG, "-o DIR is required (the output directory)");
    return DM_OK;
}

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
        if (!ok) return dm_fail(DM_ERR_IO, "MPI_Init failed");
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

/* ------------------------------------------------------------------ progress */

typedef struct {
    int enabled, width;
    int tty;             /* redraw one line; else a plain line every 30 s (logs, mpirun) */
    int64_t total, done; /* images this process must make / has made */
    int nb;              /* images in the running batch */
    double t0, last;
} prog_t;

static void fmt_time(double s, char *buf, size_t n)
{
    if (!(s >= 0) || s > 1e8) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void prog_draw(prog_t *p, double frac_of_batch, int force)
{
    if (!p->enabled) return;
    double now = dm_time_sec();
    if (!force && now - p->last < (p->tty ? 0.25 : 30.0)) return;
    p->last = now;
    double el = now - p->t0, made = (double)p->done + frac_of_batch * p->nb;
    char rate[32] = "-- img/s", eta[32] = "--:--", line[160];
    if (made > 0 && el > 0) {
        double ips = made / el;
        snprintf(rate, sizeof rate, ips >= 1 ? "%.2f img/s" : "%.3f img/s", ips);
        fmt_time(((double)p->total - made) / ips, eta, sizeof eta);
    }
    int w = snprintf(line, sizeof line, "%s%lld/%lld images  %s  ETA %s", p->tty ? "\r" : "",
                     (long long)p->done, (long long)p->total, rate, eta);
    if (w < 0) return;
    if (!p->tty) {
        fprintf(stderr, "%s\n", line);
        return;
    }
    if (w > (int)sizeof line - 1) w = (int)sizeof line - 1;
    fputs(line, stderr);
    for (int i = w; i < p->width; i++) fputc(' ', stderr);
    p->width = w;
    fflush(stderr);
}

static void prog_end(prog_t *p)
{
    if (!p->enabled || !p->tty || !p->width) return;
    prog_draw(p, 0, 1);
    fputc('\n', stderr);
    p->width = 0;
}

static void on_step(void *ctx, int step, int nsteps)
{
    prog_draw(ctx, (double)step / nsteps, 0);
}

static void on_pack(void *ctx, int i, int n)
{
    prog_t *p = ctx;
    p->done = i;
    p->total = n;
    prog_draw(p, 0, i == n);
}

/* ------------------------------------------------------------------ helpers */

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* mkdir -p (tolerates a concurrent rank creating the same directory). */
static dm_status make_dir(const char *dir)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return dm_fail(DM_ERR_ARG, "-o %s: path too long", dir);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return dm_fail(DM_ERR_ARG, "-o %s: cannot create directory %s: %s", dir, buf,
                               strerror(errno));
            *p = c;
            if (!c) break;
        }
    }
    struct stat s;
    if (stat(dir, &s) != 0 || !S_ISDIR(s.st_mode))
        return dm_fail(DM_ERR_ARG, "-o %s: not a directory", dir);
    if (access(dir, W_OK) != 0) return dm_fail(DM_ERR_ARG, "-o %s: not writable", dir);
    return DM_OK;
}

static int fail_code(dm_status st)
{
    fprintf(stderr, PROG ": %s\n", dm_last_error());
    return st == DM_ERR_NOMEM ? 1 : 2;
}

/* ------------------------------------------------------------------ pack */

static int pack_main(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL;
    int labels = 0, quiet = 0;
    int64_t num = -1;
    dm_status st;
    for (int i = 2; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--labels"))
            labels = 1;
        else if (!strcmp(s, "-q")) {
            quiet = 1;
            dm_set_log_level(DM_LOG_QUIET);
        } else if (!strcmp(s, "-v"))
            dm_set_log_level(DM_LOG_VERBOSE);
        else if (!strcmp(s, "--num") || !strcmp(s, "-n")) {
            if (i + 1 >= argc) return fail_code(dm_fail(DM_ERR_ARG, "%s needs a value", s));
            if ((st = dm_cli_i64("--num", argv[++i], 1, 1000000000LL, &num))) return fail_code(st);
        } else if (s[0] == '-' && s[1])
            return fail_code(dm_fail(DM_ERR_ARG, "pack: unknown flag '%s' (see --help)", s));
        else if (!dir)
            dir = s;
        else if (!out)
            out = s;
        else
            return fail_code(dm_fail(DM_ERR_ARG, "pack: unexpected argument '%s' (usage: pack DIR "
                                     "OUT.npz [--labels])", s));
    }
    if (!dir || !out)
        return fail_code(dm_fail(DM_ERR_ARG, "pack: usage: " PROG " pack DIR OUT.npz [--labels]"));
    if (num < 0) {
        dm_batch_params p;
        if ((st = dm_batch_manifest_read(dir, &p))) return fail_code(st);
        num = p.num;
    }
    const char *fz = getenv("DITMOE_FORCE_ZIP64");
    const int force = fz && *fz && strcmp(fz, "0");
    prog_t prog = {0};
    prog.enabled = !quiet && dm_get_log_level() > 0;
    prog.tty = isatty(2);
    prog.t0 = dm_time_sec();
    st = dm_batch_pack(dir, num, out, labels, force, on_pack, &prog);
    prog_end(&prog);
    if (st) return fail_code(st);
    dm_log(DM_LOG_INFO, "wrote %s: arr_0 uint8 [%lld,H,W,3]%s%s in %.1f s", out, (long long)num,
           labels ? ", arr_1 int64 labels" : "", force ? " (ZIP64 forced)" : "",
           dm_time_sec() - prog.t0);
    return 0;
}

/* ------------------------------------------------------------------ generate */

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "pack")) {
        for (int i = 2; i < argc; i++)
            if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
                usage(stdout);
                return 0;
            }
        return pack_main(argc, argv);
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf(PROG " %s\n", DITMOE_VERSION);
            return 0;
        }
    }
    args_t a = {0};
    dm_status st = parse(argc, argv, &a);
    if (st) return fail_code(st);
    shard_t sh = {0};
    if ((st = pick_shard(&a, &argc, &argv, &sh))) return fail_code(st);

    int rc = 0, phase_setup = 1;
    dm_model *m = NULL;
    dm_vae *vae = NULL;
    dm_batch_classes cls = {0};
    uint8_t *done = NULL, *u8 = NULL;
    uint64_t *todo = NULL, *ib = NULL;
    int64_t *yb = NULL;
    float *z = NULL, *img = NULL;
    dm_trace *trace = NULL;
    prog_t prog = {0};
    long long made = 0, skipped = 0;
    const double t_start = dm_time_sec();
    if (sh.rank != 0) dm_set_log_level(a.quiet ? DM_LOG_QUIET : dm_get_log_level() > DM_LOG_INFO
                                                                     ? DM_LOG_VERBOSE
                                                                     : DM_LOG_QUIET);
    dm_set_threads(a.have_threads ? a.threads : default_threads());

#define CHECK(expr)                                                                            \
    do {                                                                                       \
        if ((st = (expr)) != DM_OK) {                                                          \
            rc = phase_setup ? fail_code(st)                                                   \
                             : (fprintf(stderr, PROG ": %s\n", dm_last_error()),               \
                                st == DM_ERR_IO || st == DM_ERR_NOMEM ? 1 : 2);                \
            goto done;                                                                         \
        }                                                                                      \
    } while (0)

    char model_path[PATH_MAX], vae_path[PATH_MAX], places[3 * PATH_MAX];
    if (a.model) {
        snprintf(model_path, sizeof model_path, "%s", a.model);
    } else if (!dm_default_asset(DM_DEFAULT_MODEL, model_path, sizeof model_path)) {
        dm_default_asset_places(DM_DEFAULT_MODEL, places, sizeof places);
        CHECK(dm_fail(DM_ERR_ARG, "no --model given and the default model was not found "
                      "(looked at: %s)", places));
    }
    if (a.vae) {
        snprintf(vae_path, sizeof vae_path, "%s", a.vae);
    } else if (!dm_default_asset(DM_DEFAULT_VAE, vae_path, sizeof vae_path)) {
        dm_default_asset_places(DM_DEFAULT_VAE, places, sizeof places);
        CHECK(dm_fail(DM_ERR_ARG, "no --vae given and the default VAE was not found (looked "
                      "at: %s)", places));
    }

    CHECK(dm_model_load(model_path, &m));
    const dm_config *c = dm_model_config(m);
    dm_sample_params p;
    CHECK(dm_cli_sampler_params(&a.sf, c, a.seed, &p));
    CHECK(dm_batch_classes_parse(a.classes, c, &cls));
    CHECK(dm_vae_load(vae_path, &vae));
    const dm_vae_info *vi = dm_vae_get_info(vae);
    const int C = c->in_channels, S = c->input_size;
    if (vi->z_channels != C)
        CHECK(dm_fail(DM_ERR_ARG, "latent channels differ: model %s has %d, VAE %s has %d",
                      model_path, C, vae_path, vi->z_channels));
    if (vi->out_channels != 1 && vi->out_channels != 3)
        CHECK(dm_fail(DM_ERR_ARG, "%s: the VAE has %d output channels (PNG needs 1 or 3)",
                      vae_path, vi->out_channels));
    const int oc = vi->out_channels, H = S * vi->factor, W = S * vi->factor;
    CHECK(make_dir(a.out));

    /* The run's identity: hashes of both files and every parameter an image depends on. */
    dm_batch_params bp;
    memset(&bp, 0, sizeof bp);
    snprintf(bp.model_file, sizeof bp.model_file, "%.255s", base_name(model_path));
    snprintf(bp.vae_file, sizeof bp.vae_file, "%.255s", base_name(vae_path));
    double th = dm_time_sec();
    CHECK(dm_sha256_file(model_path, bp.model_sha256));
    CHECK(dm_sha256_file(vae_path, bp.vae_sha256));
    dm_log(DM_LOG_VERBOSE, "SHA-256 of model and VAE in %.2f s", dm_time_sec() - th);
    bp.seed = p.seed;
    snprintf(bp.sampler, sizeof bp.sampler, "%s", dm_sampler_name(p.sampler));
    bp.steps = p.steps;
    bp.cfg_scale = p.cfg_scale;
    bp.cfg_channels = p.cfg_channels;
    bp.cfg_t_lo = p.cfg_t_lo;
    bp.cfg_t_hi = p.cfg_t_hi;
    bp.eta = p.eta;
    dm_batch_classes_str(&cls, bp.classes, sizeof bp.classes);
    bp.num_classes = c->num_classes;
    bp.num = a.num;
    bp.width = W;
    bp.height = H;
    bp.channels = oc;
    int found = 0;
    CHECK(dm_batch_manifest_check(a.out, &bp, &found));

    /* Resume: finished indices are the files present (they appear only by rename). */
    done = malloc((size_t)a.num);
    if (!done) CHECK(dm_fail(DM_ERR_NOMEM, "out of memory for %lld flags", (long long)a.num));
    int64_t ndone_all = 0;
    CHECK(dm_batch_scan_complete(a.out, a.num, W, H, oc, done, &ndone_all, sh.rank, sh.size));
    if (sh.rank == 0) CHECK(dm_batch_manifest_write(a.out, &bp, ndone_all));
    int64_t ntodo = 0, nown = 0;
    for (int64_t i = sh.rank; i < a.num; i += sh.size) nown++;
    todo = malloc((size_t)(nown ? nown : 1) * sizeof *todo);
    if (!todo) CHECK(dm_fail(DM_ERR_NOMEM, "out of memory"));
    for (int64_t i = sh.rank; i < a.num; i += sh.size)
        if (!done[i]) todo[ntodo++] = (uint64_t)i;
    skipped = nown - ntodo;

    char cfgch[16];
    snprintf(cfgch, sizeof cfgch, p.cfg_channels ? "%d" : "all", p.cfg_channels);
    dm_log(DM_LOG_INFO, "%s: %s, %lld images of %dx%d into %s (%s), classes %s, sampler %s, "
           "%d steps, cfg %g on %s channels, seed %llu, batch %d, %d threads",
           base_name(model_path), c->name[0] ? c->name : dm_objective_name(c->objective),
           (long long)a.num, W, H, a.out, found ? "resuming" : "new", bp.classes,
           dm_sampler_name(p.sampler), p.steps, (double)p.cfg_scale, cfgch,
           (unsigned long long)p.seed, a.batch, dm_get_threads());
    dm_log(DM_LOG_INFO, "shard %d of %d (%s): %lld indices, %lld already done, %lld to make",
           sh.rank, sh.size, sh.source, (long long)nown, skipped, (long long)ntodo);
    phase_setup = 0;

    const int B = a.batch;
    const size_t per_lat = (size_t)C * S * S;
    z = malloc((size_t)B * per_lat * sizeof(float));
    img = malloc((size_t)B * oc * H * W * sizeof(float));
    u8 = malloc((size_t)oc * H * W);
    yb = malloc((size_t)B * sizeof(int64_t));
    ib = malloc((size_t)B * sizeof(uint64_t));
    if (!z || !img || !u8 || !yb || !ib)
        CHECK(dm_fail(DM_ERR_NOMEM, "out of memory for a batch of %d", B));
    dm_log(DM_LOG_VERBOSE, "buffers: latents %zu floats, images %zu floats per batch; forward on "
           "%d rows", (size_t)B * per_lat, (size_t)B * oc * H * W,
           p.cfg_scale != 1.0f ? 2 * B : B);

    dm_denoiser d;
    dm_model_denoiser(m, &d);
    if (a.dump_routing) { /* every evaluation's expert choices; one file per process */
        char path[PATH_MAX + 32];
        if (sh.size > 1)
            snprintf(path, sizeof path, "%s.%dof%d", a.dump_routing, sh.rank, sh.size);
        else
            snprintf(path, sizeof path, "%s", a.dump_routing);
        dm_trace_shape tshape;
        dm_trace_shape_from_model(&tshape, c, &p);
        CHECK(dm_trace_open(path, &tshape, c, model_path, &p, &trace));
        char pattern[PATH_MAX + 16];
        snprintf(pattern, sizeof pattern, "%s/%%06d.png", a.out); /* the overlay finds images */
        CHECK(dm_trace_note(trace, "images", pattern));
        dm_trace_denoiser(trace, m, &d);
    }
    prog.enabled = sh.rank == 0 && !a.quiet && dm_get_log_level() > 0;
    prog.tty = isatty(2);
    prog.total = ntodo;
    prog.t0 = prog.last = dm_time_sec();
    char seed_s[32], steps_s[16], scale_s[32], interval_s[64], eta_s[32];
    snprintf(seed_s, sizeof seed_s, "%llu", (unsigned long long)p.seed);
    snprintf(steps_s, sizeof steps_s, "%d", p.steps);
    snprintf(scale_s, sizeof scale_s, "%g", (double)p.cfg_scale);
    snprintf(interval_s, sizeof interval_s, "%g,%g", (double)p.cfg_t_lo, (double)p.cfg_t_hi);
    snprintf(eta_s, sizeof eta_s, "%g", (double)p.eta);
    double sample_sec = 0, vae_sec = 0, png_sec = 0, last_manifest = dm_time_sec();
    for (int64_t t0 = 0; t0 < ntodo; t0 += B) {
        const int nb = (int)(ntodo - t0 < B ? ntodo - t0 : B);
        for (int b = 0; b < nb; b++) {
            ib[b] = todo[t0 + b];
            yb[b] = dm_batch_class_of(&cls, p.seed, ib[b]);
        }
        prog.nb = nb;
        double ts = dm_time_sec();
        if (trace) CHECK(dm_trace_batch(trace, nb, yb, ib));
        st = dm_sample(&d, &p, nb, yb, ib, NULL, z, on_step, &prog);
        CHECK(st);
        /* Decode with the model's latent scale (dm_vae_decode divides by the VAE's own). */
        if (c->vae_scale > 0 && vi->scale != c->vae_scale) {
            const float r = vi->scale / c->vae_scale;
            for (size_t j = 0; j < (size_t)nb * per_lat; j++) z[j] *= r;
        }
        double tv = dm_time_sec();
        CHECK(dm_vae_decode(vae, nb, S, S, z, img));
        double tp = dm_time_sec();
        for (int b = 0; b < nb; b++) {
            const int k = (int)yb[b];
            char path[PATH_MAX + 32], idx_s[24], cls_s[96];
            dm_image_to_u8(oc, H, W, img + (size_t)b * oc * H * W, u8);
            dm_batch_png_path(a.out, ib[b], path, sizeof path);
            snprintf(idx_s, sizeof idx_s, "%llu", (unsigned long long)ib[b]);
            if (c->class_names)
                snprintf(cls_s, sizeof cls_s, "%d (%s)", k, c->class_names[k]);
            else
                snprintf(cls_s, sizeof cls_s, "%d", k);
            const char *text[] = {"Software", PROG " " DITMOE_VERSION, "model", bp.model_file,
                                  "vae", bp.vae_file, "class", cls_s, "seed", seed_s,
                                  "steps", steps_s, "sampler", bp.sampler, "cfg-scale", scale_s,
                                  "cfg-channels", cfgch, "cfg-interval", interval_s, "eta", eta_s,
                                  "image-index", idx_s, NULL};
            CHECK(dm_png_write(path, W, H, oc, u8, text));
        }
        double te = dm_time_sec();
        sample_sec += tv - ts;
        vae_sec += tp - tv;
        png_sec += te - tp;
        made += nb;
        prog.done = made;
        prog_draw(&prog, 0, 0);
        /* Progress of the whole job (all shards: the files present) every 30 s. */
        if (sh.rank == 0 && te - last_manifest > 30) {
            int64_t n = 0;
            if (dm_batch_scan(a.out, a.num, NULL, &n, -1, 1) == DM_OK)
                dm_batch_manifest_write(a.out, &bp, n);
            last_manifest = te;
        }
    }
    prog_end(&prog);

    /* All the communication: a barrier and a gather of counts. */
    long long counts[2] = {made, skipped}, total_made = made, total_skipped = skipped;
#ifdef DITMOE_HAVE_MPI
    if (sh.mpi) {
        long long *all = sh.rank == 0 ? malloc((size_t)sh.size * 2 * sizeof *all) : NULL;
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Gather(counts, 2, MPI_LONG_LONG, all, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
        if (all) {
            total_made = total_skipped = 0;
            for (int r = 0; r < sh.size; r++) {
                total_made += all[2 * r];
                total_skipped += all[2 * r + 1];
            }
            free(all);
        }
    }
#else
    (void)counts;
#endif
    if (trace) {
        st = dm_trace_close(trace);
        trace = NULL;
        CHECK(st);
    }
    if (sh.rank == 0) {
        int64_t n = 0;
        CHECK(dm_batch_scan(a.out, a.num, NULL, &n, -1, 1));
        CHECK(dm_batch_manifest_write(a.out, &bp, n));
        const double wall = dm_time_sec() - t_start;
        const int all_known = sh.mpi || sh.size == 1;
        dm_log(DM_LOG_INFO, "%s %lld images (%lld were already there) in %.1f s%s; %s holds "
               "%lld of %lld", all_known ? "made" : "this shard made", all_known ? total_made : made,
               all_known ? total_skipped : skipped, wall, sh.size > 1 && !sh.mpi ?
               " (other shards run separately)" : "", a.out, (long long)n, (long long)a.num);
        if (made > 0)
            dm_log(DM_LOG_INFO, "this process: %.3f img/s (transformer+sampler %.3f s/img, VAE "
                   "%.3f s/img, PNG %.4f s/img)", (double)made / (sample_sec + vae_sec + png_sec),
                   sample_sec / made, vae_sec / made, png_sec / made);
    }

done:
    dm_trace_abort(trace);
    prog_end(&prog);
    free(done);
    free(todo);
    free(z);
    free(img);
    free(u8);
    free(yb);
    free(ib);
    dm_batch_classes_free(&cls);
    dm_vae_free(vae);
    dm_model_free(m);
#ifdef DITMOE_HAVE_MPI
    if (sh.mpi) {
        if (rc && sh.size > 1) MPI_Abort(MPI_COMM_WORLD, rc); /* never leave ranks in a barrier */
        MPI_Finalize();
    }
#endif
    return rc;
}

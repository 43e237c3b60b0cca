"""Thread-count and world-size invariance, end to end (issue 11): an image depends only on its
seed and index, never on how many threads or MPI ranks computed it.

Checks (each prints ok/FAIL):
- ditmoe-vae-decode with --threads 1, 2 and 3 writes bitwise identical float32 images, for a
  small random SD-style VAE (mid attention, widths that are and are not multiples of 32) and for
  the shipped Fashion-MNIST VAE;
- ditmoe-sample with --threads 1, 2 and 3 writes identical pixels (and identical latents), for
  both shipped models (assets/ditmoe-fmnist and assets/promoe-fmnist, with assets/vae-fmnist);
- ditmoe-batch as one process (--threads 2 and 3) and under `mpirun --oversubscribe -np 2` and
  `-np 3` (one thread per rank) writes identical pixels, for both shipped models (skipped with a
  message only if mpirun or the MPI build is absent).
Small on purpose: a few images, a few steps.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
ASSETS = os.path.join(SRC, "assets")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import vae_ref as V  # noqa: E402
sys.path.insert(0, os.path.join(SRC, "tests"))
from testlib import check, finish, read_png  # noqa: E402

MODELS = ["ditmoe-fmnist.safetensors", "promoe-fmnist.safetensors"]
VAE = os.path.join(ASSETS, "vae-fmnist.safetensors")
def run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        print((p.stdout + p.stderr)[-1500:])
    return p.returncode


def pixel_dirs_equal(a, b, what):
    na = sorted(n for n in os.listdir(a) if n.endswith(".png"))
    nb = sorted(n for n in os.listdir(b) if n.endswith(".png"))
    diff = [n for n in na if n not in nb or not np.array_equal(read_png(os.path.join(a, n))[0],
                                                                read_png(os.path.join(b, n))[0])]
    check(len(na) > 0 and na == nb and not diff,
          f"{what}: {len(na)} vs {len(nb)} images, identical pixels"
          + (f" (differ: {diff[:5]})" if diff else ""))


def vae_decode(tmp):
    P = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    tool = os.path.join(BIN, "ditmoe-vae-decode")
    # Small SD-style decoder: 8x8 latent -> 32x32; widths 8, 16 (not multiples of 32), 32.
    vc = V.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, out_ch=3,
                     norm_groups=8)
    dec = V.randomize_(V.Decoder(vc), seed=11)
    V.write_safetensors(P("vae.safetensors"), dec.state_dict(), V.vae_metadata(vc))
    g = torch.Generator().manual_seed(3)
    np.save(P("z.npy"), (torch.randn(2, 4, 8, 8, generator=g) * 0.5).numpy())
    np.save(P("z4.npy"), (torch.randn(1, 4, 8, 8, generator=g) * 0.5).numpy())
    for vae, z, name in ((P("vae.safetensors"), P("z.npy"), "random SD-style VAE"),
                         (VAE, P("z4.npy"), "shipped Fashion-MNIST VAE")):
        outs = []
        for t in (1, 2, 3):
            o = P(f"img-t{t}.npy")
            rc = run([tool, "--vae", vae, "--z", z, "--out", o, "--threads", str(t), "-q"])
            check(rc == 0, f"ditmoe-vae-decode {name} --threads {t} runs")
            outs.append(np.load(o) if rc == 0 else None)
        if all(o is not None for o in outs):
            for t, o in zip((2, 3), outs[1:]):
                nd = int(np.sum(o != outs[0]))
                check(o.tobytes() == outs[0].tobytes(),
                      f"ditmoe-vae-decode {name}: --threads {t} == --threads 1 bitwise "
                      f"({nd} of {o.size} values differ)")


def sample(tmp):
    tool = os.path.join(BIN, "ditmoe-sample")
    for m in MODELS:
        dirs = []
        for t in (1, 2, 3):
            d = os.path.join(tmp, f"s-{m}-{t}")
            os.makedirs(d)
            rc = run([tool, "--model", os.path.join(ASSETS, m), "--vae", VAE, "--class", "0,5,9",
                      "-n", "1", "--steps", "4", "--seed", "5", "--threads", str(t), "-q",
                      "-o", os.path.join(d, "img-%03d.png"), "--save-latent",
                      os.path.join(d, "lat.npy")])
            check(rc == 0, f"ditmoe-sample {m} --threads {t} runs")
            dirs.append(d)
        for t, d in zip((2, 3), dirs[1:]):
            pixel_dirs_equal(dirs[0], d, f"ditmoe-sample {m}: --threads {t} vs 1")
            la, lb = (np.load(os.path.join(x, "lat.npy")) for x in (dirs[0], d))
            check(la.tobytes() == lb.tobytes(), f"ditmoe-sample {m}: latents --threads {t} == 1")


def batch(tmp):
    tool = os.path.join(BIN, "ditmoe-batch")
    mpirun = shutil.which("mpirun")
    try:  # the MPI build links libmpi (without it every rank would do every image)
        mpi_build = "libmpi" in subprocess.run(["ldd", tool], capture_output=True, text=True).stdout
    except OSError:
        mpi_build = False
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")
    for k in ("SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    # OpenMPI's own allocations are never freed; LSan (ASan builds) would fail the ranks.
    env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") + ":detect_leaks=0").lstrip(":")
    for m in MODELS:
        base = ["--model", os.path.join(ASSETS, m), "--vae", VAE, "--num", "6", "--steps", "4",
                "--seed", "9", "-q"]
        ref = os.path.join(tmp, f"b-{m}-t1")
        check(run([tool] + base + ["--threads", "1", "-o", ref], env=env) == 0,
              f"ditmoe-batch {m} --threads 1 runs")
        for t in (2, 3):
            d = os.path.join(tmp, f"b-{m}-t{t}")
            check(run([tool] + base + ["--threads", str(t), "-o", d], env=env) == 0,
                  f"ditmoe-batch {m} --threads {t} runs")
            pixel_dirs_equal(ref, d, f"ditmoe-batch {m}: 1 process --threads {t} vs --threads 1")
        if not mpirun or not mpi_build:
            print(f"skipped: {'mpirun not found' if not mpirun else 'ditmoe-batch built without MPI'}"
                  f", no 1-vs-N-rank comparison for {m}")
            continue
        for n in (2, 3):
            d = os.path.join(tmp, f"b-{m}-np{n}")
            root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
            rc = run([mpirun] + root + ["--oversubscribe", "-np", str(n), tool] + base
                     + ["--threads", "1", "-o", d], env=env)
            check(rc == 0, f"mpirun -np {n} ditmoe-batch {m} runs")
            if rc == 0:
                pixel_dirs_equal(ref, d, f"ditmoe-batch {m}: mpirun -np {n} vs 1 process")
                pixel_dirs_equal(os.path.join(tmp, f"b-{m}-t2"), d,
                                 f"ditmoe-batch {m}: mpirun -np {n} vs 1 process --threads 2")


def main():
    for m in MODELS + ["vae-fmnist.safetensors"]:
        if not os.path.exists(os.path.join(ASSETS, m)):
            print(f"FAIL assets/{m} missing")
            return 1
    tmp = tempfile.mkdtemp(prefix="ditmoe-threads-")
    try:
        vae_decode(tmp)
        sample(tmp)
        batch(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finish()


if __name__ == "__main__":
    sys.exit(main())

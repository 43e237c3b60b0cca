"""ditmoe-batch end to end, on a tiny random DiT-MoE (tests/ref/dit_moe_ref.py + the converter)
and a tiny random VAE (tests/ref/vae_ref.py), a few DDPM steps.

Checks (each prints ok/FAIL):
- the same files (bytes) from --batch 1 and --batch 4, from 1 process and from 2 MPI ranks
  (mpirun -np 2; skipped with a message only if mpirun is absent), from --shard 0/2 + 1/2 and from
  SLURM_PROCID/SLURM_NTASKS;
- image i equals ditmoe-sample's image i for the same class and seed (same noise keying), when
  ditmoe-sample is built;
- a run killed with SIGKILL and restarted ends with exactly the uninterrupted set, no temp or
  partial file (every PNG decodes here with an independent zlib-based decoder);
- pack: numpy.load gives uint8 [N,H,W,3] equal to the PNGs' pixels (decoded here), labels = the
  tEXt classes, zipfile's CRC check passes, forced ZIP64 records present and still loadable,
  gray PNGs replicated to 3 channels, a missing index refused naming the first one;
- bad arguments and a mismatched manifest: exit 2 with a message naming the flag; --backend cuda
  refused without output; an output folder that cannot be made: exit 1.
"""
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tools"))
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402
import vae_ref as V  # noqa: E402
import convert_checkpoint  # noqa: E402
sys.path.insert(0, os.path.join(SRC, "tests"))
from testlib import check, finish, read_png  # noqa: E402

TOOL = os.path.join(BIN, "ditmoe-batch")
SAMPLE = os.path.join(BIN, "ditmoe-sample")
# ------------------------------------------------------------------ assets

def make_model(path, seed, num_classes=10):
    cfg = dict(hidden_size=32, depth=2, num_heads=2, num_experts=4, top_k=2, attention="timm",
               patch_size=2, input_size=8, in_channels=4, learn_sigma=True,
               num_classes=num_classes)
    m = randomize_(DiTMoE(**cfg), seed=seed).eval()
    pt = path + ".pt"
    torch.save({"ema": m.state_dict()}, pt)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = convert_checkpoint.main([pt, path, "--heads", "2", "--top-k", "2"])
    assert rc == 0, "convert_checkpoint failed"


def make_vae(path, seed, out_ch=3):
    vc = V.VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=out_ch)
    dec = V.randomize_(V.Decoder(vc), seed=seed)
    V.write_safetensors(path, dec.state_dict(), V.vae_metadata(vc))


# ------------------------------------------------------------------ running

def run(args, env=None, tool=TOOL):
    e = dict(os.environ)
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "DITMOE_FORCE_ZIP64"):
        e.pop(k, None)
    e.update(env or {})
    p = subprocess.run([tool] + args, capture_output=True, text=True, env=e)
    return p.returncode, p.stdout + p.stderr


def pngs(d):
    """{name: bytes} of the finished images; also every other entry except manifest.json."""
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))
            if n != "manifest.json"}


def same_set(a, b, what):
    A, B = pngs(a), pngs(b)
    diff = sorted(n for n in set(A) | set(B) if A.get(n) != B.get(n))
    check(len(A) > 0 and not diff, f"{what}: {len(A)} vs {len(B)} files, identical bytes"
          + (f" (differ: {diff[:5]})" if diff else ""))


def main():
    if not os.path.exists(TOOL):
        print(f"FAIL {TOOL} not built")
        return 1
    tmp = tempfile.mkdtemp(prefix="ditmoe-batch-")
    try:
        return body(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def body(tmp):
    P = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    make_model(P("model.safetensors"), seed=3)
    make_model(P("model2.safetensors"), seed=4)
    make_vae(P("vae.safetensors"), seed=5)
    make_vae(P("vae_gray.safetensors"), seed=6, out_ch=1)
    N = 24
    base = ["--model", P("model.safetensors"), "--vae", P("vae.safetensors"), "--steps", "4",
            "--seed", "7", "--threads", "1", "-q"]

    # --- batch size invariance
    rc, out = run(base + ["--num", str(N), "--batch", "1", "-o", P("b1")])
    check(rc == 0, f"--batch 1 run (exit {rc}) {out.strip()[:300]}")
    rc, out = run(base + ["--num", str(N), "--batch", "4", "-o", P("b4")])
    check(rc == 0, f"--batch 4 run (exit {rc}) {out.strip()[:300]}")
    same_set(P("b1"), P("b4"), "--batch 1 vs --batch 4")
    rc, out = run(base[:-3] + ["--threads", "2", "-q", "--num", str(N), "--batch", "7", "-o", P("t2")])
    check(rc == 0, f"--threads 2 --batch 7 run (exit {rc}) {out.strip()[:300]}")
    same_set(P("b1"), P("t2"), "--threads 1 --batch 1 vs --threads 2 --batch 7")
    check(sorted(pngs(P("b1"))) == ["%06d.png" % i for i in range(N)], "files 000000.png .. "
          f"{N - 1:06d}.png and nothing else")

    # --- PNG contents: tEXt metadata, classes from the documented draw is uniform-ish
    img0, text0 = read_png(P("b1", "000005.png"))
    check(img0.shape == (16, 16, 3), f"PNG 16x16 RGB (got {img0.shape})")
    want_keys = {"Software", "model", "vae", "class", "seed", "steps", "sampler", "cfg-scale",
                 "cfg-channels", "cfg-interval", "eta", "num-train-steps", "backend", "image-index"}
    check(want_keys <= set(text0) and text0["seed"] == "7" and text0["steps"] == "4"
          and text0["image-index"] == "5", f"tEXt metadata {text0}")
    classes = [int(read_png(P("b1", "%06d.png" % i))[1]["class"].split()[0]) for i in range(N)]
    check(all(0 <= k < 10 for k in classes) and len(set(classes)) >= 4,
          f"random classes in range and varied: {classes}")

    # --- same noise keying as ditmoe-sample: class list "3" -> image i == sample's image i
    if os.path.exists(SAMPLE):
        rc, out = run(base + ["--num", "3", "--classes", "3", "-o", P("c3")])
        rc2, out2 = run(["--model", P("model.safetensors"), "--vae", P("vae.safetensors"),
                         "--steps", "4", "--seed", "7", "--threads", "1", "-q", "--class", "3",
                         "-n", "3", "-o", P("s-%03d.png")], tool=SAMPLE)
        # Same noise and class, so the same image, pixel for pixel: the transformer's results do
        # not depend on the batch (fixed-order GEMM, src/backend/cpu/gemm.c).
        ok, stats = rc == 0 and rc2 == 0, []
        for i in range(3 if ok else 0):
            x = read_png(P("c3", "%06d.png" % i))[0].astype(int)
            y = read_png(P("s-%03d.png" % i))[0].astype(int)
            stats.append((int(np.abs(x - y).max()), float(np.mean(x == y))))
            ok = ok and stats[-1][0] == 0
        check(ok, f"--classes 3 == ditmoe-sample --class 3 -n 3 (max diff, equal fraction: {stats}) "
              f"{out}{out2}".strip())
    else:
        print("skipped: ditmoe-sample not built, no cross-check of the noise keying")

    # --- MPI: 1 vs 2 ranks
    mpirun = shutil.which("mpirun")
    if mpirun:
        env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
        e = dict(os.environ, **env)
        # OpenMPI's own allocations are never freed; LSan (ASan builds) would fail the ranks.
        e["ASAN_OPTIONS"] = (e.get("ASAN_OPTIONS", "") + ":detect_leaks=0").lstrip(":")
        t0 = time.time()
        p = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", TOOL]
                           + base + ["--num", str(N), "--batch", "3", "-o", P("mpi")],
                           capture_output=True, text=True, env=e, timeout=120)
        check(p.returncode == 0, f"mpirun -np 2 run (exit {p.returncode}, {time.time() - t0:.1f} s)"
              + ("" if p.returncode == 0 else (p.stdout + p.stderr)[-800:]))
        same_set(P("b1"), P("mpi"), "1 process vs mpirun -np 2")
    else:
        print("skipped: mpirun not found, no 1-vs-2-rank MPI comparison")

    # --- Slurm-style shards: explicit --shard, and SLURM_PROCID/SLURM_NTASKS
    for r in range(2):
        rc, out = run(base + ["--num", str(N), "--batch", "2", "--shard", f"{r}/2", "-o", P("sh"),
                              "--dump-routing", P("sh.dmr")])
        check(rc == 0, f"--shard {r}/2 (exit {rc}) {out.strip()[:200]}")
    same_set(P("b1"), P("sh"), "--shard 0/2 + 1/2 vs 1 process")
    # each shard dumped its own routing; ditmoe-routes reads both: one row per image and step
    dumps = [P("sh.dmr.0of2"), P("sh.dmr.1of2")]
    rc, out = run(["-o", P("views")] + dumps, tool=os.path.join(BIN, "ditmoe-routes"))
    check(rc == 0 and f"2 dump(s): {N * 4} conditional rows" in out
          and os.path.exists(P("views", "routes.json")),
          f"--dump-routing per shard, read together by ditmoe-routes: {out.strip()[:300]}")
    for r in range(3):
        rc, out = run(base + ["--num", str(N), "-o", P("slurm")],
                      env={"SLURM_PROCID": str(r), "SLURM_NTASKS": "3"})
        n_mine = len([i for i in range(N) if i % 3 == r])
        check(rc == 0, f"SLURM_PROCID={r} SLURM_NTASKS=3 (exit {rc})")
        if r == 0:
            check(len(pngs(P("slurm"))) == n_mine, f"shard 0 of 3 wrote only its {n_mine} indices")
    same_set(P("b1"), P("slurm"), "SLURM_PROCID 0..2 of 3 vs 1 process")

    # --- kill -9 mid-run, restart
    NK = 240
    kargs = base[:-1] + ["--num", str(NK), "--batch", "2", "-o", P("kill")]  # not -q: progress
    ref_args = base + ["--num", str(NK), "--batch", "5", "-o", P("full")]
    rc, out = run(ref_args)
    check(rc == 0, f"uninterrupted {NK}-image run (exit {rc})")
    os.makedirs(P("kill"))
    # a stale temp file from an earlier crash, and a foreign file, must not disturb the run
    open(P("kill", "000003.png.tmp.99999"), "wb").write(b"\x89PNG partial")
    open(P("kill", "notes.txt"), "w").write("mine")
    proc = subprocess.Popen([TOOL] + kargs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        n = len([x for x in os.listdir(P("kill")) if x.endswith(".png")])
        if n >= 30 or proc.poll() is not None:
            break
        time.sleep(0.02)
    was_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(P("kill"))
    done_n = len([x for x in names if x.endswith(".png")])
    check(was_running and 0 < done_n < NK, f"killed mid-run with SIGKILL after {done_n} of {NK}")
    bad = []
    for x in names:
        if x.endswith(".png"):
            try:
                read_png(P("kill", x))
            except Exception as ex:  # noqa: BLE001
                bad.append(f"{x}: {ex}")
    check(not bad, f"every .png present after the kill is complete ({bad[:3]})")
    rc, out = run(kargs + ["-q"])
    check(rc == 0, f"restart after the kill (exit {rc}) {out.strip()[:300]}")
    left = pngs(P("kill"))
    check("notes.txt" in left, "foreign file left alone")
    del left["notes.txt"]
    stray = [x for x in left if not x.endswith(".png")]
    check(not stray, f"no temp files left after the restart ({stray[:5]})")
    full = pngs(P("full"))
    diff = sorted(n for n in set(full) | set(left) if full.get(n) != left.get(n))
    check(len(left) == NK and not diff, f"killed+restarted run == uninterrupted run ({len(left)} "
          f"files, differing {diff[:5]})")
    rc, out = run(kargs)
    check(rc == 0 and "0 to make" in out, "a third run finds nothing to do")

    # --- manifest
    import json
    man = json.load(open(P("b1", "manifest.json")))
    check(man["params"]["num"] == N and man["params"]["steps"] == 4 and man["params"]["seed"] == "7"
          and man["progress"]["done"] == N and len(man["model"]["sha256"]) == 64,
          "manifest: params, progress, model hash")
    import hashlib
    check(man["model"]["sha256"] == hashlib.sha256(open(P("model.safetensors"), "rb").read()).hexdigest()
          and man["vae"]["sha256"] == hashlib.sha256(open(P("vae.safetensors"), "rb").read()).hexdigest(),
          "manifest SHA-256 of model and VAE == hashlib's")
    mismatches = [
        (["--steps", "5"], "--steps"),
        (["--seed", "8"], "--seed"),
        (["--cfg-scale", "2"], "--cfg-scale"),
        (["--classes", "balanced"], "--classes"),
        (["--model", P("model2.safetensors")], "--model"),
        (["--top-k", "1"], "model configuration"),  # a config override changes the pixels too
    ]
    for extra, flag in mismatches:
        args = base + ["--num", str(N), "-o", P("b1")]
        for i in range(0, len(extra), 2):  # replace a flag already in base
            if extra[i] in args:
                args[args.index(extra[i]) + 1] = extra[i + 1]
            else:
                args += extra[i:i + 2]
        rc, out = run(args)
        check(rc == 2 and flag in out and "manifest.json" in out,
              f"rerun with a different {flag} refused, exit 2: {out.strip()[:200]}")
    rc, out = run(base + ["--num", str(N + 1), "-o", P("b1")])
    check(rc == 2 and "--num" in out, f"different --num refused: {out.strip()[:200]}")

    # --- pack
    rc, out = run(["pack", P("b1"), P("b1.npz"), "--labels", "-q"])
    check(rc == 0, f"pack --labels (exit {rc}) {out.strip()[:300]}")
    want = np.stack([read_png(P("b1", "%06d.png" % i))[0] for i in range(N)])
    d = np.load(P("b1.npz"))
    check(sorted(d.files) == ["arr_0", "arr_1"], f"npz members {d.files}")
    a0 = d["arr_0"]
    check(a0.dtype == np.uint8 and a0.shape == (N, 16, 16, 3) and np.array_equal(a0, want),
          f"arr_0 uint8 {a0.shape} == the PNGs' pixels")
    a1 = d["arr_1"]
    check(a1.dtype == np.int64 and a1.tolist() == classes, f"arr_1 int64 labels == tEXt classes")
    with zipfile.ZipFile(P("b1.npz")) as z:
        infos = z.infolist()
        check(z.testzip() is None and all(i.compress_type == zipfile.ZIP_STORED for i in infos),
              "zip: stored members, CRC-32s verified by zipfile")
    rc, out = run(["pack", P("b1"), P("b1z.npz"), "-q"], env={"DITMOE_FORCE_ZIP64": "1"})
    raw = open(P("b1z.npz"), "rb").read()
    with zipfile.ZipFile(P("b1z.npz")) as z:
        i0 = z.infolist()[0]
        z64 = b"\x01\x00" in i0.extra[:2] and z.testzip() is None
    check(rc == 0 and z64 and b"PK\x06\x06" in raw and b"PK\x06\x07" in raw,
          "forced ZIP64: extra field, ZIP64 end record and locator present, CRC ok")
    d = np.load(P("b1z.npz"))
    check(d.files == ["arr_0"] and np.array_equal(d["arr_0"], want), "forced ZIP64 npz loads in numpy, same array")
    # numpy's own savez of the same array holds the same .npy member bytes
    buf = io.BytesIO()
    np.save(buf, want)
    with zipfile.ZipFile(P("b1.npz")) as z:
        check(z.read("arr_0.npy")[128:] == buf.getvalue()[128:] and
              np.load(io.BytesIO(z.read("arr_0.npy"))).shape == want.shape,
              "arr_0.npy payload == numpy.save's")

    # gray VAE -> 1-channel PNGs -> replicated RGB
    gargs = ["--model", P("model.safetensors"), "--vae", P("vae_gray.safetensors"), "--steps", "2",
             "--threads", "1", "-q", "--num", "5", "-o", P("gray")]
    rc, out = run(gargs)
    g0, _ = read_png(P("gray", "000002.png")) if rc == 0 else (None, None)
    rc2, out2 = run(["pack", P("gray"), P("gray.npz"), "-q"])
    ok = rc == 0 and rc2 == 0 and g0.shape[2] == 1
    if ok:
        a = np.load(P("gray.npz"))["arr_0"]
        ok = a.shape == (5, 16, 16, 3) and all(np.array_equal(a[2, :, :, c], g0[:, :, 0]) for c in range(3))
    check(ok, f"gray PNGs packed as RGB [5,16,16,3] replicated ({out}{out2})".strip())

    # missing index -> refused, first missing named, no output
    os.unlink(P("b4", "000007.png"))
    os.unlink(P("b4", "000011.png"))
    rc, out = run(["pack", P("b4"), P("b4.npz"), "-q"])
    check(rc == 2 and "000007.png" in out and not os.path.exists(P("b4.npz")),
          f"pack with missing indices refused naming the first: {out.strip()[:200]}")
    rc, out = run(["pack", P("nowhere"), P("x.npz")])
    check(rc == 2 and "nowhere" in out, f"pack of a missing dir: exit 2 ({out.strip()[:150]})")
    rc, out = run(["pack", P("b1")])
    check(rc == 2 and "usage" in out, f"pack without OUT: exit 2 ({out.strip()[:150]})")

    # --- bad arguments
    bads = [
        (base + ["-o", P("x")], "--num"),
        (base + ["--num", "4"], "-o"),
        (base + ["--num", "0", "-o", P("x")], "--num"),
        (base + ["--num", "4", "--batch", "0", "-o", P("x")], "--batch"),
        (base + ["--num", "4", "--classes", "nope", "-o", P("x")], "--classes"),
        (base + ["--num", "4", "--classes", "3,,4", "-o", P("x")], "--classes"),
        (base + ["--num", "4", "--shard", "2/2", "-o", P("x")], "--shard"),
        (base + ["--num", "4", "--shard", "a", "-o", P("x")], "--shard"),
        (base + ["--num", "4", "--sampler", "euler", "-o", P("x")], "--sampler"),
        (base + ["--num", "4", "--bogus", "-o", P("x")], "--bogus"),
        (["--model", P("nope.safetensors"), "--vae", P("vae.safetensors"), "--num", "4",
          "-o", P("x")], "nope.safetensors"),
        (base + ["--num", "4", "-o", P("b1", "000000.png")], "-o"),
    ]
    for args, flag in bads:
        rc, out = run(args)
        check(rc == 2 and flag in out, f"bad args {flag}: exit {rc}: {out.strip()[:160]}")
    check(not os.path.exists(P("x")) or not os.listdir(P("x")), "nothing written by refused runs")
    # --backend cuda in a CPU-only build: refused before anything is made (no output folder)
    rc, out = run(base + ["--num", "4", "--backend", "cuda", "-o", P("cuda")])
    check(rc != 0 and "cuda" in out and not os.path.exists(P("cuda")),
          f"--backend cuda: exit {rc}, no output folder: {out.strip()[:160]}")
    # an output folder that cannot be made (its parent is a file): a runtime failure, exit 1
    open(P("afile"), "w").write("x")
    rc, out = run(base + ["--num", "4", "-o", P("afile", "sub")])
    check(rc == 1 and "cannot create directory" in out, f"unwritable -o: exit {rc}: {out.strip()[:160]}")
    rc, out = run(["--help"])
    check(rc == 0 and "--classes" in out and "pack" in out, "--help")

    return finish()


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"test_batch_cli: {time.time() - t0:.1f} s")
    sys.exit(rc)

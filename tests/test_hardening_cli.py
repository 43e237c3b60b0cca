"""The reproducers of the hardening issue (16), as a new user would meet them, through the programs.

Each bad input must give exactly one line on stderr naming the file and the field, exit code 2
(include/ditmoe.h: ARG/IO/FORMAT -> 2), no sanitizer report (in the clang ASan/UBSan build
ctest runs this against build-asan/bin), nothing written, and must not allocate a lot.
- ditmoe-routes: a dump whose header says "grid": [1e30, 1]; a 274-byte dump claiming 2^22 (and
  2^30) classes; a dump promising a million records it does not hold;
- ditmoe-batch pack / generation: manifest.json with "height": 3e43, with "version": 99, and a
  manifest.json that is a directory;
- resume: a 0-byte, a truncated and a wrong-size NNNNNN.png are made again, and the folder ends
  with exactly the bytes of an uninterrupted run;
- disk full (a 48 KiB tmpfs; skipped where mount is not allowed): ditmoe-batch exits 1 (runtime)
  leaving only complete PNGs and no temp files, and once space is freed the resumed run equals an
  uninterrupted one; ditmoe-forward's output on a full disk: exit 1, nothing left.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

SRC = os.environ.get("DITMOE_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
ROUTES = os.path.join(BIN, "ditmoe-routes")
BATCH = os.path.join(BIN, "ditmoe-batch")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(cmd, mem_mb=None):
    """-> (exit code, stderr, peak RSS of this child alone in MiB). The child is reaped with
    os.wait4 so its own ru_maxrss is read (RUSAGE_CHILDREN would be the running maximum over
    every earlier child, e.g. a sanitizer build's larger programs)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode(errors="replace")  # EOF when the child exits (ctest bounds time)
    p.stderr.close()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, err, ru.ru_maxrss / 1024.0


def bad_input(what, cmd, path, field, max_mb=None):
    rc, err, peak = run(cmd)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    ok = rc == 2 and len(lines) == 1 and path in err and field in err and "runtime error" not in err
    check(ok, f"{what}: exit {rc}, {len(lines)} line(s): {err.strip()[:300]}")
    if max_mb is not None:
        # ru_maxrss of children is a running maximum; checked only as an upper bound
        check(peak < max_mb, f"{what}: peak RSS {peak:.0f} MiB of child processes < {max_mb} MiB")


# ------------------------------------------------------------------ routing dumps

def dump(path, grid=(4, 4), classes=10, steps=50, records=0):
    header = {"format": "ditmoe-routing", "version": 1,
              "shape": {"layers": 1, "moe_layers": [0], "grid": list(grid), "tokens": 16,
                        "top_k": 2, "experts": 8, "uncond_expert": -1, "num_classes": classes,
                        "steps": steps, "heun": False, "id_dtype": "u8", "weights": "f16"},
              "records": records}
    h = json.dumps(header, separators=(",", ":")).encode()
    data = b"DMROUTE1" + struct.pack("<QQ", 24, len(h)) + h
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def routes_cases(d):
    out = os.path.join(d, "routes-out")
    p = os.path.join(d, "grid.dmr")
    with open(p, "wb") as f:  # the spelling: a float the JSON writer would never emit
        h = (b'{"format":"ditmoe-routing","version":1,"shape":{"layers":1,"moe_layers":[0],'
             b'"grid":[1e30,1],"tokens":16,"top_k":2,"experts":8,"uncond_expert":-1,'
             b'"num_classes":10,"steps":50,"heun":false,"id_dtype":"u8","weights":"f16"},'
             b'"records":0}')
        f.write(b"DMROUTE1" + struct.pack("<QQ", 24, len(h)) + h)
    bad_input("routes: grid [1e30, 1]", [ROUTES, "-q", "-o", out, p], p, "shape.grid")
    for classes in (1 << 22, 1 << 30):
        p = os.path.join(d, f"classes{classes}.dmr")
        n = dump(p, classes=classes)
        bad_input(f"routes: {n}-byte dump claiming {classes} classes", [ROUTES, "-q", "-o", out, p],
                  p, "shape.num_classes", max_mb=400)
    p = os.path.join(d, "records.dmr")
    dump(p, records=1000000)
    bad_input("routes: a million records promised, none held", [ROUTES, "-q", "-o", out, p], p,
              "records")
    check(not os.path.exists(out) or not os.listdir(out), "routes: nothing written for bad dumps")


# ------------------------------------------------------------------ batch manifest and resume

def tiny_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00\x10\x20\x00\x30\x40")) + chunk(b"IEND", b""))


def manifest_cases(d):
    run_dir = os.path.join(d, "run")
    rc, err, _ = run([BATCH, "-q", "--num", "4", "--steps", "2", "--seed", "3", "-o", run_dir])
    check(rc == 0, f"batch: a first run of 4 images: exit {rc} {err.strip()[:200]}")
    if rc:
        return
    mf = os.path.join(run_dir, "manifest.json")
    good = open(mf).read()
    m = json.loads(good)
    gen = [BATCH, "-q", "--num", "4", "--steps", "2", "--seed", "3", "-o", run_dir]
    pack = [BATCH, "pack", run_dir, os.path.join(d, "s.npz")]

    m["params"]["height"] = 3e43
    with open(mf, "w") as f:
        f.write(json.dumps(m).replace("3e+43", "3e43"))
    bad_input("pack: manifest height 3e43", pack, mf, "params.height")

    m = json.loads(good)
    m["version"] = 99
    with open(mf, "w") as f:
        json.dump(m, f)
    bad_input("pack: manifest version 99", pack, mf, "version")
    bad_input("batch resume: manifest version 99", gen, mf, "version")

    m = json.loads(good)
    m["params"]["num"] = 1e12
    with open(mf, "w") as f:
        json.dump(m, f)
    bad_input("pack: manifest num 1e12 over a folder of 4", pack, "000004.png", "missing",
              max_mb=400)

    os.unlink(mf)
    os.mkdir(mf)
    bad_input("pack: manifest.json is a directory", pack, mf, "is a directory")
    bad_input("batch resume: manifest.json is a directory", gen, mf, "is a directory")
    os.rmdir(mf)
    with open(mf, "w") as f:
        f.write(good)
    check(not os.path.exists(os.path.join(d, "s.npz")), "pack: no .npz left by the failures")

    # resume: foreign leftovers under final names are made again, bit for bit
    want = {n: open(os.path.join(run_dir, n), "rb").read() for n in sorted(os.listdir(run_dir))
            if n.endswith(".png")}
    open(os.path.join(run_dir, "000001.png"), "wb").close()  # 0 bytes
    with open(os.path.join(run_dir, "000002.png"), "wb") as f:
        f.write(want["000002.png"][:-12])  # IEND cut off
    # a complete, valid PNG of the wrong size (2x2 gray) as 000003.png
    with open(os.path.join(run_dir, "000003.png"), "wb") as f:
        f.write(tiny_png())
    r = subprocess.run([BATCH, "--num", "4", "--steps", "2", "--seed", "3", "-o", run_dir],
                       capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"batch resume over bad PNGs: exit {r.returncode} {r.stderr[-300:]}")
    remade = [ln for ln in r.stderr.splitlines() if "making it again" in ln]
    check(len(remade) == 3 and all(any(f"{i:06d}.png" in ln for ln in remade) for i in (1, 2, 3)),
          f"batch resume: one line for each of 000001..3 ({len(remade)} lines)")
    check("1 already done" in r.stderr or "1 were already" in r.stderr or
          "(1 were already there)" in r.stderr,
          "batch resume: only 000000.png counted as done")
    got = {n: open(os.path.join(run_dir, n), "rb").read() for n in sorted(os.listdir(run_dir))
           if n.endswith(".png")}
    check(got == want, "batch resume: the folder holds exactly the uninterrupted run's PNGs")
    check(not [n for n in os.listdir(run_dir) if ".tmp." in n], "batch resume: no temp files left")


# ------------------------------------------------------------------ disk full

def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True, text=True)
    return r.returncode == 0


def png_complete(path):
    """Signature, chunk CRCs and IEND last: what resume accepts (src/batch/pngcheck.c)."""
    b = open(path, "rb").read()
    if b[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos = 8
    while pos + 12 <= len(b):
        n, kind = struct.unpack(">I4s", b[pos:pos + 8])
        if pos + 12 + n > len(b) or zlib.crc32(b[pos + 4:pos + 8 + n]) != \
                struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])[0]:
            return False
        pos += 12 + n
        if kind == b"IEND":
            return pos == len(b)
    return False


def disk_full_cases(d):
    mnt = os.path.join(d, "small")
    if os.geteuid() != 0 or not mount_tmpfs(mnt, "48k"):
        print("SKIP disk full: cannot mount a small tmpfs here (needs root)")
        return
    try:
        out = os.path.join(mnt, "run")
        args = ["--num", "24", "--steps", "2", "--seed", "5", "--batch", "4"]
        rc, err, _ = run([BATCH, "-q", *args, "-o", out])
        lines = err.strip().splitlines()
        # exit 1 (DM_ERR_WRITE is a runtime failure); the ditmoe-batch before the one-exit-path
        # rewrite (issue 11, recognisable by its lack of --backend) still said 2 here
        h = subprocess.run([BATCH, "--help"], capture_output=True, text=True)
        want = 1 if "--backend" in h.stdout + h.stderr else 2
        check(rc == want and len(lines) == 1 and "runtime error" not in err,
              f"batch on a full disk: exit {rc} (want {want}), one line: {err.strip()[:200]}")
        names = os.listdir(out) if os.path.isdir(out) else []
        pngs = [n for n in names if n.endswith(".png")]
        check(0 < len(pngs) < 24 and all(png_complete(os.path.join(out, n)) for n in pngs),
              f"batch on a full disk: only complete PNGs left ({len(pngs)} of 24)")
        check(not [n for n in names if ".tmp." in n], "batch on a full disk: no temp files left")
        # space freed: the resumed run ends with exactly the uninterrupted run's files
        subprocess.run(["mount", "-o", "remount,size=4m", mnt], check=True)
        rc, err, _ = run([BATCH, "-q", *args, "-o", out])
        ref = os.path.join(d, "ref-full")
        rc2, err2, _ = run([BATCH, "-q", *args, "-o", ref])
        same = rc == 0 and rc2 == 0 and all(
            open(os.path.join(out, n), "rb").read() == open(os.path.join(ref, n), "rb").read()
            for n in os.listdir(ref) if n.endswith(".png")) and \
            sorted(n for n in os.listdir(out) if n.endswith(".png")) == \
            sorted(n for n in os.listdir(ref) if n.endswith(".png"))
        check(same, f"batch resumed after freeing space == uninterrupted run (exit {rc}, {rc2})")
        # ditmoe-forward's output on a full disk: exit 1, nothing left
        subprocess.run(["rm", "-rf", out], check=True)
        subprocess.run(["mount", "-o", "remount,size=8k", mnt], check=True)
        fill = os.path.join(mnt, "fill")
        with open(fill, "wb") as f:
            try:
                f.write(b"\0" * 16384)
            except OSError:
                pass
        import numpy as np
        for name, a in (("x", np.zeros((1, 4, 8, 8), np.float32)), ("t", np.array([5.0], np.float32)),
                        ("y", np.array([1], np.int64))):
            np.save(os.path.join(d, f"{name}.npy"), a)
        model = os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors")
        o = os.path.join(mnt, "out.npy")
        rc, err, _ = run([os.path.join(BIN, "ditmoe-forward"), "--model", model, "-q",
                          "--x", os.path.join(d, "x.npy"), "--t", os.path.join(d, "t.npy"),
                          "--y", os.path.join(d, "y.npy"), "--out", o])
        check(rc == 1 and len(err.strip().splitlines()) == 1 and o in err,
              f"forward on a full disk: exit {rc} (runtime failure), one line: {err.strip()[:200]}")
        check(sorted(os.listdir(mnt)) == ["fill"], f"forward on a full disk: nothing left "
              f"({sorted(os.listdir(mnt))})")
    finally:
        subprocess.run(["umount", mnt])


# ------------------------------------------------------------------ non-finite inputs and weights

def poison(src, dst, tensor):
    """Copy a safetensors file with element 0 of `tensor` (F32) set to NaN."""
    with open(src, "rb") as f:
        b = bytearray(f.read())
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    at = 8 + n + h[tensor]["data_offsets"][0]
    b[at:at + 4] = struct.pack("<f", float("nan"))
    with open(dst, "wb") as f:
        f.write(b)


def nonfinite_cases(d):
    import numpy as np
    fwd, vdec = os.path.join(BIN, "ditmoe-forward"), os.path.join(BIN, "ditmoe-vae-decode")
    model = os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors")
    vae = os.path.join(SRC, "assets", "vae-fmnist.safetensors")
    x = np.zeros((2, 4, 8, 8), np.float32)
    x[1, 2, 3, 4] = np.nan
    paths = {}
    for name, a in (("xnan", x), ("x", np.zeros((2, 4, 8, 8), np.float32)),
                    ("t", np.array([5.0, 7.0], np.float32)), ("tinf", np.array([5.0, np.inf], np.float32)),
                    ("y", np.array([1, 2], np.int64))):
        paths[name] = os.path.join(d, f"{name}.npy")
        np.save(paths[name], a)
    out = os.path.join(d, "fwd-out.npy")
    bad = 256 + 2 * 64 + 3 * 8 + 4
    bad_input("forward: NaN in --x", [fwd, "--model", model, "-q", "--x", paths["xnan"], "--t", paths["t"],
              "--y", paths["y"], "--out", out], paths["xnan"], f"element {bad}")
    bad_input("forward: inf in --t", [fwd, "--model", model, "-q", "--x", paths["x"], "--t", paths["tinf"],
              "--y", paths["y"], "--out", out], paths["tinf"], "element 1")
    check(not os.path.exists(out), "forward: nothing written for a non-finite input")
    pm = os.path.join(d, "nan-weight.safetensors")
    poison(model, pm, "blocks.1.attn.qkv.weight")
    rc, err, _ = run([fwd, "--model", pm, "-q", "--x", paths["x"], "--t", paths["t"], "--y", paths["y"],
                      "--out", out])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    check(rc == 1 and len(lines) == 1 and "first appear in block 1" in err and "runtime error" not in err,
          f"forward: NaN weight in block 1: exit {rc} (1), one line naming the block: {err.strip()[:300]}")
    check(not os.path.exists(out), "forward: no all-NaN out.npy left for a NaN weight")
    if os.path.exists(vdec):
        z = np.zeros((1, 4, 4, 4), np.float32)
        z[0, 1, 2, 3] = np.inf
        zp = os.path.join(d, "znan.npy")
        np.save(zp, z)
        png = os.path.join(d, "dec.png")
        bad_input("vae-decode: inf in the latent", [vdec, "--vae", vae, "-q", "--z", zp, "--out", png + ".npy", "--png", png],
                  zp, f"element {16 + 2 * 4 + 3}")
        check(not os.path.exists(png + ".npy") and not os.path.exists(png + "_0.png"), "vae-decode: nothing written for a non-finite latent")
        pv = os.path.join(d, "nan-vae.safetensors")
        poison(vae, pv, "decoder.mid_block.resnets.0.norm1.weight")
        np.save(zp, np.zeros((1, 4, 4, 4), np.float32))
        rc, err, _ = run([vdec, "--vae", pv, "-q", "--z", zp, "--out", png + ".npy"])
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        check(rc == 1 and len(lines) == 1 and "first appear in mid block 0" in err,
              f"vae-decode: NaN weight in the mid block: exit {rc} (1), one line: {err.strip()[:300]}")
        check(not os.path.exists(png + ".npy"), "vae-decode: no output for a NaN weight")


def main():
    if not os.path.exists(ROUTES) or not os.path.exists(BATCH):
        print(f"SKIP: programs not built in {BIN}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ditmoe-hard-cli-") as d:
        nonfinite_cases(d)
        routes_cases(d)
        manifest_cases(d)
        disk_full_cases(d)
    if failures:
        print(f"{len(failures)} failure(s)", file=sys.stderr)
        return 1
    print("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The exit policy and the flag tables of all five programs (ditmoe.h dm_exit_code):

- every bad-input case exits 2 with one stderr line naming the problem: unknown flag, bad value,
  missing input file, malformed input file; --backend cuda in a CPU-only build exits 2 (nonzero
  in any build without a GPU) and writes nothing;
- an output that cannot be written (a folder that cannot exist: its parent is a regular file, so
  this holds for root too) exits 1 and leaves nothing behind;
- --help exits 0 and shows a default for every flag; every flag --help lists is one the parser
  takes (so the help and the parser come from one table), and --version prints the name.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

SRC = os.environ.get("DITMOE_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
# --backend cuda: refused as bad input (2) by a CPU-only build; a CUDA build on a machine without
# a GPU fails when the backend starts (runtime, 1); with a GPU the case is not checked.
CUDA_BUILD = os.path.exists(os.path.join(BIN, "ditmoe-cuda-check"))
CUDA_CODE = 1 if CUDA_BUILD else 2
CUDA_CHECK = not os.path.exists("/dev/nvidia0")
PY = os.environ.get("PYTHON", sys.executable)
REF = os.path.join(SRC, "tests", "ref", "sampler_ref.py")
PROGRAMS = ["ditmoe-sample", "ditmoe-batch", "ditmoe-forward", "ditmoe-vae-decode", "ditmoe-routes",
            "ditmoe-convert"]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(prog, args, cwd=None):
    p = subprocess.run([os.path.join(BIN, prog)] + args, capture_output=True, text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def listing(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def expect(prog, name, args, code, pattern, out_dir):
    """Exit `code`, one stderr line matching `pattern` (and starting "prog: "), out_dir empty."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    rc, _, err = run(prog, args)
    lines = [l for l in err.splitlines() if l.strip()]
    left = listing(out_dir)
    good = (rc == code and len(lines) == 1 and lines[0].startswith(prog + ": ")
            and re.search(pattern, lines[0]) is not None and not left)
    check(good, f"{prog}: {name}: exit {rc} (want {code}): {err.strip()[:200]}"
          + (f" left {left}" if left else ""))


def help_entries(text):
    """[(flags of the entry, its text)] from a --help listing: entries start with '  -'."""
    entries, cur = [], None
    for line in text.splitlines():
        if line.startswith("  -"):
            cur = [line.split("  ")[1].strip() if "  " in line[2:] else line.strip(), line]
            cur[0] = re.split(r"\s{2,}", line.strip())[0]
            entries.append(cur)
        elif cur is not None and line.startswith("    "):
            cur[1] += "\n" + line
        else:
            cur = None
    return entries


def check_help(prog, prefix=()):
    rc, out, err = run(prog, list(prefix) + ["--help"])
    name = " ".join([prog] + list(prefix))
    entries = help_entries(out)
    check(rc == 0 and len(entries) >= 4, f"{name} --help: exit {rc}, {len(entries)} flags")
    missing = [f for f, t in entries if "(default:" not in t and "--help" not in f
               and "--version" not in f]
    check(not missing, f"{name} --help: every flag shows its default (missing: {missing})")
    # Every listed flag is taken by the parser: "FLAG [VALUE] --frobnicate" fails on --frobnicate
    # (or on the value), never with "unknown flag 'FLAG'".
    unknown = []
    for f, _ in entries:
        parts = f.replace(",", "").split()
        names = [p for p in parts if p.startswith("-")]
        takes = len(parts) > len(names)
        for n in names:
            if n in ("-h", "--help", "--version"):
                continue
            rc, out2, err2 = run(prog, list(prefix) + [n] + (["1"] if takes else []) + ["--frobnicate"])
            if rc != 2 or f"unknown flag '{n}'" in err2:
                unknown.append((n, rc, err2.strip()[:80]))
    check(not unknown, f"{name}: every flag in --help is known to the parser ({unknown[:3]})")
    rc, out, _ = run(prog, ["--version"])
    check(rc == 0 and out.startswith(prog + " "), f"{prog} --version: {out.strip()}")


def main():
    for p in PROGRAMS:
        if not os.path.exists(os.path.join(BIN, p)):
            print(f"FAIL {p} not built in {BIN}")
            return 1
    tmp = tempfile.mkdtemp(prefix="ditmoe-cli-exit-")
    try:
        return body(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def body(tmp):
    P = lambda *a: os.path.join(tmp, *a)  # noqa: E731
    for args in (["model", P("m.safetensors"), "--objective", "ddpm"], ["vae", P("v.safetensors")]):
        r = subprocess.run([PY, REF] + args, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    open(P("garbage.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    open(P("garbage.npy"), "wb").write(b"\x93NUMPY\x01\x00garbage")
    open(P("garbage.dmr"), "wb").write(b"not a routing dump")
    open(P("afile"), "w").write("a regular file: nothing can be created under it")
    np.save(P("x.npy"), np.zeros((2, 4, 8, 8), np.float32))
    np.save(P("t.npy"), np.array([10.0, 500.0], np.float32))
    np.save(P("y.npy"), np.array([1, 10], np.int64))
    np.save(P("z.npy"), np.zeros((1, 4, 8, 8), np.float32))
    O = P("out")  # every case's outputs go here; it must stay empty
    nodir = P("afile", "sub")
    M = ["--model", P("m.safetensors"), "--vae", P("v.safetensors"), "--steps", "2", "--seed", "1",
         "-q"]
    # a routing dump for ditmoe-routes
    rc, _, err = run("ditmoe-sample", M + ["--latent-only", "--save-latent", P("l.npy"),
                                           "--dump-routing", P("d.dmr")])
    assert rc == 0, err

    # --- ditmoe-sample
    S = "ditmoe-sample"
    expect(S, "unknown flag", M + ["--frobnicate", "-o", P("out", "a.png")], 2, "unknown flag '--frobnicate'", O)
    expect(S, "bad value", M + ["--batch", "x", "-o", P("out", "a.png")], 2, "--batch 'x'", O)
    expect(S, "bad --steps", M + ["--steps", "abc", "-o", P("out", "a.png")], 2, "--steps 'abc'", O)
    # a library check names the field ("steps 0: ..."); the program's line names its flag
    expect(S, "--steps 0 (library check)", M + ["--steps", "0", "-o", P("out", "a.png")], 2,
           "--steps 0: must be >= 1", O)
    expect(S, "missing model", ["--model", P("nope.safetensors"), "--vae", P("v.safetensors"),
                                "-o", P("out", "a.png")], 2, "nope.safetensors", O)
    expect(S, "malformed model", ["--model", P("garbage.safetensors"), "--vae", P("v.safetensors"),
                                  "-o", P("out", "a.png")], 2, "garbage.safetensors", O)
    expect(S, "malformed --init-noise", M + ["--init-noise", P("garbage.npy"), "-o", P("out", "a.png")],
           2, "garbage.npy", O)
    if CUDA_CHECK:
        expect(S, "--backend cuda", M + ["--backend", "cuda", "-o", P("out", "a.png")], CUDA_CODE, "cuda", O)
    expect(S, "unwritable output", M + ["-o", os.path.join(nodir, "a.png")], 1, "cannot write", O)

    # --- ditmoe-batch (and pack)
    B = "ditmoe-batch"
    Bo = ["-o", P("out", "run")]
    expect(B, "unknown flag", M + ["--num", "2", "--frobnicate"] + Bo, 2, "unknown flag '--frobnicate'", O)
    expect(B, "bad value", M + ["--num", "two"] + Bo, 2, "--num 'two'", O)
    expect(B, "bad --classes (library check)", M + ["--num", "2", "--classes", "3,,4"] + Bo, 2,
           "--classes '3,,4': empty entry", O)
    expect(B, "missing model", ["--model", P("nope.safetensors"), "--vae", P("v.safetensors"),
                                "--num", "2"] + Bo, 2, "nope.safetensors", O)
    expect(B, "malformed VAE", ["--model", P("m.safetensors"), "--vae", P("garbage.safetensors"),
                                "--num", "2"] + Bo, 2, "garbage.safetensors", O)
    if CUDA_CHECK:
        expect(B, "--backend cuda", M + ["--num", "2", "--backend", "cuda"] + Bo, CUDA_CODE, "cuda", O)
    expect(B, "unwritable output", M + ["--num", "2", "-o", nodir], 1, "cannot create directory", O)
    expect(B, "pack: unknown flag", ["pack", P("out"), P("out", "x.npz"), "--frobnicate"], 2,
           "unknown flag '--frobnicate'", O)
    expect(B, "pack: missing folder", ["pack", P("nowhere"), P("out", "x.npz")], 2, "nowhere", O)
    # pack of a real run into a folder that cannot exist: exit 1
    rc, _, err = run(B, M + ["--num", "2", "-o", P("run")])
    assert rc == 0, err
    expect(B, "pack: unwritable OUT", ["pack", P("run"), os.path.join(nodir, "x.npz"), "-q"], 1,
           "x.npz", O)

    # --- ditmoe-forward
    F = "ditmoe-forward"
    Fi = ["--model", P("m.safetensors"), "--x", P("x.npy"), "--t", P("t.npy"), "--y", P("y.npy"), "-q"]
    Fo = ["--out", P("out", "o.npy")]
    expect(F, "unknown flag", Fi + Fo + ["--frobnicate"], 2, "unknown flag '--frobnicate'", O)
    expect(F, "bad value", Fi + Fo + ["--threads", "-3"], 2, "--threads '-3'", O)
    expect(F, "missing model", ["--model", P("nope.safetensors")] + Fi[2:] + Fo, 2, "nope.safetensors", O)
    expect(F, "malformed model", ["--model", P("garbage.safetensors")] + Fi[2:] + Fo, 2,
           "garbage.safetensors", O)
    expect(F, "malformed --x", Fi[:2] + ["--x", P("garbage.npy")] + Fi[4:] + Fo, 2, "garbage.npy", O)
    expect(F, "missing --y", Fi[:6] + ["--y", P("nope.npy")] + Fo, 2, "nope.npy", O)
    if CUDA_CHECK:
        expect(F, "--backend cuda", Fi + Fo + ["--backend", "cuda"], CUDA_CODE, "cuda", O)
    expect(F, "unwritable --out", Fi + ["--out", os.path.join(nodir, "o.npy")], 1, "o.npy", O)

    # --- ditmoe-vae-decode
    V = "ditmoe-vae-decode"
    Vi = ["--vae", P("v.safetensors"), "--z", P("z.npy"), "-q"]
    Vo = ["--out", P("out", "img.npy")]
    expect(V, "unknown flag", Vi + Vo + ["--frobnicate"], 2, "unknown flag '--frobnicate'", O)
    expect(V, "bad value", Vi + Vo + ["-t", "many"], 2, "-t 'many'", O)
    expect(V, "missing VAE", ["--vae", P("nope.safetensors")] + Vi[2:] + Vo, 2, "nope.safetensors", O)
    expect(V, "malformed VAE", ["--vae", P("garbage.safetensors")] + Vi[2:] + Vo, 2,
           "garbage.safetensors", O)
    expect(V, "malformed --z", Vi[:2] + ["--z", P("garbage.npy"), "-q"] + Vo, 2, "garbage.npy", O)
    if CUDA_CHECK:
        expect(V, "--backend cuda", Vi + Vo + ["--backend", "cuda"], CUDA_CODE, "cuda", O)
    expect(V, "unwritable --out", Vi + ["--out", os.path.join(nodir, "img.npy")], 1, "img.npy", O)
    expect(V, "unwritable --png", Vi + ["--png", os.path.join(nodir, "img")], 1, "img_0.png", O)

    # --- ditmoe-routes (reads dumps, computes no model: no --backend)
    R = "ditmoe-routes"
    Ro = ["-o", P("out", "views"), "-q"]
    expect(R, "unknown flag", Ro + ["--frobnicate", P("d.dmr")], 2, "unknown flag '--frobnicate'", O)
    expect(R, "bad value", Ro + ["--cell", "1", P("d.dmr")], 2, "--cell '1'", O)
    expect(R, "missing dump", Ro + [P("nope.dmr")], 2, "nope.dmr", O)
    expect(R, "malformed dump", Ro + [P("garbage.dmr")], 2, "garbage.dmr", O)
    expect(R, "no --backend", Ro + ["--backend", "cpu", P("d.dmr")], 2, "unknown flag '--backend'", O)
    expect(R, "unwritable output", ["-o", os.path.join(nodir, "views"), "-q", P("d.dmr")], 1,
           "cannot create", O)

    # --- the config-override group (what a .pt cannot tell), shared by every loading program
    for prog, rest in ((S, M + ["-o", P("out", "a.png")]), (B, M + ["--num", "2"] + Bo),
                       (F, Fi + Fo)):
        expect(prog, "bad --router", rest + ["--router", "tanh"], 2, "--router 'tanh'", O)
        expect(prog, "bad --vae-scale", rest + ["--vae-scale", "-1"], 2, "--vae-scale '-1'", O)
        expect(prog, "bad --heads", rest + ["--heads", "four"], 2, "--heads 'four'", O)
        expect(prog, "--promoe-variant on DiT-MoE", rest + ["--promoe-variant", "ec"], 2,
               "--promoe-variant: only for ProMoE", O)

    # --- ditmoe-convert (a random-weight DiT-MoE .pt in the official layout)
    r = subprocess.run([PY, "-c", "import sys, torch; sys.path.insert(0, sys.argv[1]); "
                        "from dit_moe_ref import DiTMoE, randomize_; "
                        "m = DiTMoE(hidden_size=384, depth=1, num_heads=6, num_experts=2, top_k=2, "
                        "attention='timm', patch_size=2, input_size=8, in_channels=4, "
                        "learn_sigma=True, num_classes=10); "
                        "torch.save({'ema': randomize_(m, 0).state_dict()}, sys.argv[2])",
                        os.path.join(SRC, "tests", "ref"), P("m.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    open(P("garbage.pt"), "wb").write(b"PK\x03\x04 this is no zip")
    C = "ditmoe-convert"
    Co = P("out", "c.safetensors")
    expect(C, "unknown flag", [P("m.pt"), Co, "--frobnicate"], 2, "unknown flag '--frobnicate'", O)
    expect(C, "missing value", [P("m.pt"), Co, "--heads"], 2, "--heads", O)
    expect(C, "bad --heads", [P("m.pt"), Co, "--heads", "x"], 2, "--heads 'x'", O)
    expect(C, "bad --dtype", [P("m.pt"), Co, "--dtype", "f8"], 2, "--dtype 'f8'", O)
    expect(C, "bad --sampler", [P("m.pt"), Co, "--sampler", "plms"], 2, "--sampler 'plms'", O)
    expect(C, "bad --cfg-scale", [P("m.pt"), Co, "--cfg-scale", "big"], 2, "--cfg-scale 'big'", O)
    expect(C, "bad --vae-scale", [P("m.pt"), Co, "--vae-scale", "0"], 2, "--vae-scale '0'", O)
    expect(C, "bad --objective", [P("m.pt"), Co, "--objective", "edm"], 2, "--objective 'edm'", O)
    expect(C, "heads not dividing", [P("m.pt"), Co, "--heads", "5"], 2, "m.pt", O)
    expect(C, "one argument", [P("m.pt")], 2, "expected IN.pt OUT.safetensors", O)
    expect(C, "three arguments", [P("m.pt"), Co, P("x")], 2, "expected IN.pt OUT.safetensors", O)
    expect(C, "missing input", [P("nope.pt"), Co], 2, "nope.pt", O)
    expect(C, "malformed input", [P("garbage.pt"), Co], 2, "garbage.pt", O)
    expect(C, "not a checkpoint", [P("garbage.safetensors"), Co], 2, "garbage.safetensors", O)
    expect(C, "unwritable output", [P("m.pt"), os.path.join(nodir, "c.safetensors")], 1,
           "cannot create the output folder", O)
    rc, out, err = run(C, [P("m.pt"), P("out", "new", "deeper", "c.safetensors")])
    check(rc == 0 and os.path.isfile(P("out", "new", "deeper", "c.safetensors"))
          and out.startswith("ditmoe-convert: wrote "),
          f"{C}: missing output folder created: exit {rc} {err.strip()[:200]}")

    # --- help and version, from the tables
    for p in PROGRAMS:
        check_help(p)
    check_help(B, ["pack"])

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

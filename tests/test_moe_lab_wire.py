"""The MoE-lab options wired end to end (issue 14, docs/moe-lab.md §7) on the shipped models:

- `--route top-k` (and top-k=2, and --expert-cache 1, which runs the split MoE path with a cache
  that stores nothing) give the same bytes as no flag (ditmoe-forward outputs, sampled latents);
- a variable number of picks shows in the routing record (slots = the policy's most picks,
  -1 padded) and changes the output;
- --skip-routed uses the normalised time: with Euler 50 the model sees t = 1 .. 0.02, so a rule
  over [0, 0.0199] never fires (same bytes) and one over [0, 0.02] fires on the last step;
- --self-contrast 1 (mode=add) is plain CFG; the weak rows are a third row kind in the dump;
- expert-cache tokens carry DM_TRACE_TOK_CACHED (4) in the dump; results do not depend on the
  batch size (cache keys are image indices) or the thread count;
- PNG metadata, the dump header and ditmoe-batch's manifest carry the canonical strings (a resume
  with another policy is refused);
- every bad value exits 2 with one stderr line naming the flag.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
BUILD = os.environ.get("DITMOE_BUILD") or os.path.dirname(BIN)
os.environ["DITMOE_LIB"] = os.path.join(BUILD, "lib", "libditmoe.so")
if ("libasan" in subprocess.run(["ldd", os.environ["DITMOE_LIB"]], capture_output=True,
                                text=True).stdout
        and "libasan" not in os.environ.get("LD_PRELOAD", "")):
    rt = [subprocess.run(["gcc", "-print-file-name=" + n], capture_output=True,
                         text=True).stdout.strip() for n in ("libasan.so", "libubsan.so")]
    os.environ["LD_PRELOAD"] = ":".join(rt)
    os.environ["ASAN_OPTIONS"] = "detect_leaks=0"
    os.execv(sys.executable, [sys.executable] + sys.argv)
sys.path.insert(0, os.path.join(SRC, "python"))
import ditmoe  # noqa: E402

MODEL = os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors")
PROMOE = os.path.join(SRC, "assets", "promoe-fmnist.safetensors")
T = tempfile.mkdtemp(prefix="ditmoe-lab-")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def run(prog, args):
    p = subprocess.run([os.path.join(BIN, prog)] + args, capture_output=True, text=True)
    return p.returncode, p.stderr


def path(name):
    return os.path.join(T, name)


def sample(name, *flags, model=MODEL, cls="1,4", n=2, batch=4, threads=1, steps=None, extra=()):
    out = path(name + ".npy")
    args = ["--model", model, "--class", cls, "-n", str(n), "--seed", "5", "--batch", str(batch),
            "--threads", str(threads), "-q", "--latent-only", "--save-latent", out]
    if steps:
        args += ["--steps", str(steps)]
    rc, err = run("ditmoe-sample", args + list(extra) + list(flags))
    check(rc == 0, f"ditmoe-sample {' '.join(flags)}: exit {rc} {err.strip()[:200]}")
    return open(out, "rb").read() if rc == 0 else b""


def forward(name, *flags):
    out, routes = path(name + "-out.npy"), path(name + "-routes.npy")
    rc, err = run("ditmoe-forward", ["--model", MODEL, "--x", path("x.npy"), "--t", path("t.npy"),
                                     "--y", path("y.npy"), "--out", out, "--routes", routes, "-q"]
                  + list(flags))
    check(rc == 0, f"ditmoe-forward {' '.join(flags)}: exit {rc} {err.strip()[:200]}")
    if rc:
        return b"", None
    return open(out, "rb").read(), np.load(routes)


def png_text(p):
    data, i, kv = open(p, "rb").read(), 8, {}
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        typ, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        if typ == b"tEXt":
            k, v = body.split(b"\0", 1)
            kv[k.decode()] = v.decode()
        i += 12 + n
    return kv


def test_forward():
    m = ditmoe.Model(MODEL)
    c = m.config
    rs = np.random.RandomState(0)
    np.save(path("x.npy"), rs.randn(4, c.in_channels, c.input_size, c.input_size).astype(np.float32))
    np.save(path("t.npy"), np.array([0.9, 0.5, 0.2, 0.7], np.float32))
    np.save(path("y.npy"), np.array([1, 3, c.num_classes, 7], np.int64))
    m.close()
    base, r0 = forward("plain")
    for f in (["--route", "top-k"], ["--route", "top-k=2"], ["--expert-cache", "1"]):
        o, r = forward("same", *f)
        check(o == base and r is not None and np.array_equal(r, r0),
              f"ditmoe-forward {' '.join(f)}: output and routes == no flag")
    o, r = forward("topp", "--route", "top-p=0.9")
    picks = (r >= 0).sum(-1) if r is not None else None
    check(r is not None and r.shape[-1] == 8 and picks.min() >= 1 and picks.max() > 2 and o != base,
          f"--route top-p=0.9: 8 slots, 1..8 picks per token (mean {picks.mean() if r is not None else 0:.2f}),"
          " output differs")
    # -1 padding after a token's picks, never before
    ok = r is not None and all((row[np.argmax(row < 0):] < 0).all() for row in r.reshape(-1, 8)
                               if (row < 0).any())
    check(ok, "--route top-p=0.9: records are -1 padded after the picks")
    o, r = forward("k1", "--route", "top-k=1")
    check(r is not None and r.shape[-1] == 2 and (r[..., 1] == -1).all() and o != base,
          "--route top-k=1: one pick per token in the model's 2 slots, output differs")
    o1, _ = forward("skipall", "--skip-routed", "all@0-1")
    o2, _ = forward("skipnone", "--skip-routed", "all@0.95-1")  # t in the file: 0.9 at most
    check(o1 != base and o2 == base, "ditmoe-forward --skip-routed: all@0-1 changes the output, "
          "an interval above every t does not")


def test_sample():
    base = sample("base")
    check(sample("topk", "--route", "top-k") == base, "sample --route top-k == no flag")
    check(sample("c1", "--expert-cache", "1") == base, "sample --expert-cache 1 == no cache (bits)")
    check(sample("sc1", "--self-contrast", "1") == base, "sample --self-contrast 1 (add) == CFG")
    check(sample("c2", "--expert-cache", "2") != base, "sample --expert-cache 2 changes the latents")
    check(sample("c1f", "--expert-cache", "1,ffn") == base, "sample --expert-cache 1,ffn == no cache (bits)")
    c2f = sample("c2f", "--expert-cache", "2,ffn")
    check(c2f != base and c2f != sample("c2b", "--expert-cache", "2"),
          "sample --expert-cache 2,ffn differs from no cache and from the routed-only cache")
    # t01: Euler 50 evaluates t = 1, 0.98, ..., 0.02
    check(sample("sk0", "--skip-routed", "all@0-0.0199") == base,
          "--skip-routed all@0-0.0199 never fires (Euler 50: t >= 0.02)")
    check(sample("sk1", "--skip-routed", "all@0-0.02") != base,
          "--skip-routed all@0-0.02 fires on the last step")
    for cache in ("2,refresh=delta:0.05", "3,refresh=route,ffn"):
        lab = ["--route", "top-p=0.6,max=3", "--expert-cache", cache,
               "--self-contrast", "1.5", "--skip-routed", "0@0.9-1"]
        a = sample("inv1", *lab, batch=1)
        b = sample("inv3", *lab, batch=3, threads=2)
        check(a == b and a != base, f"every option together (cache {cache}): batch 1 / 1 thread == "
              "batch 3 / 2 threads")
    sr = sample("scr", "--self-contrast", "2,weak=shared,mode=replace")
    check(sr != base, "--self-contrast 2,weak=shared,mode=replace runs and changes the latents")
    pm = sample("pm0", model=PROMOE, cls="2", n=1, steps=10)
    check(sample("pm1", "--route", "top-k", "--expert-cache", "1", model=PROMOE, cls="2", n=1,
                 steps=10) == pm, "ProMoE: --route top-k --expert-cache 1 == no flag")
    check(sample("pm2", "--route", "rank2=0.5,margin=0.1", model=PROMOE, cls="2", n=1,
                 steps=10) != pm, "ProMoE: --route rank2=0.5,margin=0.1 changes the latents")


def test_dump_and_metadata():
    d = path("r.dmr")
    sample("dump", "--route", "top-p=0.5", "--expert-cache", "3", "--self-contrast", "1.5",
           cls="3", n=2, steps=6, extra=["--dump-routing", d])
    head, recs = ditmoe.read_routes(d)
    smp = head["sampler"]
    check(smp.get("route") == "top-p=0.5" and smp.get("expert_cache", "").startswith("3")
          and smp.get("self_contrast") == "1.5,weak=rank2,mode=add",
          f"dump header: route / expert_cache / self_contrast ({smp.get('route')}, "
          f"{smp.get('expert_cache')}, {smp.get('self_contrast')})")
    r0 = recs[0]
    check(len(recs) == 6 and r0["ids"].shape[-1] == 8 and list(r0["kind"]) == [0, 0, 1, 1, 2, 2],
          f"dump: 6 evals, 8 slots, rows [cond; uncond; weak] kinds {list(r0['kind'])}")
    weak = r0["ids"][:, 4:]
    check(((weak >= 0).sum(-1) == 1).all(), "dump: weak rows (rank2) have exactly one pick")
    flags = [r["token_flags"] for r in recs]
    check(flags[0] is not None and not (flags[0] & 4).any() and (flags[1] & 4).all()
          and not (flags[3] & 4).any(),
          "dump: K=3 -> eval 0 computes, eval 1 reuses every token (flag 4), eval 3 recomputes")
    d2 = path("skip.dmr")
    sample("dumpskip", "--skip-routed", "1,3@0-0.5", cls="3", n=1, steps=6, extra=["--dump-routing", d2])
    _, recs = ditmoe.read_routes(d2)
    ok = len(recs) == 6
    for r in recs:   # Euler 6: t = 1, 5/6, ..., 1/6; layers 1, 3 flagged 8 where t <= 0.5
        f = r["token_flags"]
        on = r["t"][0] <= 0.5
        ok = ok and f is not None and ((f[[1, 3]] == 8).all() if on else not f[[1, 3]].any()) \
            and not f[[0, 2]].any()
    check(ok, "dump: --skip-routed 1,3@0-0.5 flags layers 1 and 3 with 8 where t <= 0.5")
    # PNG metadata
    o = path("meta.png")
    rc, err = run("ditmoe-sample", ["--model", MODEL, "--class", "2", "--steps", "3", "--seed", "1",
                                    "-q", "-o", o, "--route", "threshold=0.2,max=3",
                                    "--expert-cache", "2", "--skip-routed", "1@0-0.5",
                                    "--self-contrast", "1.5,weak=top1"])
    kv = png_text(o) if rc == 0 else {}
    check(kv.get("route") == "threshold=0.2,max=3" and kv.get("expert-cache", "").startswith("2")
          and kv.get("skip-routed") == "1@0-0.5" and kv.get("self-contrast") == "1.5,weak=top1,mode=add",
          f"PNG tEXt: route / expert-cache / skip-routed / self-contrast ({kv.get('route')}, "
          f"{kv.get('expert-cache')}, {kv.get('skip-routed')}, {kv.get('self-contrast')})")
    o2 = path("plain.png")
    rc, _ = run("ditmoe-sample", ["--model", MODEL, "--class", "2", "--steps", "3", "-q", "-o", o2])
    kv = png_text(o2) if rc == 0 else {}
    check(kv.get("route") == "top-k" and "expert-cache" not in kv, "PNG tEXt: route=top-k by default")


def test_batch_manifest():
    d = path("batch")
    base = ["--model", MODEL, "-n", "2", "--steps", "3", "--batch", "2", "-q", "-o", d]
    rc, err = run("ditmoe-batch", base + ["--route", "top-p=0.5"])
    check(rc == 0, f"ditmoe-batch --route top-p=0.5: exit {rc} {err.strip()[:160]}")
    man = json.load(open(os.path.join(d, "manifest.json"))) if rc == 0 else {}
    eng = man.get("params", {}).get("engine", "")
    check("route=top-p=0.5" in eng, f"manifest params.engine carries the policy ({eng[-60:]})")
    rc, err = run("ditmoe-batch", base)
    check(rc == 2 and "engine" in err, f"resume without --route is refused: exit {rc} {err.strip()[:160]}")
    rc, err = run("ditmoe-batch", base + ["--route", "top-p=0.5"])
    check(rc == 0, f"resume with the same policy: exit {rc}")


def test_python():
    with ditmoe.Pipeline(route="top-p=0.5,max=3", expert_cache="2", threads=1) as pl:
        a = pl.generate([3, 8], n=2, steps=6, seed=5, batch=4, self_contrast="1.5")
        b, recs = pl.generate([3, 8], n=2, steps=6, seed=5, batch=1, self_contrast="1.5",
                              routing=True)
    with ditmoe.Pipeline(threads=1) as pl:
        c = pl.generate([3, 8], n=2, steps=6, seed=5, batch=4)
    check(np.array_equal(a, b) and not np.array_equal(a, c),
          "Python Pipeline(route, expert_cache) + generate(self_contrast): batch 4 == batch 1, "
          "differs from the defaults")
    check(recs[0]["ids"].shape[-1] == 3 and list(recs[0]["kind"]) == [0, 1, 2],
          "Python routing record: 3 slots (max=3), rows cond / uncond / weak")
    m = ditmoe.Model(MODEL, route="top-p=0.9")
    cfg = m.config
    x = np.random.RandomState(1).randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    out, (ids, w) = m.forward(x.astype(np.float32), np.array([0.5, 0.9], np.float32),
                              np.array([1, 2]), routes=True)
    m.close()
    check(ids.shape[-1] == 8 and (ids >= 0).sum(-1).max() > 2, "Python Model(route=top-p=0.9): 8 slots")
    try:
        ditmoe.Model(MODEL, route="top-p=2")
        check(False, "Python Model(route=top-p=2) raises")
    except ditmoe.Error as e:
        check("--route" in str(e), f"Python Model(route=top-p=2) raises: {e}")


def expect(prog, args, pattern):
    rc, err = run(prog, args)
    lines = [l for l in err.splitlines() if l.strip()]
    check(rc == 2 and len(lines) == 1 and lines[0].startswith(prog + ": ")
          and re.search(pattern, lines[0]) is not None,
          f"{prog} {' '.join(args[-2:])}: exit {rc} (want 2): {err.strip()[:200]}")


def test_bad_values():
    o = path("bad")
    os.makedirs(o, exist_ok=True)
    common = {
        "ditmoe-sample": ["--model", MODEL, "--steps", "2", "-q", "-o", os.path.join(o, "s.png")],
        "ditmoe-batch": ["--model", MODEL, "-n", "1", "--steps", "2", "-q", "-o", os.path.join(o, "b")],
        "ditmoe-forward": ["--model", MODEL, "--x", path("x.npy"), "--t", path("t.npy"), "--y",
                           path("y.npy"), "--out", os.path.join(o, "o.npy")],
    }
    bad = [(["--route", "top-p=1.5"], "--route"), (["--route", "top-p=0"], "--route"),
           (["--route", "nearest"], "--route"), (["--route", "top-k=0"], "--route"),
           (["--route", "top-k=9"], "--route"), (["--route", "threshold=0.2,max=0"], "--route"),
           (["--route", "rank2=0.5"], "--route"),
           (["--expert-cache", "0"], "--expert-cache"), (["--expert-cache", "2,refresh=soon"], "--expert-cache"),
           (["--expert-cache", "x"], "--expert-cache"),
           (["--skip-routed", "4@0-1"], "--skip-routed"), (["--skip-routed", "1@0.5-0.2"], "--skip-routed"),
           (["--skip-routed", "1"], "--skip-routed")]
    for prog, pre in common.items():
        for args, pat in bad:
            expect(prog, pre + args, pat)
    for prog in ("ditmoe-sample", "ditmoe-batch"):
        for args in (["--self-contrast", "0"], ["--self-contrast", "1.5,weak=rank9"],
                     ["--self-contrast", "1.5,mode=both"]):
            expect(prog, common[prog] + args, "--self-contrast")
    expect("ditmoe-forward", common["ditmoe-forward"] + ["--self-contrast", "1.5"], "--self-contrast")
    expect("ditmoe-sample", ["--model", PROMOE, "--steps", "2", "-q", "-o", os.path.join(o, "p.png"),
                             "--route", "top-p=0.5"], "--route")
    expect("ditmoe-sample", ["--model", PROMOE, "--promoe-variant", "ec", "--steps", "2", "-q", "-o",
                             os.path.join(o, "p.png"), "--expert-cache", "2"], "expert-choice")
    check(not os.listdir(o) or os.listdir(o) == [], f"bad values leave nothing behind ({os.listdir(o)})")


if __name__ == "__main__":
    try:
        test_forward()
        test_sample()
        test_dump_and_metadata()
        test_batch_manifest()
        test_python()
        test_bad_values()
    finally:
        shutil.rmtree(T, ignore_errors=True)
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)

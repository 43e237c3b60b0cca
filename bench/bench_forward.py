#!/usr/bin/python3
"""Forward-pass benchmark: ditmoe-forward (C) vs the PyTorch reference (tests/ref/dit_moe_ref.py)
on a random model shaped like DiT-MoE-S/2-8E2A (D 384, depth 12, 6 heads, 8 experts, top-2,
32x32x4 latent, 1000 classes, timm attention).

    /usr/bin/python3 bench/bench_forward.py [--bin DIR] [--batches 2,16] [--runs 3] [--threads 2]

The converted model is cached under build/bench/. PyTorch: torch.set_num_threads(threads), eval,
no_grad, one warm-up then the median of --runs forwards. C: `ditmoe-forward --bench N --threads T`
(one warm-up, median of N, model load excluded), parsed from its `forward_ms_median=` line.
Also prints max|C - reference| / RMS(reference) for each batch as a sanity check.

Rows (issue 13): PyTorch fp32, PyTorch bf16 autocast (torch.autocast("cpu", bfloat16): the fair
anchor for a bf16 path), ditmoe f32, bf16, bf16 + int8 experts, bf16 + int4 experts; each with the
max error vs the fp32 reference (/ its RMS) and the peak RSS (C: of the ditmoe-forward process,
from /usr/bin/time -f %M; PyTorch: this process' peak so far, model included). For the C rows
also the max error over the tokens whose chosen experts equal ditmoe f32's in every layer, and how
many tokens changed experts somewhere (`--routes` of each run): a near tie of the gate scores
flips under any rounding change, and such a token's output moves by a discrete step that says
nothing about the arithmetic's error.
"""
import resource
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tools"))
import convert_checkpoint  # noqa: E402
import safetensors_io  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402

CFG = dict(hidden_size=384, depth=12, num_heads=6, num_experts=8, top_k=2, attention="timm",
           patch_size=2, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)


def get_model(cache_dir):
    path = os.path.join(cache_dir, "dit_moe_s2_8e2a_random_seed0.safetensors")
    model = DiTMoE(**CFG).eval()
    if os.path.exists(path):
        tensors, _ = safetensors_io.read(path)
        model.load_state_dict(tensors, strict=True)
        print(f"[bench] model: cached {path}", file=sys.stderr)
    else:
        os.makedirs(cache_dir, exist_ok=True)
        randomize_(model, seed=0)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            pt = os.path.join(tmp, "model.pt")
            torch.save({"ema": model.state_dict()}, pt)
            rc = convert_checkpoint.main([pt, path, "--name", "random S/2-8E2A (bench)"])
            if rc != 0:
                sys.exit("bench_forward: conversion failed")
        print(f"[bench] model: converted to {path}", file=sys.stderr)
    return model, path


def inputs(B, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randint(0, 1000, (B,), generator=g)
    y[1::2] = 1000                                       # half the batch unconditional (CFG-like)
    return x, t, y


def time_reference(model, x, t, y, runs, bf16=False):
    import contextlib
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = model(x, t, y)                             # warm-up
        ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x, t, y)
            ms.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ms), out.float().numpy()


def time_c(binary, model_path, x, t, y, runs, threads, tmp, extra=()):
    paths = [os.path.join(tmp, n) for n in ("x.npy", "t.npy", "y.npy", "out.npy", "routes.npy")]
    np.save(paths[0], x.numpy())
    np.save(paths[1], t.numpy())
    np.save(paths[2], y.numpy())
    cmd = [binary, "--model", model_path, "--x", paths[0], "--t", paths[1], "--y", paths[2],
           "--out", paths[3], "--routes", paths[4], "--bench", str(runs), "--threads", str(threads),
           *extra]
    rss_file = os.path.join(tmp, "rss")
    # /usr/bin/time -f %M: the child's own peak (a fork of this process would report ours)
    pr = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd], capture_output=True,
                        text=True)
    out, err = pr.stdout, pr.stderr
    if pr.returncode != 0:
        sys.exit(f"bench_forward: ditmoe-forward {' '.join(extra)} failed: {err.strip()}")
    m = re.search(r"forward_ms_median=([0-9.eE+-]+)", out)
    if not m:
        sys.exit(f"bench_forward: no forward_ms_median= line in ditmoe-forward output: {out!r}")
    with open(rss_file) as f:
        rss = float(f.read().split()[-1]) / 1024.0
    return float(m.group(1)), np.load(paths[3]), rss, np.load(paths[4])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin"),
                    help="directory holding ditmoe-forward (default $DITMOE_BIN or build/bin)")
    ap.add_argument("--cache-dir", default=os.path.join(SRC, "build", "bench"))
    ap.add_argument("--batches", default="2,16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ref", action="store_true", help="time only the C engine")
    a = ap.parse_args()
    binary = os.path.join(a.bin, "ditmoe-forward")
    if not os.access(binary, os.X_OK):
        sys.exit(f"bench_forward: {binary}: not found (build first or pass --bin)")
    torch.set_num_threads(a.threads)
    model, path = get_model(a.cache_dir)

    modes = [("ditmoe f32", []), ("ditmoe bf16", ["--precision", "bf16"]),
             ("ditmoe bf16+int8", ["--precision", "bf16", "--quant-experts", "int8"]),
             ("ditmoe bf16+int4", ["--precision", "bf16", "--quant-experts", "int4"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ditmoe-bench-") as tmp:
        for B in [int(b) for b in a.batches.split(",")]:
            x, t, y = inputs(B, seed=B)
            ref_ms = ref_out = None
            if not a.skip_ref:
                ref_ms, ref_out = time_reference(model, x, t, y, a.runs)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
                rows.append((B, "PyTorch fp32", ref_ms, 0.0, rss, None, None))
                bf_ms, bf_out = time_reference(model, x, t, y, a.runs, bf16=True)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
                rows.append((B, "PyTorch bf16 autocast", bf_ms, err_rel(bf_out, ref_out), rss, None,
                             None))
            f32_routes = None
            for name, extra in modes:
                c_ms, c_out, rss, routes = time_c(binary, path, x, t, y, a.runs, a.threads, tmp, extra)
                if f32_routes is None:
                    f32_routes = routes
                stable = stable_tokens(routes, f32_routes, B)
                rows.append((B, name, c_ms, err_rel(c_out, ref_out) if ref_out is not None else None, rss,
                             err_rel(c_out, ref_out, stable) if ref_out is not None else None,
                             int(stable.size - stable.sum())))
                print(f"[bench] batch {B}: {name} {c_ms:.1f} ms", file=sys.stderr)

    print(f"DiT-MoE-S/2-8E2A-shaped random model, 32x32x4 latent, threads={a.threads}, "
          f"median of {a.runs} after 1 warm-up")
    print(f"{'batch':>5} | {'engine':<22} | {'ms':>9} | {'vs torch fp32':>13} | {'ms/img':>7} | "
          f"{'max|diff|/RMS':>13} | {'peak RSS MiB':>12} | {'same-routing max':>16} | flipped")
    ref = {}
    for r in rows:
        if r is None:
            continue
        B, name, ms, rel, rss, rel_stable, flipped = r
        if name == "PyTorch fp32":
            ref[B] = ms
        sp = f"{ref[B] / ms:12.2f}x" if B in ref else f"{'-':>13}"
        es = f"{rel:13.2e}" if rel is not None else f"{'-':>13}"
        ss = f"{rel_stable:16.2e}" if rel_stable is not None else f"{'-':>16}"
        fs = f"{flipped:7d}" if flipped is not None else f"{'-':>7}"
        print(f"{B:5d} | {name:<22} | {ms:9.1f} | {sp} | {ms / B:7.1f} | {es} | {rss:12.0f} | {ss} | {fs}")
    print("same-routing max: max|diff|/RMS over the output pixels of tokens whose chosen experts equal "
          "ditmoe f32's in every layer; flipped: tokens where some layer chose another set (near ties "
          "of the f32 gate scores: a discrete change, not rounding error)")


def err_rel(out, ref, stable=None):
    """max|out - ref| / RMS(ref); with a token mask [B, T], the max over those tokens' pixels."""
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    d = np.abs(out.astype(np.float64) - ref)
    if stable is not None:
        B, C, H, W = d.shape
        p = 2                                            # patch size: token (i, j) -> 2x2 pixels
        mask = stable.reshape(B, H // p, W // p).repeat(p, axis=1).repeat(p, axis=2)
        d = d * mask[:, None, :, :]
    return float(d.max()) / rms


def stable_tokens(routes, base, B):
    """[B, T] bool: the token's expert set equals base's in every layer (routes [L, B*T, k])."""
    same = (np.sort(routes, axis=2) == np.sort(base, axis=2)).all(axis=2).all(axis=0)
    return same.reshape(B, -1)


if __name__ == "__main__":
    main()

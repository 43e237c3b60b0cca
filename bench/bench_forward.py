#!/usr/bin/python3
"""Forward-pass benchmark: ditmoe-forward (C) vs the PyTorch reference (tests/ref/dit_moe_ref.py)
on a random model shaped like DiT-MoE-S/2-8E2A (D 384, depth 12, 6 heads, 8 experts, top-2,
32x32x4 latent, 1000 classes, timm attention).

    /usr/bin/python3 bench/bench_forward.py [--bin DIR] [--batches 2,16] [--runs 3] [--threads 2]

The converted model is cached under build/bench/. PyTorch: torch.set_num_threads(threads), eval,
no_grad, one warm-up then the median of --runs forwards. C: `ditmoe-forward --bench N --threads T`
(one warm-up, median of N, model load excluded), parsed from its `forward_ms_median=` line.
Also prints max|C - reference| / RMS(reference) for each batch as a sanity check.
"""
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


def time_reference(model, x, t, y, runs):
    with torch.no_grad():
        out = model(x, t, y)                             # warm-up
        ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x, t, y)
            ms.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ms), out.numpy()


def time_c(binary, model_path, x, t, y, runs, threads, tmp):
    paths = [os.path.join(tmp, n) for n in ("x.npy", "t.npy", "y.npy", "out.npy")]
    np.save(paths[0], x.numpy())
    np.save(paths[1], t.numpy())
    np.save(paths[2], y.numpy())
    cmd = [binary, "--model", model_path, "--x", paths[0], "--t", paths[1], "--y", paths[2],
           "--out", paths[3], "--bench", str(runs), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_forward: ditmoe-forward failed: {r.stderr.strip()}")
    m = re.search(r"forward_ms_median=([0-9.eE+-]+)", r.stdout)
    if not m:
        sys.exit(f"bench_forward: no forward_ms_median= line in ditmoe-forward output: {r.stdout!r}")
    return float(m.group(1)), np.load(paths[3])


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

    rows = []
    with tempfile.TemporaryDirectory(prefix="ditmoe-bench-") as tmp:
        for B in [int(b) for b in a.batches.split(",")]:
            x, t, y = inputs(B, seed=B)
            c_ms, c_out = time_c(binary, path, x, t, y, a.runs, a.threads, tmp)
            if a.skip_ref:
                rows.append((B, None, c_ms, None, None))
                continue
            ref_ms, ref_out = time_reference(model, x, t, y, a.runs)
            rms = float(np.sqrt(np.mean(ref_out.astype(np.float64) ** 2)))
            rel = float(np.abs(c_out.astype(np.float64) - ref_out).max()) / rms
            rows.append((B, ref_ms, c_ms, ref_ms / c_ms, rel))
            print(f"[bench] batch {B}: torch {ref_ms:.1f} ms, C {c_ms:.1f} ms", file=sys.stderr)

    print(f"DiT-MoE-S/2-8E2A-shaped random model, 32x32x4 latent, threads={a.threads}, "
          f"median of {a.runs} after 1 warm-up")
    print(f"{'batch':>5} | {'PyTorch ref ms':>14} | {'ditmoe C ms':>11} | {'speed-up':>8} | "
          f"{'ms/img C':>8} | {'max|diff|/RMS':>13}")
    for B, r, c, ratio, rel in rows:
        rs = f"{r:14.1f}" if r is not None else f"{'-':>14}"
        qs = f"{ratio:7.2f}x" if ratio is not None else f"{'-':>8}"
        es = f"{rel:13.2e}" if rel is not None else f"{'-':>13}"
        print(f"{B:5d} | {rs} | {c:11.1f} | {qs} | {c / B:8.1f} | {es}")


if __name__ == "__main__":
    main()

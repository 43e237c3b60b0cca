"""Benchmark: VAE decode, C (ditmoe-vae-decode) vs the PyTorch reference decoder (tests/ref/vae_ref.py)
on the same machine in the same run, same thread count, same latents.

    /usr/bin/python3 bench/bench_vae.py                       # SD config, random weights, 1 x 32x32x4
    /usr/bin/python3 bench/bench_vae.py --vae assets/vae-fmnist.safetensors --batch 64
    options: --bin build/bin  --threads 2  --reps 5  --size N (latent side)  --batch B

Runs alternate (C, PyTorch, PyTorch, C, C, PyTorch, ...) so both see the same machine load; each
rep is one decode of the whole batch. Prints, for both: median and best wall time and process CPU
time (user + sys over all threads: the steadier figure on a shared machine) of the decode alone
(the C tool's own "decoded in" line, which excludes loading; PyTorch around dec.decode), the peak
RSS (the C process alone, via /usr/bin/time; for PyTorch the whole Python process), the ratios
PyTorch / C of medians and of bests, and max|C - PyTorch| / RMS(PyTorch) of the last run."""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import vae_ref as V  # noqa: E402


def load_reference(path):
    """Decoder + scale from a safetensors file with the "ditmoe.vae" metadata (shipped VAE)."""
    sd, meta = V.read_safetensors(path)
    m = json.loads(meta.get("ditmoe.vae", "{}"))
    keys = ("ch", "ch_mult", "num_res_blocks", "z_channels", "out_ch", "norm_groups", "mid_attention")
    if not all(k in m for k in keys[:5]):
        sys.exit(f"{path}: no config in the ditmoe.vae metadata; only files that carry one "
                 "(e.g. assets/vae-fmnist.safetensors) can be benchmarked against PyTorch here")
    cfg = V.VAEConfig(**{k: (tuple(m[k]) if k == "ch_mult" else m[k]) for k in keys if k in m})
    dec = V.Decoder(cfg)
    dec.load_state_dict({k: v for k, v in sd.items()
                         if k.startswith("decoder.") or k.startswith("post_quant_conv.")})
    return dec.eval(), float(m.get("scaling_factor", V.SD_SCALE)), m.get("image_size")


def run_c(argv):
    """(wall, cpu, peak RSS MiB) of one ditmoe-vae-decode run (its own timing line). The peak RSS
    comes from /usr/bin/time: a child forked from this Python process would report at least this
    process's RSS (Linux keeps the high-water mark across exec); NaN without /usr/bin/time."""
    with tempfile.TemporaryFile("w+") as errf, tempfile.NamedTemporaryFile("r") as rssf:
        timer = ["/usr/bin/time", "-f", "%M", "-o", rssf.name] if os.path.exists("/usr/bin/time") else []
        p = subprocess.run(timer + argv, stdout=subprocess.DEVNULL, stderr=errf)
        errf.seek(0)
        err = errf.read()
        rss = rssf.read().strip()
    if p.returncode != 0:
        sys.exit(f"ditmoe-vae-decode failed ({p.returncode}):\n{err}")
    m = re.search(r"decoded in ([0-9.]+) s .*cpu ([0-9.]+) s", err)
    return float(m.group(1)), float(m.group(2)), float(rss.splitlines()[-1]) / 1024 if rss else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(SRC, "build", "bin"))
    ap.add_argument("--vae", default=None, help="safetensors with ditmoe.vae metadata; default: "
                    "the SD config with random weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=None, help="latent side (SD default 32 -> 256 px)")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.vae:
        dec, scale, img_size = load_reference(a.vae)
        size = a.size or (img_size // dec.cfg.factor if img_size else 8)
        name = os.path.basename(a.vae)
    else:
        dec, scale = V.randomize_(V.Decoder(V.SD_CONFIG), seed=0).eval(), V.SD_SCALE
        size = a.size or 32
        name = "SD VAE (random weights)"
    cfg = dec.cfg
    z = torch.randn(a.batch, cfg.z_channels, size, size,
                    generator=torch.Generator().manual_seed(0)) * scale
    with tempfile.TemporaryDirectory() as tmp:
        zp, op = os.path.join(tmp, "z.npy"), os.path.join(tmp, "img.npy")
        vp = a.vae
        if not vp:
            vp = os.path.join(tmp, "vae.safetensors")
            V.write_safetensors(vp, dec.state_dict())
        np.save(zp, z.numpy())
        argv = [os.path.join(a.bin, "ditmoe-vae-decode"), "--vae", vp, "--z", zp, "--out", op,
                "--threads", str(a.threads)]
        with torch.no_grad():  # warm-up of both (first-touch, oneDNN primitive creation)
            dec.decode(z[:1], scale)
        run_c(argv)
        c_wall, c_cpu, c_rss, t_wall, t_cpu = [], [], [], [], []
        ref = None
        for r in range(a.reps):
            order = ("c", "t") if r % 2 == 0 else ("t", "c")  # ABBA: drift hits both alike
            for who in order:
                if who == "c":
                    w, c, rss = run_c(argv)
                    c_wall.append(w), c_cpu.append(c), c_rss.append(rss)
                else:
                    with torch.no_grad():
                        t0, c0 = time.perf_counter(), time.process_time()
                        ref = dec.decode(z, scale)
                        t_wall.append(time.perf_counter() - t0)
                        t_cpu.append(time.process_time() - c0)
        img_c = np.load(op)
    ref = ref.numpy()
    rel = float(np.max(np.abs(img_c - ref)) / np.sqrt(np.mean(ref ** 2)))
    py_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    f = cfg.factor
    print(f"{name}: decode {a.batch} x {cfg.z_channels}x{size}x{size} -> {cfg.out_ch}x{f * size}x"
          f"{f * size}, {a.threads} threads, {a.reps} alternating runs each; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  ditmoe (C, Winograd + own GEMM): wall median {med(c_wall):.3f} best {min(c_wall):.3f} s, "
          f"cpu median {med(c_cpu):.3f} best {min(c_cpu):.3f} s, peak RSS {max(c_rss):.0f} MiB")
    print(f"     wall: {fmt(c_wall)}   cpu: {fmt(c_cpu)}")
    print(f"  PyTorch {torch.__version__}: wall median {med(t_wall):.3f} best {min(t_wall):.3f} s, "
          f"cpu median {med(t_cpu):.3f} best {min(t_cpu):.3f} s, peak RSS {py_rss:.0f} MiB (python)")
    print(f"     wall: {fmt(t_wall)}   cpu: {fmt(t_cpu)}")
    print(f"  ratio PyTorch/C: wall median {med(t_wall) / med(c_wall):.2f}x best "
          f"{min(t_wall) / min(c_wall):.2f}x; cpu median {med(t_cpu) / med(c_cpu):.2f}x best "
          f"{min(t_cpu) / min(c_cpu):.2f}x   max|diff|/RMS(ref): {rel:.2e}")


if __name__ == "__main__":
    main()

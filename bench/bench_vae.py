"""Benchmark: SD KL-f8 VAE decode of one 32x32x4 latent (256x256 image), standard config with
random weights, C (ditmoe-vae-decode) vs the PyTorch reference decoder, same thread count.
Usage: /usr/bin/python3 bench/bench_vae.py [--bin build/bin] [--threads 2] [--reps 3] [--size 32]
Prints seconds per image (best of reps) for both and the ratio; also checks they agree."""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import vae_ref as V  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(SRC, "build", "bin"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="latent side (32 -> 256 px)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dec = V.randomize_(V.Decoder(V.SD_CONFIG), seed=0).eval()
    z = torch.randn(1, 4, a.size, a.size, generator=torch.Generator().manual_seed(0)) * 0.18215
    with tempfile.TemporaryDirectory() as tmp:
        vp, zp, op = (os.path.join(tmp, n) for n in ("vae.safetensors", "z.npy", "img.npy"))
        V.write_safetensors(vp, dec.state_dict())
        np.save(zp, z.numpy())
        # Interleaved runs (C, PyTorch, C, PyTorch, ...) so both see the same machine load.
        # Wall time and process CPU time (all threads) of the decode call alone.
        c_wall, c_cpu, t_wall, t_cpu = [], [], [], []
        for _ in range(a.reps):
            p = subprocess.run([os.path.join(a.bin, "ditmoe-vae-decode"), "--vae", vp, "--z", zp,
                                "--out", op, "--threads", str(a.threads)],
                               capture_output=True, text=True, check=True)
            m = re.search(r"decoded in ([0-9.]+) s .*cpu ([0-9.]+) s", p.stderr)
            c_wall.append(float(m.group(1)))
            c_cpu.append(float(m.group(2)))
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                ref = dec.decode(z, V.SD_SCALE)
                t_wall.append(time.perf_counter() - t0)
                t_cpu.append(time.process_time() - c0)
        img_c = np.load(op)
    ref = ref.numpy()
    rel = float(np.max(np.abs(img_c - ref)) / np.sqrt(np.mean(ref ** 2)))
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"SD VAE decode {a.size}x{a.size}x4 -> {8 * a.size}x{8 * a.size}x3, {a.threads} threads, "
          f"{a.reps} interleaved runs; load average {os.getloadavg()[0]:.1f}")
    print(f"  ditmoe (C, Winograd + own GEMM): best wall {min(c_wall):.2f} s, best cpu {min(c_cpu):.2f} s"
          f"   (wall: {fmt(c_wall)}; cpu: {fmt(c_cpu)})")
    print(f"  PyTorch {torch.__version__}:           best wall {min(t_wall):.2f} s, best cpu "
          f"{min(t_cpu):.2f} s   (wall: {fmt(t_wall)}; cpu: {fmt(t_cpu)})")
    print(f"  ratio PyTorch/C: wall {min(t_wall) / min(c_wall):.2f}x, cpu "
          f"{min(t_cpu) / min(c_cpu):.2f}x   max|diff|/RMS(ref): {rel:.2e}")


if __name__ == "__main__":
    main()

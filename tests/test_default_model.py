#!/usr/bin/env python3
"""The C engine reproduces the PyTorch sampler on the shipped default model.

Same initial noise z [N,4,8,8] (written as .npy), class 7 ("sneaker") and class 0, 10 RF Euler
steps with classifier-free guidance: ditmoe-sample --init-noise z.npy --save-latent out.npy
against tools/train/rf_sampler.py on tests/ref/dit_moe_ref.py loaded from the same
assets/ditmoe-fmnist.safetensors. The decoded PNGs are compared with tests/ref/vae_ref.py on
assets/vae-fmnist.safetensors.

Tolerances (float32 both sides, same stored weights):
  latents: max |c - ref| <= 1e-3 * RMS(ref)
  images:  max |c - ref| <= 2 grey levels (of 255) on the 28x28 content (rounding of values
           that land near .5 plus float noise)
Skips (exit 0, prints SKIP) only when the binary or the assets are missing.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
sys.path.insert(0, os.path.join(SRC, "tools", "eval"))
import shipped  # noqa: E402

DIT = os.environ.get("DITMOE_TEST_DIT", os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors"))
VAE = os.environ.get("DITMOE_TEST_VAE", os.path.join(SRC, "assets", "vae-fmnist.safetensors"))
EXE = os.path.join(BIN, "ditmoe-sample")
STEPS, CFG, SEED = 10, 3.0, 20240607
LAT_TOL = 1e-3      # times RMS of the reference latents
PIX_TOL = 2         # grey levels


def read_png_gray(path):
    import matplotlib.image as mpimg
    a = mpimg.imread(path)
    if a.ndim == 3:
        a = a[..., :3].mean(-1)
    return np.round(a * 255.0)


def run_case(tmp, cls, n):
    torch.manual_seed(0)
    dit, cfg = shipped.load_dit(DIT)
    vae, vm = shipped.load_vae(VAE)
    noise = shipped.initial_noise(n, cfg, SEED + cls)                       # [n,4,8,8]
    zpath = os.path.join(tmp, f"z{cls}.npy")
    lpath = os.path.join(tmp, f"lat{cls}.npy")
    ppat = os.path.join(tmp, f"img{cls}-%d.png")
    np.save(zpath, noise.numpy().astype(np.float32))
    cmd = [EXE, "--model", DIT, "--vae", VAE, "--init-noise", zpath, "--save-latent", lpath,
           "--steps", str(STEPS), "--sampler", "euler", "--cfg-scale", str(CFG),
           "--class", str(cls), "-n", str(n), "--seed", "1", "-o", ppat, "--threads", "2", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        print("FAIL:", " ".join(cmd), "\n", r.stdout, r.stderr)
        return False
    c_lat = np.load(lpath).astype(np.float64)
    ref = shipped.sample_latents(dit, cfg, [cls] * n, noise=noise, steps=STEPS,
                                 cfg_scale=CFG).double().numpy()
    if c_lat.shape != ref.shape:
        print(f"FAIL: latent shape {c_lat.shape} expected {ref.shape}")
        return False
    rms = float(np.sqrt((ref ** 2).mean()))
    err = float(np.abs(c_lat - ref).max())
    ok = err <= LAT_TOL * rms
    print(f"class {cls}: latents max|diff| {err:.3e}, RMS(ref) {rms:.3f}, "
          f"tol {LAT_TOL * rms:.3e} -> {'ok' if ok else 'FAIL'}")
    ref_img = shipped.decode(vae, vm, torch.from_numpy(ref).float()).astype(np.float64)  # [n,28,28]
    for i in range(n):
        path = ppat % i
        if not os.path.exists(path):
            cands = sorted(f for f in os.listdir(tmp) if f.startswith(f"img{cls}-"))
            print(f"FAIL: {path} not written (found {cands})")
            return False
        img = read_png_gray(path)
        if img.shape == (32, 32):
            img = img[2:30, 2:30]
        if img.shape != (28, 28):
            print(f"FAIL: {path}: image {img.shape}, expected 32x32 (or 28x28)")
            return False
        perr = float(np.abs(img - ref_img[i]).max())
        pok = perr <= PIX_TOL
        print(f"class {cls} image {i}: max|diff| {perr:.0f} grey levels (tol {PIX_TOL}) -> "
              f"{'ok' if pok else 'FAIL'}")
        ok = ok and pok
    return ok


def main():
    missing = [p for p in (EXE, DIT, VAE) if not os.path.exists(p)]
    if missing:
        print("SKIP: missing", ", ".join(missing))
        return 0
    torch.set_num_threads(1)
    ok = True
    with tempfile.TemporaryDirectory(prefix="ditmoe-default-") as tmp:
        for cls, n in ((7, 2), (0, 1)):
            ok = run_case(tmp, cls, n) and ok
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

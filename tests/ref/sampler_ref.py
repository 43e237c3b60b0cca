"""PyTorch reference samplers for ditmoe, written from docs/spec/vae_samplers.md B.1-B.5
and ditmoe.md 4-5 (no code copied from DiT / DiT-MoE). Used by tests/test_sampler_parity.py
against build/bin/ditmoe-sample.

Contents
    philox4x32(ctr, key)           Philox4x32-10 on numpy uint32 arrays (Salmon et al. 2011)
    noise(seed, index, stream, n)  the engine's noise: Philox counter {j, stream, idx lo, idx hi},
                                   key {seed lo, seed hi}, Box-Muller in float64 -> float32
    ddpm_tables(T, steps)          DiT's space_timesteps + respaced float64 tables (B.1)
    sample(model, ...)             ddpm | ddim | euler | heun loops, float32 state:
        ddpm/ddim: DiT's doubled-batch state and forward_with_cfg (guidance on cfg_channels);
        euler/heun: DiT-MoE RF (t = 1 noise, v = noise - data), guidance from two separate
        passes (cond, uncond) as rectified_flow.py does.
    Guidance interval: t fraction in [0,1], 1 = noise (ddpm/ddim: timestep / (T-1)).
Command line (test assets):
    sampler_ref.py model OUT.safetensors --objective ddpm|rf [--seed S] [--classes a,b,...]
    sampler_ref.py vae OUT.safetensors [--out-ch 1|3] [--z 4]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(SRC, "tools"))

# ----------------------------------------------------------------------------------- noise
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)


def philox4x32(ctr, key):
    """ctr: 4 uint32 arrays (broadcastable), key: 2 python ints -> 4 uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) for x in ctr]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0 = np.uint64(M0) * c[0]
        p1 = np.uint64(M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return [x.astype(np.uint32) for x in c]


def noise(seed, index, stream, n):
    nb = (n + 3) // 4
    j = np.arange(nb, dtype=np.uint64)
    w = philox4x32([j, np.uint64(stream), np.uint64(index & 0xFFFFFFFF),
                    np.uint64(index >> 32)], (seed & 0xFFFFFFFF, seed >> 32))
    u = [(x.astype(np.float64) + 0.5) / 4294967296.0 for x in w]
    out = np.empty((nb, 4), dtype=np.float64)
    for a in (0, 2):
        r = np.sqrt(-2.0 * np.log(u[a]))
        th = 2.0 * np.pi * u[a + 1]
        out[:, a], out[:, a + 1] = r * np.cos(th), r * np.sin(th)
    return out.reshape(-1)[:n].astype(np.float32)


def noise_batch(seed, indices, stream, shape):
    n = int(np.prod(shape))
    return torch.from_numpy(np.stack([noise(seed, int(i), stream, n).reshape(shape)
                                      for i in indices]))


# ----------------------------------------------------------------------------------- DDPM tables
def space_timesteps(T, count):
    stride = 1.0 if count <= 1 else (T - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))          # Python round: half to even
        cur += stride
    return sorted(set(taken))


def ddpm_tables(T, steps):
    scale = 1000 / T
    betas = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    keep = space_timesteps(T, steps)
    nb, last = [], 1.0
    for i, a in enumerate(ac):
        if i in keep:
            nb.append(1 - a / last)
            last = a
    b = np.array(nb, dtype=np.float64)
    alphas = 1.0 - b
    a = np.cumprod(alphas)
    ap = np.append(1.0, a[:-1])
    pv = b * (1.0 - ap) / (1.0 - a)
    tab = dict(timestep=np.array(keep), beta=b, ac=a, ac_prev=ap,
               sqrt_recip_ac=np.sqrt(1.0 / a), sqrt_recipm1_ac=np.sqrt(1.0 / a - 1),
               post_var=pv, log_beta=np.log(b),
               coef1=b * np.sqrt(ap) / (1.0 - a), coef2=(1.0 - ap) * np.sqrt(alphas) / (1.0 - a))
    with np.errstate(divide="ignore"):
        tab["post_logvar_clipped"] = np.log(np.append(pv[1], pv[1:]) if len(pv) > 1 else pv)
    return tab


# ----------------------------------------------------------------------------------- samplers
def _f32(x):
    return torch.tensor(float(x), dtype=torch.float32)


def _guided(lo, hi, tfrac, scale):
    return scale != 1.0 and lo - 1e-9 <= tfrac <= hi + 1e-9


@torch.no_grad()
def sample(model, sampler, steps, y, z0, cfg_scale=1.0, cfg_channels=0, eta=0.0, seed=0,
           indices=None, interval=(0.0, 1.0), T=1000):
    """model: dit_moe_ref.DiTMoE; y [B] int64; z0 [B,C,H,W] float32 initial noise.
    cfg_channels 0 = all. Returns the final latent [B,C,H,W]."""
    B, C = z0.shape[0], z0.shape[1]
    k = C if cfg_channels in (0, None) else cfg_channels
    null = torch.full((B,), model.num_classes, dtype=torch.int64)
    indices = list(range(B)) if indices is None else indices
    shape = tuple(z0.shape[1:])
    lo, hi = interval
    if sampler in ("ddpm", "ddim"):
        tab = ddpm_tables(T, steps)
        x = torch.cat([z0, z0], 0)                      # DiT's doubled state
        ycat = torch.cat([y, null], 0)
        N = len(tab["timestep"])
        for i in range(N - 1, -1, -1):
            step = N - i
            t_orig = int(tab["timestep"][i])
            tt = torch.full((2 * B,), t_orig, dtype=torch.int64)
            if _guided(lo, hi, t_orig / (T - 1), cfg_scale):
                out = model.forward_with_cfg(x, tt.float(), ycat, cfg_scale, k)
            else:
                out = torch.cat([model(x[:B], tt[:B].float(), y)] * 2, 0)
            eps, var = out[:, :C], out[:, C:]
            e = lambda name: _f32(tab[name][i])  # noqa: E731 (float64 table -> float32)
            x0 = e("sqrt_recip_ac") * x - e("sqrt_recipm1_ac") * eps      # no clipping
            if sampler == "ddpm":
                mean = e("coef1") * x0 + e("coef2") * x
                if i != 0:
                    if out.shape[1] < 2 * C:           # no learned sigma: fixed-large variance
                        logv = e("log_beta")
                    else:
                        frac = (var + 1) / 2
                        logv = frac * e("log_beta") + (1 - frac) * e("post_logvar_clipped")
                    nz = noise_batch(seed, indices, step, shape)
                    mean = mean + torch.exp(0.5 * logv) * torch.cat([nz, nz], 0)
                x = mean
            else:
                ab, abp = e("ac"), e("ac_prev")
                ep = (e("sqrt_recip_ac") * x - x0) / e("sqrt_recipm1_ac")
                sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
                mean = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma ** 2) * ep
                if i != 0 and eta > 0:
                    nz = noise_batch(seed, indices, step, shape)
                    mean = mean + sigma * torch.cat([nz, nz], 0)
                x = mean
        return x[:B]
    if sampler in ("euler", "heun"):
        z = z0.clone()
        dt = _f32(1.0 / steps)

        def vel(z, t):
            tt = torch.full((B,), t, dtype=torch.float32)
            vc = model(z, tt, y)[:, :C]
            if not _guided(lo, hi, t, cfg_scale):
                return vc
            vu = model(z, tt, null)[:, :C]               # a separate unconditional pass
            g = vu + cfg_scale * (vc - vu)
            return torch.cat([g[:, :k], vc[:, k:]], 1)
        for i in range(steps, 0, -1):
            t, tn = i / steps, (i - 1) / steps
            v1 = vel(z, t)
            if sampler == "heun" and i > 1:
                v2 = vel(z - dt * v1, tn)
                z = z - dt * (0.5 * (v1 + v2))
            else:
                z = z - dt * v1
        return z
    raise ValueError(f"unknown sampler {sampler!r}")


# ----------------------------------------------------------------------------------- assets
SMALL = dict(hidden_size=64, depth=2, num_heads=4, num_experts=4, top_k=2, attention="timm",
             patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)
FMNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                "Sneaker", "Bag", "Ankle boot"]


def make_model(path, objective="ddpm", seed=0, class_names=None, **over):
    """Random small DiT-MoE -> .pt -> tools/convert_checkpoint.py -> path. Returns the model."""
    from dit_moe_ref import DiTMoE, randomize_
    cfg = dict(SMALL, **over)
    model = randomize_(DiTMoE(**cfg), seed).eval()
    with tempfile.TemporaryDirectory() as d:
        pt = os.path.join(d, "m.pt")
        torch.save({"ema": model.state_dict()}, pt)
        cmd = [sys.executable, os.path.join(SRC, "tools", "convert_checkpoint.py"), pt, path,
               "--objective", objective, "--heads", str(cfg["num_heads"])]
        if class_names:
            names = os.path.join(d, "names.txt")
            with open(names, "w") as f:
                f.write("\n".join(class_names) + "\n")
            cmd += ["--class-names", names]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"convert_checkpoint failed: {r.stderr}")
    return model


def make_vae(path, out_ch=3, z=4, seed=0):
    from vae_ref import Decoder, VAEConfig, randomize_, vae_metadata, write_safetensors
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=z, out_ch=out_ch)
    dec = randomize_(Decoder(cfg), seed)
    write_safetensors(path, dec.state_dict(), vae_metadata(cfg))
    return dec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("out")
    m.add_argument("--objective", choices=("ddpm", "rf"), default="ddpm")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--fmnist-names", action="store_true")
    m.add_argument("--in-channels", type=int, default=4)
    v = sub.add_parser("vae")
    v.add_argument("out")
    v.add_argument("--out-ch", type=int, default=3)
    v.add_argument("--z", type=int, default=4)
    a = ap.parse_args(argv)
    if a.cmd == "model":
        make_model(a.out, a.objective, a.seed, FMNIST_NAMES if a.fmnist_names else None,
                   in_channels=a.in_channels)
    else:
        make_vae(a.out, a.out_ch, a.z)
    return 0


if __name__ == "__main__":
    sys.exit(main())

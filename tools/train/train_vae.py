#!/usr/bin/env python3
"""Train a small KL autoencoder on Fashion-MNIST (32x32 gray -> 8x8x4 latents).

The decoder is exactly tests/ref/vae_ref.py's Decoder (SD KL-f8 family, diffusers names); the
encoder here is its mirror: conv_in, down_blocks (resnets + stride-2 downsampler with (0,1,0,1)
padding), mid_block (resnet, attention, resnet), conv_norm_out, SiLU, conv_out -> 2*z (mean,
logvar), quant_conv (1x1, 2z -> 2z).

Resumable: checkpoints every --ckpt-every seconds to RUN/ckpt.pt; rerunning continues.
Then (same command, or --stages export) it
  - computes the posterior means of the training/test sets, scale = 1/std (as SD did),
  - writes RUN/latents.pt {"train": [60000,4,8,8] * scale, "train_y", "test", "test_y", "scale"},
  - exports post_quant_conv.* + decoder.* to assets/vae-fmnist.safetensors with metadata
    "ditmoe.vae" = {"scaling_factor", "norm_groups", ...}.

    nice -n 10 /usr/bin/python3 tools/train/train_vae.py --steps 6000
"""
import argparse
import json
import math
import os
import sys
import time

# OpenMP threads must not spin while the shared machine is oversubscribed (measured: 7x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "ref"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "train"))

import vae_ref  # noqa: E402
from vae_ref import VAEConfig, Decoder, ResnetBlock, MidBlock, group_norm  # noqa: E402
import fmnist  # noqa: E402


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class EncoderBody(nn.Module):
    """The `encoder.*` part; mirror of vae_ref.DecoderBody."""

    def __init__(self, cfg):
        super().__init__()
        g = cfg.groups()
        ws = cfg.widths()
        L = len(ws)
        self.conv_in = nn.Conv2d(cfg.out_ch, ws[0], 3, padding=1)
        blocks, prev = [], ws[0]
        for i in range(L):
            blocks.append(DownBlock(prev, ws[i], cfg.num_res_blocks, g, i < L - 1))
            prev = ws[i]
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ws[-1], g, cfg.mid_attention)
        self.conv_norm_out = group_norm(ws[-1], g)
        self.conv_out = nn.Conv2d(ws[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.down_blocks:
            h = b(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(Decoder):
    """vae_ref.Decoder (post_quant_conv + decoder) plus encoder + quant_conv (flat diffusers names)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        zc = cfg.z_channels
        self.encoder = EncoderBody(cfg)
        self.quant_conv = nn.Conv2d(2 * zc, 2 * zc, 1)

    def encode(self, x):
        """x [B,out_ch,H,W] -> (mean, logvar) each [B,zc,H/f,W/f]."""
        m = self.quant_conv(self.encoder(x))
        mean, logvar = m.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decoder_state_dict(self):
        return {k: v for k, v in self.state_dict().items()
                if k.startswith("decoder.") or k.startswith("post_quant_conv.")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.path.join(ROOT, "runs", "vae"))
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "vae-fmnist.safetensors"))
    p.add_argument("--ch", type=int, default=16)
    p.add_argument("--ch-mult", default="1,2,4")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--z-channels", type=int, default=4)
    p.add_argument("--norm-groups", type=int, default=0, help="0 = vae_ref default")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=1e-4,
                   help="weight on KL summed over latent elements / image pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest while other jobs load both cores")
    p.add_argument("--ckpt-every", type=float, default=180.0, help="seconds")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (with checkpoint) after this wall time in this process")
    p.add_argument("--stages", default="train,latents,export")
    p.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    return p.parse_args(argv)


def make_cfg(a):
    return VAEConfig(ch=a.ch, ch_mult=tuple(int(s) for s in a.ch_mult.split(",")),
                     num_res_blocks=a.num_res_blocks, z_channels=a.z_channels, out_ch=1,
                     norm_groups=a.norm_groups or None, mid_attention=True)


class Logger:
    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(a, step):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def vae_loss(model, x, kl_weight, gen):
    mean, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    rec = model(z)
    l1 = (rec - x).abs().mean()
    mse = ((rec - x) ** 2).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / x[0].numel()
    return l1 + mse + kl_weight * kl, dict(l1=l1.item(), mse=mse.item(), kl=kl.item())


def train(a, cfg, log):
    torch.manual_seed(a.seed)
    x_all = fmnist.to_model(fmnist.load("train")[0])           # [60000,1,32,32]
    model = AutoencoderKL(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1)             # batches + posterior noise
    ck = os.path.join(a.run, "ckpt.pt")
    step, wall = 0, 0.0
    if os.path.exists(ck):
        s = torch.load(ck)
        model.load_state_dict(s["model"]); opt.load_state_dict(s["opt"])
        gen.set_state(s["gen"]); step, wall = s["step"], s["wall"]
        log(f"resumed from {ck} at step {step}, wall {wall:.0f}s")
    nparam = sum(p.numel() for p in model.parameters())
    ndec = sum(v.numel() for v in model.decoder_state_dict().values())
    log(f"cfg {cfg} params total {nparam} decoder+pqc {ndec}")

    def checkpoint():
        save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                         step=step, wall=wall, cfg=vars(cfg)), ck)

    t_start = time.time(); t_last = t_start; t_ck = t_start; acc = []
    model.train()
    while step < a.steps:
        for gp in opt.param_groups:
            gp["lr"] = lr_at(a, step)
        idx = torch.randint(0, x_all.shape[0], (a.batch,), generator=gen)
        loss, parts = vae_loss(model, x_all[idx], a.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        wall += now - t_last; t_last = now
        acc.append(parts)
        if a.bench and step >= a.bench:
            log(f"bench: {a.bench} steps in {now - t_start:.1f}s ({(now - t_start) / a.bench:.3f} s/step)")
            return None
        if step % 100 == 0 or step == a.steps:
            m = {k: float(np.mean([d[k] for d in acc])) for k in acc[0]}
            acc = []
            log(f"step {step}/{a.steps} wall {wall:.0f}s lr {lr_at(a, step - 1):.2e} "
                f"l1 {m['l1']:.4f} mse {m['mse']:.5f} kl {m['kl']:.3f}")
        if now - t_ck > a.ckpt_every:
            checkpoint(); t_ck = now
        if a.max_minutes and now - t_start > 60 * a.max_minutes:
            checkpoint(); log(f"stopping after {a.max_minutes} min (resume by rerunning)")
            return None
    checkpoint()
    log(f"training done: {step} steps, wall {wall:.0f}s")
    return model


def load_trained(a, cfg):
    s = torch.load(os.path.join(a.run, "ckpt.pt"))
    if s["step"] < a.steps:
        raise SystemExit(f"checkpoint at step {s['step']} < --steps {a.steps}: train first")
    model = AutoencoderKL(cfg)
    model.load_state_dict(s["model"])
    return model.eval(), s


@torch.no_grad()
def encode_all(model, x, bs=500):
    out = []
    for i in range(0, x.shape[0], bs):
        out.append(model.encode(x[i:i + bs])[0])
    return torch.cat(out)


@torch.no_grad()
def latents(a, cfg, log):
    model, s = load_trained(a, cfg)
    xtr, ytr = fmnist.load("train")
    xte, yte = fmnist.load("test")
    t0 = time.time()
    ltr = encode_all(model, fmnist.to_model(xtr))
    lte = encode_all(model, fmnist.to_model(xte))
    std = ltr.std().item()
    scale = 1.0 / std
    log(f"latents: train {tuple(ltr.shape)} mean {ltr.mean():.4f} std {std:.4f} -> scale {scale:.5f}; "
        f"per-channel mean {ltr.mean((0, 2, 3)).tolist()} std {ltr.std((0, 2, 3)).tolist()} "
        f"({time.time() - t0:.0f}s)")
    # reconstruction quality on the test set (posterior mean)
    te = fmnist.to_model(xte)
    rec = torch.cat([model(lte[i:i + 500]) for i in range(0, 10000, 500)])
    mse = ((rec.clamp(-1, 1) - te) ** 2).mean().item()
    psnr = 10 * math.log10(4.0 / mse)
    log(f"test reconstruction (posterior mean): mse {mse:.5f} (range [-1,1]) psnr {psnr:.2f} dB")
    save_atomic(dict(train=(ltr * scale).contiguous(), train_y=torch.from_numpy(ytr),
                     test=(lte * scale).contiguous(), test_y=torch.from_numpy(yte),
                     scale=scale, cfg=vars(cfg), test_psnr=psnr),
                os.path.join(a.run, "latents.pt"))
    # a picture: top row originals, bottom row reconstructions
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        o = fmnist.from_model(te[:16]); r = fmnist.from_model(rec[:16])
        grid = np.concatenate([np.concatenate(list(o), 1), np.concatenate(list(r), 1)], 0)
        plt.imsave(os.path.join(a.run, "recon.png"), grid, cmap="gray", vmin=0, vmax=255)
    except Exception as e:  # picture is optional
        log(f"recon.png skipped: {e}")
    return scale


def export(a, cfg, log):
    import safetensors_io
    model, s = load_trained(a, cfg)
    lat = torch.load(os.path.join(a.run, "latents.pt"))
    scale = lat["scale"]
    sd = {k: v.float().contiguous() for k, v in model.decoder_state_dict().items()}
    meta = {"ditmoe.vae": json.dumps({
        "scaling_factor": scale, "norm_groups": cfg.groups(), "ch": cfg.ch,
        "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
        "z_channels": cfg.z_channels, "out_ch": cfg.out_ch, "mid_attention": cfg.mid_attention,
        "image_size": 32, "dataset": "fashion-mnist (28x28 padded to 32x32 with -1)",
        "trained_steps": s["step"]})}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    safetensors_io.write(a.out, sd, meta)
    log(f"exported {len(sd)} tensors ({sum(v.numel() for v in sd.values())} params) to {a.out}; "
        f"metadata {meta['ditmoe.vae']}")


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.run, exist_ok=True)
    log = Logger(os.path.join(a.run, "log.txt"))
    cfg = make_cfg(a)
    stages = a.stages.split(",")
    if "train" in stages:
        m = train(a, cfg, log)
        if m is None:
            return 0
    if "latents" in stages:
        latents(a, cfg, log)
    if "export" in stages:
        export(a, cfg, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fine-tune only the VAE decoder (post_quant_conv + decoder.*) on the CACHED training latents
(runs/vae/latents.pt, posterior means x scale), encoder frozen, so the DiT's training data and
the scaling factor stay valid. Loss: L1 + MSE + L1 of horizontal/vertical image differences
(an edge term against the blur of a pure L1/MSE decoder). Resumable; exports to
assets/vae-fmnist.safetensors with the same "ditmoe.vae" metadata (+ finetune steps).

    nice -n 10 /usr/bin/python3 tools/train/finetune_decoder.py --budget-minutes 12
"""
import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vae import ROOT, AutoencoderKL, Logger, save_atomic  # noqa: E402
import fmnist  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vae-run", default=os.path.join(ROOT, "runs", "vae"))
    p.add_argument("--run", default=os.path.join(ROOT, "runs", "vae_ft"))
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "vae-fmnist.safetensors"))
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--budget-minutes", type=float, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--edge-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=float, default=120.0)
    p.add_argument("--stages", default="train,export")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.run, exist_ok=True)
    log = Logger(os.path.join(a.run, "log.txt"))
    base = torch.load(os.path.join(a.vae_run, "ckpt.pt"))
    from vae_ref import VAEConfig
    cfg = VAEConfig(**base["cfg"])
    model = AutoencoderKL(cfg)
    model.load_state_dict(base["model"])
    lat = torch.load(os.path.join(a.vae_run, "latents.pt"))
    scale = lat["scale"]
    z_all = lat["train"].float() / scale                           # [60000,4,8,8] unscaled means
    x_all = fmnist.to_model(fmnist.load("train")[0])               # [60000,1,32,32]
    params = list(model.post_quant_conv.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 7)
    ck = os.path.join(a.run, "ckpt.pt")
    step, wall, done = 0, 0.0, False
    if os.path.exists(ck):
        s = torch.load(ck)
        model.load_state_dict(s["model"]); opt.load_state_dict(s["opt"]); gen.set_state(s["gen"])
        step, wall, done = s["step"], s["wall"], s["done"]
        log(f"resumed at step {step} wall {wall:.0f}s done {done}")

    def checkpoint():
        save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                         step=step, wall=wall, done=done, cfg=vars(cfg)), ck)

    def lr_at():
        p_ = min(1.0, wall / (60 * a.budget_minutes))
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p_)))

    if "train" in a.stages and not done:
        log(f"decoder fine-tune: {sum(p.numel() for p in params)} params, budget {a.budget_minutes} min")
        model.train()
        t_last = time.time(); t_ck = t_last; acc = []
        while not done:
            for g in opt.param_groups:
                g["lr"] = lr_at()
            idx = torch.randint(0, len(z_all), (a.batch,), generator=gen)
            x = x_all[idx]
            rec = model(z_all[idx])
            l1 = (rec - x).abs().mean(); mse = ((rec - x) ** 2).mean()
            edge = ((rec.diff(dim=2) - x.diff(dim=2)).abs().mean()
                    + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean())
            loss = l1 + mse + a.edge_weight * edge
            opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
            step += 1
            now = time.time(); wall += now - t_last; t_last = now
            acc.append((l1.item(), mse.item(), edge.item()))
            if step % 100 == 0:
                m = np.mean(acc, 0); acc = []
                log(f"ft step {step} wall {wall:.0f}s lr {lr_at():.1e} l1 {m[0]:.4f} mse {m[1]:.5f} edge {m[2]:.4f}")
            if wall >= 60 * a.budget_minutes or step >= a.steps:
                done = True
            if done or now - t_ck > a.ckpt_every:
                checkpoint(); t_ck = now
        log(f"fine-tune done: {step} steps, wall {wall:.0f}s")
    if "export" in a.stages:
        import safetensors_io
        model.eval()
        te = fmnist.to_model(fmnist.load("test")[0])
        with torch.no_grad():
            rec = torch.cat([model(lat["test"][i:i + 500].float() / scale) for i in range(0, 10000, 500)])
        mse = ((rec.clamp(-1, 1) - te) ** 2).mean().item()
        log(f"test reconstruction after fine-tune: mse {mse:.5f} psnr {10 * math.log10(4 / mse):.2f} dB")
        _, meta = safetensors_io.read(a.out)
        vm = json.loads(meta["ditmoe.vae"])
        if abs(vm["scaling_factor"] - scale) > 1e-9:
            raise SystemExit(f"{a.out}: scaling_factor {vm['scaling_factor']} != latents scale {scale}")
        vm["decoder_finetune_steps"] = step
        meta["ditmoe.vae"] = json.dumps(vm)
        sd = {k: v.float().contiguous() for k, v in model.decoder_state_dict().items()}
        safetensors_io.write(a.out, sd, meta)
        log(f"exported fine-tuned decoder to {a.out}; metadata {meta['ditmoe.vae']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

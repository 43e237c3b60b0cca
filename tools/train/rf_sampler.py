"""PyTorch rectified-flow Euler sampler with classifier-free guidance (spec ditmoe.md 4.2, 5.1).

Convention: t = 1 is noise, t = 0 is data, z_t = (1 - t) x0 + t eps, the model predicts
v = eps - x0 and takes t in (0, 1] directly (no x1000). For i = N .. 1: t = i/N,
v = v_u + s (v_c - v_u) on the first `cfg_channels` channels (0 = all; the rest keep v_c),
z = z - v / N. The conditional and unconditional passes run as one doubled batch
[y, null]; routing is per token so this equals two separate passes.

    z0 = rf_euler_cfg(model, noise [B,C,H,W], labels [B], steps=50, cfg_scale=4.0)
"""
import torch


@torch.no_grad()
def rf_euler_cfg(model, noise, labels, steps=50, cfg_scale=4.0, cfg_channels=0, null_class=None):
    model.eval()
    B = noise.shape[0]
    C = noise.shape[1]
    null = model.num_classes if null_class is None else null_class
    z = noise.float().clone()
    y = labels.long()
    guided = cfg_scale != 1.0
    yy = torch.cat([y, torch.full_like(y, null)]) if guided else y
    gc = C if cfg_channels in (0, None) else cfg_channels
    for i in range(steps, 0, -1):
        t = torch.full((B,), i / steps, dtype=torch.float32)
        if guided:
            out = model(torch.cat([z, z]), torch.cat([t, t]), yy)[:, :C]
            vc, vu = out[:B], out[B:]
            v = vc.clone()
            v[:, :gc] = vu[:, :gc] + cfg_scale * (vc[:, :gc] - vu[:, :gc])
        else:
            v = model(z, t, yy)[:, :C]
        z = z - v * (1.0 / steps)
    return z

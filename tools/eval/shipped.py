"""Load the shipped assets (assets/ditmoe-fmnist.safetensors, assets/vae-fmnist.safetensors) into
the PyTorch references and generate images with the PyTorch RF Euler + CFG sampler.

    dit, meta = load_dit(path)          # tests/ref DiTMoE, eval mode, float32 weights
    vae, vmeta = load_vae(path)         # tests/ref vae_ref.Decoder; vmeta["scaling_factor"]
    z = sample_latents(dit, labels, seed=0, steps=50, cfg_scale=None)   # None -> file default
    img = decode(vae, vmeta, z)         # uint8 [B,28,28]
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for d in (("tests", "ref"), ("tools",), ("tools", "train")):
    p = os.path.join(ROOT, *d)
    if p not in sys.path:
        sys.path.insert(0, p)

import safetensors_io  # noqa: E402
from dit_moe_ref import DiTMoE, config_from_metadata  # noqa: E402
import vae_ref  # noqa: E402
import fmnist  # noqa: E402
from rf_sampler import rf_euler_cfg  # noqa: E402

DIT_PATH = os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors")
VAE_PATH = os.path.join(ROOT, "assets", "vae-fmnist.safetensors")


def load_dit(path=DIT_PATH):
    tensors, meta = safetensors_io.read(path)
    cfg = json.loads(meta["ditmoe"])
    model = DiTMoE(**config_from_metadata(cfg), class_dropout_prob=0.1)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval(), cfg


def load_vae(path=VAE_PATH):
    tensors, meta = safetensors_io.read(path)
    vm = json.loads(meta["ditmoe.vae"])
    cfg = vae_ref.VAEConfig(ch=vm["ch"], ch_mult=tuple(vm["ch_mult"]),
                            num_res_blocks=vm["num_res_blocks"], z_channels=vm["z_channels"],
                            out_ch=vm["out_ch"], norm_groups=vm["norm_groups"],
                            mid_attention=vm.get("mid_attention", True))
    dec = vae_ref.Decoder(cfg)
    dec.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return dec.eval(), vm


def initial_noise(n, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    s = cfg["input_size"]
    return torch.randn((n, cfg["in_channels"], s, s), generator=g)


@torch.no_grad()
def sample_latents(dit, cfg, labels, seed=0, steps=None, cfg_scale=None, noise=None, batch=250):
    smp = cfg.get("sampling", {})
    steps = steps or smp.get("steps", 50)
    cfg_scale = smp.get("cfg_scale", 4.0) if cfg_scale is None else cfg_scale
    labels = torch.as_tensor(labels).long()
    if noise is None:
        noise = initial_noise(len(labels), cfg, seed)
    out = []
    for i in range(0, len(labels), batch):
        out.append(rf_euler_cfg(dit, noise[i:i + batch], labels[i:i + batch], steps=steps,
                                cfg_scale=cfg_scale, cfg_channels=smp.get("cfg_channels", 0)))
    return torch.cat(out)


@torch.no_grad()
def decode(vae, vmeta, z, batch=500):
    imgs = [vae.decode(z[i:i + batch], vmeta["scaling_factor"]) for i in range(0, len(z), batch)]
    return fmnist.from_model(torch.cat(imgs))


def load_dit_ckpt(path, which="ema"):
    """A training checkpoint (runs/dit/ckpt.pt) instead of the shipped file: (model, cfg)."""
    from train_dit import load_ema
    model, s = load_ema(path, which)
    cfg = dict(model.config, name=f"ckpt step {s['step']} ({which})",
               sampling={"sampler": "euler", "steps": 50, "cfg_scale": 3.0, "cfg_channels": 0})
    return model, cfg

#!/usr/bin/env python3
"""Train a class-conditional DiT-MoE (tests/ref/dit_moe_ref.py, official state-dict names) with
the rectified-flow objective on the cached Fashion-MNIST VAE latents (runs/vae/latents.pt,
already multiplied by the VAE scaling factor).

  - always-on shared expert + 8 routed SwiGLU experts, top-2, label dropout 0.1 (null class 10)
  - loss = MSE(v_pred[:, :C], eps - x0) + sum of per-layer expert balance losses (alpha 0.01,
    spec 2.11, exposed by the reference model as model.aux_losses in train mode)
  - t = sigmoid(n), n ~ N(0,1); z_t = (1-t) x0 + t eps
  - AdamW, linear warmup, EMA of the weights (decay --ema)
  - resumable: RUN/ckpt.pt every --ckpt-every seconds; rerun the same command to continue
  (the loop, checkpoint and export: rf_train.py, shared with train_promoe.py)
Stages: train, export (EMA -> RUN/ema.pt -> tools/convert_checkpoint.py -> assets/).

    nice -n 10 /usr/bin/python3 tools/train/train_dit.py --steps 4000
"""
import argparse
import os
import sys

# OpenMP threads must not spin while the shared machine is oversubscribed (measured: 7x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "ref"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "train"))

from dit_moe_ref import DiTMoE, init_dit_weights_  # noqa: E402
import rf_train  # noqa: E402
from rf_train import export_rf, train_rf  # noqa: E402
from train_vae import Logger  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.path.join(ROOT, "runs", "dit"))
    p.add_argument("--latents", default=os.path.join(ROOT, "runs", "vae", "latents.pt"))
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors"))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=0, help="0 = 4*hidden")
    p.add_argument("--shared-hidden", type=int, default=0, help="0 = 2*hidden")
    p.add_argument("--aux-alpha", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest while other jobs load both cores")
    p.add_argument("--ckpt-every", type=float, default=180.0, help="seconds")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (with checkpoint) after this wall time in this process")
    p.add_argument("--budget-minutes", type=float, default=0,
                   help="end training (as finished) once the cumulative wall time reaches this")
    p.add_argument("--stages", default="train,export")
    p.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    # export / sampling defaults stored in the model file
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    return p.parse_args(argv)


def model_kwargs(a):
    return dict(hidden_size=a.hidden, depth=a.depth, num_heads=a.heads, num_experts=a.experts,
                top_k=a.top_k, attention="timm", patch_size=a.patch, input_size=8, in_channels=4,
                learn_sigma=False, num_classes=10,
                expert_hidden=a.expert_hidden or 4 * a.hidden,
                shared_hidden=a.shared_hidden or 2 * a.hidden,
                class_dropout_prob=0.1, aux_alpha=a.aux_alpha)


def init_weights_(model, seed):
    """DiT's initialisation (spec 2.11, dit_moe_ref.init_dit_weights_); routers N(0, 0.02) (as
    upcycle.py does)."""
    def per_block(b, g):
        b.moe.gate.weight.copy_(0.02 * torch.randn(b.moe.gate.weight.shape, generator=g))
    return init_dit_weights_(model, seed, per_block)


def count_params(model, k, E):
    total = sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed")
    routed = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = total - routed + routed * k // E
    return total, active


def train(a, log):
    return train_rf(a, log, lambda args: init_weights_(DiTMoE(**model_kwargs(args)), args.seed),
                    lambda model: count_params(model, a.top_k, a.experts))


def load_ema(path, which="ema"):
    """-> (DiTMoE in eval mode with the EMA (or raw) weights, checkpoint dict)."""
    return rf_train.load_ema(path, lambda args: DiTMoE(**model_kwargs(args)), which)


def export(a, log):
    ck = os.path.join(a.run, "ckpt.pt")
    model, s = load_ema(ck)
    if not s.get("done"):
        raise SystemExit(f"{ck}: training not finished (step {s['step']}): train first")
    pt = os.path.join(a.run, "ema.pt")
    torch.save({"ema": model.state_dict()}, pt)
    export_rf(a, log, s, pt, a.heads, a.top_k, ["--objective", "rf"], "DiT-MoE-FMNIST",
              a.sample_steps, a.cfg_scale)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.run, exist_ok=True)
    log = Logger(os.path.join(a.run, "log.txt"))
    stages = a.stages.split(",")
    if "train" in stages:
        if not train(a, log):
            return 0
    if "export" in stages:
        export(a, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

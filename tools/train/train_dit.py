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
Stages: train, export (EMA -> RUN/ema.pt -> tools/convert_checkpoint.py -> assets/).

    nice -n 10 /usr/bin/python3 tools/train/train_dit.py --steps 4000
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

# OpenMP threads must not spin while the shared machine is oversubscribed (measured: 7x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "ref"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "train"))

from dit_moe_ref import DiTMoE  # noqa: E402
import fmnist  # noqa: E402
from train_vae import Logger, save_atomic  # noqa: E402


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


@torch.no_grad()
def init_weights_(model, seed):
    """DiT's initialisation (spec 2.11): xavier-uniform linears with zero bias, patch-embed conv
    as a linear, N(0, 0.02) label table and timestep MLP, zero adaLN and final layer; routers
    N(0, 0.02) (as upcycle.py does)."""
    g = torch.Generator().manual_seed(seed)

    def xavier(w):
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            xavier(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    xavier(model.x_embedder.proj.weight)
    model.x_embedder.proj.bias.zero_()
    model.y_embedder.embedding_table.weight.copy_(
        0.02 * torch.randn(model.y_embedder.embedding_table.weight.shape, generator=g))
    for i in (0, 2):
        w = model.t_embedder.mlp[i].weight
        w.copy_(0.02 * torch.randn(w.shape, generator=g))
    for b in model.blocks:
        b.adaLN_modulation[-1].weight.zero_(); b.adaLN_modulation[-1].bias.zero_()
        b.moe.gate.weight.copy_(0.02 * torch.randn(b.moe.gate.weight.shape, generator=g))
    fl = model.final_layer
    fl.adaLN_modulation[-1].weight.zero_(); fl.adaLN_modulation[-1].bias.zero_()
    fl.linear.weight.zero_(); fl.linear.bias.zero_()
    return model


def count_params(model, k, E):
    total = sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed")
    routed = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    active = total - routed + routed * k // E
    return total, active


def lr_at(a, step):
    return a.lr * min(1.0, (step + 1) / a.warmup)


def train(a, log):
    torch.manual_seed(a.seed)
    lat = torch.load(a.latents)
    x_all, y_all = lat["train"].float(), lat["train_y"].long()
    model = init_weights_(DiTMoE(**model_kwargs(a)), a.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1)
    ck = os.path.join(a.run, "ckpt.pt")
    step, wall = 0, 0.0
    if os.path.exists(ck):
        s = torch.load(ck)
        if s.get("done"):
            log(f"{ck}: training already finished at step {s['step']}")
            return True
        model.load_state_dict(s["model"]); ema.load_state_dict(s["ema"]); opt.load_state_dict(s["opt"])
        gen.set_state(s["gen"]); torch.set_rng_state(s["torch_rng"])
        step, wall = s["step"], s["wall"]
        log(f"resumed from {ck} at step {step}, wall {wall:.0f}s")
    total, active = count_params(model, a.top_k, a.experts)
    log(f"config {json.dumps(model.config)} params total {total} active {active}; "
        f"latents {tuple(x_all.shape)} std {x_all.std():.3f} scale {lat['scale']:.5f}")

    def checkpoint():
        save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                         gen=gen.get_state(), torch_rng=torch.get_rng_state(), step=step,
                         wall=wall, args=vars(a), config=model.config, scale=lat["scale"],
                         done=step >= a.steps or done), ck)

    ema_params = [p for n, p in ema.named_parameters() if n != "pos_embed"]
    mod_params = [p for n, p in model.named_parameters() if n != "pos_embed"]
    t_start = time.time(); t_last = t_start; t_ck = t_start; acc = []
    model.train()
    done = False
    while step < a.steps and not done:
        for gp in opt.param_groups:
            gp["lr"] = lr_at(a, step)
        idx = torch.randint(0, x_all.shape[0], (a.batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn((a.batch,), generator=gen))
        tb = t.view(-1, 1, 1, 1)
        zt = (1 - tb) * x0 + tb * eps
        out = model(zt, t, y)                 # label dropout uses the global torch RNG
        mse = ((out[:, :x0.shape[1]] - (eps - x0)) ** 2).mean()
        aux = sum(model.aux_losses) if model.aux_losses else torch.zeros(())
        loss = mse + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))   # short warmup of the EMA decay
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, mod_params, alpha=1 - d)
        step += 1
        now = time.time()
        wall += now - t_last; t_last = now
        acc.append((mse.item(), float(aux), float(gn)))
        if a.bench and step >= a.bench:
            log(f"bench: {a.bench} steps in {now - t_start:.1f}s ({(now - t_start) / a.bench:.3f} s/step)")
            return False
        if step % 50 == 0 or step == a.steps:
            m = np.mean(acc, 0); acc = []
            # expert load of the last batch, layer 0 (fraction of assignments per expert)
            log(f"step {step}/{a.steps} wall {wall:.0f}s lr {lr_at(a, step - 1):.1e} "
                f"mse {m[0]:.4f} aux {m[1]:.4f} gnorm {m[2]:.2f}")
        if a.budget_minutes and wall >= 60 * a.budget_minutes:
            done = True
            log(f"wall-time budget of {a.budget_minutes} min reached at step {step}")
            break
        if now - t_ck > a.ckpt_every:
            checkpoint(); t_ck = now
        if a.max_minutes and now - t_start > 60 * a.max_minutes:
            checkpoint(); log(f"stopping after {a.max_minutes} min (resume by rerunning)")
            return False
    checkpoint()
    log(f"training done: {step} steps, wall {wall:.0f}s")
    return True


def load_ema(path, which="ema"):
    """-> (DiTMoE in eval mode with the EMA (or raw) weights, checkpoint dict)."""
    s = torch.load(path)
    a = argparse.Namespace(**s["args"])
    model = DiTMoE(**model_kwargs(a))
    model.load_state_dict(s[which])
    return model.eval(), s


def export(a, log):
    import safetensors_io
    ck = os.path.join(a.run, "ckpt.pt")
    model, s = load_ema(ck)
    if not s.get("done"):
        raise SystemExit(f"{ck}: training not finished (step {s['step']}): train first")
    pt = os.path.join(a.run, "ema.pt")
    torch.save({"ema": model.state_dict()}, pt)
    names = os.path.join(a.run, "class_names.txt")
    with open(names, "w") as f:
        f.write("\n".join(fmnist.CLASS_NAMES) + "\n")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), pt, a.out,
           "--dtype", a.dtype, "--heads", str(a.heads), "--top-k", str(a.top_k),
           "--objective", "rf", "--num-classes", "10", "--class-names", names,
           "--name", "DiT-MoE-FMNIST", "--sampler", "euler", "--steps", str(a.sample_steps),
           "--cfg-scale", str(a.cfg_scale), "--cfg-channels", "0"]
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    # The converter writes the SD value 0.18215 for vae_scale; ours is the Fashion-MNIST VAE's.
    tensors, meta = safetensors_io.read(a.out)
    cfg = json.loads(meta["ditmoe"])
    cfg["vae_scale"] = float(s["scale"])
    meta["ditmoe"] = json.dumps(cfg)
    safetensors_io.write(a.out, tensors, meta)
    log(f"exported EMA weights (step {s['step']}) to {a.out} ({os.path.getsize(a.out)} bytes); "
        f"metadata {meta['ditmoe']}")


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

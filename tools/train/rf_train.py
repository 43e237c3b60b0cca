"""The rectified-flow training loop, checkpoint and export shared by train_dit.py (DiT-MoE) and
train_promoe.py (ProMoE), which differ only in the model, its time input and its auxiliary loss.

  - t = sigmoid(n), n ~ N(0,1); z_t = (1-t) x0 + t eps; the network predicts v = eps - x0 and is
    fed time_scale * t (DiT-MoE 1, ProMoE 1000)
  - loss = MSE(v_pred[:, :C], eps - x0) + aux_weight * sum(model.aux_losses)
  - AdamW, linear warmup, grad clip 1.0, EMA of the weights (decay --ema, short warmup)
  - resumable: RUN/ckpt.pt every --ckpt-every seconds; rerun the same command to continue;
    --budget-minutes ends training (as finished) at that cumulative wall time, --max-minutes
    (where the script has it) stops this process with a checkpoint

    train_rf(a, log, make_model, count, time_scale=1.0, aux_weight=1.0, aux_name="aux")
    load_ema(path, make_model, which="ema") -> (model in eval mode, checkpoint dict)
    export_rf(a, log, s, pt, heads, top_k, arch_args, name, steps, cfg_scale)
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import fmnist
from train_vae import save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lr_at(a, step):
    return a.lr * min(1.0, (step + 1) / a.warmup)


def train_rf(a, log, make_model, count, time_scale=1.0, aux_weight=1.0, aux_name="aux"):
    """Train make_model(a) (built after the seed is set and the latents loaded) on a.latents.
    count(model) -> (total, active) parameters. Returns True once training is finished (also
    when the checkpoint already says so), False when --bench or --max-minutes stopped it."""
    torch.manual_seed(a.seed)
    lat = torch.load(a.latents)
    x_all, y_all = lat["train"].float(), lat["train_y"].long()
    model = make_model(a)
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
    total, active = count(model)
    log(f"config {json.dumps(model.config)} params total {total} active {active}; "
        f"latents {tuple(x_all.shape)} std {x_all.std():.3f} scale {lat['scale']:.5f}")
    max_minutes = getattr(a, "max_minutes", 0)   # train_promoe.py has no --max-minutes
    done = False

    def checkpoint():
        save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                         gen=gen.get_state(), torch_rng=torch.get_rng_state(), step=step,
                         wall=wall, args=vars(a), config=model.config, scale=lat["scale"],
                         done=step >= a.steps or done), ck)

    ema_params = [p for n, p in ema.named_parameters() if n != "pos_embed"]
    mod_params = [p for n, p in model.named_parameters() if n != "pos_embed"]
    t_start = time.time(); t_last = t_start; t_ck = t_start; acc = []
    model.train()
    while step < a.steps and not done:
        for gp in opt.param_groups:
            gp["lr"] = lr_at(a, step)
        idx = torch.randint(0, x_all.shape[0], (a.batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn((a.batch,), generator=gen))
        tb = t.view(-1, 1, 1, 1)
        zt = (1 - tb) * x0 + tb * eps
        out = model(zt, time_scale * t, y)    # label dropout uses the global torch RNG
        mse = ((out[:, :x0.shape[1]] - (eps - x0)) ** 2).mean()
        aux = sum(model.aux_losses) if model.aux_losses else torch.zeros(())
        loss = mse + aux_weight * aux
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
            log(f"step {step}/{a.steps} wall {wall:.0f}s lr {lr_at(a, step - 1):.1e} "
                f"mse {m[0]:.4f} {aux_name} {m[1]:.4f} gnorm {m[2]:.2f}")
        if a.budget_minutes and wall >= 60 * a.budget_minutes:
            done = True
            log(f"wall-time budget of {a.budget_minutes:.1f} min reached at step {step}")
            break
        if now - t_ck > a.ckpt_every:
            checkpoint(); t_ck = now
        if max_minutes and now - t_start > 60 * max_minutes:
            checkpoint(); log(f"stopping after {max_minutes} min (resume by rerunning)")
            return False
    checkpoint()
    log(f"training done: {step} steps, wall {wall:.0f}s")
    return True


def load_ema(path, make_model, which="ema"):
    """-> (make_model(the run's args) in eval mode with the EMA (or raw) weights, checkpoint)."""
    s = torch.load(path)
    model = make_model(argparse.Namespace(**s["args"]))
    model.load_state_dict(s[which])
    return model.eval(), s


def export_rf(a, log, s, pt, heads, top_k, arch_args, name, steps, cfg_scale):
    """tools/convert_checkpoint.py PT -> a.out (a.dtype; the class names, the sampling defaults,
    arch_args: the model's own flags), then our VAE's scale into its metadata (the converter
    writes SD's 0.18215). s: the checkpoint the weights in PT came from."""
    import safetensors_io
    names = os.path.join(a.run, "class_names.txt")
    with open(names, "w") as f:
        f.write("\n".join(fmnist.CLASS_NAMES) + "\n")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), pt, a.out,
           "--dtype", a.dtype, "--heads", str(heads), "--top-k", str(top_k), *arch_args,
           "--num-classes", "10", "--class-names", names, "--name", name, "--sampler", "euler",
           "--steps", str(steps), "--cfg-scale", str(cfg_scale), "--cfg-channels", "0"]
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    tensors, meta = safetensors_io.read(a.out)
    cfg = json.loads(meta["ditmoe"])
    cfg["vae_scale"] = float(s["scale"])
    meta["ditmoe"] = json.dumps(cfg)
    safetensors_io.write(a.out, tensors, meta)
    log(f"exported EMA weights (step {s['step']}) to {a.out} ({os.path.getsize(a.out)} bytes); "
        f"metadata {meta['ditmoe']}")

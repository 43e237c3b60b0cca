#!/usr/bin/env python3
"""Train a class-conditional ProMoE (tests/ref/promoe_ref.py, official state-dict names) on the
cached Fashion-MNIST VAE latents (runs/vae/latents.pt, produced by train_vae.py), at the same
training compute as the DiT-MoE default model (train_dit.py, runs/dit).

  - odd blocks MoE: 8 routed GELU experts (width 2D) + unconditional expert + shared expert (2D),
    prototype router (cosine to cluster_centers, identity, top-1, token choice); even blocks dense
    (4D); label dropout 0.1 (null class 10 -> unconditional expert)
  - loss = MSE(v_pred[:, :C], eps - x0) + rcl * routing contrastive loss (spec 5, tau 0.07)
  - rectified flow exactly as train_dit.py: sigma = sigmoid(N(0,1)), z = (1-sigma) x0 + sigma eps;
    the network is fed t = 1000 * sigma (ProMoE's convention, metadata time_scale 1000)
  - optimiser, warm-up, EMA decay, batch, grad clip, thread count: train_dit.py's (and by default
    its hyper-parameters, read from runs/dit/ckpt.pt: --match-run)
  - compute budget (--match-run): at most the DiT-MoE run's final step count AND at most its
    cumulative training wall time, whichever comes first
  - resumable: RUN/ckpt.pt every --ckpt-every seconds; rerun the same command to continue
    (the loop, checkpoint and export: rf_train.py, shared with train_dit.py)
  - --wait: first wait until the DiT-MoE training has finished (assets/ditmoe-fmnist.safetensors
    exists and no train_dit.py process is running), the CPU being shared
Stages: train, export (EMA -> RUN/ema.pth in the official layout -> convert_checkpoint.py ->
assets/promoe-fmnist.safetensors), eval (both shipped models through the C ditmoe-sample with
their metadata defaults, same seed: --eval-n images per class -> tools/eval/eval_samples.py
--png-dir (judge accuracy, Frechet distance); sampling time per image; parameter counts;
RUN/eval/summary.json).

    nice -n 10 /usr/bin/python3 tools/train/train_promoe.py --wait
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for d in (("tests", "ref"), ("tools",), ("tools", "train")):
    sys.path.insert(0, os.path.join(ROOT, *d))

import promoe_ref  # noqa: E402
import rf_train  # noqa: E402
from rf_train import export_rf, train_rf  # noqa: E402
from train_vae import Logger  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.path.join(ROOT, "runs", "promoe"))
    p.add_argument("--latents", default=os.path.join(ROOT, "runs", "vae", "latents.pt"))
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "promoe-fmnist.safetensors"))
    p.add_argument("--match-run", default=os.path.join(ROOT, "runs", "dit"),
                   help="DiT-MoE run whose hyper-parameters, steps and wall time to match ('' = off)")
    p.add_argument("--wait", action="store_true", help="wait for the DiT-MoE training to finish")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--variant", default="tc", choices=["tc", "ec"])
    p.add_argument("--router", default="identity", choices=["identity", "softmax", "sigmoid"])
    p.add_argument("--rcl", type=float, default=1.0, help="routing contrastive loss weight")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--budget-minutes", type=float, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=float, default=180.0, help="seconds")
    p.add_argument("--stages", default="train,export")
    p.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--sample-steps", type=int, default=0,
                   help="default sampling steps stored in the model (0 = the --dit model's)")
    p.add_argument("--cfg-scale", type=float, default=0,
                   help="default guidance stored in the model (0 = the --dit model's)")
    p.add_argument("--eval-n", type=int, default=100, help="images per class for the eval stage")
    p.add_argument("--eval-seed", type=int, default=2024)
    p.add_argument("--dit", default=os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors"),
                   help="the DiT-MoE model compared against in the eval stage")
    p.add_argument("--eval-models", default="DiT-MoE,ProMoE",
                   help="which of DiT-MoE,ProMoE to (re)evaluate; others kept from summary.json")
    p.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"), help="ditmoe-sample dir")
    return p.parse_args(argv)


def wait_for_dit(a, log):
    asset = os.path.join(ROOT, "assets", "ditmoe-fmnist.safetensors")
    said = False
    while True:
        busy = subprocess.run(["pgrep", "-f", "train_dit.py"], capture_output=True).returncode == 0
        if os.path.exists(asset) and not busy:
            return
        if not said:
            log(f"waiting for the DiT-MoE training (asset {os.path.exists(asset)}, "
                f"train_dit.py running {busy})")
            said = True
        time.sleep(30)


def match_run(a, log):
    """Take the DiT-MoE run's optimiser settings and its final steps / wall time as budget."""
    if not a.match_run:
        return
    s = torch.load(os.path.join(a.match_run, "ckpt.pt"), map_location="cpu")
    if not s.get("done"):
        raise SystemExit(f"{a.match_run}: DiT-MoE training not finished (step {s['step']})")
    d = s["args"]
    for k in ("hidden", "depth", "heads", "patch", "batch", "lr", "warmup", "ema", "threads"):
        setattr(a, k, d[k])
    a.steps, a.budget_minutes = int(s["step"]), float(s["wall"]) / 60.0
    a.matched = dict(steps=a.steps, wall_s=float(s["wall"]), run=a.match_run)
    log(f"matching {a.match_run}: {a.steps} steps, {a.budget_minutes:.1f} min, batch {a.batch}, "
        f"lr {a.lr}, warmup {a.warmup}, ema {a.ema}, threads {a.threads}")


def model_kwargs(a):
    D = a.hidden
    return dict(hidden_size=D, depth=a.depth, num_heads=a.heads, num_experts=a.experts,
                top_k=a.top_k, patch_size=a.patch, input_size=8, in_channels=4,
                learn_sigma=False, num_classes=10, expert_hidden=2 * D, shared_hidden=2 * D,
                mlp_hidden=4 * D, variant=a.variant, router=a.router, class_dropout_prob=0.1,
                rcl_weight=a.rcl)


def train(a, log):
    return train_rf(a, log, lambda args: promoe_ref.init_weights_(
                        promoe_ref.ProMoE(**model_kwargs(args)), args.seed),
                    promoe_ref.count_params, time_scale=1000.0, aux_weight=a.rcl, aux_name="rcl")


def load_ema(path, which="ema"):
    """-> (ProMoE in eval mode with the EMA (or raw) weights, checkpoint dict)."""
    return rf_train.load_ema(path, lambda args: promoe_ref.ProMoE(**model_kwargs(args)), which)


def export(a, log):
    import safetensors_io
    ck = os.path.join(a.run, "ckpt.pt")
    model, s = load_ema(ck)
    if not s.get("done"):
        raise SystemExit(f"{ck}: training not finished (step {s['step']}): train first")
    sa = argparse.Namespace(**s["args"])
    smp = {"steps": 50, "cfg_scale": 3.0}
    if os.path.exists(a.dit):     # same sampling settings as the DiT-MoE default model
        smp.update(json.loads(safetensors_io.read(a.dit)[1]["ditmoe"]).get("sampling", {}))
    pt = os.path.join(a.run, "ema.pth")           # official train.py layout
    torch.save({"step": int(s["step"]), "ema_model_state_dict": model.state_dict()}, pt)
    export_rf(a, log, s, pt, sa.heads, sa.top_k,
              ["--promoe-variant", sa.variant, "--router", sa.router], "ProMoE-FMNIST",
              a.sample_steps or smp["steps"], a.cfg_scale or smp["cfg_scale"])


def param_counts(path):
    """(total, active per token) of a shipped model file, pos_embed excluded (train_dit's rule)."""
    import safetensors_io
    tensors, meta = safetensors_io.read(path)
    cfg = json.loads(meta["ditmoe"])
    if cfg["arch"] == "promoe":
        model = promoe_ref.ProMoE(**promoe_ref.config_from_metadata(cfg))
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return promoe_ref.count_params(model)
    from train_dit import count_params
    sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))
    import shipped
    model, _ = shipped.load_dit(path)
    return count_params(model, cfg["top_k"], cfg["num_experts"])


def evaluate(a, log):
    import shutil
    exe = os.path.join(a.bin, "ditmoe-sample")
    models = (("DiT-MoE", a.dit), ("ProMoE", a.out))
    out_dir = os.path.join(a.run, "eval")
    os.makedirs(out_dir, exist_ok=True)
    results = os.path.join(out_dir, "results.jsonl")
    sfile = os.path.join(out_dir, "summary.json")
    summary = {}
    if os.path.exists(sfile):
        with open(sfile) as f:
            summary = json.load(f)
    for name, path in models:
        if name not in a.eval_models.split(","):
            continue
        d = os.path.join(out_dir, name.lower())
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        n_img = 10 * a.eval_n
        cmd = [exe, "--model", path, "--class", "all", "-n", str(a.eval_n), "--seed",
               str(a.eval_seed), "--batch", "25", "--threads", "1", "-q",
               "-o", os.path.join(d, "img_%04d.png")]
        log("running " + " ".join(cmd))
        t0 = time.time()
        subprocess.run(cmd, check=True)
        dt = time.time() - t0
        for i in range(n_img):     # --class all: image i is class i // n
            os.replace(os.path.join(d, f"img_{i:04d}.png"),
                       os.path.join(d, f"c{i // a.eval_n}_{i:04d}.png"))
        # a clean timing: 50 images, default batch, 1 thread
        t1 = time.time()
        subprocess.run([exe, "--model", path, "--class", "all", "-n", "5", "--seed", "1",
                        "--threads", "1", "-q", "-o", os.path.join(out_dir, "t_%03d.png")],
                       check=True)
        t_img = (time.time() - t1) / 50
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval", "eval_samples.py"),
                        "--png-dir", d, "--tag", f"{name} ditmoe-sample seed {a.eval_seed}",
                        "--out", results], check=True, stdout=subprocess.DEVNULL)
        with open(results) as f:
            res = json.loads(f.read().strip().splitlines()[-1])
        from safetensors_io import read
        meta = json.loads(read(path)[1]["ditmoe"])
        total, active = param_counts(path)
        summary[name] = dict(accuracy=res["accuracy"], fd=res["fd_gen_vs_testA"],
                             fd_real_floor=res["fd_testB_vs_testA"],
                             per_class_accuracy=res["per_class_accuracy"],
                             params_total=total, params_active=active,
                             sample_s_per_image_1thread=round(t_img, 4),
                             generation_wall_s=round(dt, 1), n_per_class=a.eval_n,
                             sampling=meta.get("sampling"), file_bytes=os.path.getsize(path))
        log(f"{name}: {json.dumps(summary[name])}")
    with open(sfile + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(sfile + ".tmp", sfile)


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.run, exist_ok=True)
    log = Logger(os.path.join(a.run, "log.txt"))
    stages = a.stages.split(",")
    if "train" in stages:
        if a.wait:
            wait_for_dit(a, log)
        if not a.bench:
            match_run(a, log)
        torch.set_num_threads(a.threads)
        if not train(a, log):
            return 0
    if "export" in stages:
        export(a, log)
    if "eval" in stages:
        evaluate(a, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

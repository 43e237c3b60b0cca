#!/usr/bin/env python3
"""Full router probabilities of the shipped DiT-MoE along its own sampling trajectories, for the
MoE lab's offline analyses (docs/moe-lab.md): pruning objective, what top-p / threshold would
select. Runs the PyTorch reference sampler (tools/eval/shipped.py: RF Euler + CFG, the file's
sampling defaults) on N images per class and records softmax(gate(h)) of every MoE layer, token
and evaluation, conditional and unconditional rows separately.

    /usr/bin/python3 tools/moe_lab/router_probs.py -n 10 --seed 2024 -o /tmp/lab/probs.npz

Output (.npz): cond [L, S, B, T, E] float32, uncond [L, S, B, T, E] (empty without CFG), labels [B],
steps S, t [S] (flow time of each step, 1 = noise). Also OUT-cond.npy: the conditional rows as
[L, S*B*T, E] float32 (step-major), the calibration input of ditmoe-prune --probs.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))
import shipped  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10, help="images per class")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--model", default=shipped.DIT_PATH)
    ap.add_argument("-o", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dit, cfg = shipped.load_dit(a.model)
    C = cfg["num_classes"]
    labels = torch.arange(C).repeat_interleave(a.n)
    rec = []  # per forward call: list over layers of probs [rows*T, E]
    cur = []

    def hook(_m, _inp, out):
        cur.append(torch.softmax(out.float(), dim=-1).detach().numpy().copy())

    hs = [blk.moe.gate.register_forward_hook(hook) for blk in dit.blocks]
    orig_forward = dit.forward

    def fwd(*args, **kw):
        cur.clear()
        r = orig_forward(*args, **kw)
        rec.append(list(cur))
        return r

    dit.forward = fwd
    smp = cfg.get("sampling", {})
    steps = smp.get("steps", 50)
    shipped.sample_latents(dit, cfg, labels, seed=a.seed, steps=steps, batch=len(labels))
    for h in hs:
        h.remove()
    B, T = len(labels), dit.pos_embed.shape[1]
    L, E = len(dit.blocks), cfg["num_experts"]
    arr = np.stack([np.stack(r) for r in rec])  # [S, L, rows*T, E]
    S, rows = arr.shape[0], arr.shape[2] // T
    arr = arr.reshape(S, L, rows, T, E).transpose(1, 0, 2, 3, 4)
    cond = arr[:, :, :B]
    uncond = arr[:, :, B:] if rows == 2 * B else arr[:, :, :0]
    t = np.array([(steps - s) / steps for s in range(S)], np.float32)
    np.savez(a.o, cond=cond.astype(np.float32), uncond=uncond.astype(np.float32),
             labels=labels.numpy(), steps=S, t=t)
    flat = os.path.splitext(a.o)[0] + "-cond.npy"
    np.save(flat, np.ascontiguousarray(cond.reshape(L, -1, E).astype(np.float32)))
    print(f"{a.o}: cond {cond.shape}, uncond {uncond.shape}; {flat}")


if __name__ == "__main__":
    main()

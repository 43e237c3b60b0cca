#!/usr/bin/env python3
"""Router cosine scores of the shipped ProMoE along its own sampling trajectories (reference
sampler tests/ref/promoe_ref.py::euler_cfg, the file's sampling defaults), conditional pass only,
for the rank2 policy statistics of docs/moe-lab.md (ditmoe-routes --policies --cosine).

    /usr/bin/python3 tools/moe_lab/promoe_scores.py -n 10 --seed 2024 -o /tmp/lab/pscores.npy

Output: [Lm, S*B*T, E] float32 (step-major), Lm = the MoE (odd) blocks.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for d in (("tests", "ref"), ("tools",)):
    sys.path.insert(0, os.path.join(ROOT, *d))
import promoe_ref  # noqa: E402
import safetensors_io  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10, help="images per class")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--model", default=os.path.join(ROOT, "assets", "promoe-fmnist.safetensors"))
    ap.add_argument("-o", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tensors, meta = safetensors_io.read(a.model)
    cfg = json.loads(meta["ditmoe"])
    model = promoe_ref.ProMoE(**promoe_ref.config_from_metadata(cfg))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    model.eval()
    C = cfg["num_classes"]
    labels = torch.arange(C).repeat_interleave(a.n)
    moes = [b.mlp for b in model.blocks if isinstance(b.mlp, promoe_ref.ProtoMoE)]
    calls = []  # per model call: [Lm] scores [B*T, E]
    cur = []
    for m in moes:
        orig = m.scores

        def hooked(x, _orig=orig):
            s = _orig(x)
            cur.append(s.detach().numpy().copy())
            return s
        m.scores = hooked
    fwd = model.forward

    def wrapped(*args, **kw):
        cur.clear()
        r = fwd(*args, **kw)
        calls.append(list(cur))
        return r
    model.forward = wrapped
    g = torch.Generator().manual_seed(a.seed)
    s = cfg["input_size"]
    noise = torch.randn((len(labels), cfg["in_channels"], s, s), generator=g)
    smp = cfg.get("sampling", {})
    steps, scale = smp.get("steps", 50), smp.get("cfg_scale", 1.5)
    promoe_ref.euler_cfg(model, noise, labels, steps=steps, cfg_scale=scale,
                         time_scale=cfg.get("time_scale", 1000.0))
    cond = calls[0::2] if scale != 1.0 else calls          # cond pass first each step
    arr = np.stack([np.stack(c) for c in cond])             # [S, Lm, B*T, E]
    arr = np.ascontiguousarray(arr.transpose(1, 0, 2, 3).reshape(len(moes), -1, arr.shape[-1]))
    np.save(a.o, arr.astype(np.float32))
    print(f"{a.o}: {arr.shape} (Lm, S*B*T, E), steps {len(cond)}")


if __name__ == "__main__":
    main()

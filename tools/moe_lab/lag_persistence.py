#!/usr/bin/env python3
"""Top-k set persistence at a lag: the fraction of tokens whose top-k expert set at step s equals
the set at step s - lag, per layer, from full router probabilities (tools/moe_lab/router_probs.py
.npz). Lag 1 is what ditmoe-routes --persistence reports from dumps; larger lags bound how long a cached
expert output (router/expert_cache.h, refresh=route) can stay valid. Also the L1 drift
sum_e |p_s(e) - p_{s-lag}(e)| (the refresh=delta statistic), mean and 90th percentile.

    /usr/bin/python3 tools/moe_lab/lag_persistence.py /tmp/lab/probs.npz --k 2 --lags 1,2,4,8
"""
import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--lags", default="1,2,4,8")
    ap.add_argument("--half", default="cond", choices=["cond", "uncond"])
    a = ap.parse_args()
    p = np.load(a.npz)[a.half]  # [L, S, B, T, E]
    L, S, B, T, E = p.shape
    # top-k sets as bit masks (ties: lower id first, as the engine: stable sort of -p)
    order = np.argsort(-p, axis=-1, kind="stable")[..., :a.k]
    masks = np.zeros(p.shape[:-1], np.int64)
    for j in range(a.k):
        masks |= np.left_shift(1, order[..., j]).astype(np.int64)
    print(f"{a.npz} ({a.half}): L={L} S={S} B={B} T={T} E={E}, top-{a.k}")
    for lag in [int(x) for x in a.lags.split(",")]:
        same = (masks[:, lag:] == masks[:, :-lag]).mean(axis=(1, 2, 3))
        drift = np.abs(p[:, lag:] - p[:, :-lag]).sum(-1)
        print(f"lag {lag}: set kept per layer " + " ".join(f"{x:.4f}" for x in same) +
              " | L1 drift mean " + " ".join(f"{x:.4f}" for x in drift.mean(axis=(1, 2, 3))) +
              " | p90 " + " ".join(f"{x:.4f}" for x in np.percentile(drift.reshape(L, -1), 90, axis=1)))


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Paper-style routing figures (DiT-MoE, ditmoe.md §7) from ditmoe-routes' routes.json.

    /usr/bin/python3 tools/plot_routes.py routes/routes.json -o samples/routing

Writes (one panel per MoE layer, titled "MoE Layer i" like the paper's 2x6 grids):
  paper_class.png     class x expert, raw pick counts (cmap Oranges)
  paper_patch.png     token position x expert, per-layer min-max normalised (cmap Greens)
  paper_step.png      sampling step x expert, per-layer min-max normalised (cmap Blues)
  summary.png         per layer: mutual information I(view; expert) in bits for class, position
                      and step; the position MI at each step; the load max/mean ratio
With --table: print the per-layer numbers docs/routing.md quotes (Markdown) instead.
Needs Debian's python3-matplotlib (use /usr/bin/python3).
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def grid(n):
    cols = min(n, 6)
    return math.ceil(n / cols), cols


def minmax(a):
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=float)


def panels(js, key, cmap, norm, ylabel, yticks, title, path):
    tabs = np.array(js[key], dtype=float)  # [Lm, rows, X]
    Lm, rows, X = tabs.shape
    r, c = grid(Lm)
    fig, axes = plt.subplots(r, c, figsize=(2.6 * c + 1, 0.9 + 3.2 * r), squeeze=False)
    for l in range(r * c):
        ax = axes[l // c][l % c]
        if l >= Lm:
            ax.axis("off")
            continue
        t = minmax(tabs[l]) if norm else tabs[l]
        im = ax.imshow(t, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_title(f"MoE Layer {js['moe_layers'][l]}", fontsize=9)
        ax.set_xlabel("Expert", fontsize=8)
        ax.set_xticks(range(X))
        ax.tick_params(labelsize=6)
        if l % c == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if yticks is not None:
            ax.set_yticks(yticks[0])
            ax.set_yticklabels(yticks[1] if l % c == 0 else [], fontsize=6)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=6)
        cb.set_label("min-max per layer" if norm else "picks", fontsize=6)
    counted = js.get("counted", "conditional")
    fig.suptitle(f"{title} ({counted} half, every top-{js['top_k']} pick counted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")


def summary(js, path):
    st = js["layer_stats"]
    L = [s["block"] for s in st]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for key, lab in (("mi_position_bits", "position"), ("mi_step_bits", "step"),
                     ("mi_class_bits", "class")):
        ax.plot(L, [s[key] for s in st], "o-", label=lab)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("I(view; expert) [bits]")
    ax.set_title("How much each view tells about the expert")
    ax.set_xticks(L)
    ax.legend(fontsize=8)
    ax = axes[1]
    for s in st:
        if "mi_position_by_step_bits" in s:
            ax.plot(s["mi_position_by_step_bits"], label=f"layer {s['block']}")
    ax.set_xlabel("sampling step (0 = noise)")
    ax.set_ylabel("I(position; expert | step) [bits]")
    ax.set_title("Spatial specialisation along the trajectory")
    ax.legend(fontsize=8)
    ax = axes[2]
    X = js["routed_experts"]
    w = 0.8 / len(st)
    for i, s in enumerate(st):
        load = np.array(s["picks_per_expert"][:X], float)
        ax.bar(np.arange(X) + i * w, load / load.sum() * X, width=w,
               label=f"layer {s['block']}: max/mean {s['max_mean_ratio']:.2f}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("expert")
    ax.set_ylabel("load / uniform")
    ax.set_title("Expert load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")


def tv_uniform(tab, E):
    """[rows, X] counts -> [rows] total-variation distance of P(expert | row) from uniform."""
    t = np.asarray(tab, float)[:, :E]
    p = t / np.maximum(t.sum(1, keepdims=True), 1)
    return 0.5 * np.abs(p - 1.0 / E).sum(1)


def table_md(js):
    """The numbers docs/routing.md quotes, as a Markdown table. I(.; e): mutual information with
    the chosen expert in bits; TV_x: total-variation distance of P(expert | x) from uniform."""
    E = js["routed_experts"]
    S = js["steps"]
    early, late = slice(0, max(1, S // 10)), slice(S // 2, S)
    out = ["| layer | load max/mean | load entropy / log2 E | H(expert) bits | I(class; e) | "
           "I(position; e) | I(step; e) | I(pos; e) step 0 / mid / last | "
           "TV_step first 10% / second half | mean TV_pos | mean TV_class |",
           "|---" * 11 + "|"]
    for l, s in enumerate(js["layer_stats"]):
        h = -sum(p * math.log2(p) for p in
                 (np.array(s["picks_per_expert"], float) / sum(s["picks_per_expert"])) if p > 0)
        m = s.get("mi_position_by_step_bits") or [float("nan")] * S
        tvs = tv_uniform(js["step_expert"][l], E)
        tvp = tv_uniform(js["position_expert"][l], E)
        tvc = tv_uniform(js["class_expert"][l], E)
        out.append(f"| {s['block']} | {s['max_mean_ratio']:.2f} | {s['entropy_norm']:.3f} | "
                   f"{h:.3f} | {s['mi_class_bits']:.3f} | {s['mi_position_bits']:.3f} | "
                   f"{s['mi_step_bits']:.3f} | {m[0]:.3f} / {m[S // 2]:.3f} / {m[-1]:.3f} | "
                   f"{tvs[early].mean():.3f} / {tvs[late].mean():.3f} | {tvp.mean():.3f} | "
                   f"{tvc.mean():.3f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("routes_json", help="routes.json written by ditmoe-routes")
    ap.add_argument("-o", "--out", default=".", help="output directory (default: .)")
    ap.add_argument("--table", action="store_true",
                    help="print the per-layer numbers as a Markdown table and exit")
    a = ap.parse_args(argv)
    try:
        with open(a.routes_json) as f:
            js = json.load(f)
        for key in ("class_expert", "position_expert", "step_expert", "layer_stats", "moe_layers"):
            if key not in js:
                raise ValueError(f"missing key {key!r} (not a ditmoe-routes routes.json?)")
    except (OSError, ValueError) as e:
        print(f"plot_routes: {a.routes_json}: {e}", file=sys.stderr)
        return 2
    if a.table:
        print(table_md(js))
        return 0
    os.makedirs(a.out, exist_ok=True)
    names = js.get("class_names") or [str(i) for i in range(js["num_classes"])]
    C = js["num_classes"]
    step = max(1, C // 25)
    panels(js, "class_expert", "Oranges", False, "Class",
           (list(range(0, C, step)), [names[i] for i in range(0, C, step)]),
           "Class x expert", os.path.join(a.out, "paper_class.png"))
    T = js["tokens"]
    panels(js, "position_expert", "Greens", True, "Token position (raster)",
           (list(range(0, T, max(1, T // 16))), [str(i) for i in range(0, T, max(1, T // 16))]),
           "Token position x expert", os.path.join(a.out, "paper_patch.png"))
    S = js["steps"]
    panels(js, "step_expert", "Blues", True, "Inference step",
           (list(range(0, S, max(1, S // 10))), [str(i) for i in range(0, S, max(1, S // 10))]),
           "Sampling step x expert", os.path.join(a.out, "paper_step.png"))
    summary(js, os.path.join(a.out, "summary.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

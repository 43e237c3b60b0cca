#!/usr/bin/python3
"""Markdown tables and the quality-vs-compute figure from measure.py's JSON lines.

    /usr/bin/python3 tools/moe_lab/report.py RESULTS.jsonl [...] --table [--base TAG]
    /usr/bin/python3 tools/moe_lab/report.py RESULTS.jsonl [...] --figure docs/figures/moe-lab-quality-compute.png

--table: one row per (model, tag, n) (the last line wins when a row was rerun) with accuracy
(± binomial std), FD, real-vs-real FD, GMAC per image, wall and CPU seconds per image, speed-up of
the CPU time against --base (the same model's row with that tag and N), weights MiB.
--figure: accuracy and FD against active GMAC per image, one row of panels per N, one marker
series per model, points labelled with their tag, each model's top-k row as a dotted line. Needs Debian's python3-matplotlib (use /usr/bin/python3).
"""
import argparse
import json
import sys


def load(paths):
    rows = {}
    for p in paths:
        with open(p) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[(r["model"], r["tag"], r["n_per_class"], r["seed"])] = r
    return list(rows.values())


def short_model(m):
    return "ProMoE" if "promoe" in m.lower() else "DiT-MoE"


def table(rows, base):
    out = ["| model | setting | N/class | accuracy (± std) | FD | real-vs-real FD | GMAC/img | wall s/img | "
           "CPU s/img | CPU speed-up | weights MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = next((x for x in rows if x["model"] == r["model"] and x["tag"] == base
                  and x["n_per_class"] == r["n_per_class"]), None)
        sp = f"{b['cpu_s_per_image'] / r['cpu_s_per_image']:.2f}x" if b else ""
        g = r.get("macs_per_image")
        out.append(f"| {short_model(r['model'])} | {r['tag']} | {r['n_per_class']} | "
                   f"{r['accuracy']:.3f} ± {r['acc_binomial_std']:.3f} | {r['fd']:.1f} | "
                   f"{r['fd_real']:.1f} | {g / 1e9:.3f} | " if g else
                   f"| {short_model(r['model'])} | {r['tag']} | {r['n_per_class']} | "
                   f"{r['accuracy']:.3f} ± {r['acc_binomial_std']:.3f} | {r['fd']:.1f} | "
                   f"{r['fd_real']:.1f} | – | ")
        out[-1] += (f"{r['wall_s_per_image']:.3f} | {r['cpu_s_per_image']:.3f} | {sp} | "
                    f"{r['weights_mib'] if r['weights_mib'] is not None else '–'} |")
    return "\n".join(out)


def figure(rows, path, title):
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["n_per_class"] for r in rows if r.get("macs_per_image")}, reverse=True)
    fig, axs = plt.subplots(len(ns), 2, figsize=(12, 4.4 * len(ns)), squeeze=False)
    colors = {"DiT-MoE": "C0", "ProMoE": "C3"}
    for row, n in enumerate(ns):
        for col, key in enumerate(("accuracy", "fd")):
            ax = axs[row][col]
            for model, mk in (("DiT-MoE", "o"), ("ProMoE", "s")):
                rs = [r for r in rows if short_model(r["model"]) == model and r.get("macs_per_image")
                      and r["n_per_class"] == n]
                if not rs:
                    continue
                xs = [r["macs_per_image"] / 1e9 for r in rs]
                ys = [r[key] for r in rs]
                ax.scatter(xs, ys, marker=mk, color=colors[model], label=model, alpha=0.85)
                for x, y, r in zip(xs, ys, rs):
                    ax.annotate(r["tag"], (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
                base = next((r for r in rs if r["tag"] == "top-k"), None)
                if base:
                    ax.axhline(base[key], color=colors[model], lw=0.7, ls=":")
            if key == "accuracy":
                ax.axhline(0.9, color="grey", lw=0.8, ls="--")
                ax.set_ylabel("judge accuracy (requested class)")
            else:
                fr = next((r["fd_real"] for r in rows if r["n_per_class"] == n), None)
                ax.set_ylabel(f"Frechet distance vs test (real-vs-real {fr:.1f})")
            ax.set_title(f"N = {n} per class ({10 * n} images per point)", fontsize=9)
            ax.set_xlabel("active transformer GMAC per image (from the routing dump)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title + "\ndotted: each model's trained top-k; dashed: the issue's accuracy bar 0.9",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--table", action="store_true")
    p.add_argument("--base", default="f32")
    p.add_argument("--figure", default=None)
    p.add_argument("--title", default="Fashion-MNIST DiT-MoE / ProMoE: quality vs active compute "
                                      "(50 Euler steps, CFG 2.0, ditmoe-sample)")
    p.add_argument("--tags", default=None, help="comma list: only these tags, in this order")
    p.add_argument("--exclude", default="", help="comma list of tags to leave out")
    p.add_argument("--seed", type=int, default=None, help="only rows of this noise seed")
    a = p.parse_args(argv)
    rows = [r for r in load(a.results) if r["tag"] not in a.exclude.split(",")
            and (a.seed is None or r["seed"] == a.seed)]
    if a.tags:
        order = a.tags.split(",")
        rows = sorted([r for r in rows if r["tag"] in order],
                      key=lambda r: (short_model(r["model"]), order.index(r["tag"])))
    if a.table:
        print(table(rows, a.base))
    if a.figure:
        figure(rows, a.figure, a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())

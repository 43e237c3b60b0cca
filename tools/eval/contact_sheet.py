#!/usr/bin/env python3
"""Contact sheet of generated samples: one row per class (0..9), K samples per row, with the
class name at the left. PyTorch sampler on the shipped assets, or a directory of PNGs.

    nice -n 10 /usr/bin/python3 tools/eval/contact_sheet.py --k 10 -o samples/fmnist-pytorch.png
"""
import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shipped  # noqa: E402
import fmnist  # noqa: E402


def save_sheet(imgs, labels, k, path, title=""):
    """imgs uint8 [N,28,28] with labels; first k of each class, rows = classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pad = 2
    sheet = np.zeros((10 * (28 + pad) + pad, k * (28 + pad) + pad), np.uint8) + 64
    for c in range(10):
        sel = imgs[labels == c][:k]
        for j, im in enumerate(sel):
            y, x = pad + c * (28 + pad), pad + j * (28 + pad)
            sheet[y:y + 28, x:x + 28] = im
    ax_h = 0.45 * 10                                         # inches for the image rows
    img_w = ax_h * sheet.shape[1] / sheet.shape[0]
    left = 1.1                                               # inches for the class names
    W, H = left + img_w + 0.15, ax_h + 0.45
    fig = plt.figure(figsize=(W, H), dpi=100)
    ax = fig.add_axes([left / W, 0.1 / H, img_w / W, ax_h / H])
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + c * (28 + pad) + 14 for c in range(10)])
    ax.set_yticklabels(fmnist.CLASS_NAMES, fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--png-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt", default=None, help="use a training checkpoint's weights instead of assets/")
    p.add_argument("--which", default="ema", choices=["ema", "model"])
    p.add_argument("-o", "--out", default=os.path.join(shipped.ROOT, "samples", "fmnist-pytorch.png"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.png_dir:
        from eval_samples import read_png_dir
        imgs, labels = read_png_dir(a.png_dir)
        title = f"ditmoe-sample PNGs from {a.png_dir}"
    else:
        dit, cfg = shipped.load_dit_ckpt(a.ckpt, a.which) if a.ckpt else shipped.load_dit()
        vae, vm = shipped.load_vae()
        labels = np.repeat(np.arange(10), a.k)
        z = shipped.sample_latents(dit, cfg, labels, seed=a.seed, steps=a.steps or None,
                                   cfg_scale=a.cfg_scale)
        imgs = shipped.decode(vae, vm, z)
        smp = cfg.get("sampling", {})
        title = (f"{cfg['name']} PyTorch RF Euler {a.steps or smp.get('steps')} steps, "
                 f"cfg {a.cfg_scale if a.cfg_scale is not None else smp.get('cfg_scale')}, seed {a.seed}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_sheet(imgs, labels, a.k, a.out, title)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

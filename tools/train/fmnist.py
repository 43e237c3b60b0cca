"""Fashion-MNIST loader for the Debian package `dataset-fashion-mnist` (idx files, gzip).

    x, y = load("train")      # x uint8 [60000, 28, 28], y int64 [60000]
    img = to_model(x)         # float32 [N, 1, 32, 32] in [-1, 1] (28x28 padded by 2 with -1)
    x28 = from_model(img)     # inverse: uint8 [N, 28, 28] (centre crop, clamp, round)
"""
import gzip
import os

import numpy as np
import torch

DATA_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PAD = 2  # 28 + 2*2 = 32


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:
        raise ValueError(f"{path}: idx magic {magic:#x}: expected unsigned-byte data (0x08)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    off = 4 + 4 * ndim
    n = int(np.prod(dims))
    if len(data) - off != n:
        raise ValueError(f"{path}: {len(data) - off} bytes of data, expected {n} for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=off).reshape(dims)


def load(split="train"):
    """split: "train" (60000) or "test" (10000). Returns (uint8 [N,28,28], int64 [N])."""
    prefix = {"train": "train", "test": "t10k"}[split]
    x = _read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz"))
    y = _read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{split}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y


def to_model(x):
    """uint8 [N,28,28] -> float32 tensor [N,1,32,32] in [-1,1], border padded with -1 (black)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(127.5).sub_(1.0)
    t = torch.nn.functional.pad(t, (PAD, PAD, PAD, PAD), value=-1.0)
    return t.unsqueeze(1)


def from_model(img):
    """float [N,1,32,32] in [-1,1] -> uint8 [N,28,28] (centre crop)."""
    a = img[:, 0, PAD:PAD + 28, PAD:PAD + 28]
    a = ((a.clamp(-1, 1) + 1) * 127.5).round()
    return a.to(torch.uint8).cpu().numpy()


if __name__ == "__main__":
    for s in ("train", "test"):
        x, y = load(s)
        print(s, x.shape, y.shape, np.bincount(y).tolist(), x.mean())

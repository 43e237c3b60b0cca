#!/usr/bin/env python3
"""Small CNN classifier for Fashion-MNIST, the judge for generated samples.

    nice -n 10 /usr/bin/python3 tools/eval/classifier.py            # train (resumable), report test accuracy
    from classifier import load_classifier, features_and_logits

Architecture (28x28 gray in [-1,1]): conv3x3 1->32, BN, ReLU, maxpool2; conv3x3 32->64, BN, ReLU,
maxpool2; conv3x3 64->64, BN, ReLU; flatten 64*7*7; linear -> 128 (the FEATURE layer used for the
Frechet distance), ReLU, dropout 0.3; linear -> 10.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "train"))
import fmnist  # noqa: E402

DEFAULT_RUN = os.path.join(ROOT, "runs", "classifier")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1); self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1); self.b2 = nn.BatchNorm2d(64)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1); self.b3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(128, 10)

    def features(self, x):                                  # x [B,1,28,28] -> [B,128]
        h = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        h = F.relu(self.b3(self.c3(h)))
        return self.fc(h.flatten(1))

    def forward(self, x):
        return self.out(self.drop(F.relu(self.features(x))))


def to_input(x_uint8):
    """uint8 [N,28,28] -> float [N,1,28,28] in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).float().div(127.5).sub(1).unsqueeze(1)


@torch.no_grad()
def features_and_logits(model, x_uint8, bs=1000):
    model.eval()
    fs, ls = [], []
    for i in range(0, len(x_uint8), bs):
        f = model.features(to_input(x_uint8[i:i + bs]))
        fs.append(f); ls.append(model.out(F.relu(f)))
    return torch.cat(fs).double().numpy(), torch.cat(ls)


def load_classifier(run=DEFAULT_RUN):
    m = SmallCNN()
    m.load_state_dict(torch.load(os.path.join(run, "classifier.pt"))["model"])
    return m.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default=DEFAULT_RUN)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.run, exist_ok=True)
    logf = open(os.path.join(a.run, "log.txt"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True); logf.write(line + "\n"); logf.flush()

    torch.manual_seed(a.seed)
    xtr, ytr = fmnist.load("train")
    xte, yte = fmnist.load("test")
    X, Y = to_input(xtr), torch.from_numpy(ytr)
    model = SmallCNN()
    steps_per_epoch = len(X) // a.batch
    total = a.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=total)
    gen = torch.Generator().manual_seed(a.seed + 1)
    ck = os.path.join(a.run, "ckpt.pt")
    epoch, wall = 0, 0.0
    if os.path.exists(ck):
        s = torch.load(ck)
        model.load_state_dict(s["model"]); opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"]); gen.set_state(s["gen"])
        epoch, wall = s["epoch"], s["wall"]
        log(f"resumed at epoch {epoch}")
    while epoch < a.epochs:
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch:(i + 1) * a.batch]
            xb = X[idx]
            # light augmentation: random horizontal flip
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
            tot += loss.item()
        epoch += 1
        wall += time.time() - t0
        _, logits = features_and_logits(model, xte)
        acc = (logits.argmax(1).numpy() == yte).mean()
        log(f"epoch {epoch}/{a.epochs} loss {tot / steps_per_epoch:.4f} test acc {acc:.4f} wall {wall:.0f}s")
        tmp = ck + ".tmp"
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                        gen=gen.get_state(), epoch=epoch, wall=wall), tmp)
        os.replace(tmp, ck)
    torch.save(dict(model=model.state_dict()), os.path.join(a.run, "classifier.pt"))
    _, logits = features_and_logits(model, xte)
    acc = (logits.argmax(1).numpy() == yte).mean()
    log(f"final test accuracy {acc:.4f} (10000 test images), training wall {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

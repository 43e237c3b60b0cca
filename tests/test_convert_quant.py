"""tools/convert_checkpoint.py --quant-experts none|int8|int4 against ditmoe-convert --quant-experts
(docs/format.md "Quantised routed experts"; the quantiser is tools/expert_quant.py).

  - a small random DiT-MoE (timm, experts in f32 / bf16 / f16 / f64 in the .pt) and a small random
    ProMoE (qk-norm, with the unconditional expert), with edge rows written into some expert
    matrices (all-zero and all -0 rows, exact half steps for rint's ties-to-even, equal magnitudes
    of both signs, subnormal weights and scales, values that the int4 range clamps, int4 scales
    that round up to bf16's smallest normal or are bf16 subnormals flushed to -0), converted by
    both programs with int8 and int4, without --dtype and with --dtype bf16 / f16: the files are
    compared tensor by tensor (names, order, dtype, shape, bytes), then the header metadata key by
    key, then as whole files. No field is allowed to differ: both write the same "ditmoe" JSON,
    "format": "pt" and "quant_experts", and neither stores its own name, so the files are
    byte-identical;
  - a few values of the edge rows are checked against the documented rule directly (so a change
    made to both quantisers alike still fails here);
  - ditmoe-forward on the Python-quantised file == on ditmoe-convert's file == on the .pt with
    --quant-experts of the same kind (quantised at load), bit for bit, --precision f32 and bf16;
  - --quant-experts none writes the float file (no "quant_experts" key), as without the flag;
  - bad input, each exit 2 with one line on stderr and no output file (an existing one
    untouched): int4 on an expert input width that is not a multiple of 32 (DiT-MoE hidden 40,
    ProMoE expert width 48: the same message as ditmoe-convert's, naming file and tensor), an
    unknown value, a non-finite expert weight (refused by the Python converter only: the C
    quantiser has no defined result for it). int8 on those widths works and matches C.
Run: /usr/bin/python3 tests/test_convert_quant.py   (env DITMOE_BIN, DITMOE_SRC, PYTHON)"""
import collections
import json
import os
import subprocess
import sys
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
PYTHON = os.environ.get("PYTHON") or sys.executable
sys.path.insert(0, os.path.join(SRC, "tools"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tests"))
from testlib import TempDirCase  # noqa: E402
import safetensors_io  # noqa: E402
import promoe_ref  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402

CONVERTER = os.path.join(SRC, "tools", "convert_checkpoint.py")
C_CONVERT = os.path.join(BIN, "ditmoe-convert")
FORWARD = os.path.join(BIN, "ditmoe-forward")
DIT = dict(hidden_size=64, depth=2, num_heads=4, num_experts=4, top_k=2, attention="timm",
           patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)
PRO = dict(hidden_size=64, depth=2, num_heads=4, num_experts=3, top_k=1, patch_size=2,
           input_size=8, in_channels=4, learn_sigma=False, num_classes=10, expert_hidden=96,
           shared_hidden=64, mlp_hidden=128, qk_norm=True)
FLT_MIN = float(np.finfo(np.float32).tiny)
EDGE_D = "blocks.1.moe.experts.2.up_proj.weight"      # [256, 64]
EDGE_P = "blocks.1.mlp.experts.3.down_proj.weight"    # [64, 96]: the unconditional expert


def run(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def read(p):
    with open(p, "rb") as f:
        return f.read()


def edge_rows(w):
    """Write the edge rows into the first 8 rows of expert matrix w [out, in] (in % 32 == 0)."""
    w = w.clone()
    n = w.shape[1]
    w[0] = 0.0                                           # int8 s = 0; int4 d = bf16(+0 / -8) = -0
    w[1] = -0.0                                          # -0 never becomes the group's m
    k = torch.arange(n, dtype=torch.float32)
    half = ((k % 15) - 7 + 0.5) * 2.0 ** -7              # (j + 1/2) s with s = 2^-7: ties
    half[0] = 127 * 2.0 ** -7                            # max|w| = 127 s exactly
    w[2] = half
    h4 = ((k % 15) - 8 + 0.5) * 2.0 ** -5                # int4: (j + 1/2) d with d = 2^-5
    h4[::32] = -8 * 2.0 ** -5                            # m = -8 d in every group
    w[3] = h4
    w[4] = 0.01 * torch.sin(k)
    w[4, ::32], w[4, 1::32] = 0.5, -0.5                  # tie: +m first -> d < 0
    w[4, 16::32] = -0.5                                  # (later equal magnitudes never win)
    w[5] = 2.0 ** -125 * torch.cos(k)                    # m / -8 = 2^-128: bf16 subnormal, so
    w[5, n // 2:] = 1e-40 * torch.cos(k[n // 2:])        # d flushes to -0; subnormal weights
    w[6] = 8 * FLT_MIN * (1 - 2.0 ** -9) * torch.cos(k)  # m / -8 just below FLT_MIN: bf16 rounds
    w[6, ::32] = 8 * FLT_MIN * (1 - 2.0 ** -9)           # it up to the smallest normal, kept
    w[7] = 0.001 * torch.cos(k)
    w[7, ::32], w[7, 5::32] = -1.0, 0.99                 # 0.99 / 0.125 = 7.92 -> clamped to 7
    return w


def dit_sd(seed=0, **over):
    sd = collections.OrderedDict(randomize_(DiTMoE(**dict(DIT, **over)), seed).state_dict())
    if over.get("hidden_size", 64) % 32 == 0:
        sd[EDGE_D] = edge_rows(sd[EDGE_D])
    mixed = collections.OrderedDict()
    for i, (k, v) in enumerate(sd.items()):              # experts (and others) in every dtype
        mixed[k] = (v, v.bfloat16(), v.half(), v.double())[i % 4] if k != EDGE_D else v
    return mixed


def promoe_sd(seed=1, **over):
    sd = promoe_ref.randomize_(promoe_ref.ProMoE(**dict(PRO, **over)), seed).state_dict()
    if sd[EDGE_P].shape[1] % 32 == 0:
        sd[EDGE_P] = edge_rows(sd[EDGE_P])
    return sd


class Base(TempDirCase):
    PREFIX = "ditmoe-convquant-"

    def save(self, sd, name):
        p = self.path(name)
        torch.save({"ema": sd}, p)
        return p

    def py_convert(self, src, out, *flags):
        return run(PYTHON, CONVERTER, src, self.path(out), *flags)

    def c_convert(self, src, out, *flags):
        return run(C_CONVERT, "-q", src, self.path(out), *flags)

    def both(self, src, tag, *flags):
        """Both converters, exit 0 -> (python file, C file)."""
        a, b = self.path(f"py-{tag}.safetensors"), self.path(f"c-{tag}.safetensors")
        rc, _, err = self.py_convert(src, a, *flags)
        self.assertEqual(rc, 0, err)
        rc, _, err = self.c_convert(src, b, *flags)
        self.assertEqual(rc, 0, err)
        return a, b

    def assert_same(self, a, b, kind):
        """Tensor by tensor, then metadata key by key, then the whole file."""
        ta, ma = safetensors_io.read(a)
        tb, mb = safetensors_io.read(b)
        self.assertEqual(list(ta), list(tb), "tensor names / order")
        nq = 0
        for k in tb:
            self.assertEqual((ta[k].dtype, tuple(ta[k].shape)),
                             (tb[k].dtype, tuple(tb[k].shape)), k)
            self.assertEqual(ta[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                             tb[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                             f"{k}: bytes differ")
            nq += k.endswith(".scale")
        self.assertEqual(sorted(ma), sorted(mb), "metadata keys")
        self.assertEqual(json.loads(ma["ditmoe"]), json.loads(mb["ditmoe"]))
        for key in ma:
            self.assertEqual(ma[key], mb[key], f"metadata {key}")
        self.assertEqual(ma.get("quant_experts"), kind)
        self.assertEqual(read(a), read(b), "files not byte-identical")
        return ta, nq

    def assert_bad(self, rc, err, out, *needles):
        self.assertEqual(rc, 2, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        self.assertEqual(len(lines), 1, err)
        for n in needles:
            self.assertIn(n, lines[0])
        self.assertFalse(os.path.exists(out), "failed conversion left an output file")
        self.assertEqual([f for f in os.listdir(self.dir) if f.endswith(".tmp")], [])
        return lines[0]

    def forward(self, model, *extra):
        meta = json.loads(safetensors_io.read_header(model)[1]["ditmoe"]) if \
            model.endswith(".safetensors") else None
        nc = meta["num_classes"] if meta else 10
        rng = np.random.default_rng(5)
        x, t, y, o = (self.path(f"{n}.npy") for n in "xtyo")
        np.save(x, rng.standard_normal((3, 4, 8, 8)).astype(np.float32))
        np.save(t, np.array([0.1, 0.5, 0.9], np.float32))
        np.save(y, np.array([0, 3, nc], np.int64))          # one null-class image
        rc, _, err = run(FORWARD, "-q", "--model", model, "--x", x, "--t", t, "--y", y, "--out",
                         o, "--threads", "2", *extra)
        self.assertEqual(rc, 0, err)
        self.assertTrue(np.isfinite(np.load(o)).all(), model)
        return read(o)


class Parity(Base):
    def check_model(self, name, sd, edge, n_expert, heads=("--heads", "4")):
        src = self.save(sd, f"{name}.pt")
        for kind in ("int8", "int4"):
            for dt in ((), ("--dtype", "bf16"), ("--dtype", "f16")):
                with self.subTest(model=name, kind=kind, dtype=dt):
                    a, b = self.both(src, f"{name}-{kind}", *heads, "--quant-experts", kind, *dt)
                    t, nq = self.assert_same(a, b, kind)
                    self.assertEqual(nq, n_expert)
                    self.check_edges(t, edge, kind)
                    if dt:
                        continue
                    for prec in ("f32", "bf16"):
                        fa = self.forward(a, "--precision", prec)
                        self.assertEqual(fa, self.forward(b, "--precision", prec),
                                         f"{name} {kind} {prec}: python file != C file")
                        self.assertEqual(fa, self.forward(src, *heads, "--precision", prec,
                                                          "--quant-experts", kind),
                                         f"{name} {kind} {prec}: python file != .pt quantised "
                                         f"at load")
        # none (Python only: ditmoe-convert takes int8 | int4) == no flag == ditmoe-convert's
        a, b = self.both(src, f"{name}-plain", *heads)
        rc, _, err = self.py_convert(src, "none.safetensors", *heads, "--quant-experts", "none")
        self.assertEqual(rc, 0, err)
        self.assertEqual(read(self.path("none.safetensors")), read(b))
        self.assertEqual(read(a), read(b))
        self.assertNotIn("quant_experts", safetensors_io.read_header(a)[1])

    def check_edges(self, t, name, kind):
        """A few stored values of the edge rows, from the rule in docs/format.md."""
        q, s = t[name], t[name + ".scale"]
        if kind == "int8":
            self.assertEqual((s.dtype, q.dtype), (torch.float32, torch.int8))
            self.assertEqual(float(s[0]), 0.0)
            self.assertEqual(float(s[2]), 2.0 ** -7)
            self.assertEqual(q[0].abs().sum().item() + q[1].abs().sum().item(), 0)
            # k = 1..15: w / s = -5.5, -4.5, ..., 7.5, -6.5, each to its even neighbour
            self.assertEqual(q[2, :16].tolist(), [127, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6,
                                                  6, 8, -6])
            self.assertTrue(bool((q >= -127).all()))
            return
        self.assertEqual((s.dtype, q.dtype), (torch.bfloat16, torch.uint8))
        bits = s.view(torch.int16).numpy().view(np.uint16)
        self.assertTrue(np.all(bits[0] == 0x8000) and np.all(bits[1] == 0x8000))  # -0 scales
        self.assertTrue(np.all(bits[5] & 0x7FFF == 0))                   # flushed to +-0
        self.assertTrue(np.all(bits[6] == 0x8080))                       # -FLT_MIN, normal
        self.assertEqual(float(s[3, 0]), 2.0 ** -5)
        self.assertLess(float(s[4, 0]), 0)                                # m = +0.5 came first
        lo = (q[3].numpy() & 15).astype(np.int8)
        lo = np.where(lo >= 8, lo - 16, lo)                               # k = 0, 2, 4, ...
        # k = 0: -8; k = 2: -5.5 -> -6; k = 4: -3.5 -> -4; k = 6: -1.5 -> -2; k = 8: 0.5 -> 0
        self.assertEqual(lo[:5].tolist(), [-8, -6, -4, -2, 0])
        hi = (q[7].numpy()[2] >> 4).astype(np.int8)                       # k = 5: 7.92 -> 7
        self.assertEqual(int(hi), 7)
        self.assertEqual(int(q[0].sum()) + int(q[5].sum()), 0)

    def test_ditmoe(self):
        self.check_model("dit", dit_sd(0), EDGE_D, 2 * 4 * 3)

    def test_promoe(self):
        self.check_model("pro", promoe_sd(1), EDGE_P, 1 * 4 * 2)


class BadInput(Base):
    def test_int4_width(self):
        for name, sd, tensor in (
                ("dit40", dit_sd(2, hidden_size=40), "blocks.0.moe.experts.0.gate_proj.weight"),
                ("pro48", promoe_sd(3, expert_hidden=48),
                 "blocks.1.mlp.experts.0.down_proj.weight")):
            with self.subTest(model=name):
                src = self.save(sd, f"{name}.pt")
                out = self.path(f"{name}.safetensors")
                rc, _, err = self.py_convert(src, out, "--heads", "4", "--quant-experts", "int4")
                line = self.assert_bad(rc, err, out, src, tensor, "multiple of 32")
                rc, _, cerr = self.c_convert(src, out, "--heads", "4", "--quant-experts", "int4")
                self.assert_bad(rc, cerr, out)
                self.assertEqual(line.split("error: ", 1)[1],
                                 cerr.strip().split("ditmoe-convert: ", 1)[1])
                a, b = self.both(src, f"{name}-int8", "--heads", "4", "--quant-experts", "int8")
                self.assert_same(a, b, "int8")

    def test_bad_value_and_non_finite(self):
        src = self.save(dit_sd(4), "bad.pt")
        out = self.path("bad.safetensors")
        for v in ("int3", "INT8", ""):
            rc, _, err = self.py_convert(src, out, "--heads", "4", "--quant-experts", v)
            self.assert_bad(rc, err, out, "--quant-experts", "none, int8 or int4")
        sd = dit_sd(4)
        k = "blocks.0.moe.experts.1.down_proj.weight"
        w = sd[k].float().clone()
        w[3, 9] = float("nan")
        sd[k] = w
        src = self.save(sd, "nan.pt")
        for kind in ("int8", "int4"):
            rc, _, err = self.py_convert(src, out, "--heads", "4", "--quant-experts", kind)
            self.assert_bad(rc, err, out, src, k, "[3, 9]", "not finite")
        with open(out, "wb") as f:                              # an existing output: untouched
            f.write(b"old")
        rc, _, err = self.py_convert(src, out, "--heads", "4", "--quant-experts", "int8")
        self.assertEqual(rc, 2, err)
        self.assertEqual(read(out), b"old")
        os.unlink(out)


if __name__ == "__main__":
    unittest.main(verbosity=2)

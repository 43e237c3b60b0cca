"""Quantised model files (docs/format.md "Quantised routed experts"): ditmoe-convert
--quant-experts int8|int4, the loader taking the stored tensors directly, and bad combinations.

  - the shipped DiT-MoE and ProMoE converted to int8 and int4: the file is smaller, its tensors
    follow the documented layout (dequantised here in numpy from the f32 weights' values), and
    ditmoe-forward on it == ditmoe-forward on the f32 file with --quant-experts of the same kind,
    bit for bit, under --precision f32 and bf16 (the same quantisation arithmetic both ways);
  - the same kind of --quant-experts on a quantised file is a no-op; the other kind is exit 2;
  - re-converting a quantised file (same kind, --dtype) keeps the stored experts and scales;
  - a .pt checkpoint whose expert width (40) is not a multiple of 32: int8 works (bit-equal
    forward), int4 is exit 2 naming file and tensor, with no output file;
  - tools/make_random_model.py (tiny shape) writes float / int8 / int4 files that load and run;
  - hand-made bad files (truncated / wrong-dtype / missing / non-finite scales, wrong weight dtype,
    quantised tensors outside the routed experts or without the metadata, -128, int4 width) are
    exit 2 with one line naming the file and the tensor.
Run: /usr/bin/python3 tests/test_quant_file.py   (env DITMOE_BIN, DITMOE_SRC)"""
import json
import os
import subprocess
import sys
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
sys.path.insert(0, os.path.join(SRC, "tools"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tests"))
from testlib import TempDirCase  # noqa: E402
import safetensors_io  # noqa: E402

CONVERT = os.path.join(BIN, "ditmoe-convert")
FORWARD = os.path.join(BIN, "ditmoe-forward")
ASSETS = {"ditmoe": os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors"),
          "promoe": os.path.join(SRC, "assets", "promoe-fmnist.safetensors")}
EXPERT_KEY = {"ditmoe": "blocks.1.moe.experts.3.", "promoe": "blocks.1.mlp.experts.2."}


def run(*cmd):
    p = subprocess.run([*cmd], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def bf16_bits_to_f32(u16):
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class Base(TempDirCase):
    PREFIX = "ditmoe-quantfile-"

    def width40_pt(self, name, seed):
        """A random DiT-MoE .pt (as torch.save writes it) of hidden size 40: not a multiple of 32."""
        from dit_moe_ref import DiTMoE, randomize_
        cfg = dict(hidden_size=40, depth=2, num_heads=4, num_experts=4, top_k=2, attention="timm",
                   patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)
        pt = self.path(name)
        torch.save({"ema": randomize_(DiTMoE(**cfg), seed).state_dict()}, pt)
        return pt

    def inputs(self, model, B=4):
        meta = json.loads(safetensors_io.read_header(model)[1]["ditmoe"])
        S, C, nc = meta["input_size"], meta["in_channels"], meta["num_classes"]
        rng = np.random.default_rng(7)
        paths = [self.path(f"{n}_{B}_{S}_{C}.npy") for n in "xty"]
        np.save(paths[0], rng.standard_normal((B, C, S, S)).astype(np.float32))
        np.save(paths[1], rng.uniform(0.05, 0.95, B).astype(np.float32))
        y = rng.integers(0, nc, B).astype(np.int64)
        y[-1] = nc                                   # one null-class image (ProMoE: uncond expert)
        np.save(paths[2], y)
        return paths

    def forward(self, model, out, *extra, ok=True):
        x, t, y = self.inputs(model)
        rc, so, se = run(FORWARD, "-q", "--model", model, "--x", x, "--t", t, "--y", y,
                         "--out", out, "--threads", "2", *extra)
        if ok:
            self.assertEqual(rc, 0, se)
            with open(out, "rb") as f:
                return f.read()
        return rc, se

    def convert(self, src, dst, *extra, ok=True):
        rc, so, se = run(CONVERT, "-q", src, dst, *extra)
        if ok:
            self.assertEqual(rc, 0, se)
        return rc, se

    def assert_bad(self, rc, err, *needles):
        self.assertEqual(rc, 2, err)
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, err)
        for n in needles:
            self.assertIn(n, err)


class RoundTrip(Base):
    def check_layout(self, f32, q, bits):
        """The stored tensors are what docs/format.md says, computed from the f32 values."""
        tf, _ = safetensors_io.read(f32)
        tq, meta = safetensors_io.read(q)
        self.assertEqual(meta.get("quant_experts"), f"int{bits}")
        n = 0
        for name, w in tf.items():
            if name not in tq or tq[name].dtype == w.dtype:
                self.assertTrue(torch.equal(tq[name], w), name)    # everything else unchanged
                continue
            n += 1
            self.assertEqual(tq[name].numel() * tq[name].element_size() * (4 if bits == 8 else 8),
                             w.numel() * 4, name)                     # 1 byte or 4 bits a weight
            w = w.numpy().astype(np.float32)
            s = tq[name + ".scale"]
            if bits == 8:
                self.assertEqual(tq[name].dtype, torch.int8, name)
                qv, s = tq[name].numpy().astype(np.float32), s.numpy()
                self.assertEqual(s.dtype, np.float32)
                np.testing.assert_array_equal(s, np.abs(w).max(1) / np.float32(127), name)
                self.assertGreaterEqual(qv.min(), -127)
                deq = qv * s[:, None]
                self.assertTrue(np.all(np.abs(deq - w) <= s[:, None] * 0.5001 + 1e-30), name)
            else:
                self.assertEqual(tq[name].dtype, torch.uint8, name)
                b = tq[name].numpy()
                lo, hi = (b & 15).astype(np.int8), (b >> 4).astype(np.int8)
                qv = np.empty((b.shape[0], 2 * b.shape[1]), np.float32)
                qv[:, 0::2] = np.where(lo >= 8, lo - 16, lo)
                qv[:, 1::2] = np.where(hi >= 8, hi - 16, hi)
                self.assertEqual(s.dtype, torch.bfloat16)
                d = s.float().numpy()
                self.assertEqual(d.shape, (w.shape[0], w.shape[1] // 32))
                dfull = np.repeat(d, 32, axis=1)
                # d = bf16(m / -8), m the group's value of largest magnitude: |d| ~ max|w| / 8
                gmax = np.abs(w).reshape(w.shape[0], -1, 32).max(2)
                np.testing.assert_allclose(np.abs(d), gmax / 8, rtol=2 ** -8)
                err, ad = np.abs(qv * dfull - w), np.abs(dfull) * (1 + 2 ** -7) + 1e-30
                # rounding to nearest: half a step; the top of the range (w/d > 7.5: the value
                # opposite in sign to m, clamped to 7) at most one step (+ d's bf16 rounding, 8 x 2^-8)
                inside = np.abs(w) <= 7.5 * np.abs(dfull)
                self.assertTrue(np.all(err[inside] <= 0.5 * ad[inside]), name)
                self.assertTrue(np.all(err <= ad * (1 + 2 ** -4)), name)  # d rounded to bf16
                self.assertTrue(np.all(qv >= -8) and np.all(qv <= 7), name)
        self.assertGreater(n, 0)
        return n

    def test_assets_bit_for_bit(self):
        for arch, src in ASSETS.items():
            outs = {}
            for bits in (8, 4):
                q = self.path(f"{arch}-int{bits}.safetensors")
                self.convert(src, q, "--quant-experts", f"int{bits}")
                self.assertLess(os.path.getsize(q), os.path.getsize(src) * (0.7 if bits == 8 else 0.6))
                if bits == 4:
                    self.assertLess(os.path.getsize(q), os.path.getsize(self.path(f"{arch}-int8.safetensors")))
                n = self.check_layout(src, q, bits)
                self.assertEqual(n, 3 * 4 * 8 if arch == "ditmoe" else 2 * 2 * 9, arch)
                for prec in ("f32", "bf16"):
                    kind = f"int{bits}"
                    a = self.forward(src, self.path("a.npy"), "--precision", prec, "--quant-experts", kind)
                    b = self.forward(q, self.path("b.npy"), "--precision", prec)
                    c = self.forward(q, self.path("c.npy"), "--precision", prec, "--quant-experts", kind)
                    self.assertEqual(a, b, f"{arch} {kind} {prec}: stored != quantised at load")
                    self.assertEqual(a, c, f"{arch} {kind} {prec}: same-kind flag not a no-op")
                    outs[(bits, prec)] = a
                other = "int4" if bits == 8 else "int8"
                rc, err = self.forward(q, self.path("d.npy"), "--quant-experts", other, ok=False)
                self.assert_bad(rc, err, q, f"int{bits}", other)
            f32 = self.forward(src, self.path("f.npy"))
            self.assertEqual(len({f32, *outs.values()}), 5, f"{arch}: precisions not distinct")

    def test_reconvert_keeps_stored(self):
        src = ASSETS["ditmoe"]
        q = self.path("re-int8.safetensors")
        self.convert(src, q, "--quant-experts", "int8")
        for extra in ((), ("--quant-experts", "int8"), ("--dtype", "bf16")):
            r = self.path("re2.safetensors")
            self.convert(q, r, *extra)
            tq, _ = safetensors_io.read(q)
            tr, meta = safetensors_io.read(r)
            self.assertEqual(meta.get("quant_experts"), "int8")
            k = EXPERT_KEY["ditmoe"] + "down_proj.weight"
            self.assertTrue(torch.equal(tq[k], tr[k]))
            self.assertEqual(tr[k + ".scale"].dtype, torch.float32)      # scales never narrowed
            self.assertTrue(torch.equal(tq[k + ".scale"], tr[k + ".scale"]))
            if extra == ("--dtype", "bf16"):
                self.assertEqual(tr["blocks.0.attn.qkv.weight"].dtype, torch.bfloat16)
        rc, err = self.convert(q, self.path("re3.safetensors"), "--quant-experts", "int4", ok=False)
        self.assert_bad(rc, err, q, "int8", "re-quantise")
        self.assertFalse(os.path.exists(self.path("re3.safetensors")))


class OddWidth(Base):
    """A checkpoint (.pt, as torch.save writes it) with hidden size 40: not a multiple of 32."""

    def test_int4_refused_int8_works(self):
        pt = self.width40_pt("odd.pt", 3)
        f32 = self.path("odd.safetensors")
        self.convert(pt, f32, "--heads", "4")
        out = self.path("odd-int4.safetensors")
        rc, err = self.convert(pt, out, "--heads", "4", "--quant-experts", "int4", ok=False)
        self.assert_bad(rc, err, pt, "blocks.0.moe.experts.0.gate_proj.weight", "multiple of 32",
                        "[160, 40]")
        self.assertFalse(os.path.exists(out))
        rc, err = self.forward(f32, self.path("o.npy"), "--quant-experts", "int4", ok=False)
        self.assert_bad(rc, err, "multiple of 32")
        q8 = self.path("odd-int8.safetensors")
        self.convert(pt, q8, "--heads", "4", "--quant-experts", "int8")
        self.assertEqual(self.forward(f32, self.path("a.npy"), "--quant-experts", "int8"),
                         self.forward(q8, self.path("b.npy")))


class BadFiles(Base):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.q8 = os.path.join(cls.dir, "base-int8.safetensors")
        cls.q4 = os.path.join(cls.dir, "base-int4.safetensors")
        for p, k in ((cls.q8, "int8"), (cls.q4, "int4")):
            subprocess.run([CONVERT, "-q", ASSETS["ditmoe"], p, "--quant-experts", k], check=True)

    def edit(self, base, fn, name):
        t, meta = safetensors_io.read(base)
        fn(t, meta)
        p = self.path(name)
        safetensors_io.write(p, t, meta)
        return p

    def bad(self, base, fn, *needles):
        p = self.edit(base, fn, "bad.safetensors")
        rc, err = self.forward(p, self.path("o.npy"), ok=False)
        self.assert_bad(rc, err, p, *needles)

    def test_scale_tensors(self):
        k = "blocks.2.moe.experts.5.up_proj.weight"
        s = k + ".scale"
        self.bad(self.q8, lambda t, m: t.__setitem__(s, t[s][:-1].clone()), s,
                 "shape [255] expected [256]")                                   # truncated
        self.bad(self.q4, lambda t, m: t.__setitem__(s, t[s][:, :-1].clone()), s,
                 "shape [256,3] expected [256,4]")
        self.bad(self.q8, lambda t, m: t.__setitem__(s, t[s].half()), s, "dtype F16 expected F32")
        self.bad(self.q4, lambda t, m: t.__setitem__(s, t[s].float()), s, "dtype F32 expected BF16")
        self.bad(self.q8, lambda t, m: t.pop(s), "missing tensor " + s)

        def nan(t, m):
            v = t[s].clone()
            v[7] = float("inf")
            t[s] = v
        self.bad(self.q8, nan, k, "row 7", "not finite")

    def test_weight_dtypes(self):
        k = "blocks.1.moe.experts.0.down_proj.weight"
        f32, _ = safetensors_io.read(ASSETS["ditmoe"])
        self.bad(self.q8, lambda t, m: t.__setitem__(k, f32[k]), k, "dtype F32 expected I8")
        self.bad(self.q8, lambda t, m: m.__setitem__("quant_experts", "int4"), "dtype I8 expected U8")
        self.bad(self.q8, lambda t, m: m.pop("quant_experts"), "dtype I8", "no \"quant_experts\"")
        self.bad(self.q8, lambda t, m: m.__setitem__("quant_experts", "int3"), "quant_experts", "int3")
        a = "blocks.0.attn.proj.weight"

        def attn_i8(t, m):
            t[a] = torch.zeros(t[a].shape, dtype=torch.int8)
        self.bad(self.q8, attn_i8, a, "only routed experts")

        def m128(t, m):
            v = t[k].clone()
            v[3, 5] = -128
            t[k] = v
        self.bad(self.q8, m128, k, "-128", "[3, 5]")

    def test_nonfinite_expert_weight(self):
        """Quantising NaN or Inf is refused with the tensor and element named (at load and in the
        converter), not turned into undefined integer conversions."""
        k = "blocks.1.moe.experts.3.gate_proj.weight"
        for v, word in ((float("nan"), "NaN"), (float("-inf"), "-Inf")):
            def poison(t, m):
                w = t[k].clone()
                w[2, 9] = v
                t[k] = w
            p = self.edit(ASSETS["ditmoe"], poison, "nonfinite.safetensors")
            for bits in ("int8", "int4"):
                rc, err = self.forward(p, self.path("o.npy"), "--quant-experts", bits, ok=False)
                # at load gate and up are one matrix (gate rows first), named gate_proj+up_proj
                self.assert_bad(rc, err, "blocks.1.moe.experts.3.gate_proj", word, "[2, 9]")
                dst = self.path("nonfinite-q.safetensors")
                rc, err = self.convert(p, dst, "--quant-experts", bits, ok=False)
                self.assert_bad(rc, err, k, word, "[2, 9]")
                self.assertFalse(os.path.exists(dst))
                self.assertFalse([f for f in os.listdir(self.dir) if "nonfinite-q" in f])

    def test_int4_width(self):
        """A file that claims int4 for weights whose input width (40) is not a multiple of 32."""
        pt = self.width40_pt("w40.pt", 4)
        q8 = self.path("w40-int8.safetensors")
        self.convert(pt, q8, "--heads", "4", "--quant-experts", "int8")

        def to_int4(t, m):
            m["quant_experts"] = "int4"
            for name in list(t):
                if ".experts." in name and name.endswith(".weight"):
                    r, c = t[name].shape
                    t[name] = torch.zeros((r, c // 2), dtype=torch.uint8)
                    t[name + ".scale"] = torch.zeros((r, max(c // 32, 1)), dtype=torch.bfloat16)
        self.bad(q8, to_int4, "blocks.0.moe.experts.0.gate_proj.weight", "multiple of 32")


class RandomModel(Base):
    """tools/make_random_model.py writes loadable files directly in the stored forms."""

    def test_tiny_float_int8_int4(self):
        from dit_moe_ref import sincos_pos_embed
        gen = os.path.join(SRC, "tools", "make_random_model.py")
        outs = {}
        for e in ("float", "int8", "int4"):
            p = self.path(f"rand-{e}.safetensors")
            rc, so, se = run(sys.executable, gen, p, "--shape", "tiny", "--experts", e)
            self.assertEqual(rc, 0, se)
            t, meta = safetensors_io.read(p)
            self.assertEqual(meta.get("quant_experts"), None if e == "float" else e)
            k = "blocks.1.moe.experts.2.down_proj.weight"
            want = {"float": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[e]
            self.assertEqual(t[k].dtype, want)
            np.testing.assert_allclose(t["pos_embed"].numpy()[0], sincos_pos_embed(64, 4),
                                       atol=1e-6)
            if e == "int8":
                self.assertGreaterEqual(int(t[k].min()), -127)
            self.forward(p, self.path(f"r-{e}.npy"))
            out = np.load(self.path(f"r-{e}.npy"))
            self.assertTrue(np.isfinite(out).all())
            self.assertGreater(float(out.std()), 0.05)
            outs[e] = out
        # same seed and scales, different expert values
        self.assertFalse(np.array_equal(outs["int8"], outs["int4"]))
        rc, so, se = run(sys.executable, gen, self.path("odd.safetensors"), "--shape", "tiny",
                         "--hidden", "40", "--experts", "int4")
        self.assertNotEqual(rc, 0)
        self.assertIn("multiple of 32", se)
        self.assertFalse(os.path.exists(self.path("odd.safetensors")))


if __name__ == "__main__":
    unittest.main(verbosity=2)

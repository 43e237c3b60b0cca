"""tools/convert_checkpoint.py and tools/safetensors_io.py: torch.save round trips for every
checkpoint wrapping, dtype conversion, metadata fields, and bad-input handling.
Run: /usr/bin/python3 tests/test_convert.py   (env DITMOE_SRC optional)"""
import argparse
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get("PYTHON") or "/usr/bin/python3"
sys.path.insert(0, os.path.join(SRC, "tools"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import convert_checkpoint  # noqa: E402
import safetensors_io  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402

CONVERTER = os.path.join(SRC, "tools", "convert_checkpoint.py")
SMALL = dict(hidden_size=64, depth=2, num_heads=4, num_experts=4, top_k=2, attention="timm",
             patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)


def small_sd(seed=0, **over):
    cfg = dict(SMALL, **over)
    return randomize_(DiTMoE(**cfg), seed).state_dict()


def run_main(argv):
    """convert_checkpoint.main in-process -> (exit code, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = convert_checkpoint.main(argv)
        except SystemExit as e:          # argparse errors
            rc = e.code
    return rc, err.getvalue()


class Base(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-convert-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def save(self, obj, name="in.pt"):
        p = self.path(name)
        torch.save(obj, p)
        return p

    def convert_ok(self, obj, *flags):
        src, out = self.save(obj), self.path("out.safetensors")
        rc, err = run_main([src, out, *flags])
        self.assertEqual(rc, 0, err)
        tensors, meta = safetensors_io.read(out)
        return tensors, json.loads(meta["ditmoe"])

    def convert_fail(self, obj, *flags, src=None):
        src = src or self.save(obj)
        out = self.path("fail.safetensors")
        rc, err = run_main([src, out, *flags])
        self.assertNotEqual(rc, 0)
        self.assertFalse(os.path.exists(out), "failed conversion left an output file")
        self.assertEqual([f for f in os.listdir(self.dir) if f.endswith(".tmp")], [])
        lines = [ln for ln in err.strip().splitlines() if ln]
        self.assertEqual(len(lines), 1, f"expected a one-line message, got: {err!r}")
        return lines[0]

    def assert_same(self, got, want, dtype=None):
        self.assertEqual(list(got), list(want), "tensor names/order changed")
        for k, v in want.items():
            exp = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
            self.assertEqual(got[k].dtype, exp.dtype, k)
            self.assertEqual(tuple(got[k].shape), tuple(exp.shape), k)
            self.assertTrue(torch.equal(got[k], exp), f"{k}: values differ")


class TestSafetensorsIO(Base):
    def test_roundtrip_dtypes_and_layout(self):
        g = torch.Generator().manual_seed(1)
        t = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
             "c": np.arange(6, dtype=np.int32).reshape(2, 3), "d": torch.randn(3).half(),
             "e": torch.arange(-3, 4), "f": torch.tensor([0, 7, 255], dtype=torch.uint8),
             "s": torch.tensor(2.5)}
        p = self.path("x.safetensors")
        safetensors_io.write(p, t, {"k": "v"})
        got, meta = safetensors_io.read(p)
        self.assertEqual(meta, {"k": "v"})
        self.assertEqual(list(got), list(t))
        for k, v in t.items():
            v = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            self.assertEqual(got[k].dtype, v.dtype, k)
            self.assertTrue(torch.equal(got[k], v), k)
        # Independent check of the byte layout (spec of the format, not our reader).
        with open(p, "rb") as f:
            raw = f.read()
        n = struct.unpack("<Q", raw[:8])[0]
        self.assertEqual(n % 8, 0)
        self.assertTrue(raw[8:8 + n].decode().endswith("}") or raw[8:8 + n].rstrip(b" ").endswith(b"}"))
        hdr = json.loads(raw[8:8 + n])
        dts = {"a": "F32", "b": "BF16", "c": "I32", "d": "F16", "e": "I64", "f": "U8", "s": "F32"}
        off = 0
        for k in t:
            b, e = hdr[k]["data_offsets"]
            self.assertEqual(b, off, f"{k}: offsets not contiguous")
            self.assertEqual(hdr[k]["dtype"], dts[k])
            off = e
        self.assertEqual(8 + n + off, len(raw))
        # bf16 bytes = upper half of the fp32 pattern (values are exactly representable)
        b0 = hdr["b"]["data_offsets"][0]
        bits = np.frombuffer(raw[8 + n + b0: 8 + n + b0 + 14], dtype="<u2")
        f32 = (bits.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(f32, t["b"].float().numpy())
        a = np.frombuffer(raw[8 + n: 8 + n + 60], dtype="<f4").reshape(3, 5)
        np.testing.assert_array_equal(a, t["a"].numpy())


class TestWrappings(Base):
    def test_each_wrapping(self):
        sd = small_sd(0)
        other = small_sd(1)
        cases = {
            "bare": sd,
            "ema": {"ema": sd},
            "model": {"model": sd},
            "module": {"module": sd},
            "state_dict": {"state_dict": sd},
            "module. prefix": {"module." + k: v for k, v in sd.items()},
            "model. prefix in module": {"module": {"model." + k: v for k, v in sd.items()}},
            "training dict": {"model": other, "ema": sd, "opt": {"state": {}, "lr": 1e-4},
                              "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)},
            "model before module": {"module": other, "model": sd},
            "module before state_dict": {"state_dict": other, "module": sd},
        }
        for what, obj in cases.items():
            with self.subTest(what):
                got, meta = self.convert_ok(obj, "--heads", "4")
                self.assert_same(got, sd)
                self.assertEqual(meta["depth"], 2)

    def test_non_tensor_entries_ignored_int_kept(self):
        sd = dict(small_sd(0))
        sd["extra.step"] = torch.tensor([3, 4], dtype=torch.int64)
        obj = dict(sd, note="hello", epoch=3)
        got, _ = self.convert_ok(obj, "--heads", "4", "--dtype", "bf16")
        self.assertNotIn("note", got)
        self.assertEqual(got["extra.step"].dtype, torch.int64)
        self.assertTrue(torch.equal(got["extra.step"], sd["extra.step"]))


class TestDtypes(Base):
    def test_dtype_flag(self):
        sd = small_sd(0)
        for flag, dt in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
            with self.subTest(flag):
                got, _ = self.convert_ok(sd, "--heads", "4", "--dtype", flag)
                self.assert_same(got, sd, dt)
                # independent rounding check: relative error within half an ulp of the format
                eps = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}[flag]
                for k, v in sd.items():
                    g = got[k].double()
                    rel = (g - v.double()).abs() / v.double().abs().clamp_min(1e-30)
                    if flag == "f16":
                        rel = rel[v.abs() > 6.2e-5]      # normal fp16 range only
                    self.assertLessEqual(float(rel.max()) if rel.numel() else 0.0, eps, k)

    def test_keep_stored_dtype(self):
        sd = {k: v.half() for k, v in small_sd(0).items()}
        got, _ = self.convert_ok(sd, "--heads", "4")
        self.assert_same(got, sd)
        got, _ = self.convert_ok(sd, "--heads", "4", "--dtype", "f32")
        self.assert_same(got, sd, torch.float32)


class TestMetadata(Base):
    def test_released_table_s(self):
        sd = small_sd(0, hidden_size=384, depth=1, num_experts=2, input_size=8, num_classes=5)
        got, meta = self.convert_ok({"ema": sd})
        self.assertEqual(len(got), 12 + 10 + 3 * 2)
        want = {"format_version": 1, "arch": "dit-moe", "name": "DiT-MoE-S/2-2E2A",
                "hidden_size": 384, "depth": 1, "num_heads": 6, "num_experts": 2, "top_k": 2,
                "expert_hidden": 1536, "shared_hidden": 768, "attention": "timm",
                "patch_size": 2, "input_size": 8, "in_channels": 4, "learn_sigma": True,
                "num_classes": 5, "objective": "ddpm", "vae_scale": 0.18215}
        self.assertEqual(meta, want)

    def test_qknorm_flags_and_class_names(self):
        sd = small_sd(0, attention="qknorm", num_experts=8, learn_sigma=False, depth=3,
                      num_heads=8)
        names = self.path("names.txt")
        with open(names, "w") as f:
            f.write("\n".join(f"class {i}" for i in range(10)) + "\n")
        got, meta = self.convert_ok(sd, "--heads", "8", "--top-k", "1", "--class-names", names,
                                    "--name", "tiny", "--steps", "20", "--cfg-scale", "1.5")
        self.assertEqual(len(got), 12 + 3 * (14 + 3 * 8))
        self.assertEqual(meta["num_heads"], 8)
        self.assertEqual(meta["top_k"], 1)
        self.assertEqual(meta["depth"], 3)
        self.assertEqual(meta["num_experts"], 8)
        self.assertEqual(meta["attention"], "qknorm")
        self.assertEqual(meta["objective"], "rf")
        self.assertIs(meta["learn_sigma"], False)
        self.assertEqual(meta["name"], "tiny")
        self.assertEqual(meta["class_names"], [f"class {i}" for i in range(10)])
        self.assertEqual(meta["sampling"], {"sampler": "euler", "steps": 20, "cfg_scale": 1.5,
                                            "cfg_channels": 0})
        self.assertIn("--heads", self.convert_fail(sd, "--heads", "4"))
        _, meta = self.convert_ok(sd, "--heads", "8", "--objective", "ddpm",
                                  "--sampler", "ddim", "--cfg-channels", "4")
        self.assertEqual(meta["objective"], "ddpm")
        self.assertEqual(meta["sampling"], {"sampler": "ddim", "steps": 250, "cfg_scale": 4.0,
                                            "cfg_channels": 4})
        self.assertNotIn("class_names", meta)

    def test_no_shared_expert(self):
        sd = small_sd(0, shared_hidden=0)
        _, meta = self.convert_ok(sd, "--heads", "4")
        self.assertEqual(meta["shared_hidden"], 0)
        self.assertEqual(meta["expert_hidden"], 256)

    def test_vae_scale(self):
        _, meta = self.convert_ok(small_sd(0), "--heads", "4", "--vae-scale", "0.379")
        self.assertAlmostEqual(meta["vae_scale"], 0.379)
        self.assertIn("--vae-scale", self.convert_fail(small_sd(0), "--heads", "4",
                                                       "--vae-scale", "0"))


class TestBadInput(Base):
    def test_heads_required(self):
        msg = self.convert_fail(small_sd(0))
        self.assertIn("--heads", msg)
        self.assertIn("64", msg)

    def test_bad_flags(self):
        sd = small_sd(0)
        self.assertIn("--heads", self.convert_fail(sd, "--heads", "5"))
        self.assertIn("--top-k", self.convert_fail(sd, "--heads", "4", "--top-k", "9"))
        self.assertIn("--num-classes", self.convert_fail(sd, "--heads", "4", "--num-classes", "7"))
        names = self.path("names.txt")
        with open(names, "w") as f:
            f.write("a\nb\n")
        self.assertIn("--class-names", self.convert_fail(sd, "--heads", "4", "--class-names", names))
        self.assertIn("--class-names",
                      self.convert_fail(sd, "--heads", "4", "--class-names", self.path("nope.txt")))

    def test_not_ditmoe(self):
        msg = self.convert_fail({"weight": torch.zeros(3), "bias": torch.zeros(3)})
        self.assertIn("x_embedder.proj.weight", msg)
        sd = dict(small_sd(0))
        del sd["blocks.0.moe.gate.weight"]
        self.assertIn("blocks.0.moe.gate.weight", self.convert_fail(sd, "--heads", "4"))
        sd = dict(small_sd(0))
        del sd["blocks.1.moe.experts.3.down_proj.weight"]
        self.assertIn("blocks.1.moe.experts.3.down_proj.weight",
                      self.convert_fail(sd, "--heads", "4"))
        sd = dict(small_sd(0))
        sd["blocks.1.moe.gate.weight"] = torch.zeros(5, 64)
        msg = self.convert_fail(sd, "--heads", "4")
        self.assertIn("blocks.1.moe.gate.weight", msg)
        self.assertIn("[5,64]", msg)

    def test_not_a_torch_file(self):
        p = self.path("junk.pt")
        with open(p, "wb") as f:
            f.write(b"this is not a checkpoint")
        self.assertIn("junk.pt", self.convert_fail(None, src=p))
        self.assertIn("missing.pt", self.convert_fail(None, src=self.path("missing.pt")))

    def test_existing_output_untouched_on_failure(self):
        out = self.path("out.safetensors")
        with open(out, "wb") as f:
            f.write(b"old")
        rc, _ = run_main([self.save({"x": torch.zeros(1)}), out])
        self.assertEqual(rc, 2)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), b"old")


class TestCommandLine(Base):
    """The real executable: exit codes and messages."""

    def test_cli(self):
        src = self.save({"ema": small_sd(0)})
        out = self.path("m.safetensors")
        r = subprocess.run([PYTHON, CONVERTER, src, out, "--heads", "4", "--dtype", "bf16"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.exists(out))
        out2 = self.path("m2.safetensors")
        r = subprocess.run([PYTHON, CONVERTER, src, out2], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)
        self.assertIn("--heads", r.stderr)
        self.assertFalse(os.path.exists(out2))


if __name__ == "__main__":
    unittest.main(verbosity=1)

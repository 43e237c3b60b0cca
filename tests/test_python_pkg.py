"""python/ditmoe (ctypes over libditmoe.so): Model.forward equals ditmoe-forward bit for bit
(safetensors and .pt, with overrides), errors are ditmoe.Error with the library's message,
Pipeline.generate gives exactly ditmoe-sample's pixels for the same seed and parameters (when
the library has the generation pipeline), and the installed package finds the installed
library and assets.
Run: /usr/bin/python3 tests/test_python_pkg.py   (env DITMOE_BIN, DITMOE_SRC, DITMOE_BUILD)"""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
BUILD = os.environ.get("DITMOE_BUILD") or os.path.dirname(BIN)
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tests"))
from testlib import import_ditmoe  # noqa: E402
ditmoe = import_ditmoe()
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402

MODEL = os.path.join(SRC, "assets", "ditmoe-fmnist.safetensors")


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


class Package(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-py-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, n):
        return os.path.join(self.dir, n)

    def cli_forward(self, model, x, t, y):
        for n, a in (("x", x), ("t", t), ("y", y)):
            np.save(self.path(n + ".npy"), a)
        r = run(os.path.join(BIN, "ditmoe-forward"), "--model", model, "--x", self.path("x.npy"),
                "--t", self.path("t.npy"), "--y", self.path("y.npy"), "--out", self.path("o.npy"))
        self.assertEqual(r.returncode, 0, r.stderr)
        return np.load(self.path("o.npy"))

    def test_model_forward_matches_cli(self):
        m = ditmoe.Model(MODEL)
        c = m.config
        rng = np.random.RandomState(0)
        x = rng.randn(3, c.in_channels, c.input_size, c.input_size).astype(np.float32)
        t = np.array([0.1, 0.5, 0.9], np.float32)
        y = np.array([0, 4, c.num_classes], np.int64)
        out = m.forward(x, t, y)
        self.assertEqual(out.tobytes(), self.cli_forward(MODEL, x, t, y).tobytes())
        out2, (ids, w) = m.forward(x, t, y, routes=True)
        self.assertEqual(out2.tobytes(), out.tobytes())
        T = (c.input_size // c.patch_size) ** 2
        self.assertEqual(ids.shape, (c.moe_layers, 3 * T, c.top_k))
        self.assertTrue(((ids >= 0) & (ids < c.num_experts)).all())
        self.assertTrue(np.allclose(w.sum(-1), 1, atol=1e-5) or (w > 0).all())
        with self.assertRaises(ValueError):
            m.forward(x[:, :1], t, y)
        m.close()

    def test_pt_with_overrides(self):
        sd = randomize_(DiTMoE(hidden_size=64, depth=2, num_heads=4, num_experts=4, top_k=2,
                               attention="timm", patch_size=2, input_size=8, in_channels=4,
                               learn_sigma=True, num_classes=10), 3).state_dict()
        pt = self.path("m.pt")
        torch.save({"model": sd, "step": 3}, pt)
        with self.assertRaises(ditmoe.Error) as e:
            ditmoe.Model(pt)
        self.assertEqual(e.exception.kind, "FORMAT")
        self.assertIn("pass --heads N", str(e.exception))
        m = ditmoe.Model(pt, heads=4, top_k=1)
        self.assertEqual((m.config.num_heads, m.config.top_k), (4, 1))
        st = self.path("m.safetensors")
        r = run(sys.executable, os.path.join(SRC, "tools", "convert_checkpoint.py"), pt, st,
                "--heads", "4", "--top-k", "1")
        self.assertEqual(r.returncode, 0, r.stderr)
        rng = np.random.RandomState(1)
        x = rng.randn(2, 4, 8, 8).astype(np.float32)
        t = np.array([10.0, 900.0], np.float32)
        y = np.array([1, 10], np.int64)
        self.assertEqual(m.forward(x, t, y).tobytes(), self.cli_forward(st, x, t, y).tobytes())

    def test_overrides_on_metadata(self):
        """Overrides given for a safetensors file replace fields of its "ditmoe" metadata."""
        base = ditmoe.Model(MODEL)
        m = ditmoe.Model(MODEL, top_k=1, name="renamed")
        self.assertEqual((m.config.top_k, m.config.name), (1, "renamed"))
        self.assertNotEqual(base.config.top_k, 1)
        x = np.zeros((1, 4, base.config.input_size, base.config.input_size), np.float32) + 0.3
        t, y = np.array([0.5], np.float32), np.array([2], np.int64)
        self.assertNotEqual(base.forward(x, t, y).tobytes(), m.forward(x, t, y).tobytes())
        with self.assertRaises(ditmoe.Error) as e:
            ditmoe.Model(MODEL, router="softmax")
        self.assertEqual(e.exception.kind, "ARG")
        self.assertIn("--router: only for ProMoE", str(e.exception))
        with self.assertRaises(ditmoe.Error) as e:
            ditmoe.Model(MODEL, heads=5)                 # 128 % 5: cross-checked like metadata
        self.assertIn("num_heads", str(e.exception))

    def test_errors(self):
        with self.assertRaises(ditmoe.Error) as e:
            ditmoe.Model(self.path("missing.safetensors"))
        self.assertEqual(e.exception.kind, "IO")
        self.assertIn("missing.safetensors", str(e.exception))
        with self.assertRaises(ditmoe.Error):
            ditmoe.Model(MODEL, backend="tpu")

    @unittest.skipUnless(ditmoe._lib.HAVE_PIPELINE, "library without dm_pipeline_* (merge pending)")
    def test_pipeline_pixels_equal_cli(self):
        pipe = ditmoe.Pipeline(threads=2)
        imgs = pipe.generate(["sneaker", 3], n=2, steps=3, seed=11, batch=3)
        self.assertEqual(imgs.dtype, np.uint8)
        self.assertEqual(imgs.shape[0], 4)
        r = run(os.path.join(BIN, "ditmoe-sample"), "--class", "sneaker,3", "-n", "2", "--steps",
                "3", "--seed", "11", "-q", "--threads", "2", "-o", self.path("cli-%d.png"))
        self.assertEqual(r.returncode, 0, r.stderr)
        from PIL import Image
        for i in range(4):
            a = np.array(Image.open(self.path(f"cli-{i}.png"))).reshape(imgs[i].shape)
            self.assertTrue((a == imgs[i]).all(), f"image {i} differs from ditmoe-sample's")
        again, rec = pipe.generate([7], steps=2, seed=1, routing=True, cfg_scale=2.0)
        self.assertEqual(len(rec), 2)                    # euler: one evaluation per step
        self.assertEqual([r["step"] for r in rec], [0, 1])
        self.assertEqual(rec[0]["ids"].shape[1], 2)      # guided: [x; x] rows
        with self.assertRaises(ditmoe.Error) as e:
            pipe.generate([207], steps=2)
        self.assertIn("golden retriever", str(e.exception))

    @unittest.skipUnless(ditmoe._lib.HAVE_PIPELINE, "library without dm_pipeline_* (merge pending)")
    def test_pipeline_pt_overrides_equal_cli(self):
        """Pipeline(X.pt, heads=..., ...) gives ditmoe-sample --model X.pt --heads ...'s pixels."""
        sd = randomize_(DiTMoE(hidden_size=64, depth=2, num_heads=4, num_experts=4, top_k=2,
                               attention="qknorm", patch_size=2, input_size=8, in_channels=4,
                               learn_sigma=False, num_classes=10), 5).state_dict()
        pt = self.path("p.pt")
        torch.save({"ema": sd, "opt": {"lr": 1e-4}}, pt)
        with self.assertRaises(ditmoe.Error) as e:
            ditmoe.Pipeline(pt)
        self.assertIn("pass --heads N", str(e.exception))
        ov = dict(heads=4, top_k=1, vae_scale=0.3)
        pipe = ditmoe.Pipeline(pt, threads=2, **ov)
        self.assertEqual((pipe.config.num_heads, pipe.config.top_k), (4, 1))
        imgs = pipe.generate([2, 9], n=1, steps=3, seed=4)
        r = run(os.path.join(BIN, "ditmoe-sample"), "--model", pt, "--heads", "4", "--top-k", "1",
                "--vae-scale", "0.3", "--class", "2,9", "--steps", "3", "--seed", "4", "-q",
                "--threads", "2", "-o", self.path("pt-%d.png"))
        self.assertEqual(r.returncode, 0, r.stderr)
        from PIL import Image
        for i in range(2):
            a = np.array(Image.open(self.path(f"pt-{i}.png"))).reshape(imgs[i].shape)
            self.assertTrue((a == imgs[i]).all(), f"image {i} differs from ditmoe-sample's")
        other = ditmoe.Pipeline(pt, threads=2, heads=4, top_k=1, vae_scale=0.6)
        self.assertFalse((other.generate([2, 9], steps=3, seed=4) == imgs).all())

    def test_installed_package(self):
        prefix = self.path("prefix")
        r = run("cmake", "--install", BUILD, "--prefix", prefix)
        self.assertEqual(r.returncode, 0, r.stderr)
        pkg = os.path.join(prefix, "share", "ditmoe", "python")
        self.assertTrue(os.path.exists(os.path.join(pkg, "ditmoe", "__init__.py")))
        env = {k: v for k, v in os.environ.items() if k not in ("DITMOE_LIB", "DITMOE_ASSETS")}
        env["PYTHONPATH"] = pkg
        code = ("import ditmoe; print(ditmoe._lib.lib._name); "
                "print(ditmoe.default_asset('ditmoe-fmnist.safetensors')); "
                "print(ditmoe.Model(ditmoe.default_asset('ditmoe-fmnist.safetensors')).config)")
        r = run(sys.executable, "-c", code, env=env, cwd=self.dir)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(os.path.realpath(lines[0]),
                         os.path.realpath(os.path.join(prefix, "lib", "libditmoe.so")))
        self.assertTrue(lines[1].startswith(os.path.join(prefix, "share", "ditmoe", "assets")))


if __name__ == "__main__":
    unittest.main(verbosity=2)

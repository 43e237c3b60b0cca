"""ditmoe-sample on a ProMoE model against ProMoE's reference sampler (promoe.md 6.1-6.2,
tests/ref/promoe_ref.py::euler_cfg): RF Euler on the first N points of linspace(1, 0, N+1),
the network fed t = 1000 * sigma, two passes (cond / null label) with guidance on ALL channels.
The C run takes every sampling setting from the model's metadata (no --steps / --sampler /
--cfg-scale / --cfg-channels flags): 250 steps, euler, cfg 1.5, all channels.
Same initial noise (--init-noise); small random ProMoE (token choice, top-1, identity).
Tolerance: max |C - ref| <= 1e-4 * RMS(ref) over the final latents (float32 state; the
engine's step sizes 1/N and time grid i/N differ from the float64 linspace by float32 rounding
only). A control run with time_scale 1 (sigma fed as is) must land far outside it.
Run: DITMOE_BIN=build/bin /usr/bin/python3 tests/test_promoe_sampler.py"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
PYTHON = os.environ.get("PYTHON") or "/usr/bin/python3"
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tools"))
import promoe_ref  # noqa: E402
import safetensors_io  # noqa: E402

EXE = os.path.join(BIN, "ditmoe-sample")
REL_TOL = 1e-4
CFG = dict(hidden_size=64, depth=4, num_heads=4, num_experts=6, top_k=1, patch_size=2,
           input_size=8, in_channels=4, learn_sigma=True, num_classes=10, variant="tc",
           router="identity")


class ProMoESampler(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-promoe-sample-")
        cls.dir = cls._tmp.name
        cls.model = promoe_ref.randomize_(promoe_ref.ProMoE(**CFG), 21).eval()
        # Gentle velocities (a real model's are O(1) but smooth); the random model's final layer
        # is scaled down so 250 steps stay well-conditioned.
        with torch.no_grad():
            cls.model.final_layer.linear.weight.mul_(0.5)
        pt = os.path.join(cls.dir, "m.pth")
        cls.path = os.path.join(cls.dir, "m.safetensors")
        torch.save({"ema_model_state_dict": cls.model.state_dict(), "step": 1}, pt)
        r = subprocess.run([PYTHON, os.path.join(SRC, "tools", "convert_checkpoint.py"), pt,
                            cls.path, "--heads", "4"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        g = torch.Generator().manual_seed(5)
        cls.z0 = torch.randn(3, 4, 8, 8, generator=g)
        cls.noise = os.path.join(cls.dir, "z0.npy")
        np.save(cls.noise, cls.z0.numpy())

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_metadata_defaults(self):
        _, meta = safetensors_io.read(self.path)
        meta = json.loads(meta["ditmoe"])
        self.assertEqual(meta["sampling"], {"sampler": "euler", "steps": 250, "cfg_scale": 1.5,
                                            "cfg_channels": 0})
        self.assertEqual(meta["time_scale"], 1000.0)

    def test_euler_cfg_defaults(self):
        out = os.path.join(self.dir, "lat.npy")
        cmd = [EXE, "--model", self.path, "--class", "2,5,7", "--init-noise", self.noise,
               "--latent-only", "--save-latent", out, "-q", "--threads", "1", "--seed", "3"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, f"{' '.join(cmd)}\n{r.stderr}")
        got = np.load(out)
        y = torch.tensor([2, 5, 7])
        ref = promoe_ref.euler_cfg(self.model, self.z0, y, steps=250, cfg_scale=1.5).numpy()
        rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        err = float(np.max(np.abs(got - ref)))
        ctl = promoe_ref.euler_cfg(self.model, self.z0, y, steps=250, cfg_scale=1.5,
                                   time_scale=1.0).numpy()
        ctl_err = float(np.max(np.abs(ctl - ref)))
        print(f"ProMoE euler 250 steps cfg 1.5: max err {err:.3g}, rms {rms:.3g}, ratio "
              f"{err / rms:.2e} (control, t not x1000: {ctl_err / rms:.2e})", file=sys.stderr)
        self.assertEqual(got.shape, ref.shape)
        self.assertTrue(np.all(np.isfinite(got)))
        self.assertLessEqual(err, REL_TOL * rms)
        self.assertGreater(ctl_err, 100 * REL_TOL * rms)


if __name__ == "__main__":
    unittest.main(verbosity=1)

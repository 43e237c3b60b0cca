"""ditmoe-sample vs the PyTorch reference sampler (tests/ref/sampler_ref.py) on small random
DiT-MoE models (tests/ref/dit_moe_ref.py, converted with tools/convert_checkpoint.py), from the
same injected initial noise: DDIM (eta 0 and 0.5), DDPM ancestral (the reference re-creates the
engine's Philox noise), RF Euler and Heun, with guidance on 3 / all channels and an interval.
Also: the Python Philox matches the published known-answer vectors, and the same image from
--batch 1 and --batch 3 is bit-identical.
Tolerance: max |C - ref| <= 1e-4 * RMS(ref) over the final latent (float32 state, a few
float32 forward differences per step; routing near-ties are the main risk, hence small steps).
Run: DITMOE_BIN=build/bin /usr/bin/python3 tests/test_sampler_parity.py"""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import sampler_ref  # noqa: E402

EXE = os.path.join(BIN, "ditmoe-sample")
REL_TOL = 1e-4


class Parity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-sampler-")
        cls.dir = cls._tmp.name
        cls.ddpm_path = os.path.join(cls.dir, "ddpm.safetensors")
        cls.rf_path = os.path.join(cls.dir, "rf.safetensors")
        cls.ddpm = sampler_ref.make_model(cls.ddpm_path, "ddpm", seed=1)
        cls.rf = sampler_ref.make_model(cls.rf_path, "rf", seed=2, attention="qknorm")
        g = torch.Generator().manual_seed(3)
        cls.z0 = torch.randn(3, 4, 8, 8, generator=g)
        cls.noise = os.path.join(cls.dir, "z0.npy")
        np.save(cls.noise, cls.z0.numpy())

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def run_c(self, model, classes, *flags, out="lat.npy"):
        out = os.path.join(self.dir, out)
        cmd = [EXE, "--model", model, "--class", classes, "--init-noise", self.noise,
               "--latent-only", "--save-latent", out, "-q", "--threads", "1", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, f"{' '.join(cmd)}\n{r.stderr}")
        return np.load(out)

    def compare(self, model_path, model, sampler, steps, cfg, channels, extra=(), eta=0.0,
                interval=(0.0, 1.0), seed=11):
        y = torch.tensor([2, 5, 7])
        flags = ["--sampler", sampler, "--steps", str(steps), "--cfg-scale", str(cfg),
                 "--cfg-channels", "all" if channels == 0 else str(channels), "--seed", str(seed),
                 "--eta", str(eta), "--cfg-interval", f"{interval[0]},{interval[1]}", *extra]
        got = self.run_c(model_path, "2,5,7", *flags)
        ref = sampler_ref.sample(model, sampler, steps, y, self.z0, cfg, channels, eta=eta,
                                 seed=seed, indices=[0, 1, 2], interval=interval).numpy()
        self.assertEqual(got.shape, ref.shape)
        rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        err = float(np.max(np.abs(got - ref)))
        print(f"{sampler:5s} steps {steps:3d} cfg {cfg} ch {channels} eta {eta} interval "
              f"{interval}: max err {err:.3g}, rms {rms:.3g}, ratio {err / rms:.2e}",
              file=sys.stderr)
        self.assertTrue(np.all(np.isfinite(got)))
        self.assertLessEqual(err, REL_TOL * rms, f"{sampler}: max err {err} > {REL_TOL} x rms {rms}")

    def test_ddim(self):
        self.compare(self.ddpm_path, self.ddpm, "ddim", 10, 4.0, 3)
        self.compare(self.ddpm_path, self.ddpm, "ddim", 8, 1.0, 3)

    def test_ddim_eta(self):
        self.compare(self.ddpm_path, self.ddpm, "ddim", 6, 2.0, 0, eta=0.5)

    def test_ddpm(self):
        self.compare(self.ddpm_path, self.ddpm, "ddpm", 10, 1.5, 3)
        self.compare(self.ddpm_path, self.ddpm, "ddpm", 6, 3.0, 0, interval=(0.2, 0.7))

    def test_euler(self):
        self.compare(self.rf_path, self.rf, "euler", 8, 3.0, 0)
        self.compare(self.rf_path, self.rf, "euler", 5, 1.0, 0)

    def test_heun(self):
        self.compare(self.rf_path, self.rf, "heun", 5, 2.0, 0, interval=(0.0, 0.6))

    def test_batch_invariance(self):
        """Image k from --batch 1 == image k from --batch 3 (and 2), bit for bit: noise is keyed by
        image index and every product in the forward sums in a fixed order whatever the batch."""
        for model, sampler in ((self.ddpm_path, "ddpm"), (self.rf_path, "euler")):
            outs = []
            for b in (1, 3, 2):
                outs.append(self.run_c(model, "2,5,7", "--sampler", sampler, "--steps", "6",
                                       "--seed", "99", "--batch", str(b), "--cfg-scale", "2.5",
                                       out=f"b{b}.npy"))
            for b, o in zip((3, 2), outs[1:]):
                self.assertTrue(np.array_equal(outs[0], o),
                                f"{sampler}: --batch 1 and --batch {b} give different latents "
                                f"(max diff {float(np.max(np.abs(outs[0] - o))):.3g})")
        # threads must not matter either
        a = self.run_c(self.rf_path, "3", "--steps", "4", "--seed", "5", out="t1.npy")
        b = self.run_c(self.rf_path, "3", "--steps", "4", "--seed", "5", "--threads", "2",
                       out="t2.npy")
        self.assertTrue(np.array_equal(a, b), "latents differ between 1 and 2 threads")

    def test_generated_noise_matches_reference(self):
        """Without --init-noise the initial latent is Philox stream 0 of (seed, index): RF
        Euler with 1 step and cfg 1 gives z0 - v(z0, 1) and we can check z0 indirectly by
        rebuilding it in Python and running the reference."""
        out = os.path.join(self.dir, "gen.npy")
        r = subprocess.run([EXE, "--model", self.rf_path, "--class", "4", "-n", "2", "--steps",
                            "3", "--cfg-scale", "1", "--seed", "123456789012", "--latent-only",
                            "--save-latent", out, "-q", "--threads", "1"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        got = np.load(out)
        z0 = sampler_ref.noise_batch(123456789012, [0, 1], 0, (4, 8, 8))
        ref = sampler_ref.sample(self.rf, "euler", 3, torch.tensor([4, 4]), z0, 1.0, 0).numpy()
        rms = float(np.sqrt(np.mean(ref ** 2)))
        self.assertLessEqual(float(np.max(np.abs(got - ref))), REL_TOL * rms)


class PhiloxKAT(unittest.TestCase):
    def test_known_answers(self):
        vecs = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
                ((0xffffffff,) * 4, (0xffffffff,) * 2,
                 (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
                ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
                 (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
        for ctr, key, want in vecs:
            got = sampler_ref.philox4x32([np.uint64(c) for c in ctr], key)
            self.assertEqual([int(x) for x in got], list(want))

    def test_tables(self):
        t = sampler_ref.ddpm_tables(1000, 250)
        self.assertEqual(list(t["timestep"][40:44]), [160, 164, 169, 173])
        self.assertAlmostEqual(t["coef1"][1], 0.85698249, places=7)
        self.assertAlmostEqual(t["post_logvar_clipped"][249] / -2.5572312, 1.0, places=6)


if __name__ == "__main__":
    unittest.main(verbosity=2)

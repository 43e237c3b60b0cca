"""ProMoE: the C forward pass (ditmoe-forward) against the independent PyTorch reference
(tests/ref/promoe_ref.py), through tools/convert_checkpoint.py on a dict shaped like the official
training checkpoint ({"ema_model_state_dict", "model_state_dict", "optimizer_state_dict",
"step": int}).

Cases: token choice and expert choice, top_k 1 and 2, router activations identity / softmax /
sigmoid, a guided batch mixing conditional and null labels (labels [3, null, 7, null]).
Checks per case:
  - output: max |C - ref| <= 1e-4 * RMS(ref) (float32 throughout; the only differences are
    summation orders),
  - routing: the set of experts chosen for every token identical (ids -1 = none, E = the
    unconditional expert); tokens whose choice sits within 1e-5 of a tie (reference scores)
    are skipped and counted, and an image with such a token is left out of the later layers'
    and the output comparison (a flipped near-tie legitimately changes everything after it).
Plus a qk-norm model (spec 2.1: LayerNorm(hd), eps 1e-5). Also: the architecture reproduces the spec's parameter counts (ProMoE-S, -B), the converter
picks the EMA weights and writes the ProMoE metadata, and refuses bad ProMoE input.
Run: DITMOE_BIN=build/bin /usr/bin/python3 tests/test_promoe_parity.py"""
import contextlib
import io
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
import convert_checkpoint  # noqa: E402

FORWARD = os.path.join(BIN, "ditmoe-forward")
CONVERTER = os.path.join(SRC, "tools", "convert_checkpoint.py")
REL_TOL = 1e-4
NULL = 10
SMALL = dict(hidden_size=64, depth=4, num_heads=4, num_experts=8, patch_size=2, input_size=16,
             in_channels=4, learn_sigma=True, num_classes=NULL, expert_hidden=96,
             shared_hidden=80, mlp_hidden=192)


def official_dict(model, seed):
    """The layout of ProMoE's train.py::save_checkpoint: raw weights differ from the EMA ones."""
    raw = promoe_ref.randomize_(promoe_ref.ProMoE(**model.config_kwargs), seed + 1000).state_dict()
    return {"step": 123, "model_state_dict": raw, "ema_model_state_dict": model.state_dict(),
            "optimizer_state_dict": {"state": {0: {"step": torch.tensor(5.0)}},
                                     "param_groups": [{"lr": 1e-4, "params": [0]}]}}


def make_model(seed, variant, router, top_k, **over):
    kw = dict(SMALL, variant=variant, router=router, top_k=top_k, **over)
    m = promoe_ref.randomize_(promoe_ref.ProMoE(**kw), seed).eval()
    m.config_kwargs = kw
    return m


def run_convert(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = convert_checkpoint.main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


class ProMoEParity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-promoe-")
        cls.dir = cls._tmp.name
        g = torch.Generator().manual_seed(7)
        cls.B = 4
        cls.x = torch.randn(cls.B, 4, 16, 16, generator=g)
        cls.t = torch.tensor([999.0, 612.5, 250.0, 4.0])        # ProMoE scale: 1000 * sigma
        cls.y = torch.tensor([3, NULL, 7, NULL])
        for name, a in (("x", cls.x.numpy()), ("t", cls.t.numpy()), ("y", cls.y.numpy())):
            np.save(os.path.join(cls.dir, f"{name}.npy"), a)
        cls.ties = 0

    @classmethod
    def tearDownClass(cls):
        print(f"near-ties skipped (token x layer): {cls.ties}", file=sys.stderr)
        cls._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def convert(self, model, seed, *flags, name="m"):
        pt, out = self.path(f"{name}.pth"), self.path(f"{name}.safetensors")
        torch.save(official_dict(model, seed), pt)
        r = subprocess.run([PYTHON, CONVERTER, pt, out, "--heads", str(model.config["num_heads"]),
                            *flags], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return out

    def c_forward(self, model_path):
        out, routes = self.path("out.npy"), self.path("routes.npy")
        cmd = [FORWARD, "--model", model_path, "--x", self.path("x.npy"), "--t", self.path("t.npy"),
               "--y", self.path("y.npy"), "--out", out, "--routes", routes, "-q", "--threads", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, f"{' '.join(cmd)}\n{r.stderr}")
        return np.load(out), np.load(routes)

    def check_case(self, seed, variant, router, top_k, **over):
        model = make_model(seed, variant, router, top_k, **over)
        flags = ["--top-k", str(top_k), "--promoe-variant", variant, "--router", router]
        path = self.convert(model, seed, *flags)
        tensors, meta = safetensors_io.read(path)
        meta = json.loads(meta["ditmoe"])
        self.assertEqual((meta["arch"], meta["promoe"], meta["top_k"], meta["mlp_hidden"]),
                         ("promoe", {"variant": variant, "router": router}, top_k, 192))
        sd = model.state_dict()
        self.assertEqual(list(tensors), list(sd), "tensor names/order")
        for k, v in sd.items():        # the EMA weights, not model_state_dict
            self.assertTrue(torch.equal(tensors[k], v), k)

        rt = []
        with torch.no_grad():
            ref = model(self.x, self.t, self.y, routes=rt).numpy()
        got, routes = self.c_forward(path)
        T = (16 // 2) ** 2
        self.assertEqual(routes.shape, (2, self.B * T, top_k))
        tainted = np.zeros(self.B, dtype=bool)
        ties = 0
        for layer, r in enumerate(rt):
            ids, tie = r["ids"].numpy(), r["tie"].numpy()
            for n in range(self.B * T):
                b = n // T
                if tainted[b]:
                    continue
                if tie[n]:
                    ties += 1
                    continue
                want = set(ids[n].tolist()) - {-1}
                have = set(routes[layer, n].tolist()) - {-1}
                self.assertEqual(have, want, f"{variant}/{router}/k{top_k}: layer {layer} "
                                             f"token {n} (image {b}, label {int(self.y[b])})")
            for b in range(self.B):
                tainted[b] |= bool(tie[b * T:(b + 1) * T].any())
            # the unconditional expert takes exactly the null-label images, weight 1 in slot 0
            unc = np.repeat((self.y == NULL).numpy(), T)
            self.assertTrue(np.all((routes[layer, :, 0] == 8) == unc))
            if top_k > 1:
                self.assertTrue(np.all(routes[layer, unc, 1:] == -1))
        ProMoEParity.ties += ties
        keep = ~tainted
        self.assertGreaterEqual(int(keep.sum()), 3, "too many near-ties: pick another seed")
        self.assertEqual(got.shape, ref.shape)
        rms = float(np.sqrt(np.mean(ref[keep].astype(np.float64) ** 2)))
        err = float(np.max(np.abs(got[keep] - ref[keep])))
        print(f"{variant} {router:8s} k={top_k}: max err {err:.3g}, rms {rms:.3g}, "
              f"ratio {err / rms:.2e}, near-ties {ties}, images compared {int(keep.sum())}/{self.B}",
              file=sys.stderr)
        self.assertLessEqual(err, REL_TOL * rms)
        return model, got

    def test_tc_identity_top1(self):
        self.check_case(1, "tc", "identity", 1)

    def test_tc_softmax_top2(self):
        self.check_case(2, "tc", "softmax", 2)

    def test_tc_sigmoid_top2(self):
        self.check_case(3, "tc", "sigmoid", 2)

    def test_ec_identity_top1(self):
        self.check_case(4, "ec", "identity", 1)

    def test_ec_softmax_top2(self):
        self.check_case(5, "ec", "softmax", 2)

    def test_ec_identity_top2(self):
        self.check_case(6, "ec", "identity", 2)

    def test_qk_norm(self):
        """qk_norm=True layout (no released weights): LayerNorm(hd) eps 1e-5 on q and k."""
        self.check_case(9, "tc", "identity", 1, qk_norm=True)

    def test_null_rows_ignore_prototypes(self):
        """Null-label images never touch the prototypes: changing cluster_centers leaves them
        bit-identical in the C output (conditional routing per sample, spec 3.1)."""
        m = make_model(8, "tc", "identity", 1)
        _, a = self.check_case(8, "tc", "identity", 1)
        with torch.no_grad():
            for b in m.blocks:
                if isinstance(b.mlp, promoe_ref.ProtoMoE):
                    b.mlp.cluster_centers.copy_(torch.randn(b.mlp.cluster_centers.shape))
        got, _ = self.c_forward(self.convert(m, 8, "--top-k", "1", name="m2"))
        unc = (self.y == NULL).numpy()
        np.testing.assert_array_equal(got[unc], a[unc])
        self.assertGreater(float(np.abs(got[~unc] - a[~unc]).max()), 1e-3)


class ProMoEConverter(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-promoe-conv-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def test_spec_parameter_counts(self):
        """promoe.md 1.3: S 75,543,584 total / 32,965,664 activated (B: 300,607,520 /
        130,517,024); 'activated' there counts pos_embed but not the prototypes."""
        for D, H, total, active in ((384, 6, 75543584, 32965664), (768, 12, 300607520, 130517024)):
            m = promoe_ref.ProMoE(hidden_size=D, depth=12, num_heads=H, num_experts=12, top_k=1)
            self.assertEqual(sum(p.numel() for p in m.parameters()), total)
            t, a = promoe_ref.count_params(m)
            self.assertEqual(a + m.pos_embed.numel() - 6 * 12 * D, active)
            self.assertEqual(len(m.state_dict()), 450)
            del m

    def test_released_defaults_and_bad_input(self):
        m = promoe_ref.ProMoE(hidden_size=384, depth=2, num_heads=6, num_experts=3, top_k=1,
                              input_size=8, num_classes=5)
        sd = m.state_dict()
        pt = os.path.join(self.dir, "s.pth")
        out = os.path.join(self.dir, "s.safetensors")
        torch.save({"ema_model_state_dict": sd, "step": 9}, pt)
        rc, err = run_convert([pt, out])
        self.assertEqual(rc, 0, err)
        _, meta = safetensors_io.read(out)
        meta = json.loads(meta["ditmoe"])
        want = {"format_version": 1, "arch": "promoe", "name": "ProMoE-S/2-3E1A-TC",
                "hidden_size": 384, "depth": 2, "num_heads": 6, "num_experts": 3, "top_k": 1,
                "expert_hidden": 768, "shared_hidden": 768, "mlp_hidden": 1536,
                "attention": "timm", "patch_size": 2, "input_size": 8, "in_channels": 4,
                "learn_sigma": True, "num_classes": 5, "objective": "rf", "time_scale": 1000.0,
                "vae_scale": 0.18215, "promoe": {"variant": "tc", "router": "identity"},
                "sampling": {"sampler": "euler", "steps": 250, "cfg_scale": 1.5,
                             "cfg_channels": 0}}
        self.assertEqual(meta, want)

        def fail(obj, *flags):
            torch.save(obj, pt)
            o = os.path.join(self.dir, "bad.safetensors")
            rc, err = run_convert([pt, o, *flags])
            self.assertEqual(rc, 2)
            self.assertFalse(os.path.exists(o))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            return err
        self.assertIn("--objective", fail(sd, "--objective", "ddpm"))
        self.assertIn("--top-k", fail(sd, "--top-k", "4"))
        self.assertIn("--sampler", fail(sd, "--sampler", "ddim"))
        bad = dict(sd)
        del bad["blocks.1.mlp.experts.3.down_proj.bias"]            # the unconditional expert
        self.assertIn("blocks.1.mlp.experts.3.down_proj.bias", fail(bad))
        bad = dict(sd)
        bad["blocks.0.mlp.cluster_centers"] = torch.zeros(3, 384)
        self.assertIn("odd", fail(bad))
        bad = dict(sd)
        bad["blocks.1.mlp.experts.2.up_proj.weight"] = torch.zeros(700, 384)
        msg = fail(bad)
        self.assertIn("blocks.1.mlp.experts.2.up_proj.weight", msg)
        self.assertIn("[700,384]", msg)
        self.assertIn("--heads", fail({"ema_model_state_dict": {
            k: (v if not k.startswith("x_embedder.proj.weight") else v) for k, v in
            promoe_ref.ProMoE(hidden_size=64, depth=2, num_heads=4, num_experts=3,
                              input_size=8).state_dict().items()}}))
        # --router / --promoe-variant are ProMoE-only flags
        sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
        from dit_moe_ref import DiTMoE
        dsd = DiTMoE(hidden_size=64, depth=1, num_heads=4, num_experts=2, input_size=8,
                     num_classes=5).state_dict()
        self.assertIn("--router", fail(dsd, "--heads", "4", "--router", "softmax"))


if __name__ == "__main__":
    unittest.main(verbosity=1)

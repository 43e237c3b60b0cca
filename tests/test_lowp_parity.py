"""Low-precision forward parity (issue 13): ditmoe-forward --precision bf16 / --quant-experts
int8|int4 against the fp32 PyTorch reference tests/ref/dit_moe_ref.py.

Stated tolerances (max|diff| over the output, relative to the reference output's RMS):
  bf16 (attention, expert and shared-expert GEMMs with bf16 operands, fp32 accumulation;
        router, embedders, adaLN and final layer f32):                      <= 5e-3 x RMS
        (measured 1.3e-3; 1.1e-2 when the embedders, adaLN and final layer were bf16 too)
  bf16 + int8 routed experts:                                               <= 1e-2 x RMS
        (measured 2.6e-3)
  int8 routed experts (rest f32):                                           <= 1e-2 x RMS
        (measured 2.1e-3)
  int4 routed experts: reported; asserted only <= 0.25 x RMS (a sanity bound).
Routing: identical expert sets for every token whose k-th / (k+1)-th softmax gap in the
reference is >= 2e-2 (low precision moves the gate's input a little; closer calls may flip).
Invariance, bitwise: a batch of 3 vs each image alone, and 1 vs 2 threads, for bf16 and int8.
The portable path (DITMOE_CPU_FEATURES=generic) meets the same tolerances, and int8 gives the
same bits on it as on the native path. int4 on a model whose expert input width is not a multiple
of 32 and an unknown --precision value exit 2 with a line naming the tensor / flag.
Needs DITMOE_BIN.
"""
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_forward_parity as fp  # noqa: E402

MARGIN = 2e-2


def compare_routes_margin(tc, got, scores, k, what):
    cmp = skip = 0
    for l, sc in enumerate(scores):
        srt = -np.sort(-sc, axis=1)
        for n in range(sc.shape[0]):
            if k < sc.shape[1] and srt[n, k - 1] - srt[n, k] < MARGIN:
                skip += 1
                continue
            want = set(np.argsort(-sc[n], kind="stable")[:k].tolist())
            tc.assertEqual(set(int(v) for v in got[l, n]), want, f"{what}: layer {l} token {n}")
            cmp += 1
    return cmp, skip


@unittest.skipUnless(fp.FORWARD, "DITMOE_BIN not set")
class TestLowpParity(fp.TestForwardParity):
    CASES = []

    def test_parity(self):  # the f32 cases are test_forward_parity's
        pass

    def run_ok(self, st, x, t, y, extra, env=None):
        old = dict(os.environ)
        if env:
            os.environ.update(env)
        try:
            r, out, routes = self.run_c(st, x, t, y, extra)
        finally:
            os.environ.clear()
            os.environ.update(old)
        self.assertEqual(r.returncode, 0, f"{extra}: {r.stderr}")
        return np.load(out), np.load(routes), r.stderr

    def test_lowp(self):
        model, cfg, st = self.build("timm", 8, 2, "f32", 16, 21)
        x, t, y = fp.make_inputs(3, cfg, 4)
        ref, _, scores = fp.reference(model, x, t, y)
        rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        xs, ts, ys = x.numpy(), t.numpy(), y.numpy()
        modes = [("bf16", ["--precision", "bf16"], 5e-3, None),
                 ("int8", ["--quant-experts", "int8"], 1e-2, None),
                 ("bf16+int8", ["--precision", "bf16", "--quant-experts", "int8"], 1e-2, None),
                 ("int4", ["--quant-experts", "int4"], 0.25, None),
                 ("bf16 generic", ["--precision", "bf16"], 5e-3, {"DITMOE_CPU_FEATURES": "generic"}),
                 ("int8 generic", ["--quant-experts", "int8"], 1e-2, {"DITMOE_CPU_FEATURES": "generic"})]
        outs = {}
        for what, extra, tol, env in modes:
            with self.subTest(what):
                got, ids, err_txt = self.run_ok(st, xs, ts, ys, extra, env)
                outs[what] = got
                err = float(np.abs(got.astype(np.float64) - ref).max())
                c, s = compare_routes_margin(self, ids, scores, 2, what)
                print(f"  {what}: max|diff| {err / rms:.3g} x RMS (tolerance {tol}); routing "
                      f"{c} tokens identical, {s} within the {MARGIN} margin skipped",
                      file=sys.stderr)
                self.assertLessEqual(err, tol * rms, what)
                self.assertGreater(c, 0)
                if env is None:
                    self.assertIn("precision", err_txt)  # the one log line naming the path
        np.testing.assert_array_equal(outs["int8"], outs["int8 generic"],
                                      "int8: native and portable paths differ in bits")
        # batch and thread invariance, bitwise, per path
        for what, extra in (("bf16", ["--precision", "bf16"]), ("int8", ["--quant-experts", "int8"])):
            with self.subTest(what + " invariance"):
                for i in range(3):
                    one, _, _ = self.run_ok(st, xs[i:i + 1], ts[i:i + 1], ys[i:i + 1], extra)
                    np.testing.assert_array_equal(one[0], outs[what][i], f"{what}: row {i} alone")
                t1, _, _ = self.run_ok(st, xs, ts, ys, extra + ["--threads", "1"])
                np.testing.assert_array_equal(t1, outs[what], f"{what}: 1 vs 2 threads")

    def test_bad_combinations(self):
        cfg = dict(hidden_size=48, depth=1, num_heads=4, num_experts=4, top_k=2,
                   attention="timm", patch_size=2, input_size=8, in_channels=4,
                   learn_sigma=True, num_classes=10)
        model = fp.randomize_(fp.DiTMoE(**cfg), seed=2).eval()
        pt, st = self.p("w48.pt"), self.p("w48.safetensors")
        fp.torch.save({"ema": model.state_dict()}, pt)
        with fp.contextlib.redirect_stdout(fp.io.StringIO()):
            self.assertEqual(fp.convert_checkpoint.main([pt, st, "--heads", "4", "--top-k", "2"]), 0)
        x, t, y = fp.make_inputs(1, cfg, 0)
        r, _, _ = self.run_c(st, x.numpy(), t.numpy(), y.numpy(), ["--quant-experts", "int4"])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("int4", r.stderr)
        self.assertIn("experts", r.stderr)
        errs = [l for l in r.stderr.strip().splitlines() if not l.startswith("[INFO]")]
        self.assertEqual(len(errs), 1, r.stderr)
        self.assertIn("blocks.0.moe.experts.0", errs[0])
        r, _, _ = self.run_c(st, x.numpy(), t.numpy(), y.numpy(), ["--quant-experts", "int8"])
        self.assertEqual(r.returncode, 0, r.stderr)
        for flag, val in (("--precision", "fp8"), ("--quant-experts", "int3")):
            r, _, _ = self.run_c(st, x.numpy(), t.numpy(), y.numpy(), [flag, val])
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(flag, r.stderr)


if __name__ == "__main__":
    unittest.main()

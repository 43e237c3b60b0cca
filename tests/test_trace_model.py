"""Routing dumps from a real (tiny random) model: ditmoe-sample --dump-routing vs
ditmoe-forward --routes, and ditmoe-routes' JSON vs an independent NumPy recount.

1. A tiny random DiT-MoE (D 32, 2 blocks, E 4, top-2, 8x8 latents -> 4x4 tokens, 3 classes with
   names) from the PyTorch reference, converted with tools/convert_checkpoint.py.
2. ditmoe-sample --latent-only --init-noise --dump-routing for 3 images in batches of 2, guided
   (cfg 2.5 -> 2B rows) with a guidance interval so late evaluations run unguided (B rows),
   for ddim (ddpm model) and heun (rf model: 2 evals per step).
3. The dump is parsed HERE from the byte layout in docs/routing.md (not with our C reader).
   The first evaluation of every batch sees the initial noise, so ditmoe-forward on
   [x; x] / labels [y; null] / the recorded t must give the same expert ids (exact: same code,
   same batch composition) and its routes must equal the dump's; gate weights are positive,
   descending and below 1 (softmax probabilities) after float16 storage.
4. ditmoe-routes on the dump (and --uncond): every count in routes.json equals a NumPy recount
   of the parsed records; the PNGs exist; a truncated dump exits 2 with a one-line message.
"""
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
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tools"))
import convert_checkpoint  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402

E, K, S, P, NCLS = 4, 2, 8, 2, 3
T = (S // P) ** 2


def parse_dump(path):
    """Independent reader of the DMROUTE1 layout (docs/routing.md)."""
    with open(path, "rb") as f:
        b = f.read()
    assert b[:8] == b"DMROUTE1", "magic"
    off, ln = struct.unpack_from("<QQ", b, 8)
    assert off + ln == len(b), "header bounds"
    head = json.loads(b[off:off + ln].decode())
    sh = head["shape"]
    Lm, k, Tn = sh["layers"], sh["top_k"], sh["grid"][0] * sh["grid"][1]
    idt = np.uint8 if sh["id_dtype"] == "u8" else np.uint16
    none = 0xFF if idt == np.uint8 else 0xFFFF
    recs, pos = [], 24
    while pos < off:
        tag, batch, ev, step, R, flags, payload = struct.unpack_from("<6IQ", b, pos)
        assert tag == 0x52524D44
        pos += 32
        rows = []
        for r in range(R):
            img, lab, cls, t, kind = struct.unpack_from("<qiifI", b, pos + 24 * r)
            rows.append(dict(image=img, label=lab, cls=cls, t=t, uncond=kind))
        q = pos + 24 * R
        n = Lm * R * Tn * k
        ids = np.frombuffer(b, idt, n, q).astype(np.int64)
        ids[ids == none] = -1
        q += n * np.dtype(idt).itemsize
        w = None
        if sh["weights"] == "f16":
            w = np.frombuffer(b, "<f2", n, q).astype(np.float32).reshape(Lm, R * Tn, k)
            q += 2 * n
        if flags & 1:
            q += Lm * R * Tn
        assert q - pos == payload, "payload size"
        pos = q
        recs.append(dict(batch=batch, eval=ev, step=step, rows=rows,
                         ids=ids.reshape(Lm, R * Tn, k), w=w))
    assert pos == off
    assert len(recs) == head["records"]
    return head, recs


class TraceModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-trace-")
        cls.dir = cls._tmp.name
        names = os.path.join(cls.dir, "names.txt")
        with open(names, "w") as f:
            f.write("alpha\nbeta\ngamma\n")
        cls.models = {}
        for obj, seed in (("ddpm", 5), ("rf", 6)):
            cfg = dict(hidden_size=32, depth=2, num_heads=2, num_experts=E, top_k=K,
                       attention="timm", patch_size=P, input_size=S, in_channels=4,
                       learn_sigma=obj == "ddpm", num_classes=NCLS)
            model = randomize_(DiTMoE(**cfg), seed=seed).eval()
            pt, st = cls.p(f"m-{obj}.pt"), cls.p(f"m-{obj}.safetensors")
            torch.save({"ema": model.state_dict()}, pt)
            rc = convert_checkpoint.main([pt, st, "--heads", "2", "--top-k", str(K),
                                          "--objective", obj, "--class-names", names])
            assert rc == 0
            cls.models[obj] = st
        rng = np.random.default_rng(0)
        cls.init = rng.standard_normal((3, 4, S, S)).astype(np.float32)
        np.save(cls.p("init.npy"), cls.init)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @classmethod
    def p(cls, name):
        return os.path.join(cls.dir, name)

    def sample(self, obj, sampler, steps, dump, extra=()):
        cmd = [os.path.join(BIN, "ditmoe-sample"), "--model", self.models[obj], "--class",
               "2,0,1", "--sampler", sampler, "--steps", str(steps), "--cfg-scale", "2.5",
               "--seed", "7", "--batch", "2", "--init-noise", self.p("init.npy"),
               "--save-latent", self.p("lat.npy"), "--latent-only", "--threads", "1", "-q",
               "--dump-routing", dump, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)

    def forward_routes(self, obj, x, t, y):
        for n, a in (("x", x), ("t", t), ("y", y)):
            np.save(self.p(f"f{n}.npy"), a)
        cmd = [os.path.join(BIN, "ditmoe-forward"), "--model", self.models[obj],
               "--x", self.p("fx.npy"), "--t", self.p("ft.npy"), "--y", self.p("fy.npy"),
               "--out", self.p("fo.npy"), "--routes", self.p("fr.npy"), "--threads", "1", "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return np.load(self.p("fr.npy"))

    def check_dump(self, obj, sampler, steps, heun):
        dump = self.p(f"{sampler}.dmr")
        # interval: guidance only for t >= 0.5, so late evaluations run unguided on B rows
        self.sample(obj, sampler, steps, dump, ["--cfg-interval", "0.5,1"])
        head, recs = parse_dump(dump)
        sh = head["shape"]
        self.assertEqual((sh["layers"], sh["top_k"], sh["experts"], sh["grid"]), (2, K, E, [4, 4]))
        self.assertEqual(sh["steps"], steps)
        self.assertEqual(sh["heun"], heun)
        self.assertEqual(head["class_names"], ["alpha", "beta", "gamma"])
        self.assertEqual(head["sampler"]["seed"], "7")
        self.assertEqual(head["images"]["index"], [0, 1, 2])
        self.assertEqual(head["images"]["class"], [2, 0, 1])
        evals = 2 * steps - 1 if heun else steps
        self.assertEqual(len(recs), 2 * evals)  # batches of 2 and 1 images
        guided_seen = unguided_seen = 0
        for rec in recs:
            B = 2 if rec["batch"] == 0 else 1
            want_step = min(rec["eval"] // 2, steps - 1) if heun else rec["eval"]
            self.assertEqual(rec["step"], want_step)
            R = len(rec["rows"])
            self.assertIn(R, (B, 2 * B))
            guided_seen += R == 2 * B
            unguided_seen += R == B
            for r, row in enumerate(rec["rows"]):
                img = rec["batch"] * 2 + r % B
                self.assertEqual(row["image"], img)
                self.assertEqual(row["cls"], [2, 0, 1][img])
                self.assertEqual(row["uncond"], int(r >= B))
                self.assertEqual(row["label"], NCLS if r >= B else row["cls"])
            w = rec["w"]
            self.assertTrue(np.all(w > 0) and np.all(w < 1), "softmax gate weights in (0,1)")
            self.assertTrue(np.all(w[..., 0] >= w[..., 1]), "descending weights")
            ids = rec["ids"]
            self.assertTrue(np.all((ids >= 0) & (ids < E)))
            self.assertTrue(np.all(ids[..., 0] != ids[..., 1]))
        self.assertGreater(guided_seen, 0)
        self.assertGreater(unguided_seen, 0)
        # first evaluation of each batch: input = initial noise
        for rec in recs:
            if rec["eval"] != 0:
                continue
            rows = rec["rows"]
            x = np.stack([self.init[row["image"]] for row in rows])
            t = np.array([row["t"] for row in rows], np.float32)
            y = np.array([row["label"] for row in rows], np.int64)
            got = self.forward_routes(obj, x, t, y)
            np.testing.assert_array_equal(got, rec["ids"],
                                          f"{sampler} batch {rec['batch']}: ids differ")
        return dump, head, recs

    def recount(self, recs, uncond):
        Lm, X, C = 2, E, NCLS
        steps = max(r["step"] for r in recs) + 1
        cc, pc, sc = np.zeros((Lm, C, X), int), np.zeros((Lm, T, X), int), np.zeros((Lm, steps, X), int)
        for rec in recs:
            R = len(rec["rows"])
            ids = rec["ids"].reshape(Lm, R, T, K)
            for r, row in enumerate(rec["rows"]):
                if row["uncond"] != uncond:
                    continue
                for l in range(Lm):
                    for j in range(T):
                        for q in range(K):
                            e = ids[l, r, j, q]
                            cc[l, row["cls"], e] += 1
                            pc[l, j, e] += 1
                            sc[l, rec["step"], e] += 1
        return cc, pc, sc

    def test_ddim_guided(self):
        dump, head, recs = self.check_dump("ddpm", "ddim", 4, False)
        self.routes(dump, recs)

    def test_heun(self):
        dump, head, recs = self.check_dump("rf", "heun", 3, True)
        self.routes(dump, recs)
        # many dumps: counts add up (the same dump twice = twice the counts)
        out = self.p("routes-2x")
        r = subprocess.run([os.path.join(BIN, "ditmoe-routes"), "-q", "--no-png", "-o", out,
                            dump, dump], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(out, "routes.json")) as f:
            js = json.load(f)
        cc, pc, sc = self.recount(recs, 0)
        np.testing.assert_array_equal(np.array(js["class_expert"]), 2 * cc)
        np.testing.assert_array_equal(np.array(js["step_expert"]), 2 * sc)

    def routes(self, dump, recs):
        for uncond in (0, 1):
            out = self.p(f"routes-{uncond}")
            cmd = [os.path.join(BIN, "ditmoe-routes"), "-o", out, dump, "-q"]
            if uncond:
                cmd.append("--uncond")
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(os.path.join(out, "routes.json")) as f:
                js = json.load(f)
            cc, pc, sc = self.recount(recs, uncond)
            np.testing.assert_array_equal(np.array(js["class_expert"]), cc)
            np.testing.assert_array_equal(np.array(js["position_expert"]), pc)
            np.testing.assert_array_equal(np.array(js["step_expert"]), sc)
            self.assertEqual(js["picks"], int(cc.sum()))
            for l, st in enumerate(js["layer_stats"]):
                load = pc[l].sum(0)
                self.assertEqual(st["picks_per_expert"], load.tolist())
                self.assertAlmostEqual(st["max_mean_ratio"], load.max() / load.mean(), places=9)
                pr = load / load.sum()
                h = -(pr[pr > 0] * np.log2(pr[pr > 0])).sum()
                self.assertAlmostEqual(st["entropy_bits"], h, places=9)
                joint = pc[l] / pc[l].sum()
                pa, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
                nz = joint > 0
                mi = (joint[nz] * np.log2(joint[nz] / (pa @ pe)[nz])).sum()
                self.assertAlmostEqual(st["mi_position_bits"], mi, places=9)
            for png in ("class_expert.png", "position_expert.png", "step_expert.png", "overlay.png"):
                with open(os.path.join(out, png), "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", png)
        # the paper-style plots read that JSON
        r = subprocess.run([sys.executable, os.path.join(SRC, "tools", "plot_routes.py"),
                            os.path.join(out, "routes.json"), "-o", self.p("plots")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        for png in ("paper_class.png", "paper_patch.png", "paper_step.png", "summary.png"):
            self.assertTrue(os.path.getsize(os.path.join(self.p("plots"), png)) > 1000, png)

    def test_bad_dumps(self):
        dump = self.p("bad-src.dmr")
        self.sample("rf", "euler", 2, dump)
        with open(dump, "rb") as f:
            data = f.read()
        for cut in (0, 10, 40, len(data) // 2, len(data) - 1):
            bad = self.p("bad.dmr")
            with open(bad, "wb") as f:
                f.write(data[:cut])
            r = subprocess.run([os.path.join(BIN, "ditmoe-routes"), "-o", self.p("r-bad"), bad],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 2, f"cut {cut}: {r.stderr}")
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn(bad, r.stderr)
        r = subprocess.run([os.path.join(BIN, "ditmoe-routes"), "--bogus", dump],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        # a dump that cannot be written: no file left behind, exit 1 (an output, not an input)
        r = subprocess.run([os.path.join(BIN, "ditmoe-sample"), "--model", self.models["rf"],
                            "--latent-only", "--save-latent", self.p("l2.npy"), "-q", "--seed", "1",
                            "--dump-routing", "/nonexistent-dir/x.dmr"], capture_output=True,
                           text=True)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("--dump-routing", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""PyTorch checkpoints read natively (src/io/pt*.c, pickle.c) and ditmoe-convert.

Files are written by Debian's torch (torch.save, zip and legacy formats) from random-weight
models in the official layouts of both families (tests/ref). Checked:
- ditmoe-convert IN.pt OUT.safetensors gives a file byte-identical to tools/convert_checkpoint.py's
  (checked also field by field): the tensors (bit for bit, names, order, dtypes) and
  the "ditmoe" config of tools/convert_checkpoint.py, for bare and training dicts (optimizer
  state, ema/model nesting, module. prefixes), f16/bf16/f64 and non-contiguous tensors, flags;
- ditmoe-forward / ditmoe-sample --model X.pt give bytes equal to the converted safetensors;
- malformed zips and pickles (truncated, unknown opcode, forbidden global, offset past the end,
  storage too small) fail with one line naming the file and exit 2, executing nothing.
Run: /usr/bin/python3 tests/test_pt_load.py   (env DITMOE_BIN, DITMOE_SRC)"""
import collections
import ctypes
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
sys.path.insert(0, os.path.join(SRC, "tools"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import safetensors_io  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_  # noqa: E402
import promoe_ref  # noqa: E402

CONVERTER = os.path.join(SRC, "tools", "convert_checkpoint.py")
# Released hidden size (S, 384) so no flag is needed; small depth/grid to stay fast.
DIT = dict(hidden_size=384, depth=2, num_heads=6, num_experts=2, top_k=2, attention="timm",
           patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)


def dit_sd(seed=0, **over):
    return randomize_(DiTMoE(**dict(DIT, **over)), seed).state_dict()


def promoe_sd(seed=0, **over):
    cfg = dict(hidden_size=384, depth=2, num_heads=6, num_experts=3, top_k=1, patch_size=2,
               input_size=8, in_channels=4, learn_sigma=False, num_classes=10,
               expert_hidden=96, shared_hidden=64, mlp_hidden=128)
    cfg.update(over)
    return promoe_ref.randomize_(promoe_ref.ProMoE(**cfg), seed).state_dict()


def read(p):
    with open(p, "rb") as f:
        return f.read()


def write(p, data):
    with open(p, "wb") as f:
        f.write(data)


def run(*args, cwd=None, env=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          errors="replace")


class _Storage:
    """A storage stand-in for hand-made pickles: pickled as torch's persistent id."""

    def __init__(self, key, numel, cls=torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def fake_pkl(obj, protocol=2):
    """data.pkl bytes for obj (dicts of _Tensor), exactly as torch.save pickles tensors."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


class Base(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-pt-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def save(self, obj, name="in.pt", legacy=False):
        p = self.path(name)
        torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
        return p

    def py_convert(self, src, *flags, out="py.safetensors"):
        r = run(sys.executable, CONVERTER, src, self.path(out), *flags)
        self.assertEqual(r.returncode, 0, r.stderr)
        return self.path(out)

    def c_convert(self, src, *flags, out="c.safetensors"):
        r = run(os.path.join(BIN, "ditmoe-convert"), src, self.path(out), *flags)
        self.assertEqual(r.returncode, 0, r.stderr)
        return self.path(out)

    def assert_same_file_content(self, a, b):
        ta, ma = safetensors_io.read(a)
        tb, mb = safetensors_io.read(b)
        self.assertEqual(list(ta), list(tb), "tensor names / order")
        for k in ta:
            self.assertEqual(ta[k].dtype, tb[k].dtype, k)
            self.assertEqual(tuple(ta[k].shape), tuple(tb[k].shape), k)
            self.assertTrue(torch.equal(ta[k].view(torch.uint8) if ta[k].dim() else ta[k],
                                        tb[k].view(torch.uint8) if tb[k].dim() else tb[k]), k)
        self.assertEqual(json.loads(ma["ditmoe"]), json.loads(mb["ditmoe"]))
        self.assertEqual(ma.get("format"), mb.get("format"))
        return json.loads(mb["ditmoe"])

    def forward_equal(self, pt, st, C=4, H=8, classes=10):
        rng = np.random.RandomState(0)
        np.save(self.path("x.npy"), rng.randn(3, C, H, H).astype(np.float32))
        np.save(self.path("t.npy"), np.array([0.1, 0.5, 0.9], np.float32) * 999)
        np.save(self.path("y.npy"), np.array([0, 3, classes], np.int64))
        outs = []
        for i, m in enumerate((pt, st)):
            o = self.path(f"out{i}.npy")
            r = run(os.path.join(BIN, "ditmoe-forward"), "--model", m, "--x", self.path("x.npy"),
                    "--t", self.path("t.npy"), "--y", self.path("y.npy"), "--out", o)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(o, "rb") as f:
                outs.append(f.read())
        self.assertEqual(outs[0], outs[1], f"ditmoe-forward {pt} differs from {st}")
        self.assertTrue(np.isfinite(np.load(self.path("out0.npy"))).all())

    def fail_line(self, path, prog="ditmoe-forward"):
        if prog == "ditmoe-convert":
            r = run(os.path.join(BIN, prog), path, self.path("never.safetensors"))
            self.assertFalse(os.path.exists(self.path("never.safetensors")))
        else:
            np.save(self.path("x.npy"), np.zeros((1, 4, 8, 8), np.float32))
            np.save(self.path("t.npy"), np.zeros(1, np.float32))
            np.save(self.path("y.npy"), np.zeros(1, np.int64))
            r = run(os.path.join(BIN, prog), "--model", path, "--x", self.path("x.npy"), "--t",
                    self.path("t.npy"), "--y", self.path("y.npy"), "--out", self.path("o.npy"))
        self.assertEqual(r.returncode, 2, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn(os.path.basename(path), lines[0])
        if os.environ.get("DITMOE_TEST_SHOW"):
            print("\n   ", lines[0], file=sys.stderr)
        return lines[0]


class Families(Base):
    """Both families, zip and legacy, bare and training dicts: converter parity + forward bits."""

    def check(self, obj, *flags, legacy=False, forward=True, classes=10):
        src = self.save(obj, legacy=legacy)
        a = self.py_convert(src, *flags)
        b = self.c_convert(src, *flags)
        cfg = self.assert_same_file_content(a, b)
        self.assertEqual(read(a), read(b), "ditmoe-convert's file is not byte-identical")
        if forward and not flags:
            self.forward_equal(src, a, classes=classes)
        return cfg

    def test_ditmoe_timm_zip_and_legacy(self):
        sd = dit_sd(1)
        for legacy in (False, True):
            with self.subTest(legacy=legacy):
                cfg = self.check(sd, legacy=legacy)
                self.assertEqual(cfg["name"], "DiT-MoE-S/2-2E2A")

    def test_ditmoe_qknorm_rf(self):
        cfg = self.check(dit_sd(2, attention="qknorm", learn_sigma=False))
        self.assertEqual((cfg["attention"], cfg["objective"]), ("qknorm", "rf"))

    def test_promoe_zip_and_legacy(self):
        sd = promoe_sd(3, qk_norm=True)
        for legacy in (False, True):
            with self.subTest(legacy=legacy):
                cfg = self.check(sd, legacy=legacy)
                self.assertEqual(cfg["arch"], "promoe")

    def test_training_dicts(self):
        """ProMoE's train.py layout and a DiT-style one: optimizer state, steps, args, nesting."""
        m = DiTMoE(**DIT)
        randomize_(m, 4)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        ema = dit_sd(5)
        import argparse
        args = argparse.Namespace(lr=1e-4, model="DiT-S/2", epochs=3, betas=(0.9, 0.99))
        wrapped = {"model": {"module." + k: v for k, v in m.state_dict().items()},
                   "ema_model_state_dict": ema, "opt": opt.state_dict(), "args": args,
                   "step": 500000, "loss": 0.25}
        cfg = self.check(wrapped)                      # ema_model_state_dict wins
        self.assertEqual(cfg["hidden_size"], 384)
        nested = {"state_dict": {"model": {"model.module." + k: v for k, v in ema.items()}},
                  "optimizer": opt.state_dict(), "epoch": 7}
        self.check(nested, legacy=True)
        # The converted file holds the EMA weights, not the raw ones.
        t, _ = safetensors_io.read(self.path("c.safetensors"))
        self.assertTrue(torch.equal(t["final_layer.linear.weight"], ema["final_layer.linear.weight"]))

    def test_dtypes_and_strides(self):
        sd = dit_sd(6)
        mixed = collections.OrderedDict()
        for i, (k, v) in enumerate(sd.items()):
            mixed[k] = v.half() if i % 3 == 1 else v.bfloat16() if i % 3 == 2 else v
        mixed["x_embedder.proj.bias"] = sd["x_embedder.proj.bias"].double()  # f64 -> f32
        w = sd["blocks.0.attn.proj.weight"]
        mixed["blocks.0.attn.proj.weight"] = w.t().contiguous().t()          # non-contiguous
        big = torch.zeros(w.numel() + 77)
        big[77:] = sd["blocks.1.attn.proj.weight"].flatten()
        mixed["blocks.1.attn.proj.weight"] = big[77:].view_as(w)             # storage offset
        self.assertFalse(mixed["blocks.0.attn.proj.weight"].is_contiguous())
        self.check(mixed)
        for dt in ("f32", "f16", "bf16"):
            with self.subTest(dtype=dt):
                self.check(mixed, "--dtype", dt, forward=False)

    def test_flags(self):
        names = self.path("names.txt")
        with open(names, "w") as f:
            f.write("\n".join(f"class {i}" for i in range(10)) + "\n\n")
        self.check(dit_sd(7), "--top-k", "1", "--objective", "rf", "--name", "tiny \u00e9\u2603\U0001d11e \"q\"",
                   "--class-names", names, "--sampler", "heun", "--steps", "9", "--cfg-scale",
                   "2.5", "--vae-scale", "0.13025", forward=False)
        self.check(promoe_sd(8), "--promoe-variant", "ec", "--router", "softmax", "--top-k", "2",
                   "--heads", "12", "--cfg-channels", "3", forward=False)
        d64 = randomize_(DiTMoE(**dict(DIT, hidden_size=64, num_heads=4)), 9).state_dict()
        cfg = self.check(d64, "--heads", "4", forward=False)
        self.assertEqual(cfg["num_heads"], 4)

    def test_flag_errors_match_converter(self):
        src = self.save(randomize_(DiTMoE(**dict(DIT, hidden_size=64, num_heads=4)), 0).state_dict())
        for flags in ([], ["--heads", "5"], ["--heads", "4", "--top-k", "9"],
                      ["--heads", "4", "--router", "softmax"], ["--heads", "4", "--num-classes", "3"]):
            with self.subTest(flags=flags):
                rp = run(sys.executable, CONVERTER, src, self.path("p.safetensors"), *flags)
                rc = run(os.path.join(BIN, "ditmoe-convert"), src, self.path("c.safetensors"), *flags)
                self.assertEqual((rp.returncode, rc.returncode), (2, 2), rc.stderr)
                self.assertEqual(rp.stderr.strip().split("error: ", 1)[1],
                                 rc.stderr.strip().split("ditmoe-convert: ", 1)[1])
                self.assertFalse(os.path.exists(self.path("c.safetensors")))

    def test_sample_bit_identical(self):
        src = self.save({"ema": dit_sd(10, attention="qknorm", learn_sigma=False)})
        st = self.py_convert(src)
        z = []
        for i, m in enumerate((src, st)):
            out = self.path(f"z{i}.npy")
            r = run(os.path.join(BIN, "ditmoe-sample"), "--model", m, "--class", "1,7", "--steps",
                    "3", "--seed", "5", "--latent-only", "--save-latent", out, "-q", "--threads", "2")
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(out, "rb") as f:
                z.append(f.read())
        self.assertEqual(z[0], z[1])

    def sample(self, model, tag, *flags):
        """ditmoe-sample with the shipped VAE (4 latent channels): (latent bytes, pixels)."""
        from PIL import Image
        z, png = self.path(f"z-{tag}.npy"), self.path(f"img-{tag}-%d.png")
        r = run(os.path.join(BIN, "ditmoe-sample"), "--model", model, "--class", "1,7", "--steps",
                "3", "--seed", "5", "--save-latent", z, "-o", png, "-q", "--threads", "2", *flags)
        self.assertEqual(r.returncode, 0, r.stderr)
        return read(z), [np.array(Image.open(png % i)) for i in range(2)]

    def test_sample_overrides_both_families(self):
        """ditmoe-sample --model X.pt with the converter's flags == the file converted with them."""
        names = self.path("names.txt")
        with open(names, "w") as f:
            f.write("\n".join(f"thing {i}" for i in range(10)) + "\n")
        d64 = randomize_(DiTMoE(**dict(DIT, hidden_size=64, num_heads=4, num_experts=4)), 21)
        cases = {
            "ditmoe": ({"model": d64.state_dict(), "opt": {"step": 3}},
                       ["--heads", "4", "--top-k", "1", "--objective", "rf", "--num-classes", "10",
                        "--class-names", names, "--vae-scale", "0.3"]),
            "promoe": ({"ema": promoe_sd(22)},
                       ["--heads", "12", "--top-k", "2", "--promoe-variant", "ec", "--router",
                        "softmax", "--vae-scale", "0.25"]),
        }
        for fam, (obj, flags) in cases.items():
            with self.subTest(family=fam):
                src = self.save(obj, f"{fam}.pt")
                st = self.py_convert(src, *flags, out=f"{fam}.safetensors")
                za, pa = self.sample(src, fam + "-pt", *flags)
                zb, pb = self.sample(st, fam + "-st")
                self.assertEqual(za, zb, "latents differ from the converted file's")
                for a, b in zip(pa, pb):
                    self.assertEqual(a.tobytes(), b.tobytes(), "pixels differ")
                # The flags matter: without them the result differs (or the load fails).
                r = run(os.path.join(BIN, "ditmoe-sample"), "--model", src, "--class", "1",
                        "--steps", "3", "--seed", "5", "--save-latent", self.path("zz.npy"),
                        "--latent-only", "-q", *flags[2:])
                if r.returncode == 0:
                    self.assertNotEqual(read(self.path("zz.npy")), za)
                else:
                    self.assertEqual(r.returncode, 2, r.stderr)
        # A bad override value: one line naming the flag, exit 2, for every loading program.
        for prog, extra in (("ditmoe-sample", ["--latent-only", "--save-latent",
                                               self.path("n.npy")]),
                            ("ditmoe-batch", ["--num", "1", "-o", self.path("b")]),
                            ("ditmoe-forward", ["--x", "x", "--t", "t", "--y", "y", "--out", "o"])):
            for bad, word in ((["--router", "tanh"], "--router"), (["--vae-scale", "0"], "--vae-scale"),
                              (["--objective", "edm"], "--objective"), (["--heads", "x"], "--heads")):
                with self.subTest(prog=prog, flag=bad):
                    r = run(os.path.join(BIN, prog), "--model", src, *bad, *extra)
                    self.assertEqual(r.returncode, 2, r.stderr)
                    lines = r.stderr.strip().splitlines()
                    self.assertEqual(len(lines), 1, r.stderr)
                    self.assertIn(word, lines[0])

    def test_convert_makes_output_folder(self):
        """As the Python converter: a missing output folder is created, only on success."""
        src = self.save(dit_sd(23))
        a = self.py_convert(src, out="py/deep/a.safetensors")
        b = self.c_convert(src, out="c/deep/b.safetensors")
        self.assertEqual(read(a), read(b))
        r = run(os.path.join(BIN, "ditmoe-convert"), src, self.path("no/x.safetensors"), "--heads", "5")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertFalse(os.path.exists(self.path("no")), "folder made for a failed conversion")
        write(self.path("afile"), b"x")
        r = run(os.path.join(BIN, "ditmoe-convert"), src, self.path("afile/x.safetensors"))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("afile", r.stderr)

    def test_imagenet_names_default(self):
        """1000-class models without names take ImageNet's: --class 'golden retriever' is 207."""
        src = self.save({"ema": dit_sd(14, num_classes=1000, depth=1, num_experts=2)})
        z = []
        for i, cls in enumerate(("golden retriever", "207")):
            out = self.path(f"in{i}.npy")
            r = run(os.path.join(BIN, "ditmoe-sample"), "--model", src, "--class", cls, "--steps",
                    "1", "--seed", "3", "--latent-only", "--save-latent", out, "-q")
            self.assertEqual(r.returncode, 0, r.stderr)
            z.append(read(out))
        self.assertEqual(z[0], z[1])
        r = run(os.path.join(BIN, "ditmoe-sample"), "--model", src, "--class", "not a class",
                "--latent-only", "--save-latent", self.path("n.npy"), "-q")
        self.assertEqual(r.returncode, 2)
        self.assertIn("class name from the model's table", r.stderr)


class Malformed(Base):
    def good(self, legacy=False):
        return self.save({"ema": dit_sd(0)}, legacy=legacy)

    def zip_with(self, pkl, storages=None, name="bad.pt"):
        p = self.path(name)
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", pkl)
            for k, v in (storages or {}).items():
                z.writestr(f"archive/data/{k}", v)
            z.writestr("archive/version", "3\n")
        return p

    def test_truncated(self):
        data = read(self.good())
        for cut in (len(data) // 2, len(data) - 10, 30):
            with self.subTest(cut=cut):
                p = self.path(f"cut{cut}.pt")
                write(p, data[:cut])
                self.fail_line(p)
        leg = read(self.good(legacy=True))
        p = self.path("legcut.pt")
        write(p, leg[: len(leg) - 1000])
        self.assertIn("past the end", self.fail_line(p, "ditmoe-convert"))

    def test_unknown_opcode(self):
        msg = self.fail_line(self.zip_with(b"\x80\x02I12\n."))
        self.assertIn("opcode 0x49", msg)

    def test_forbidden_global(self):
        flag = self.path("pwned")

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {flag}",))

        for proto in (2, 4):
            with self.subTest(protocol=proto):
                msg = self.fail_line(self.zip_with(pickle.dumps({"x": Evil()}, protocol=proto)),
                                     "ditmoe-convert")
                self.assertIn("forbidden global", msg)
                self.assertIn("system", msg)
                self.assertFalse(os.path.exists(flag), "a global in the file was executed")

    def test_offset_past_end(self):
        p = self.good()
        data = bytearray(read(p))
        with zipfile.ZipFile(p) as z:
            info = [i for i in z.infolist() if "/data/" in i.filename][0]
        # Central directory entry of that storage: patch its local header offset.
        pos = 0
        while True:
            pos = data.find(b"PK\x01\x02", pos)
            nl = struct.unpack_from("<H", data, pos + 28)[0]
            if data[pos + 46: pos + 46 + nl].decode() == info.filename:
                break
            pos += 4
        struct.pack_into("<I", data, pos + 42, len(data) + 4096)
        q = self.path("offset.pt")
        write(q, bytes(data))
        self.assertIn("out of range", self.fail_line(q))

    def test_storage_too_small(self):
        sd = dit_sd(0)
        src = self.save(sd)
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
            pkl = z.read([n for n in names if n.endswith("data.pkl")][0])
            stor = {n.split("/data/")[1]: z.read(n) for n in names if "/data/" in n}
        key = sorted(stor, key=lambda k: -len(stor[k]))[0]
        stor[key] = stor[key][:-4]                      # one f32 element short
        msg = self.fail_line(self.zip_with(pkl, stor))
        self.assertIn("storage " + key, msg)

    def test_not_a_state_dict(self):
        msg = self.fail_line(self.save([1, 2, 3], "list.pt"), "ditmoe-convert")
        self.assertIn("expected a dict", msg)
        msg = self.fail_line(self.save({"a": torch.zeros(3)}, "other.pt"), "ditmoe-convert")
        self.assertIn("missing tensor", msg)

    def test_storage_too_small_for_shape(self):
        st = _Storage("0", 10)
        for size, stride, off, want in (((4, 3), (3, 1), 0, "needs element 11"),
                                        ((2, 2), (1, 5), 4, "needs element 10"),
                                        ((3,), (1,), 8, "needs element 10")):
            with self.subTest(size=size, stride=stride, offset=off):
                pkl = fake_pkl({"x_embedder.proj.weight": _Tensor(st, off, size, stride)})
                msg = self.fail_line(self.zip_with(pkl, {"0": b"\0" * 40}), "ditmoe-convert")
                self.assertIn(want, msg)
                self.assertIn("x_embedder.proj.weight", msg)
        # numel in the persistent id larger than the storage entry
        pkl = fake_pkl({"x_embedder.proj.weight": _Tensor(_Storage("0", 11), 0, (10,), (1,))})
        self.assertIn("holds 40 bytes", self.fail_line(self.zip_with(pkl, {"0": b"\0" * 40})))
        # storage entry missing, unsupported dtype
        pkl = fake_pkl({"x_embedder.proj.weight": _Tensor(_Storage("7", 1), 0, (1,), (1,))})
        self.assertIn("archive/data/7", self.fail_line(self.zip_with(pkl, {"0": b"\0" * 4})))
        pkl = fake_pkl({"x_embedder.proj.weight": _Tensor(_Storage("0", 4, torch.ShortStorage),
                                                         0, (4,), (1,))})
        self.assertIn("int16", self.fail_line(self.zip_with(pkl, {"0": b"\0" * 8})))

    def test_hand_made_pickle_loads(self):
        """A state dict pickled by Python's own pickler (protocol 2 and 4: FRAME, MEMOIZE,
        SHORT_BINUNICODE, STACK_GLOBAL) in a zip written by zipfile loads like torch's."""
        sd = dit_sd(11)
        ref = self.save(sd, "ref.pt")
        storages, obj = {}, collections.OrderedDict()
        for i, (k, v) in enumerate(sd.items()):
            storages[str(i)] = v.contiguous().numpy().tobytes()
            obj[k] = _Tensor(_Storage(str(i), v.numel()), 0, v.shape, v.stride())
        for proto in (2, 4):
            with self.subTest(protocol=proto):
                p = self.zip_with(fake_pkl({"ema": obj}, proto), storages, f"hand{proto}.pt")
                a = self.c_convert(ref, out="a.safetensors")
                b = self.c_convert(p, out="b.safetensors")
                self.assertEqual(read(a), read(b))

    def test_zip64(self):
        """ZIP64 local extras (zipfile force_zip64) and a ZIP64 end record."""
        src = self.good()
        with zipfile.ZipFile(src) as z:
            items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
        p = self.path("z64.pt")
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
            for n, d in items:
                with z.open(n, "w", force_zip64=True) as f:
                    f.write(d)
        data = bytearray(read(p))
        e = data.rfind(b"PK\x05\x06")
        cnt, cd_size, cd_off = struct.unpack_from("<HII", data, e + 10)
        if data[e - 20:e - 16] != b"PK\x06\x07":      # add a ZIP64 end record + locator
            z64 = struct.pack("<IQHHIIQQQQ", 0x06064b50, 44, 45, 45, 0, 0, cnt, cnt, cd_size, cd_off)
            loc = struct.pack("<IIQI", 0x07064b50, 0, e, 1)
            tail = bytearray(data[e:])
            struct.pack_into("<HHII", tail, 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
            data = data[:e] + z64 + loc + tail
        write(p, bytes(data))
        a = self.c_convert(src, out="a.safetensors")
        b = self.c_convert(p, out="b.safetensors")
        self.assertEqual(read(a), read(b))

    def test_compressed_entry(self):
        src = self.good()
        with zipfile.ZipFile(src) as z:
            items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
        p = self.path("deflated.pt")
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
            for n, d in items:
                z.writestr(n, d)
        self.assertIn("compressed", self.fail_line(p))

    def test_random_corruption(self):
        """Flipped bytes in data.pkl: an error line or a loadable file, never a crash."""
        sd = {"x_embedder.proj.weight": torch.randn(4, 4, 2, 2), "pos_embed": torch.randn(1, 4, 4)}
        src = self.save({"model": sd, "opt": {"state": {0: {"step": torch.tensor(3.0)}}}})
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
            pkl = z.read([n for n in names if n.endswith("data.pkl")][0])
            stor = {n.split("/data/")[1]: z.read(n) for n in names if "/data/" in n}
        rng = np.random.RandomState(0)
        for trial in range(60):
            bad = bytearray(pkl)
            for _ in range(1 + trial % 3):
                bad[rng.randint(2, len(bad))] = rng.randint(256)
            p = self.zip_with(bytes(bad), stor, "fuzz.pt")
            r = run(os.path.join(BIN, "ditmoe-convert"), p, self.path("f.safetensors"))
            self.assertIn(r.returncode, (0, 2), r.stderr)
            if r.returncode:
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)


class Overrides(Base):
    """dm_load_opts.cfg (what the CLI flags will fill): a .pt that needs flags, loaded through
    libditmoe.so with overrides, computes the bits of the file converted with the same flags."""

    class Ov(ctypes.Structure):
        _fields_ = [("heads", ctypes.c_int), ("top_k", ctypes.c_int), ("num_classes", ctypes.c_int),
                    ("objective", ctypes.c_char_p), ("class_names", ctypes.c_char_p),
                    ("name", ctypes.c_char_p), ("promoe_variant", ctypes.c_char_p),
                    ("router", ctypes.c_char_p), ("vae_scale", ctypes.c_double),
                    ("sampler", ctypes.c_char_p), ("steps", ctypes.c_int),
                    ("cfg_scale", ctypes.c_double), ("cfg_channels", ctypes.c_int)]

    class LoadOpts(ctypes.Structure):
        _fields_ = [("backend", ctypes.c_int), ("device", ctypes.c_int), ("cfg", ctypes.c_void_p)]

    @classmethod
    def setUpClass(cls):
        build = os.environ.get("DITMOE_BUILD") or os.path.dirname(BIN)
        so = os.path.join(build, "lib", "libditmoe.so")
        if "libasan" in run("ldd", so).stdout and "libasan" not in os.environ.get("LD_PRELOAD", ""):
            raise unittest.SkipTest("sanitizer build: the library can only be loaded into Python "
                                    "with LD_PRELOAD=$(gcc -print-file-name=libasan.so)")
        cls.lib = ctypes.CDLL(so)
        cls.lib.dm_last_error.restype = ctypes.c_char_p
        cls.lib.dm_model_load_opts.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        cls.lib.dm_model_forward.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5
        cls.lib.dm_model_free.argtypes = [ctypes.c_void_p]

    def load(self, path, **over):
        ov = self.Ov()
        self.lib.dm_config_overrides_init(ctypes.byref(ov))
        for k, v in over.items():
            setattr(ov, k, v.encode() if isinstance(v, str) else v)
        lo = self.LoadOpts()
        self.lib.dm_load_opts_init(ctypes.byref(lo))
        lo.cfg = ctypes.cast(ctypes.byref(ov), ctypes.c_void_p).value
        m = ctypes.c_void_p()
        st = self.lib.dm_model_load_opts(path.encode(), ctypes.byref(lo), ctypes.byref(m))
        return st, m, self.lib.dm_last_error().decode()

    def forward(self, m, x, t, y, cout):
        out = np.zeros((x.shape[0], cout) + x.shape[2:], np.float32)
        st = self.lib.dm_model_forward(m, x.shape[0], x.ctypes.data, t.ctypes.data, y.ctypes.data,
                                       out.ctypes.data, None)
        self.assertEqual(st, 0, self.lib.dm_last_error())
        return out

    def compare(self, sd, flags, over, cout):
        src = self.save(sd)
        conv = self.py_convert(src, *flags)
        st, m_pt, err = self.load(src, **over)
        self.assertEqual(st, 0, err)
        st, m_st, err = self.load(conv)
        self.assertEqual(st, 0, err)
        rng = np.random.RandomState(1)
        x = rng.randn(2, 4, 8, 8).astype(np.float32)
        t = np.array([0.2, 0.7], np.float32) * 999
        y = np.array([2, 10], np.int64)
        a, b = self.forward(m_pt, x, t, y, cout), self.forward(m_st, x, t, y, cout)
        self.lib.dm_model_free(m_pt)
        self.lib.dm_model_free(m_st)
        self.assertEqual(a.tobytes(), b.tobytes())
        return a

    def test_heads_top_k(self):
        sd = randomize_(DiTMoE(**dict(DIT, hidden_size=64, num_heads=4)), 12).state_dict()
        st, _, err = self.load(self.save(sd, "noflags.pt"))
        self.assertEqual(st, 3, err)                       # DM_ERR_FORMAT
        self.assertIn("pass --heads N", err)
        a = self.compare(sd, ["--heads", "4", "--top-k", "1"], dict(heads=4, top_k=1), 8)
        b = self.compare(sd, ["--heads", "4"], dict(heads=4), 8)
        self.assertNotEqual(a.tobytes(), b.tobytes(), "top_k override had no effect")

    def test_promoe_variant_router(self):
        sd = promoe_sd(13, num_experts=4)
        self.compare(sd, ["--promoe-variant", "ec", "--router", "sigmoid", "--top-k", "2"],
                     dict(promoe_variant="ec", router="sigmoid", top_k=2), 4)
        st, _, err = self.load(self.save(dit_sd(0), "d.pt"), router="softmax")
        self.assertEqual(st, 1, err)                       # DM_ERR_ARG
        self.assertIn("--router: only for ProMoE", err)


if __name__ == "__main__":
    unittest.main(verbosity=2)

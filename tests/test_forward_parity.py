"""Forward-pass parity: ditmoe-forward (C) vs the PyTorch reference tests/ref/dit_moe_ref.py.

1. Self-check of the reference: a literal float64 NumPy implementation of spec ditmoe.md §2
   (loops over tokens / heads, explicit index formulas) on the same state dict.
   Tolerance: max|diff| <= 1e-5 * RMS(output) (fp32 vs fp64), identical routing.
2. C parity over attention {timm, qknorm} x E {4, 8} x k {1, 2} x weight dtype {F32, BF16, F16},
   B = 3 and B = 1: small random models converted with tools/convert_checkpoint.py.
   Tolerance: max|diff| <= 1e-4 * RMS(reference output); BF16 files are compared against the
   reference run on the same bf16-rounded weights (upcast to fp32), so the tolerance is the same.
   Routing: identical per-token expert sets (tokens whose k-th / (k+1)-th scores are within 1e-5
   are skipped and counted); the first id must also match when the top-1/top-2 gap is > 1e-5.
3. ditmoe-forward rejects bad inputs (float64 x, wrong x shape, y of wrong length, missing model)
   with a non-zero exit and a one-line message naming the file/flag.
Needs DITMOE_BIN (dir holding ditmoe-forward); without it only part 1 runs.
"""
import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN")
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
sys.path.insert(0, os.path.join(SRC, "tools"))
import convert_checkpoint  # noqa: E402
from dit_moe_ref import DiTMoE, randomize_, round_params_  # noqa: E402

FORWARD = os.path.join(BIN, "ditmoe-forward") if BIN else None
TIE = 1e-5


# --------------------------------------------------------------------------- naive fp64 spec

def naive_forward(sd, cfg, x, t, y):
    """Literal float64 implementation of spec §2 from the state dict. Returns (out, routes)
    with routes[l] = (ids [B*T,k] descending, scores [B*T,E])."""
    W = {k: v.double().numpy() for k, v in sd.items()}
    D, H, P, C = cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"], cfg["in_channels"]
    E, K = cfg["num_experts"], cfg["top_k"]
    G = cfg["input_size"] // P
    T, hd = G * G, D // H
    cout = 2 * C if cfg["learn_sigma"] else C
    B = x.shape[0]
    x = x.astype(np.float64)

    def silu(v):
        return v / (1.0 + np.exp(-v))

    def ln(v, eps=1e-6):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + eps)

    def lin(v, name, bias=True):
        out = v @ W[name + ".weight"].T
        return out + W[name + ".bias"] if bias else out

    def swiglu(v, pre):
        g = lin(v, pre + "gate_proj", False)
        return lin(silu(g) * lin(v, pre + "up_proj", False), pre + "down_proj", False)

    # pos embed, element by element (§2.2)
    pos = np.zeros((T, D))
    Kq = D // 4
    for m in range(T):
        i, j = divmod(m, G)
        for ch in range(D):
            p, idx = (j, ch) if ch < D // 2 else (i, ch - D // 2)
            w = 1.0 / 10000.0 ** ((idx % Kq) / Kq)
            pos[m, ch] = math.sin(p * w) if idx < Kq else math.cos(p * w)
    # timestep (§2.3): frequencies and arguments in float32 as the spec says, cos first
    f = np.exp(-math.log(10000.0) * np.arange(128, dtype=np.float32) / np.float32(128)).astype(np.float32)
    args = (t.astype(np.float32)[:, None] * f[None, :]).astype(np.float64)
    temb = np.concatenate([np.cos(args), np.sin(args)], 1)
    temb = lin(silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + W["y_embedder.embedding_table.weight"][y]                       # [B,D]
    sc = silu(c)

    out = np.zeros((B, cout, G * P, G * P))
    routes = [([], []) for _ in range(cfg["depth"])]
    for b in range(B):
        # patch embed (c, pi, pj) order
        h = np.zeros((T, D))
        wp = W["x_embedder.proj.weight"].reshape(D, -1)
        for m in range(T):
            i, j = divmod(m, G)
            h[m] = wp @ x[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1) + W["x_embedder.proj.bias"]
        h += pos
        for l in range(cfg["depth"]):
            pre = f"blocks.{l}."
            mod = lin(sc[b], pre + "adaLN_modulation.1")
            s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = [mod[q * D:(q + 1) * D] for q in range(6)]
            a = ln(h) * (1 + c_msa) + s_msa
            if cfg["attention"] == "timm":
                qkv = lin(a, pre + "attn.qkv")
            else:
                qkv = lin(a, pre + "attn.Wqkv")
            att = np.zeros((T, D))
            for hh in range(H):
                q = qkv[:, hh * hd:(hh + 1) * hd]
                k = qkv[:, D + hh * hd:D + (hh + 1) * hd]
                v = qkv[:, 2 * D + hh * hd:2 * D + (hh + 1) * hd]
                if cfg["attention"] == "qknorm":
                    q = ln(q) * W[pre + "attn.q_norm.weight"] + W[pre + "attn.q_norm.bias"]
                    k = ln(k) * W[pre + "attn.k_norm.weight"] + W[pre + "attn.k_norm.bias"]
                s = q @ k.T / math.sqrt(hd)
                s = np.exp(s - s.max(1, keepdims=True))
                att[:, hh * hd:(hh + 1) * hd] = (s / s.sum(1, keepdims=True)) @ v
            att = lin(att, pre + ("attn.proj" if cfg["attention"] == "timm" else "attn.out_proj"))
            h = h + g_msa * att
            a = ln(h) * (1 + c_mlp) + s_mlp
            moe = np.zeros((T, D))
            for m in range(T):
                logits = W[pre + "moe.gate.weight"] @ a[m]
                p = np.exp(logits - logits.max())
                p /= p.sum()
                ids = np.argsort(-p, kind="stable")[:K]
                routes[l][0].append(ids)
                routes[l][1].append(p)
                for e in ids:
                    moe[m] += p[e] * swiglu(a[m], f"{pre}moe.experts.{e}.")
                if cfg["shared_hidden"] > 0:
                    moe[m] += swiglu(a[m], pre + "moe.shared_experts.")
            h = h + g_mlp * moe
        mod = lin(sc[b], "final_layer.adaLN_modulation.1")
        o = lin(ln(h) * (1 + mod[D:]) + mod[:D], "final_layer.linear")               # [T, P*P*cout]
        for m in range(T):
            i, j = divmod(m, G)
            for pi in range(P):
                for pj in range(P):
                    for ch in range(cout):
                        out[b, ch, i * P + pi, j * P + pj] = o[m, (pi * P + pj) * cout + ch]
    routes = [(np.array(r[0]), np.array(r[1])) for r in routes]
    return out, routes


# --------------------------------------------------------------------------- helpers

def make_inputs(B, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    S, nc = cfg["input_size"], cfg["num_classes"]
    x = torch.randn(B, cfg["in_channels"], S, S, generator=g)
    t_pool = [999.0, 0.37, 250.0, 1.0, 13.0, 0.05]        # DDPM-like integers and RF (0, 1]
    y_pool = [3 % nc, nc, 7 % nc, nc, 0, nc - 1]                  # real labels and the null class
    t = torch.tensor([t_pool[(seed + i) % len(t_pool)] for i in range(B)], dtype=torch.float32)
    y = torch.tensor([y_pool[(seed + i) % len(y_pool)] for i in range(B)], dtype=torch.int64)
    return x, t, y


def reference(model, x, t, y):
    """-> (out [B,C,H,W] numpy fp32, routes list of ids [N,k], full scores list [N,E])."""
    scores = []
    hooks = [b.moe.gate.register_forward_hook(
        lambda mod, inp, out: scores.append(torch.softmax(out.float(), -1).numpy()))
        for b in model.blocks]
    routes = []
    with torch.no_grad():
        out = model(x, t, y, routes=routes)
    for h in hooks:
        h.remove()
    return out.numpy(), [r[0].numpy() for r in routes], scores


def compare_routes(tc, got_ids, ref_scores, k, what):
    """got_ids [L,N,k]; ref_scores list of [N,E]. Returns (compared, skipped)."""
    compared = skipped = 0
    for l, sc in enumerate(ref_scores):
        srt = -np.sort(-sc, axis=1)                                  # [N,E] descending
        for n in range(sc.shape[0]):
            if k < sc.shape[1] and srt[n, k - 1] - srt[n, k] < TIE:
                skipped += 1
                continue
            want = set(np.argsort(-sc[n], kind="stable")[:k].tolist())
            got = set(int(v) for v in got_ids[l, n])
            tc.assertEqual(got, want, f"{what}: layer {l} token {n}: experts {sorted(got)} "
                                      f"expected {sorted(want)} (scores {np.round(sc[n], 6)})")
            if k >= 2 and srt[n, 0] - srt[n, 1] >= TIE:
                tc.assertEqual(int(got_ids[l, n, 0]), int(np.argmax(sc[n])),
                               f"{what}: layer {l} token {n}: ids not in descending weight order")
            compared += 1
    return compared, skipped


# --------------------------------------------------------------------------- tests

class TestReferenceSelfCheck(unittest.TestCase):
    """The PyTorch reference against the literal fp64 spec implementation."""

    def test_reference_matches_spec(self):
        for attention, E, k, B in (("timm", 4, 2, 2), ("qknorm", 8, 1, 2), ("qknorm", 4, 2, 1)):
            with self.subTest(attention=attention, E=E, k=k):
                cfg = dict(hidden_size=32, depth=2, num_heads=4, num_experts=E, top_k=k,
                           attention=attention, patch_size=2, input_size=8, in_channels=4,
                           learn_sigma=True, num_classes=10)
                model = randomize_(DiTMoE(**cfg), seed=11).eval()
                x, t, y = make_inputs(B, cfg, seed=5)
                out, _, scores = reference(model, x, t, y)
                want, nroutes = naive_forward(model.state_dict(), model.config, x.numpy(),
                                              t.numpy(), y.numpy())
                rms = float(np.sqrt(np.mean(want ** 2)))
                err = float(np.abs(out - want).max())
                self.assertGreater(rms, 0.05)        # random non-zero model: output is not ~0
                self.assertLessEqual(err, 1e-5 * rms, f"max|diff| {err:.3g}, rms {rms:.3g}")
                got = np.stack([r[0] for r in nroutes])                        # [L,N,k]
                n, _ = compare_routes(self, got, scores, k, "naive vs reference")
                self.assertGreater(n, 0)

    def test_learn_sigma_off_and_no_shared(self):
        cfg = dict(hidden_size=32, depth=1, num_heads=2, num_experts=4, top_k=2, attention="timm",
                   patch_size=2, input_size=8, in_channels=4, learn_sigma=False, num_classes=5,
                   shared_hidden=0)
        model = randomize_(DiTMoE(**cfg), seed=3).eval()
        x, t, y = make_inputs(2, cfg, seed=1)
        out, _, _ = reference(model, x, t, y)
        want, _ = naive_forward(model.state_dict(), model.config, x.numpy(), t.numpy(), y.numpy())
        self.assertEqual(out.shape, (2, 4, 8, 8))
        self.assertLessEqual(float(np.abs(out - want).max()), 1e-5 * float(np.sqrt(np.mean(want ** 2))))

    def test_training_helpers(self):
        cfg = dict(hidden_size=32, depth=2, num_heads=4, num_experts=4, top_k=2, attention="timm",
                   patch_size=2, input_size=8, in_channels=4, learn_sigma=True, num_classes=10)
        model = randomize_(DiTMoE(**cfg), seed=0).train()
        x, t, y = make_inputs(3, cfg, seed=0)
        scores = []
        hook = model.blocks[-1].moe.gate.register_forward_hook(
            lambda mod, inp, out: scores.append(torch.softmax(out.detach().float(), -1)))
        routes = []
        # force_drop_ids all 1: every label replaced by the null class, deterministic
        out = model(x, t, y, routes=routes, force_drop_ids=torch.ones(3, dtype=torch.long))
        hook.remove()
        self.assertEqual(len(model.aux_losses), 2)
        # balance loss recomputed independently (spec 2.11): alpha * sum_i P_i * f_i,
        # P_i = mean score of expert i, f_i = E * (fraction of the N*k assignments to i)
        P = scores[0].numpy().astype(np.float64).mean(0)
        ids = routes[-1][0].numpy()
        f = 4 * np.bincount(ids.reshape(-1), minlength=4) / ids.size
        self.assertAlmostEqual(float(model.aux_losses[-1]), 0.01 * float((P * f).sum()), places=6)
        model.eval()
        with torch.no_grad():
            null = model(x, t, torch.full((3,), 10, dtype=torch.long))
        model.train()
        self.assertTrue(torch.allclose(out.detach(), null, atol=1e-6))    # dropped = null label
        (out.square().mean() + sum(model.aux_losses)).backward()
        self.assertGreater(float(model.blocks[0].moe.gate.weight.grad.abs().sum()), 0)


@unittest.skipUnless(FORWARD, "DITMOE_BIN not set: C parity skipped")
class TestForwardParity(unittest.TestCase):
    CASES = [  # attention, E, k, dtype, input_size, B
        ("timm", 4, 1, "f32", 8, 3),
        ("timm", 8, 2, "bf16", 16, 3),
        ("qknorm", 4, 2, "bf16", 8, 3),
        ("qknorm", 8, 1, "f16", 16, 1),
        ("qknorm", 8, 2, "f32", 16, 3),
        ("timm", 4, 2, "f32", 16, 1),
    ]

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ditmoe-parity-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def p(self, name):
        return os.path.join(self.dir, name)

    def build(self, attention, E, k, dtype, S, seed):
        cfg = dict(hidden_size=64, depth=2, num_heads=4, num_experts=E, top_k=k,
                   attention=attention, patch_size=2, input_size=S, in_channels=4,
                   learn_sigma=True, num_classes=10)
        model = randomize_(DiTMoE(**cfg), seed=seed).eval()
        pt, st = self.p(f"m{seed}.pt"), self.p(f"m{seed}.safetensors")
        torch.save({"ema": model.state_dict()}, pt)
        # The converter in-process (its command line is covered by test_convert.py).
        with contextlib.redirect_stdout(io.StringIO()):
            rc = convert_checkpoint.main([pt, st, "--heads", "4", "--top-k", str(k),
                                          "--dtype", dtype])
        self.assertEqual(rc, 0, f"convert_checkpoint failed for {pt}")
        if dtype in ("bf16", "f16"):  # the C engine keeps these 16-bit and widens exactly
            round_params_(model, torch.bfloat16 if dtype == "bf16" else torch.float16)
        return model, cfg, st

    def run_c(self, model_path, x, t, y, extra=()):
        paths = {n: self.p(n + ".npy") for n in ("x", "t", "y")}
        np.save(paths["x"], x)
        np.save(paths["t"], t)
        np.save(paths["y"], y)
        out, routes = self.p("out.npy"), self.p("routes.npy")
        for f in (out, routes):
            if os.path.exists(f):
                os.unlink(f)
        cmd = [FORWARD, "--model", model_path, "--x", paths["x"], "--t", paths["t"],
               "--y", paths["y"], "--out", out, "--routes", routes, "--threads", "2", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r, out, routes

    def test_parity(self):
        seen = {"attn": set(), "E": set(), "k": set(), "dtype": set(), "B": set()}
        total_cmp = total_skip = 0
        for seed, (attention, E, k, dtype, S, B) in enumerate(self.CASES):
            what = f"{attention} E{E} k{k} {dtype} {S}x{S} B{B}"
            with self.subTest(what):
                model, cfg, st = self.build(attention, E, k, dtype, S, seed)
                x, t, y = make_inputs(B, cfg, seed)
                ref, _, scores = reference(model, x, t, y)
                r, out, routes = self.run_c(st, x.numpy(), t.numpy(), y.numpy())
                self.assertEqual(r.returncode, 0, f"{what}: ditmoe-forward failed: {r.stderr}")
                got = np.load(out)
                self.assertEqual(got.dtype, np.float32)
                self.assertEqual(got.shape, ref.shape)
                rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
                err = float(np.abs(got.astype(np.float64) - ref).max())
                print(f"  {what}: max|diff| {err:.3g} = {err / rms:.3g} x RMS {rms:.3g}",
                      file=sys.stderr)
                self.assertLessEqual(err, 1e-4 * rms, f"{what}: max|diff| {err:.3g}, RMS {rms:.3g}")
                ids = np.load(routes)
                T = (S // 2) ** 2
                self.assertEqual(ids.dtype, np.int32)
                self.assertEqual(ids.shape, (2, B * T, k))
                c, s = compare_routes(self, ids, scores, k, what)
                total_cmp, total_skip = total_cmp + c, total_skip + s
                for key, v in (("attn", attention), ("E", E), ("k", k), ("dtype", dtype), ("B", B)):
                    seen[key].add(v)
        print(f"  routing: {total_cmp} tokens compared, {total_skip} near-ties skipped",
              file=sys.stderr)
        self.assertLessEqual(total_skip, total_cmp // 20 + 1)
        self.assertEqual(seen, {"attn": {"timm", "qknorm"}, "E": {4, 8}, "k": {1, 2},
                                "dtype": {"f32", "bf16", "f16"}, "B": {1, 3}})

    def test_bad_inputs(self):
        _, cfg, st = self.build("timm", 4, 2, "f32", 8, 0)
        x, t, y = make_inputs(3, cfg, 0)
        x, t, y = x.numpy(), t.numpy(), y.numpy()
        r, out, _ = self.run_c(st, x, t, y)
        self.assertEqual(r.returncode, 0, r.stderr)
        cases = [
            ("x float64", st, x.astype(np.float64), t, y, "x.npy"),
            ("x wrong shape", st, x[:, :, :6, :], t, y, "x.npy"),
            ("x wrong channels", st, x[:, :3], t, y, "x.npy"),
            ("y wrong length", st, x, t, y[:2], "y.npy"),
            ("missing model", self.p("nope.safetensors"), x, t, y, "nope.safetensors"),
        ]
        for what, model_path, xx, tt, yy, name in cases:
            with self.subTest(what):
                r, out, _ = self.run_c(model_path, np.ascontiguousarray(xx), tt, yy)
                self.assertNotEqual(r.returncode, 0, f"{what}: accepted")
                self.assertNotIn("Traceback", r.stderr)
                msgs = [ln for ln in r.stderr.strip().splitlines()
                        if ln and not ln.startswith("[INFO]")]
                self.assertEqual(len(msgs), 1, f"{what}: expected one message line: {r.stderr!r}")
                self.assertTrue(name in msgs[0] or ("--" + name.split(".")[0]) in msgs[0],
                                f"{what}: message does not name {name}: {msgs[0]}")
                self.assertFalse(os.path.exists(out), f"{what}: output written anyway")


if __name__ == "__main__":
    t0 = time.time()
    prog = unittest.main(verbosity=2, exit=False)
    print(f"test_forward_parity: {time.time() - t0:.1f} s", file=sys.stderr)
    sys.exit(0 if prog.result.wasSuccessful() else 1)

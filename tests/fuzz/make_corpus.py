"""Seed corpora for the libFuzzer targets of tests/fuzz (scripts/fuzz.sh runs this first).

    /usr/bin/python3 tests/fuzz/make_corpus.py OUTDIR

writes OUTDIR/<target>/*, small valid (and a few nearly valid) inputs for each target, so the
fuzzer starts from files that reach deep into each parser instead of guessing magic numbers:

  fuzz_safetensors  tiny safetensors files (F32/F16/BF16/I64, metadata, empty), a tiny model
  fuzz_model        tiny DiT-MoE (ddpm, rf + qk-norm) and ProMoE (tc, ec) models, converted by
                    tools/convert_checkpoint.py from the reference models in tests/ref
  fuzz_npy          .npy v1.0 / v2.0 arrays of every supported dtype, 0-d and empty ones
  fuzz_trace        routing dumps (docs/routing.md layout): u8/u16 ids, weights, token flags
  fuzz_manifest     ditmoe-batch manifests
  fuzz_vae          tiny SD-VAE decoders (tests/ref/vae_ref.py), with and without metadata
  fuzz_png          PNGs: gray, gray+alpha, RGB, RGBA, palette, 16-bit, interlaced, tEXt

Everything is generated (nothing binary is kept in git) and deterministic (fixed seeds).
"""
import contextlib
import io
import json
import os
import struct
import sys
import tempfile
import zlib

import numpy as np
import torch

SRC = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(SRC, "tools"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import safetensors_io  # noqa: E402


def put(out, target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def st_bytes(tensors, metadata=None):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        safetensors_io.write(p, tensors, metadata)
        return open(p, "rb").read()


# ------------------------------------------------------------------ models

def convert(model_state, flags):
    import convert_checkpoint
    with tempfile.TemporaryDirectory() as d:
        pt, out = os.path.join(d, "m.pt"), os.path.join(d, "m.safetensors")
        torch.save(model_state, pt)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = convert_checkpoint.main([pt, out, *flags])
        if rc:
            raise RuntimeError(f"convert_checkpoint {flags} failed")
        return open(out, "rb").read()


def ditmoe_model(seed, **over):
    from dit_moe_ref import DiTMoE, randomize_
    cfg = dict(hidden_size=8, depth=1, num_heads=2, num_experts=2, top_k=2, attention="timm",
               patch_size=2, input_size=4, in_channels=4, learn_sigma=True, num_classes=2)
    cfg.update(over)
    m = randomize_(DiTMoE(**cfg), seed=seed).eval()
    return {"ema": m.state_dict()}, cfg


def promoe_model(seed, variant):
    import promoe_ref
    kw = dict(hidden_size=8, depth=2, num_heads=2, num_experts=2, top_k=1, patch_size=2,
              input_size=4, in_channels=4, learn_sigma=True, num_classes=2, expert_hidden=8,
              shared_hidden=8, mlp_hidden=16, variant=variant, router="identity")
    m = promoe_ref.randomize_(promoe_ref.ProMoE(**kw), seed).eval()
    return {"ema_model_state_dict": m.state_dict()}


def models(out):
    sd, cfg = ditmoe_model(1)
    ddpm = convert(sd, ["--heads", "2", "--top-k", "2"])
    put(out, "fuzz_model", "ditmoe-ddpm.safetensors", ddpm)
    put(out, "fuzz_safetensors", "ditmoe-ddpm.safetensors", ddpm)
    sd, cfg = ditmoe_model(2, attention="qknorm", learn_sigma=False, top_k=1)
    put(out, "fuzz_model", "ditmoe-rf-qknorm.safetensors",
        convert(sd, ["--heads", "2", "--top-k", "1", "--objective", "rf", "--sampler", "euler",
                     "--steps", "4"]))
    put(out, "fuzz_model", "promoe-tc.safetensors",
        convert(promoe_model(3, "tc"), ["--heads", "2", "--top-k", "1", "--promoe-variant", "tc"]))
    put(out, "fuzz_model", "promoe-ec.safetensors",
        convert(promoe_model(4, "ec"), ["--heads", "2", "--top-k", "1", "--promoe-variant", "ec",
                                        "--router", "softmax"]))
    # the same weights without metadata: the config is inferred from the tensors
    sd, cfg = ditmoe_model(5)
    raw = st_bytes({k: v for k, v in sd["ema"].items()})
    put(out, "fuzz_model", "ditmoe-nometa.safetensors", raw)


def safetensors(out):
    g = torch.Generator().manual_seed(0)
    put(out, "fuzz_safetensors", "f32.safetensors",
        st_bytes({"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, generator=g)}))
    put(out, "fuzz_safetensors", "f16-bf16.safetensors",
        st_bytes({"h": torch.randn(2, 3, generator=g).half(),
                  "bf": torch.randn(5, generator=g).bfloat16(),
                  "i": torch.arange(4, dtype=torch.int64), "u": torch.arange(3, dtype=torch.uint8)},
                 {"ditmoe": json.dumps({"format_version": 1}), "note": "x"}))
    put(out, "fuzz_safetensors", "scalar-empty.safetensors",
        st_bytes({"s": torch.tensor(1.5), "e": torch.zeros(0, 3)}))
    put(out, "fuzz_safetensors", "header-only.safetensors", st_bytes({}))


# ------------------------------------------------------------------ npy

def npy_bytes(a, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, a)
    else:
        np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def npys(out):
    rng = np.random.default_rng(0)
    put(out, "fuzz_npy", "f32-4d.npy", npy_bytes(rng.standard_normal((1, 4, 2, 2)).astype("<f4")))
    put(out, "fuzz_npy", "f32-v2.npy", npy_bytes(np.arange(6, dtype="<f4").reshape(2, 3), (2, 0)))
    put(out, "fuzz_npy", "i64.npy", npy_bytes(np.array([3, 10, 0], dtype="<i8")))
    put(out, "fuzz_npy", "i32.npy", npy_bytes(np.array([[1, 2]], dtype="<i4")))
    put(out, "fuzz_npy", "u8.npy", npy_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4)))
    put(out, "fuzz_npy", "scalar.npy", npy_bytes(np.float32(2.5).reshape(())))
    put(out, "fuzz_npy", "empty.npy", npy_bytes(np.zeros((0, 3), dtype="<f4")))
    put(out, "fuzz_npy", "nan.npy", npy_bytes(np.array([1, np.nan, np.inf], dtype="<f4")))


# ------------------------------------------------------------------ routing dumps

def dump_bytes(layers=1, grid=(2, 2), k=2, E=4, uncond=-1, classes=3, steps=2, heun=False,
               weights=True, tokflags=False, batches=1, rows=2, seed=0):
    """A routing dump in the byte layout of src/trace/format.h (docs/routing.md)."""
    rng = np.random.default_rng(seed)
    T = grid[0] * grid[1]
    X = uncond + 1 if uncond >= 0 else E
    idb = 1 if X < 255 else 2
    recs = []
    evals = (2 * steps - 1) if heun else steps
    for b in range(batches):
        for ev in range(evals):
            step = (ev // 2) if heun else ev
            R = rows
            body = b""
            for r in range(R):
                unc = r >= R // 2
                cls = int(rng.integers(classes))
                label = classes if unc else cls
                t = 1.0 - ev / max(evals, 1)
                body += struct.pack("<qiifI", b * 100 + r % (R // 2 or 1), label, cls, t, int(unc))
            n = layers * R * T * k
            ids = rng.integers(0, E, size=n)
            ids[rng.random(n) < 0.1] = -1
            if uncond >= 0:
                ids[rng.random(n) < 0.1] = uncond
            none = 0xFF if idb == 1 else 0xFFFF
            ids = np.where(ids < 0, none, ids)
            body += ids.astype("<u1" if idb == 1 else "<u2").tobytes()
            if weights:
                body += rng.random(n).astype("<f2").tobytes()
            if tokflags:
                body += rng.integers(0, 4, size=layers * R * T).astype(np.uint8).tobytes()
            head = struct.pack("<IIIIIIQ", 0x52524D44, b, ev, step, R, 1 if tokflags else 0,
                               len(body))
            recs.append(head + body)
    data = b"".join(recs)
    header = {"format": "ditmoe-routing", "version": 1,
              "shape": {"layers": layers, "moe_layers": list(range(1, 2 * layers, 2)),
                        "grid": list(grid), "tokens": T, "top_k": k, "experts": E,
                        "uncond_expert": uncond, "num_classes": classes, "steps": steps,
                        "heun": heun, "id_dtype": "u8" if idb == 1 else "u16",
                        "weights": "f16" if weights else "none"},
              "records": len(recs), "batches": batches}
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"DMROUTE1" + struct.pack("<QQ", 24 + len(data), len(h)) + data + h


def dumps(out):
    put(out, "fuzz_trace", "ditmoe.dmr", dump_bytes())
    put(out, "fuzz_trace", "two-layers-heun.dmr", dump_bytes(layers=2, heun=True, steps=3, seed=1))
    put(out, "fuzz_trace", "promoe-flags.dmr",
        dump_bytes(k=1, E=3, uncond=3, tokflags=True, weights=False, batches=2, seed=2))
    put(out, "fuzz_trace", "u16-ids.dmr", dump_bytes(k=1, E=300, uncond=300, rows=2, seed=3))
    put(out, "fuzz_trace", "unknown-steps.dmr", dump_bytes(steps=0, seed=4)
        .replace(b'"steps":0', b'"steps":0'))
    put(out, "fuzz_trace", "truncated.dmr", dump_bytes(steps=1, rows=2)[:24])


# ------------------------------------------------------------------ manifests

def manifests(out):
    m = {"format": "ditmoe-batch", "version": 1, "software": "ditmoe-batch 0.1.0",
         "model": {"file": "m.safetensors", "sha256": "0" * 64},
         "vae": {"file": "v.safetensors", "sha256": "0" * 63 + "1"},
         "params": {"seed": "0", "sampler": "ddpm", "steps": 250, "cfg_scale": 4, "cfg_channels": 0,
                    "cfg_t_lo": 0, "cfg_t_hi": 1, "eta": 0, "classes": "random",
                    "num_classes": 10, "num": 100, "width": 32, "height": 32, "channels": 1},
         "progress": {"done": 3, "total": 100, "updated": "2026-01-01T00:00:00Z"}}
    put(out, "fuzz_manifest", "match.json", json.dumps(m, indent=2).encode())
    m2 = json.loads(json.dumps(m))
    m2["params"].update(seed="18446744073709551615", classes="3,5,7", num=50000, width=256,
                        height=256, channels=3)
    put(out, "fuzz_manifest", "other.json", json.dumps(m2).encode())
    put(out, "fuzz_manifest", "minimal.json", b'{"format":"ditmoe-batch","version":1,'
        b'"params":{"num":1}}')


# ------------------------------------------------------------------ VAEs

def vaes(out):
    import vae_ref as V
    with tempfile.TemporaryDirectory() as d:
        for name, kw, meta in (("sd-tiny", dict(ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                                z_channels=4, out_ch=3), True),
                               ("gray-nometa", dict(ch=8, ch_mult=(1,), num_res_blocks=1,
                                                    z_channels=2, out_ch=1), False)):
            cfg = V.VAEConfig(**kw)
            dec = V.randomize_(V.Decoder(cfg), seed=len(name))
            p = os.path.join(d, name)
            V.write_safetensors(p, dec.state_dict(), V.vae_metadata(cfg) if meta else None)
            put(out, "fuzz_vae", name + ".safetensors", open(p, "rb").read())


# ------------------------------------------------------------------ PNGs

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(w, h, color, depth=8, interlace=0, text=None, palette=False, seed=0):
    rng = np.random.default_rng(seed)
    ch = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    bpp = ch * depth // 8 or 1
    rows = b""
    if interlace:  # Adam7: seven sub-images, each filtered row by row
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]
        for x0, y0, dx, dy in passes:
            pw, ph = len(range(x0, w, dx)), len(range(y0, h, dy))
            for _ in range(ph if pw else 0):
                rows += b"\x00" + rng.integers(0, 256, size=pw * bpp, dtype=np.uint8).tobytes()
    else:
        for y in range(h):
            rows += bytes([y % 5]) + rng.integers(0, 256, size=w * bpp, dtype=np.uint8).tobytes()
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0,
                                                          interlace))
    if palette:
        out += chunk(b"PLTE", bytes(range(256)) * 3)
    for k, v in (text or {}).items():
        out += chunk(b"tEXt", k.encode() + b"\x00" + v.encode())
    z = zlib.compress(rows, 9)
    out += chunk(b"IDAT", z[: len(z) // 2]) + chunk(b"IDAT", z[len(z) // 2:])
    return out + chunk(b"IEND", b"")


def pngs(out):
    put(out, "fuzz_png", "rgb-4x3.png", png_bytes(4, 3, 2, text={"class": "7", "seed": "1"}))
    put(out, "fuzz_png", "gray.png", png_bytes(5, 4, 0, seed=1))
    put(out, "fuzz_png", "gray-alpha.png", png_bytes(3, 3, 4, seed=2))
    put(out, "fuzz_png", "rgba.png", png_bytes(4, 3, 6, seed=3))
    put(out, "fuzz_png", "palette.png", png_bytes(4, 4, 3, palette=True, seed=4))
    put(out, "fuzz_png", "rgb16.png", png_bytes(2, 2, 2, depth=16, seed=5))
    put(out, "fuzz_png", "interlaced.png", png_bytes(9, 9, 2, interlace=1, seed=6))


def pt_bytes(obj, legacy=False):
    b = io.BytesIO()
    torch.save(obj, b, _use_new_zipfile_serialization=not legacy)
    return b.getvalue()


def pts(out):
    """torch.save state dicts, zip and legacy formats (the .pt reader, through dm_st_open)."""
    g = torch.Generator().manual_seed(7)
    sd = {"a.weight": torch.randn(3, 2, generator=g), "a.bias": torch.randn(3, generator=g),
          "h": torch.randn(2, 2, generator=g).half(), "b": torch.randn(4, generator=g).bfloat16(),
          "i": torch.arange(5), "view": torch.randn(4, 4, generator=g)[1:, ::2]}
    put(out, "fuzz_pt", "state.pt", pt_bytes(sd))
    put(out, "fuzz_pt", "state-legacy.pt", pt_bytes(sd, legacy=True))
    put(out, "fuzz_pt", "nested.pt", pt_bytes({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)},
                                                "epoch": 3, "args": {"depth": 2, "name": "x"}}))
    state, _ = ditmoe_model(0)
    put(out, "fuzz_pt", "ditmoe-ema.pt", pt_bytes(state))
    put(out, "fuzz_pt", "ditmoe-ema-legacy.pt", pt_bytes(state, legacy=True))


def main(argv):
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = argv[1]
    torch.manual_seed(0)
    for make in (safetensors, models, npys, dumps, manifests, vaes, pngs, pts):
        make(out)
    for t in sorted(os.listdir(out)):
        files = os.listdir(os.path.join(out, t))
        size = sum(os.path.getsize(os.path.join(out, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

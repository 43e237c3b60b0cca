#!/usr/bin/python3
"""Write a random-weight DiT-MoE model of any size as a ditmoe .safetensors, streamed to disk
tensor by tensor with bounded memory (the largest single tensor, ~50 MB for G/2), optionally
with the routed experts directly in the stored int8 / int4 forms (docs/format.md "Quantised
routed experts"): a DiT-MoE-G/2-shaped file never exists as a 33 GB float copy.

    /usr/bin/python3 tools/make_random_model.py OUT.safetensors [--shape g2|s2|tiny]
        [--dtype f32|bf16|f16] [--experts float|int8|int4] [--seed N] [--depth L] ...

Shapes (docs/spec/ditmoe.md §1): g2 = DiT-MoE-G/2-16E2A (D 1408, 40 blocks, 16 heads, 16
experts of 4D, top-2, shared expert 2D, qk-norm attention, rectified flow, 1000 classes, 32x32x4
latent); s2 = S/2-8E2A (D 384, 12 blocks, 6 heads, 8 experts, timm attention, DDPM); tiny = a
test model (D 64, 2 blocks, 10 classes, 8x8 latent). --depth / --experts-count / --hidden
override a preset (e.g. a few G/2 blocks for a quick check).

Values: linear weights N(0, 0.5 / fan_in) (the router 1 / fan_in), biases N(0, 0.1), q/k-norm
weights 1 + N(0, 0.2), label table N(0, 1), pos_embed the 2-D sin-cos table (as
tests/ref/dit_moe_ref.randomize_; same scales, not the same numbers). Stored experts: int8 q
uniform in -127..127 with per-row scales giving the same standard deviation; int4 nibbles uniform
in -8..7 with per-group bf16 scales likewise. Non-expert floats in --dtype (bf16 by default: the
file precision a bf16 run keeps). The file is written to a temp file beside OUT and renamed.
Prints the file size and the parameter counts. Never commit its output."""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np

from atomic_file import atomic_open

PRESETS = {
    "g2": dict(name="random DiT-MoE-G/2-16E2A shape", hidden_size=1408, depth=40, num_heads=16,
               num_experts=16, top_k=2, expert_hidden=5632, shared_hidden=2816, attention="qknorm",
               patch_size=2, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000,
               objective="rf"),
    "s2": dict(name="random DiT-MoE-S/2-8E2A shape", hidden_size=384, depth=12, num_heads=6,
               num_experts=8, top_k=2, expert_hidden=1536, shared_hidden=768, attention="timm",
               patch_size=2, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000,
               objective="ddpm"),
    "tiny": dict(name="random tiny DiT-MoE", hidden_size=64, depth=2, num_heads=4, num_experts=4,
                 top_k=2, expert_hidden=256, shared_hidden=128, attention="timm", patch_size=2,
                 input_size=8, in_channels=4, learn_sigma=False, num_classes=10, objective="rf"),
}
FLOAT = {"f32": ("F32", 4), "bf16": ("BF16", 2), "f16": ("F16", 2)}


def tensors(cfg):
    """(name, shape, kind) in the order the reference registers them; kind: linear, router,
    expert, bias, norm, table, pos."""
    D, C, P = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"]
    E, Fe, Fs = cfg["num_experts"], cfg["expert_hidden"], cfg["shared_hidden"]
    T = (cfg["input_size"] // P) ** 2
    cout = 2 * C if cfg["learn_sigma"] else C
    hd = D // cfg["num_heads"]
    out = [("pos_embed", (1, T, D), "pos"), ("x_embedder.proj.weight", (D, C, P, P), "linear"),
           ("x_embedder.proj.bias", (D,), "bias"), ("t_embedder.mlp.0.weight", (D, 256), "linear"),
           ("t_embedder.mlp.0.bias", (D,), "bias"), ("t_embedder.mlp.2.weight", (D, D), "linear"),
           ("t_embedder.mlp.2.bias", (D,), "bias"),
           ("y_embedder.embedding_table.weight", (cfg["num_classes"] + 1, D), "table")]
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        if cfg["attention"] == "timm":
            out += [(b + "attn.qkv.weight", (3 * D, D), "linear"), (b + "attn.qkv.bias", (3 * D,), "bias"),
                    (b + "attn.proj.weight", (D, D), "linear"), (b + "attn.proj.bias", (D,), "bias")]
        else:
            out += [(b + "attn.Wqkv.weight", (3 * D, D), "linear"), (b + "attn.Wqkv.bias", (3 * D,), "bias"),
                    (b + "attn.q_norm.weight", (hd,), "norm"), (b + "attn.q_norm.bias", (hd,), "bias"),
                    (b + "attn.k_norm.weight", (hd,), "norm"), (b + "attn.k_norm.bias", (hd,), "bias"),
                    (b + "attn.out_proj.weight", (D, D), "linear"), (b + "attn.out_proj.bias", (D,), "bias")]
        for e in range(E):
            x = f"{b}moe.experts.{e}."
            out += [(x + "gate_proj.weight", (Fe, D), "expert"), (x + "up_proj.weight", (Fe, D), "expert"),
                    (x + "down_proj.weight", (D, Fe), "expert")]
        out.append((b + "moe.gate.weight", (E, D), "router"))
        if Fs > 0:
            x = b + "moe.shared_experts."
            out += [(x + "gate_proj.weight", (Fs, D), "linear"), (x + "up_proj.weight", (Fs, D), "linear"),
                    (x + "down_proj.weight", (D, Fs), "linear")]
        out += [(b + "adaLN_modulation.1.weight", (6 * D, D), "linear"),
                (b + "adaLN_modulation.1.bias", (6 * D,), "bias")]
    out += [("final_layer.linear.weight", (P * P * cout, D), "linear"),
            ("final_layer.linear.bias", (P * P * cout,), "bias"),
            ("final_layer.adaLN_modulation.1.weight", (2 * D, D), "linear"),
            ("final_layer.adaLN_modulation.1.bias", (2 * D,), "bias")]
    return out


def bf16_bits(f32):
    """float32 array -> uint16 bf16 bit patterns, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def sincos(D, grid):
    """The fixed 2-D sin-cos position table [grid*grid, D] (spec/ditmoe.md §2.2): channels
    [0, D/2) the column, [D/2, D) the row; per half D/4 sines then D/4 cosines."""
    K = D // 4
    w = 1.0 / 10000.0 ** (np.arange(K, dtype=np.float64) / K)
    m = np.arange(grid * grid)

    def half(pos):
        ang = pos[:, None].astype(np.float64) * w[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
    return np.concatenate([half(m % grid), half(m // grid)], axis=1).astype(np.float32)


def plan(cfg, dtype, experts):
    """Output entries: (name, safetensors dtype, shape, nbytes, maker args)."""
    fdt, fsz = FLOAT[dtype]
    rows = []
    for name, shape, kind in tensors(cfg):
        n = math.prod(shape)
        if kind == "expert" and experts in ("int8", "int4"):
            o, i = shape
            if experts == "int4" and i % 32:
                sys.exit(f"make_random_model: {name}: int4 needs the input width to be a multiple "
                         f"of 32; the weight is [{o}, {i}]")
            if experts == "int8":
                rows.append((name, "I8", shape, n, ("q8", shape)))
                rows.append((name + ".scale", "F32", (o,), 4 * o, ("s8", shape)))
            else:
                rows.append((name, "U8", (o, i // 2), n // 2, ("q4", shape)))
                rows.append((name + ".scale", "BF16", (o, i // 32), 2 * o * (i // 32), ("s4", shape)))
        elif kind in ("pos", "bias", "norm"):
            rows.append((name, "F32", shape, 4 * n, (kind, shape)))   # vectors stay float32
        else:
            rows.append((name, fdt, shape, fsz * n, (kind, shape)))
    return rows


def make(rng, what, dt, grid):
    kind, shape = what
    n = math.prod(shape)
    if kind == "q8":                                  # uniform -127..127 (no -128)
        q = np.frombuffer(rng.bytes(n), dtype=np.int8).copy()
        np.maximum(q, -127, out=q)
        return q.tobytes()
    if kind == "q4":
        return rng.bytes(n // 2)                     # every nibble -8..7 is valid
    if kind == "s8":                                 # std 0.5 / sqrt(in) over q ~ U(-127, 127)
        o, i = shape
        s = (0.5 / math.sqrt(i)) / (127 / math.sqrt(3)) * (1 + 0.1 * rng.standard_normal(o))
        return np.abs(s).astype(np.float32).tobytes()
    if kind == "s4":                                 # nibbles ~ U(-8, 7): std ~ 4.61
        o, i = shape
        d = (0.5 / math.sqrt(i)) / 4.61 * (1 + 0.1 * rng.standard_normal((o, i // 32)))
        d *= np.where(rng.random((o, i // 32)) < 0.5, -1.0, 1.0)   # d = m / -8 has either sign
        return bf16_bits(d.astype(np.float32)).tobytes()
    if kind == "pos":
        v = sincos(shape[-1], grid)
    elif kind == "bias":
        v = 0.1 * rng.standard_normal(n, dtype=np.float32)
    elif kind == "norm":
        v = 1.0 + 0.2 * rng.standard_normal(n, dtype=np.float32)
    elif kind == "table":
        v = rng.standard_normal(n, dtype=np.float32)
    else:                                            # linear / router / float expert
        fan_in = math.prod(shape[1:])
        v = rng.standard_normal(n, dtype=np.float32)
        v *= np.float32((1.0 if kind == "router" else 0.5) / math.sqrt(fan_in))
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if dt == "F32":
        return v.tobytes()
    if dt == "BF16":
        return bf16_bits(v).tobytes()
    return v.astype(np.float16).tobytes()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--shape", choices=sorted(PRESETS), default="g2")
    ap.add_argument("--dtype", choices=sorted(FLOAT), default="bf16",
                    help="non-expert matrices and the float experts (vectors stay f32)")
    ap.add_argument("--experts", choices=["float", "int8", "int4"], default="int8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--hidden", type=int, help="D (expert 4D and shared 2D follow)")
    ap.add_argument("--experts-count", type=int, dest="num_experts")
    a = ap.parse_args(argv)
    cfg = dict(PRESETS[a.shape])
    if a.depth:
        cfg["depth"] = a.depth
    if a.hidden:
        cfg.update(hidden_size=a.hidden, expert_hidden=4 * a.hidden, shared_hidden=2 * a.hidden)
    if a.num_experts:
        cfg["num_experts"] = a.num_experts
    if cfg["hidden_size"] % cfg["num_heads"]:
        sys.exit(f"make_random_model: hidden {cfg['hidden_size']} not divisible by "
                 f"{cfg['num_heads']} heads")
    meta_cfg = dict(format_version=1, arch="dit-moe", vae_scale=0.18215, **cfg)
    rows = plan(cfg, a.dtype, a.experts)
    header, off = {}, 0
    meta = {"ditmoe": json.dumps(meta_cfg), "format": "pt"}
    if a.experts != "float":
        meta["quant_experts"] = a.experts
    header["__metadata__"] = meta
    for name, dt, shape, nb, _ in rows:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((-len(hjson)) % 8)
    grid = cfg["input_size"] // cfg["patch_size"]
    params = sum(math.prod(s) for _, s, _ in tensors(cfg))
    eparams = sum(math.prod(s) for _, s, k in tensors(cfg) if k == "expert")
    print(f"make_random_model: {cfg['name']}: {params:,} parameters ({eparams:,} in routed "
          f"experts), experts {a.experts}, others {a.dtype}: {8 + len(hjson) + off:,} bytes",
          file=sys.stderr)
    out = os.path.abspath(a.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0, done, last = time.time(), 0, 0.0
    with atomic_open(out, buffering=1 << 20) as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for idx, (name, dt, shape, nb, what) in enumerate(rows):
            rng = np.random.default_rng([a.seed, idx])
            b = make(rng, what, dt, grid)
            if len(b) != nb:
                raise AssertionError(f"{name}: made {len(b)} bytes, planned {nb}")
            f.write(b)
            done += nb
            if time.time() - last > 10:
                last = time.time()
                print(f"make_random_model: {done / 2**30:.1f} / {off / 2**30:.1f} GiB "
                      f"({done / 2**20 / max(last - t0, 1e-9):.0f} MiB/s)", file=sys.stderr)
    print(f"make_random_model: wrote {out}: {os.path.getsize(out):,} bytes in "
          f"{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Minimal reader of routing dumps (.dmr, "DMROUTE1", format in docs/routing.md) and the
active-MAC count the measurement harness reports.

    import dmr
    hdr, recs = dmr.read(path)             # JSON header, iterator of records
    for r in recs: r.rows (kind, ...), r.ids [Lm, R*T, k] uint8/uint16, r.flags or None

    /usr/bin/python3 tools/moe_lab/dmr.py DUMP [--model M.safetensors]   # prints the MAC count

MACs (multiply-accumulates of the transformer's GEMMs, per generated image; the VAE is not
counted, it is the same for every routing technique): every evaluation row pays the dense part
(x_embedder, attention qkv/proj and the score/value products 2*T*D per token and block, dense
MLPs, shared experts, routers, final linear: per token; t-MLP and adaLN: per row) and, per token
and MoE layer, one routed expert's weights per pick recorded in the dump (id != 0xFF/0xFFFF).
Tokens flagged "cached" (token-flag bit 4, DM_TRACE_TOK_CACHED, when the writer sets it) did not
compute their routed experts and are not counted; with `--expert-cache ...,ffn` (read from the
header's sampler.expert_cache) they did not compute the shared expert either. Counting from a dump is exact for the
routed part whatever the policy (variable k, skipped layers give 0 picks only if the writer
records the compute view; see docs/moe-lab.md section 9 for what the engine records).
`--skip-routed`: the engine records the router's picks of skipped tokens (docs/routing.md), so the
rules are read back from the header's sampler.skip_routed ("2,3@0-0.5;0@0.9-1") and a row's picks
in a listed block are not counted while its t01 (row t / the model's time_scale for flow models,
t / 999 for DDPM) lies in [T0, T1].
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

HEAD = struct.Struct("<4sIIIIIQ")        # tag, batch, eval, step, rows, flags, payload bytes
ROW = np.dtype([("image", "<i8"), ("label", "<i4"), ("cls", "<i4"), ("t", "<f4"), ("kind", "<u4")])
TOK_CACHED = 4


class Record:
    __slots__ = ("batch", "eval", "step", "rows", "ids", "weights", "flags")


def read(path):
    """(header dict, list of Record). Loads the whole file (dumps here are tens of MB)."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != b"DMROUTE1":
        raise ValueError(f"{path}: not a routing dump (magic)")
    off, ln = struct.unpack_from("<QQ", buf, 8)
    if off == 0 or off + ln > len(buf):
        raise ValueError(f"{path}: unfinished or truncated dump")
    hdr = json.loads(buf[off:off + ln].decode())
    sh = hdr["shape"]
    Lm, T, k = len(sh["moe_layers"]), sh["tokens"], sh["top_k"]
    idt = np.uint16 if sh.get("id_dtype") == "u16" else np.uint8
    has_w = sh.get("weights") == "f16"
    recs, p = [], 24
    while p < off:
        tag, b, e, s, R, fl, nbytes = HEAD.unpack_from(buf, p)
        if tag != b"DMRR":
            raise ValueError(f"{path}: bad record tag at byte {p}")
        q = p + HEAD.size
        r = Record()
        r.batch, r.eval, r.step = b, e, s
        r.rows = np.frombuffer(buf, ROW, R, q); q += R * ROW.itemsize
        n = Lm * R * T * k
        r.ids = np.frombuffer(buf, idt, n, q).reshape(Lm, R * T, k); q += n * np.dtype(idt).itemsize
        r.weights = None
        if has_w:
            r.weights = np.frombuffer(buf, np.float16, n, q).reshape(Lm, R * T, k); q += n * 2
        r.flags = None
        if fl & 1:
            r.flags = np.frombuffer(buf, np.uint8, Lm * R * T, q).reshape(Lm, R * T)
        recs.append(r)
        p += HEAD.size + nbytes
    return hdr, recs


def model_costs(model_path):
    """MACs per token and per row of the non-routed part, and per pick of a routed expert
    (per MoE layer, list), from the weight shapes in a .safetensors file."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    with open(model_path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    meta = json.loads(h.get("__metadata__", {}).get("ditmoe", "{}"))
    shapes = {k: v["shape"] for k, v in h.items() if k != "__metadata__"}
    D = meta["hidden_size"]
    T = (meta["input_size"] // meta["patch_size"]) ** 2
    per_tok = per_row = 0
    expert = {}                                   # block -> {id: MACs per pick}
    shared = {}                                   # block -> shared-expert MACs per token
    for name, shp in shapes.items():
        if not name.endswith(".weight") or len(shp) < 2:
            continue
        numel = int(np.prod(shp))
        m = re.match(r"blocks\.(\d+)\.(?:moe|mlp)\.experts\.(\d+)\.", name)
        if m:
            expert.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), 0)
            expert[int(m.group(1))][int(m.group(2))] += numel
        elif "adaLN_modulation" in name or name.startswith("t_embedder"):
            per_row += numel
        elif re.match(r"blocks\.\d+\.(?:moe|mlp)\.shared_expert", name):
            b = int(name.split(".")[1])
            shared[b] = shared.get(b, 0) + numel
            per_tok += numel
        elif name.startswith("y_embedder"):
            pass                                  # a table lookup
        else:                                     # x_embedder, qkv, proj, dense/shared MLP, final
            per_tok += numel
    for name in shapes:                           # ProMoE prototypes: a [E, D] cosine product
        if name.endswith("cluster_centers"):
            per_tok += int(np.prod(shapes[name]))
    per_tok += meta["depth"] * 2 * T * D          # attention scores and values
    return dict(per_token=per_tok, per_row=per_row, tokens=T, expert=expert, shared=shared)


def skip_rules(spec, depth):
    """'2,3@0-0.5;all@0.8-1' -> [(set of blocks, t0, t1)]."""
    rules = []
    for part in filter(None, (spec or "").split(";")):
        layers, _, band = part.partition("@")
        t0, _, t1 = band.partition("-")
        blocks = set(range(depth)) if layers == "all" else {int(x) for x in layers.split(",")}
        rules.append((blocks, float(t0), float(t1)))
    return rules


def count_macs(dump, model_path):
    """Active transformer MACs per image from a dump: dict with totals and the split."""
    hdr, recs = read(dump)
    c = model_costs(model_path)
    sh = hdr["shape"]
    T = sh["tokens"]
    blocks = sh["moe_layers"]
    routed = dense = picks = cached = 0
    picks_layer = np.zeros(len(blocks))
    tokens_layer = 0
    m = hdr["model"]
    with open(model_path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(json.loads(f.read(n)).get("__metadata__", {}).get("ditmoe", "{}"))
    tscale = 999.0 if m.get("objective") == "ddpm" else float(meta.get("time_scale", 1.0))
    rules = skip_rules(hdr.get("sampler", {}).get("skip_routed"), m.get("depth", 0))
    skipped = 0
    ffn = "ffn" in (hdr.get("sampler", {}).get("expert_cache") or "")   # served tokens skip the shared expert too
    route_layer = np.zeros(len(blocks))
    nb = 5                                        # step bands, noisy -> clean
    steps = max(int(sh.get("steps") or 1), 1)
    band_picks, band_tok = np.zeros(nb), np.zeros(nb)
    for r in recs:
        R = len(r.rows)
        dense += R * (T * c["per_token"] + c["per_row"])
        valid = r.ids != (0xFFFF if r.ids.dtype == np.uint16 else 0xFF)
        route_layer += valid.sum(axis=(1, 2))
        if rules:
            t01 = r.rows["t"].astype(np.float64) / tscale
            valid = valid.copy()
            for li, b in enumerate(blocks):
                off = np.zeros(R, bool)
                for bl, t0, t1 in rules:
                    if b in bl:
                        off |= (t01 >= t0) & (t01 <= t1)
                skipped += int(off.sum()) * T
                valid[li] &= ~np.repeat(off, T)[:, None]
        if r.flags is not None:
            live = (r.flags & TOK_CACHED) == 0
            cached += int((~live).sum())
            valid &= live[:, :, None]
            if ffn:
                for li, b in enumerate(blocks):
                    dense -= int((~live[li]).sum()) * c["shared"].get(b, 0)
        for li, b in enumerate(blocks):
            ids = r.ids[li][valid[li]]
            cnt = np.bincount(ids.astype(np.int64), minlength=sh["experts"] + 1)
            costs = c["expert"].get(b, {})
            routed += sum(int(cnt[e]) * costs.get(e, costs.get(0, 0)) for e in range(len(cnt)))
            picks_layer[li] += valid[li].sum()
        bi = min(r.step * nb // steps, nb - 1)
        band_picks[bi] += valid.sum()
        band_tok[bi] += R * T * len(blocks)
        tokens_layer += R * T
        picks += int(valid.sum())
    n_img = hdr.get("images_total") or len(hdr["images"]["index"])
    return dict(images=n_img, macs_per_image=(routed + dense) / n_img,
                routed_macs_per_image=routed / n_img, dense_macs_per_image=dense / n_img,
                picks_per_token_layer=[float(x) / max(tokens_layer, 1) for x in picks_layer],
                route_picks_per_token_layer=[float(x) / max(tokens_layer, 1) for x in route_layer],
                picks_per_token_by_step_band=[float(x) / max(y, 1) for x, y in zip(band_picks, band_tok)],
                cached_token_layers=cached, skipped_token_layers=skipped)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump")
    p.add_argument("--model", default=None, help="default: the dump header's model path")
    a = p.parse_args(argv)
    model = a.model or read(a.dump)[0]["model"]["path"]
    print(json.dumps(count_macs(a.dump, model), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

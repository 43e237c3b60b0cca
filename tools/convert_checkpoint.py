#!/usr/bin/python3
"""Convert an official DiT-MoE or ProMoE PyTorch checkpoint (.pt/.pth) to a ditmoe .safetensors.

    /usr/bin/python3 tools/convert_checkpoint.py IN.pt OUT.safetensors [--dtype f32|f16|bf16]
        [--quant-experts none|int8|int4] [--heads N] [--top-k K] [--objective ddpm|rf]
        [--num-classes N] [--class-names FILE] [--name TEXT] [--sampler S] [--steps N]
        [--cfg-scale F] [--cfg-channels N]
        [--promoe-variant tc|ec] [--router identity|softmax|sigmoid]      (ProMoE only)

Accepts a bare state dict or one wrapped under "ema_model_state_dict" (ProMoE's train.py),
"ema", "model", "module", "state_dict" or "model_state_dict" (checked in that order);
"module." / "model." key prefixes are stripped; non-tensor entries (e.g. a pickled
argparse.Namespace under "args", a Python int "step", optimizer state next to the weights) are
ignored. Tensor names are kept unchanged. The model config is stored as JSON in the header
metadata under "ditmoe" (schema: docs/format.md).
A ProMoE checkpoint is recognised by blocks.N.mlp.cluster_centers (spec promoe.md 4.1); the
weights cannot tell token from expert choice, top-k or the router activation, so those come from
flags, defaulting to the released models (tc, top-1, identity; heads 384/768/1024/1152 ->
6/12/16/16); objective rf with t fed as 1000*sigma, sampling euler 250 steps, cfg 1.5, all
channels.
--quant-experts int8|int4 stores the routed experts' matrices quantised (docs/format.md "Quantised
routed experts"; tools/expert_quant.py): the same tensors, scales, bytes and "quant_experts"
metadata as ditmoe-convert --quant-experts writes for the same input and flags. They are quantised
from the checkpoint's values (--dtype applies to the other float tensors; scales are never
narrowed); int4 needs every routed expert's input width to be a multiple of 32.
DiT-MoE: what the weights cannot tell comes from flags, defaulting to the released-config table
(hidden 384/768/1152/1408 -> 6/12/16/16 heads; top-k 2; qknorm -> rf, timm -> ddpm).
Exit status: 0 ok, 2 bad input (message on stderr, no output file left behind), 1 other failure.
"""
import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import expert_quant  # noqa: E402
import safetensors_io  # noqa: E402

RELEASED = {384: ("S", 6), 768: ("B", 12), 1152: ("XL", 16), 1408: ("G", 16)}
RELEASED_PROMOE = {384: ("S", 6), 768: ("B", 12), 1024: ("L", 16), 1152: ("XL", 16)}
PROMOE_KEY = re.compile(r"blocks\.(\d+)\.mlp\.cluster_centers$")
PROMOE_SAMPLING = {"sampler": "euler", "steps": 250, "cfg_scale": 1.5, "cfg_channels": 0}
WRAPPERS = ("ema_model_state_dict", "ema", "model", "module", "state_dict", "model_state_dict")
PREFIXES = ("module.", "model.")
REQUIRED = ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
            "blocks.0.moe.gate.weight", "final_layer.linear.weight",
            "final_layer.adaLN_modulation.1.weight")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SAMPLING_DEFAULTS = {"ddpm": {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "cfg_channels": 3},
                     "rf": {"sampler": "euler", "steps": 50, "cfg_scale": 4.0, "cfg_channels": 0}}


class InputError(Exception):
    """Bad input: reported as one line, exit status 2."""


def unwrap(obj):
    """Find the state dict inside a loaded checkpoint object."""
    for _ in range(4):                         # e.g. {"state_dict": {"model": {...}}}
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise InputError(f"checkpoint holds a {type(obj).__name__}, expected a dict "
                             f"(state dict)")
        if any(str(k).endswith("x_embedder.proj.weight") for k in obj):
            return obj                         # a state dict (possibly with prefixes)
        for w in WRAPPERS:
            if w in obj and isinstance(obj[w], (dict, torch.nn.Module)):
                obj = obj[w]
                break
        else:
            return obj
    return obj


def clean_state_dict(sd):
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue                                # e.g. stray ints/strings: ignored
        name = str(k)
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        if name in out:
            raise InputError(f"{k}: duplicate tensor name {name!r} after stripping prefixes")
        out[name] = v
    return out


def shape_str(s):
    return "[" + ",".join(str(int(d)) for d in s) + "]"


def embed_shapes(sd, required, kind):
    """Check the `required` tensors exist and read D, C, p, the token grid side and the depth
    from x_embedder, pos_embed and the block indices (shared by DiT-MoE and ProMoE)."""
    for k in required:
        if k not in sd:
            raise InputError(f"missing tensor {k} (not a {kind} state dict?)")
    xw = sd["x_embedder.proj.weight"]
    if xw.dim() != 4 or xw.shape[2] != xw.shape[3]:
        raise InputError(f"x_embedder.proj.weight: shape {shape_str(xw.shape)} expected [D,C,p,p]")
    D, C, P = int(xw.shape[0]), int(xw.shape[1]), int(xw.shape[2])
    pe = sd["pos_embed"]
    T = int(pe.shape[1]) if pe.dim() == 3 else -1
    grid = int(round(T ** 0.5)) if T > 0 else 0
    if pe.dim() != 3 or pe.shape[0] != 1 or pe.shape[2] != D or grid * grid != T:
        raise InputError(f"pos_embed: shape {shape_str(pe.shape)} expected [1,G*G,{D}]")
    idx = {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in sd) if m}
    return D, C, P, grid, max(idx) + 1


# ---- checks shared by the DiT-MoE and ProMoE configs

def _learn_sigma(sd, D, C, P):
    """final_layer rows: 2C (mean + variance) or C output channels per patch pixel."""
    rows = int(sd["final_layer.linear.weight"].shape[0])
    if rows not in (P * P * 2 * C, P * P * C):
        raise InputError(f"final_layer.linear.weight: shape {shape_str(sd['final_layer.linear.weight'].shape)}"
                         f" expected [{P * P * 2 * C},{D}] or [{P * P * C},{D}]")
    return rows == P * P * 2 * C


def _heads(args, D, table, which):
    """--heads, else the released config's of hidden size D (`table`, named `which` ...)."""
    if args.heads is not None:
        heads = args.heads
    elif D in table:
        heads = table[D][1]
    else:
        raise InputError(f"hidden size {D} is not in {which} released-config table "
                         f"({'/'.join(str(d) for d in sorted(table))}): pass --heads N")
    if heads < 1 or D % heads:
        raise InputError(f"--heads {heads}: hidden size {D} is not divisible by it")
    return heads


def _top_k(args, E, default, source):
    top_k = args.top_k if args.top_k is not None else default
    if not 1 <= top_k <= E:
        raise InputError(f"--top-k {top_k}: expected 1..{E} (num_experts from {source})")
    return top_k


def _num_classes(args, sd):
    table_rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    num_classes = args.num_classes if args.num_classes is not None else table_rows - 1
    if num_classes < 1 or table_rows != num_classes + 1:
        raise InputError(f"--num-classes {num_classes}: y_embedder.embedding_table.weight has "
                         f"{table_rows} rows, expected num_classes + 1 (null class last)")
    return num_classes


def _check_sampling(s, C):
    if s["steps"] < 1:
        raise InputError(f"--steps {s['steps']}: expected >= 1")
    if not s["cfg_scale"] >= 0:
        raise InputError(f"--cfg-scale {s['cfg_scale']}: expected >= 0")
    if not 0 <= s["cfg_channels"] <= C:
        raise InputError(f"--cfg-channels {s['cfg_channels']}: expected 0..{C}")


def infer_config(sd, args):
    if any(PROMOE_KEY.match(k) for k in sd):
        return infer_promoe(sd, args)
    for flag, v in (("--promoe-variant", args.promoe_variant), ("--router", args.router)):
        if v is not None:
            raise InputError(f"{flag}: only for ProMoE checkpoints (no blocks.N.mlp.cluster_centers "
                             f"tensor found)")
    D, C, P, grid, depth = embed_shapes(sd, REQUIRED, "DiT-MoE")
    E = int(sd["blocks.0.moe.gate.weight"].shape[0])
    qknorm = "blocks.0.attn.Wqkv.weight" in sd
    attention = "qknorm" if qknorm else "timm"
    eg = sd.get("blocks.0.moe.experts.0.gate_proj.weight")
    if eg is None:
        raise InputError("missing tensor blocks.0.moe.experts.0.gate_proj.weight")
    expert_hidden = int(eg.shape[0])
    sg = sd.get("blocks.0.moe.shared_experts.gate_proj.weight")
    shared_hidden = int(sg.shape[0]) if sg is not None else 0

    learn_sigma = _learn_sigma(sd, D, C, P)
    heads = _heads(args, D, RELEASED, "the")
    if qknorm:
        qn = sd.get("blocks.0.attn.q_norm.weight")
        if qn is not None and tuple(qn.shape) != (D // heads,):
            raise InputError(f"{'--heads' if args.heads is not None else 'heads from the table'} "
                             f"{heads}: head dim {D // heads} does not match "
                             f"blocks.0.attn.q_norm.weight {shape_str(qn.shape)}")
    top_k = _top_k(args, E, 2, "blocks.0.moe.gate.weight")
    num_classes = _num_classes(args, sd)
    objective = args.objective or ("rf" if qknorm else "ddpm")

    cfg = {"format_version": 1, "arch": "dit-moe", "name": "",
           "hidden_size": D, "depth": depth, "num_heads": heads,
           "num_experts": E, "top_k": top_k,
           "expert_hidden": expert_hidden, "shared_hidden": shared_hidden,
           "attention": attention, "patch_size": P, "input_size": grid * P, "in_channels": C,
           "learn_sigma": learn_sigma, "num_classes": num_classes}
    if args.name is not None:
        cfg["name"] = args.name
    elif D in RELEASED:
        cfg["name"] = f"DiT-MoE-{RELEASED[D][0]}/{P}-{E}E{top_k}A"
    if args.class_names:
        cfg["class_names"] = read_class_names(args.class_names, num_classes)
    cfg["objective"] = objective
    cfg["vae_scale"] = args.vae_scale
    given = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
             "cfg_channels": args.cfg_channels}
    if any(v is not None for v in given.values()):
        s = dict(SAMPLING_DEFAULTS[objective])
        s.update({k: v for k, v in given.items() if v is not None})
        _check_sampling(s, C)
        cfg["sampling"] = s
    check_shapes(sd, cfg)
    return cfg


def read_class_names(path, num_classes):
    try:
        with open(path, encoding="utf-8") as f:
            names = [ln.rstrip("\r\n") for ln in f]
    except OSError as e:
        raise InputError(f"--class-names {path}: {e.strerror}")
    while names and not names[-1].strip():
        names.pop()
    if len(names) != num_classes:
        raise InputError(f"--class-names {path}: {len(names)} names, expected "
                         f"{num_classes} (num_classes)")
    return names


def _rows(sd, name):
    t = sd.get(name)
    if t is None:
        raise InputError(f"missing tensor {name}")
    if t.dim() != 2:
        raise InputError(f"{name}: shape {shape_str(t.shape)} expected a 2-D tensor")
    return int(t.shape[0])


def infer_promoe(sd, args):
    """ProMoE (promoe.md 1.3, 4): odd blocks MoE (cluster_centers, E routed experts + the
    unconditional expert E, shared expert), even blocks dense fc1/fc2."""
    D, C, P, grid, depth = embed_shapes(sd, (
        "x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"), "ProMoE")
    moe = sorted(int(PROMOE_KEY.match(k).group(1)) for k in sd if PROMOE_KEY.match(k))
    want = list(range(1, depth, 2))
    if moe != want:
        raise InputError(f"MoE blocks (with mlp.cluster_centers) are {moe}, expected the odd "
                         f"blocks {want} of {depth}")
    E = _rows(sd, "blocks.1.mlp.cluster_centers")
    expert_hidden = _rows(sd, "blocks.1.mlp.experts.0.up_proj.weight")
    mlp_hidden = _rows(sd, "blocks.0.mlp.fc1.weight")
    sh = "blocks.1.mlp.shared_expert.up_proj.weight"
    shared_hidden = _rows(sd, sh) if sh in sd else 0
    qknorm = "blocks.0.attn.q_norm.weight" in sd
    learn_sigma = _learn_sigma(sd, D, C, P)
    heads = _heads(args, D, RELEASED_PROMOE, "the ProMoE")
    top_k = _top_k(args, E, 1, "blocks.1.mlp.cluster_centers")
    num_classes = _num_classes(args, sd)
    if args.objective not in (None, "rf"):
        raise InputError(f"--objective {args.objective}: ProMoE models are rectified flow (rf)")
    variant = args.promoe_variant or "tc"
    router = args.router or "identity"
    cfg = {"format_version": 1, "arch": "promoe", "name": "",
           "hidden_size": D, "depth": depth, "num_heads": heads,
           "num_experts": E, "top_k": top_k,
           "expert_hidden": expert_hidden, "shared_hidden": shared_hidden,
           "mlp_hidden": mlp_hidden, "attention": "qknorm" if qknorm else "timm",
           "patch_size": P, "input_size": grid * P, "in_channels": C,
           "learn_sigma": learn_sigma, "num_classes": num_classes}
    if args.name is not None:
        cfg["name"] = args.name
    elif D in RELEASED_PROMOE:
        cfg["name"] = f"ProMoE-{RELEASED_PROMOE[D][0]}/{P}-{E}E{top_k}A-{variant.upper()}"
    if args.class_names:
        cfg["class_names"] = read_class_names(args.class_names, num_classes)
    cfg["objective"] = "rf"
    cfg["time_scale"] = 1000.0
    cfg["vae_scale"] = args.vae_scale
    cfg["promoe"] = {"variant": variant, "router": router}
    s = dict(PROMOE_SAMPLING)
    given = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
             "cfg_channels": args.cfg_channels}
    s.update({k: v for k, v in given.items() if v is not None})
    if s["sampler"] not in ("euler", "heun"):
        raise InputError(f"--sampler {s['sampler']}: ProMoE (rf) needs euler or heun")
    _check_sampling(s, C)
    cfg["sampling"] = s
    check_shapes(sd, cfg)
    return cfg


def _stem_shapes(cfg):
    """Patch, time and label embedders (the same in DiT-MoE and ProMoE), in check order."""
    D, C, P = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"]
    T = (cfg["input_size"] // P) ** 2
    return {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, P, P),
            "x_embedder.proj.bias": (D,), "t_embedder.mlp.0.weight": (D, 256),
            "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
            "t_embedder.mlp.2.bias": (D,),
            "y_embedder.embedding_table.weight": (cfg["num_classes"] + 1, D)}


def _final_shapes(cfg):
    D, C, P = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"]
    cout = 2 * C if cfg["learn_sigma"] else C
    return {"final_layer.linear.weight": (P * P * cout, D),
            "final_layer.linear.bias": (P * P * cout,),
            "final_layer.adaLN_modulation.1.weight": (2 * D, D),
            "final_layer.adaLN_modulation.1.bias": (2 * D,)}


def expected_shapes_promoe(cfg):
    D = cfg["hidden_size"]
    E, Fe, Fs, Fm = cfg["num_experts"], cfg["expert_hidden"], cfg["shared_hidden"], cfg["mlp_hidden"]
    hd = D // cfg["num_heads"]
    ex = _stem_shapes(cfg)

    def mlp(prefix, up, down, F):
        ex.update({f"{prefix}.{up}.weight": (F, D), f"{prefix}.{up}.bias": (F,),
                   f"{prefix}.{down}.weight": (D, F), f"{prefix}.{down}.bias": (D,)})

    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        ex.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,)})
        if cfg["attention"] == "qknorm":
            ex.update({b + "attn.q_norm.weight": (hd,), b + "attn.q_norm.bias": (hd,),
                       b + "attn.k_norm.weight": (hd,), b + "attn.k_norm.bias": (hd,)})
        ex.update({b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)})
        if i % 2 == 0:
            mlp(b + "mlp", "fc1", "fc2", Fm)
        else:
            ex[b + "mlp.cluster_centers"] = (E, D)
            for e in range(E + 1):          # e == E: the unconditional expert
                mlp(f"{b}mlp.experts.{e}", "up_proj", "down_proj", Fe)
            if Fs > 0:
                mlp(b + "mlp.shared_expert", "up_proj", "down_proj", Fs)
        ex.update({b + "adaLN_modulation.1.weight": (6 * D, D),
                   b + "adaLN_modulation.1.bias": (6 * D,)})
    ex.update(_final_shapes(cfg))
    return ex


def expected_shapes(cfg):
    D = cfg["hidden_size"]
    E, Fe, Fs = cfg["num_experts"], cfg["expert_hidden"], cfg["shared_hidden"]
    hd = D // cfg["num_heads"]
    ex = _stem_shapes(cfg)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        if cfg["attention"] == "timm":
            ex.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)})
        else:
            ex.update({b + "attn.Wqkv.weight": (3 * D, D), b + "attn.Wqkv.bias": (3 * D,),
                       b + "attn.q_norm.weight": (hd,), b + "attn.q_norm.bias": (hd,),
                       b + "attn.k_norm.weight": (hd,), b + "attn.k_norm.bias": (hd,),
                       b + "attn.out_proj.weight": (D, D), b + "attn.out_proj.bias": (D,)})
        for e in range(E):
            x = f"{b}moe.experts.{e}."
            ex.update({x + "gate_proj.weight": (Fe, D), x + "up_proj.weight": (Fe, D),
                       x + "down_proj.weight": (D, Fe)})
        ex[b + "moe.gate.weight"] = (E, D)
        if Fs > 0:
            x = b + "moe.shared_experts."
            ex.update({x + "gate_proj.weight": (Fs, D), x + "up_proj.weight": (Fs, D),
                       x + "down_proj.weight": (D, Fs)})
        ex.update({b + "adaLN_modulation.1.weight": (6 * D, D),
                   b + "adaLN_modulation.1.bias": (6 * D,)})
    ex.update(_final_shapes(cfg))
    return ex


def check_shapes(sd, cfg):
    ex = expected_shapes_promoe(cfg) if cfg["arch"] == "promoe" else expected_shapes(cfg)
    for k, shape in ex.items():
        if k not in sd:
            raise InputError(f"missing tensor {k}")
        if tuple(sd[k].shape) != shape:
            raise InputError(f"{k}: shape {shape_str(sd[k].shape)} expected {shape_str(shape)}")
        if not sd[k].is_floating_point():
            raise InputError(f"{k}: dtype {sd[k].dtype} expected a floating-point tensor")
    extra = [k for k in sd if k not in ex]
    if extra:
        print(f"convert_checkpoint: note: {len(extra)} extra tensor(s) kept as is "
              f"(first: {extra[0]})", file=sys.stderr)


def convert(args):
    try:
        obj = torch.load(args.input, map_location="cpu")
    except FileNotFoundError:
        raise InputError(f"{args.input}: no such file")
    except Exception as e:  # corrupt zip, not a torch file, ...
        raise InputError(f"{args.input}: cannot load with torch.load: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        sd = clean_state_dict(unwrap(obj))
        cfg = infer_config(sd, args)
    except InputError as e:
        raise InputError(f"{args.input}: {e}")
    target = DTYPES[args.dtype] if args.dtype else None
    bits = expert_quant.BITS.get(args.quant_experts)
    tensors, nq = {}, 0
    for k, v in sd.items():
        if bits and v.is_floating_point() and expert_quant.routed_expert(k, cfg):
            if v.dtype not in DTYPES.values():    # f64: to f32 first, as ditmoe-convert reads it
                v = v.to(torch.float32)
            try:
                tensors[k], tensors[k + ".scale"] = expert_quant.quantise(k, v, bits)
            except ValueError as e:
                raise InputError(f"{args.input}: {e}")
            nq += 1
            continue
        if v.is_floating_point():
            if target is not None:
                v = v.to(target)
            elif v.dtype not in DTYPES.values():      # f64 etc: store as f32
                v = v.to(torch.float32)
        tensors[k] = v.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    meta = {"ditmoe": json.dumps(cfg), "format": "pt"}
    if bits:
        meta["quant_experts"] = args.quant_experts
    safetensors_io.write(args.output, tensors, meta)
    return cfg, len(tensors), nq


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Convert a DiT-MoE or ProMoE .pt checkpoint to "
                                             ".safetensors")
    ap.add_argument("input", help="official checkpoint (.pt)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="convert floating tensors (default: keep f32/f16/bf16 as stored)")
    ap.add_argument("--quant-experts", default="none", metavar="none|int8|int4",
                    help="store the routed experts' matrices int8 (one scale per output channel) "
                         "or int4 (groups of 32 inputs, bf16 scales), as ditmoe-convert does "
                         "(default none: float)")
    ap.add_argument("--heads", type=int, help="attention heads (default: released-config table)")
    ap.add_argument("--top-k", type=int, help="experts per token (default: DiT-MoE 2, ProMoE 1)")
    ap.add_argument("--objective", choices=("ddpm", "rf"),
                    help="default: rf for qknorm attention, ddpm for timm; ProMoE: rf only")
    ap.add_argument("--num-classes", type=int,
                    help="default: rows of y_embedder.embedding_table.weight - 1")
    ap.add_argument("--class-names", metavar="FILE", help="text file, one class name per line")
    ap.add_argument("--name", help="model name (default: DiT-MoE-<size>/<p>-<E>E<k>A for "
                                   "released sizes, else empty)")
    ap.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"),
                    help="default sampler stored in the model")
    ap.add_argument("--steps", type=int, help="default sampling steps")
    ap.add_argument("--cfg-scale", type=float, help="default guidance scale")
    ap.add_argument("--cfg-channels", type=int, help="guided channels (0 = all)")
    ap.add_argument("--vae-scale", type=float, default=0.18215,
                    help="latent scaling factor of the VAE the model was trained with "
                         "(default 0.18215, SD-VAE)")
    ap.add_argument("--promoe-variant", choices=("tc", "ec"),
                    help="ProMoE routing: token choice or expert choice (default tc)")
    ap.add_argument("--router", choices=("identity", "softmax", "sigmoid"),
                    help="ProMoE router score activation (default identity)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.vae_scale > 0:
        print("convert_checkpoint: error: --vae-scale must be a positive number", file=sys.stderr)
        return 2
    if args.quant_experts != "none" and args.quant_experts not in expert_quant.BITS:
        print(f"convert_checkpoint: error: --quant-experts '{args.quant_experts}': expected none, "
              f"int8 or int4", file=sys.stderr)
        return 2
    try:
        cfg, n, nq = convert(args)
    except InputError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    extra = (f" {cfg['promoe']['variant']} {cfg['promoe']['router']}"
             if cfg["arch"] == "promoe" else "")
    qx = f", {nq} expert matrices {args.quant_experts}" if nq else ""
    print(f"convert_checkpoint: wrote {args.output}: {cfg['arch']} {cfg['name'] or 'model'} "
          f"D={cfg['hidden_size']} L={cfg['depth']} H={cfg['num_heads']} "
          f"E={cfg['num_experts']} k={cfg['top_k']} {cfg['attention']} {cfg['objective']}"
          f"{extra}, {n} tensors{qx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

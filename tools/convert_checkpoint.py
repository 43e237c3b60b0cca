#!/usr/bin/python3
"""Convert an official DiT-MoE PyTorch checkpoint (.pt) to a ditmoe .safetensors model.

    /usr/bin/python3 tools/convert_checkpoint.py IN.pt OUT.safetensors [--dtype f32|f16|bf16]
        [--heads N] [--top-k K] [--objective ddpm|rf] [--num-classes N] [--class-names FILE]
        [--name TEXT] [--sampler S] [--steps N] [--cfg-scale F] [--cfg-channels N]

Accepts a bare state dict or one wrapped under "ema", "model", "module" or "state_dict" (checked
in that order); "module." / "model." key prefixes are stripped; non-tensor entries (e.g. a
pickled argparse.Namespace under "args") are ignored. Tensor names are kept unchanged. The model
config is stored as JSON in the header metadata under "ditmoe" (schema: docs/format.md).
What the weights cannot tell comes from flags, defaulting to the released-config table
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
import safetensors_io  # noqa: E402

RELEASED = {384: ("S", 6), 768: ("B", 12), 1152: ("XL", 16), 1408: ("G", 16)}
WRAPPERS = ("ema", "model", "module", "state_dict")
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


def infer_config(sd, args):
    for k in REQUIRED:
        if k not in sd:
            raise InputError(f"missing tensor {k} (not a DiT-MoE state dict?)")
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
    depth = max(idx) + 1
    E = int(sd["blocks.0.moe.gate.weight"].shape[0])
    qknorm = "blocks.0.attn.Wqkv.weight" in sd
    attention = "qknorm" if qknorm else "timm"
    eg = sd.get("blocks.0.moe.experts.0.gate_proj.weight")
    if eg is None:
        raise InputError("missing tensor blocks.0.moe.experts.0.gate_proj.weight")
    expert_hidden = int(eg.shape[0])
    sg = sd.get("blocks.0.moe.shared_experts.gate_proj.weight")
    shared_hidden = int(sg.shape[0]) if sg is not None else 0

    rows = int(sd["final_layer.linear.weight"].shape[0])
    if rows == P * P * 2 * C:
        learn_sigma = True
    elif rows == P * P * C:
        learn_sigma = False
    else:
        raise InputError(f"final_layer.linear.weight: shape {shape_str(sd['final_layer.linear.weight'].shape)}"
                         f" expected [{P * P * 2 * C},{D}] or [{P * P * C},{D}]")

    if args.heads is not None:
        heads = args.heads
    elif D in RELEASED:
        heads = RELEASED[D][1]
    else:
        raise InputError(f"hidden size {D} is not in the released-config table "
                         f"(384/768/1152/1408): pass --heads N")
    if heads < 1 or D % heads:
        raise InputError(f"--heads {heads}: hidden size {D} is not divisible by it")
    if qknorm:
        qn = sd.get("blocks.0.attn.q_norm.weight")
        if qn is not None and tuple(qn.shape) != (D // heads,):
            raise InputError(f"{'--heads' if args.heads is not None else 'heads from the table'} "
                             f"{heads}: head dim {D // heads} does not match "
                             f"blocks.0.attn.q_norm.weight {shape_str(qn.shape)}")
    top_k = args.top_k if args.top_k is not None else 2
    if not 1 <= top_k <= E:
        raise InputError(f"--top-k {top_k}: expected 1..{E} (num_experts from "
                         f"blocks.0.moe.gate.weight)")

    table_rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    num_classes = args.num_classes if args.num_classes is not None else table_rows - 1
    if num_classes < 1 or table_rows != num_classes + 1:
        raise InputError(f"--num-classes {num_classes}: y_embedder.embedding_table.weight has "
                         f"{table_rows} rows, expected num_classes + 1 (null class last)")
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
        try:
            with open(args.class_names, encoding="utf-8") as f:
                names = [ln.rstrip("\r\n") for ln in f]
        except OSError as e:
            raise InputError(f"--class-names {args.class_names}: {e.strerror}")
        while names and not names[-1].strip():
            names.pop()
        if len(names) != num_classes:
            raise InputError(f"--class-names {args.class_names}: {len(names)} names, expected "
                             f"{num_classes} (num_classes)")
        cfg["class_names"] = names
    cfg["objective"] = objective
    cfg["vae_scale"] = 0.18215
    given = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
             "cfg_channels": args.cfg_channels}
    if any(v is not None for v in given.values()):
        s = dict(SAMPLING_DEFAULTS[objective])
        s.update({k: v for k, v in given.items() if v is not None})
        if s["steps"] < 1:
            raise InputError(f"--steps {s['steps']}: expected >= 1")
        if not s["cfg_scale"] >= 0:
            raise InputError(f"--cfg-scale {s['cfg_scale']}: expected >= 0")
        if not 0 <= s["cfg_channels"] <= C:
            raise InputError(f"--cfg-channels {s['cfg_channels']}: expected 0..{C}")
        cfg["sampling"] = s
    check_shapes(sd, cfg)
    return cfg


def expected_shapes(cfg):
    D, C, P = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"]
    E, Fe, Fs = cfg["num_experts"], cfg["expert_hidden"], cfg["shared_hidden"]
    T = (cfg["input_size"] // P) ** 2
    cout = 2 * C if cfg["learn_sigma"] else C
    hd = D // cfg["num_heads"]
    ex = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, P, P),
          "x_embedder.proj.bias": (D,), "t_embedder.mlp.0.weight": (D, 256),
          "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
          "t_embedder.mlp.2.bias": (D,),
          "y_embedder.embedding_table.weight": (cfg["num_classes"] + 1, D)}
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
    ex.update({"final_layer.linear.weight": (P * P * cout, D),
               "final_layer.linear.bias": (P * P * cout,),
               "final_layer.adaLN_modulation.1.weight": (2 * D, D),
               "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    return ex


def check_shapes(sd, cfg):
    ex = expected_shapes(cfg)
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
    tensors = {}
    for k, v in sd.items():
        if v.is_floating_point():
            if target is not None:
                v = v.to(target)
            elif v.dtype not in DTYPES.values():      # f64 etc: store as f32
                v = v.to(torch.float32)
        tensors[k] = v.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    safetensors_io.write(args.output, tensors, {"ditmoe": json.dumps(cfg), "format": "pt"})
    return cfg, len(tensors)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Convert a DiT-MoE .pt checkpoint to .safetensors")
    ap.add_argument("input", help="official checkpoint (.pt)")
    ap.add_argument("output", help="output .safetensors")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="convert floating tensors (default: keep f32/f16/bf16 as stored)")
    ap.add_argument("--heads", type=int, help="attention heads (default: released-config table)")
    ap.add_argument("--top-k", type=int, help="experts per token (default 2)")
    ap.add_argument("--objective", choices=("ddpm", "rf"),
                    help="default: rf for qknorm attention, ddpm for timm")
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
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, n = convert(args)
    except InputError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint: wrote {args.output}: {cfg['name'] or 'model'} "
          f"D={cfg['hidden_size']} L={cfg['depth']} H={cfg['num_heads']} "
          f"E={cfg['num_experts']} k={cfg['top_k']} {cfg['attention']} {cfg['objective']}, "
          f"{n} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Routed experts stored quantised (docs/format.md "Quantised routed experts"), in numpy: the
arithmetic of the library's dm_quant_weight (src/backend/cpu/gemm_q8.c / gemm_q4.c, the
dm_lp_pack_q8 / dm_lp_pack_q4 loops, then dm_lp_export's canonical layout), so that
tools/convert_checkpoint.py --quant-experts writes the bytes ditmoe-convert --quant-experts writes.

    routed_expert(name, cfg) -> bool        is `name` a routed expert's matrix (quantised)?
    quantise(name, w, bits) -> (q, scale)   w: float tensor [out, in] (f32 / f16 / bf16, taken
                                            exactly as float32), bits 8 or 4; torch tensors out:
      int8: q int8 [out, in] = clamp(rint(w / s), -127, 127), s float32 [out] = max|w| / 127
            (float32 division, rint = round half to even; an all-zero row: s = 0, q = 0);
      int4: q uint8 [out, in / 2], byte j = k 2j in its low nibble, 2j+1 in its high one (two's
            complement); scale bf16 [out, in / 32]: per group of 32 inputs
            d = bf16(m / -8), m the group's first value of largest magnitude (+0 when the group is
            all zero, so d = -0), bf16 by round to nearest even with a result below FLT_MIN
            flushed to a signed zero (dm_lp_bf16_rne); q = clamp(rint(w / d), -8, 7), 0 where d = 0.
    Raises ValueError for int4 with in % 32 != 0, a non-2-D or empty weight, or a non-finite value
    (the C loops have no defined result for those; the converter refuses them).
"""
import re

import numpy as np
import torch

GROUP = 32   # int4: inputs per scale
BITS = {"int8": 8, "int4": 4}

# sscanf("blocks.%d.<moe|mlp>.experts.%d.%15[a-z_].weight%n") in ditmoe-convert.c routed_expert
_EXPERT = re.compile(r"blocks\.(\s*[+-]?\d+)\.(moe|mlp)\.experts\.(\s*[+-]?\d+)\.([a-z_]{1,15})"
                     r"\.weight")


def routed_expert(name, cfg):
    """DiT-MoE blocks.i.moe.experts.e.{gate,up,down}_proj.weight, e < E; ProMoE
    blocks.i.mlp.experts.e.{up,down}_proj.weight, e <= E (E: the unconditional expert)."""
    m = _EXPERT.fullmatch(name)
    promoe = cfg["arch"] == "promoe"
    if not m or m.group(2) != ("mlp" if promoe else "moe"):
        return False
    blk, e, part = int(m.group(1)), int(m.group(3)), m.group(4)
    if not 0 <= blk < cfg["depth"] or not 0 <= e <= cfg["num_experts"] - (0 if promoe else 1):
        return False
    return part in (("up_proj", "down_proj") if promoe else ("gate_proj", "up_proj", "down_proj"))


def check(name, shape, bits):
    """The shape checks of ditmoe-convert's plan (messages without the input path)."""
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"{name}: expected a 2-D weight")
    if bits == 4 and shape[1] % GROUP:
        raise ValueError(f"{name}: --quant-experts int4 needs the expert input width to be a "
                         f"multiple of {GROUP}; the weight is [{shape[0]}, {shape[1]}] (use int8)")


def _bf16_bits(x):
    """float32 (finite) -> uint16, round to nearest even; a result below FLT_MIN -> signed 0."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    h = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    h = h.astype(np.uint16)
    return np.where(h & np.uint16(0x7F80) == 0, h & np.uint16(0x8000), h).astype(np.uint16)


def _div(w, s):
    """w / s in float32 where s != 0, else 0 (the C loops skip a zero scale)."""
    q = np.zeros(w.shape, np.float32)
    np.divide(w, s, out=q, where=s != 0)
    return np.rint(q)


def quantise(name, w, bits):
    check(name, tuple(w.shape), bits)
    w = w.detach().to(torch.float32).contiguous().numpy()
    if not np.isfinite(w).all():
        o, k = map(int, np.argwhere(~np.isfinite(w))[0])
        raise ValueError(f"{name}: value at [{o}, {k}] is not finite (cannot be quantised)")
    if bits == 8:
        s = np.abs(w).max(axis=1) / np.float32(127)
        q = np.clip(_div(w, s[:, None]), -127, 127).astype(np.int8)
        return torch.from_numpy(q), torch.from_numpy(s.astype(np.float32))
    out, n = w.shape
    g = w.reshape(out, n // GROUP, GROUP)
    a = np.abs(g)
    big = np.take_along_axis(g, a.argmax(axis=2)[..., None], axis=2)[..., 0]
    big = np.where(a.max(axis=2) == 0, np.float32(0), big).astype(np.float32)
    d_bits = _bf16_bits(big / np.float32(-8))
    d = (d_bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    q = np.clip(_div(w, np.repeat(d, GROUP, axis=1)), -8, 7).astype(np.int8)
    nib = (q & np.int8(15)).astype(np.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << np.uint8(4))).astype(np.uint8)
    return torch.from_numpy(packed), torch.from_numpy(d_bits.view(np.int16)).view(torch.bfloat16)

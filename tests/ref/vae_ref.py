"""PyTorch reference of the SD KL-f8 VAE decoder (docs/spec/vae_samplers.md part A), generalised.

Written from the spec, diffusers *current* parameter naming; used by tests/test_vae*.py as the
independent reference for the C decoder (src/vae) and importable by other tools (e.g. a small KL
autoencoder trainer that adds its own encoder).

Configuration (a dict, a VAEConfig, or keyword arguments to Decoder):
    ch              base width (128 for SD)
    ch_mult         width multipliers per level, length L (SD: (1, 2, 4, 4)); widths ch*m
    num_res_blocks  r (SD: 2); every up level has r + 1 resnets
    z_channels      latent channels (4); post_quant_conv is z_channels -> z_channels (embed_dim == z)
    out_ch          image channels (3; 1 for gray images)
    norm_groups     GroupNorm groups (SD: 32). None -> 32 if every width is divisible by 32, else
                    the largest divisor of all widths that is <= 32.
    mid_attention   single-head self-attention in the mid block (True for SD)
Spatial factor f = 2 ** (L - 1). GroupNorm eps 1e-6 everywhere.

API
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=3)
    dec = Decoder(cfg)                  # modules post_quant_conv + decoder.*
    randomize_(dec, seed=0)             # random non-zero weights, GroupNorm affine included
    img = dec.decode(z_scaled, 0.18215) # = decoder(post_quant_conv(z_scaled / scale))
    sd = dec.state_dict()               # diffusers names: post_quant_conv.*, decoder.*
    to_legacy(sd)                       # query/key/value/proj_attn spelling (hub sd-vae-ft-*)
    to_ldm(sd, L, prefix="")            # ldm names (reversed up index, 4-D 1x1 attention weights)
    write_safetensors(path, sd, metadata)   # minimal writer (F32/F16/BF16-free: float32 only)
An encoder can be added by subclassing Decoder (adding self.encoder / self.quant_conv keeps the
flat diffusers naming); ResnetBlock, MidAttention and group_norm are reusable building blocks.
"""
import json
import math
import struct
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6
SD_SCALE = 0.18215


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    out_ch: int = 3
    norm_groups: int = None
    mid_attention: bool = True

    def widths(self):
        return [self.ch * m for m in self.ch_mult]

    def groups(self):
        if self.norm_groups:
            return self.norm_groups
        ws = self.widths()
        for g in range(32, 0, -1):
            if all(w % g == 0 for w in ws):
                return g
        return 1

    @property
    def factor(self):
        return 2 ** (len(self.ch_mult) - 1)


SD_CONFIG = VAEConfig()


def _as_cfg(cfg, kw):
    if cfg is None:
        return VAEConfig(**kw)
    if isinstance(cfg, dict):
        return VAEConfig(**{**cfg, **kw})
    return cfg


def group_norm(c, groups):
    return nn.GroupNorm(groups, c, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); out = shortcut(x) + h."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        s = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return s + h


class MidAttention(nn.Module):
    """Single-head spatial self-attention with its own GroupNorm and a residual add."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = group_norm(c, groups)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # [B, N, C], n = y*W + x
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(C), dim=-1)  # [B, N, N]
        o = self.to_out[0](torch.bmm(p, v))  # [B, N, C]
        return x + o.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([MidAttention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class DecoderBody(nn.Module):
    """The `decoder.*` part: conv_in, mid_block, up_blocks, conv_norm_out, conv_out."""

    def __init__(self, cfg):
        super().__init__()
        g = cfg.groups()
        ws = cfg.widths()
        L = len(ws)
        top = ws[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid_block = MidBlock(top, g, cfg.mid_attention)
        blocks, prev = [], top
        for i in range(L):
            w = ws[L - 1 - i]
            blocks.append(UpBlock(prev, w, cfg.num_res_blocks + 1, g, i < L - 1))
            prev = w
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = group_norm(ws[0], g)
        self.conv_out = nn.Conv2d(ws[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid_block(h)
        for b in self.up_blocks:
            h = b(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """post_quant_conv + decoder, with diffusers-current state-dict names."""

    def __init__(self, cfg=None, **kw):
        super().__init__()
        self.cfg = _as_cfg(cfg, kw)
        zc = self.cfg.z_channels
        self.post_quant_conv = nn.Conv2d(zc, zc, 1)
        self.decoder = DecoderBody(self.cfg)

    def forward(self, z_unscaled):
        return self.decoder(self.post_quant_conv(z_unscaled))

    @torch.no_grad()
    def decode(self, z_scaled, scale=SD_SCALE):
        """img = decoder(post_quant_conv(z_scaled / scale)); z [B,zc,h,w] -> [B,out_ch,fh,fw]."""
        return self.forward(z_scaled / scale)


@torch.no_grad()
def randomize_(module, seed=0):
    """Random non-zero weights: conv/linear ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2),
    GroupNorm gamma ~ 1 + N(0, 0.2^2), beta ~ N(0, 0.1^2). Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen))
    return module


# ----------------------------------------------------------------------------------------------
# Name mapping (spec A.8)
# ----------------------------------------------------------------------------------------------
_LEGACY = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
           (".to_out.0.", ".proj_attn.")]


def to_legacy(sd):
    """diffusers-current -> diffusers 0.4.2 (hub sd-vae-ft-ema/mse) attention names."""
    out = {}
    for k, v in sd.items():
        for a, b in _LEGACY:
            k = k.replace(a, b)
        out[k] = v
    return out


def ldm_name(k, L):
    """One diffusers-current key -> ldm key (without prefix)."""
    k = k.replace("decoder.mid_block.resnets.0.", "decoder.mid.block_1.")
    k = k.replace("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")
    k = k.replace("decoder.mid_block.attentions.0.group_norm.", "decoder.mid.attn_1.norm.")
    k = k.replace("decoder.mid_block.attentions.0.to_q.", "decoder.mid.attn_1.q.")
    k = k.replace("decoder.mid_block.attentions.0.to_k.", "decoder.mid.attn_1.k.")
    k = k.replace("decoder.mid_block.attentions.0.to_v.", "decoder.mid.attn_1.v.")
    k = k.replace("decoder.mid_block.attentions.0.to_out.0.", "decoder.mid.attn_1.proj_out.")
    k = k.replace("decoder.conv_norm_out.", "decoder.norm_out.")
    if k.startswith("decoder.up_blocks."):
        parts = k.split(".")
        i = int(parts[2])
        rest = parts[3:]
        if rest[0] == "resnets":
            rest = ["block"] + rest[1:]
            rest = ["nin_shortcut" if p == "conv_shortcut" else p for p in rest]
        elif rest[0] == "upsamplers":
            rest = ["upsample"] + rest[2:]
        k = ".".join(["decoder", "up", str(L - 1 - i)] + rest)
    return k


def to_ldm(sd, L, prefix=""):
    """diffusers-current -> ldm (CompVis) names; attention q/k/v/proj_out weights become 4-D 1x1."""
    out = {}
    for k, v in sd.items():
        nk = ldm_name(k, L)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and not ".norm." in nk and v.dim() == 2:
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[prefix + nk] = v
    return out


# ----------------------------------------------------------------------------------------------
# Minimal safetensors writer / reader (float32 tensors)
# ----------------------------------------------------------------------------------------------
def write_safetensors(path, tensors, metadata=None):
    """tensors: name -> torch.Tensor or np.ndarray (written as F32 unless already float16/int)."""
    header, blobs, off = {}, [], 0
    dt_names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int32"): "I32",
                np.dtype("int64"): "I64", np.dtype("uint8"): "U8", np.dtype("float64"): "F64"}
    for name, t in tensors.items():
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        b = a.tobytes()
        header[name] = {"dtype": dt_names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    np_dt = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64,
             "U8": np.uint8, "F64": np.float64}
    out = {}
    for k, d in header.items():
        a, b = d["data_offsets"]
        out[k] = torch.from_numpy(np.frombuffer(data[a:b], dtype=np_dt[d["dtype"]])
                                  .reshape(d["shape"]).copy())
    return out, meta


def vae_metadata(cfg, scale=SD_SCALE):
    """The optional "__metadata__" entry the C loader reads (docs/vae.md)."""
    return {"ditmoe.vae": json.dumps({"scaling_factor": scale, "norm_groups": cfg.groups()})}


if __name__ == "__main__":
    d = Decoder(SD_CONFIG)
    n = sum(p.numel() for p in d.parameters())
    print("SD decoder params", n, "tensors", len(d.state_dict()))

"""Independent PyTorch reference of DiT-MoE (feizc/DiT-MoE), written from
docs/spec/ditmoe.md sections 2-3. No code copied from the original repository.

State-dict names and shapes equal the official models.py ones (spec 3.1), so an official
checkpoint loads with load_state_dict(strict=True) and our converter / C engine read the
same names.

Everything runs in float32. Difference from the official XL/G ("qknorm") path: the original
runs q/k LayerNorm in fp32, rounds q,k,v to fp16 and calls flash-attn in fp16; here the whole
attention (LayerNorm over head dim with affine shared by all heads, then plain softmax attention)
stays in fp32. This is the precise reference our C engine is compared against; expect fp16
flash outputs to differ at the ~1e-3 level.

API (kept small on purpose):
    cfg = dict(hidden_size=64, depth=2, num_heads=4, num_experts=8, top_k=2,
               attention="timm", patch_size=2, input_size=16, in_channels=4,
               learn_sigma=True, num_classes=10)
    model = DiTMoE(**cfg)              # keyword names = metadata schema names (+ mlp_ratio,
                                       # class_dropout_prob, aux_alpha)
    randomize_(model, seed=0)          # all parameters random, non-zero, O(1) activations
    out = model(x, t, y)               # x [B,C,H,W] t [B] y [B] -> [B, Cout, H, W]
    routes = []; model(x, t, y, routes=routes)
        # routes[l] = (ids [B*T, k] int64 sorted by descending weight, weights [B*T, k] fp32)
    meta = metadata_config(model.config, name="...", objective="ddpm")   # schema dict
    model = DiTMoE(**config_from_metadata(meta))
Training:
    model.train(); out = model(x, t, y)  # label dropout (prob class_dropout_prob) applied,
    loss = mse + sum(model.aux_losses)   # per-layer expert balance losses (spec 2.11)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FREQ_DIM = 256  # timestep sinusoid size (spec 2.3)


# --------------------------------------------------------------------------- embeddings

def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos table [grid*grid, dim] in float64 (spec 2.2).
    Channels [0, dim/2) encode the column j, [dim/2, dim) the row i; within each half
    the first dim/4 entries are sin(pos * w_k), the next dim/4 are cos(pos * w_k)."""
    assert dim % 4 == 0, "hidden size must be a multiple of 4 for the 2-D sin-cos table"
    K = dim // 4
    w = 1.0 / 10000.0 ** (np.arange(K, dtype=np.float64) / K)          # [K]
    m = np.arange(grid * grid)
    row, col = m // grid, m % grid

    def half(pos):                                                         # pos [T]
        a = pos[:, None].astype(np.float64) * w[None, :]                   # [T, K]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)              # [T, 2K]
    return np.concatenate([half(col), half(row)], axis=1)                  # [T, dim]


def timestep_sinusoid(t, dim=FREQ_DIM):
    """[B] -> [B, dim] float32: [cos(t*f), sin(t*f)] (COS first, spec 2.3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, cin, dim):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):                                  # [B,C,H,W] -> [B,T,D]
        return self.proj(x).flatten(2).transpose(1, 2)      # token m = row*G + col


class TimestepEmbedder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), dim)

    def forward(self, y, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


# --------------------------------------------------------------------------- attention

class AttentionTimm(nn.Module):
    """S/B layout: qkv [3][H][hd], plain softmax attention, proj (spec 2.7a)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                    # [B,H,T,hd]
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(B, T, D))


class AttentionQKNorm(nn.Module):
    """XL/G layout: Wqkv [3][H][hd], LayerNorm over hd (affine shared by heads) on q and k,
    out_proj (spec 2.7b). Runs in fp32 here; the original rounds to fp16 for flash-attn."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        hd = dim // heads
        self.Wqkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(hd, eps=1e-6, elementwise_affine=True)
        self.k_norm = nn.LayerNorm(hd, eps=1e-6, elementwise_affine=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.Wqkv(x).view(B, T, 3, self.heads, D // self.heads)
        q = self.q_norm(qkv[:, :, 0]).transpose(1, 2)       # [B,H,T,hd]
        k = self.k_norm(qkv[:, :, 1]).transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        return self.out_proj(attend(q, k, v).transpose(1, 2).reshape(B, T, D))


def attend(q, k, v):
    """softmax(q k^T / sqrt(hd)) v, [B,H,T,hd] each, fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(torch.softmax(s, dim=-1), v)


# --------------------------------------------------------------------------- MoE

class SwiGLU(nn.Module):
    """down(SiLU(gate(h)) * up(h)), no biases (routed and shared experts)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class SparseMoE(nn.Module):
    """Spec 2.8: softmax over all experts, top-k, NO renormalisation, weight multiplies the
    expert output, shared expert always on with weight 1."""

    def __init__(self, dim, num_experts, top_k, expert_hidden, shared_hidden, aux_alpha):
        super().__init__()
        self.num_experts, self.top_k, self.aux_alpha = num_experts, top_k, aux_alpha
        self.experts = nn.ModuleList([SwiGLU(dim, expert_hidden) for _ in range(num_experts)])
        self.gate = nn.Linear(dim, num_experts, bias=False)          # key moe.gate.weight [E,D]
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.aux_loss = None

    def forward(self, h, routes=None):
        shape = h.shape
        x = h.reshape(-1, shape[-1])                                   # [N, D]
        N, k = x.shape[0], self.top_k
        scores = torch.softmax(self.gate(x).float(), dim=-1)          # [N, E]
        w, ids = torch.topk(scores, k, dim=-1, sorted=True)           # [N, k], descending
        if routes is not None:
            routes.append((ids.detach().cpu(), w.detach().cpu()))
        # Sort the N*k (token, slot) copies by expert id, run each expert on its contiguous
        # slice, scale the output by the gate weight and scatter-add into y (ascending expert id).
        flat = ids.reshape(-1)                                         # [N*k]
        order = torch.argsort(flat, stable=True)                      # [N*k]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok = order // k                                               # token of each copy
        wsorted = w.reshape(-1)[order]                                 # [N*k]
        y = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            out = self.experts[e](x[tok[sl]]) * wsorted[sl, None]
            y.index_add_(0, tok[sl], out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training and self.aux_alpha > 0:
            # Expert-level balance loss (spec 2.11, seq_aux=False): alpha * sum_i P_i * f_i
            P = scores.mean(0)                                              # [E]
            f = torch.bincount(flat, minlength=self.num_experts).float() / (N * k) * self.num_experts
            self.aux_loss = self.aux_alpha * (P * f).sum()
        else:
            self.aux_loss = None
        return y.view(shape)


# --------------------------------------------------------------------------- blocks

def unpatchify(x, p, c, g):
    """[B, T, p*p*c] (per-token order (pi, pj, c), T = g*g) -> [B, c, g*p, g*p]; DiT-MoE's and
    ProMoE's."""
    B = x.shape[0]
    x = x.reshape(B, g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTMoEBlock(nn.Module):
    def __init__(self, dim, heads, attention, num_experts, top_k, expert_hidden, shared_hidden,
                 aux_alpha):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = AttentionTimm(dim, heads) if attention == "timm" else AttentionQKNorm(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.moe = SparseMoE(dim, num_experts, top_k, expert_hidden, shared_hidden, aux_alpha)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c, routes=None):
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_msa, sc_msa))
        x = x + g_mlp.unsqueeze(1) * self.moe(modulate(self.norm2(x), sh_mlp, sc_mlp), routes)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, cout):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch * patch * cout, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)         # SHIFT first
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- model

class DiTMoE(nn.Module):
    def __init__(self, hidden_size=384, depth=12, num_heads=6, num_experts=8, top_k=2,
                 attention="timm", patch_size=2, input_size=32, in_channels=4,
                 learn_sigma=True, num_classes=1000, mlp_ratio=4.0, expert_hidden=None,
                 shared_hidden=None, class_dropout_prob=0.1, aux_alpha=0.01):
        super().__init__()
        if attention not in ("timm", "qknorm"):
            raise ValueError(f"attention must be 'timm' or 'qknorm', got {attention!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} not divisible by patch_size {patch_size}")
        D = hidden_size
        expert_hidden = int(mlp_ratio * D) if expert_hidden is None else int(expert_hidden)
        shared_hidden = 2 * D if shared_hidden is None else int(shared_hidden)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.in_channels, self.num_classes = patch_size, in_channels, num_classes
        self.grid = input_size // patch_size
        self.config = dict(hidden_size=D, depth=depth, num_heads=num_heads,
                           num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden,
                           shared_hidden=shared_hidden, attention=attention,
                           patch_size=patch_size, input_size=input_size,
                           in_channels=in_channels, learn_sigma=bool(learn_sigma),
                           num_classes=num_classes, class_dropout_prob=class_dropout_prob,
                           aux_alpha=aux_alpha)

        # Direct Parameter: first key of the state dict, as in the official file.
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed(D, self.grid)).float().unsqueeze(0),
            requires_grad=False)                                         # [1, T, D]
        self.x_embedder = PatchEmbed(patch_size, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        self.blocks = nn.ModuleList([
            DiTMoEBlock(D, num_heads, attention, num_experts, top_k, expert_hidden,
                        shared_hidden, aux_alpha) for _ in range(depth)])
        self.final_layer = FinalLayer(D, patch_size, self.out_channels)
        self.aux_losses = []

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.out_channels, self.grid)

    def forward(self, x, t, y, routes=None, force_drop_ids=None):
        """x [B,C,H,W] float, t [B] float (integer-valued DDPM or (0,1] RF), y [B] int64
        (num_classes = null class). routes: optional list, one (ids, weights) per layer."""
        x = self.x_embedder(x.float()) + self.pos_embed                  # [B,T,D]
        c = self.t_embedder(t) + self.y_embedder(y.long(), self.training, force_drop_ids)
        for blk in self.blocks:
            x = blk(x, c, routes)
        x = self.final_layer(x, c)                                       # [B,T,p*p*Cout]
        self.aux_losses = [b.moe.aux_loss for b in self.blocks if b.moe.aux_loss is not None]
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """DiT's DDPM CFG (spec 4.1): x [2B,...] whose first half is used for both branches,
        y = [labels, null...]; guidance on channels [0, cfg_channels) only."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], 0), t, y)
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        c_eps, u_eps = torch.split(eps, len(eps) // 2, dim=0)
        g = u_eps + cfg_scale * (c_eps - u_eps)
        return torch.cat([torch.cat([g, g], 0), rest], dim=1)


# --------------------------------------------------------------------------- helpers

@torch.no_grad()
def randomize_(model, seed=0):
    """Every parameter random and non-zero with a sane scale (activations stay O(1) through
    depth); pos_embed set to the fixed 2-D sin-cos table. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            p.copy_(torch.from_numpy(sincos_pos_embed(p.shape[-1], model.grid)).float()[None])
        elif name.endswith("norm.weight"):                        # q_norm / k_norm affine
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif "embedding_table" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.dim() == 1:                                        # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:                                                     # linear / conv weights
            fan_in = int(np.prod(p.shape[1:]))
            scale = 1.0 if name.endswith("moe.gate.weight") else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * (scale / math.sqrt(fan_in)))
    return model


@torch.no_grad()
def init_dit_weights_(model, seed, per_block):
    """DiT's training initialisation (spec 2.11), shared by DiT-MoE (tools/train/train_dit.py) and
    ProMoE (promoe_ref.init_weights_): xavier-uniform linears and the patch-embed conv (as a
    linear) with zero bias, N(0, 0.02) label table and timestep MLP, zero adaLN and final layer;
    per_block(block, g) draws each block's own weights (router, cluster centres) from the same
    generator, in block order, after zeroing its adaLN. Returns the model."""
    g = torch.Generator().manual_seed(seed)

    def xavier(w):
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            xavier(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    xavier(model.x_embedder.proj.weight)
    model.x_embedder.proj.bias.zero_()
    tab = model.y_embedder.embedding_table.weight
    tab.copy_(0.02 * torch.randn(tab.shape, generator=g))
    for i in (0, 2):
        w = model.t_embedder.mlp[i].weight
        w.copy_(0.02 * torch.randn(w.shape, generator=g))
    for b in model.blocks:
        b.adaLN_modulation[-1].weight.zero_()
        b.adaLN_modulation[-1].bias.zero_()
        per_block(b, g)
    fl = model.final_layer
    fl.adaLN_modulation[-1].weight.zero_()
    fl.adaLN_modulation[-1].bias.zero_()
    fl.linear.weight.zero_()
    fl.linear.bias.zero_()
    return model


@torch.no_grad()
def round_params_(model, dtype):
    """Round every floating parameter through `dtype` (e.g. torch.bfloat16) and back to fp32,
    so the reference sees exactly what a converted low-precision file holds."""
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    return model


SCHEMA_KEYS = ("hidden_size", "depth", "num_heads", "num_experts", "top_k", "expert_hidden",
               "shared_hidden", "attention", "patch_size", "input_size", "in_channels",
               "learn_sigma", "num_classes")


def metadata_config(cfg, name="", objective=None, class_names=None, sampling=None,
                    vae_scale=0.18215):
    """Model config dict (model.config) -> metadata schema dict (/tmp/schema.md)."""
    meta = {"format_version": 1, "arch": "dit-moe", "name": name}
    meta.update({k: cfg[k] for k in SCHEMA_KEYS})
    meta["objective"] = objective or ("rf" if cfg["attention"] == "qknorm" else "ddpm")
    if class_names is not None:
        meta["class_names"] = list(class_names)
    meta["vae_scale"] = vae_scale
    if sampling:
        meta["sampling"] = dict(sampling)
    return meta


def config_from_metadata(meta):
    """Metadata schema dict -> DiTMoE(**kwargs)."""
    return {k: meta[k] for k in SCHEMA_KEYS}

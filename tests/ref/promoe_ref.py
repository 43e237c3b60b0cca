"""Independent PyTorch reference of ProMoE (ali-vilab/ProMoE), written from
docs/spec/promoe.md sections 2-6. No code copied from the original repository.

State-dict names and shapes equal the official ones (spec 4): even blocks are dense DiT blocks
(blocks.i.mlp.fc1/fc2, GELU-tanh), odd blocks MoE blocks (blocks.i.mlp.cluster_centers [E, D],
blocks.i.mlp.experts.0..E.{up,down}_proj.{weight,bias} with e = E the unconditional expert,
blocks.i.mlp.shared_expert.*); attention is timm qkv/proj; embedders, adaLN and final layer as
DiT / DiT-MoE (shared pieces imported from dit_moe_ref.py, which follows the same spec text).

Everything runs in float32 (the official reference is plain fp32 too, spec 6.3).

    cfg = dict(hidden_size=64, depth=4, num_heads=4, num_experts=8, top_k=1, patch_size=2,
               input_size=16, in_channels=4, learn_sigma=True, num_classes=10,
               variant="tc", router="identity")
    model = ProMoE(**cfg)            # keyword names = metadata schema names
    randomize_(model, seed=0)        # all parameters random, non-zero, O(1) activations
    out = model(x, t, y)             # x [B,C,H,W], t [B] on the model's scale (1000*sigma),
                                     # y [B] int64 (num_classes = null) -> [B, Cout, H, W]
    routes = []; model(x, t, y, routes=routes)
        # one dict per MoE block: ids [B*T, k] int64 (descending weight, -1 = none, E = the
        # unconditional expert), weights [B*T, k], scores [B*T, E] (activated router scores),
        # tie [B*T] bool (a near-tie within TIE_EPS could flip this token's expert set)
    z = euler_cfg(model, noise, y, steps=250, cfg_scale=1.5)   # ProMoE's RF Euler sampler (6.1)
Training:
    model.train(); out = model(x, t, y)   # label dropout (class_dropout_prob) applied
    loss = mse + model.rcl_weight * sum(model.aux_losses)   # routing contrastive loss (spec 5)
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_moe_ref import (AttentionTimm, FinalLayer, LabelEmbedder, PatchEmbed,  # noqa: E402
                         TimestepEmbedder, attend, init_dit_weights_, modulate, sincos_pos_embed,
                         unpatchify)

VARIANTS = ("tc", "ec")
ROUTERS = ("identity", "softmax", "sigmoid")
TIE_EPS = 1e-5


def gelu_tanh(u):
    return F.gelu(u, approximate="tanh")


class MoeMLP(nn.Module):
    """Expert / shared expert (spec 2.3): down(gelu_tanh(up(h))), both linears with bias."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, h):
        return self.down_proj(gelu_tanh(self.up_proj(h)))


class Mlp(nn.Module):
    """Dense block MLP (spec 2.2): fc2(gelu_tanh(fc1(h)))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, h, y=None, routes=None):
        return self.fc2(gelu_tanh(self.fc1(h)))


def _ec_capacity(T, E, k):
    return max(1, min(int(math.floor(T / E * k)), T))


class ProtoMoE(nn.Module):
    """Prototype-routed MoE (spec 3): conditional split by label, cosine router to the
    cluster centres, token choice (tc) or expert choice (ec), unconditional expert E,
    shared expert added to every token."""

    def __init__(self, dim, num_experts, top_k, expert_hidden, shared_hidden, variant, router,
                 null_class, tau=0.07):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.E, self.k, self.variant, self.router = num_experts, top_k, variant, router
        self.null_class, self.tau = null_class, tau
        # Registered first: cluster_centers precede the experts in the state dict (spec 4).
        self.cluster_centers = nn.Parameter(torch.zeros(num_experts, dim))
        self.experts = nn.ModuleList([MoeMLP(dim, expert_hidden) for _ in range(num_experts + 1)])
        self.shared_expert = MoeMLP(dim, shared_hidden) if shared_hidden > 0 else None
        self.aux_loss = None

    def scores(self, x):
        """x [N, D] -> activated router scores [N, E] (cosine to the prototypes)."""
        s = F.normalize(x, dim=-1, eps=1e-12) @ F.normalize(self.cluster_centers, dim=-1,
                                                            eps=1e-12).t()
        if self.router == "softmax":
            s = torch.softmax(s, dim=-1)
        elif self.router == "sigmoid":
            s = torch.sigmoid(s)
        return s

    def forward(self, h, y, routes=None):
        B, T, D = h.shape
        E, k = self.E, self.k
        x = h.reshape(B * T, D)
        N = B * T
        uncond_b = y.long() == self.null_class                       # [B]
        uncond = uncond_b.repeat_interleave(T)                        # [N]
        s = self.scores(x)                                            # [N, E]
        out = torch.zeros_like(x)
        ids = torch.full((N, k), -1, dtype=torch.int64)
        wts = torch.zeros((N, k), dtype=torch.float32)
        tie = torch.zeros(N, dtype=torch.bool)
        assign = torch.zeros((N, E), dtype=torch.bool)               # for the contrastive loss
        cond = ~uncond
        if self.variant == "tc":
            w, top = torch.topk(s, k, dim=-1, sorted=True)           # [N, k], descending
            sd = s.detach()
            if k < E:   # a near-tie at the selection boundary could flip the expert set
                srt = torch.sort(sd, dim=-1, descending=True).values
                tie = (srt[:, k - 1] - srt[:, k]) < TIE_EPS
            tie &= cond
            for e in range(E):
                sel = (top == e) & cond[:, None]                      # [N, k]
                rows = sel.any(1).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                we = (w * sel).sum(1)[rows]                           # duplicate picks summed
                out.index_add_(0, rows, self.experts[e](x[rows]) * we[:, None])
                assign[rows, e] = True
            ids[cond] = top[cond].detach()
            wts[cond] = w[cond].detach()
        else:
            cap = _ec_capacity(T, E, k)
            picks = [[] for _ in range(N)]                            # (weight, expert)
            for b in range(B):
                if uncond_b[b]:
                    continue
                sb = s[b * T:(b + 1) * T]                             # [T, E]
                for e in range(E):
                    col = sb[:, e]
                    v, tok = torch.topk(col, cap, sorted=True)        # expert e picks tokens
                    rows = tok + b * T
                    out.index_add_(0, rows, self.experts[e](x[rows]) * v[:, None])
                    assign[rows, e] = True
                    cd = col.detach()
                    if cap < T:
                        srt = torch.sort(cd, descending=True).values
                        if srt[cap - 1] - srt[cap] < TIE_EPS:         # boundary near-tie
                            near = (cd - srt[cap]).abs() < TIE_EPS
                            near |= (cd - srt[cap - 1]).abs() < TIE_EPS
                            tie[b * T + near.nonzero().flatten()] = True
                    for r, vv in zip(rows.tolist(), v.detach().tolist()):
                        picks[r].append((vv, e))
            for n in range(N):                                        # record: top k by weight
                p = sorted(picks[n], key=lambda a: (-a[0], a[1]))
                if len(p) > k and p[k - 1][0] - p[k][0] < TIE_EPS:
                    tie[n] = True
                for j, (vv, e) in enumerate(p[:k]):
                    ids[n, j], wts[n, j] = e, vv
        if uncond.any():                                              # unconditional expert
            rows = uncond.nonzero().flatten()
            out.index_add_(0, rows, self.experts[E](x[rows]))
            ids[rows, 0], wts[rows, 0] = E, 1.0
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if routes is not None:
            routes.append(dict(ids=ids, weights=wts, scores=s.detach().clone(), tie=tie))
        self.aux_loss = self.contrastive_loss(x, assign, uncond_b, B, T) if self.training else None
        return out.view(B, T, D)

    def contrastive_loss(self, x, assign, uncond_b, B, T):
        """Routing contrastive loss (spec 5): InfoNCE between the normalised prototypes and the
        normalised means of the conditional tokens assigned to each expert (TC: every expert of
        a token's top-k; EC: per image, each expert's chosen tokens), temperature tau; only
        experts with >= 1 token count, and at least 2 are needed."""
        P = F.normalize(self.cluster_centers, dim=-1)
        groups = [slice(0, B * T)] if self.variant == "tc" else \
            [slice(b * T, (b + 1) * T) for b in range(B) if not uncond_b[b]]
        losses = []
        for g in groups:
            a = assign[g].float()                                     # [n, E]
            cnt = a.sum(0)
            keep = (cnt > 0).nonzero().flatten()
            if keep.numel() < 2:
                continue
            means = (a[:, keep].t() @ x[g]) / cnt[keep, None]          # [K, D]
            logits = P[keep] @ F.normalize(means, dim=-1).t() / self.tau
            losses.append(F.cross_entropy(logits, torch.arange(keep.numel())))
        if not losses:
            return None
        return torch.stack(losses).mean()


class AttentionQKNorm(nn.Module):
    """qk_norm=True (spec 2.1, no released weights): timm qkv/proj plus nn.LayerNorm(hd) with
    eps 1e-5 (PyTorch default) on q and k per head, affine shared across heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        hd = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(hd, eps=1e-5)
        self.k_norm = nn.LayerNorm(hd, eps=1e-5)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]          # [B,H,T,hd]
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(B, T, D))


class ProMoEBlock(nn.Module):
    def __init__(self, dim, heads, ffn, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = AttentionQKNorm(dim, heads) if qk_norm else AttentionTimm(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c, y, routes=None):
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_msa, sc_msa))
        h = modulate(self.norm2(x), sh_mlp, sc_mlp)
        if isinstance(self.mlp, ProtoMoE):
            f = self.mlp(h, y, routes)
        else:
            f = self.mlp(h)
        return x + g_mlp.unsqueeze(1) * f


class ProMoE(nn.Module):
    def __init__(self, hidden_size=384, depth=12, num_heads=6, num_experts=12, top_k=1,
                 patch_size=2, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000,
                 expert_hidden=None, shared_hidden=None, mlp_hidden=None, variant="tc",
                 router="identity", class_dropout_prob=0.1, rcl_weight=1.0, tau=0.07,
                 qk_norm=False):
        super().__init__()
        D = hidden_size
        if D % num_heads:
            raise ValueError(f"hidden_size {D} not divisible by num_heads {num_heads}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..{num_experts}")
        expert_hidden = 2 * D if expert_hidden is None else int(expert_hidden)
        shared_hidden = 2 * D if shared_hidden is None else int(shared_hidden)
        mlp_hidden = 4 * D if mlp_hidden is None else int(mlp_hidden)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.in_channels, self.num_classes = patch_size, in_channels, num_classes
        self.grid = input_size // patch_size
        self.rcl_weight = rcl_weight
        self.config = dict(hidden_size=D, depth=depth, num_heads=num_heads,
                           num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden,
                           shared_hidden=shared_hidden, mlp_hidden=mlp_hidden,
                           patch_size=patch_size, input_size=input_size, in_channels=in_channels,
                           learn_sigma=bool(learn_sigma), num_classes=num_classes,
                           variant=variant, router=router, qk_norm=bool(qk_norm))
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed(D, self.grid)).float().unsqueeze(0),
            requires_grad=False)                                          # [1, T, D]
        self.x_embedder = PatchEmbed(patch_size, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        blocks = []
        for i in range(depth):
            if i % 2 == 1:        # interleave: odd blocks are MoE blocks
                ffn = ProtoMoE(D, num_experts, top_k, expert_hidden, shared_hidden, variant,
                               router, num_classes, tau)
            else:
                ffn = Mlp(D, mlp_hidden)
            blocks.append(ProMoEBlock(D, num_heads, ffn, qk_norm))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, patch_size, self.out_channels)
        self.aux_losses = []

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.out_channels, self.grid)

    def forward(self, x, t, y, routes=None):
        """x [B,C,H,W], t [B] float fed to the embedder as given (1000*sigma), y [B] int64."""
        y = y.long()
        if self.training and self.y_embedder.dropout_prob > 0:   # label dropout -> null label,
            drop = torch.rand(y.shape[0]) < self.y_embedder.dropout_prob   # also for routing
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x = self.x_embedder(x.float()) + self.pos_embed
        c = self.t_embedder(t.float()) + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            x = blk(x, c, y, routes)
        x = self.final_layer(x, c)
        self.aux_losses = [b.mlp.aux_loss for b in self.blocks
                           if isinstance(b.mlp, ProtoMoE) and b.mlp.aux_loss is not None]
        return self.unpatchify(x)


# --------------------------------------------------------------------------- sampler

@torch.no_grad()
def euler_cfg(model, noise, y, steps=250, cfg_scale=1.5, time_scale=1000.0):
    """ProMoE's sampler (spec 6.1-6.2): sigma_i = float32(linspace(1, 0, N+1)[i]) (float64 grid),
    t_i = float32(sigma_i) * time_scale, two passes (cond; uncond with the null label) when
    cfg_scale != 1, guidance on all output channels, then the first C kept;
    x <- x + (sigma_{i+1} - sigma_i) * v, all float32."""
    model.eval()
    B, C = noise.shape[0], noise.shape[1]
    sig = torch.from_numpy(np.linspace(1.0, 0.0, steps + 1)).float()     # [N+1], last = 0
    z = noise.float().clone()
    y = torch.as_tensor(y).long()
    null = torch.full_like(y, model.num_classes)
    for i in range(steps):
        t = torch.full((B,), float(sig[i]), dtype=torch.float32) * time_scale
        out = model(z, t, y)
        if cfg_scale != 1.0:
            u = model(z, t, null)
            out = u + cfg_scale * (out - u)
        z = z + (sig[i + 1] - sig[i]) * out[:, :C]
    return z


# --------------------------------------------------------------------------- helpers

@torch.no_grad()
def randomize_(model, seed=0):
    """Every parameter random and non-zero with sane scales (activations O(1) through depth);
    pos_embed the fixed 2-D sin-cos table; prototypes N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            p.copy_(torch.from_numpy(sincos_pos_embed(p.shape[-1], model.grid)).float()[None])
        elif name.endswith("cluster_centers") or "embedding_table" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight"):                        # q_norm / k_norm affine
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(fan_in)))
    return model


def init_weights_(model, seed=0):
    """Training initialisation (spec 5): DiT's (dit_moe_ref.init_dit_weights_) and N(0, 0.02)
    cluster centres."""
    def per_block(b, g):
        if isinstance(b.mlp, ProtoMoE):
            cc = b.mlp.cluster_centers
            cc.copy_(0.02 * torch.randn(cc.shape, generator=g))
    return init_dit_weights_(model, seed, per_block)


def count_params(model):
    """(total, active per token) without pos_embed: a conditional token uses top_k routed
    experts (the unconditional expert replaces them for null-label tokens)."""
    total = sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed")
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    k, E = model.config["top_k"], model.config["num_experts"]
    n_moe = sum(1 for b in model.blocks if isinstance(b.mlp, ProtoMoE))
    per_expert = routed // max(1, n_moe * (E + 1))
    return total, total - routed + n_moe * k * per_expert


SCHEMA_KEYS = ("hidden_size", "depth", "num_heads", "num_experts", "top_k", "expert_hidden",
               "shared_hidden", "mlp_hidden", "patch_size", "input_size", "in_channels",
               "learn_sigma", "num_classes")


def config_from_metadata(meta):
    """Metadata schema dict (arch "promoe") -> ProMoE(**kwargs)."""
    kw = {k: meta[k] for k in SCHEMA_KEYS}
    pm = meta.get("promoe", {})
    kw["variant"] = pm.get("variant", "tc")
    kw["router"] = pm.get("router", "identity")
    kw["qk_norm"] = meta.get("attention", "timm") == "qknorm"
    return kw

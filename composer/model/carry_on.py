"""The carry-on: the small trainable stack on top of the frozen bases (GPT Carry-On, §3).

    taps      a[src] = Linear_src(RMSNorm(h[src]))                 # D_b -> d
    router    w(t)   = softmax_src(q_src · RMSNorm(x_t) + r_src · a[src](t) + b_src)
    input     z0     = Σ_src w_src(t) · a[src]                      # per-token router over sources
    stack     z_k    = Block_k(z_{k-1} + Σ_{src∈S_k} s_{k,src} · a[src])   # shortcuts
    delta     Δx     = Up(norm(z_K))                                # d -> D_anchor, zero-init
    gate      g      = sigmoid(G(norm(z_K)))                        # elementwise, in (0, 1)
    output    x'     = x + α · g ⊙ Δx                               # then the anchor's LM head

`Up` starts at zero, so an untrained carry-on leaves the anchor's hidden state, and its logits,
exactly as they were.

The router (`router: anchor`) reads the anchor's own final state x: the anchor already knows
whether it is reading code, dialog or arithmetic, so the router can weigh sources per domain. A
scorer shared by all sources (`router: shared`) sees only the projected taps and, where they do
not carry the domain, learns a fixed mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from composer.recipe import CarryOnSpec

# Per block: (keys, values), each (B, n_head, T_past, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) on x of shape (B, n_head, T, head_dim); `positions`
    (T,), or (B, T) where each row counts its own tokens (a left-padded batch)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs  # (T, half) or (B, T, half)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, half): the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    """Pre-norm causal transformer block: RoPE multi-head attention and a SwiGLU MLP."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, rope_theta: float) -> None:
        super().__init__()
        self.heads = heads
        self.rope_theta = rope_theta
        self.attn_norm = RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp_norm = RMSNorm(width)
        self.gate_up = nn.Linear(width, 2 * mlp_hidden, bias=False)
        self.down = nn.Linear(mlp_hidden, width, bias=False)

    def forward(
        self,
        z: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = z.shape
        q, k, v = self.qkv(self.attn_norm(z)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, n_head, T_past + T, head_dim)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        z = z + self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.gate_up(self.mlp_norm(z)).chunk(2, dim=-1)
        return z + self.down(F.silu(gate) * up), (k, v)


def causal_mask(
    q_len: int, k_len: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, q_len, k_len): True where a query may attend.

    Queries are the last `q_len` of `k_len` positions. Padded keys are masked out; a padded
    query keeps its own key so no softmax row is empty.
    """
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    mask = torch.arange(k_len, device=device)[None, :] <= rows  # (q_len, k_len)
    mask = mask[None, None]
    if key_padding is not None:
        keep = key_padding.bool()[:, None, None, :]  # (B, 1, 1, k_len)
        diag = torch.arange(k_len, device=device)[None, :] == rows
        mask = (mask & keep) | diag[None, None]
    return mask


@dataclass
class CarryOnOutput:
    hidden: torch.Tensor  # x + α g ⊙ Δx, (B, T, D_anchor)
    source_weights: torch.Tensor  # router weights per source, (B, T, n_src)
    cache: KVCache
    expert_weights: torch.Tensor | None = None  # β per expert base, (B, T, n_experts)


class CarryOn(nn.Module):
    """Taps → router → blocks with shortcuts → gated, rescaled correction of the anchor state."""

    def __init__(
        self,
        spec: CarryOnSpec,
        tap_dims: dict[str, int],
        anchor_dim: int,
        optional: set[str] | frozenset[str] = frozenset(),
        expert_taps: list[str] | tuple[str, ...] = (),
    ) -> None:
        """`optional` sources (bases aligned across tokenizers) may have no state at a position
        yet; there they contribute a learned null vector instead. `expert_taps` are the last
        layers of `spec.experts` (the states their heads read), one β per token each."""
        super().__init__()
        self.sources = list(tap_dims)
        self.expert_taps = list(expert_taps)
        d = spec.width
        self.nulls = nn.ParameterDict(
            {module_key(s): nn.Parameter(torch.zeros(d)) for s in self.sources if s in optional}
        )
        self.tap_norms = nn.ModuleDict({module_key(s): RMSNorm(n) for s, n in tap_dims.items()})
        self.tap_projs = nn.ModuleDict(
            {module_key(s): nn.Linear(n, d) for s, n in tap_dims.items()}
        )
        n_src = len(self.sources)
        self.router_kind = spec.router
        if spec.router == "anchor":
            # A query per source from the anchor's state, and a scorer per source on its tap.
            self.router_norm = RMSNorm(anchor_dim)
            self.router_query = nn.Linear(anchor_dim, n_src, bias=False)
            self.router_scorers = nn.Parameter(torch.zeros(n_src, d))
        else:
            # A scorer shared by every source on its projected tap.
            self.router = nn.Linear(d, 1)
        self.router_bias = nn.Parameter(torch.zeros(n_src))
        mlp_hidden = max(8, round(spec.mlp_ratio * d / 8) * 8)
        self.blocks = nn.ModuleList(
            Block(d, spec.heads, mlp_hidden, spec.rope_theta) for _ in spec.blocks
        )
        self.shortcuts = [list(b.shortcuts) for b in spec.blocks]
        self.shortcut_scales = nn.ParameterList(
            nn.Parameter(torch.ones(len(b.shortcuts))) for b in spec.blocks
        )
        self.out_norm = RMSNorm(d)
        self.up = nn.Linear(d, anchor_dim, bias=False)
        self.gate = nn.Linear(d, anchor_dim) if spec.gate == "elementwise" else None
        self.expert_weights = nn.Linear(d, len(expert_taps)) if expert_taps else None
        alpha = torch.tensor(float(spec.alpha.init))
        if spec.alpha.learnable:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.router_kind == "anchor":
            nn.init.zeros_(self.router_query.weight)  # uniform source weights at step 0
        else:
            nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.up.weight)  # step 0 equals the anchor exactly
        if self.expert_weights is not None:  # and the experts start with no say
            nn.init.zeros_(self.expert_weights.weight)
        for block in self.blocks:
            # Residual branches start small so the stack starts near the identity.
            assert isinstance(block, Block)
            block.proj.weight.data.mul_(1.0 / math.sqrt(2 * len(self.blocks)))
            block.down.weight.data.mul_(1.0 / math.sqrt(2 * len(self.blocks)))

    def forward(
        self,
        taps: dict[str, torch.Tensor],
        anchor_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
        present: dict[str, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> CarryOnOutput:
        """taps: source → (B, T, D_b); anchor_hidden: (B, T, D_anchor), the LM head's input.

        `attention_mask` (B, T_past + T) marks real tokens; `past` continues a generation;
        `present` (source → (B, T) bool) marks where an optional source has a state;
        `positions` (B, T) are the rotary positions where left padding shifts them (each row
        counts only its real tokens), by default T_past onward.
        """
        dtype = self.up.weight.dtype
        a = {}
        for s in self.sources:
            key = module_key(s)
            a[s] = self.tap_projs[key](self.tap_norms[key](taps[s].to(dtype)))
            if present is not None and s in present and key in self.nulls:
                a[s] = torch.where(present[s].unsqueeze(-1), a[s], self.nulls[key])
        stacked = torch.stack([a[s] for s in self.sources], dim=2)  # (B, T, n_src, d)
        weights = self.route(stacked, anchor_hidden)  # (B, T, n_src)
        z = (weights.unsqueeze(-1) * stacked).sum(dim=2)  # (B, T, d)

        T = z.shape[1]
        past_len = past[0][0].shape[2] if past else 0
        if positions is None:
            positions = torch.arange(past_len, past_len + T, device=z.device)
        positions = positions.to(z.device)
        mask = causal_mask(T, past_len + T, attention_mask, z.device)
        cache: KVCache = []
        for k, block in enumerate(self.blocks):
            for j, src in enumerate(self.shortcuts[k]):
                z = z + self.shortcut_scales[k][j] * a[src]
            z, kv = block(z, positions, mask, past[k] if past else None)
            cache.append(kv)
        z = self.out_norm(z)
        delta = self.up(z)
        if self.gate is not None:
            delta = torch.sigmoid(self.gate(z)) * delta
        hidden = anchor_hidden + (self.alpha * delta).to(anchor_hidden.dtype)
        betas = None
        if self.expert_weights is not None:
            betas = self.expert_weights(z)  # (B, T, n_experts)
        return CarryOnOutput(hidden, weights, cache, betas)

    def route(self, stacked: torch.Tensor, anchor_hidden: torch.Tensor) -> torch.Tensor:
        """Source weights (B, T, n_src) from the projected taps (B, T, n_src, d)."""
        if self.router_kind == "anchor":
            query = self.router_query(self.router_norm(anchor_hidden.to(stacked.dtype)))
            scores = query + torch.einsum("btsd,sd->bts", stacked, self.router_scorers)
        else:
            scores = self.router(stacked).squeeze(-1)
        return (scores + self.router_bias).softmax(dim=-1)


def module_key(source: str) -> str:
    # ModuleDict keys may not contain '.', and '@' reads badly in state-dict names.
    return source.replace("@", "_at_").replace(".", "_")

"""A carry-on mixture as a transformers model, written by `compose export --format hf`.

Frozen bases that share the anchor's tokenizer, a small trained carry-on stack over their tapped
hidden states, and the anchor's LM head (GPT Carry-On, arXiv 2504.07513, §3):

    taps      a[src] = Linear_src(RMSNorm(h[src]))                 # D_b -> d
    router    w(t)   = softmax_src(q_src · RMSNorm(x_t) + r_src · a[src](t) + b_src)
    input     z0     = Σ_src w_src(t) · a[src]
    stack     z_k    = Block_k(z_{k-1} + Σ_{src∈S_k} s_{k,src} · a[src])   # shortcuts
    output    x'     = x + α · sigmoid(G(norm(z_K))) ⊙ Up(norm(z_K))       # x: anchor state
    logits           = W_pred(x')
    experts   logits = (1 − Σ_e β_e) · W_pred(x') + Σ_e β_e · log_softmax(W_e h_e),  β = Linear(z_K)
    write_at  x'     = Upper_L(h[anchor, L] + α · g ⊙ Δx)   # the anchor's layers above L

This file imports torch and transformers only: it runs where compose is not installed. It
restates compose's forward (composer/model: carry_on.py, mixture.py, experts.py, upper.py) with
the same parameter names and the same operations in the same order; compose loads every export
it writes back through this file and refuses it unless the logits match its own.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_compose_mixture import ComposeMixtureConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Per carry-on block: (keys, values), each (B, n_head, T_past, head_dim).
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
    """Boolean mask (B or 1, 1, q_len, k_len): True where a query may attend. Queries are the
    last `q_len` of `k_len` positions; padded keys are masked out, but a padded query keeps its
    own key so no softmax row is empty."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    mask = torch.arange(k_len, device=device)[None, :] <= rows  # (q_len, k_len)
    mask = mask[None, None]
    if key_padding is not None:
        keep = key_padding.bool()[:, None, None, :]  # (B, 1, 1, k_len)
        diag = torch.arange(k_len, device=device)[None, :] == rows
        mask = (mask & keep) | diag[None, None]
    return mask


def module_key(source: str) -> str:
    # ModuleDict keys may not contain '.', and '@' reads badly in state-dict names.
    return source.replace("@", "_at_").replace(".", "_")


class CarryOn(nn.Module):
    """Taps → router → blocks with shortcuts → gated, rescaled correction of the anchor state."""

    def __init__(
        self, spec: dict[str, Any], tap_dims: dict[str, int], anchor_dim: int, experts: list[str]
    ) -> None:
        super().__init__()
        self.sources = list(tap_dims)
        self.expert_taps = list(experts)
        d = int(spec["width"])
        self.tap_norms = nn.ModuleDict({module_key(s): RMSNorm(n) for s, n in tap_dims.items()})
        self.tap_projs = nn.ModuleDict(
            {module_key(s): nn.Linear(n, d) for s, n in tap_dims.items()}
        )
        n_src = len(self.sources)
        self.router_kind = spec["router"]
        if self.router_kind == "anchor":
            self.router_norm = RMSNorm(anchor_dim)
            self.router_query = nn.Linear(anchor_dim, n_src, bias=False)
            self.router_scorers = nn.Parameter(torch.zeros(n_src, d))
        else:
            self.router = nn.Linear(d, 1)
        self.router_bias = nn.Parameter(torch.zeros(n_src))
        heads, mlp_hidden, theta = int(spec["heads"]), int(spec["mlp_hidden"]), spec["rope_theta"]
        self.blocks = nn.ModuleList(
            Block(d, heads, mlp_hidden, float(theta)) for _ in spec["blocks"]
        )
        self.shortcuts = [list(b) for b in spec["blocks"]]
        self.shortcut_scales = nn.ParameterList(
            nn.Parameter(torch.ones(len(b))) for b in spec["blocks"]
        )
        self.out_norm = RMSNorm(d)
        self.up = nn.Linear(d, anchor_dim, bias=False)
        self.gate = nn.Linear(d, anchor_dim) if spec["gate"] == "elementwise" else None
        self.expert_weights = nn.Linear(d, len(experts)) if experts else None
        if spec["alpha_learnable"]:
            self.alpha = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("alpha", torch.tensor(1.0))

    def forward(
        self,
        taps: dict[str, torch.Tensor],
        anchor_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KVCache]:
        """The corrected anchor state (B, T, D_anchor), the experts' β (B, T, n_experts) or
        None, and the blocks' KV cache. `attention_mask` (B, T_past + T) marks real tokens;
        `positions` (B, T) are the rotary positions where left padding shifts them, by default
        T_past onward."""
        dtype = self.up.weight.dtype
        a = {}
        for s in self.sources:
            key = module_key(s)
            a[s] = self.tap_projs[key](self.tap_norms[key](taps[s].to(dtype)))
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
        betas = self.expert_weights(z) if self.expert_weights is not None else None
        return hidden, betas, cache

    def route(self, stacked: torch.Tensor, anchor_hidden: torch.Tensor) -> torch.Tensor:
        """Source weights (B, T, n_src) from the projected taps (B, T, n_src, d)."""
        if self.router_kind == "anchor":
            query = self.router_query(self.router_norm(anchor_hidden.to(stacked.dtype)))
            scores = query + torch.einsum("btsd,sd->bts", stacked, self.router_scorers)
        else:
            scores = self.router(stacked).squeeze(-1)
        return (scores + self.router_bias).softmax(dim=-1)


class _StopForward(Exception):
    """Raised by a hook once every tapped layer is captured, to skip the rest of a base."""


_CACHE_KEYWORDS: dict[type, str] = {}


def _cache_keyword(module: nn.Module) -> str:
    """What this transformers calls a forward's KV cache argument (`cache` in later 5.x)."""
    kind = type(module)
    if kind not in _CACHE_KEYWORDS:
        parameters = inspect.signature(kind.forward).parameters
        _CACHE_KEYWORDS[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_KEYWORDS[kind]


def run_base(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: list[int],
    need_final: bool,
    cache: Any,
    positions: torch.Tensor | None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """A base's states at `layers` (layer -> (B, T, D)) and, with `need_final`, its final state.

    Layer 0 is the embedding output, layer i the raw output of decoder layer i, layer N the
    final norm's output (the tensor the LM head reads). Without `need_final` the forward stops
    after the highest tapped layer; a cache is filled only for the layers that ran."""
    decoder = model.get_decoder()
    n_layers = model.config.get_text_config().num_hidden_layers
    captured: dict[int, torch.Tensor] = {}
    wanted = set(layers) | ({n_layers} if need_final else set())
    stop_at = None if need_final else max(wanted)

    def tap_module(layer: int) -> nn.Module:
        if layer == 0:
            return decoder.embed_tokens
        if layer == n_layers:
            return decoder.norm
        return decoder.layers[layer - 1]

    def hook_for(layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == stop_at:
                raise _StopForward

        return hook

    handles = [tap_module(layer).register_forward_hook(hook_for(layer)) for layer in wanted]
    device = decoder.embed_tokens.weight.device
    kwargs = {_cache_keyword(decoder): cache}
    try:
        decoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device) if attention_mask is not None else None,
            use_cache=cache is not None,
            position_ids=positions.to(device) if positions is not None else None,
            **kwargs,
        )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer] for layer in layers}, captured.get(n_layers)


class UpperLayers:
    """The anchor's decoder layers above `write_at`, its final norm and rotary embedding: they
    carry the corrected state after layer L to the head, continuing the anchor's KV cache at
    their own layer indices. Not a submodule: their weights are the anchor's own."""

    def __init__(self, decoder: Any, layer: int) -> None:
        self.layers: list[Any] = list(decoder.layers[layer:])
        self.norm: Any = decoder.norm
        self.rotary: Any = decoder.rotary_emb

    def __call__(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = hidden.shape
        past = cache.get_seq_length(self.layers[0].self_attn.layer_idx) if cache is not None else 0
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        x = hidden.to(device, dtype)
        if positions is None:
            positions = torch.arange(past, past + T, device=device)[None].expand(B, T)
        positions = positions.to(device)
        padding = attention_mask.to(device) if attention_mask is not None else None
        allowed = causal_mask(T, past + T, padding, device)
        # Additive, as every attention implementation reads a float mask.
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
        embeddings = self.rotary(x, positions)
        for layer in self.layers:
            kwargs = {_cache_keyword(layer): cache}
            out = layer(
                x,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                position_embeddings=embeddings,
                **kwargs,
            )
            x = out[0] if isinstance(out, tuple) else out
        return self.norm(x)


class MixtureCache:
    """The caches of one generation: each base's KV cache over the anchor's ids, the carry-on's,
    and the padding mask (None until a padded position is fed). Not a transformers `Cache`:
    generate only carries it from one step to the next, and reads its length."""

    is_compileable = False
    is_croppable = False

    def __init__(self, bases: dict[str, Any]) -> None:
        self.bases = bases
        self.carry_on: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, length)
        self.length = 0  # positions fed so far, padding included

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows `beam_idx` names, in its order (beam search)."""
        for cache in self.bases.values():
            cache.reorder_cache(beam_idx)
        if self.carry_on is not None:
            self.carry_on = [
                (k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
                for k, v in self.carry_on
            ]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, beam_idx.to(self.mask.device))


def _new_kv_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # a transformers whose DynamicCache takes no config
        return DynamicCache()


def _head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """A base's own LM head on `hidden`, in float32 (with final soft-capping where set)."""
    head = model.get_output_embeddings()
    logits = F.linear(hidden.to(head.weight.device, head.weight.dtype), head.weight, head.bias)
    logits = logits.float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class ComposeMixtureForCausalLM(PreTrainedModel, GenerationMixin):
    """Bases (each the transformers model it is alone, child module `base_<name>`), the carry-on
    (`carry_on`), and the anchor's head as the output."""

    config_class = ComposeMixtureConfig
    base_model_prefix = "mixture"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: ComposeMixtureConfig) -> None:
        super().__init__(config)
        self.base_names = list(config.bases)
        configs = {}
        for name, data in config.bases.items():
            data = dict(data)
            configs[name] = AutoConfig.for_model(data.pop("model_type"), **data)
            self.add_module(f"base_{name}", AutoModelForCausalLM.from_config(configs[name]))
        self.tapped = {  # base -> its tapped layers
            name: sorted({int(t.split("@")[1]) for t in config.taps if t.split("@")[0] == name})
            for name in self.base_names
        }
        spec = config.carry_on
        experts = [f"{e}@{configs[e].get_text_config().num_hidden_layers}" for e in spec["experts"]]
        tap_dims = {t: configs[t.split("@")[0]].get_text_config().hidden_size for t in config.taps}
        anchor_dim = configs[config.anchor].get_text_config().hidden_size
        self.carry_on = CarryOn(spec, tap_dims, anchor_dim, experts)
        self.experts = list(spec["experts"])
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # one cache per base and the carry-on's: `MixtureCache`, made in forward

    def base(self, name: str) -> Any:
        return self.get_submodule(f"base_{name}")

    def get_input_embeddings(self) -> nn.Module:
        return self.base(self.config.anchor).get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None  # the head is the anchor's (and the experts'), inside their own modules

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the checkpoint; the bases initialize their own buffers."""

    def restore_dtypes(self) -> ComposeMixtureForCausalLM:
        """Each base's weights in the dtype it ran in when the mixture was trained; the carry-on
        float32. Buffers keep the dtype they were built in (rotary frequencies are float32, as
        a base loaded alone in half precision keeps them: cast, every position rounds)."""
        for name in self.base_names:
            dtype = DTYPES[self.config.base_dtypes.get(name, "float32")]
            for parameter in self.base(name).parameters():
                parameter.data = parameter.data.to(dtype)
        self.carry_on.float()
        return self

    def realign(self) -> ComposeMixtureForCausalLM:
        """Every weight in memory of its own: tensors read from a safetensors file may start at
        any byte, and a matmul over an unaligned tensor takes other kernels, which round
        otherwise than over the same tensor freshly allocated (as compose holds it)."""
        with torch.no_grad():
            for tensor in (*self.parameters(), *self.buffers()):
                if tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
        return self

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().from_pretrained(*args, **kwargs)
        if kwargs.get("dtype", kwargs.get("torch_dtype")) in (None, "auto"):
            model.restore_dtypes()
        return model.realign()

    def new_cache(self) -> MixtureCache:
        return MixtureCache(
            {name: _new_kv_cache(self.base(name).config) for name in self.base_names}
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """The tokens the cache has not seen yet, the whole attention mask and the cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "attention_mask": kwargs.get("attention_mask"),
            "cache": cache,
            "use_cache": kwargs.get("use_cache", True),
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MixtureCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        past_key_values: MixtureCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab), float32, of the new tokens `input_ids` (B, T).

        `attention_mask` (B, T_past + T) is 0 at padding (a batch is padded on the left for
        generation); with `use_cache` (or a `cache` to continue) the returned output carries the
        `MixtureCache`, and the next call feeds only the tokens after it. With `labels` (B, T;
        -100 where not scored) the output's `loss` is the mean next-token cross-entropy."""
        state = cache if cache is not None else past_key_values
        if state is None and use_cache:
            state = self.new_cache()
        B, T = input_ids.shape
        new = attention_mask[:, -T:] if attention_mask is not None else None
        if state is not None:
            fed = new if new is not None else torch.ones_like(input_ids)
            if state.mask is not None or not bool(fed.all()):
                before = state.mask if state.mask is not None else fed.new_ones(B, state.length)
                state.mask = torch.cat([before, fed.to(before.device)], dim=1)
            state.length += T
            mask = state.mask
        elif attention_mask is not None and not attention_mask.all():
            mask = attention_mask
        else:
            mask = None
        positions = None
        if mask is not None:  # padding: count real tokens only
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        taps, anchor_hidden = self._features(input_ids, mask, state, positions)
        if mask is not None and new is not None:  # padded positions: zeros, never a base's
            keep = new.bool()[..., None].to(anchor_hidden.device)
            anchor_hidden = torch.where(keep, anchor_hidden, 0.0)
            taps = {k: torch.where(keep, v, 0.0) for k, v in taps.items()}
        logits = self._logits(taps, anchor_hidden, mask, state, positions, logits_to_keep)
        output: dict[str, Any] = {"logits": logits}
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            output["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
        names = {f.name for f in fields(CausalLMOutputWithPast)}
        output["cache" if "cache" in names else "past_key_values"] = state
        return CausalLMOutputWithPast(**output)

    def _features(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        state: MixtureCache | None,
        positions: torch.Tensor | None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every base on the anchor's ids: the tapped states ("base@layer" -> (B, T, D_b)) and
        the anchor's state the carry-on corrects, float32 where the carry-on is. With
        `write_at` the anchor stops at that layer; its upper layers run in `_logits`."""
        device = self.carry_on.up.weight.device
        taps: dict[str, torch.Tensor] = {}
        anchor_hidden = None
        write = self.config.write_at
        for name in self.base_names:
            is_anchor = name == self.config.anchor
            final = is_anchor and write is None
            past = state.bases[name] if state is not None else None
            states, last = run_base(
                self.base(name), input_ids, mask, self.tapped[name], final, past, positions
            )
            for layer, hidden in states.items():
                taps[f"{name}@{layer}"] = hidden.to(device, torch.float32)
            if is_anchor:
                anchor_hidden = last if final else states[write]
        assert anchor_hidden is not None
        return taps, anchor_hidden.to(device, torch.float32)

    def _logits(
        self,
        taps: dict[str, torch.Tensor],
        anchor_hidden: torch.Tensor,
        mask: torch.Tensor | None,
        state: MixtureCache | None,
        positions: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        write = self.config.write_at
        anchor = self.base(self.config.anchor)
        x = taps[f"{self.config.anchor}@{write}"] if write is not None else anchor_hidden
        past = state.carry_on if state is not None else None
        corrected, betas, kv = self.carry_on(taps, x, mask, past, positions)
        if state is not None:
            state.carry_on = kv
        if write is not None:
            upper = UpperLayers(anchor.get_decoder(), write)
            anchor_cache = state.bases[self.config.anchor] if state is not None else None
            out = upper(corrected, mask, anchor_cache, positions)
            corrected = out.to(corrected.device, corrected.dtype)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        x = corrected[:, keep]
        if betas is None:
            return _head_logits(anchor, x)
        betas = betas[:, keep].float()
        logits = (1 - betas.sum(dim=-1, keepdim=True)) * _head_logits(anchor, x)
        for j, (name, tap) in enumerate(zip(self.experts, self.carry_on.expert_taps, strict=True)):
            expert = _head_logits(self.base(name), taps[tap][:, keep].to(x.dtype))
            logits = logits + betas[..., j : j + 1] * expert.log_softmax(dim=-1)
        return logits

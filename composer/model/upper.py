"""The anchor's layers above the one a carry-on writes into (`carry_on.write_at`).

With `write_at: L` the correction is added to the anchor's residual stream after its layer L,

    h'_L = h_L + α · g ⊙ Δ          x' = norm(layer_N(… layer_{L+1}(h'_L)))

and the anchor's own upper layers carry it to its head, as a LoRA's change inside the anchor is
carried. They stay frozen (no gradient to their weights), but training runs them, so the
gradient reaches the carry-on through them: a step costs their forward and backward, and
memory holds their weights beside the carry-on. The states below L are still read from the
feature cache.

The layers are run one by one, as the decoder's own forward runs them (rotary embedding, an
explicit causal mask that also hides padding), so a generation's KV cache continues in the same
cache object the anchor's lower layers fill: each attention writes at its own layer index.
"""

from __future__ import annotations

from typing import Any

import torch

from composer.model.carry_on import causal_mask


class UpperLayers:
    """The anchor's decoder layers L..N-1 (0-based, so the first is the layer above tap L), its
    final norm and its rotary embedding; not a submodule of anything a checkpoint holds."""

    def __init__(self, decoder: Any, layer: int) -> None:
        self.layers: list[Any] = list(decoder.layers[layer:])
        self.norm: Any = decoder.norm
        self.rotary: Any = decoder.rotary_emb

    def to(self, device: torch.device) -> UpperLayers:
        for module in (*self.layers, self.norm, self.rotary):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def __call__(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The anchor's final state (B, T, D) from its corrected state after layer L.

        `attention_mask` (B, T_past + T) marks real tokens (padding left or right); `cache`, a
        generation's KV cache of the anchor, is continued in place; `positions` (B, T) are the
        rotary positions (left padding counts only real tokens), by default T_past onward.
        """
        B, T, _ = hidden.shape
        past = cache.get_seq_length(self.layers[0].self_attn.layer_idx) if cache is not None else 0
        device = self.device
        x = hidden.to(device, self.dtype)
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
            out = layer(
                x,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=embeddings,
            )
            x = out[0] if isinstance(out, tuple) else out
        return self.norm(x)

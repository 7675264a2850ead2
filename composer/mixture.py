"""A mixture: frozen bases plus the carry-on, with the anchor's LM head as the output path.

    logits = W_pred(x + α · g ⊙ Δx)      x: the anchor's final (post-norm) hidden state

The bases are held in a plain dict, not registered as submodules, so the mixture's state is the
carry-on's and nothing else: checkpoints hold exactly the trainable keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from composer.carry_on import CarryOn, KVCache
from composer.frozen import FrozenBase, load_base
from composer.plan import check_compatible
from composer.recipe import Recipe


@dataclass
class Features:
    """What the frozen bases contribute: tapped states and the anchor's final state."""

    taps: dict[str, torch.Tensor]  # "base@layer" -> (B, T, D_b)
    anchor_hidden: torch.Tensor  # (B, T, D_anchor)


@dataclass
class GenerationState:
    base_past: dict[str, Any]
    carry_on_past: KVCache | None
    length: int


class Mixture:
    def __init__(self, recipe: Recipe, bases: dict[str, FrozenBase], carry_on: CarryOn) -> None:
        self.recipe = recipe
        self.bases = bases
        self.carry_on = carry_on
        self.anchor = bases[recipe.anchor]
        self._layers = {
            name: sorted({t.layer for t in recipe.tap_refs if t.base == name}) for name in bases
        }

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, fetch: bool = True, seed: int = 0) -> Mixture:
        """Load every base frozen, check they fit the recipe, and make a fresh carry-on."""
        bases = {name: load_base(name, spec, fetch=fetch) for name, spec in recipe.bases.items()}
        check_compatible(recipe, {name: b.folder for name, b in bases.items()})
        torch.manual_seed(seed)
        tap_dims = {str(t): bases[t.base].hidden_size for t in recipe.tap_refs}
        carry_on = CarryOn(recipe.carry_on, tap_dims, bases[recipe.anchor].hidden_size)
        return cls(recipe, bases, carry_on)

    @property
    def tokenizer(self) -> Any:
        return self.anchor.tokenizer

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: GenerationState | None = None,
    ) -> Features:
        """Run every base (no grad) on the same token ids; with `state`, continue its caches."""
        taps: dict[str, torch.Tensor] = {}
        anchor_hidden = None
        for name, base in self.bases.items():
            is_anchor = name == self.recipe.anchor
            if not self._layers[name] and not is_anchor:
                continue
            past = state.base_past.get(name) if state is not None else None
            out = base.forward(input_ids, attention_mask, self._layers[name], is_anchor, past)
            if state is not None:
                state.base_past[name] = out.past_key_values
            for layer, hidden in out.taps.items():
                taps[f"{name}@{layer}"] = hidden.float()
            if is_anchor:
                anchor_hidden = out.final
        assert anchor_hidden is not None
        return Features(taps=taps, anchor_hidden=anchor_hidden.float())

    def hidden(
        self,
        features: Features,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """The corrected anchor state, the router's source weights and the carry-on's cache."""
        out = self.carry_on(features.taps, features.anchor_hidden, attention_mask, past)
        return out.hidden, out.source_weights, out.cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.anchor.logits(hidden)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence logits (B, T, vocab) of the mixture."""
        features = self.features(input_ids, attention_mask)
        hidden, _, _ = self.hidden(features, attention_mask)
        return self.logits(hidden)

    def new_state(self) -> GenerationState:
        from transformers import DynamicCache

        past = {
            name: DynamicCache(config=base.model.config)
            for name, base in self.bases.items()
            if self._layers[name] or name == self.recipe.anchor
        }
        return GenerationState(base_past=past, carry_on_past=None, length=0)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: GenerationState) -> tuple[torch.Tensor, Any]:
        """Feed new tokens (B, T_new) through every cache; return last-position logits."""
        features = self.features(input_ids, None, state)
        hidden, weights, cache = self.hidden(features, None, state.carry_on_past)
        state.carry_on_past = cache
        state.length += input_ids.shape[1]
        return self.logits(hidden[:, -1]), weights

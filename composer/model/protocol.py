"""What running a mixture needs of it: the seam between the model and its users.

The decoder, compare's scorers, the chat, the server and lm-eval take a `Mixture`; a
`composer.model.mixture.LiveMixture` (bases loaded, run live) is the one the product builds.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from composer.model.carry_on import CarryOn, KVCache
from composer.model.head import OutputHead
from composer.model.mixture import Features, GenerationState
from composer.recipe import Recipe


class Mixture(Protocol):
    """A mixture that can be scored and decoded: its recipe, the anchor's tokenizer, the
    carry-on (its `sources` name the router's columns) and the forward in its three pieces."""

    recipe: Recipe
    carry_on: CarryOn

    @property
    def tokenizer(self) -> Any: ...

    @property
    def context_length(self) -> int | None:
        """The anchor's longest sequence, where its config states one."""
        ...

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: GenerationState | None = None,
        anchor_final: bool = True,
    ) -> Features: ...

    def hidden(
        self,
        features: Features,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]: ...

    @property
    def head(self) -> OutputHead:
        """What reads the rows `hidden` gives (the anchor's LM head, fused with experts')."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_state(self) -> GenerationState: ...

    def step(
        self,
        input_ids: torch.Tensor,
        state: GenerationState,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

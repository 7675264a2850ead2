"""How the next token is chosen from the mixture's logits: greedy, or sampled.

Sampling follows the usual order (as transformers' logits processors): repetition penalty
(CTRL, arXiv 1909.05858 §4.1), temperature, top-k, top-p (nucleus, arXiv 1904.09751 §3.1).
Draws come from one seeded CPU generator, so a seed gives the same text on any device.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    """How to pick each token. `temperature: 0` is greedy (the other fields but the
    repetition penalty then have no effect)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0 picks the likeliest token."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Keep the likeliest tokens up to p."
    )
    top_k: int = Field(default=0, ge=0, description="Keep the k likeliest tokens; 0 keeps all.")
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0, description="Above 1 discourages tokens already seen."
    )
    seed: int | None = Field(default=None, ge=0, description="The same seed gives the same text.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenChooser:
    """Picks tokens one at a time for one generation (it owns the random generator)."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor, seen: Collection[int]) -> int:
        """The next token from last-position logits ((1, vocab) or (vocab,))."""
        s = self.sampling
        scores = logits.reshape(-1).float()
        if s.repetition_penalty != 1.0 and seen:
            index = torch.tensor(sorted(set(seen)), device=scores.device)
            picked = scores[index]
            penalised = torch.where(
                picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty
            )
            scores = scores.index_copy(0, index, penalised)
        if s.greedy:
            return int(scores.argmax())
        scores = (scores / s.temperature).cpu()
        if 0 < s.top_k < scores.numel():
            kth = torch.topk(scores, s.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            # Drop a token once the ones before it already hold top_p; the first always stays.
            drop = cumulative - torch.softmax(ordered, dim=-1) >= s.top_p
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

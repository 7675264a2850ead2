"""How the next token is chosen from the mixture's logits: greedy, or sampled.

Sampling follows the usual order (as transformers' logits processors): repetition penalty
(CTRL, arXiv 1909.05858 §4.1), temperature, top-k, top-p (nucleus, arXiv 1904.09751 §3.1).
Draws come from one seeded CPU generator, so a seed gives the same text on any device.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# The ranges in which every value decodes. Scores are divided by the temperature and by (or
# multiplied with) the repetition penalty in float32: near 1e-37 a logit of 30 overflows to inf
# and the softmax gives NaN. These bounds keep a wide margin (below 1e-5 vLLM samples greedily:
# the answer no longer differs); a torch generator's seed is 64 bits.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0
SEED_BOUND = 2**64


def _temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value:g}")
    return value


# 0, or a temperature the scores can be divided by; each user sets its own upper bound
Temperature = Annotated[float, Field(ge=0.0), AfterValidator(_temperature)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)]
Seed = Annotated[int, Field(ge=0, lt=SEED_BOUND)]


class Sampling(BaseModel):
    """How to pick each token. `temperature: 0` is greedy (the other fields but the
    repetition penalty then have no effect)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: Temperature = Field(
        default=0.0, le=100.0, description="0 picks the likeliest token."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Keep the likeliest tokens up to p."
    )
    top_k: int = Field(
        default=0,
        ge=0,
        description="Keep the k likeliest tokens; 0 (or k >= the vocabulary) keeps all.",
    )
    repetition_penalty: RepetitionPenalty = Field(
        default=1.0, description="Above 1 discourages tokens already seen."
    )
    seed: Seed | None = Field(default=None, description="The same seed gives the same text.")

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
            # Drop a token once the ones before it already hold top_p; the first always stays
            # (also where a top_p below float32's range compares as 0).
            drop = cumulative - torch.softmax(ordered, dim=-1) >= s.top_p
            drop[0] = False
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # the logits themselves held NaN or inf
            raise ValueError("the logits give no finite probabilities to sample from")
        return int(torch.multinomial(probs, 1, generator=self.generator))

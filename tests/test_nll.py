"""The one scorer of text, `composer.model.likelihood.nll`, held to computations it does not
share code with: cross-entropy over the mixture's whole logits, and the anchor's own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import recipe_yaml
from transformers import AutoModelForCausalLM

from composer.features.data import IGNORE, Example, collate, pad_id
from composer.model.likelihood import nll
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe

TEXTS = [
    "He works 6 * 2 = 12 days a month, so he earns 195 * 12 = 2340 a month.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture()
def mixture(tiny, write_recipe) -> LiveMixture:
    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    return LiveMixture.from_recipe(
        load_recipe(write_recipe(recipe_yaml(bases, "a", ["a@1", "b@2"])))
    )


def _batch(mixture: LiveMixture) -> dict[str, torch.Tensor]:
    """Two right-padded examples, the first with its first five targets ignored."""
    examples = []
    for i, text in enumerate(TEXTS):
        ids = mixture.tokenizer(text)["input_ids"]
        skip = 5 if i == 0 else 0
        examples.append(Example(input_ids=ids, labels=[IGNORE] * skip + ids[skip:]))
    assert len(examples[0].input_ids) != len(examples[1].input_ids)  # one row is padded
    return collate(examples, pad_id(mixture.tokenizer))


def test_nll_is_cross_entropy_over_the_mixtures_full_logits(mixture):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a carry-on whose correction is not zero
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    batch = _batch(mixture)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        hidden, _, _ = mixture.hidden(mixture.features(ids, mask, anchor_final=False), mask)
        got = nll(mixture.head, hidden[:, :-1], labels[:, 1:])
        logits = mixture(ids, mask)[:, :-1]  # (B, T - 1, vocab)
        expected = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),  # (B * (T - 1), vocab)
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        anchor_rows = mixture.anchor_rows(mixture.features(ids, mask))
        anchor = nll(mixture.head, anchor_rows[:, :-1], labels[:, 1:])
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert abs(float(got) - float(anchor)) > 1e-2  # the correction is scored
    # Row by row, the sums add up to the batch's; a row without targets scores zero.
    rows = [nll(mixture.head, hidden[r, :-1], labels[r, 1:]) for r in range(2)]
    torch.testing.assert_close(sum(rows), got, rtol=1e-6, atol=1e-5)
    none = torch.full_like(labels[0, 1:], IGNORE)
    assert float(nll(mixture.head, hidden[0, :-1], none)) == 0.0


def test_untrained_mixture_scores_as_its_anchor(tiny, mixture):
    batch = _batch(mixture)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with torch.no_grad():
        hidden, _, _ = mixture.hidden(mixture.features(ids, mask, anchor_final=False), mask)
        got = nll(mixture.head, hidden[:, :-1], labels[:, 1:])
        # transformers' own loss: the mean over the targets it shifts out of `labels`
        mean = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    count = int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(got, mean * count, rtol=1e-5, atol=1e-4)

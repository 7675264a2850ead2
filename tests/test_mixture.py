"""The model's invariants on tiny real bases: taps, step-0 identity, caches, frozen bases."""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_yaml
from transformers import AutoModelForCausalLM

from composer.bases.frozen import load_base
from composer.errors import RecipeError
from composer.generation.decode import generate_ids
from composer.model.mixture import LiveMixture
from composer.recipe import BaseSpec, load_recipe


def _ids(mixture: LiveMixture, text: str) -> torch.Tensor:
    return torch.tensor([mixture.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_taps_equal_output_hidden_states(tiny, family):
    base = load_base(family, BaseSpec(path=str(tiny[family])))
    reference = AutoModelForCausalLM.from_pretrained(tiny[family])
    ids = torch.tensor([base.tokenizer("He works 6 * 2 = 12 days a month")["input_ids"]])
    layers = list(range(base.num_layers + 1))
    ours = base.forward(ids, None, layers, need_final=True)
    with torch.no_grad():
        theirs = reference(ids, output_hidden_states=True).hidden_states
    assert len(theirs) == base.num_layers + 1
    for layer in layers:
        torch.testing.assert_close(ours.taps[layer], theirs[layer], rtol=0, atol=0)
    # The last entry is already through the final norm: the tensor the LM head reads.
    torch.testing.assert_close(ours.final, theirs[-1], rtol=0, atol=0)


def test_early_stop_gives_same_taps(tiny):
    base = load_base("q", BaseSpec(path=str(tiny["qwen2"])))
    ids = torch.tensor([base.tokenizer("def add(a, b): return a + b")["input_ids"]])
    full = base.forward(ids, None, [1, 2], need_final=True)
    early = base.forward(ids, None, [1, 2], need_final=False)
    assert early.final is None
    for layer in (1, 2):
        torch.testing.assert_close(early.taps[layer], full.taps[layer], rtol=0, atol=0)


def test_untrained_mixture_equals_anchor(tiny, write_recipe):
    path = write_recipe(
        recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2", "a@3"])
    )
    mixture = LiveMixture.from_recipe(load_recipe(path))
    reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    ids = _ids(mixture, "Robert has a bag of pebbles with 72 inside.")
    with torch.no_grad():
        expected = reference(ids).logits
        got = mixture(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _trained_mixture(tiny, write_recipe) -> LiveMixture:
    path = write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@4"]))
    mixture = LiveMixture.from_recipe(load_recipe(path), seed=1)
    with torch.no_grad():  # a carry-on that actually changes the logits
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mixture


def test_cached_generation_equals_uncached(tiny, write_recipe):
    mixture = _trained_mixture(tiny, write_recipe)
    prompt = mixture.tokenizer("If he gets paid 195 every day")["input_ids"]
    with_cache = generate_ids(mixture, prompt, 12, use_cache=True)
    without = generate_ids(mixture, prompt, 12, use_cache=False)
    assert with_cache == without
    assert len(with_cache) > 3


def test_step_logits_match_full_forward(tiny, write_recipe):
    mixture = _trained_mixture(tiny, write_recipe)
    ids = _ids(mixture, "The quick brown fox jumps over the lazy dog")
    full = mixture(ids)
    state = mixture.new_state()
    mixture.step(ids[:, :5], state)
    for t in range(5, ids.shape[1]):
        logits, _ = mixture.step(ids[:, t : t + 1], state)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_real_positions(tiny, write_recipe):
    mixture = _trained_mixture(tiny, write_recipe)
    short = _ids(mixture, "He works 6 days")
    pad = torch.full((1, 4), mixture.tokenizer.pad_token_id)
    padded = torch.cat([short, pad], dim=1)
    mask = torch.cat([torch.ones_like(short), torch.zeros_like(pad)], dim=1)
    alone = mixture(short)
    batched = mixture(padded, mask)[:, : short.shape[1]]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_layer_out_of_range(tiny, write_recipe):
    path = write_recipe(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@9"]))
    with pytest.raises(RecipeError, match=r"taps.1: layer 9 out of range for base 'a' \(it has 3"):
        LiveMixture.from_recipe(load_recipe(path))

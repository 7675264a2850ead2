"""The one decoder: greedy and seeded sampling, streaming text, stop strings, KV caches."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import recipe_yaml
from transformers import AutoTokenizer

from composer.generation.decode import Generation, generate_ids, prompt_ids
from composer.generation.detokenize import TextStream
from composer.generation.sampling import Sampling, TokenChooser
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe

HOT = Sampling(temperature=1.5, seed=0)


@pytest.fixture(scope="module")
def mixture(tiny, tmp_path_factory) -> LiveMixture:
    """Two bases, one tokenizer, a carry-on perturbed so the correction is not zero."""
    path = tmp_path_factory.mktemp("generate") / "recipe.yaml"
    path.write_text(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))
    mixture = LiveMixture.from_recipe(load_recipe(path), seed=1)
    with torch.no_grad():
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mixture


def _ids(mixture: LiveMixture) -> list[int]:
    return prompt_ids(mixture, "How many days does he work?")


def _run(mixture: LiveMixture, n: int = 24, **kwargs) -> Generation:
    return Generation(mixture, _ids(mixture), n, **kwargs).run()


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(mixture):
    first = _run(mixture, sampling=HOT, stop_at_eos=False)
    again = _run(mixture, sampling=HOT, stop_at_eos=False)
    other = _run(mixture, sampling=HOT.model_copy(update={"seed": 1}), stop_at_eos=False)
    assert first.ids == again.ids and first.text == again.text
    assert len(first.ids) == 24 and first.finish_reason == "length"
    assert other.ids != first.ids


def test_temperature_towards_zero_is_greedy(mixture):
    greedy = _run(mixture, stop_at_eos=False)
    assert greedy.ids == _run(mixture, sampling=Sampling(temperature=0), stop_at_eos=False).ids
    for near in (Sampling(temperature=1e-4, seed=3), Sampling(temperature=1.0, top_k=1, seed=3)):
        assert _run(mixture, sampling=near, stop_at_eos=False).ids == greedy.ids
    # and sampling proper does leave the greedy path
    assert _run(mixture, sampling=HOT, stop_at_eos=False).ids != greedy.ids


def test_cached_generation_equals_uncached(mixture):
    for sampling in (None, HOT):
        cached = _run(mixture, 16, sampling=sampling, stop_at_eos=False)
        uncached = _run(mixture, 16, sampling=sampling, stop_at_eos=False, use_cache=False)
        assert cached.ids == uncached.ids
    ids = generate_ids(mixture, _ids(mixture), 16)
    assert ids == generate_ids(mixture, _ids(mixture), 16, use_cache=False)


def test_cached_forwards_pass_no_deprecated_transformers_argument(mixture):
    """transformers warns (FutureWarning) on a renamed argument it will remove in a later
    version (`past_key_values`): no forward of a cached generation may pass one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert len(_run(mixture, 4, stop_at_eos=False).ids) == 4


def test_streamed_deltas_are_the_text_and_keep_characters_whole(mixture, tiny):
    # Hot sampling over a byte-level vocabulary emits stray multi-byte sequences.
    hot = Sampling(temperature=5.0, seed=7)
    generation = Generation(mixture, _ids(mixture), 64, sampling=hot, stop_at_eos=False)
    deltas = list(generation)
    assert all(deltas)
    full = mixture.tokenizer.decode(generation.ids, skip_special_tokens=True)
    assert "".join(deltas) == generation.text == full

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    text = "añb — 42 € 😀 days ünïcode"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the tiny vocabulary splits these characters into bytes
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "😀" in pieces or any("😀" in p for p in pieces)


def test_stop_strings_cut_exactly(mixture):
    full = _run(mixture, 40, stop_at_eos=False).text
    assert len(full) > 12
    stop = full[7:10]  # spans whatever tokens make it up
    cut = _run(mixture, 40, stop_at_eos=False, stop=[stop, "never appears"])
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_stop_strings_hold_back_what_might_start_one(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    text = "He works 6 days. He works more. #### 42 then more"
    stream = TextStream(tokenizer, stop=["#### 4", "works more!"])
    shown = [stream.push(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert stream.stopped and "".join(shown) == stream.text == "He works 6 days. He works more. "
    assert not any("#" in piece for piece in shown)  # never shown, then taken back
    # a possible start that does not become a stop comes out with the next tokens
    stream = TextStream(tokenizer, stop=["works more!"])
    shown = [stream.push(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(shown) + stream.finish() == text and not stream.stopped


def test_stop_checks_do_not_grow_with_the_output(tiny):
    """Each token decodes a few tokens, never the whole output."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 40)["input_ids"]
    longest = 0

    class Counting:
        def decode(self, ids, **kwargs):
            nonlocal longest
            longest = max(longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    stream = TextStream(Counting(), stop=["lazy cat", "zebra"])
    for token in ids:
        stream.push(token)
    assert len(ids) > 300 and longest <= 4


def test_repetition_penalty_and_top_p():
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert TokenChooser(Sampling())(logits, [0]) == 0
    assert TokenChooser(Sampling(repetition_penalty=2.0))(logits, [0]) == 1
    # top_p that only the likeliest token reaches leaves it alone
    picks = {
        TokenChooser(Sampling(temperature=1, top_p=0.3, seed=s))(logits, []) for s in range(20)
    }
    assert picks == {0}
    picks = {TokenChooser(Sampling(temperature=3, seed=s))(logits, []) for s in range(40)}
    assert picks == {0, 1, 2}


def test_bad_sampling_settings_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="temperatur"):
        Sampling(temperatur=1.0)


def test_repetition_penalty_discourages_repeats(mixture):
    def distinct(penalty: float) -> int:
        sampling = Sampling(repetition_penalty=penalty)
        return len(set(_run(mixture, 40, sampling=sampling, stop_at_eos=False).ids))

    assert distinct(1.0) < distinct(10.0) == 40  # a strong penalty never repeats here

"""`carry_on.write_at`: the correction enters the anchor after one of its layers and the
anchor's own upper layers carry it to the head — untrained it is the anchor, training from
cached features equals the live mixture, generation's caches hold, the bases stay frozen."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recipe_yaml
from transformers import AutoModelForCausalLM

from composer.errors import RecipeError
from composer.features.data import load_splits
from composer.generation.decode import generate_ids
from composer.model.mixture import CachedMixture, LiveMixture
from composer.recipe import load_recipe
from composer.training.train import FeatureSource, token_loss, train

WRITE_AT = """
    carry_on:
      width: 32
      heads: 4
      write_at: {layer}
      blocks:
        - shortcuts: [{first}]
        - shortcuts: []
    """


def _recipe(tiny, write_recipe, anchor="llama", layer=1, taps=None, name="recipe.yaml"):
    bases = {"a": tiny[anchor], "b": tiny["qwen2" if anchor == "llama" else "llama"]}
    taps = taps or [f"a@{layer}", "b@2"]
    carry_on = WRITE_AT.format(layer=layer, first=taps[0])
    return write_recipe(recipe_yaml(bases, "a", taps, carry_on=carry_on), name)


def _perturbed(mixture, seed=1, noise=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a carry-on whose correction is far from zero
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise)
    return mixture


def _ids(mixture, text):
    return torch.tensor([mixture.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize(("anchor", "layer"), [("llama", 1), ("llama", 2), ("qwen2", 2)])
def test_untrained_mixture_writing_into_the_anchor_is_the_anchor(tiny, write_recipe, anchor, layer):
    mixture = LiveMixture.from_recipe(load_recipe(_recipe(tiny, write_recipe, anchor, layer)))
    reference = AutoModelForCausalLM.from_pretrained(tiny[anchor])
    ids = _ids(mixture, "Robert has a bag of pebbles with 72 inside.")
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(mixture(ids), expected, rtol=0, atol=1e-5)
        # and the correction does go through the upper layers once the carry-on moves
        assert not torch.allclose(_perturbed(mixture)(ids), expected, atol=1e-3)


def test_the_correction_is_the_anchor_run_from_a_changed_state(tiny, write_recipe):
    """The mixture's logits are exactly those the anchor model gives when the carry-on's
    h_L + α·g⊙Δ replaces its hidden state after layer L (a hook on the plain transformers
    model, not our code)."""
    layer = 2
    mixture = _perturbed(
        LiveMixture.from_recipe(load_recipe(_recipe(tiny, write_recipe, layer=layer)))
    )
    ids = _ids(mixture, "def add(a, b): return a + b")
    features = mixture.features(ids)
    with torch.no_grad():
        out = mixture.carry_on(features.taps, features.taps[f"a@{layer}"])
        reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
        hook = reference.model.layers[layer - 1].register_forward_hook(
            lambda _m, _i, _o: out.hidden.to(reference.dtype)
        )
        expected = reference(ids).logits
        hook.remove()
        assert not torch.allclose(expected, reference(ids).logits, atol=1e-3)
        torch.testing.assert_close(mixture(ids), expected, rtol=1e-5, atol=1e-5)


def test_generation_with_caches_equals_without_and_batches_as_alone(tiny, write_recipe):
    mixture = _perturbed(LiveMixture.from_recipe(load_recipe(_recipe(tiny, write_recipe, layer=2))))
    prompt = mixture.tokenizer("If he gets paid 195 every day")["input_ids"]
    with_cache = generate_ids(mixture, prompt, 12, use_cache=True)
    assert with_cache == generate_ids(mixture, prompt, 12, use_cache=False)
    assert len(with_cache) > 3
    # Step by step, left-padded beside a longer row: each row's logits are its full forward's.
    long = _ids(mixture, "The quick brown fox jumps over the lazy dog")[0]
    short = _ids(mixture, "He works 6 days")[0]
    pad = len(long) - len(short)
    ids = torch.stack([long, torch.cat([torch.full((pad,), 0), short])])
    mask = torch.stack(
        [torch.ones_like(long), torch.cat([torch.zeros(pad), torch.ones_like(short)])]
    )
    full = [mixture(row[None])[0] for row in (long, short)]
    state = mixture.new_state()
    mixture.step(ids[:, :-4], state, mask[:, :-4])
    for t in range(ids.shape[1] - 4, ids.shape[1]):
        logits, _ = mixture.step(ids[:, t : t + 1], state, mask[:, t : t + 1])
        torch.testing.assert_close(logits[0], full[0][t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1], full[1][t - pad], rtol=1e-4, atol=1e-4)


def test_training_from_cached_features_equals_the_live_mixture_and_moves_only_the_carry_on(
    tiny, write_recipe, tmp_path
):
    recipe = load_recipe(_recipe(tiny, write_recipe, layer=2), ["train.steps=8", "train.lr=0.01"])
    live = LiveMixture.from_recipe(recipe, seed=0)
    model = CachedMixture.from_recipe(recipe, seed=0)  # the upper layers read from the folder
    assert model.upper is not None and len(model.upper.layers) == 1
    splits = load_splits(recipe, live.tokenizer)
    source = FeatureSource(live, splits["train"], keep=True)
    held = FeatureSource(live, splits["eval"], keep=True)
    batch = source.batch(list(range(4)))
    anchor = {k: v.clone() for k, v in live.anchor.model.state_dict().items()}
    upper = {k: v.clone() for k, v in model.upper.layers[0].state_dict().items()}
    with torch.no_grad():
        before = float(token_loss(model, batch))
    train(model, source, held, recipe.train, tmp_path / "ckpt")
    with torch.no_grad():
        after = float(token_loss(model, batch))
        # the weights trained from features, in the live mixture: the same logits
        live.carry_on.load_state_dict(model.carry_on.state_dict())
        rows, _, _ = model.hidden(batch.features, batch.attention_mask)
        ids, mask = batch_ids(splits["train"][:4])
        expected = live(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(model.logits(rows)[keep], expected[keep], rtol=1e-4, atol=1e-4)
    assert after < before
    for key, value in model.upper.layers[0].state_dict().items():
        assert torch.equal(value, upper[key])  # frozen, though the gradient passed through
    for key, value in live.anchor.model.state_dict().items():
        assert torch.equal(value, anchor[key])


def batch_ids(examples):
    from composer.features.data import collate

    tensors = collate(examples, pad_id=0)
    return tensors["input_ids"], tensors["attention_mask"]


@pytest.mark.parametrize(
    ("taps", "layer", "message"),
    [
        (
            ["a@1", "b@2"],
            2,
            r"carry_on.write_at: 2 needs the anchor's layer among the taps \(a@2\)",
        ),
        (["a@1", "a@3", "b@2"], 1, "carry_on.write_at: 1 is below the anchor tap.s. a@3"),
    ],
)
def test_a_write_layer_the_carry_on_cannot_read_is_refused(
    tiny, write_recipe, taps, layer, message
):
    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    carry_on = WRITE_AT.format(layer=layer, first=taps[0])
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(recipe_yaml(bases, "a", taps, carry_on=carry_on)))


def test_a_write_layer_the_anchor_does_not_have_above_it_or_its_family_is_refused(
    tiny, write_recipe, tmp_path
):
    with pytest.raises(RecipeError, match="carry_on.write_at: 3 leaves no anchor layer above it"):
        LiveMixture.from_recipe(load_recipe(_recipe(tiny, write_recipe, layer=3)))
    folder = tmp_path / "gemma"  # a config is all the check reads
    folder.mkdir()
    config = json.loads((tiny["llama"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    bases = {"a": folder, "b": tiny["qwen2"]}
    carry_on = WRITE_AT.format(layer=1, first="a@1")
    recipe = load_recipe(
        write_recipe(recipe_yaml(bases, "a", ["a@1"], carry_on=carry_on), "g.yaml")
    )
    with pytest.raises(RecipeError, match="carry_on.write_at: the anchor is a gemma2 model"):
        CachedMixture.from_recipe(recipe)


def test_the_plan_counts_the_upper_layers_activations(tiny, write_recipe):
    from composer.training.plan import make_plan

    writing = load_recipe(_recipe(tiny, write_recipe, layer=1))
    after = load_recipe(_recipe(tiny, write_recipe, layer=1), ["carry_on.write_at=null"])
    plan, plain = make_plan(writing), make_plan(after)
    assert plan.trainable_params == plain.trainable_params  # the upper layers stay frozen
    assert plan.memory_bytes["activations"] > plain.memory_bytes["activations"]


def test_a_built_mixture_writing_into_its_anchor_exports_and_reloads_with_identical_logits(
    tiny, write_recipe, tmp_path
):
    from composer.artifacts.export import export
    from composer.artifacts.load import load_mixture
    from composer.training.build import build

    mix = tmp_path / "mix"
    build(load_recipe(_recipe(tiny, write_recipe, layer=2), ["train.lr=0.01"]), out=mix, steps=4)
    out = tmp_path / "export"
    export(mix, out, include_bases=True)

    def logits(folder):
        mixture = load_mixture(folder, fetch=False)
        ids = _ids(mixture, "He earns 195 * 12 = 2340 a month.")
        with torch.no_grad():
            return mixture(ids), ids

    expected, ids = logits(mix)
    anchor = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with torch.no_grad():
        assert not torch.allclose(expected, anchor(ids).logits, atol=1e-4)  # trained: it moved
    assert torch.equal(logits(out)[0], expected)

"""Expert bases (`carry_on.experts`): a same-tokenizer base's own log-probabilities joined to the
anchor's output, weighted per token by the carry-on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EXPERT_CARRY_ON, full_softmax_kl, recipe_yaml
from transformers import AutoModelForCausalLM

from composer.errors import RecipeError
from composer.features.data import load_splits
from composer.generation.decode import generate_ids
from composer.model.experts import FusedHead, best_reference
from composer.model.head import LMHead, head_kl, head_loss
from composer.model.mixture import CachedMixture, LiveMixture
from composer.recipe import load_recipe
from composer.training.train import FeatureSource, token_loss, train


def _expert_recipe(tiny, write_recipe, carry_on: str = EXPERT_CARRY_ON, taps=("a@1", "b@4")):
    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    return write_recipe(recipe_yaml(bases, "a", list(taps), carry_on=carry_on))


def _fused(softcap: float | None, generator: torch.Generator) -> FusedHead:
    def head(width: int, cap: float | None) -> LMHead:
        weight = (torch.randn(1000, width, generator=generator) * 0.5).to(torch.bfloat16)
        return LMHead(weight, None, cap, torch.float32)

    return FusedHead(head(32, softcap), [head(24, None), head(16, 20.0)])


def _rows(generator: torch.Generator, n: int = 17) -> torch.Tensor:
    # x' (32) | β (2) | h_1 (24) | h_2 (16)
    return torch.randn(n, 32 + 2 + 24 + 16, generator=generator)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_loss_and_kl_equal_full_softmax_with_their_gradients(softcap, monkeypatch):
    import composer.model.head as head_module

    monkeypatch.setattr(head_module, "HEAD_CHUNK_BYTES", 4 * 300 * 32)  # several vocab blocks
    generator = torch.Generator().manual_seed(0)
    head = _fused(softcap, generator)
    rows = _rows(generator).requires_grad_()
    targets = torch.randint(0, 1000, (17,), generator=generator)
    loss = head_loss(head, rows, targets)
    loss.backward()
    ref_rows = rows.detach().clone().requires_grad_()
    ref = F.cross_entropy(head.logits(ref_rows), targets, reduction="sum")
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    # The gradient reaches x' and β; the experts' states are inputs (frozen bases).
    torch.testing.assert_close(rows.grad[:, :34], ref_rows.grad[:, :34], atol=1e-4, rtol=1e-4)
    assert float(rows.grad[:, 34:].abs().max()) == 0.0
    assert float(ref_rows.grad[:, 32:34].abs().max()) > 0.01  # β's gradient is not trivial

    anchor = _rows(generator)
    anchor[:, 32:34] = 0.0  # the anchor's rows: β = 0
    anchor[:, 34:] = rows.detach()[:, 34:]
    rows.grad = None
    kl = head_kl(head, rows, anchor)
    kl.backward()
    ref_rows.grad = None
    ref = full_softmax_kl(head, ref_rows, anchor)
    ref.backward()
    assert float(kl.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    torch.testing.assert_close(rows.grad[:, :34], ref_rows.grad[:, :34], atol=1e-4, rtol=1e-4)
    assert float(head_kl(head, anchor, anchor)) == 0.0


def test_best_reference_keeps_per_example_the_base_that_predicts_it_best(monkeypatch):
    import composer.model.head as head_module

    monkeypatch.setattr(head_module, "HEAD_CHUNK_BYTES", 4 * 300 * 32)  # several vocab blocks
    generator = torch.Generator().manual_seed(3)
    head = _fused(None, generator)
    anchor = _rows(generator, 12)
    anchor[:, 32:34] = 0.0  # the anchor's rows: β = 0
    groups = torch.arange(3).repeat_interleave(4)
    # Each source's rows as the pooled head reads them: β = 0 (anchor), (1, 0), (0, 1).
    pools = [anchor.clone() for _ in range(3)]
    pools[1][:, 32] = 1.0
    pools[2][:, 33] = 1.0
    log_probs = [head.logits(rows).log_softmax(-1) for rows in pools]
    # Example g's next tokens are what source g finds likeliest, so each source wins one.
    targets = torch.stack([log_probs[g][i].argmax() for i, g in enumerate(groups.tolist())])
    targets[5] = -1  # no next token there: not scored
    known = targets >= 0
    nll = torch.stack([-lp[known, targets[known]] for lp in log_probs])  # (source, known row)
    expected = [int(nll[:, groups[known] == g].sum(-1).argmin()) for g in range(3)]
    assert expected == [0, 1, 2]

    reference = best_reference(head, anchor, targets, groups)
    for i, g in enumerate(groups.tolist()):
        torch.testing.assert_close(reference[i], pools[expected[g]][i], rtol=0, atol=0)
    # Preservation against it is the KL to each example's chosen source, gradient included.
    rows = _rows(generator, 12)
    rows[:, 34:] = anchor[:, 34:]
    rows.requires_grad_()
    kl = head_kl(head, rows, reference)
    kl.backward()
    ref_rows = rows.detach().clone().requires_grad_()
    ref = full_softmax_kl(head, ref_rows, reference)
    ref.backward()
    assert float(kl.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    torch.testing.assert_close(rows.grad[:, :34], ref_rows.grad[:, :34], atol=1e-4, rtol=1e-4)
    assert float(head_kl(head, reference, reference)) == 0.0


def test_fused_logits_pool_the_anchor_and_the_experts_geometrically():
    generator = torch.Generator().manual_seed(1)
    head = _fused(None, generator)
    rows = _rows(generator, 5)
    x, _, (h1, h2) = head.split(rows)
    own, s1, s2 = (
        head.anchor.logits(x),
        head.experts[0].logits(h1).log_softmax(-1),
        head.experts[1].logits(h2).log_softmax(-1),
    )
    rows[:, 32:34] = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(head.logits(rows), 0.25 * own + 0.25 * s1 + 0.5 * s2)
    rows[:, 32:34] = torch.tensor([1.0, 0.0])  # the first expert at full weight *is* that expert
    torch.testing.assert_close(head.logits(rows), s1, rtol=0, atol=0)


def test_untrained_mixture_with_an_expert_equals_its_anchor(tiny, write_recipe):
    mixture = LiveMixture.from_recipe(load_recipe(_expert_recipe(tiny, write_recipe)))
    assert isinstance(mixture.head, FusedHead)
    reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    ids = torch.tensor(
        [mixture.tokenizer("Robert has a bag of pebbles with 72 inside.")["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(mixture(ids), reference(ids).logits, rtol=0, atol=1e-6)


def test_an_expert_at_full_weight_is_that_expert(tiny, write_recipe):
    """β = 1 everywhere: the mixture is the expert, its probabilities as the expert model
    itself computes them."""
    mixture = LiveMixture.from_recipe(load_recipe(_expert_recipe(tiny, write_recipe)))
    assert mixture.carry_on.expert_weights is not None
    with torch.no_grad():
        mixture.carry_on.expert_weights.bias.fill_(1.0)
    anchor = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    expert = AutoModelForCausalLM.from_pretrained(tiny["qwen2"])
    ids = torch.tensor([mixture.tokenizer("def add(a, b): return a + b")["input_ids"]])
    with torch.no_grad():
        expected = expert(ids).logits.log_softmax(-1)
        torch.testing.assert_close(mixture(ids), expected, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(anchor(ids).logits.log_softmax(-1), expected, atol=1e-2)


def test_cached_generation_with_an_expert_equals_uncached(tiny, write_recipe):
    mixture = LiveMixture.from_recipe(load_recipe(_expert_recipe(tiny, write_recipe)), seed=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    prompt = mixture.tokenizer("If he gets paid 195 every day")["input_ids"]
    with_cache = generate_ids(mixture, prompt, 10, use_cache=True)
    assert with_cache == generate_ids(mixture, prompt, 10, use_cache=False)
    assert len(with_cache) >= 2


def test_training_from_features_moves_the_experts_weight_and_lowers_the_loss(
    tiny, write_recipe, tmp_path
):
    recipe = load_recipe(_expert_recipe(tiny, write_recipe), ["train.steps=12", "train.lr=0.01"])
    live = LiveMixture.from_recipe(recipe, seed=0)
    model = CachedMixture.from_recipe(recipe, seed=0)  # the expert's head read from its folder
    assert isinstance(model.head, FusedHead)
    splits = load_splits(recipe, live.tokenizer)
    source = FeatureSource(live, splits["train"], keep=True)
    held = FeatureSource(live, splits["eval"], keep=True)
    batch = source.batch(list(range(len(source.examples))))
    with torch.no_grad():  # the head from files equals the live bases' heads
        rows, _, _ = model.hidden(batch.features, batch.attention_mask)
        torch.testing.assert_close(model.logits(rows[0]), live.logits(rows[0]), rtol=0, atol=1e-5)
        before = float(token_loss(model, batch))
    train(model, source, held, recipe.train, tmp_path / "ckpt")
    with torch.no_grad():
        after = float(token_loss(model, batch))
    assert model.carry_on.expert_weights is not None
    assert float(model.carry_on.expert_weights.bias.detach().abs().max()) > 0.0
    assert after < before


@pytest.mark.parametrize(
    ("carry_on", "taps", "message"),
    [
        (
            EXPERT_CARRY_ON.replace("[b]", "[a]"),
            ("a@1", "b@4"),
            "carry_on.experts.0: 'a' is the anchor",
        ),
        (
            EXPERT_CARRY_ON.replace("[b]", "[z]"),
            ("a@1", "b@4"),
            "carry_on.experts.0: 'z' is not among",
        ),
        (
            EXPERT_CARRY_ON.replace("[b]", "[b, b]"),
            ("a@1", "b@4"),
            "carry_on.experts.1: 'b' is listed twice",
        ),
    ],
)
def test_bad_experts_are_refused_by_the_schema(tiny, write_recipe, carry_on, taps, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_expert_recipe(tiny, write_recipe, carry_on, taps))


def test_an_expert_must_tap_its_last_layer_and_share_the_tokenizer(tiny, write_recipe):
    no_last = EXPERT_CARRY_ON.replace("[b@4]", "[b@2]")
    recipe = load_recipe(_expert_recipe(tiny, write_recipe, no_last, ("a@1", "b@2")))
    with pytest.raises(RecipeError, match=r"carry_on.experts.0: tap b@4, the last layer of 'b'"):
        LiveMixture.from_recipe(recipe)
    bases = {"a": tiny["llama"], "o": tiny["other"]}
    other = EXPERT_CARRY_ON.replace("[b]", "[o]").replace("[b@4]", "[o@2]")
    path = write_recipe(recipe_yaml(bases, "a", ["a@1", "o@2"], carry_on=other), "other.yaml")
    with pytest.raises(RecipeError, match="carry_on.experts.0: base 'o' does not share"):
        LiveMixture.from_recipe(load_recipe(path))


def test_a_built_expert_mixture_exports_and_reloads_with_identical_logits(tiny, tmp_path):
    from composer.artifacts.export import export
    from composer.artifacts.load import load_mixture
    from composer.training.build import build

    path = tmp_path / "recipe.yaml"
    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    path.write_text(recipe_yaml(bases, "a", ["a@1", "b@4"], carry_on=EXPERT_CARRY_ON))
    mix = tmp_path / "mix"
    build(load_recipe(path, ["train.lr=0.01"]), out=mix, steps=4)
    out = tmp_path / "export"
    export(mix, out, include_bases=True)

    def logits(folder):
        mixture = load_mixture(folder, fetch=False)
        ids = torch.tensor([mixture.tokenizer("He earns 195 * 12 = 2340 a month.")["input_ids"]])
        with torch.no_grad():
            return mixture, mixture(ids), ids

    built, expected, ids = logits(mix)
    assert built.carry_on.expert_weights is not None
    assert float(built.carry_on.expert_weights.bias.detach().abs().max()) > 0.0  # trained: β moved
    anchor = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with torch.no_grad():
        assert not torch.allclose(expected, anchor(ids).logits, atol=1e-4)
    assert torch.equal(logits(out)[1], expected)

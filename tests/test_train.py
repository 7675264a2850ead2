"""Training invariants on tiny real bases: frozen bases, learning, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import recipe_yaml
from safetensors.torch import load_file

from composer.artifacts.load import load_mixture
from composer.errors import CheckpointError, OutputError
from composer.model.mixture import LiveMixture
from composer.model.weights import WEIGHTS
from composer.recipe import CacheSpec, load_recipe
from composer.training.build import build, check_output_dir
from composer.training.checkpoint import latest_checkpoint


@pytest.fixture()
def recipe(tiny, write_recipe):
    text = recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "a@2", "b@3"])
    return load_recipe(write_recipe(text))


def _snapshot(mixture: LiveMixture) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, base in mixture.bases.items()
        for key, value in base.model.state_dict().items()
    }


def test_build_trains_carry_on_only(recipe, tmp_path, monkeypatch):
    import composer.training.build as build_module

    seen: list[LiveMixture] = []
    original = LiveMixture.from_recipe

    def spy(*args, **kwargs):
        mixture = original(*args, **kwargs)
        seen.append(mixture)
        seen.append(_snapshot(mixture))  # type: ignore[arg-type]
        return mixture

    monkeypatch.setattr(build_module.LiveMixture, "from_recipe", spy)
    # Live features: the bases and the training carry-on share the process.
    live = recipe.model_copy(
        update={"train": recipe.train.model_copy(update={"cache": CacheSpec(enabled=False)})}
    )
    result = build(live, out=tmp_path / "out", steps=6)
    mixture, before = seen[0], seen[1]
    after = _snapshot(mixture)
    assert before.keys() == after.keys()
    for key in before:  # bit-identical, not merely close
        assert torch.equal(before[key], after[key]), key
    assert not any(p.requires_grad for b in mixture.bases.values() for p in b.model.parameters())
    # The carry-on did move: its zero-initialized up-projection is no longer zero.
    assert mixture.carry_on.up.weight.abs().sum() > 0
    m = result.metrics
    assert m["steps"] == 6 and m["tokens"] > 0
    assert m["eval_loss_mixture"] < m["eval_loss_anchor"]
    for name in ("recipe.yaml", WEIGHTS, "metrics.json", "loss.png", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    domain = m["domains"]["gsm_symbolic"]
    assert domain["examples"] == m["eval_examples"]
    per_char = domain["nats_per_char"]
    assert per_char["mixture"] < per_char["anchor"]
    assert per_char["a alone"] == pytest.approx(per_char["anchor"], rel=1e-3)
    assert set(domain["gate_mean"]) == {"a@1", "a@2", "b@3"}
    assert "gate b@3" in (tmp_path / "out" / "README.md").read_text()


def test_saved_weights_hold_carry_on_keys_only(recipe, tmp_path):
    build(recipe, out=tmp_path / "out", steps=2)
    keys = set(load_file(str(tmp_path / "out" / WEIGHTS)))
    fresh = LiveMixture.from_recipe(recipe)
    assert keys == set(fresh.carry_on.state_dict())
    assert not any("embed_tokens" in k or "layers." in k for k in keys)


def test_save_then_load_gives_identical_logits(recipe, tmp_path):
    build(recipe, out=tmp_path / "out", steps=4)
    first = load_mixture(tmp_path / "out")
    second = load_mixture(tmp_path / "out")
    ids = torch.tensor([first.tokenizer("He works 6 * 2 = 12 days a month")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
        anchor = first.anchor.logits(first.features(ids).anchor_hidden)
        assert not torch.allclose(first(ids), anchor)  # the trained carry-on is really loaded


def test_resume_equals_uninterrupted(recipe, tmp_path, monkeypatch):
    import composer.training.train as train_module

    straight = build(recipe, out=tmp_path / "straight", steps=6)
    real_save = train_module.save_training_state

    def save_then_die(folder, step, *args):
        real_save(folder, step, *args)
        if step == 4:
            raise KeyboardInterrupt  # the process dies right after the step-4 checkpoint

    monkeypatch.setattr(train_module, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, out=tmp_path / "resumed", steps=6)
    monkeypatch.setattr(train_module, "save_training_state", real_save)
    assert not (tmp_path / "resumed" / WEIGHTS).exists()
    assert (
        json.loads(
            (latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "trainer.json").read_text()
        )["step"]
        == 4
    )
    resumed = build(recipe, out=tmp_path / "resumed", steps=6, resume=True)
    a = load_file(str(tmp_path / "straight" / WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / WEIGHTS))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.metrics["train_loss_last"] == straight.metrics["train_loss_last"]
    assert (
        len(json.loads((tmp_path / "resumed" / "metrics.json").read_text())["eval_loss_curve"]) == 3
    )


def test_existing_build_is_not_overwritten(recipe, tmp_path):
    build(recipe, out=tmp_path / "out", steps=2)
    with pytest.raises(OutputError, match="already holds a build: pass --resume"):
        build(recipe, out=tmp_path / "out", steps=2)


def test_output_that_is_a_file_is_refused(recipe, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        build(recipe, out=target, steps=2)


def test_truncated_weights_are_refused(recipe, tmp_path):
    build(recipe, out=tmp_path / "out", steps=2)
    weights = tmp_path / "out" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_mixture(tmp_path / "out")


def test_resume_accepts_a_build_written_before_a_field_existed(recipe, tmp_path):
    """A field added to the recipe schema later (here: one the saved recipe lacks) takes its
    default and is no difference; a changed setting still is."""
    out = tmp_path / "out"
    out.mkdir()
    saved = recipe.model_dump(mode="json")
    del saved["train"]["cache"]["shard_examples"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved))
    (out / "checkpoints").mkdir()  # with its recipe, what makes the folder a build
    check_output_dir(out, recipe, resume=True)
    saved["train"]["lr"] = recipe.train.lr * 2
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(OutputError, match="built from a different recipe"):
        check_output_dir(out, recipe, resume=True)


def test_autocast_trains_in_bfloat16_with_an_exact_head(recipe, tmp_path):
    """`train.autocast: bfloat16` runs the carry-on's matmuls in bfloat16 while it trains; its
    weights stay float32, and the head's loss is exact: at the first step the carry-on adds
    nothing yet, so both runs start from the same loss to the last bit."""
    from composer.model.head import LMHead, head_loss

    plain = build(recipe, out=tmp_path / "fp32", steps=6)
    mixed_recipe = load_recipe(tmp_path / "fp32" / "recipe.yaml", ["train.autocast=bfloat16"])
    mixed = build(mixed_recipe, out=tmp_path / "bf16", steps=6)
    assert mixed.metrics["train_loss_first"] == plain.metrics["train_loss_first"]
    assert mixed.metrics["train_loss_last"] != plain.metrics["train_loss_last"]  # it did apply
    # It learned, judged on the same held-out items for both runs: a training batch's loss at
    # step 6 against step 1 compares different batches and can rise on a machine's rounding.
    assert mixed.metrics["eval_loss_mixture"] < mixed.metrics["eval_loss_anchor"]
    assert plain.metrics["eval_loss_mixture"] < plain.metrics["eval_loss_anchor"]
    weights = load_file(tmp_path / "bf16" / WEIGHTS)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # The head under autocast: the same value and gradient as outside it.
    generator = torch.Generator().manual_seed(0)
    head = LMHead(torch.randn(50, 16, generator=generator), None, None, torch.float32)
    rows = torch.randn(7, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    head_loss(head, rows, targets).backward()
    plain_grad = rows.grad.clone()
    rows.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        loss = head_loss(head, rows, targets)
    loss.backward()
    assert loss == head_loss(head, rows.detach(), targets)
    assert torch.equal(rows.grad, plain_grad)

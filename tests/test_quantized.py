"""8-bit and nf4 bases (bitsandbytes on CPU) load frozen and train a carry-on."""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_yaml

from composer.bases.frozen import load_base
from composer.recipe import BaseSpec, load_recipe
from composer.training.build import build

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("kind", "layer"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_base_loads_frozen(tiny, kind, layer):
    base = load_base("q", BaseSpec(path=str(tiny["qwen2"]), quantization=kind))
    kinds = {type(m).__name__ for m in base.model.modules()}
    assert layer in kinds
    assert not any(p.requires_grad for p in base.model.parameters())
    full = load_base("f", BaseSpec(path=str(tiny["qwen2"])))
    ids = torch.tensor([base.tokenizer("He works 6 days a week")["input_ids"]])
    q = base.forward(ids, None, [2], need_final=True)
    f = full.forward(ids, None, [2], need_final=True)
    # Quantized, so close rather than equal; far from equal would mean a broken load.
    cos = torch.nn.functional.cosine_similarity(q.final.flatten(), f.final.flatten(), dim=0)
    assert cos > 0.9


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_carry_on_trains_on_quantized_base(tiny, write_recipe, tmp_path, kind):
    text = recipe_yaml({"a": tiny["qwen2"]}, "a", ["a@1", "a@3"])
    recipe = load_recipe(write_recipe(text), [f"bases.a.quantization={kind}"])
    result = build(recipe, out=tmp_path / kind, steps=4)
    assert result.metrics["eval_loss_mixture"] < result.metrics["eval_loss_anchor"]

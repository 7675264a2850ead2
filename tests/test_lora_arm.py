"""bench/lora_arm.py: PEFT LoRA on a recipe's anchor, the peer of a carry-on on the same data.
Run on the tiny Llama: the adapter learns, its batch slices add up to the whole batch's step,
its rank matches the asked trainable count, and the merged folder is the adapted model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import recipe_yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "lora_arm.py"


def _module():
    spec = importlib.util.spec_from_file_location("lora_arm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def recipe(tiny, tmp_path, write_recipe) -> Path:
    train = """
        train:
          data: {kind: gsm_symbolic, size: 24, seed: 0}
          eval_fraction: 0.25
          steps: 12
          batch_size: 4
          seq_len: 320
          lr: 0.003
          warmup_steps: 1
          eval_every: 12
          checkpoint_every: 12
        """
    return write_recipe(
        recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"], train=textwrap.dedent(train))
    )


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _peft(folder: Path, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():  # B starts at zero: make the first step's A move
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_batch_slices_add_up_to_the_whole_batch(tiny, recipe):
    from transformers import AutoTokenizer

    from composer.features.data import load_splits, pad_id
    from composer.recipe import load_recipe

    arm = _module()
    spec = load_recipe(recipe).train.model_copy(update={"steps": 3})
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    examples = load_splits(load_recipe(recipe), tokenizer)["train"]
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 1, "examples of one length would not test the padding"
    trained = {}
    for micro in (0, 1, 3):
        model = _peft(tiny["llama"], 2)
        arm.train_lora(model, examples, spec, pad_id(tokenizer), micro_batch=micro)
        trained[micro] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    for micro in (1, 3):
        for name, value in trained[0].items():
            torch.testing.assert_close(trained[micro][name], value, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for n, v in trained[0].items() if "lora_A" in n)


def test_matched_rank_is_the_nearest_count(tiny):
    from transformers import AutoModelForCausalLM

    arm = _module()
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    per_rank = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if n.split(".")[-1] in arm.TARGETS
    )
    assert arm.matched_rank(model, 3 * per_rank + per_rank // 3) == 3
    assert arm.matched_rank(model, 3 * per_rank - per_rank // 3) == 3
    assert arm.matched_rank(model, 1) == 1


def test_the_arm_learns_and_its_merged_folder_is_the_adapted_model(tiny, recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = _digest(tiny["llama"])
    out = tmp_path / "lora"
    args = ["train.steps=12", "--out", str(out), "--params", "2000", "--lr", "0.01"]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe), *args, "--micro-batch", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(run.stdout)
    assert metrics["trainable_params"] == pytest.approx(2000, rel=0.5)
    assert metrics["steps"] == 12 and metrics["lr"] == 0.01
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["eval_loss_lora"] != metrics["eval_loss_anchor"]
    assert "lora  step 12/12" in run.stderr
    assert _digest(tiny["llama"]) == before  # the base is never written

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
        assert not torch.allclose(plain(input_ids=ids).logits, want, rtol=1e-3, atol=1e-3)


def test_an_existing_out_is_refused(tiny, recipe, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe), "--out", str(out), "--params", "2000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode != 0 and "exists" in run.stderr
    assert list(out.iterdir()) == []

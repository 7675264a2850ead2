"""`compose export`: the exported folder reloads to identical logits and refuses tampering."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import recipe_yaml
from typer.testing import CliRunner

from cli import app
from composer.artifacts.export import export
from composer.artifacts.load import load_mixture
from composer.errors import CheckpointError, OutputError
from composer.recipe import load_recipe
from composer.training.build import build

TEXT = "He works 6 * 2 = 12 days a month, so he earns 195 * 12 = 2340 a month."


def _logits(folder: Path) -> torch.Tensor:
    mixture = load_mixture(folder, fetch=False)
    ids = torch.tensor([mixture.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        return mixture(ids)


def _built(tmp_path: Path, tiny, overrides: tuple[str, ...] = (), second: str = "qwen2") -> Path:
    """A mixture built over private copies of the tiny bases (so a test may move them)."""
    bases = {}
    for name, family in (("a", "llama"), ("b", second)):
        bases[name] = tmp_path / "bases" / family
        shutil.copytree(tiny[family], bases[name])
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(bases, "a", ["a@1", "b@2" if second == "qwen2" else "b@1"]))
    out = tmp_path / "mix"
    build(load_recipe(path, overrides), out=out, steps=2)
    return out


def test_export_gives_identical_logits_and_a_model_card(tiny, tmp_path):
    mix = _built(tmp_path, tiny)
    out = tmp_path / "export"
    result = export(mix, out, include_bases=True)
    assert result.out_dir == out and result.files >= 4
    for name in ("recipe.yaml", "carry_on.safetensors", "README.md", "metrics.json"):
        assert (out / name).is_file()
    assert (out / "tokenizers" / "a" / "tokenizer.json").is_file()
    assert torch.equal(_logits(out), _logits(mix))
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "export.json").read_text())
    weights_sha = next(iter(manifest["bases"]["a"]["weights"].values()))
    assert weights_sha in card and "eval_loss_mixture" in card and "transformers" in card


def test_export_with_bases_loads_without_the_originals(tiny, tmp_path):
    mix = _built(tmp_path, tiny)
    before = _logits(mix)
    out = tmp_path / "export"
    export(mix, out, include_bases=True, shard_bytes=64 * 1024)
    shards = sorted((out / "bases" / "b").glob("model-*.safetensors"))
    assert len(shards) > 1  # sharded, and loaded through the index
    recipe = (out / "recipe.yaml").read_text()
    assert "path: bases/a" in recipe and str(tmp_path / "bases") not in recipe
    shutil.move(tmp_path / "bases", tmp_path / "moved-away")
    assert torch.equal(_logits(out), before)


def test_cross_tokenizer_export_gives_identical_logits(tiny, tmp_path):
    mix = _built(tmp_path, tiny, second="other")  # "other" has its own tokenizer: aligned
    before = _logits(mix)
    out = tmp_path / "export"
    export(mix, out, include_bases=True)
    assert (out / "tokenizers" / "b" / "tokenizer.json").is_file()
    shutil.move(tmp_path / "bases", tmp_path / "moved-away")
    assert torch.equal(_logits(out), before)


def test_quantized_base_is_exported_as_original_weights(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    mix = _built(tmp_path, tiny, ("bases.b.quantization=nf4",))
    before = _logits(mix)
    out = tmp_path / "export"
    export(mix, out, include_bases=True)
    original = sum(p.stat().st_size for p in (tmp_path / "bases" / "qwen2").glob("*.safetensors"))
    stored = sum(p.stat().st_size for p in (out / "bases" / "b").glob("*.safetensors"))
    assert stored == pytest.approx(original, rel=0.01)  # not packed 4-bit tensors
    assert "quantization: nf4" in (out / "recipe.yaml").read_text()
    assert torch.equal(_logits(out), before)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_export_is_refused(tiny, tmp_path, damage):
    mix = _built(tmp_path, tiny)
    out = tmp_path / "export"
    export(mix, out, include_bases=True, verify=False)
    shard = sorted((out / "bases" / "a").glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        message = "truncated or replaced"
    else:
        data[-10] ^= 0xFF
        shard.write_bytes(data)
        message = "sha256 differs"
    with pytest.raises(CheckpointError, match=message):
        load_mixture(out)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_build_and_export_files_take_the_users_umask(tiny, tmp_path, umask):
    """Written like any file of the user: not mkstemp's 0600 nor mkdtemp's 0700."""
    old = os.umask(umask)
    try:
        mix = _built(tmp_path, tiny)
        out = tmp_path / "export"
        export(mix, out, include_bases=True)
    finally:
        os.umask(old)
    for folder in (mix, out):
        paths = [folder, *folder.rglob("*")]
        modes = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
        assert modes == {0o777 & ~umask}, (folder, sorted(map(oct, modes)))
    for name in ("recipe.yaml", "carry_on.safetensors", "metrics.json", "README.md"):
        for folder in (mix, out):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((out / "export.json").stat().st_mode) == 0o666 & ~umask


def test_export_refuses_a_non_empty_output(tiny, tmp_path):
    mix = _built(tmp_path, tiny)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        export(mix, mix, include_bases=True)


def test_export_cli(tiny, tmp_path):
    mix = _built(tmp_path, tiny)
    out = tmp_path / "cli-export"
    result = CliRunner().invoke(app, ["export", str(mix), str(out), "--include-bases"])
    assert result.exit_code == 0, result.output
    assert "exported" in result.stdout and (out / "bases" / "a" / "config.json").is_file()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), str(out)])
    assert result.exit_code == 1
    assert "is not a mixture directory" in result.output


def test_export_carries_a_lora_patch(tiny, tmp_path):
    """A base patched by `lora:` is exported with its adapter: OUT loads with the adapter's
    original folder gone, and gives the same logits."""
    from test_port import _peft_adapter

    _peft_adapter(tiny["llama"], tmp_path / "adapter")
    bases = {"a": tmp_path / "bases" / "llama"}
    shutil.copytree(tiny["llama"], bases["a"])
    text = recipe_yaml(bases, "a", ["a@1"]).replace(
        f"{{path: {bases['a']}}}", f"{{path: {bases['a']}, lora: {tmp_path / 'adapter'}}}"
    )
    (tmp_path / "recipe.yaml").write_text(text)
    build(load_recipe(tmp_path / "recipe.yaml"), out=tmp_path / "mix", steps=2)
    before = _logits(tmp_path / "mix")
    out = tmp_path / "export"
    export(tmp_path / "mix", out, include_bases=True)
    assert "lora: adapters/a" in (out / "recipe.yaml").read_text()
    shutil.move(tmp_path / "adapter", tmp_path / "adapter-moved")
    shutil.move(tmp_path / "bases", tmp_path / "bases-moved")
    assert torch.equal(_logits(out), before)

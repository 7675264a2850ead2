"""`compose port` and LoRA patches: PEFT's own merge is the reference, refusals name the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_base, recipe_yaml
from typer.testing import CliRunner

from cli import app
from composer.artifacts.load import load_mixture
from composer.artifacts.port import port_lora, port_mixture
from composer.bases.frozen import load_base, resolve_folder
from composer.bases.lora import apply_lora
from composer.errors import OutputError, PortError, RecipeError
from composer.features.cache import cache_key
from composer.files import write_text
from composer.model.mixture import LiveMixture
from composer.model.weights import RECIPE_FILE, WEIGHTS, save_weights
from composer.recipe import BaseSpec, recipe_from_dict

TEXT = "He works 6 * 2 = 12 days a month, so he earns 195 * 12 = 2340 a month."
runner = CliRunner()


def _ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]])


def _peft_adapter(
    base: Path, out: Path, save_embedding_layers: bool | str = "auto", **config
) -> torch.Tensor:
    """Save a LoRA with random A and B on `base`; return PEFT's merge_and_unload logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings | config))
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        return merged(_ids(base)).logits


def _evolved(src: Path, out: Path, noise: float = 0.02) -> Path:
    """A "v2" of a base: same architecture and tokenizer, every weight nudged."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(out)
    return out


def _mixture_dir(tmp_path: Path, bases: dict[str, Path], taps: list[str]) -> Path:
    """A mixture directory whose carry-on changes the logits (random weights, not zero-init)."""
    import yaml

    recipe = recipe_from_dict(yaml.safe_load(recipe_yaml(bases, "chat", taps)))
    mixture = LiveMixture.from_recipe(recipe, fetch=False)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "mix"
    write_text(out / RECIPE_FILE, recipe.to_yaml())
    save_weights(out / WEIGHTS, mixture.carry_on)
    return out


def _logits(folder: Path) -> torch.Tensor:
    mixture = load_mixture(folder, fetch=False)
    with torch.no_grad():
        return mixture(_ids(mixture.anchor.folder))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    ],
    ids=["plain", "rslora", "patterns"],
)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_at_load_equals_peft_merge(tiny, tmp_path, family, config):
    expected = _peft_adapter(tiny[family], tmp_path / "adapter", **config)
    spec = BaseSpec(path=str(tiny[family]), lora=str(tmp_path / "adapter"))
    base = load_base("chat", spec, fetch=False)
    assert not any(p.requires_grad for p in base.model.parameters())
    with torch.no_grad():
        got = base.model(_ids(tiny[family])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mixture_with_lora_base_starts_at_the_patched_anchor(tiny, tmp_path):
    expected = _peft_adapter(tiny["llama"], tmp_path / "adapter")
    text = recipe_yaml({"chat": tiny["llama"]}, "chat", ["chat@1"])
    text = text.replace(
        f"{{path: {tiny['llama']}}}", f"{{path: {tiny['llama']}, lora: {tmp_path / 'adapter'}}}"
    )
    import yaml

    recipe = recipe_from_dict(yaml.safe_load(text))
    mixture = LiveMixture.from_recipe(recipe, fetch=False)
    with torch.no_grad():
        got = mixture(_ids(tiny["llama"]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    folders = {"chat": resolve_folder(recipe.bases["chat"], fetch=False)}
    plain = recipe_from_dict(
        yaml.safe_load(recipe_yaml({"chat": tiny["llama"]}, "chat", ["chat@1"]))
    )
    assert cache_key(recipe, folders)[0] != cache_key(plain, folders)[0]


def test_lora_of_another_shape_is_refused_and_leaves_the_model(tiny, tmp_path):
    _peft_adapter(tiny["qwen2"], tmp_path / "adapter")  # hidden 64; llama is 96
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        PortError,
        match=r"base 'chat': lora .*layers.0.mlp.down_proj is 64×128 in the adapter but 96×192 in the base",
    ):
        apply_lora(model, tmp_path / "adapter", base="chat")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"target_modules": ["embed_tokens"]}, "not a LoRA A/B matrix of a Linear"),
        ({"target_modules": ["lm_head"]}, "lm_head.base_layer.weight is not a LoRA A/B matrix"),
        (
            {"target_modules": ["lm_head"], "save_embedding_layers": False},
            "lm_head is the LM head; LoRA on the head is not supported",
        ),
    ],
)
def test_unsupported_adapters_are_refused(tiny, tmp_path, config, message):
    _peft_adapter(tiny["qwen2"], tmp_path / "adapter", **config)
    with pytest.raises(PortError, match=message):
        load_base("chat", BaseSpec(path=str(tiny["qwen2"]), lora=str(tmp_path / "adapter")))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("some_future_field", 1, "unknown adapter config field 'some_future_field'"),
        ("init_lora_weights", "pissa", "init_lora_weights is 'pissa'"),
        ("init_lora_weights", "olora", "init_lora_weights is 'olora'"),
        ("loftq_config", {"loftq_bits": 4}, "loftq_config is set"),
        ("bias", "all", "bias is 'all'"),
    ],
)
def test_adapter_config_fields_outside_the_allow_list_are_refused(
    tiny, tmp_path, field, value, message
):
    _peft_adapter(tiny["qwen2"], tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert field == "some_future_field" or field in config  # a field PEFT writes today
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(PortError, match=f"lora .*: {message}; only plain LoRA can be merged"):
        load_base("chat", BaseSpec(path=str(tiny["qwen2"]), lora=str(tmp_path / "adapter")))


def test_lora_on_a_quantized_base_is_a_recipe_error(tiny):
    text = recipe_yaml({"chat": tiny["llama"]}, "chat", ["chat@1"])
    import yaml

    data = yaml.safe_load(text)
    data["bases"]["chat"].update(lora="adapter", quantization="nf4")
    with pytest.raises(
        RecipeError, match="bases.chat: lora: cannot be merged into a quantized base"
    ):
        recipe_from_dict(data)


def test_port_onto_an_identical_copy_gives_identical_logits(tiny, tmp_path):
    mix = _mixture_dir(
        tmp_path, {"chat": tiny["llama"], "code": tiny["qwen2"]}, ["chat@1", "code@2"]
    )
    copy = shutil.copytree(tiny["llama"], tmp_path / "llama-copy")
    result = port_mixture(mix, {"chat": str(copy)}, tmp_path / "ported")
    assert result.out_dir == tmp_path / "ported"
    assert torch.equal(_logits(tmp_path / "ported"), _logits(mix))
    recipe = (tmp_path / "ported" / RECIPE_FILE).read_text()
    assert str(copy) in recipe and str(tiny["qwen2"]) in recipe
    assert (tmp_path / "ported" / WEIGHTS).read_bytes() == (mix / WEIGHTS).read_bytes()


def test_port_onto_an_evolved_base_records_both_versions(tiny, tmp_path):
    mix = _mixture_dir(
        tmp_path, {"chat": tiny["llama"], "code": tiny["qwen2"]}, ["chat@1", "code@2"]
    )
    v2 = _evolved(tiny["qwen2"], tmp_path / "qwen2-v2")
    out = tmp_path / "ported"
    port_mixture(mix, {"code": str(v2)}, out)
    record = json.loads((out / "port.json").read_text())
    old, new = record["bases"]["code"]["old"], record["bases"]["code"]["new"]
    assert old["folder"] == str(tiny["qwen2"].resolve()) and new["folder"] == str(v2.resolve())
    assert old["config_sha256"] == new["config_sha256"]
    assert old["weights_sha256"] != new["weights_sha256"]
    card = (out / "README.md").read_text()
    assert all(
        h in card for h in (*old["weights_sha256"].values(), *new["weights_sha256"].values())
    )
    assert not torch.equal(_logits(out), _logits(mix))


def _variant(tmp_path: Path, tiny, kind: str) -> Path:
    root = tmp_path / "variants"
    if kind == "family":
        return tiny["qwen2"]
    if kind == "hidden":
        return make_base(root / "hidden", "llama", tiny["llama"], 64, 3)
    if kind == "layers":
        return make_base(root / "layers", "llama", tiny["llama"], 96, 2)
    if kind == "vocab":
        return make_base(root / "vocab", "llama", tiny["other"], 96, 3)
    copy = Path(shutil.copytree(tiny["llama"], root / "tokenizer"))
    data = json.loads((copy / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [token for token in vocab if not token.startswith("<|")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (copy / "tokenizer.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("family", "bases.chat: model_type llama → qwen2 differs"),
        ("hidden", "bases.chat: hidden_size 96 → 64 differs"),
        ("layers", "bases.chat: num_hidden_layers 3 → 2 differs"),
        ("vocab", r"bases.chat: vocab_size \d+ → \d+ differs"),
        ("tokenizer", "bases.chat: the tokenizer differs"),
    ],
)
def test_port_refuses_a_mismatch_and_writes_nothing(tiny, tmp_path, kind, message):
    mix = _mixture_dir(tmp_path, {"chat": tiny["llama"]}, ["chat@1", "chat@2"])
    new = _variant(tmp_path, tiny, kind)
    out = tmp_path / "out" / "ported"
    with pytest.raises(PortError, match=message):
        port_mixture(mix, {"chat": str(new)}, out)
    assert not out.exists() and not list((tmp_path / "out").iterdir())


def test_port_refuses_a_change_of_alignment(tiny, tmp_path):
    mix = _mixture_dir(
        tmp_path, {"chat": tiny["llama"], "code": tiny["qwen2"]}, ["chat@1", "code@2"]
    )
    other_tok = make_base(tmp_path / "qwen2-other-tok", "qwen2", tiny["other"], 64, 4)
    with pytest.raises(PortError, match="bases.code: its tokenizer no longer shares the anchor's"):
        port_mixture(mix, {"code": str(other_tok)}, tmp_path / "ported")


def test_port_bad_arguments(tiny, tmp_path):
    mix = _mixture_dir(tmp_path, {"chat": tiny["llama"]}, ["chat@1"])
    with pytest.raises(PortError, match=r"--base code: not a base of .* \(its bases: chat\)"):
        port_mixture(mix, {"code": str(tiny["llama"])}, tmp_path / "a")
    with pytest.raises(PortError, match="no such folder, and no base card"):
        port_mixture(mix, {"chat": str(tmp_path / "missing")}, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        port_mixture(mix, {"chat": str(tiny["llama"])}, tmp_path / "full")


def test_port_lora_writes_a_patched_hf_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    v2 = _evolved(tiny["llama"], tmp_path / "llama-v2")
    _peft_adapter(tiny["llama"], tmp_path / "adapter")  # trained on v1
    expected = load_base("x", BaseSpec(path=str(v2), lora=str(tmp_path / "adapter")))
    port_lora(tmp_path / "adapter", str(v2), tmp_path / "patched")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "patched", dtype=torch.float32)
    with torch.no_grad():
        got, want = model(_ids(v2)).logits, expected.model(_ids(v2)).logits
    assert torch.equal(got, want)
    record = json.loads((tmp_path / "patched" / "port.json").read_text())
    assert record["kind"] == "lora" and record["base"]["folder"] == str(v2.resolve())
    assert (tmp_path / "patched" / "tokenizer.json").read_bytes() == (
        v2 / "tokenizer.json"
    ).read_bytes()


def test_cli_port_mixture_and_lora(tiny, tmp_path):
    mix = _mixture_dir(tmp_path, {"chat": tiny["llama"]}, ["chat@1"])
    copy = shutil.copytree(tiny["llama"], tmp_path / "copy")
    result = runner.invoke(
        app, ["port", str(mix), "--base", f"chat={copy}", "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    assert "ported" in result.output and (tmp_path / "p" / "port.json").is_file()
    bad = runner.invoke(
        app, ["port", str(mix), "--base", f"chat={tiny['qwen2']}", "--out", str(tmp_path / "q")]
    )
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "error: bases.chat: model_type llama → qwen2 differs"
    ]
    _peft_adapter(tiny["llama"], tmp_path / "adapter")
    lora = runner.invoke(
        app,
        [
            "port",
            "--lora",
            str(tmp_path / "adapter"),
            "--base",
            str(copy),
            "--out",
            str(tmp_path / "l"),
        ],
    )
    assert lora.exit_code == 0, lora.output
    assert (tmp_path / "l" / "config.json").is_file()
    both = runner.invoke(
        app, ["port", str(mix), "--lora", str(tmp_path / "adapter"), "--base", "x"]
    )
    assert both.exit_code != 0

"""`compose export --format hf`: a transformers folder that runs where compose cannot be imported.

The exported folder is loaded in a child Python that has the virtual environment's packages but
not this repository (`python -I -S`, the editable install's path hook left out): there
`AutoModelForCausalLM` with `trust_remote_code=True`, `generate` (greedy with and without the
KV cache, sampled), `pipeline("text-generation")` and the tokenizer's chat template must work,
and the logits and greedy tokens must be compose's own.
"""

from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXPERT_CARRY_ON, recipe_yaml, write_mixture_dir
from typer.testing import CliRunner

from cli import app
from composer.artifacts.export_hf import check_hf_folder, compose_reference, export_hf
from composer.artifacts.load import load_mixture
from composer.errors import CheckpointError
from composer.generation.decode import Generation, generate_ids, prompt_ids, run_together
from composer.generation.templates import format_prompt

TEXTS = [
    "He works 6 * 2 = 12 days a month, so he earns 195 * 12 = 2340 a month.",
    "def add(a, b):\n    return a + b\n",
    "Robert has a bag of pebbles with 72 inside.",
]
MESSAGES = [{"role": "user", "content": "How many pebbles does Robert drop?"}]
NEW_TOKENS = 12

# Run by `python -I -S` in a temporary folder: argv = [site-packages..., OUT, request.json].
CHILD = r"""
import json, sys
*paths, out, request = sys.argv[1:]
sys.path[:0] = paths
try:
    import composer  # noqa: F401
    composer_importable = True
except ModuleNotFoundError:
    composer_importable = False
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

torch.set_num_threads(1)  # tiny models: more threads only contend with each other
req = json.load(open(request))
tokenizer = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
result = {"composer_importable": composer_importable, "class": type(model).__name__}
with torch.no_grad():
    ids = torch.tensor([req["ids"]])
    logits = model(ids, use_cache=False).logits
    result["loss"] = float(model(ids, labels=ids).loss)
torch.save(logits, req["logits_path"])
greedy = dict(do_sample=False, max_new_tokens=req["new"], pad_token_id=tokenizer.pad_token_id)
for key, cache in (("cached", True), ("uncached", False)):
    result[key] = [
        model.generate(torch.tensor([p]), use_cache=cache, **greedy)[0, len(p):].tolist()
        for p in req["prompts"]
    ]
torch.manual_seed(0)
prompt = torch.tensor([req["prompts"][0]])
sampled = model.generate(prompt, do_sample=True, temperature=0.9, top_k=20, max_new_tokens=6,
                         pad_token_id=tokenizer.pad_token_id)
result["sampled"] = sampled[0, prompt.shape[1]:].tolist()
left = AutoTokenizer.from_pretrained(out, trust_remote_code=False, padding_side="left")
batch = left(req["batch"], return_tensors="pt", padding=True, add_special_tokens=False)
width = batch["input_ids"].shape[1]
result["batch"] = model.generate(**batch, **greedy)[:, width:].tolist()
result["beams"] = [
    model.generate(prompt, num_beams=2, use_cache=cache, **greedy)[0].tolist()
    for cache in (True, False)
]
result["chat"] = tokenizer.apply_chat_template(
    req["messages"], add_generation_prompt=True, tokenize=False
)
pipe = pipeline("text-generation", model=out, trust_remote_code=True)
text = pipe(req["text"], max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
result["pipeline"] = text[0]["generated_text"]
chat = pipe(req["messages"], max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
result["pipeline_chat"] = chat[0]["generated_text"]
with open(req["result_path"], "w") as handle:  # stdout also holds transformers' messages
    json.dump(result, handle)
"""


def run_isolated(out: Path, request: dict, tmp: Path) -> dict:
    """CHILD on `out` in a Python that can import torch and transformers but not compose."""
    (tmp / "request.json").write_text(json.dumps({**request, "result_path": "result.json"}))
    (tmp / "child.py").write_text(CHILD)
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"), HF_HOME=str(tmp / "hf"))
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp / "child.py"), *paths, str(out), "request.json"],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on busy cores: one thread, as in the child (several only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture(tmp: Path, text: str) -> Path:
    (tmp / "recipe.yaml").write_text(text)
    return write_mixture_dir(tmp / "recipe.yaml", tmp / "mixture")


@pytest.fixture(scope="module")
def experts_write_at(tiny, tmp_path_factory) -> Path:
    """Anchor Llama written into after its layer 2, Qwen2 tapped twice and pooled as an expert."""
    carry_on = EXPERT_CARRY_ON.replace("a@1", "a@2").replace(
        "heads: 4", "heads: 4\n      write_at: 2"
    )
    text = recipe_yaml(
        {"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@2", "b@2", "b@4"], carry_on=carry_on
    )
    return _mixture(tmp_path_factory.mktemp("experts"), text)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> Path:
    """One base, the other carry-on variants: shared router, no gate, a fixed alpha."""
    carry_on = """
        carry_on:
          width: 32
          heads: 4
          router: shared
          gate: none
          alpha: {init: 0.5, learnable: false}
          blocks:
            - shortcuts: [a@1]
        """
    text = recipe_yaml({"a": tiny["llama"]}, "a", ["a@1", "a@3"], carry_on=carry_on)
    return _mixture(tmp_path_factory.mktemp("single"), text)


@pytest.fixture(scope="module")
def isolated(experts_write_at, tmp_path_factory) -> dict:
    """The experts + write_at export run in the child, beside compose's own results."""
    tmp = tmp_path_factory.mktemp("isolated")
    out = tmp / "hf"
    export_hf(experts_write_at, out)
    mixture = load_mixture(experts_write_at, fetch=False)
    tokenizer = mixture.tokenizer
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = mixture(torch.tensor([ids]))
    prompts = [prompt_ids(mixture, t) for t in TEXTS] + [prompt_ids(mixture, TEXTS[1], chat=False)]
    together = [Generation(mixture, prompt_ids(mixture, t, chat=False), NEW_TOKENS) for t in TEXTS]
    run_together(together)  # one batch, padded on the left
    request = {
        "ids": ids,
        "prompts": prompts,
        "new": NEW_TOKENS,
        "messages": MESSAGES,
        "text": TEXTS[2],
        "batch": TEXTS,
        "logits_path": str(tmp / "logits.pt"),
    }
    child = run_isolated(out, request, tmp)
    return {
        "out": out,
        "child": child,
        "logits": logits,
        "ids": ids,
        "child_logits": torch.load(tmp / "logits.pt"),
        "greedy": [generate_ids(mixture, p, NEW_TOKENS) for p in prompts],
        "together": [g.ids for g in together],
        "eos": tokenizer.eos_token_id,
        "chat": format_prompt(tokenizer, MESSAGES),
        "vocab": len(tokenizer),
    }


def test_export_folder_holds_a_transformers_model(isolated):
    out = isolated["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_compose_mixture.")
    assert config["write_at"] == 2 and config["carry_on"]["experts"] == ["b"]
    for name in ("configuration_compose_mixture.py", "modeling_compose_mixture.py"):
        tree = ast.parse((out / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {
            n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level
        }
        roots = {m.split(".")[0] for m in imported}
        assert roots <= {"torch", "transformers", *sys.stdlib_module_names}, roots
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("base_a.model.layers.") for k in index)
    assert any(k.startswith("base_b.lm_head.") for k in index)  # the expert's own head
    assert any(k.startswith("carry_on.blocks.") for k in index)
    for name in ("tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file()
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "sha256" in card and "gsm_symbolic" in card
    assert not [p for p in out.rglob("*") if p.name == "__pycache__"]


def test_runs_without_compose_and_matches_its_logits(isolated):
    child = isolated["child"]
    assert child["composer_importable"] is False
    assert child["class"] == "ComposeMixtureForCausalLM"
    gap = (isolated["child_logits"] - isolated["logits"]).abs().max()
    assert float(gap) <= 1e-5


def test_greedy_tokens_with_and_without_cache_are_composes(isolated):
    child = isolated["child"]
    assert child["cached"] == child["uncached"] == isolated["greedy"]
    assert all(len(tokens) > 0 for tokens in child["cached"])
    with_cache, without = child["beams"]  # beam search reorders the mixture's caches
    assert with_cache == without


def test_a_left_padded_batch_generates_as_composes(isolated):
    eos = isolated["eos"]
    rows = [row[: row.index(eos)] if eos in row else row for row in isolated["child"]["batch"]]
    assert rows == isolated["together"]
    assert len({len(r) for r in isolated["child"]["batch"]}) == 1  # padded after an end


def test_loss_is_the_next_token_cross_entropy(isolated):
    ids = torch.tensor(isolated["ids"])
    expected = torch.nn.functional.cross_entropy(isolated["logits"][0, :-1], ids[1:])
    assert isolated["child"]["loss"] == pytest.approx(float(expected), abs=1e-5)


def test_sampling_pipeline_and_chat_template_work(isolated):
    child = isolated["child"]
    assert 0 < len(child["sampled"]) <= 6
    assert all(0 <= t < isolated["vocab"] for t in child["sampled"])
    assert child["chat"] == isolated["chat"]
    assert child["pipeline"].startswith(TEXTS[2]) and len(child["pipeline"]) > len(TEXTS[2])
    assert child["pipeline_chat"][-1]["role"] == "assistant"


def test_single_base_export_through_the_cli(single, tmp_path):
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(single), str(out), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert "exported" in result.stdout and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["carry_on"]["router"] == "shared" and config["carry_on"]["gate"] == "none"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "carry_on.alpha" in index  # a fixed alpha is a buffer, stored too
    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    assert "--format" in help_text and "hf" in help_text


def test_the_check_refuses_an_export_that_does_not_reproduce(single, tmp_path):
    """The check that runs before OUT appears fails on logits or tokens other than compose's."""
    out = tmp_path / "hf"
    export_hf(single, out, verify=False)
    reference = compose_reference(load_mixture(single, fetch=False))
    check_hf_folder(out, reference, 1e-5)
    shifted = {**reference, "logits": reference["logits"] + 1e-4}
    with pytest.raises(CheckpointError, match="logits differ by up to"):
        check_hf_folder(out, shifted, 1e-5)
    other = {**reference, "tokens": [(t + 1) % 300 for t in reference["tokens"]]}
    with pytest.raises(CheckpointError, match="greedy tokens"):
        check_hf_folder(out, other, 1e-5)


def _nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not list(parent.iterdir())


def test_cross_tokenizer_mixture_is_refused(tiny, tmp_path):
    text = recipe_yaml({"a": tiny["llama"], "b": tiny["other"]}, "a", ["a@1", "b@1"])
    mixture = _mixture(tmp_path, text)
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "hf"
    with pytest.raises(CheckpointError, match=r"another tokenizer.*compose serve") as raised:
        export_hf(mixture, out)
    assert "\n" not in str(raised.value)
    assert _nothing_written(tmp_path / "exports", out)


def test_quantized_base_is_refused(single, tmp_path):
    mixture = tmp_path / "mixture"
    mixture.mkdir()
    for path in single.iterdir():
        data = path.read_bytes()
        if path.name == "recipe.yaml":
            data = data.replace(b"quantization: none", b"quantization: nf4")
        (mixture / path.name).write_bytes(data)
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "hf"
    with pytest.raises(CheckpointError, match=r"nf4-quantized.*compose export DIR OUT"):
        export_hf(mixture, out)
    assert _nothing_written(tmp_path / "exports", out)


def test_lora_patch_is_exported_merged(tiny, tmp_path):
    """A `lora:` base is stored with its patch merged (as compose runs it), and says so."""
    pytest.importorskip("peft")
    from safetensors import safe_open
    from test_port import _peft_adapter

    _peft_adapter(tiny["llama"], tmp_path / "adapter")
    text = recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]).replace(
        f"{{path: {tiny['llama']}}}", f"{{path: {tiny['llama']}, lora: {tmp_path / 'adapter'}}}"
    )
    out = tmp_path / "hf"
    export_hf(_mixture(tmp_path, text), out)  # checked against compose's own logits
    key = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(tiny["llama"] / "model.safetensors"), framework="pt") as handle:
        original = handle.get_tensor(key)
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as handle:
        exported = handle.get_tensor(f"base_a.{key}")
    assert not torch.equal(original, exported)
    assert "LoRA patch merged" in (out / "README.md").read_text()


def test_a_bfloat16_base_exports_bit_for_bit(tiny, tmp_path):
    """A half-precision base runs in the export as compose runs it (its weights bfloat16, its
    rotary frequencies float32, as transformers loads it alone): logits equal to the bit."""
    llama = tiny["llama"]
    text = recipe_yaml({"a": llama}, "a", ["a@1", "a@3"])
    text = text.replace(f"{{path: {llama}}}", f"{{path: {llama}, dtype: bfloat16}}")
    assert "dtype: bfloat16" in text
    folder = _mixture(tmp_path, text)
    export_hf(folder, tmp_path / "hf")
    reference = compose_reference(load_mixture(folder, fetch=False))
    check_hf_folder(tmp_path / "hf", reference, 0.0)

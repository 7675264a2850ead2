"""The real `compose` CLI end to end on tiny bases, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import recipe_yaml
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def recipe_path(tiny, write_recipe):
    return write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))


def test_validate_ok(recipe_path):
    result = _run("validate", recipe_path)
    assert result.exit_code == 0, result.output
    assert "valid (2 base(s), 2 taps checked)" in result.output


def test_plan_json(recipe_path):
    result = _run("plan", recipe_path, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["anchor"] == "a"
    assert [b["name"] for b in plan["bases"]] == ["a", "b"]
    assert plan["trainable_params"] > 0
    assert plan["memory_bytes"]["total"] > plan["memory_bytes"]["frozen_weights"]


def test_plan_table(recipe_path):
    result = _run("plan", recipe_path, "carry_on.width=64")
    assert result.exit_code == 0, result.output
    assert "training memory estimate" in result.output and "trainable" in result.output


def test_build_then_generate(recipe_path, tmp_path):
    out = tmp_path / "mix"
    result = _run("build", recipe_path, "--out", out, "--steps", "3", "train.eval_every=3")
    assert result.exit_code == 0, result.output
    assert "built" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["peak_rss_bytes"] > 0
    result = _run("generate", out, "--prompt", "How many days?", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    from composer.artifacts.load import load_mixture
    from composer.generation.decode import generate

    expected = generate(load_mixture(out), "How many days?", 5)
    assert result.stdout == expected + "\n"
    result = _run(
        "generate", out, "--prompt", "How many days?", "--max-new-tokens", "5", "--show-gates"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"  # the same text, coloured on a terminal
    assert "dominant source per token" in result.output and "a@1" in result.output
    from composer.generation.sampling import Sampling

    sampled = ["--temperature", "1.5", "--seed", "3", "--top-k", "50", "--max-new-tokens", "8"]
    result = _run("generate", out, "--prompt", "How many days?", *sampled)
    assert result.exit_code == 0, result.output
    hot = Sampling(temperature=1.5, seed=3, top_k=50)
    assert result.stdout == generate(load_mixture(out), "How many days?", 8, sampling=hot) + "\n"


def test_generate_from_a_base_alone_is_the_base_s_own_greedy_text(tiny):
    """A model folder as `compose generate` takes it: its answer is the one transformers'
    own greedy decoding of that folder gives (no carry-on in between)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "How many days are in a week"
    result = _run("generate", tiny["llama"], "--prompt", prompt, "--raw", "--max-new-tokens", "9")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None)
    expected = tokenizer.decode(out[0, ids.shape[1] :])
    assert len(expected) > 0 and result.stdout == expected + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "missing.yaml"], "missing.yaml: no such recipe file"),
        (
            ["validate", "{recipe}", "taps=[a@1, a@99]"],
            "taps.1: layer 99 out of range for base 'a'",
        ),
        (
            ["validate", "{recipe}", "carry_on.bogus=1"],
            "carry_on.bogus: Extra inputs are not permitted",
        ),
        (["plan", "{recipe}", "bases.a.path=/nowhere"], "base folder /nowhere does not exist"),
        (
            ["generate", "{tmp}/nothing", "--prompt", "x"],
            "is not a mixture directory, a model folder, a built recipe or a base card",
        ),
        (["bases", "pull", "no-such-base"], "unknown base card 'no-such-base'"),
    ],
)
def test_bad_input_is_one_line(recipe_path, tmp_path, args, message):
    args = [a.format(recipe=recipe_path, tmp=tmp_path) for a in args]
    result = _run(*args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_bad_input_leaves_no_output_dir(tiny, write_recipe, tmp_path):
    text = recipe_yaml({"a": tiny["llama"], "o": tiny["other"]}, "a", ["a@1", "o@7"])
    out = tmp_path / "never"
    result = _run("build", write_recipe(text), "--out", out)
    assert result.exit_code == 1
    assert "taps.1: layer 7 out of range for base 'o'" in result.output
    assert not out.exists()


def test_debug_shows_traceback(tmp_path):
    result = _run("--debug", "validate", tmp_path / "missing.yaml")
    assert result.exit_code != 0
    assert result.exception is not None

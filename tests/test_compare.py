"""`compose compare`: statistics on hand-checkable inputs, the code sandbox against hostile
programs, and whole comparisons of tiny mixtures with known answers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import recipe_yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from composer.compare import scoring
from composer.compare.runner import compare, resolve_side
from composer.compare.stats import (
    A_BETTER,
    B_BETTER,
    NO_DIFFERENCE,
    bootstrap_ci,
    compare_paired,
    mcnemar_exact,
)
from composer.compare.suites import SUITES, Item, Suite, SuiteRegistry
from composer.errors import CompareError
from composer.recipe import load_recipe
from composer.training.build import build

# --- statistics -----------------------------------------------------------------------------------


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)  # 2 * P(X <= 1), X ~ B(10, .5)
    assert mcnemar_exact(3, 3) == 1.0


def test_bootstrap_interval():
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25)
    diffs = [0.0, 1.0] * 50
    low, high = bootstrap_ci(diffs, seed=3)
    assert low < 0.5 < high and high - low < 0.3
    assert bootstrap_ci(diffs, seed=3) == (low, high)  # seeded: the same interval again


def test_verdicts():
    passes = compare_paired([1] * 10, [0] * 10, higher_is_better=True, binary=True)
    assert passes.verdict == A_BETTER and passes.p_value == pytest.approx(2 / 1024)
    assert (passes.a_only, passes.b_only) == (10, 0)
    few = compare_paired([1, 0, 0], [0, 1, 1], higher_is_better=True, binary=True)
    assert few.verdict == NO_DIFFERENCE  # 1 vs 2 discordant pairs is no evidence
    losses = compare_paired(
        [2.0, 3.0, 2.5, 2.2], [1.0, 2.1, 1.4, 1.3], higher_is_better=False, binary=False
    )
    assert losses.verdict == B_BETTER and losses.ci[1] < 0
    same = compare_paired([1.5, 2.5], [1.5, 2.5], higher_is_better=False, binary=False)
    assert same.verdict == NO_DIFFERENCE and same.ci == (0.0, 0.0)


def test_registry_rejects_a_taken_name():
    registry = SuiteRegistry()
    registry.register(SUITES.get("gsm"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(SUITES.get("gsm"))
    with pytest.raises(CompareError, match="unknown suite 'nope'"):
        registry.get("nope")


def test_final_number():
    assert scoring.final_number("so 12 * 3 = 36\n#### 1,036\nmore 7") == "1036"
    assert scoring.final_number("He has 4 apples, then 9.5 pears.") == "9.5"
    assert scoring.final_number("no digits") is None
    assert scoring.same_number("36.0", "36") and not scoring.same_number("35", "36")


def test_humaneval_completions_end_at_the_first_stop(tiny):
    from transformers import AutoTokenizer

    from composer.generation.detokenize import TextStream

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    # A chat model that closes an imagined code fence has finished its code.
    cases = {
        "    return 1\n```\nThis returns one.": "    return 1\n",
        "    x = 1\n\ndef f():\n": "    x = 1\n",
    }
    for text, completion in cases.items():
        stream = TextStream(tokenizer, scoring.HUMANEVAL_STOPS)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            stream.push(token)
        stream.finish()
        assert stream.stopped and stream.text == completion


def test_humaneval_chat_asks_the_function_and_opens_the_answer_with_its_header(tiny):
    """humaneval-chat: the problem in a user message, and the assistant's turn opened with a
    python fence and the function's header, so the answer continues the body: the program run
    is the prompt and that continuation, as for humaneval."""
    from transformers import AutoTokenizer

    from composer.compare.suites import humaneval_items
    from composer.generation.templates import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    problem = humaneval_items(1, [])[0].data
    text = scoring.humaneval_chat_prompt(tokenizer, problem)
    opened = "```python\n" + problem["prompt"]
    assert text.endswith(opened)
    asked = text.removesuffix(opened)
    content = scoring.HUMANEVAL_ASK.format(prompt=problem["prompt"])
    assert f"```python\n{problem['prompt']}```" in content
    assert asked == format_prompt(tokenizer, [{"role": "user", "content": content}])
    assert asked.rstrip().endswith("assistant")  # the tiny template opens the assistant's turn


# --- whole comparisons on tiny mixtures -------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtures(tiny, tmp_path_factory) -> dict[str, Path]:
    """A built mixture, and a copy whose correction is large random noise: strictly worse."""
    root = tmp_path_factory.mktemp("compare")
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))
    good = root / "good"
    build(load_recipe(recipe), out=good, steps=2)
    bad = root / "bad"
    shutil.copytree(good, bad)
    weights = load_file(str(bad / "carry_on.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights["up.weight"] = torch.randn(weights["up.weight"].shape, generator=generator) * 3
    save_file(weights, str(bad / "carry_on.safetensors"))
    return {"good": good, "bad": bad, "recipe": recipe}


def test_strictly_worse_side_loses(mixtures, tmp_path):
    out = tmp_path / "report"
    result = compare(
        str(mixtures["good"]),
        str(mixtures["bad"]),
        suites=["loss-math", "loss-code"],
        limit=5,
        out=out,
        cache_dir=tmp_path / "cache",
    )
    for suite in result.suites:
        assert suite.comparison is not None
        assert suite.comparison.verdict == A_BETTER, suite.suite.name
        assert all(row["b_score"] > row["a_score"] for row in suite.items)
        assert suite.unit == "token" and len(suite.items) == 5
        assert set(suite.gates["A"]) == {"a@1", "b@2"}
    report = json.loads((out / "report.json").read_text())
    rows = report["suites"]["loss-math"]["items"]
    assert len(rows) == 5 and {"nll", "tokens", "bytes"} <= set(rows[0]["a"])
    assert report["suites"]["loss-math"]["comparison"]["verdict"] == A_BETTER
    markdown = (out / "report.md").read_text()
    assert "(the recipes are identical)" in markdown and "A better" in markdown
    assert markdown.count("| gsm/") == 5
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_mixture_against_itself_and_the_result_cache(mixtures, tmp_path):
    cache = tmp_path / "cache"
    run = lambda: compare(  # noqa: E731
        str(mixtures["good"]), str(mixtures["good"]), suites=["loss-chat"], limit=4, cache_dir=cache
    )
    first = run()
    assert first.suites[0].comparison.verdict == NO_DIFFERENCE
    assert first.computed == {"A": 4, "B": 0}  # same mixture key: B reads A's results
    assert run().computed == {"A": 0, "B": 0}
    finished = sorted(cache.rglob("*.json"))
    assert len(finished) == 4
    finished[0].unlink()  # as if the run had crashed before this item
    assert run().computed == {"A": 1, "B": 0}
    # Training settings do not change what a built mixture computes: same key, same results.
    retrained = tmp_path / "retrained"
    shutil.copytree(mixtures["good"], retrained)
    recipe = (retrained / "recipe.yaml").read_text()
    assert "  steps: 4\n" in recipe
    (retrained / "recipe.yaml").write_text(recipe.replace("  steps: 4\n", "  steps: 9\n"))
    again = compare(
        str(retrained), str(mixtures["bad"]), suites=["loss-chat"], limit=4, cache_dir=cache
    )
    assert again.computed == {"A": 0, "B": 4}


def test_skip_leaves_out_the_first_items_and_reads_the_rest_from_the_cache(mixtures, tmp_path):
    """--skip K: the items after each suite's first K (those a setting was chosen on), the
    same items and results as in a run over all of them, said in both reports."""
    cache, out = tmp_path / "cache", tmp_path / "report"
    sides = (str(mixtures["good"]), str(mixtures["bad"]))
    every = compare(*sides, suites=["loss-chat"], limit=5, cache_dir=cache)
    rest = compare(*sides, suites=["loss-chat"], limit=2, skip=3, cache_dir=cache, out=out)
    assert rest.computed == {"A": 0, "B": 0}
    assert rest.suites[0].items == every.suites[0].items[3:5]
    assert json.loads((out / "report.json").read_text())["left_out"] == 3
    assert "first 3 items are left out (`--skip`)" in (out / "report.md").read_text()
    with pytest.raises(CompareError, match="has no items after the first 100000$"):
        compare(*sides, suites=["loss-chat"], skip=100_000, cache_dir=cache)


def test_each_result_is_cached_as_it_is_ready(mixtures, tmp_path):
    """Generation suites hand back each item as its answer ends, `--batch` decoded together:
    an interrupt keeps every finished item, and a rerun computes only the rest."""
    cache, at_once = tmp_path / "cache", []

    def interrupted(mixture, items, settings):
        for k, result in scoring.run_gsm(mixture, items, settings):
            at_once.append(settings["at_once"])
            if len(at_once) == 3:
                raise KeyboardInterrupt
            yield k, result

    def registry(run) -> SuiteRegistry:
        suites = SuiteRegistry()
        gsm = dataclasses.replace(SUITES.get("gsm"), run=run, settings={"max_new_tokens": 8})
        suites.register(gsm)
        return suites

    sides = (str(mixtures["good"]), str(mixtures["bad"]))
    with pytest.raises(KeyboardInterrupt):
        compare(*sides, limit=5, batch=2, cache_dir=cache, registry=registry(interrupted))
    assert at_once == [2, 2, 2]
    assert len(list(cache.rglob("*.json"))) == 2  # the two that ended before the interrupt
    again = compare(*sides, limit=5, batch=2, cache_dir=cache, registry=registry(scoring.run_gsm))
    assert again.computed == {"A": 3, "B": 5}
    assert len(again.suites[0].items) == 5


def test_a_model_field_added_later_keys_results_as_before_while_unset(tiny, write_recipe):
    """`carry_on.write_at` came after results were cached: unset it is not in the key (those
    results stay found); set, it is (another mixture)."""
    from composer.compare.runner import key_fields

    bases = {"a": tiny["llama"], "b": tiny["qwen2"]}
    plain = load_recipe(write_recipe(recipe_yaml(bases, "a", ["a@1", "b@2"])))
    assert "write_at" not in key_fields(plain)["carry_on"]
    assert key_fields(plain)["carry_on"]["width"] == 32  # the other model fields stay
    writing = load_recipe(
        write_recipe(recipe_yaml(bases, "a", ["a@1", "b@2"])), ["carry_on.write_at=1"]
    )
    assert key_fields(writing)["carry_on"]["write_at"] == 1


@pytest.fixture
def tiny_card(tiny, tmp_path, monkeypatch) -> str:
    """A base card `tiny-llama` for the tiny Llama folder, in a cards folder of its own."""
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "tiny.yaml").write_text(
        f"name: tiny-llama\nrole: chat\nfamily: llama\nsource: {{kind: folder, path: {tiny['llama']}}}\n"
    )
    monkeypatch.setenv("COMPOSE_BASES_DIR", str(cards))
    return "tiny-llama"


def test_base_alone_generation_suites_and_recipe_sides(mixtures, tiny_card, tmp_path, monkeypatch):
    prompts = [
        Item("p/1", {"category": "writing", "prompt": "Write a line."}),
        Item("p/2", {"category": "math", "prompt": "What is 6 * 2?"}),
    ]
    registry = SuiteRegistry()
    registry.register(dataclasses.replace(SUITES.get("gsm"), settings={"max_new_tokens": 8}))
    registry.register(
        dataclasses.replace(
            SUITES.get("humaneval"),
            settings={"max_new_tokens": 8, "timeout_s": 5, "memory_mb": 512},
        )
    )
    registry.register(
        dataclasses.replace(
            SUITES.get("humaneval-chat"),
            settings={"max_new_tokens": 8, "timeout_s": 5, "memory_mb": 512},
        )
    )
    registry.register(
        Suite(
            name="prompts",
            description="side by side",
            kind="generations",
            metric="",
            higher_is_better=True,
            size=2,
            load=lambda n, recipes: prompts[:n],
            run=scoring.run_generation,
            settings={"max_new_tokens": 6},
        )
    )
    out = tmp_path / "report"
    result = compare(
        "tiny-llama",
        str(mixtures["good"]),
        limit=2,
        out=out,
        cache_dir=tmp_path / "cache",
        registry=registry,
        unsafe_no_jail=True,  # tiny models' code; where namespaces are refused, run it anyway
    )
    assert result.a.kind == "base" and result.b.kind == "mixture"
    gsm, humaneval, humaneval_chat, side_by_side = result.suites
    assert gsm.comparison.test == "mcnemar" and len(gsm.items) == 2
    assert "A" not in gsm.gates  # the base alone has no router to report
    assert all(row["a"]["status"] for row in humaneval.items)
    assert all(row["a"]["status"] for row in humaneval_chat.items)
    assert side_by_side.comparison is None
    markdown = (out / "report.md").read_text()
    assert "### writing" in markdown and "### math" in markdown
    assert "# the base alone, no carry-on" in markdown
    # Decoded one item at a time (nothing cached), every answer is the one decoded in a batch.
    alone = compare(
        "tiny-llama",
        str(mixtures["good"]),
        limit=2,
        batch=1,
        cache_dir=tmp_path / "cache-alone",
        registry=registry,
    )
    assert sum(alone.computed.values()) == 2 * (2 + 2 + 2 + 2)
    for batched, single in zip(result.suites, alone.suites, strict=True):
        for row, row_alone in zip(batched.items, single.items, strict=True):
            for side in ("a", "b"):
                answer = {k: v for k, v in row[side].items() if k != "gate"}
                assert answer == {k: v for k, v in row_alone[side].items() if k != "gate"}
    # The same base alone again, through a recipe and its build directory as side B:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompareError, match="is not built"):
        resolve_side("B", str(mixtures["recipe"]))
    shutil.copytree(mixtures["good"], tmp_path / "runs" / "tiny")
    side = resolve_side("B", str(mixtures["recipe"]))
    assert side.folder == Path("runs/tiny") and side.key == result.b.key


def test_a_model_folder_is_a_side_like_its_card(tiny, tiny_card, tmp_path):
    registry = SuiteRegistry()
    registry.register(SUITES.get("loss-code"))
    result = compare(
        str(tiny["llama"]), tiny_card, limit=3, cache_dir=tmp_path / "c", registry=registry
    )
    assert result.a.kind == result.b.kind == "base"
    assert result.a.recipe.bases["model"].path == str(tiny["llama"].resolve())
    rows = result.suites[0].items
    assert [r["a"]["nll"] for r in rows] == [r["b"]["nll"] for r in rows]
    # CARD:DTYPE: the base alone in that dtype, as a mixture's anchor runs in its recipe's.
    plain, half = resolve_side("B", tiny_card), resolve_side("B", f"{tiny_card}:bfloat16")
    assert plain.recipe.bases["chat"].dtype == "float32"
    assert half.recipe.bases["chat"].dtype == "bfloat16" and half.key != plain.key
    assert resolve_side("B", f"{tiny_card}:float32").key == plain.key
    with pytest.raises(CompareError, match="'int3' is not a dtype"):
        resolve_side("B", f"{tiny_card}:int3")
    # FOLDER:DTYPE likewise (a merged LoRA run in its anchor's dtype).
    folder, folder_half = (resolve_side("A", f"{tiny['llama']}{s}") for s in ("", ":bfloat16"))
    assert folder_half.recipe.bases["model"].dtype == "bfloat16" and folder_half.key != folder.key
    assert folder_half.recipe.bases["model"].path == folder.recipe.bases["model"].path
    assert folder_half.recipe.name == folder.recipe.name == "llama-alone"
    assert resolve_side("A", f"{tiny['llama']}:float32").key == folder.key == result.a.key
    with pytest.raises(CompareError, match="'int3' is not a dtype"):
        resolve_side("A", f"{tiny['llama']}:int3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CompareError, match="nor a model folder"):
        resolve_side("A", str(empty))


def test_compare_cli(mixtures, tmp_path):
    runner = CliRunner()
    args = ["compare", str(mixtures["good"]), str(mixtures["bad"]), "--suite", "loss-code"]
    args += ["--limit", "3", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "A better" in result.stdout and "loss-code" in result.stdout
    assert (tmp_path / "r" / "report.md").is_file()
    result = runner.invoke(app, ["compare", str(tmp_path / "missing"), str(mixtures["good"])])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "is not a mixture directory, a model folder, a built recipe or a base card" in lines[0]


def test_held_out_suites_skip_what_a_recipe_trained_on(tiny, write_recipe):
    from transformers import AutoTokenizer

    from composer.compare.suites import chat_items, gsm_items, trained_chat_pairs
    from composer.features.data import encode_qa, load_chatterbot
    from composer.recipe import MixData

    mix = """
        train:
          data:
            kind: mix
            parts:
              - {domain: chat, data: {kind: chatterbot, size: 40, seed: 3}}
              - {domain: math, data: {kind: gsm_symbolic, size: 30, seed: 0}}
        """
    recipe = load_recipe(write_recipe(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"], train=mix)))
    # The chat training reads: its own part and the chatterbot part of the preservation text.
    assert recipe.train.preserve is not None and isinstance(recipe.train.preserve.data, MixData)
    specs = [recipe.train.data.parts[0].data]
    specs += [p.data for p in recipe.train.preserve.data.parts if p.data.kind == "chatterbot"]
    assert len(specs) == 2
    # The pairs we exclude are exactly the ones training reads.
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    ours = sorted(
        encode_qa(tokenizer, [{"role": "user", "content": q}], a, 320).input_ids
        for q, a in trained_chat_pairs([recipe])
    )
    theirs = sorted(
        {tuple(e.input_ids) for spec in specs for e in load_chatterbot(spec, tokenizer, 320)}
    )
    assert [tuple(x) for x in ours] == theirs
    trained = trained_chat_pairs([recipe])
    for item in chat_items(10_000, [recipe]):
        first, second = item.data["messages"][:2]
        assert (first["content"], second["content"]) not in trained
    import reasoning_gym

    questions = {
        e["question"] for e in reasoning_gym.create_dataset("gsm_symbolic", size=30, seed=0)
    }
    assert not questions & {item.data["question"] for item in gsm_items(200, [recipe])}

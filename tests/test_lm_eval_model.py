"""lm-evaluation-harness: local tasks (a task YAML over a local jsonl, no hub) on a tiny
mixture whose bases tokenize differently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import recipe_yaml, write_mixture_dir
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from composer.compare.scoring import _loss
from composer.features.data import IGNORE
from composer.generation.decode import Generation
from composer.serving.lm_eval_model import ComposeLM

QUESTIONS = [
    {
        "question": "He works 6 days a week. How many days in 2 weeks?",
        "choices": ["12", "8"],
        "answer": 0,
        "target": "12",
    },
    {
        "question": "def add(a, b):\n    return",
        "choices": [" a + b", " a - b"],
        "answer": 0,
        "target": "a + b",
    },
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        doc_to_text: "{{{{question}}}}"
    """
    (root / "mc.yaml").write_text(
        textwrap.dedent(
            """
            task: compose_mc
            output_type: multiple_choice
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{answer}}"
            metric_list:
              - metric: acc
            """
        )
        + textwrap.dedent(common)
    )
    (root / "gen.yaml").write_text(
        textwrap.dedent(
            """
            task: compose_gen
            output_type: generate_until
            doc_to_target: "{{target}}"
            generation_kwargs:
              until: ["\\n\\n", "dog"]
              max_gen_toks: 8
              do_sample: false
            metric_list:
              - metric: exact_match
            """
        )
        + textwrap.dedent(common)
    )
    return root


@pytest.fixture(scope="module")
def mixture_dir(tiny, tmp_path_factory) -> Path:
    """The anchor's tokenizer and another one: the other base is read through alignment."""
    root = tmp_path_factory.mktemp("harness")
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"], "o": tiny["other"]}, "a", ["a@2", "o@1"]))
    return write_mixture_dir(recipe, root / "cross")


def test_local_tasks_score_as_the_mixture_does(tasks, mixture_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = ComposeLM(path=str(mixture_dir))
    assert lm.mixture.aligned == {"o"}
    results = simple_evaluate(
        model=lm,
        tasks=["compose_mc", "compose_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    assert results is not None
    assert 0.0 <= results["results"]["compose_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["compose_mc"]
    assert len(samples) == len(QUESTIONS)
    tokenizer = lm.tokenizer
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            loglikelihood = float(resp[0][0])
            # the mixture's own scoring (compare's loss suites) of the same tokens
            context_ids, continuation_ids = lm._split(context, continuation)
            assert (
                context_ids + continuation_ids
                == tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            )
            ids = context_ids + continuation_ids
            labels = [IGNORE] * len(context_ids) + continuation_ids
            own = _loss(lm.mixture, ids, labels, len(continuation.encode()))
            assert own["tokens"] == len(continuation_ids)
            assert loglikelihood == pytest.approx(-own["nll"], rel=1e-4, abs=1e-4)
            checked += 1
    assert checked == sum(len(q["choices"]) for q in QUESTIONS)

    for sample in results["samples"]["compose_gen"]:
        context, _kwargs = sample["arguments"][0]
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        expected = Generation(lm.mixture, ids, 8, stop=["\n\n", "dog"]).run().text
        assert sample["resps"][0][0] == expected


def test_rolling_loglikelihood(mixture_dir):
    from lm_eval.api.instance import Instance

    text = "The quick brown fox jumps over the lazy dog. He works 6 days a week."
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    lm = ComposeLM(path=str(mixture_dir))
    (rolling,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    # one window: every token scored once, the first after the prefix token
    (whole, _) = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])[0]
    assert rolling == pytest.approx(whole, rel=1e-5) and rolling < 0
    assert len(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) > 16
    lm.max_length = 16  # several windows, each with less context
    (windowed,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    assert windowed < 0 and windowed != pytest.approx(rolling, rel=1e-6)


def test_a_base_alone_scores_as_transformers_scores_it(tiny):
    """path= a model folder: the base alone, its loglikelihoods transformers' own."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    lm = ComposeLM(path=str(tiny["llama"]))
    context, continuation = "The quick brown fox", " jumps over the lazy dog"
    ((score, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    context_ids, continuation_ids = lm._split(context, continuation)
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0, :-1]
    picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0][len(context_ids) - 1 :]
    assert len(picked) == len(continuation_ids)
    assert score == pytest.approx(float(picked.sum()), rel=1e-4, abs=1e-4)


def test_lm_eval_command_line_finds_the_compose_model(tasks, tiny_mixture_dir, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "composer.serving.lm_eval_model",
        "run",
        "--model",
        "compose",
        "--model_args",
        f"path={tiny_mixture_dir}",
        "--tasks",
        "compose_mc",
        "--include_path",
        str(tasks),
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compose_mc" in done.stdout and "acc" in done.stdout

"""`compose answer`: a model answers a recipe's training questions; the right answers become
training targets. The answering model is the tiny Llama taught (a few seconds of Adam) to write
known answers, so which rows are right, wrong or cut is known before the command runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from tests.conftest import recipe_yaml

# question -> what the taught model writes; the dataset's reference final number below.
TAUGHT = {
    "What is 2 plus 3?": "2 + 3 = 5\n#### 5",  # right
    "What is 4 plus 4?": "4 + 4 = 9\n#### 9",  # wrong: the reference says 8
    "What is 1 plus 6?": "1 + 6 = 7.",  # right by its last number, no #### line
    "Count to twenty.": "one two three four five six seven eight nine ten eleven twelve",  # cut
}
REFERENCE = {
    "What is 2 plus 3?": "2+3 = <<2+3=5>>5\n#### 5",
    "What is 4 plus 4?": "4+4 = <<4+4=8>>8\n#### 8",
    "What is 1 plus 6?": "#### 7",
    "Count to twenty.": "#### 20",
}
MAX_NEW_TOKENS = 24  # the counting answer (57 tokens) is cut: never kept (README's entry says 24)


def _teach(tiny, folder: Path, pairs: list[tuple[list[dict], str]], seq_len: int) -> Path:
    """The tiny Llama trained (Adam) until its greedy answer to each prompt is the one given,
    as a training example encodes it, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer.features.data import collate, encode_qa, pad_id

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    examples = [encode_qa(tokenizer, messages, answer, seq_len) for messages, answer in pairs]
    batch = collate([e for e in examples if e is not None], pad_id(tokenizer))
    labels = batch["labels"][:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(400):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        right = (logits[:, :-1].argmax(-1) == labels)[labels != -100]
        if bool(right.all()):
            break
    assert bool(right.all()), "the tiny model did not learn its answers"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taught(tiny, tmp_path_factory) -> Path:
    """The tiny Llama trained until its greedy answer to each question is TAUGHT's."""
    pairs = [([{"role": "user", "content": q}], a) for q, a in TAUGHT.items()]
    return _teach(tiny, tmp_path_factory.mktemp("taught") / "llama", pairs, 128)


@pytest.fixture()
def recipe(taught, tmp_path, write_recipe) -> Path:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in REFERENCE.items()))
    train = f"""
        train:
          data:
            kind: hf
            dataset: {data}
            fields: {{question: q, answer: a}}
          steps: 2
          batch_size: 2
          seq_len: 128
        """
    return write_recipe(recipe_yaml({"a": taught}, "a", ["a@1"], train=textwrap.dedent(train)))


def _answer(recipe: Path, out: Path, *args: str):
    return CliRunner().invoke(
        app,
        ["answer", str(recipe), "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), *args],
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keeps_the_finished_answers_whose_final_number_is_right(recipe, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["answer", str(recipe), "--out", str(out), "--max-new-tokens", "24", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [(r["question"], r["answer"]) for r in rows] == [
        ("What is 2 plus 3?", TAUGHT["What is 2 plus 3?"]),
        ("What is 1 plus 6?", TAUGHT["What is 1 plus 6?"]),
    ]
    assert [r["reference"] for r in rows] == ["5", "7"]
    summary = json.loads(result.stdout)
    assert (summary["questions"], summary["answers"], summary["unfinished"]) == (4, 4, 1)
    assert (summary["correct"], summary["questions_right"], summary["kept"]) == (2, 2, 2)
    assert not (tmp_path / "answers.jsonl.partial").exists()


def test_keep_all_keeps_every_finished_answer(recipe, tmp_path):
    out = tmp_path / "all.jsonl"
    assert _answer(recipe, out, "--keep", "all").exit_code == 0
    kept = {r["question"]: r["answer"] for r in _rows(out)}
    assert kept == {q: a for q, a in TAUGHT.items() if q != "Count to twenty."}


def test_the_answers_train_as_the_targets_they_are(recipe, tmp_path):
    """A recipe reading the written file trains on the model's own answers, loss on them."""
    from transformers import AutoTokenizer

    from composer.features.data import load_examples
    from composer.recipe import load_recipe

    out = tmp_path / "answers.jsonl"
    assert _answer(recipe, out).exit_code == 0
    spec = load_recipe(
        recipe,
        [
            f"train.data.dataset={out}",
            "train.data.fields.question=question",
            "train.data.fields.answer=answer",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.bases["a"].path)
    examples = load_examples(spec.train.data, tokenizer, 128)
    targets = [tokenizer.decode([t for t in e.labels if t != -100]) for e in examples]
    # Each target: the answer and the end of the turn, as the tiny chat template writes it.
    assert targets == [TAUGHT["What is 2 plus 3?"] + "<|im_end|>\n", "1 + 6 = 7.<|im_end|>\n"]


def test_a_rerun_reuses_the_answers_an_interrupted_run_wrote(recipe, tmp_path):
    from composer.compare.runner import anchor_alone
    from composer.recipe import load_recipe

    out = tmp_path / "answers.jsonl"
    key = anchor_alone("model", load_recipe(recipe)).key
    earlier = {
        "index": 0,
        "sample": 0,
        "question": "What is 2 plus 3?",
        "answer": "five, written earlier\n#### 5",
        "reference": "5",
        "finished": True,
        "correct": True,
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 0.0,
        "seed": 0,
        "key": key,
    }
    other_model = {**earlier, "index": 1, "answer": "from another model #### 8", "key": "x"}
    (tmp_path / "answers.jsonl.partial").write_text(
        json.dumps(earlier) + "\n" + json.dumps(other_model) + "\n" + '{"index": 2, "que'
    )
    result = _answer(recipe, out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reused"] == 1
    assert [r["answer"] for r in _rows(out)] == [earlier["answer"], TAUGHT["What is 1 plus 6?"]]


def test_refusals_write_nothing(recipe, tmp_path, write_recipe, tiny):
    out = tmp_path / "answers.jsonl"
    out.write_text("mine\n")
    result = _answer(recipe, out)
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_text() == "mine\n"

    no_number = tmp_path / "prose.jsonl"
    no_number.write_text(json.dumps({"q": "Say hi.", "a": "Hello there!"}) + "\n")
    fresh = tmp_path / "fresh.jsonl"
    result = _answer(recipe, fresh, f"train.data.dataset={no_number}")
    assert result.exit_code == 1 and "no final number" in result.output
    assert "--keep all" in result.output
    assert not fresh.exists() and not (tmp_path / "fresh.jsonl.partial").exists()

    other = write_recipe(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]), "gsm.yaml")
    result = _answer(other, fresh)
    assert result.exit_code == 1 and "reads the questions of an `hf` source" in result.output
    result = _answer(recipe, tmp_path / "answers.txt")
    assert result.exit_code == 1 and ".jsonl" in result.output
    assert not fresh.exists()


def test_a_second_run_to_the_same_file_is_refused(recipe, tmp_path):
    from composer.training.build import output_lock

    out = tmp_path / "answers.jsonl"
    with output_lock(out):  # another run holds it
        result = _answer(recipe, out)
    assert result.exit_code == 1 and "being written by another run" in result.output
    assert not out.exists() and not (tmp_path / "answers.jsonl.partial").exists()


def test_sampled_answers_are_seeded_and_every_kept_one_is_right(recipe, tmp_path):
    """Three answers per question at temperature 1.5: reproducible from the seed; every kept
    row is a distinct finished answer with the reference's final number."""
    from composer.compare.scoring import final_number, same_number

    runs = []
    for name in ("one.jsonl", "two.jsonl"):
        result = _answer(
            recipe, tmp_path / name, "--samples", "3", "--temperature", "1.5", "--json"
        )
        assert result.exit_code == 0, result.output
        runs.append((tmp_path / name).read_text())
    assert runs[0] == runs[1]
    summary = json.loads(result.stdout)
    assert (summary["questions"], summary["answers"]) == (4, 12)
    rows = _rows(tmp_path / "two.jsonl")
    assert len(rows) == summary["kept"] == len({(r["question"], r["answer"]) for r in rows})
    for row in rows:
        assert same_number(final_number(row["answer"]), row["reference"])
    # Sampled, not greedy: some answer differs from the one the model was taught (the seed
    # fixes which, so this holds on every run).
    every = tmp_path / "every.jsonl"
    assert (
        _answer(recipe, every, "--samples", "3", "--temperature", "1.5", "--keep", "all").exit_code
        == 0
    )
    assert {r["answer"] for r in _rows(every)} - set(TAUGHT.values())
    greedy = _answer(recipe, tmp_path / "greedy.jsonl", "--samples", "2")
    assert greedy.exit_code == 1 and "needs a --temperature above 0" in greedy.output
    assert not (tmp_path / "greedy.jsonl").exists()


def test_retry_samples_again_only_where_no_answer_is_right_yet(recipe, tmp_path, monkeypatch):
    """--retry: a greedy answer to every question, then one sampled answer at a time to each
    question whose answers are all wrong so far, at most 3; every kept row is right; the greedy
    answers that were right are kept."""
    from composer.compare import answers
    from composer.compare.scoring import final_number, same_number

    asked: list[tuple[str, int, bool]] = []  # (question, answer number, right), as each ends
    asking = answers._answers
    reference = {q: final_number(a) for q, a in REFERENCE.items()}

    def recorded(mixture, asks, drawn, rows, how, code):
        for (index, sample), (text, reason) in asking(mixture, asks, drawn, rows, how, code):
            question = rows[index][drawn.columns["question"]]
            right = reason != "length" and same_number(final_number(text), reference[question])
            asked.append((question, sample, right))
            yield (index, sample), (text, reason)

    monkeypatch.setattr(answers, "_answers", recorded)
    out = tmp_path / "star.jsonl"
    args = ("--retry", "3", "--temperature", "1.5", "--json")
    result = _answer(recipe, out, *args)
    assert result.exit_code == 0, result.output
    assert sorted(q for q, j, _ in asked if j == 0) == sorted(REFERENCE)  # greedy, each once
    for question in REFERENCE:
        mine = [(j, right) for q, j, right in asked if q == question]
        numbers = [j for j, _ in mine]
        assert numbers == list(range(len(numbers))) and len(numbers) <= 4
        assert not any(right for _, right in mine[:-1])  # asked again only after a wrong one
        assert mine[-1][1] or len(numbers) == 4  # it stops at a right one, or after 3 more
    assert [right for q, j, right in asked if j == 0 and q == "What is 2 plus 3?"] == [True]
    assert any(j > 0 for _, j, _ in asked)  # the wrong and cut questions were asked again
    rows = _rows(out)
    for row in rows:
        assert same_number(final_number(row["answer"]), reference[row["question"]])
    kept = {r["question"]: r["answer"] for r in rows}
    assert kept["What is 2 plus 3?"] == TAUGHT["What is 2 plus 3?"]
    assert kept["What is 1 plus 6?"] == TAUGHT["What is 1 plus 6?"]
    assert set(kept) == {q for q, _, right in asked if right}
    summary = json.loads(result.stdout)
    assert summary["answers"] == len(asked)
    assert summary["questions_right"] == len(kept)

    # A right sampled answer ends a question's retries: an interrupted run wrote answer 1 of
    # "What is 4 plus 4?", right; its greedy answer 0 (wrong) is asked, and nothing after.
    from composer.compare.runner import anchor_alone
    from composer.recipe import load_recipe

    settings = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.5, "seed": 0, "retry": 3}
    written = {
        "index": 1,
        "sample": 1,
        "question": "What is 4 plus 4?",
        "answer": "4 + 4 = 8\n#### 8",
        "reference": "8",
        "finished": True,
        "correct": True,
        "key": anchor_alone("model", load_recipe(recipe)).key,
        **settings,
    }
    resumed = tmp_path / "resumed.jsonl"
    (tmp_path / "resumed.jsonl.partial").write_text(json.dumps(written) + "\n")
    asked.clear()
    result = _answer(recipe, resumed, *args)
    assert result.exit_code == 0, result.output
    assert sorted(q for q, j, _ in asked if j == 0) == sorted(REFERENCE)
    assert {q for q, j, _ in asked if j > 0} == {"Count to twenty."}
    assert json.loads(result.stdout)["reused"] == 1
    assert {r["question"]: r["answer"] for r in _rows(resumed)}["What is 4 plus 4?"] == (
        written["answer"]
    )

    for bad in (("--retry", "2"), ("--retry", "2", "--temperature", "1", "--samples", "2")):
        refused = _answer(recipe, tmp_path / "no.jsonl", *bad)
        assert refused.exit_code == 1 and "--retry 2" in refused.output
    assert not (tmp_path / "no.jsonl").exists()


# Code tasks (fields.tests): text -> (tests, the code the model is taught to write).
TASKS = {
    "Write a function to add two numbers.": (
        ["assert add(1, 2) == 3"],
        "def add(a, b):\n    return a + b",
    ),
    "Write a function to double a number.": (
        ["assert double(2) == 4"],
        "def double(x):\n    return x * 3",
    ),
}


@pytest.fixture(scope="module")
def coder(tiny, tmp_path_factory) -> Path:
    """The tiny Llama trained until it writes TASKS' code, asked as a recipe's code task is."""
    from composer.features.data import code_answer, code_task_prompt

    pairs = [
        ([{"role": "user", "content": code_task_prompt(text, tests)}], code_answer(code))
        for text, (tests, code) in TASKS.items()
    ]
    return _teach(tiny, tmp_path_factory.mktemp("coder") / "llama", pairs, 256)


@pytest.fixture()
def code_recipe(coder, tmp_path, write_recipe) -> Path:
    data = tmp_path / "tasks.jsonl"
    rows = [{"text": t, "code": "pass", "test_list": tests} for t, (tests, _) in TASKS.items()]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = f"""
        train:
          data:
            kind: hf
            dataset: {data}
            fields: {{question: text, answer: code, tests: test_list}}
          steps: 2
          batch_size: 2
          seq_len: 256
        """
    return write_recipe(
        recipe_yaml({"a": coder}, "a", ["a@1"], train=textwrap.dedent(train)), "code.yaml"
    )


def test_code_answers_are_kept_when_they_pass_their_tests(code_recipe, tmp_path):
    """The code that passes its task's tests (run in the sandbox) is kept, the code that fails
    is not; the rows train as code tasks on the model's own code."""
    from transformers import AutoTokenizer

    from composer.features.data import code_answer, load_examples
    from composer.recipe import load_recipe

    out = tmp_path / "code.jsonl"
    args = ["--max-new-tokens", "48", "--unsafe-no-jail", "--json"]
    result = CliRunner().invoke(app, ["answer", str(code_recipe), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["answers"], summary["unfinished"], summary["correct"]) == (2, 0, 1)
    added = "Write a function to add two numbers."
    assert _rows(out) == [{"question": added, "answer": TASKS[added][1], "tests": TASKS[added][0]}]
    fields = ["question=question", "answer=answer", "tests=tests"]
    spec = load_recipe(
        code_recipe, [f"train.data.dataset={out}", *(f"train.data.fields.{f}" for f in fields)]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.bases["a"].path)
    (example,) = load_examples(spec.train.data, tokenizer, 256)
    target = tokenizer.decode([t for t in example.labels if t != -100])
    assert target == code_answer(TASKS[added][1]) + "<|im_end|>\n"
    every = tmp_path / "every.jsonl"
    assert _answer(code_recipe, every, "--keep", "all").exit_code == 0
    assert [r["answer"] for r in _rows(every)] == [code for _, code in TASKS.values()]


def test_a_code_tasks_setup_code_runs_before_its_tests(code_recipe, tmp_path):
    """`fields.setup` (MBPP's `test_setup_code`) runs between the answer's code and the tests:
    setup code that rebinds the function the tests call makes the right code fail; the rows
    carry each task's setup."""
    data = tmp_path / "tasks-setup.jsonl"
    setups = {text: "" for text in TASKS}
    setups["Write a function to add two numbers."] = "add = None"
    rows = [
        {"text": t, "code": "pass", "test_list": tests, "test_setup_code": setups[t]}
        for t, (tests, _) in TASKS.items()
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mapped = [f"train.data.dataset={data}", "train.data.fields.setup=test_setup_code"]
    summary = {}
    for name, overrides in (("plain", mapped[:1]), ("setup", mapped)):
        args = ["answer", str(code_recipe), *overrides, "--out", str(tmp_path / f"{name}.jsonl")]
        args += ["--max-new-tokens", "48", "--unsafe-no-jail", "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        summary[name] = json.loads(result.stdout)["correct"]
    assert summary == {"plain": 1, "setup": 0}
    every = tmp_path / "every.jsonl"
    assert _answer(code_recipe, every, *mapped, "--keep", "all", "--unsafe-no-jail").exit_code == 0
    assert [(r["question"], r["setup"]) for r in _rows(every)] == list(setups.items())


def test_code_is_not_run_unjailed_unless_asked(code_recipe, tmp_path, monkeypatch):
    from composer.compare.sandbox import FORCE_FALLBACK

    monkeypatch.setenv(FORCE_FALLBACK, "1")
    out = tmp_path / "code.jsonl"
    result = _answer(code_recipe, out)
    assert result.exit_code == 1 and "--unsafe-no-jail" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "code.jsonl.partial").exists()

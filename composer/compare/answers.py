"""`compose answer`: a model answers the questions of a recipe's training data, and the answers
it gets right become training targets (rejection sampling, as in STaR, arXiv 2203.14465).

Targets written by another model teach that model's style: a carry-on trained on GSM8K's terse
worked solutions makes its anchor write like them, and answer fewer problems. Targets the anchor
writes itself and gets right keep its own way of reasoning and reinforce the chains that reach
the answer. The output is a JSON Lines file of `{question, answer, reference}` rows that a
recipe trains on as `{kind: hf, dataset: FILE, fields: {question: question, answer: answer}}`.

Answers are appended to `OUT.partial` as each batch finishes, with the model's key: a rerun
after an interrupt answers only the rest. OUT itself is written once, whole, at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from composer.compare.results import Side
from composer.compare.runner import anchor_alone, resolve_side
from composer.compare.scoring import GSM_DONE, final_number, same_number
from composer.errors import CompareError
from composer.features.data import HfRows, hf_rows, strip_calculator
from composer.files import write_text
from composer.progress import counted, status
from composer.recipe import HfData, Recipe
from composer.training.build import output_lock

Keep = Literal["correct", "all"]


@dataclass(frozen=True)
class AnswersResult:
    out: Path
    model: str  # what answered: the anchor alone, or the side given
    asked: int  # questions answered (reused from OUT.partial included)
    correct: int  # finished answers whose final number equals the reference's
    unfinished: int  # answers cut at max_new_tokens
    kept: int  # rows written to OUT
    reused: int  # answers read back from OUT.partial


def write_answers(
    recipe: Recipe,
    out: Path,
    *,
    model: str | None = None,
    keep: Keep = "correct",
    max_new_tokens: int = 512,
    batch: int = 16,
    console: Console | None = None,
) -> AnswersResult:
    """Answer every question `recipe.train.data` draws (greedy, through the chat template the
    training prompt uses); write the answers `keep` selects to `out`: `correct` keeps finished
    answers whose final number equals the reference's (GSM8K's `#### N`), `all` every finished
    answer. `model` is a compare side (mixture directory, model folder, `CARD[:DTYPE]`);
    without it the recipe's anchor answers alone, in the dtype the recipe loads it."""
    console = console or Console(stderr=True)
    spec = recipe.train.data
    if not isinstance(spec, HfData) or spec.fields.question is None:
        raise CompareError(
            "train.data: `compose answer` reads the questions of an `hf` source with "
            f"`fields: {{question: ..., answer: ...}}`; this recipe's is `{spec.kind}`"
        )
    if out.suffix != ".jsonl":
        raise CompareError(f"--out {out}: write the answers to a .jsonl file")
    _check_new(out)
    drawn = hf_rows(spec)
    references = _references(drawn, keep)
    side = _answering_side(recipe, model)
    with output_lock(out):  # a second run to the same file is refused, not interleaved
        _check_new(out)
        return _answer_rows(drawn, references, side, out, keep, max_new_tokens, batch, console)


def _check_new(out: Path) -> None:
    if out.exists():
        raise CompareError(f"--out {out} already exists; choose another or remove it")


def _answer_rows(
    drawn: HfRows,
    references: dict[int, str | None],
    side: Side,
    out: Path,
    keep: Keep,
    max_new_tokens: int,
    batch: int,
    console: Console,
) -> AnswersResult:
    settings = {"max_new_tokens": max_new_tokens, "key": side.key}
    partial = out.with_name(out.name + ".partial")
    done = _read_partial(partial, settings)
    reused = len(done)
    todo = [(i, row) for i, row in drawn.rows if i not in done]
    question = drawn.columns["question"]
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        with status(f"loading {side.given}", console=console):
            mixture = side.load()
        with (
            counted("answer", unit="questions", console=console) as progress,
            open(partial, "a", encoding="utf-8") as log,
        ):
            task = progress.add_task("answer", total=len(drawn.rows), completed=reused)
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                texts = [str(row[question]) for _, row in chunk]
                for (index, row), (text, reason) in zip(
                    chunk, _answers(mixture, texts, max_new_tokens), strict=True
                ):
                    reference, finished = references[index], reason != "length"
                    answered = {
                        "index": index,
                        "question": str(row[question]),
                        "answer": text,
                        "reference": reference,
                        "finished": finished,
                        # A cut answer's last number is not its answer: never right.
                        "correct": finished
                        and reference is not None
                        and same_number(final_number(text), reference),
                        **settings,
                    }
                    done[index] = answered
                    log.write(json.dumps(answered) + "\n")
                log.flush()
                os.fsync(log.fileno())
                progress.advance(task, len(chunk))
    answered_rows = [done[i] for i, _ in drawn.rows]
    kept = [
        {"question": a["question"], "answer": a["answer"], "reference": a["reference"]}
        for a in answered_rows
        if a["finished"] and (keep == "all" or a["correct"])
    ]
    write_text(out, "".join(json.dumps(row) + "\n" for row in kept))
    partial.unlink(missing_ok=True)
    return AnswersResult(
        out=out,
        model=side.given,
        asked=len(answered_rows),
        correct=sum(a["finished"] and a["correct"] for a in answered_rows),
        unfinished=sum(not a["finished"] for a in answered_rows),
        kept=len(kept),
        reused=reused,
    )


def _references(drawn: HfRows, keep: Keep) -> dict[int, str | None]:
    """Each row's reference final number (None where it has none); `correct` needs one."""
    references: dict[int, str | None] = {}
    for index, row in drawn.rows:
        number = final_number(strip_calculator(str(row[drawn.columns["answer"]])))
        if number is None and keep == "correct":
            raise CompareError(
                f"{drawn.where}: row {index}: the answer has no final number to check against; "
                "keep every finished answer with --keep all"
            )
        references[index] = number
    return references


def _answering_side(recipe: Recipe, model: str | None) -> Side:
    return resolve_side("model", model) if model is not None else anchor_alone("model", recipe)


def _read_partial(partial: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Answers an earlier run of the same model and settings finished (a cut last line and
    answers of another model are left out)."""
    done: dict[int, dict[str, Any]] = {}
    if not partial.is_file():
        return done
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(row.get(k) == v for k, v in settings.items()):
            done[row["index"]] = row
    return done


def _answers(mixture: Any, questions: list[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """The greedy answer to each question and why it ended, decoded as one batch; an answer
    stops once it has written `#### N` (GSM8K's final line)."""
    from composer.generation.decode import Generation, prompt_ids, run_together

    generations = [
        Generation(mixture, prompt_ids(mixture, q, chat=True), max_new_tokens, until=GSM_DONE)
        for q in questions
    ]
    run_together(generations)
    return [(g.text, g.finish_reason or "") for g in generations]

"""Progress of long work: a live bar on a terminal, plain lines in a log.

On a terminal, counted work (cache examples, training steps, compare items, a pull's bytes) is a
rich progress bar, and a wait whose length is unknown (loading bases) is a spinner:

    cache ━━━━━━━━━━━━━━━━━━━━  120/480 examples  5,210 tok/s  0:00:41

Where the console is not a terminal (`compose build r.yaml > build.log 2>&1`, a pipe, CI), rich
would print nothing until a bar ends. There each counted task prints a plain line when it
starts, every `COMPOSE_PROGRESS_INTERVAL` seconds (30 by default; 0: at every update) and when
it ends; a wait prints one each interval it lasts and one when it ends, if it printed any:

    train  0/250 steps  started
    train  120/250 steps  2.1 steps/s  eta 0:01:02  loss 0.8123  5,210 tok/s
    train  250/250 steps  2.1 steps/s  done in 0:01:59  loss 0.7710  5,180 tok/s
    loading bases  0:00:30 elapsed
    loading bases  done in 0:00:41
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

INTERVAL_ENV = "COMPOSE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval() -> float:
    """Seconds between two plain progress lines: `$COMPOSE_PROGRESS_INTERVAL`, else 30."""
    try:
        seconds = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL
    return seconds if seconds >= 0 else DEFAULT_INTERVAL  # nan fails the test too


@dataclass
class _Mark:
    began: float  # when the task was added
    done: float  # its count then (a resumed run starts past 0), for the rate
    said: float  # when its last line was printed
    counted: bool  # its total was known when it began (else: a wait, shown by time alone)
    ended: bool = False


class LoggedProgress(Progress):
    """rich's Progress, with plain lines instead of the live display off a terminal.

    A line reads `LABEL  DONE/TOTAL UNIT  RATE UNIT/s  eta H:MM:SS  DETAIL`; `label` and
    `detail` are the same rich templates the bar's columns read (`{task.description}`,
    `loss {task.fields[loss]}`). A task with the field `bytes=True` counts bytes, shown in MiB."""

    def __init__(
        self,
        *columns: str | ProgressColumn,
        console: Console | None = None,
        label: str = "{task.description}",
        unit: str = "",
        detail: str = "",
        disable: bool = False,
        **options: Any,
    ) -> None:
        console = console or Console(stderr=True)
        self.plain = not disable and not console.is_terminal
        super().__init__(*columns, console=console, disable=disable or self.plain, **options)
        self._label, self._unit, self._detail = label, unit, detail
        self._interval = interval()
        self._marks: dict[TaskID, _Mark] = {}

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        if self.plain:
            now = self.get_time()
            task = self._tasks[task_id]
            counts = total is not None or bool(fields.get("bytes"))
            self._marks[task_id] = _Mark(began=now, done=completed, said=now, counted=counts)
            self._say(task, "end" if _finished(task) else "start")
        return task_id

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._maybe_say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_say(task_id)

    def stop(self) -> None:
        super().stop()
        for task_id, mark in self._marks.items():
            if not mark.ended:  # stopped early: an error, an interrupt, an open-ended task
                self._say(self._tasks[task_id], "stopped")

    def _maybe_say(self, task_id: TaskID) -> None:
        mark = self._marks.get(task_id)
        if mark is None or mark.ended:
            return
        task = self._tasks[task_id]
        if _finished(task):
            self._say(task, "end")
        elif self.get_time() - mark.said >= self._interval:
            self._say(task, "now")

    def _say(self, task: Task, moment: str) -> None:
        mark = self._marks[task.id]
        now = self.get_time()
        mark.said = now
        mark.ended = moment in ("end", "stopped")
        counted = mark.counted or bool(task.fields.get("bytes"))
        parts = [_plain(self._label.format(task=task)), self._count(task) if counted else ""]
        elapsed = now - mark.began
        rate = (task.completed - mark.done) / elapsed if elapsed > 0 else 0.0
        if moment == "start":
            parts.append("started")
        elif task.total is None or not counted:
            parts.append(f"{_clock(elapsed)} elapsed" if moment == "now" else "")
        elif rate > 0:
            parts.append(self._rate(task, rate))
            if moment == "now":
                parts.append(f"eta {_clock((task.total - task.completed) / rate)}")
        if moment == "end":
            parts.append(f"done in {_clock(elapsed)}")
        elif moment == "stopped":
            parts.append(f"stopped after {_clock(elapsed)}")
        if self._detail and moment != "start":
            parts.append(_plain(self._detail.format(task=task)))
        line = "  ".join(p for p in parts if p)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _count(self, task: Task) -> str:
        if task.fields.get("bytes"):
            total = "" if task.total is None else f"/{task.total / 2**20:,.1f}"
            return f"{task.completed / 2**20:,.1f}{total} MiB"
        if task.total is None:
            return ""
        return f"{task.completed:,.0f}/{task.total:,.0f} {self._unit}".rstrip()

    def _rate(self, task: Task, rate: float) -> str:
        if task.fields.get("bytes"):
            return f"{_number(rate / 2**20)} MiB/s"
        return f"{_number(rate)} {self._unit + '/s' if self._unit else 'per s'}"


def counted(
    label: str, detail: str = "", *, unit: str = "", console: Console | None, **options: Any
) -> LoggedProgress:
    """A bar of `done/total unit` with time left. `label` (bold) and `detail` (after the count)
    are rich templates, so they may read a task's fields: `"loss {task.fields[loss]}"`.
    `options` go to rich's Progress (`transient`, `disable`, ...)."""
    after = "  ".join(part for part in (unit, detail) if part)
    return LoggedProgress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn(after)] if after else []),
        TimeRemainingColumn(),
        console=console,
        label=label,
        unit=unit,
        detail=detail,
        **options,
    )


@contextmanager
def status(text: str, *, console: Console) -> Iterator[None]:
    """A wait of unknown length: a spinner on a terminal; elsewhere a line each interval it
    lasts (at once when the interval is 0) and a last one when it ends, if it printed any."""
    if console.is_terminal:
        with console.status(text):
            yield
        return
    every, began = interval(), time.monotonic()
    said = threading.Event()
    finished = threading.Event()

    def say(what: str) -> None:
        console.print(f"{text}  {what}", markup=False, highlight=False, soft_wrap=True)
        said.set()

    def beat() -> None:
        while not finished.wait(every):
            say(f"{_clock(time.monotonic() - began)} elapsed")

    beating = threading.Thread(target=beat, name="progress", daemon=True)
    if every == 0:
        say("started")
    else:
        beating.start()
    ended = "stopped after"
    try:
        yield
        ended = "done in"
    finally:
        finished.set()
        if beating.is_alive():
            beating.join()
        if said.is_set():
            say(f"{ended} {_clock(time.monotonic() - began)}")


def _finished(task: Task) -> bool:
    return task.total is not None and task.completed >= task.total


def _plain(template: str) -> str:
    return Text.from_markup(template).plain


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"

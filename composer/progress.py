"""The progress bar of counted work (cache examples, training steps, compare items), one look.

    cache ━━━━━━━━━━━━━━━━━━━━  120/480 examples  5,210 tok/s  0:00:41

Downloads and conversions have their own display (bases.pull), in bytes.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def counted(label: str, detail: str = "", *, console: Console | None, **options: Any) -> Progress:
    """A bar of `done/total` with time left. `label` (bold) and `detail` (after the count) are
    rich templates, so they may read a task's fields: `"loss {task.fields[loss]}"`. `options`
    go to rich's Progress (`transient`, `disable`, ...)."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn(detail)] if detail else []),
        TimeRemainingColumn(),
        console=console,
        **options,
    )

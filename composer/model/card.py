"""The README card of a mixture folder: the pieces every card writes the same way.

A build writes the first card (composer.training.report) and an export writes its own
(composer.artifacts.export); both render their tables and say how to run the folder through
here. The card is part of the folder format, beside composer.model.weights, so training and
artifacts, which both sit above this layer, share it without artifacts importing training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

GENERATE = 'compose generate <this folder> --prompt "..."'  # how a card says to run its folder


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table, one line per row, no trailing newline."""
    lines = [_row(head), "|" + "---|" * len(head), *map(_row, rows)]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def use_section(note: str) -> str:
    """`## Use`: the command that runs the folder, then `note` (e.g. where its files are)."""
    return f"## Use\n\n    {GENERATE}\n\n{note}\n"

"""Streamed answers on a terminal: plain, or each piece coloured by the router's top source."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from rich.console import Console
from rich.text import Text

from composer.generation.decode import Generation, prompt_ids, with_sources
from composer.generation.sampling import Sampling
from composer.model.protocol import Mixture

PALETTE = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_white", "bright_cyan"]


def source_colours(sources: Sequence[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sources)}


def legend(sources: Sequence[str]) -> Text:
    """One line naming each source in its colour."""
    colours = source_colours(sources)
    line = Text("dominant source per token: ")
    for i, source in enumerate(sources):
        line.append(("  " if i else "") + f"■ {source}", style=colours[source])
    return line


def print_stream(
    console: Console,
    pieces: Iterable[tuple[str, str | None]],
    sources: Sequence[str] = (),
) -> str:
    """Print (text, source or None) pieces as they come; returns the whole text. Piped or
    redirected, the text is written exactly; on a terminal rich drops control characters
    (a model's text must not move the cursor or ring the bell)."""
    colours = source_colours(sources)
    parts = []
    for text, source in pieces:
        parts.append(text)
        if console.is_terminal:
            style = colours.get(source) if source else None
            console.print(Text(text, style=style or ""), end="", soft_wrap=True)
        else:
            console.file.write(text)
        console.file.flush()
    console.file.write("\n")
    return "".join(parts)


def stream_answer(
    mixture: Mixture,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling,
    stop: Sequence[str] = (),
    *,
    chat: bool = True,
    gates: bool = False,
) -> Iterator[tuple[str, str | None]]:
    """The answer to a prompt as (text, dominant source or None) pieces, as they come."""
    ids = prompt_ids(mixture, prompt, chat=chat)
    generation = Generation(mixture, ids, max_new_tokens, sampling=sampling, stop=stop, gates=gates)
    if not gates:
        return ((delta, None) for delta in generation)
    return ((delta, source) for delta, source, _ in with_sources(mixture, generation))

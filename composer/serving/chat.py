"""`compose chat`: a multi-turn conversation with a mixture in the terminal, streamed.

The conversation goes through the anchor's chat template. When it no longer fits the anchor's
context (with room for the answer), the oldest turns are dropped and the user is told.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from composer.errors import DataError
from composer.generation.decode import Generation, chat_ids, context_length, with_sources
from composer.generation.sampling import Sampling
from composer.model.protocol import Mixture
from composer.serving.terminal import legend, print_stream

HELP = """commands:
  /reset              forget the conversation
  /gates              colour each piece of an answer by the router's top source (toggle)
  /set NAME VALUE     temperature, top_p, top_k, repetition_penalty, seed, max_new_tokens
  /settings           show the sampling settings
  /help               this list
  /quit               leave (or Ctrl-D)"""


@dataclass
class ChatSession:
    """A conversation with a mixture: its history and how answers are sampled."""

    mixture: Mixture
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 256
    show_gates: bool = False
    history: list[dict[str, str]] = field(default_factory=list)

    def fit(self) -> tuple[list[int], int]:
        """The prompt ids of the history and how many of the oldest turns were dropped to
        leave room for the answer in the anchor's context."""
        context = context_length(self.mixture)
        dropped = 0
        ids = chat_ids(self.mixture, self.history)
        while context is not None and len(ids) + self.max_new_tokens > context:
            if len(self.history) <= 1:
                self.history.clear()
                raise ValueError(
                    f"the message ({len(ids)} tokens) does not fit the context ({context} "
                    f"tokens) with room for a {self.max_new_tokens}-token answer"
                )
            # one turn: the user's message and the answer to it
            del self.history[: 2 if self.history[1]["role"] == "assistant" else 1]
            dropped += 1
            ids = chat_ids(self.mixture, self.history)
        return ids, dropped

    def answer(self, ids: list[int]) -> Iterator[tuple[str, str | None]]:
        """Stream the answer to the history as (text, top source or None); the history gets
        the answer, also when it is interrupted."""
        generation = Generation(
            self.mixture, ids, self.max_new_tokens, sampling=self.sampling, gates=self.show_gates
        )
        try:
            if self.show_gates:
                for delta, source, _ in with_sources(self.mixture, generation):
                    yield delta, source
            else:
                for delta in generation:
                    yield delta, None
        finally:
            self.history.append({"role": "assistant", "content": generation.text})

    def command(self, line: str) -> str:
        """Run a /command; what to tell the user (a command it cannot read, or a setting it
        refuses, is a message too: the conversation goes on)."""
        try:
            name, *args = shlex.split(line[1:]) or [""]
        except ValueError as exc:  # an unclosed quote, a trailing backslash
            return f"could not read the command ({exc}); /help lists them"
        if name == "reset":
            self.history.clear()
            return "history cleared"
        if name == "gates":
            self.show_gates = not self.show_gates
            return f"source colouring {'on' if self.show_gates else 'off'}"
        if name == "settings":
            settings = {**self.sampling.model_dump(), "max_new_tokens": self.max_new_tokens}
            return "  ".join(f"{k} = {v}" for k, v in settings.items())
        if name == "set" and len(args) == 2:
            key, value = args
            if key == "max_new_tokens":
                context = context_length(self.mixture)
                most = "" if context is None else f" and at most {context - 1} (the context)"
                try:
                    tokens = int(value)
                except ValueError:
                    tokens = 0
                if tokens < 1 or (context is not None and tokens >= context):
                    return f"max_new_tokens: must be a whole number of tokens, at least 1{most}"
                self.max_new_tokens = tokens
            else:
                try:
                    update = {key: None if value == "none" else value}
                    self.sampling = Sampling.model_validate(
                        {**self.sampling.model_dump(), **update}
                    )
                except ValidationError as exc:
                    first = exc.errors()[0]
                    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
            return f"{key} = {value}"
        if name in {"help", "set"}:
            return HELP
        return f"unknown command /{name}; /help lists them"


def run_chat(
    model: str | Path,
    *,
    sampling: Sampling,
    max_new_tokens: int,
    console: Console | None = None,
    read: Callable[[str], str] | None = None,
    show_gates: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """The chat loop: read a line, answer it streamed, until /quit or end of input."""
    from composer.compare.runner import open_model

    console = console or Console(highlight=False)
    mixture = open_model(str(model), trust_remote_code=trust_remote_code)
    session = ChatSession(mixture, sampling, max_new_tokens, show_gates)
    read = read or (lambda prompt: console.input(prompt))
    console.print(f"chatting with {mixture.recipe.name}; /help lists the commands")
    if show_gates:
        console.print(legend(mixture.carry_on.sources))
    while True:
        try:
            line = read("[bold]you>[/] ").strip()
        except EOFError:
            console.print()
            return
        if not line:
            continue
        if line in {"/quit", "/exit"}:
            return
        if line.startswith("/"):
            console.print(session.command(line), markup=False)
            if line.startswith("/gates") and session.show_gates:
                console.print(legend(mixture.carry_on.sources))
            continue
        session.history.append({"role": "user", "content": line})
        try:
            ids, dropped = session.fit()
        except ValueError as exc:  # the message alone does not fit (the history is gone)
            console.print(f"[yellow]{escape(str(exc))}[/]")
            continue
        except DataError as exc:  # the chat template refused the message: forget it alone
            session.history.pop()
            console.print(f"[yellow]{escape(str(exc))}[/]")
            continue
        if dropped:
            console.print(
                f"[yellow]dropped the {dropped} oldest turn(s) to fit the "
                f"{context_length(mixture)}-token context[/]"
            )
        console.print("[bold]mixture>[/] ", end="")
        try:
            print_stream(console, session.answer(ids), mixture.carry_on.sources)
        except KeyboardInterrupt:
            console.print("\n[yellow](answer interrupted)[/]")

"""The one decoder: tokens from a mixture, greedy or sampled, streamed as text.

    generation = Generation(mixture, prompt_ids(mixture, "Hi"), max_new_tokens=64)
    for delta in generation:      # text as it comes, whole characters only
        print(delta, end="")
    generation.finish_reason      # "eos", "stop" (a stop string or `until`) or "length"

The CLI, the chat, the server, lm-eval and every compare suite generate through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from composer.generation.detokenize import TextStream
from composer.generation.sampling import Sampling, TokenChooser
from composer.generation.templates import format_prompt
from composer.model.protocol import Mixture


class Generation:
    """One generation, run as it is iterated (each item a non-empty text delta).

    With KV caches (`use_cache`, the default) each step feeds only the new token; without,
    each step reruns the whole sequence (the same tokens: a test holds them equal).
    With `gates`, `self.gates` gets for each decoding step the router's weights over the
    sources ((n_sources,), in `mixture.carry_on.sources` order) at the position that chose
    the token, including the step that chose end-of-sequence.
    """

    def __init__(
        self,
        mixture: Mixture,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
        until: re.Pattern[str] | None = None,
        stop_at_eos: bool = True,
        gates: bool = False,
        use_cache: bool = True,
    ) -> None:
        self.mixture = mixture
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.eos = mixture.tokenizer.eos_token_id if stop_at_eos else None
        self.use_cache = use_cache
        self.gates: list[torch.Tensor] | None = [] if gates else None
        self.finish_reason: str | None = None
        self._stream = TextStream(mixture.tokenizer, stop, until)
        self._started = False
        self._steps = 0  # tokens chosen, end-of-sequence included
        self._chooser: TokenChooser | None = None
        self._seen: set[int] = set()

    @property
    def ids(self) -> list[int]:
        """The generated tokens so far (end-of-sequence excluded)."""
        return self._stream.ids

    @property
    def text(self) -> str:
        """The text so far (cut before a stop string)."""
        return self._stream.text

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation runs once")
        self._started = True
        with torch.no_grad():
            yield from self._run()

    def run(self) -> Generation:
        """Generate to the end; returns self."""
        for _ in self:
            pass
        return self

    def _run(self) -> Iterator[str]:
        mixture = self.mixture
        state = mixture.new_state() if self.use_cache else None
        pending = list(self.prompt_ids)
        while self.finish_reason is None:
            if self._steps == self.max_new_tokens:
                if rest := self._end("length"):
                    yield rest
                return
            if state is not None:
                logits, weights = mixture.step(torch.tensor([pending]), state)
            else:
                ids = torch.tensor([self.prompt_ids + self.ids])
                features = mixture.features(ids, anchor_final=False)
                hidden, weights, _ = mixture.hidden(features)
                logits = mixture.logits(hidden[:, -1])
            if delta := self._take(logits, weights[0, -1]):
                yield delta
            pending = self.ids[-1:]

    def _take(self, logits: torch.Tensor, weights: torch.Tensor) -> str:
        """Choose the next token from `logits` ((1, vocab)); the text it completes. Sets
        `finish_reason` when this token ends the generation."""
        if self._chooser is None:
            self._chooser = TokenChooser(self.sampling)
            self._seen = set(self.prompt_ids)  # what the repetition penalty discourages
        self._steps += 1
        if self.gates is not None:
            self.gates.append(weights)
        token = self._chooser(logits, self._seen)
        if token == self.eos:
            return self._end("eos")
        self._seen.add(token)
        delta = self._stream.push(token)
        if self._stream.stopped:
            self.finish_reason = "stop"
        elif self._steps == self.max_new_tokens:
            delta += self._end("length")
        return delta

    def cancel(self) -> None:
        """End a generation that `decode_together` is running, before its next step
        (`finish_reason` "cancelled"; its text stays as it is)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _end(self, reason: str) -> str:
        """Finish with `reason` ("stop" where the text's end completes a stop string); the
        text held back until now."""
        rest = self._stream.finish()
        self.finish_reason = "stop" if self._stream.stopped else reason
        return rest


def run_together(generations: Sequence[Generation]) -> None:
    """Run generations of one mixture to their ends as one batch (`decode_together`)."""
    for _ in decode_together(generations):
        pass


def decode_together(generations: Sequence[Generation]) -> Iterator[list[str]]:
    """Decode generations of one mixture as one batch, padded on the left; after each step,
    each row's text delta ("" where it has none or has ended).

    Each row chooses its tokens and ends (end-of-sequence, stop string, length) as it would
    alone, and its ids, text, gates and finish reason are the same up to float rounding (a test
    holds the tokens equal). A finished row — or one ended by `Generation.cancel` between
    steps — is fed padding until the batch is done.
    """
    if not generations:
        return
    mixture = generations[0].mixture
    for generation in generations:
        if generation._started or generation.mixture is not mixture or not generation.use_cache:
            raise ValueError("decode_together takes new, cached generations of one mixture")
        generation._started = True
    tokenizer = mixture.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(g.prompt_ids) for g in generations)
    ids = [[pad] * (width - len(g.prompt_ids)) + g.prompt_ids for g in generations]
    mask = [[0] * (width - len(g.prompt_ids)) + [1] * len(g.prompt_ids) for g in generations]
    pending, pending_mask = torch.tensor(ids), torch.tensor(mask)
    state = mixture.new_state()
    for generation in generations:
        if generation.max_new_tokens <= 0:
            generation._end("length")
    while any(g.finish_reason is None for g in generations):
        with torch.no_grad():  # not held across the yield: the caller's grad mode stays its own
            logits, weights = mixture.step(pending, state, pending_mask)
        yield [
            "" if g.finish_reason is not None else g._take(logits[row : row + 1], weights[row, -1])
            for row, g in enumerate(generations)
        ]
        live = [g.finish_reason is None for g in generations]  # after any cancel
        tokens = [g.ids[-1] if alive else pad for g, alive in zip(generations, live, strict=True)]
        pending = torch.tensor(tokens)[:, None]
        pending_mask = torch.tensor(live, dtype=torch.long)[:, None]


def chat_ids(mixture: Mixture, messages: list[dict[str, str]]) -> list[int]:
    """The anchor's ids for a conversation, ready for the assistant's turn (chat template)."""
    text = format_prompt(mixture.tokenizer, messages)
    return mixture.tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(mixture: Mixture, prompt: str, *, chat: bool = True) -> list[int]:
    """The anchor's ids for `prompt` (as one user message through its chat template when
    `chat`)."""
    if chat:
        return chat_ids(mixture, [{"role": "user", "content": prompt}])
    return mixture.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def context_length(mixture: Mixture) -> int | None:
    """How many tokens the anchor reads at most (None if its config does not say)."""
    return mixture.context_length


def generate_ids(
    mixture: Mixture, prompt_ids: list[int], max_new_tokens: int, *, use_cache: bool = True
) -> list[int]:
    """Greedy tokens after the prompt, end-of-sequence included when reached."""
    generation = Generation(mixture, prompt_ids, max_new_tokens, use_cache=use_cache).run()
    if generation.finish_reason == "eos":
        return [*generation.ids, mixture.tokenizer.eos_token_id]
    return generation.ids


def generate(
    mixture: Mixture,
    prompt: str,
    max_new_tokens: int = 128,
    *,
    chat: bool = True,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
) -> str:
    """Answer `prompt` and return the text."""
    ids = prompt_ids(mixture, prompt, chat=chat)
    return Generation(mixture, ids, max_new_tokens, sampling=sampling, stop=stop).run().text


def with_sources(mixture: Mixture, generation: Generation) -> Iterator[tuple[str, str, float]]:
    """Run `generation` (made with `gates=True`): each text delta with the source the router
    weighed most at the token that completed it, and that weight."""
    assert generation.gates is not None, "make the Generation with gates=True"
    sources = mixture.carry_on.sources
    for delta in generation:
        weights = generation.gates[len(generation.ids) - 1]
        k = int(weights.argmax())
        yield delta, sources[k], float(weights[k])


def generate_with_gates(
    mixture: Mixture, prompt: str, max_new_tokens: int = 128, *, chat: bool = True, **decoding: Any
) -> list[tuple[str, str, float]]:
    """(text, dominant source, its router weight) for each piece of the answer; `decoding`
    takes Generation's `sampling` and `stop`."""
    ids = prompt_ids(mixture, prompt, chat=chat)
    generation = Generation(mixture, ids, max_new_tokens, gates=True, **decoding)
    return list(with_sources(mixture, generation))

"""The one decoder: tokens from a mixture, greedy or sampled, streamed as text.

    generation = Generation(mixture, prompt_ids(mixture, "Hi"), max_new_tokens=64)
    for delta in generation:      # text as it comes, whole characters only
        print(delta, end="")
    generation.finish_reason      # "eos", "stop" (a stop string or `until`) or "length"

The CLI, the chat, the server, lm-eval and every compare suite generate through it. With KV
caches every generation runs in a `Decoder`, the one scheduler: a generation alone is a batch
of one; `decode_together` and the server add several, of one mixture or of several mixtures
over shared bases (`composer.model.batch`), and rows join and leave between steps.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch

from composer.generation.detokenize import TextStream
from composer.generation.sampling import Sampling, TokenChooser
from composer.generation.templates import format_prompt
from composer.model.batch import Row, SharedBatch
from composer.model.mixture import LiveMixture
from composer.model.protocol import Mixture

PREFILL_CHUNK = 256  # prompt tokens a decoder step feeds at most, beside its running rows


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
        if self.use_cache:  # a batch of one
            decoder = Decoder()
            decoder.add(self)
            while self.finish_reason is None:
                for _, delta in decoder.step():
                    if delta:
                        yield delta
            return
        mixture = self.mixture
        while self.finish_reason is None:
            if self._steps == self.max_new_tokens:
                if rest := self._end("length"):
                    yield rest
                return
            ids = torch.tensor([self.prompt_ids + self.ids])
            features = mixture.features(ids, anchor_final=False)
            hidden, weights, _ = mixture.hidden(features)
            logits = mixture.logits(hidden[:, -1])
            if delta := self._take(logits, weights[0, -1]):
                yield delta

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
        """End a generation that a `Decoder` is running (or `decode_together`), before its next
        step (`finish_reason` "cancelled"; its text stays as it is)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _fail(self, exc: Exception) -> None:
        """Feeding this generation's own prompt failed (a `Decoder` drops it): raise."""
        self.finish_reason = "error"
        raise exc

    def _end(self, reason: str) -> str:
        """Finish with `reason` ("stop" where the text's end completes a stop string); the
        text held back until now."""
        rest = self._stream.finish()
        self.finish_reason = "stop" if self._stream.stopped else reason
        return rest


class Decoder:
    """Generations decoded as one batch that they join and leave between steps.

        decoder = Decoder()
        decoder.add(generation)            # joins at a later step
        for generation, delta in decoder.step(): ...

    Each `step` feeds one token to every running generation (one forward of each base for
    all of them, whichever mixtures over shared bases they are of), then up to `chunk` tokens
    of waiting prompts, each fed alone in arrival order: a long prompt takes several steps,
    and holds the running rows back by one chunk at most. A prompt fed whole chooses its first
    token and its generation runs with the others from the next step. A generation that ends
    (or is cancelled between steps) leaves at once, and its caches with it.

    Each generation's tokens, text, gates and finish reason are those it gets alone, up to
    float rounding (left padding; positions count each row's own tokens).
    """

    def __init__(self, chunk: int = PREFILL_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = chunk
        self._batch = SharedBatch()
        self._running: list[Generation] = []  # in the batch's row order
        self._waiting: deque[tuple[Generation, Row]] = deque()
        self._fed: dict[int, int] = {}  # id(waiting generation) -> prompt tokens fed

    def __len__(self) -> int:
        """Generations waiting for their prompt to be fed, or running."""
        return len(self._waiting) + len(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    def add(self, generation: Generation) -> None:
        """Queue a new cached generation; its prompt is fed at the next steps."""
        if not generation.use_cache:
            raise ValueError("a Decoder runs cached generations")
        if generation.max_new_tokens <= 0:
            generation._end("length")
            return
        row = SharedBatch.start(cast(LiveMixture, generation.mixture))
        self._waiting.append((generation, row))
        self._fed[id(generation)] = 0

    def step(self) -> list[tuple[Generation, str]]:
        """One step: each generation that got a token, with its text delta (may be "")."""
        out: list[tuple[Generation, str]] = []
        self._leave()
        if self._running:
            tokens = [g.ids[-1] for g in self._running]
            results = self._batch.step(tokens)
            for generation, (logits, weights) in zip(self._running, results, strict=True):
                out.append((generation, generation._take(logits, weights)))
            self._leave()
        budget = self.chunk
        while self._waiting and budget > 0:
            generation, row = self._waiting[0]
            fed = self._fed[id(generation)]
            if generation.finish_reason is not None:  # cancelled while it waited
                self._drop_waiting()
                continue
            piece = generation.prompt_ids[fed : fed + budget]
            try:
                logits, weights = self._batch.prefill(row, piece)
            except Exception as exc:
                self._drop_waiting()
                generation._fail(exc)
                continue
            budget -= len(piece)
            self._fed[id(generation)] = fed = fed + len(piece)
            if fed < len(generation.prompt_ids):
                break
            self._drop_waiting()
            out.append((generation, generation._take(logits, weights)))
            if generation.finish_reason is None:
                self._batch.join(row)
                self._running.append(generation)
        return out

    def _drop_waiting(self) -> None:
        generation, _ = self._waiting.popleft()
        del self._fed[id(generation)]

    def _leave(self) -> None:
        ended = [i for i, g in enumerate(self._running) if g.finish_reason is not None]
        if ended:
            self._batch.leave([self._batch.rows[i] for i in ended])
            self._running = [g for g in self._running if g.finish_reason is None]


def run_together(generations: Sequence[Generation]) -> None:
    """Run generations to their ends as one batch (`decode_together`)."""
    for _ in decode_together(generations):
        pass


def decode_together(
    generations: Sequence[Generation], at_once: int | None = None
) -> Iterator[list[str]]:
    """Decode generations as one batch (a `Decoder`), of one mixture or of several over
    shared bases; after each step, each generation's text delta ("" where it has none, has
    not started or has ended).

    Each row chooses its tokens and ends (end-of-sequence, stop string, length) as it would
    alone, and its ids, text, gates and finish reason are the same up to float rounding (a test
    holds the tokens equal). A row that ends, or is ended by `Generation.cancel` between
    steps, leaves the batch. With `at_once`, at most that many are in the batch: the next in
    order joins as one leaves, so the batch stays full until the last ones (a fixed batch
    waits for its longest row with its other rows done).
    """
    if at_once is not None and at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    for generation in generations:  # refused before any step; each is started as it joins
        _check_new(generation)
    for deltas, _ in _batch(deque(generations), at_once):
        if deltas is not None:
            yield [deltas.get(id(g), "") for g in generations]


def decode_fed(pending: deque[Generation], at_once: int) -> Iterator[list[Generation]]:
    """Decode the generations of `pending` (new, cached), at most `at_once` in the batch, the
    next taken from its left as one leaves; after each step, the generations that ended (a
    generation that ends before its first step, with no tokens to write, included).

    The caller may append to `pending` while it reads what ended (a question asked again
    after a wrong answer): what it appends joins the running batch, and decoding ends only
    once the batch and `pending` are both empty.
    """
    if at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    for _, ended in _batch(pending, at_once):
        yield ended


def _batch(
    pending: deque[Generation], at_once: int | None
) -> Iterator[tuple[dict[int, str] | None, list[Generation]]]:
    """The one schedule of `decode_together` and `decode_fed`: the next of `pending` joins
    the `Decoder` while fewer than `at_once` (None: no bound) are in it, then one step; after
    each, the text deltas by `id` of generation (None where nothing was left to step) and the
    generations that ended, in join order."""
    decoder = Decoder()
    joined: list[Generation] = []  # in the batch or waiting for their prompt, in join order
    while pending or joined:
        while pending and (at_once is None or len(decoder) < at_once):
            generation = pending.popleft()
            _check_new(generation)
            generation._started = True
            decoder.add(generation)
            joined.append(generation)
        deltas = None
        if len(decoder):
            with torch.no_grad():  # not held across the yield: the caller's grad mode stays its own
                deltas = {id(g): delta for g, delta in decoder.step()}
        ended = [g for g in joined if g.finish_reason is not None]
        joined = [g for g in joined if g.finish_reason is None]
        yield deltas, ended


def _check_new(generation: Generation) -> None:
    if generation._started or not generation.use_cache:
        raise ValueError("a batch (decode_together, decode_fed) takes new, cached generations")


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

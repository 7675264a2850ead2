"""Mixtures, one decoder, many clients: continuous batching.

Requests wait in a bounded queue; one worker thread runs them in one `Decoder` (the decoder
every generation runs in) and hands each text delta to the asyncio loop of the request that
asked. Each request names its mixture; mixtures loaded over one `BasePool` share their bases,
and their rows share each base's forward in the same step.

`continuous` (the default): a waiting request joins the running batch at the next step, up to
`batch` rows; its prompt is fed alone in chunks beside the running rows (it holds them back by
one chunk at most). Without it, the worker takes up to `batch` waiting requests when the batch
is empty and runs them to their ends before taking more (batch-at-once). Either way each answer
is the one it gets alone. A request that is cancelled (its client went away) leaves at its
next step; one that ends leaves at once, its caches freed. A request whose own row fails
(feeding its prompt, choosing or decoding its token) gets the error and ends alone; the rest
of the batch goes on. Only a failure of the batch's forward pass ends every row.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.generation.decode import PREFILL_CHUNK, Decoder, Generation
from composer.generation.sampling import Sampling
from composer.model.protocol import Mixture


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    stop_at_eos: bool = True
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)  # str, Generation or error
    cancelled: threading.Event = field(default_factory=threading.Event)
    mixture: Mixture | None = None  # None: the scheduler's own

    def _emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the request's loop is closed: nobody is listening
            self.cancelled.set()


class _Row(Generation):
    """A job's generation in a batch: an exception while feeding its prompt, choosing or
    decoding its token goes to its job at once and ends this row alone (finish reason
    "error")."""

    def __init__(self, job: Job, mixture: Mixture) -> None:
        super().__init__(
            mixture,
            job.prompt_ids,
            job.max_new_tokens,
            sampling=job.sampling,
            stop=job.stop,
            stop_at_eos=job.stop_at_eos,
        )
        self.job = job

    def _take(self, logits: torch.Tensor, weights: torch.Tensor) -> str:
        try:
            return super()._take(logits, weights)
        except Exception as exc:
            self._fail(exc)
            return ""

    def _fail(self, exc: Exception) -> None:
        self.finish_reason = "error"
        self.job._emit(exc)


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Scheduler:
    """Runs jobs on a worker thread, up to `batch` at a time decoded together; at most
    `max_queue` wait behind those running. A job without a mixture runs `mixture`."""

    def __init__(
        self,
        mixture: Mixture | None,
        max_queue: int = 8,
        batch: int = 1,
        *,
        continuous: bool = True,
        chunk: int = PREFILL_CHUNK,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.mixture = mixture
        self.max_queue = max_queue
        self.batch = batch
        self.continuous = continuous
        self.chunk = chunk
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # waiting + running
        self.served = 0
        self.cancelled = 0  # stopped early because their client went away
        self.largest_batch = 0
        self._worker = threading.Thread(target=self._work, name="compose-scheduler", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending > self.max_queue + self.batch - 1:
                raise QueueFull(f"the server is busy ({self.pending} requests ahead)")
            self.pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def stats(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "served": self.served,
            "cancelled": self.cancelled,
            "largest_batch": self.largest_batch,
        }

    def _done(self, n: int = 1) -> None:
        with self._lock:
            self.pending -= n

    def _work(self) -> None:
        decoder = Decoder(self.chunk)
        rows: list[_Row] = []  # admitted: prompt being fed, or running
        closing = False
        while rows or not closing:
            closing = self._admit(decoder, rows, closing)
            if not rows:
                continue
            for row in rows:
                if row.job.cancelled.is_set() and row.finish_reason is None:
                    row.cancel()
                    self.cancelled += 1
            try:
                deltas = decoder.step()
            except Exception as exc:  # reported to each request, which renders it
                for row in rows:
                    if row.finish_reason not in ("cancelled", "error"):
                        row.job._emit(exc)
                self._done(len(rows))
                rows, decoder = [], Decoder(self.chunk)
                continue
            for generation, delta in deltas:
                assert isinstance(generation, _Row)
                if delta and generation.finish_reason not in ("cancelled", "error"):
                    generation.job._emit(delta)
            ended = [row for row in rows if row.finish_reason is not None]
            for row in ended:
                if row.finish_reason not in ("cancelled", "error"):
                    self.served += 1
                    row.job._emit(row)
            if ended:
                rows[:] = [row for row in rows if row.finish_reason is None]
                self._done(len(ended))

    def _admit(self, decoder: Decoder, rows: list[_Row], closing: bool) -> bool:
        """Take waiting jobs into the decoder: while there is room (continuous), or when the
        batch is empty (batch-at-once). Blocks while nothing runs; True once closed."""
        if closing or (rows and not self.continuous):
            return closing
        while len(rows) < self.batch:
            try:
                job = self._jobs.get() if not rows else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return True
            if job.cancelled.is_set():
                self.cancelled += 1
                self._done()
                continue
            mixture = job.mixture or self.mixture
            assert mixture is not None, "a job without a mixture, on a scheduler without one"
            row = _Row(job, mixture)
            try:
                decoder.add(row)
            except Exception as exc:
                row.job._emit(exc)
                self._done()
                continue
            rows.append(row)  # one with nothing to generate ends at the next step
        self.largest_batch = max(self.largest_batch, len(rows))
        return False

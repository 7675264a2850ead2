"""One mixture, one decoder, for many clients.

Requests wait in a bounded queue; one worker thread runs them through the one decoder and hands
each text delta to the asyncio loop of the request that asked. With `batch` > 1 the worker takes
up to that many waiting requests at once and decodes them as one batch (`decode_together`:
each answer is the one it gets alone); a request that arrives meanwhile waits for the next
batch. A request that is cancelled (its client went away) stops at its next token. A request
whose own row fails (choosing or decoding its token) gets the error and ends alone; the rest
of its batch goes on. Only a failure of the batch's forward pass ends every row.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.generation.decode import Generation, decode_together
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

    def _emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the request's loop is closed: nobody is listening
            self.cancelled.set()


class _Row(Generation):
    """A job's generation in a batch: an exception while choosing or decoding its token goes to
    its job at once and ends this row alone (finish reason "error")."""

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
            self.finish_reason = "error"
            self.job._emit(exc)
            return ""


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Scheduler:
    """Runs jobs on a worker thread, up to `batch` at a time decoded together; at most
    `max_queue` wait behind those running."""

    def __init__(self, mixture: Mixture, max_queue: int = 8, batch: int = 1) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.mixture = mixture
        self.max_queue = max_queue
        self.batch = batch
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

    def _work(self) -> None:
        closing = False
        while not closing and (job := self._jobs.get()) is not None:
            jobs = [job]
            while len(jobs) < self.batch:  # whatever else is already waiting
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                jobs.append(more)
            try:
                self._run(jobs)
            except Exception as exc:  # reported to each request, which renders it
                for j in jobs:
                    j._emit(exc)
            finally:
                with self._lock:
                    self.pending -= len(jobs)

    def _run(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self.cancelled += 1
            else:
                live.append(job)
        generations = [_Row(job, self.mixture) for job in live]
        self.largest_batch = max(self.largest_batch, len(generations))
        steps: Iterator[list[str]]
        if len(generations) == 1:  # alone: the exact single-row decoder
            steps = ([delta] for delta in generations[0])
        else:
            steps = decode_together(generations)
        for deltas in steps:
            for job, generation, delta in zip(live, generations, deltas, strict=True):
                if generation.finish_reason in ("cancelled", "error"):
                    continue
                if job.cancelled.is_set() and generation.finish_reason is None:
                    generation.cancel()
                    self.cancelled += 1
                elif delta:
                    job._emit(delta)
        for job, generation in zip(live, generations, strict=True):
            if generation.finish_reason not in ("cancelled", "error"):
                self.served += 1
                job._emit(generation)

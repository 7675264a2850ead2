"""One mixture, one generation at a time, for many clients.

Requests wait in a bounded queue; one worker thread runs them in turn through the one decoder
and hands each text delta to the asyncio loop of the request that asked. A request that is
cancelled (its client went away) stops at its next token, which frees the model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from composer.artifacts.generate import Generation
from composer.artifacts.sampling import Sampling


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


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Engine:
    """Runs jobs one at a time on a worker thread; at most `max_queue` wait behind the one
    running."""

    def __init__(self, mixture: Any, max_queue: int = 8) -> None:
        self.mixture = mixture
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # waiting + running
        self.served = 0
        self.cancelled = 0  # stopped early because their client went away
        self._worker = threading.Thread(target=self._work, name="compose-engine", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending > self.max_queue:
                raise QueueFull(f"the server is busy ({self.pending} requests ahead)")
            self.pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def stats(self) -> dict[str, int]:
        return {"pending": self.pending, "served": self.served, "cancelled": self.cancelled}

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            except Exception as exc:  # reported to the request, which renders it
                job._emit(exc)
            finally:
                with self._lock:
                    self.pending -= 1

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.cancelled += 1
            return
        generation = Generation(
            self.mixture,
            job.prompt_ids,
            job.max_new_tokens,
            sampling=job.sampling,
            stop=job.stop,
            stop_at_eos=job.stop_at_eos,
        )
        for delta in generation:
            if job.cancelled.is_set():
                self.cancelled += 1
                return
            job._emit(delta)
        self.served += 1
        job._emit(generation)

"""What one client may hold of the server: a connection, and time to send its request.

uvicorn caps the open connections (`limit_concurrency`: past it, a request gets 503), the time
a connection may sit idle between requests (`timeout_keep_alive`) and the size of a request's
head (`h11_max_incomplete_event_size`: past it, 400). It sets no deadline for a request to
arrive: a client that connects and sends nothing, or a byte now and then, holds its connection
(and a file descriptor) for ever. `TimedH11Protocol` gives each request `request_timeout`
seconds, from the connection or the end of the previous answer, to arrive whole; then the
connection is closed.

Out of file descriptors, asyncio logs each failed accept with its traceback, thousands of times
a second; `QuietRepeats` lets the same line through once every few seconds, with a count.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# The client is still sending its request (or has not begun the next one).
_READING = (h11.IDLE, h11.SEND_BODY)
SHUTDOWN_SECONDS = 10  # on Ctrl-C, how long answers still streaming may take to finish


@dataclass(frozen=True)
class Limits:
    """What the server grants each connection (`compose serve`'s options)."""

    max_connections: int = 64  # open connections at which a request gets 503 (uvicorn's test)
    request_timeout: float = 30.0  # seconds for a whole request (head and body) to arrive
    keep_alive_timeout: int = 5  # seconds a connection may wait idle for its next request
    max_header_bytes: int = 16 << 10  # a request's line and headers


class ServerConfig(uvicorn.Config):
    """uvicorn's config, with the deadline `TimedH11Protocol` reads."""

    def __init__(self, app: Any, *, request_timeout: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.request_timeout = request_timeout


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request to arrive whole. The deadline
    runs from the connection (or from the end of the previous answer) and is not moved by the
    bytes that trickle in, so a slow client cannot hold a connection longer than it."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, ServerConfig)
        self.request_timeout = config.request_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state not in _READING:  # the request is in (or the connection ends)
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        reading = self.conn.their_state in _READING
        if reading and self._deadline is None and not self.transport.is_closing():
            self._await_request()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._stop_waiting()
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in _READING and not self.transport.is_closing():
            self.transport.close()  # a request cut off mid-body ends as a disconnect (499)


class QuietRepeats(logging.Filter):
    """Lets each message through at most once every `every` seconds; the next one that passes
    says how many were held back meanwhile."""

    def __init__(self, every: float = 10.0, remembered: int = 1024) -> None:
        super().__init__()
        self.every, self.remembered = every, remembered
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if key not in self._last and len(self._last) >= self.remembered:
            self._last.clear()  # messages that differ each time: forget, do not grow
        last, held = self._last.get(key, (now - self.every, 0))
        if now - last < self.every:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in {now - last:.0f} s not logged]"
        return True


class Server(uvicorn.Server):
    """uvicorn's server; while it runs, repeated lines of asyncio's and uvicorn's error logs
    are held back (`QuietRepeats`)."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        quiet = QuietRepeats()
        loggers = [logging.getLogger(name) for name in ("asyncio", "uvicorn.error")]
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            await super().serve(sockets)
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)


def http_server(
    app: Any, *, host: str, port: int, limits: Limits = Limits(), log_level: str = "info"
) -> Server:
    """A uvicorn server for `app` under `limits` (`.run()` serves until interrupted)."""
    config = ServerConfig(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=TimedH11Protocol,
        ws="none",  # no route speaks WebSocket: no upgrade path to leave open
        request_timeout=limits.request_timeout,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
    )
    return Server(config)

"""`compose serve` against hostile clients: the real server (uvicorn on 127.0.0.1, the limits of
`connections.py`) over a tiny real mixture.

Each class of attack has its test: values that would fail inside decoding, a failing row in a
batch, prompts that would block the event loop, slow and surplus connections, a flood of
accept errors in the log, bodies that nest too deeply or hold lone surrogates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import serving

from composer.artifacts.load import load_mixture
from composer.generation.decode import generate, prompt_ids
from composer.generation.sampling import MAX_REPETITION_PENALTY as MAX_PENALTY
from composer.generation.sampling import MIN_REPETITION_PENALTY as MIN_PENALTY
from composer.generation.sampling import MIN_TEMPERATURE, Sampling
from composer.serving import openai_api as api
from composer.serving.connections import Limits
from composer.serving.scheduler import Job
from composer.serving.server import create_app, prompt_chars_cap

QUESTION = "How many days does he work?"
LIMITS = Limits(max_connections=6, request_timeout=2.0, keep_alive_timeout=1)


@pytest.fixture(scope="module")
def mixture(tiny_mixture_dir):
    return load_mixture(tiny_mixture_dir)


@pytest.fixture(scope="module")
def server(mixture):
    app = create_app(mixture, model_name="tiny", max_queue=4, max_tokens=1000, batch=4)
    with serving(app, LIMITS) as running:
        yield running


def _post(url: str, path: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url + path, data, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def _chat(**fields: Any) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, **fields}


def _wait(condition: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# -- 1. a request's bad value never reaches the decoder; a row's failure is its own ---------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),
        ("seed", -1),
        ("temperature", 1e-40),
        ("temperature", MIN_TEMPERATURE / 2),
        ("temperature", 2.5),
        ("repetition_penalty", 1e-40),
        ("repetition_penalty", 11),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("stop", ["x"] * (api.MAX_STOPS + 1)),
        ("stop", "x" * (api.MAX_STOP_CHARS + 1)),
    ],
)
def test_a_value_the_decoder_cannot_honour_gets_400_naming_the_field(server, field, value):
    status, reply = _post(server.url, "/v1/chat/completions", _chat(**{field: value}))
    assert status == 400, reply
    assert reply["error"]["param"] == field
    assert reply["error"]["message"].startswith(f"{field}: ")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(server, constant):
    body = b'{"prompt": "hi", "temperature": ' + constant + b"}"
    status, reply = _post(server.url, "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["message"] == (
        f"the body is not valid JSON: {constant.decode()} is not a JSON number"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": MIN_TEMPERATURE, "repetition_penalty": MIN_PENALTY, "top_p": 1e-300},
        {"temperature": 2.0, "repetition_penalty": MAX_PENALTY, "top_k": 1},
        {"temperature": 1.0, "seed": 2**64 - 1, "top_k": 10**30},
        {"temperature": 0, "repetition_penalty": MIN_PENALTY},
    ],
)
def test_every_value_at_the_edge_of_its_range_decodes(server, fields):
    body = _chat(max_tokens=6, ignore_eos=True, **fields)
    status, reply = _post(server.url, "/v1/chat/completions", body)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 6


def test_a_row_that_fails_in_decoding_ends_alone_and_its_batch_mate_finishes(server, mixture):
    """A job whose sampling slipped past validation (a seed torch cannot take, as the request
    models once let through) shares a batch with an ordinary request: it gets its error, the
    other its whole answer."""
    engine = server.app.state.server.engine
    before = engine.stats()
    blocker = _open_stream(server.port, _chat(max_tokens=480, ignore_eos=True, stream=True))
    body = _chat(max_tokens=8, temperature=0)

    async def scenario() -> tuple[object, tuple[int, dict]]:
        ids = prompt_ids(mixture, QUESTION)
        bad = Job(ids, 8, Sampling.model_construct(temperature=1.0, seed=2**64), [])
        engine.submit(bad)  # queued behind the blocker
        good = asyncio.create_task(
            asyncio.to_thread(_post, server.url, "/v1/chat/completions", body)
        )
        while engine.pending < 3:  # both join the blocker's running batch
            assert not good.done(), good.result()
            await asyncio.sleep(0.01)
        blocker.close()
        outcome = await asyncio.wait_for(bad.out.get(), 30)
        return outcome, await asyncio.wait_for(good, 30)

    try:
        outcome, (status, reply) = asyncio.run(scenario())
    finally:
        blocker.close()
    assert isinstance(outcome, Exception), outcome  # torch: the seed overflows 64 bits
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == generate(mixture, QUESTION, 8)
    _wait(lambda: engine.pending == 0, "the batch did not end")
    after = engine.stats()
    assert after["largest_batch"] >= 2, after  # the failing row shared a batch
    assert after["served"] == before["served"] + 1


def _open_stream(port: int, body: dict) -> socket.socket:
    """A streamed chat completion on a raw socket, read until its first event."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    return sock


# -- 2. prompts are capped and prepared off the event loop ----------------------------------------


def test_health_answers_while_a_large_prompt_is_tokenized(mixture):
    app = create_app(mixture, model_name="tiny", max_prompt_chars=8_000_000)
    prompt = "The quick brown fox jumps over the lazy dog. " * 120_000  # 5.4 M characters
    with serving(app, Limits(request_timeout=60)) as running:
        replies: list[tuple[int, dict]] = []
        body = {"prompt": prompt, "max_tokens": 1}
        poster = threading.Thread(
            target=lambda: replies.append(_post(running.url, "/v1/completions", body, 120))
        )
        poster.start()
        waits = []
        while poster.is_alive():
            start = time.monotonic()
            assert _health(running.url)["status"] == "ok"
            waits.append(time.monotonic() - start)
            time.sleep(0.05)
        poster.join()
    ((status, reply),) = replies
    assert status == 400 and reply["error"]["param"] == "prompt"  # its tokens fill the context
    assert "fills the context" in reply["error"]["message"]
    assert len(waits) >= 5, waits  # the health checks ran while the prompt was processed
    assert max(waits) < 1.0, waits


def test_a_prompt_over_the_caps_gets_400_naming_the_field(server, mixture):
    cap = prompt_chars_cap(mixture.context_length)
    assert server.app.state.server.max_prompt_chars == cap
    status, reply = _post(server.url, "/v1/completions", {"prompt": "x" * (cap + 1)})
    assert status == 400 and reply["error"]["param"] == "prompt"
    assert reply["error"]["message"] == (
        f"prompt: {cap + 1} characters, more than this server reads ({cap})"
    )
    half = {"role": "user", "content": "x" * (cap // 2 + 1)}
    status, reply = _post(server.url, "/v1/chat/completions", {"messages": [half, half]})
    assert status == 400 and reply["error"]["param"] == "messages"
    assert "characters, more than this server reads" in reply["error"]["message"]
    many = [{"role": "user", "content": "hi"}] * (api.MAX_MESSAGES + 1)
    status, reply = _post(server.url, "/v1/chat/completions", {"messages": many})
    assert status == 400 and reply["error"]["param"] == "messages", reply
    parts = [{"type": "text", "text": "hi"}] * (api.MAX_PARTS + 1)
    body = {"messages": [{"role": "user", "content": parts}]}
    status, reply = _post(server.url, "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == "messages.0.content", reply
    status, reply = _post(server.url, "/v1/completions", {"prompt": "fox " * 600})
    assert status == 400 and reply["error"]["param"] == "prompt"  # 600 tokens: past the context
    assert "fills the context (512 tokens)" in reply["error"]["message"]


# -- 3. slow and surplus connections -------------------------------------------------------------


def test_slow_clients_are_cut_off_at_the_request_timeout(server, caplog):
    """A connection that sends nothing, half a head, a head and half its body, or a byte now
    and then is closed once the request timeout has passed since it connected."""
    body = json.dumps(_chat()).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    sends = {
        "nothing": b"",
        "half a head": head[: len(head) // 2],
        "half the body": head + body[: len(body) // 2],
    }
    closed_after: dict[str, float] = {}

    def hold(name: str, first: bytes, trickle: bool) -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.3) as sock:
            sock.sendall(first)
            rest = iter(head + body)
            while time.monotonic() - start < 3 * LIMITS.request_timeout:
                try:
                    if trickle:
                        sock.sendall(bytes([next(rest)]))
                    if sock.recv(4096) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:  # reset while we sent
                    break
            closed_after[name] = time.monotonic() - start

    caplog.set_level(logging.ERROR)
    threads = [
        threading.Thread(target=hold, args=(name, sent, False)) for name, sent in sends.items()
    ]
    threads.append(threading.Thread(target=hold, args=("a byte at a time", b"", True)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(closed_after) == {*sends, "a byte at a time"}
    for name, seconds in closed_after.items():
        assert LIMITS.request_timeout - 0.1 < seconds < LIMITS.request_timeout + 1.5, (
            name,
            seconds,
        )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # nothing to log
    status, reply = _post(server.url, "/v1/chat/completions", _chat(temperature=0))
    assert status == 200, reply


def test_connections_past_the_cap_get_503_from_uvicorn(server):
    connections = server.server.server_state.connections
    _wait(lambda: not connections, f"{len(connections)} connections left from other tests")
    idle = [
        socket.create_connection(("127.0.0.1", server.port))
        for _ in range(LIMITS.max_connections - 1)
    ]
    try:
        _wait(lambda: len(connections) == len(idle), "the idle connections were not accepted")
        with pytest.raises(urllib.error.HTTPError) as refused:
            _health(server.url)
        assert refused.value.code == 503
    finally:
        for sock in idle:
            sock.close()
    _wait(lambda: not connections, "the idle connections did not close")
    assert _health(server.url)["status"] == "ok"


def test_a_request_head_past_the_cap_gets_400(server):
    """A head still unfinished past max_header_bytes is refused (h11 measures what it holds
    of an incomplete head)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        sock.sendall(b"x" * (LIMITS.max_header_bytes + 1))
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")


def test_accept_errors_are_logged_once_not_flooded(tiny_mixture_dir, tmp_path):
    """Out of file descriptors, each failed accept used to log its traceback, thousands of
    times a second; now one line gets through every few seconds, and the server recovers."""
    import os
    import resource
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "composer", "serve", str(tiny_mixture_dir)]
    command += ["--port", str(port), "--max-connections", "1000"]
    log = tmp_path / "serve.log"

    def few_files() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        env = {**os.environ, "COMPOSE_API_KEY": ""}
        process = subprocess.Popen(command, stdout=out, stderr=out, env=env, preexec_fn=few_files)
    try:
        _wait_up(process, url)
        clients = []
        for _ in range(200):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(3)  # the server is out of descriptors: each accept fails
        for sock in clients:
            sock.close()
        _wait_up(process, url)  # it accepts again once the connections are gone
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text(errors="replace")
    failures = text.count("socket.accept() out of system resource")
    assert 1 <= failures <= 3, text[-3000:]


def _wait_up(process: Any, url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, "compose serve exited"
        assert time.monotonic() < deadline, "compose serve does not answer"
        try:
            _health(url)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)


# -- 4. bodies that are not JSON text --------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "hi", "stop": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["array", "in messages", "in stop"],
)
def test_deeply_nested_json_gets_400(server, body):
    status, reply = _post(server.url, "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["message"] == "the body is not valid JSON here: it nests too deeply"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop.0"),
        ("/v1/completions", b'{"prompt": "hi", "stop": "\\udfff"}', "stop"),
        ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', "model"),
        ("/v1/completions", b'{"prompt": "hi", "user": "\\ud800"}', "user"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
            "messages.0.content.0.text",
        ),
        ("/v1/completions", b'{"prompt": "hi", "\\ud800": 1}', None),
    ],
)
def test_lone_surrogates_get_400_naming_the_field(server, path, body, param):
    status, reply = _post(server.url, path, body)
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert "lone surrogate" in reply["error"]["message"]
    if param:
        assert reply["error"]["message"].startswith(f"{param}: ")


def test_a_surrogate_pair_is_text(server):
    status, reply = _post(
        server.url, "/v1/completions", b'{"prompt": "\\ud83d\\ude00 hi", "max_tokens": 2}'
    )
    assert status == 200, reply

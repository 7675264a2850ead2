"""The server's handlers alone: each over a small `ServerState`, called directly with a Starlette
`Request` or through a `TestClient` over an app that routes to that one handler."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from composer.artifacts.load import load_mixture
from composer.generation.decode import context_length, generate
from composer.serving import openai_api as api
from composer.serving.scheduler import Scheduler
from composer.serving.server import (
    EXCEPTION_HANDLERS,
    ServerState,
    authorize,
    chat_completions,
    completions,
    create_app,
    health,
    job_for,
    models,
    parse_body,
)

KEY = "sk-test-key"
QUESTION = "How many days does he work?"


def _state(engine=None, mixture=None, **changes) -> ServerState:
    """A server's state; without a mixture for the handlers that never decode."""
    fields = dict(
        mixture=mixture,
        engine=engine,
        model_name="tiny",
        api_key=KEY,
        max_tokens=100,
        context=50,
        created=1234,
    )
    return ServerState(**{**fields, **changes})


def _app(state: ServerState, *routes: Route) -> Starlette:
    app = Starlette(routes=list(routes), exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = state
    return app


def _request(state: ServerState, body: bytes = b"", key: str | None = KEY) -> Request:
    """A POST whose client sends `body`, then goes away (only a whole answer watches for that)."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    scope["app"] = _app(state)
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request(scope, receive)


@pytest.fixture()
def idle_engine():
    """A real scheduler that is never given a job to decode, so it needs no mixture."""
    engine = Scheduler(None, max_queue=0, batch=1)
    yield engine
    engine.close()


def test_authorize_accepts_only_the_right_bearer_key():
    state = _state()
    assert authorize(_request(state)) is None
    for key in ("sk-wrong", None, ""):
        with pytest.raises(api.BadRequest) as caught:
            authorize(_request(state, key=key))
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    assert authorize(_request(_state(api_key=None), key=None)) is None  # no key configured


def test_models_lists_the_model_and_needs_the_key():
    client = TestClient(_app(_state(model_name="mix-7"), Route("/v1/models", models)))
    reply = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200
    card = {"id": "mix-7", "object": "model", "created": 1234, "owned_by": "compose"}
    assert reply.json() == {"object": "list", "data": [card]}
    refused = client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert refused.status_code == 401
    assert refused.json() == {
        "error": {
            "message": "missing or wrong API key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_health_reports_the_live_scheduler_stats_without_a_key(idle_engine):
    client = TestClient(_app(_state(idle_engine), Route("/health", health)))
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", **idle_engine.stats()}
    idle_engine.served, idle_engine.cancelled = 3, 1
    assert client.get("/health").json() == {
        "status": "ok",
        "pending": 0,
        "served": 3,
        "cancelled": 1,
        "largest_batch": 0,
    }


@pytest.mark.parametrize(
    ("body", "key", "status", "param", "starts"),
    [
        (b'{"messages": [', KEY, 400, None, "the body is not valid JSON"),
        (b"\xff\xfe", KEY, 400, None, "the body is not valid JSON"),
        (b"[1, 2]", KEY, 400, None, "the request body must be a JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "bogus": 1}', KEY, 400, "bogus", ""),
        (b'{"messages": "hi"}', KEY, 400, "messages", ""),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
            KEY,
            400,
            "temperature",
            "",
        ),
        (b'{"model": "gpt-5", "messages": []}', KEY, 400, "messages", ""),
        (
            b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}',
            KEY,
            404,
            "model",
            "model: 'gpt-5' is not served here",
        ),
        (b'{"messages": [', "sk-wrong", 401, None, "missing or wrong API key"),  # key first
    ],
)
def test_parse_body_refuses_naming_the_field(body, key, status, param, starts):
    with pytest.raises(api.BadRequest) as caught:
        asyncio.run(parse_body(_request(_state(), body, key), api.ChatRequest))
    assert caught.value.status == status
    assert caught.value.param == param
    assert caught.value.message.startswith(starts or f"{param}:")


def test_parse_body_returns_the_validated_request():
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    parsed = asyncio.run(parse_body(_request(_state(), json.dumps(body).encode()), api.ChatRequest))
    assert isinstance(parsed, api.ChatRequest)
    assert [m.as_dict() for m in parsed.messages] == [{"role": "user", "content": "hi"}]
    assert parsed.sampling().temperature == 0


@pytest.mark.parametrize(
    ("n_ids", "max_tokens", "param", "starts"),
    [
        (10, 101, "max_tokens", "max_tokens: 101 is more than this server allows (100)"),
        (0, None, "prompt", "prompt: empty"),
        (50, None, "prompt", "prompt: the prompt (50 tokens) fills the context (50 tokens)"),
        (10, 41, "max_tokens", "max_tokens: 41 does not fit after the prompt's 10 tokens"),
    ],
)
def test_job_for_refuses_a_budget_that_does_not_fit(n_ids, max_tokens, param, starts):
    request = api.CompletionRequest(prompt="x", max_tokens=max_tokens)
    with pytest.raises(api.BadRequest) as caught:
        job_for(_state(max_tokens=100, context=50), request, [1] * n_ids, "prompt")
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(starts)


def test_job_for_answers_503_when_the_queue_is_full(idle_engine):
    idle_engine.pending = 1  # one running, and no room to wait (max_queue=0)

    async def submit() -> None:
        job_for(_state(idle_engine), api.CompletionRequest(prompt="x"), [1, 2], "prompt")

    with pytest.raises(api.BadRequest) as caught:
        asyncio.run(submit())
    assert caught.value.status == 503 and caught.value.code == "overloaded"
    assert idle_engine.pending == 1  # the refused job took no place


@pytest.fixture(scope="module")
def mixture(tiny_mixture_dir):
    return load_mixture(tiny_mixture_dir)


@pytest.fixture()
def live_state(mixture):
    engine = Scheduler(mixture, max_queue=2, batch=1)
    yield _state(engine, mixture, api_key=None, max_tokens=480, context=context_length(mixture))
    engine.close()


def _wait_idle(engine: Scheduler) -> None:
    deadline = time.monotonic() + 20
    while engine.pending:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)


def test_completions_alone_answers_what_generate_gives(live_state, mixture):
    client = TestClient(_app(live_state, Route("/c", completions, methods=["POST"])))
    prompt = "The quick brown fox"
    reply = client.post("/c", json={"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == generate(mixture, prompt, 10, chat=False)
    ids = mixture.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert client.post("/c", json={"prompt": "", "max_tokens": 2}).json()["error"]["param"] == (
        "prompt"
    )


def test_chat_completions_alone_streams_sse_with_usage(live_state, mixture):
    client = TestClient(_app(live_state, Route("/c", chat_completions, methods=["POST"])))
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = client.post("/c", json=body)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in reply.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == generate(mixture, QUESTION, 8)
    assert chunks[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert chunks[-1]["choices"] == []
    use = chunks[-1]["usage"]
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"] > 0


def test_a_whole_answer_whose_client_left_is_cancelled(live_state):
    engine = live_state.engine
    before = engine.stats()
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    request = _request(live_state, json.dumps(body).encode())
    response = asyncio.run(chat_completions(request))
    assert response.status_code == 499  # nobody to answer
    _wait_idle(engine)
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["served"] == before["served"]


def test_create_app_serves_its_state_and_closes_the_engine_on_shutdown(mixture):
    app = create_app(mixture, model_name="tiny", max_tokens=64, batch=2)
    state = app.state.server
    assert (state.model_name, state.api_key, state.max_tokens) == ("tiny", None, 64)
    assert state.context == context_length(mixture) and state.engine.batch == 2
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        lost = client.get("/v1/nowhere")
        assert lost.status_code == 404
        assert lost.json()["error"] == api.error_body("Not Found")["error"]
    assert not state.engine._worker.is_alive()

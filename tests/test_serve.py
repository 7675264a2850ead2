"""`compose serve`: the real `openai` client against a tiny mixture served on 127.0.0.1."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest
from conftest import compose_server, serving

from composer.artifacts.load import load_mixture
from composer.generation.decode import generate, prompt_ids
from composer.generation.sampling import Sampling
from composer.serving.server import create_app

KEY = "sk-test-key"
QUESTION = "How many days does he work?"


@pytest.fixture(scope="module")
def server(tiny_mixture_dir):
    mixture = load_mixture(tiny_mixture_dir)
    # One request at a time, so the queue tests know what runs; batching is tested on the engine.
    app = create_app(mixture, model_name="tiny", api_key=KEY, max_queue=1, max_tokens=1000, batch=1)
    with serving(app) as running:
        yield SimpleNamespace(url=running.url, app=app, mixture=mixture)


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        return json.loads(response.read())


def _messages(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_completion_plain_and_streamed(server, client):
    expected = generate(server.mixture, QUESTION, 12)
    reply = client.chat.completions.create(
        model="tiny", messages=_messages(), max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt_ids(server.mixture, QUESTION))
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in {"stop", "length"}

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=_messages(),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_completions_models_sampling_and_stop(server, client):
    expected = generate(server.mixture, "The quick brown fox", 10, chat=False)
    reply = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0
    )
    assert reply.choices[0].text == expected and reply.object == "text_completion"
    stream = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected
    assert [m.id for m in client.models.list()] == ["tiny"]

    def sampled(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="tiny",
                messages=_messages(),
                max_tokens=16,
                temperature=1.2,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    assert sampled(4) == sampled(4) != sampled(5)
    hot = Sampling(temperature=1.2, seed=4)
    long = generate(server.mixture, QUESTION, 16, sampling=hot)
    assert sampled(4).startswith(long)  # ignore_eos may run past the mixture's own end
    stop = sampled(4)[3:6]
    cut = client.chat.completions.create(
        model="tiny",
        messages=_messages(),
        max_tokens=16,
        temperature=1.2,
        seed=4,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == sampled(4)[: sampled(4).find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', None),  # bad JSON
        (b'["not", "an", "object"]', None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "bogus": 1}', "bogus"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "messages.0.content"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", 1]}', "stop"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
        (b'{"messages": []}', "messages"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, param):
    status, reply = _post(server, "/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param
    if param:
        assert reply["error"]["message"].startswith(param)


def test_content_parts_and_an_empty_prompt(server):
    parts = [{"type": "text", "text": "How many days "}, {"type": "text", "text": "does he work?"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 5, "temperature": 0}
    status, reply = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == generate(server.mixture, QUESTION, 5)
    status, reply = _post(server, "/v1/completions", b'{"prompt": "", "max_tokens": 2}')
    assert status == 400 and reply["error"]["param"] == "prompt"


def test_bad_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=_messages(), max_tokens=10**6)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=_messages(), max_tokens=2)


def test_api_key(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    assert _post(server, "/v1/completions", body, key=None)[0] == 401
    status, reply = _post(server, "/v1/completions", body, key="sk-wrong")
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert _health(server)["status"] == "ok"  # the health check needs no key


def _long_stream(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="tiny",
        messages=_messages(),
        max_tokens=480,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return stream, iter(stream)


def test_a_client_that_disconnects_frees_the_model(server, client):
    before = _health(server)
    stream, chunks = _long_stream(client)
    for _ in range(3):
        next(chunks)
    stream.close()
    deadline = time.monotonic() + 20
    while (health := _health(server))["pending"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["served"] == before["served"]  # it stopped before its 480 tokens
    reply = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert reply.choices[0].text is not None


def test_a_full_queue_answers_503_quickly(server, client):
    running, first = _long_stream(client)
    next(first)
    next(first)  # generating
    waiting, second = _long_stream(client)
    next(second)  # the role chunk: it is queued behind the first
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=_messages(), max_tokens=2)
    assert caught.value.status_code == 503 and time.monotonic() - start < 2
    running.close()
    waiting.close()
    deadline = time.monotonic() + 20
    while _health(server)["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_compose_serve_listens_on_localhost_only(tiny_mixture_dir):
    import psutil

    with compose_server("serve", str(tiny_mixture_dir)) as served:
        sockets = psutil.Process(served.process.pid).net_connections("tcp")
        assert [c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN] == ["127.0.0.1"]
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage


def test_a_client_that_gives_up_on_a_whole_answer_frees_the_model(server):
    import socket

    before = _health(server)
    body = json.dumps(
        {"messages": _messages(), "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not _health(server)["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 20
    while (health := _health(server))["pending"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["served"] == before["served"]


def test_messages_the_chat_template_refuses_get_400(server):
    tokenizer = server.mixture.tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = "{{ raise_exception('no system role here') }}"
    try:
        status, reply = _post(
            server,
            "/v1/chat/completions",
            json.dumps({"model": "tiny", "messages": _messages()}).encode(),
        )
    finally:
        tokenizer.chat_template = template
    assert status == 400, reply
    assert reply["error"]["param"] == "messages"
    assert "no system role here" in reply["error"]["message"]


def test_waiting_requests_are_decoded_together_each_as_alone(tiny_mixture_dir):
    """With `batch`, requests that wait behind a running one are decoded as one batch: each
    streams the text it gets alone; one whose client leaves mid-batch stops, the others go on."""
    import asyncio

    from composer.generation.decode import Generation
    from composer.serving.scheduler import Job, Scheduler

    mixture = load_mixture(tiny_mixture_dir)
    questions = ["How many days?", "Tom has 3 apples and buys 4 more. How many?", "Hi", "Why?"]
    prompts = [prompt_ids(mixture, q) for q in questions]
    alone = [
        Generation(mixture, p, 12 + 4 * i, stop_at_eos=False).run() for i, p in enumerate(prompts)
    ]

    async def collect(job: Job, leave_after: int | None = None) -> tuple[str, object]:
        text = ""
        while True:
            item = await job.out.get()
            if not isinstance(item, str):
                return text, item
            text += item
            if leave_after is not None and len(text) >= leave_after:
                job.cancelled.set()
                return text, None

    async def scenario() -> tuple[list, dict]:
        engine = Scheduler(mixture, max_queue=8, batch=4)
        try:
            jobs = [
                Job(p, n, Sampling(), [], stop_at_eos=False)
                for p, n in [(prompts[0], 400), *((p, 12 + 4 * i) for i, p in enumerate(prompts))]
            ]
            engine.submit(jobs[0])  # runs alone: the next four queue behind it
            for job in jobs[1:]:
                engine.submit(job)
            results = await asyncio.gather(
                collect(jobs[0]),
                *(collect(job, 1 if i == 2 else None) for i, job in enumerate(jobs[1:])),
            )
            while engine.pending:
                await asyncio.sleep(0.01)
            return results, engine.stats()
        finally:
            engine.close()

    results, stats = asyncio.run(scenario())
    assert stats["largest_batch"] == 4 and stats["cancelled"] == 1 and stats["served"] == 4
    for i, (text, generation) in enumerate(results[1:]):
        if i == 2:  # its client left after the first delta
            assert generation is None and alone[2].text.startswith(text)
            continue
        assert isinstance(generation, Generation)
        assert generation.ids == alone[i].ids and text == alone[i].text
        assert generation.finish_reason == alone[i].finish_reason == "length"

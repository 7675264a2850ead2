"""An OpenAI-compatible HTTP server for one mixture or several (Starlette on uvicorn).

    POST /v1/chat/completions   POST /v1/completions   (both with "stream": true as SSE)
    GET  /v1/models             GET  /health

A request's `model` picks the mixture (`/v1/models` lists them, each with its bases); with one
mixture it may be left out. Mixtures served together are loaded over one `BasePool`, so each
base is in memory once, and their requests are decoded in one batch (scheduler.py).

Every error is a JSON body in OpenAI's shape: 400 naming the field for a bad request, 401 for
a missing or wrong key, 404 for an unknown model or path, 413 for a body over MAX_BODY_BYTES,
503 when the queue is full. Reading a body (JSON, validation) and turning its prompt into ids
(chat template, tokenizer) take time in its size, so they run on worker threads, never on the
event loop that answers every other client; the prompt's characters are capped before that.
Connection-level limits (how many, how long a request may take to arrive) are uvicorn's, set
in `connections.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from composer.compare.results import Side
from composer.errors import CompareError, DataError, ServingError
from composer.generation.decode import Generation, chat_ids, context_length
from composer.model.protocol import Mixture
from composer.model.weights import RECIPE_FILE
from composer.serving import openai_api as api
from composer.serving.scheduler import Job, QueueFull, Scheduler

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 4096  # the most tokens one request may ask for
MAX_BODY_BYTES = 8 << 20
# Far more characters per token than any tokenizer averages on text: the cap bounds what
# tokenizing a prompt may cost before its tokens can be counted against the context.
CHARS_PER_TOKEN = 32
DISCONNECT_POLL_S = 0.5  # how often a request that waits for its whole answer checks its client


@dataclass(frozen=True)
class ServerState:
    """What the handlers read, kept in `app.state.server`: the mixtures (`mixture`, named
    `model_name`, is the first or only one), the scheduler that decodes for them, and this
    server's limits."""

    mixture: Mixture
    engine: Scheduler
    model_name: str
    api_key: str | None
    max_tokens: int  # the most tokens one request may ask for
    context: int | None  # the first anchor's context length (None if its config does not say)
    created: int  # when the server started, as the model card says
    max_prompt_chars: int = MAX_BODY_BYTES  # the most characters a prompt may have
    served: Mapping[str, Mixture] = field(default_factory=dict)  # name -> mixture, when several

    def mixtures(self) -> Mapping[str, Mixture]:
        """Every mixture served, by the name a request's `model` gives."""
        return self.served or {self.model_name: self.mixture}

    def context_of(self, name: str) -> int | None:
        if name == self.model_name:
            return self.context
        return context_length(self.mixtures()[name])


def prompt_chars_cap(context: int | None) -> int:
    """The most characters a prompt may have for an anchor with this context."""
    return MAX_BODY_BYTES if context is None else min(MAX_BODY_BYTES, CHARS_PER_TOKEN * context)


def create_app(
    mixture: Mixture | Mapping[str, Mixture],
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch: int = 4,
    max_prompt_chars: int | None = None,
    continuous: bool = True,
) -> Starlette:
    """The server's app for one mixture (named `model_name`) or several (name -> mixture);
    `app.state.server.engine` runs the generations (up to `batch` rows decoded together, a
    request joining the running batch where `continuous`, else batch-at-once).
    `max_prompt_chars` defaults to `prompt_chars_cap` of the longest context."""
    if isinstance(mixture, Mapping):
        served = dict(mixture)
        if not served:
            raise ValueError("no mixture to serve")
        model_name, first = next(iter(served.items()))
    else:
        if model_name is None:
            raise ValueError("name the mixture: model_name")
        served, first = {model_name: mixture}, mixture
    context = context_length(first)
    if max_prompt_chars is None:
        contexts = [context_length(m) for m in served.values()]
        max_prompt_chars = prompt_chars_cap(None if None in contexts else max(contexts))  # type: ignore[type-var]
    engine = Scheduler(first, max_queue=max_queue, batch=batch, continuous=continuous)
    state = ServerState(
        mixture=first,
        served=served if len(served) > 1 else {},
        engine=engine,
        model_name=model_name,
        api_key=api_key,
        max_tokens=max_tokens,
        context=context,
        created=int(time.time()),
        max_prompt_chars=max_prompt_chars,
    )
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.server = state
    return app


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def authorize(request: Request) -> None:
    api_key = server_state(request).api_key
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise api.BadRequest("missing or wrong API key", status=401, code="invalid_api_key")


async def parse_body(request: Request, model: type[Any]) -> Any:
    """The authorized request's body as `model`, or BadRequest naming the field at fault."""
    authorize(request)
    raw = await request.body()
    parsed = await asyncio.to_thread(api.read, model, raw)
    served = server_state(request).mixtures()
    if parsed.model is not None and parsed.model not in served:
        raise api.BadRequest(
            f"model: '{parsed.model}' is not served here (this server serves {_names(served)})",
            "model",
            status=404,
            code="model_not_found",
        )
    if parsed.model is None and len(served) > 1:
        raise api.BadRequest(f"model: required, one of {_names(served)}", "model")
    return parsed


def _names(served: Mapping[str, Mixture]) -> str:
    return ", ".join(f"'{name}'" for name in served)


def model_of(state: ServerState, request: api.ChatRequest | api.CompletionRequest) -> str:
    """The name of the mixture a (parsed) request asks for."""
    return request.model if request.model is not None else state.model_name


def job_for(
    state: ServerState,
    request: api.ChatRequest | api.CompletionRequest,
    ids: list[int],
    field: str,
) -> Job:
    """The request's job, queued on the scheduler once its prompt and token budget fit."""
    name = model_of(state, request)
    max_tokens, context = state.max_tokens, state.context_of(name)
    asked = request.limit()
    if asked is not None and asked > max_tokens:
        raise api.BadRequest(
            f"max_tokens: {asked} is more than this server allows ({max_tokens})",
            "max_tokens",
        )
    if not ids:
        raise api.BadRequest(f"{field}: empty (no tokens to continue from)", field)
    room = max_tokens if context is None else min(max_tokens, context - len(ids))
    if room < 1:
        raise api.BadRequest(
            f"{field}: the prompt ({len(ids)} tokens) fills the context ({context} tokens)",
            field,
        )
    if asked is not None and asked > room:
        raise api.BadRequest(
            f"max_tokens: {asked} does not fit after the prompt's {len(ids)} tokens "
            f"(context {context} tokens; at most {room})",
            "max_tokens",
        )
    job = Job(ids, asked or room, request.sampling(), request.stops(), not request.ignore_eos)
    job.mixture = state.mixtures()[name] if state.served else None
    try:
        state.engine.submit(job)
    except QueueFull as exc:
        raise api.BadRequest(str(exc), status=503, code="overloaded") from None
    return job


def prompt_of(state: ServerState, request: api.ChatRequest | api.CompletionRequest) -> list[int]:
    """The request's prompt as the anchor's ids (chat template, tokenizer), once its characters
    are within the server's cap. Its time grows with the prompt: run it on a worker thread."""
    mixture = state.mixtures()[model_of(state, request)]
    field, chars = request.prompt_field, request.prompt_chars()
    if chars > state.max_prompt_chars:
        raise api.BadRequest(
            f"{field}: {chars} characters, more than this server reads ({state.max_prompt_chars})",
            field,
        )
    if isinstance(request, api.CompletionRequest):
        return mixture.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
    try:
        return chat_ids(mixture, request.conversation())
    except DataError as exc:  # the chat template refused these messages, or ran too long
        raise api.BadRequest(str(exc), param=field) from None


async def chat_completions(request: Request) -> Response:
    return await answer(request, await parse_body(request, api.ChatRequest), chat=True)


async def completions(request: Request) -> Response:
    return await answer(request, await parse_body(request, api.CompletionRequest), chat=False)


async def answer(
    request: Request, req: api.ChatRequest | api.CompletionRequest, *, chat: bool
) -> Response:
    state = server_state(request)
    ids = await asyncio.to_thread(prompt_of, state, req)
    job = job_for(state, req, ids, req.prompt_field)
    return await respond(request, job, req, chat=chat)


async def respond(request: Request, job: Job, req: Any, *, chat: bool) -> Response:
    """The job's answer: streamed as SSE if asked, else whole once it is done."""
    model_name = model_of(server_state(request), req)
    id_ = api.new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        events = stream(job, id_, model_name, chat=chat, include_usage=req.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    parts: list[str] = []
    generation = None
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        while generation is None and not job.cancelled.is_set():
            item = await job.out.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Generation):
                generation = item
            elif item is not None:
                parts.append(item)
    finally:
        watcher.cancel()
        if generation is None:  # the generation failed
            job.cancelled.set()
    if generation is None:  # the client went away: nobody to answer
        return Response(status_code=499)
    make = api.chat_completion if chat else api.completion
    text = "".join(parts)
    return JSONResponse(make(id_, model_name, text, finish(generation), usage(job, generation)))


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Stop the job once its client has gone (a whole answer is sent only at the end)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    job.cancelled.set()
    job.out.put_nowait(None)  # wake the request up


async def stream(
    job: Job, id_: str, model_name: str, *, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """The job's deltas as OpenAI stream chunks, then `[DONE]`."""
    done = False
    try:
        if chat:
            yield sse(api.chat_chunk(id_, model_name, {"role": "assistant", "content": ""}, None))
        while True:
            item = await job.out.get()
            if isinstance(item, Exception):
                log.error("generation failed", exc_info=item)
                yield sse(api.error_body("the generation failed", kind="server_error"))
                break
            if isinstance(item, Generation):
                reason = finish(item)
                yield sse(
                    api.chat_chunk(id_, model_name, {}, reason)
                    if chat
                    else api.completion_chunk(id_, model_name, "", reason)
                )
                if include_usage:
                    last = (
                        api.chat_chunk(id_, model_name, {}, None)
                        if chat
                        else api.completion_chunk(id_, model_name, "", None)
                    )
                    last["choices"], last["usage"] = [], usage(job, item)
                    yield sse(last)
                break
            yield sse(
                api.chat_chunk(id_, model_name, {"content": item}, None)
                if chat
                else api.completion_chunk(id_, model_name, item, None)
            )
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client disconnected: stop generating for it
            job.cancelled.set()


async def models(request: Request) -> Response:
    authorize(request)
    state = server_state(request)
    cards = []
    for name, mixture in state.mixtures().items():
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "compose",
        }
        if mixture is not None:
            card["bases"] = bases_of(mixture)
        cards.append(card)
    return JSONResponse({"object": "list", "data": cards})


def bases_of(mixture: Mixture) -> list[dict[str, Any]]:
    """What a model card says of a mixture's bases: name, source, dtype, quantization, role."""
    recipe = mixture.recipe
    return [
        {
            "name": name,
            "source": spec.card if spec.card is not None else Path(spec.path or "").name,
            "dtype": spec.dtype,
            "quantization": spec.quantization,
            "role": "anchor" if name == recipe.anchor else "tapped",
        }
        for name, spec in recipe.bases.items()
    ]


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", **server_state(request).engine.stats()})


async def bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.BadRequest)
    return JSONResponse(api.error_body(exc.message, exc.param, code=exc.code), exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(api.error_body(str(exc.detail)), exc.status_code)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client left before its request was all sent (or it was cut off for being too slow,
    see connections.py): nobody to answer, nothing to log."""
    return Response(status_code=499)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc)
    body = api.error_body("internal error; see the server's log", kind="server_error")
    return JSONResponse(body, 500)


EXCEPTION_HANDLERS = {
    api.BadRequest: bad_request,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    Exception: internal_error,
}


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    app.state.server.engine.close()


def finish(generation: Generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"


def usage(job: Job, generation: Generation) -> dict[str, int]:
    # the end-of-sequence token was generated too, though it is not in the text
    generated = len(generation.ids) + (generation.finish_reason == "eos")
    return api.usage(len(job.prompt_ids), generated)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _named(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The mixture folders among `paths` (a path that is one, or a folder of them), and the
    rest: what may be a base alone (any other path or name)."""
    folders: list[Path] = []
    alone: list[str] = []
    for given in paths:
        path = Path(given)
        if (path / RECIPE_FILE).is_file():
            folders.append(path)
            continue
        inner = (
            sorted(p for p in path.iterdir() if (p / RECIPE_FILE).is_file())
            if path.is_dir()
            else []
        )
        if inner:
            folders.extend(inner)
        else:
            alone.append(str(given))
    return folders, alone


def load_mixtures(
    paths: Sequence[str | Path], *, fetch: bool = True, trust_remote_code: bool = False
) -> dict[str, Mixture]:
    """What `paths` name, by name, over one `BasePool`: each base (weights, dtype,
    quantization) is loaded once, whichever mixtures use it. A path is a mixture folder (served
    by its recipe's name), or a folder of them; anything else is what `compose compare` takes
    as a side: a built recipe, or a base alone (a model folder, or a base card, `CARD` or
    `CARD:DTYPE`) served as `NAME-alone` on the copy of the base its mixtures load. Two of one
    name, or bases shared with settings that disagree, are refused before any weights are read
    past the first disagreement. `trust_remote_code`: the user's flag, needed by a mixture
    whose base ships Python."""
    from composer.artifacts.load import load_mixture, read_mixture_recipe
    from composer.bases.pool import BasePool
    from composer.compare.runner import resolve_side

    trust = trust_remote_code
    folders, others = _named(paths)
    named: dict[str, Path | Side] = {}
    entries: list[tuple[str, Path | Side]] = [
        (read_mixture_recipe(f, trust_remote_code=trust).name, f) for f in folders
    ]
    for given in others:
        try:
            side = resolve_side("served", given, trust_remote_code=trust)
        except CompareError as exc:  # neither a mixture nor a base alone: say what is taken
            raise ServingError(str(exc)) from exc
        entries.append((side.recipe.name, side))
    for name, what in entries:
        if name in named:
            first, second = (w.given if isinstance(w, Side) else w for w in (named[name], what))
            raise ServingError(
                f"two mixtures are named '{name}' ({first} and {second}): a request's `model` "
                "picks a mixture by its name; rename one (its recipe's `name`)"
            )
        named[name] = what
    pool = BasePool()
    return {
        name: what.load(fetch=fetch, pool=pool)
        if isinstance(what, Side)
        else load_mixture(what, fetch=fetch, trust_remote_code=trust, pool=pool)
        for name, what in named.items()
    }


def serve(
    mixture_dir: str | Path | Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch: int = 4,
    continuous: bool = True,
    trust_remote_code: bool = False,
    console: Console | None = None,
    **limits: Any,
) -> None:
    """Load a mixture, or several over shared bases, and serve them until interrupted;
    `limits` are `connections.Limits`' fields. Says on `console` what it serves once loaded."""
    from composer.progress import status
    from composer.serving.connections import Limits, http_server

    console = console or Console(stderr=True)
    paths = [mixture_dir] if isinstance(mixture_dir, str | Path) else list(mixture_dir)
    where = ", ".join(str(p) for p in paths)
    with status(f"loading {where}", console=console):
        served = load_mixtures(paths, trust_remote_code=trust_remote_code)
    console.print(f"serving {', '.join(served)} on http://{host}:{port}/v1", highlight=False)
    app = create_app(
        served,
        api_key=api_key,
        max_queue=max_queue,
        max_tokens=max_tokens,
        batch=batch,
        continuous=continuous,
    )
    http_server(app, host=host, port=port, limits=Limits(**limits)).run()

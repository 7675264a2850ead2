"""The OpenAI API's request and response shapes, as far as a mixture serves them.

Requests are validated strictly (`extra="forbid"`): a field we do not serve is an error that
names it, not a silently ignored option. `top_k`, `repetition_penalty` and `ignore_eos` are
the usual extensions of open servers (vLLM's names).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from composer.generation.sampling import RepetitionPenalty, Sampling, Seed, Temperature

# Every token checks each stop string's tail: keep that work small.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# The chat template renders each message: a conversation has at most this many, each in at
# most MAX_PARTS text parts (the characters they hold are capped by the server).
MAX_MESSAGES = 1024
MAX_PARTS = 256


def _unicode(text: str) -> str:
    """`text` if it is Unicode text: JSON's `\\ud800` escapes can make a lone surrogate, which
    no tokenizer (or UTF-8 answer) can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("unicode_escape").decode()
        raise ValueError(f"a lone surrogate ({bad}) at character {exc.start}: not text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]

    def as_dict(self) -> dict[str, str]:
        """The message as a chat template reads it (text parts joined)."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    """What both endpoints take. Each number's range is one the decoder honours (sampling's
    own bounds), so no value that passes here can fail a generation."""

    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # the server caps it (job_for)
    temperature: Temperature = Field(default=1.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: Text | None = None
    ignore_eos: bool = False

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    prompt_field: ClassVar[str] = "messages"

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.conversation())


class CompletionRequest(_Request):
    prompt: Text
    prompt_field: ClassVar[str] = "prompt"

    def limit(self) -> int | None:
        return self.max_tokens

    def prompt_chars(self) -> int:
        return len(self.prompt)


class BadRequest(Exception):
    """A request we refuse with a 400 (or `status`), naming the field at fault. The message
    and field may quote the request, so they are kept to what UTF-8 can carry."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: Any = None
    ) -> None:
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def read(model: type[_Request], body: bytes) -> Any:
    """The request in `body`, validated; BadRequest saying what is wrong with it otherwise."""
    try:
        data = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest("the body is not valid JSON here: it nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    return parse(model, data)


def parse(model: type[_Request], data: Any) -> Any:
    """A validated request, or BadRequest naming the first field at fault."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # Our own validators say the most; of a union's branches each reports its own error.
        first = next((e for e in errors if e["type"] == "value_error"), errors[0])
        if first["type"] == "string_unicode":  # a key that is no text: no field to name
            raise BadRequest("a key in the body holds a lone surrogate: not text") from None
        param = _param(first["loc"], keep_last=first["type"] == "extra_forbidden")
        where = f"{param}: " if param else ""
        raise BadRequest(f"{where}{first['msg']}", param) from None


def _param(loc: tuple[Any, ...], keep_last: bool) -> str | None:
    """`messages.0.content` from pydantic's error location, without the names it gives the
    members of a union (`str`, `list[constrained-str]`)."""
    fields = {
        name
        for model in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
        for name in model.model_fields
    }
    kept = [
        str(part)
        for i, part in enumerate(loc)
        if isinstance(part, int) or part in fields or (keep_last and i == len(loc) - 1)
    ]
    return ".".join(kept) or None


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code: Any = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _response(
    id_: str, model: str, obj: str, choice: dict[str, Any], use: dict | None = None
) -> dict[str, Any]:
    """The envelope every OpenAI response and stream chunk shares, around its one choice."""
    out = {
        "id": id_,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, **choice, "logprobs": None}],
    }
    if use is not None:
        out["usage"] = use
    return out


def chat_completion(id_: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"message": message, "finish_reason": finish}
    return _response(id_, model, "chat.completion", choice, use)


def completion(id_: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    return _response(id_, model, "text_completion", {"text": text, "finish_reason": finish}, use)


def chat_chunk(id_: str, model: str, delta: dict, finish: str | None) -> dict[str, Any]:
    choice = {"delta": delta, "finish_reason": finish}
    return _response(id_, model, "chat.completion.chunk", choice)


def completion_chunk(id_: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return _response(id_, model, "text_completion", {"text": text, "finish_reason": finish})

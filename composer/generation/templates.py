"""Chat templates: the text a model sees for a conversation, rendered apart from the model.

A base's chat template is Jinja shipped with its tokenizer: a stranger's code. transformers
renders it in Jinja's sandbox, which stops attribute tricks but neither a loop that never ends
nor one expression that allocates gigabytes (`'x' * 3000000000`, a join or a padding of a large
string). So templates render in a child process of this one (`TemplateWorker`) whose address
space may grow by TEMPLATE_BYTES at most, and which is killed when a template runs past
TEMPLATE_SECONDS. The worker renders exactly as `tokenizer.apply_chat_template` does, through
transformers' own `render_jinja_template`; requests and answers cross as JSON lines.

Training data, generation, the server and lm-eval all render through `render_chat`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from composer.errors import DataError

TEMPLATE_SECONDS = 2.0  # a chat template renders in milliseconds; a looping one never ends
TEMPLATE_BYTES = 512 * 2**20  # how much memory a template may allocate while it renders
TEXT_LIMIT = 16 * 2**20  # characters of rendered text at most, far beyond any context
START_SECONDS = 120.0  # the worker's own start (a Python with transformers' template code)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template on `messages`, as `apply_chat_template` renders it;
    refused in one line (DataError) if Jinja's sandbox rejects it, it raises, it runs past
    TEMPLATE_SECONDS or it needs more than TEMPLATE_BYTES of memory."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:  # no template, or several and none the default
        raise DataError(f"the anchor's chat template: {_one_line(str(exc))}") from None
    request = {
        "template": template,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "variables": tokenizer.special_tokens_map,
    }
    return WORKER.render(request)


def format_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a model sees before it answers `messages` (chat template if it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(turns) + "\nAssistant: "


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


class TemplateWorker:
    """The child process that renders chat templates, one request at a time (a lock serves
    the server's threads); started on first use, and again after it was killed or died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._hooked = False

    def render(self, request: dict[str, Any]) -> str:
        line = json.dumps(request, default=str).encode() + b"\n"
        with self._lock:
            process = self._running()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(line)
                process.stdin.flush()
                reply = _read_line(process.stdout, time.monotonic() + TEMPLATE_SECONDS)
            except OSError:  # the worker died before it read the request
                reply = b""
            if reply is None or not reply.endswith(b"\n"):
                self._stop()
                if reply is None:
                    raise DataError(
                        f"the anchor's chat template ran past {TEMPLATE_SECONDS:g} s and was "
                        "stopped"
                    )
                raise DataError("the anchor's chat template failed: its renderer died")
        answer = json.loads(reply)
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise DataError(f"the anchor's chat template failed: {_one_line(str(error))}")
        return text

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        if not self._hooked:  # a forked child starts its own worker, never shares this one
            os.register_at_fork(after_in_child=self._forget)
            self._hooked = True
        # this very `composer` first on the path, whatever the working directory holds
        root = str(Path(__file__).resolve().parents[2])
        command = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from composer.generation.templates import serve; serve()"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", command, root, str(TEMPLATE_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        if _read_line(process.stdout, time.monotonic() + START_SECONDS) != b"ready\n":
            process.kill()
            process.wait()
            raise DataError(
                f"cannot start the chat template renderer ({sys.executable} exited with "
                f"status {process.returncode})"
            )
        self._process = process
        return process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._process = None


WORKER = TemplateWorker()


def _read_line(pipe: IO[bytes], deadline: float) -> bytes | None:
    """One line from `pipe` by `deadline`: what was read (without its newline if the writer
    exited first), or None when the deadline passed."""
    fd = pipe.fileno()
    data = bytearray()
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


# -- the worker's side ---------------------------------------------------------------------------


def serve() -> None:
    """The worker: render each request line from stdin, answer a JSON line on stdout
    (`{"text": ...}` or `{"error": ...}`), until stdin closes or the parent is gone."""
    from transformers.utils.chat_template_utils import (
        _normalize_chat_messages,
        render_jinja_template,
    )

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print of a library never mixes with the answers
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _limit_memory(int(sys.argv[2]))
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            conversation = _normalize_chat_messages(request["messages"])
            # (rendered conversations, generation indices); transformers annotates it `str`
            rendered: Any = render_jinja_template(
                conversations=[conversation],
                chat_template=request["template"],
                add_generation_prompt=request["add_generation_prompt"],
                **request["variables"],
            )
            text = rendered[0][0]
            if len(text) > TEXT_LIMIT:
                raise MemoryError
            answer: dict[str, str] = {"text": text}
        except MemoryError:
            answer = {"error": f"it needs more than {TEMPLATE_BYTES // 2**20} MiB of memory"}
        except Exception as exc:  # jinja2's TemplateError and SecurityError, a template's raise
            answer = {"error": _one_line(str(exc)) or type(exc).__name__}
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


def _limit_memory(extra: int) -> None:
    """Let this process's address space grow by `extra` bytes at most (Linux; elsewhere
    the time limit alone holds)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            now = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = now + extra
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        pass


def _exit_with(parent: int) -> None:
    """End the worker once its parent is gone, even while a template loops."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)

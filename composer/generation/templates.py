"""Chat templates: the text a model sees for a conversation, rendered under a time guard.

A base's chat template is Jinja shipped with its tokenizer (a stranger's code, sandboxed by
transformers); training data, generation, the server and lm-eval all render through here.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from composer.errors import DataError

TEMPLATE_SECONDS = 2.0  # a chat template renders in milliseconds; a looping one never ends


class _TemplateTimeout(Exception):
    pass


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template on `messages`, refused in one line if Jinja's sandbox
    rejects it or it runs past TEMPLATE_SECONDS. The deadline is checked on every line the
    compiled template executes (a trace on this thread only), so nested loops stop too."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
    except _TemplateTimeout:
        raise DataError(
            f"the anchor's chat template ran past {TEMPLATE_SECONDS:g} s and was stopped"
        ) from None
    except Exception as exc:  # jinja2's TemplateError and SecurityError, a template's raise
        if isinstance(exc, DataError):
            raise
        text = " ".join(str(exc).split())[:200]
        raise DataError(f"the anchor's chat template failed: {text}") from exc
    finally:
        sys.settrace(previous)


def format_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a model sees before it answers `messages` (chat template if it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(turns) + "\nAssistant: "

"""A mixture in use: the terminal (streamed answers, the chat), the OpenAI-compatible server,
lm-evaluation-harness. The top layer: it may import anything below; only cli.py imports it.

The server and the lm-eval model need optional extras (`serve`, `eval`); their entry points
here check for them first, so a missing extra is one line, not a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from composer.errors import ServingError


def need_extra(extra: str, *modules: str) -> None:
    """Refuse in one line when a module of an optional extra is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ServingError(
            f"{', '.join(missing)} not installed: pip install 'compose-carry-on[{extra}]'"
        )


def serve(mixture_dirs: str | Path | Sequence[str | Path], **options: Any) -> None:
    """Load a mixture, or several over shared bases, and serve them over HTTP until
    interrupted (see serving.server.serve)."""
    need_extra("serve", "starlette", "uvicorn")
    from composer.serving.server import serve as run

    run(mixture_dirs, **options)


def lm_eval_main() -> None:
    """`compose-lm-eval`: lm-eval's command line with the `compose` model registered."""
    try:
        need_extra("eval", "lm_eval")
    except ServingError as exc:
        raise SystemExit(f"error: {exc}") from None
    from composer.serving.lm_eval_model import main

    main()

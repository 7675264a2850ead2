"""Token ids in, text out as it grows: whole characters only, cut exactly at a stop string.

Each new token is decoded with a few tokens before it as context (the prefix/read offsets of
vLLM's and TGI's incremental detokenizers), so the cost per token does not grow with the
output, a tokenizer that drops a leading space at the start of a decode still spaces words,
and a character whose UTF-8 bytes span several tokens comes out once all of them are in.

Stop checks look only at the tail of the text: a stop string first found at this token must
end in its new text, so it starts at most len(stop) - 1 characters before it. Text that could
be the start of a stop string is held back until the next tokens decide.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_INCOMPLETE = "\ufffd"  # what decode gives for a character whose bytes are not all there


class TextStream:
    """One generation's text. `push` a token, get the text that may be shown now."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        until: re.Pattern[str] | None = None,
        lookback: int = 256,
    ) -> None:
        """`stop`: strings that end the text, cut before them. `until`: a pattern whose first
        match ends the text after the token that completes it (nothing cut); it is searched
        in the last `lookback` characters, so a match must be shorter than that."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.until = until
        self.ids: list[int] = []
        self.stopped = False  # a stop string or `until` ended the text
        self._prefix = 0  # ids[_prefix:_read] are context for the next decode, already shown
        self._read = 0
        self._held = ""  # decoded text that may start a stop string: not shown yet
        self._window = max([len(s) for s in self.stop] + [lookback if until else 0])
        self._tail = ""  # the last _window characters decoded (shown or held)
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """The text shown so far."""
        return "".join(self._parts)

    def push(self, token: int) -> str:
        """Add one token; the new text that may be shown ("" while a character or a possible
        stop string is incomplete, or once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.ids))
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._add(after[len(before) :])

    def finish(self) -> str:
        """The text still held back once no token follows (a dangling partial character
        comes out as decode shows it)."""
        if self.stopped:
            return ""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.ids))
        self._read = len(self.ids)
        shown = self._add(after[len(before) :]) if len(after) > len(before) else ""
        if self.stopped:
            return shown
        rest, self._held = self._held, ""
        self._parts.append(rest)
        return shown + rest

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _add(self, delta: str) -> str:
        checked = self._tail  # text before `delta`, already searched
        combined = checked + delta
        text = self._held + delta  # what could be shown now; `_held` ends `checked`
        offset = len(checked) - len(self._held)
        self._tail = combined[-self._window :] if self._window else ""
        cut = None
        for s in self.stop:
            at = combined.find(s, max(0, len(checked) - len(s) + 1))
            if at >= 0 and (cut is None or at < cut):
                cut = at
        if cut is not None:
            self.stopped = True
            return self._show(text[: cut - offset])
        if self.until is not None and self.until.search(combined):
            self.stopped = True
            return self._show(text)
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return self._show(text[: len(text) - hold])

    def _show(self, text: str) -> str:
        self._parts.append(text)
        if self.stopped:
            self._held = ""
        return text

"""Alignment of a base with another tokenizer to the anchor's token positions.

The anchor's tokens define the positions. For anchor position t, let text_t be the decoded text
of anchor tokens 0..t. Base b contributes its state at the last token of *its own tokenization
of text_t* — its last token ending at or before the end of anchor token t. Because only text_t
is tokenized, nothing at t depends on text after it: causal by construction.

Computing that naively costs one forward of b per anchor position. Instead b runs once over its
tokenization of the whole text; position t reuses that forward whenever b's tokenization of
text_t is a prefix of it (the common case), and the remaining positions — where b would split
the end of text_t differently once more text follows — run only their differing tail tokens, in
one batched forward on top of the shared cache cropped to the common prefix. Generation does the
same incrementally: re-tokenize the grown text, crop the cache to the longest common prefix,
run the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from composer.errors import ComposeError


class AlignmentError(ComposeError):
    """A text an aligned base cannot read exactly."""


DIVERGENT_BATCH = 32  # rows per batched forward of differing tails (bounds the cache copies)


def anchor_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """text_t for every anchor position t: the decoded text of tokens 0..t.

    A trailing partial UTF-8 character (decoded as U+FFFD) is dropped: its bytes are not text
    yet, so the other bases do not see them until the character completes.
    """
    return [anchor_text(tokenizer, ids[:t]) for t in range(1, len(ids) + 1)]


def anchor_text(tokenizer: Any, ids: list[int]) -> str:
    """The decoded text of `ids`, without a trailing partial character."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.rstrip("\ufffd")


def tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The base's own tokenization of each text (with its own special tokens, e.g. BOS)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Alignment:
    """Where each anchor position finds its state in base b.

    `full` is b's tokenization of the whole text. Position t uses `full[index[t]]` when b's
    tokenization of text_t is a prefix of `full`; otherwise `tails[t] = (L, tail)`: the state of
    the last token of `tail` run after `full[:L]`. index[t] = -1 with no tail: no token yet.
    """

    full: list[int]
    index: list[int]
    tails: dict[int, tuple[int, list[int]]]


def align(prefix_tokens: list[list[int]]) -> Alignment:
    """The alignment from b's tokenizations of text_0 .. text_{T-1} (the last is the whole)."""
    full = prefix_tokens[-1]
    index, tails = [], {}
    for t, tokens in enumerate(prefix_tokens):
        shared = common_prefix(tokens, full)
        index.append(shared - 1 if shared == len(tokens) else -1)
        if shared < len(tokens):
            tails[t] = (shared, tokens[shared:])
    return Alignment(full=full, index=index, tails=tails)


def aligned_states(
    base: Any, texts: list[str], layers: list[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, Any, list[int]]:
    """States of `base` at `layers` for each anchor position, given text_t per position.

    Returns (layer -> (T, D) states, (T,) presence mask, b's cache over its full tokenization,
    that tokenization). Absent positions (no b token yet) hold zeros.
    """
    from transformers import DynamicCache

    alignment = align(tokenize(base.tokenizer, texts))
    tails = [shared + len(tail) for shared, tail in alignment.tails.values()]
    _check_window(base, max([len(alignment.full), *tails]))
    T = len(texts)
    cache = DynamicCache(config=base.model.config)
    out = {layer: torch.zeros(T, base.hidden_size) for layer in layers}
    present = torch.zeros(T, dtype=torch.bool)
    if alignment.full:
        ids = torch.tensor([alignment.full])
        states = base.forward(ids, None, layers, need_final=False, cache=cache)
        for t, j in enumerate(alignment.index):
            if j >= 0:
                for layer in layers:
                    out[layer][t] = states.taps[layer][0, j].float()
                present[t] = True
    rows = sorted(alignment.tails.items())
    for start in range(0, len(rows), DIVERGENT_BATCH):
        chunk = rows[start : start + DIVERGENT_BATCH]
        tail_states = _run_tails(base, cache, [r[1] for r in chunk], layers)
        for (t, _), per_layer in zip(chunk, tail_states, strict=True):
            for layer in layers:
                out[layer][t] = per_layer[layer]
            present[t] = True
    return out, present, cache, alignment.full


def _run_tails(
    base: Any, cache: Any, tails: list[tuple[int, list[int]]], layers: list[int]
) -> list[dict[int, torch.Tensor]]:
    """Run each (L, tail) after the first L tokens of `cache`, batched; last-token states."""
    from transformers import DynamicCache

    R = len(tails)
    width = max(len(tail) for _, tail in tails)
    past_len = cache.get_seq_length()
    ids = torch.zeros(R, width, dtype=torch.long)
    mask = torch.zeros(R, past_len + width, dtype=torch.long)
    positions = torch.zeros(R, width, dtype=torch.long)
    for r, (shared, tail) in enumerate(tails):
        ids[r, : len(tail)] = torch.tensor(tail)
        mask[r, : min(shared, past_len)] = 1  # only the common prefix of the cache ...
        mask[r, past_len : past_len + len(tail)] = 1  # ... and the tail itself
        positions[r] = shared + torch.arange(width)
    batched = DynamicCache(config=base.model.config)
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_initialized", False) and layer.keys.numel():
            batched.update(
                layer.keys.expand(R, -1, -1, -1).contiguous(),
                layer.values.expand(R, -1, -1, -1).contiguous(),
                i,
            )
    states = base.forward(
        ids, mask, layers, need_final=False, cache=batched, position_ids=positions
    )
    return [
        {layer: states.taps[layer][r, len(tail) - 1].float() for layer in layers}
        for r, (_, tail) in enumerate(tails)
    ]


def crop(cache: Any, length: int) -> None:
    """Cut every filled layer of `cache` back to `length` tokens (layers a forward that stopped
    early never filled stay empty; transformers' own crop trips over those)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            cached = layer.get_seq_length()
            if cached > length:
                layer.crop(length - cached)


def _check_window(base: Any, n_tokens: int) -> None:
    window = getattr(base.config, "sliding_window", None)
    if window and n_tokens >= window:
        raise AlignmentError(
            f"base '{base.name}' would read {n_tokens} tokens, beyond its sliding window of "
            f"{window}: cross-tokenizer alignment of such a base is limited to shorter texts"
        )


@dataclass
class BaseStream:
    """One base's generation state: its tokens so far and its KV cache over them."""

    tokens: list[int]
    cache: Any


def stream_step(
    base: Any, stream: BaseStream, text: str, layers: list[int]
) -> tuple[dict[int, torch.Tensor], bool]:
    """Advance `stream` to b's tokenization of `text`, reusing the cache up to the common prefix.

    Returns the states of the last token at `layers` ((D,) each) and whether b has a token.
    """
    tokens = tokenize(base.tokenizer, [text])[0]
    if not tokens:
        return {layer: torch.zeros(base.hidden_size) for layer in layers}, False
    shared = common_prefix(tokens, stream.tokens)
    if shared == len(tokens):  # nothing new: re-read the last token's state
        shared -= 1
    _check_window(base, len(tokens))
    crop(stream.cache, shared)
    new = torch.tensor([tokens[shared:]])
    positions = torch.arange(shared, len(tokens))[None]
    states = base.forward(
        new, None, layers, need_final=False, cache=stream.cache, position_ids=positions
    )
    stream.tokens = tokens
    return {layer: states.taps[layer][0, -1].float() for layer in layers}, True

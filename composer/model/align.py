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
    base: Any, texts: list[str], layers: list[int], stream: BaseStream | None = None
) -> tuple[dict[int, torch.Tensor], torch.Tensor, Any, list[int]]:
    """States of `base` at `layers` for each anchor position, given text_t per position.

    Returns (layer -> (T, D) states, (T,) presence mask, b's cache over its full tokenization,
    that tokenization). Absent positions (no b token yet) hold zeros. With `stream` (a
    generation's, over the text before `texts`), its cache is continued: kept up to what b's
    tokenization of the whole text shares with it (and before every position's token), the rest
    run once, and the stream advanced.
    """
    from transformers import DynamicCache

    alignment = align(tokenize(base.tokenizer, texts))
    tails = [shared + len(tail) for shared, tail in alignment.tails.values()]
    _check_window(base, max([len(alignment.full), *tails]))
    T = len(texts)
    start = 0
    cache = DynamicCache(config=base.model.config)
    if stream is not None:
        cache = stream.cache
        start = min(
            [common_prefix(alignment.full, stream.tokens), *(j for j in alignment.index if j >= 0)]
        )
        crop(cache, start)
    out = {layer: torch.zeros(T, base.hidden_size) for layer in layers}
    present = torch.zeros(T, dtype=torch.bool)
    if alignment.full[start:]:
        ids = torch.tensor([alignment.full[start:]])
        positions = torch.arange(start, len(alignment.full))[None]
        states = base.forward(
            ids, None, layers, need_final=False, cache=cache, position_ids=positions
        )
        for t, j in enumerate(alignment.index):
            if j >= 0:
                for layer in layers:
                    out[layer][t] = states.taps[layer][0, j - start].float()
                present[t] = True
    rows = sorted(alignment.tails.items())
    for first in range(0, len(rows), DIVERGENT_BATCH):
        chunk = rows[first : first + DIVERGENT_BATCH]
        tail_states = _run_tails(base, cache, [r[1] for r in chunk], layers)
        for (t, _), per_layer in zip(chunk, tail_states, strict=True):
            for layer in layers:
                out[layer][t] = per_layer[layer]
            present[t] = True
    if stream is not None:
        stream.tokens = alignment.full
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


def stream_steps(
    base: Any, streams: list[BaseStream], texts: list[str], layers: list[int]
) -> list[tuple[dict[int, torch.Tensor], bool]]:
    """Advance each stream to b's tokenization of its text, reusing its cache up to the common
    prefix: every stream's new tokens in one forward (rows of a generation batch).

    Each stream's cache is cut to what its new tokenization shares with the old and laid,
    padded on the left, into one batch cache; the new tokens follow, padded on the right; then
    each row's part (its cached tokens and its new ones) goes back to its own stream. Per
    stream, the states of its last token at `layers` ((D,) each) and whether b has a token.
    """
    results: list[tuple[dict[int, torch.Tensor], bool]] = []
    runs: list[tuple[int, BaseStream, int, list[int]]] = []  # (row, stream, kept, tokens)
    for row, (stream, tokens) in enumerate(
        zip(streams, tokenize(base.tokenizer, texts), strict=True)
    ):
        results.append(({layer: torch.zeros(base.hidden_size) for layer in layers}, False))
        if not tokens:
            continue
        shared = common_prefix(tokens, stream.tokens)
        if shared == len(tokens):  # nothing new: re-read the last token's state
            shared -= 1
        _check_window(base, len(tokens))
        crop(stream.cache, shared)
        runs.append((row, stream, shared, tokens))
    if not runs:
        return results
    kept = max(shared for _, _, shared, _ in runs)
    width = max(len(tokens) - shared for _, _, shared, tokens in runs)
    ids = torch.zeros(len(runs), width, dtype=torch.long)
    mask = torch.zeros(len(runs), kept + width, dtype=torch.long)
    positions = torch.zeros(len(runs), width, dtype=torch.long)
    for r, (_, _, shared, tokens) in enumerate(runs):
        ids[r, : len(tokens) - shared] = torch.tensor(tokens[shared:])
        mask[r, kept - shared : kept + len(tokens) - shared] = 1
        positions[r] = shared + torch.arange(width)
    batched = _stack_caches(base, [stream.cache for _, stream, _, _ in runs], kept)
    states = base.forward(
        ids, mask, layers, need_final=False, cache=batched, position_ids=positions
    )
    for r, (row, stream, shared, tokens) in enumerate(runs):
        new = len(tokens) - shared
        _unstack_cache(batched, r, kept - shared, kept + new, stream.cache)
        stream.tokens = tokens
        results[row] = ({layer: states.taps[layer][r, new - 1].float() for layer in layers}, True)
    return results


def _stack_caches(base: Any, caches: list[Any], length: int) -> Any:
    """One cache over the rows of `caches`, each padded on the left to `length` tokens (every
    layer one of them has filled)."""
    from transformers import DynamicCache

    batched = DynamicCache(config=base.model.config)
    for i, rows in enumerate(zip(*(cache.layers for cache in caches), strict=True)):
        filled = [layer for layer in rows if getattr(layer, "is_initialized", False)]
        if not filled or not length:
            continue
        like_k, like_v = filled[0].keys, filled[0].values
        keys = like_k.new_zeros((len(rows), like_k.shape[1], length, like_k.shape[3]))
        values = like_v.new_zeros((len(rows), like_v.shape[1], length, like_v.shape[3]))
        for r, layer in enumerate(rows):
            n = layer.get_seq_length()
            if n:
                keys[r, :, length - n :] = layer.keys[0]
                values[r, :, length - n :] = layer.values[0]
        batched.update(keys, values, i)
    return batched


def _unstack_cache(batched: Any, row: int, start: int, end: int, cache: Any) -> None:
    """Row `row`'s columns `start:end` of `batched`, every filled layer, as `cache`."""
    for mine, layer in zip(cache.layers, batched.layers, strict=True):
        if not getattr(layer, "is_initialized", False):
            continue
        keys = layer.keys[row : row + 1, :, start:end].clone()
        values = layer.values[row : row + 1, :, start:end].clone()
        if not mine.is_initialized:
            mine.lazy_initialization(keys, values)
        mine.keys, mine.values = keys, values

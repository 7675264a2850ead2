"""transformers KV caches (`DynamicCache`) as batches of rows: columns padded on the left or cut,
rows appended and selected. Shared by the batch of generations (composer.model.batch) and the
aligned bases' streams (composer.model.align).

A sliding-window layer (Mistral, Gemma 3, Qwen2 with `use_sliding_window`) holds only the last
`sliding_window - 1` of its `cumulative_length` columns; transformers builds its masks over all
of them (the 2-D mask has a column for each, the layer's offset says which it still holds). Here
such a layer's columns are the ones it has seen: padding adds to them (kept only where they fall
in the window) and a cut removes the oldest, so the layer keeps agreeing with the batch's mask."""

from __future__ import annotations

from typing import Any

import torch


def layers(cache: Any) -> list[Any]:
    """The cache's layers: plain or sliding-window dynamic ones (others cannot be batched)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    found = list(cache.layers)
    for layer in found:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or getattr(
            layer, "record_past", False
        ):
            raise ValueError(f"cannot batch a {type(layer).__name__} cache across generations")
    return found


def _sliding(layer: Any) -> bool:
    return getattr(layer, "is_sliding", False)


def initialized(cache: Any) -> int:
    """How many layers a forward has filled (one that stops early leaves the rest empty)."""
    return sum(layer.is_initialized for layer in layers(cache))


def pad_cache(cache: Any, n: int) -> None:
    """`n` > 0: that many zero columns on the left of every filled layer; `n` < 0: cut that many."""
    if n == 0:
        return
    for layer in layers(cache):
        if not layer.is_initialized:
            continue
        if not _sliding(layer):
            layer.keys, layer.values = pad(layer.keys, n), pad(layer.values, n)
            continue
        # It holds the last columns of those it has seen, at most `sliding_window - 1`: padding
        # before a full window's is dropped at once, and a cut reaches the held ones only
        # where it leaves fewer columns than it held.
        total = layer.cumulative_length + n
        if n > 0:
            layer.keys, layer.values = pad(layer.keys, n), pad(layer.values, n)
        held = min(layer.keys.shape[2], total, layer.sliding_window - 1)
        layer.keys = layer.keys[:, :, layer.keys.shape[2] - held :]
        layer.values = layer.values[:, :, layer.values.shape[2] - held :]
        layer.cumulative_length = total


def pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` (rows, heads, columns, dim) with `n` zero columns on the left (`n` < 0: cut)."""
    if n < 0:
        return t[:, :, -n:]
    return torch.cat([t.new_zeros((*t.shape[:2], n, *t.shape[3:])), t], dim=2)


def append_cache(cache: Any, more: Any, rows: int, more_rows: int) -> None:
    """The `more_rows` rows of `more` after the `rows` rows of `cache` (one length). A layer
    only one side has run (its rows tap less deep, or have no token yet) is zeros for the other
    side's rows: nothing reads it there."""
    for mine, theirs in zip(layers(cache), layers(more), strict=True):
        if not (mine.is_initialized or theirs.is_initialized):
            continue
        if not theirs.is_initialized:
            _zeros_like(theirs, mine, more_rows)
        if not mine.is_initialized:
            _zeros_like(mine, theirs, rows)
        if _sliding(mine) and mine.cumulative_length != theirs.cumulative_length:
            raise ValueError(
                f"rows of {mine.cumulative_length} and {theirs.cumulative_length} columns"
            )
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])


def _zeros_like(empty: Any, like: Any, rows: int) -> None:
    """Fill an unrun layer with `rows` rows of zeros shaped as `like`'s (its columns too)."""
    empty.lazy_initialization(like.keys, like.values)
    empty.keys = like.keys.new_zeros((rows, *like.keys.shape[1:]))
    empty.values = like.values.new_zeros((rows, *like.values.shape[1:]))
    if _sliding(empty):
        empty.cumulative_length = like.cumulative_length


def select_cache(cache: Any, rows: torch.Tensor) -> None:
    """Keep only `rows` (indices) of every filled layer."""
    for layer in layers(cache):
        if layer.is_initialized:
            layer.keys = layer.keys[rows.to(layer.keys.device)]
            layer.values = layer.values[rows.to(layer.values.device)]

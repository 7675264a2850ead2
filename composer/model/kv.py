"""transformers KV caches (`DynamicCache`) as batches of rows: columns padded on the left or cut,
rows appended and selected. Shared by the batch of generations (composer.model.batch) and the
aligned bases' streams (composer.model.align)."""

from __future__ import annotations

from typing import Any

import torch


def layers(cache: Any) -> list[Any]:
    """The cache's layers; a sliding window's (it drops columns on its own) cannot be batched."""
    from transformers.cache_utils import DynamicLayer

    found = list(cache.layers)
    for layer in found:
        if type(layer) is not DynamicLayer:
            raise ValueError(f"cannot batch a {type(layer).__name__} cache across generations")
    return found


def initialized(cache: Any) -> int:
    """How many layers a forward has filled (one that stops early leaves the rest empty)."""
    return sum(layer.is_initialized for layer in layers(cache))


def pad_cache(cache: Any, n: int) -> None:
    """`n` > 0: that many zero columns on the left of every filled layer; `n` < 0: cut that many."""
    if n == 0:
        return
    for layer in layers(cache):
        if layer.is_initialized:
            layer.keys, layer.values = pad(layer.keys, n), pad(layer.values, n)


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
            theirs.lazy_initialization(mine.keys, mine.values)
            theirs.keys = mine.keys.new_zeros((more_rows, *mine.keys.shape[1:]))
            theirs.values = mine.values.new_zeros((more_rows, *mine.values.shape[1:]))
        if not mine.is_initialized:
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys = theirs.keys.new_zeros((rows, *theirs.keys.shape[1:]))
            mine.values = theirs.values.new_zeros((rows, *theirs.values.shape[1:]))
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])


def select_cache(cache: Any, rows: torch.Tensor) -> None:
    """Keep only `rows` (indices) of every filled layer."""
    for layer in layers(cache):
        if layer.is_initialized:
            layer.keys = layer.keys[rows.to(layer.keys.device)]
            layer.values = layer.values[rows.to(layer.values.device)]

"""Rows of several mixtures decoded as one batch, each shared base run once per step for all.

A row is one generation of one mixture. Mixtures loaded over one `BasePool` hold the same
`FrozenBase` objects, so the batch can tell which rows read which base:

- a **lane** is one base's forward and KV cache over every row that reads it (same-tokenizer
  bases; an aligned base re-tokenizes per row, in its mixture's `step`). It runs to the
  deepest layer any of its rows taps, and to the final norm where a row's mixture anchors on
  it. A `carry_on.write_at` anchor is a lane of its own mixture: its upper layers continue the
  cache with that mixture's corrected state, which no other mixture's rows may read.
- per mixture, a `GenerationState` over its rows holds the carry-on's cache (and aligned
  bases' streams); each step its `LiveMixture.step` runs on the lanes' states of its rows.

Rows join and leave between steps. A row's prompt is fed alone through its mixture's own
`step` on a state of its own (`prefill`, in chunks); `join` then lays its caches into the
batch's, the shorter side padded on the left. `leave` drops a row's part of every cache, then
the columns that are padding for every row left. Bases and carry-ons read positions counted in
real tokens per row, so padding changes no row's logits beyond float rounding: each row's
tokens are those it gets alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.bases.frozen import BaseStates, FrozenBase
from composer.model.carry_on import KVCache
from composer.model.kv import append_cache, initialized, pad, pad_cache, select_cache
from composer.model.mixture import GenerationState, LiveMixture


@dataclass(eq=False)
class Row:
    """One generation in the batch (compared by identity)."""

    mixture: LiveMixture
    state: GenerationState  # its own while its prompt is fed; then its part is in the batch's


@dataclass(eq=False)
class Lane:
    """One base's forward over the rows that read it, and their KV cache."""

    base: FrozenBase
    layers: set[int]
    final: bool
    cache: Any
    rows: list[Row] = field(default_factory=list)


def _lanes_of(mixture: LiveMixture) -> dict[Hashable, list[str]]:
    """The lanes a mixture's rows run in, each with the mixture's base names it serves."""
    lanes: dict[Hashable, list[str]] = {}
    write_at = mixture.recipe.carry_on.write_at
    for name in mixture._active():
        if name in mixture.aligned:
            continue
        base = mixture.bases[name]
        own = name == mixture.recipe.anchor and write_at is not None
        key: Hashable = ("write_at", id(mixture)) if own else id(base)
        lanes.setdefault(key, []).append(name)
    return lanes


def _needs(mixture: LiveMixture, name: str) -> tuple[set[int], bool]:
    """The layers of base `name` the mixture taps in generation, and whether it reads its final
    state (as `LiveMixture.features` runs it with a state)."""
    final = name == mixture.recipe.anchor and mixture.recipe.carry_on.write_at is None
    return set(mixture._layers[name]), final


class SharedBatch:
    """Rows of mixtures over shared bases: `prefill` a new row alone, `join` it, `step` every
    row by one token, `leave`."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.lanes: dict[Hashable, Lane] = {}
        self.states: dict[int, GenerationState] = {}  # id(mixture) -> its rows' state
        self.mask: torch.Tensor | None = None  # (B, length), 0 at padding; None while none
        self.length = 0  # columns of every cache, padding included

    # -- a new row -----------------------------------------------------------------------------

    @staticmethod
    def start(mixture: LiveMixture) -> Row:
        return Row(mixture, mixture.new_state())

    @staticmethod
    @torch.no_grad()
    def prefill(row: Row, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the next piece of a row's prompt alone; logits (1, vocab) after it and the
        router's weights (n_sources,) at its last position."""
        logits, weights = row.mixture.step(torch.tensor([list(ids)]), row.state)
        return logits, weights[0, -1]

    def join(self, row: Row) -> None:
        """Lay a prefilled row's caches into the batch's; it steps with the others from now."""
        mixture, own = row.mixture, row.state
        if own.mask is not None:
            raise ValueError("a row joins with its own unpadded state")
        n, length = own.length, self.length
        if not self.rows:
            length = self.length = n
        elif n > length:
            self._pad_all(n - length)
            length = n
        pad = length - n
        for key, names in _lanes_of(mixture).items():
            layers, final = set(), False
            for name in names:
                more, needs_final = _needs(mixture, name)
                layers |= more
                final |= needs_final
            # The row's own cache over the most layers (one base named twice in a recipe).
            cache = max((own.base_past[name] for name in names), key=initialized)
            pad_cache(cache, pad)
            lane = self.lanes.get(key)
            if lane is None:
                self.lanes[key] = Lane(mixture.bases[names[0]], layers, final, cache, [row])
                continue
            lane.layers |= layers
            lane.final |= final
            append_cache(lane.cache, cache, len(lane.rows), 1)
            lane.rows.append(row)
        state = self.states.get(id(mixture))
        if state is None:
            state = self.states[id(mixture)] = GenerationState(base_past={})
        carry = _pad_kv(own.carry_on_past, pad)
        state.carry_on_past = _cat_kv(state.carry_on_past, carry)
        state.rows.append(own.rows[0])
        for name, streams in own.streams.items():
            if name in state.streams:
                state.streams[name].extend(streams)
            else:
                state.streams[name] = streams
        if pad or self.mask is not None:
            before = self.mask if self.mask is not None else torch.ones(len(self.rows), length)
            mine = torch.cat([torch.zeros(1, pad), torch.ones(1, n)], dim=1)
            self.mask = torch.cat([before.to(mine.dtype), mine]).long()
        self.rows.append(row)
        row.state = state

    # -- a step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Feed one token to each row (in `self.rows` order); each row's logits (1, vocab) and
        router weights (n_sources,)."""
        if len(tokens) != len(self.rows):
            raise ValueError(f"{len(tokens)} tokens for {len(self.rows)} rows")
        index = {id(row): i for i, row in enumerate(self.rows)}
        ids = torch.tensor(list(tokens))[:, None]
        mask = positions = None
        if self.mask is not None:
            mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1  # (B, 1): real tokens before each
        outs: dict[Hashable, tuple[BaseStates, dict[int, int]]] = {}
        for key, lane in self.lanes.items():
            at = torch.tensor([index[id(r)] for r in lane.rows])
            out = lane.base.forward(
                ids[at],
                mask[at] if mask is not None else None,
                sorted(lane.layers),
                lane.final,
                lane.cache,
                positions[at] if positions is not None else None,
            )
            outs[key] = (out, {id(r): j for j, r in enumerate(lane.rows)})
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.rows)
        for mixture, rows in self._by_mixture():
            picked = torch.tensor([index[id(r)] for r in rows])
            state = self.states[id(mixture)]
            state.mask = self.mask[picked] if self.mask is not None else None
            state.length = self.length
            computed: dict[str, BaseStates] = {}
            for key, names in _lanes_of(mixture).items():
                out, place = outs[key]
                mine = torch.tensor([place[id(r)] for r in rows])
                for name in names:
                    layers, final = _needs(mixture, name)
                    computed[name] = BaseStates(
                        taps={layer: out.taps[layer][mine] for layer in layers},
                        final=out.final[mine] if final and out.final is not None else None,
                        cache=None,
                    )
                    if key == ("write_at", id(mixture)):
                        state.base_past[name] = self.lanes[key].cache
            logits, weights = mixture.step(ids[picked], state, computed=computed)
            for j, row in enumerate(rows):
                results[index[id(row)]] = (logits[j : j + 1], weights[j, -1])
        self.mask = mask
        self.length += 1
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _by_mixture(self) -> list[tuple[LiveMixture, list[Row]]]:
        groups: dict[int, tuple[LiveMixture, list[Row]]] = {}
        for row in self.rows:
            groups.setdefault(id(row.mixture), (row.mixture, []))[1].append(row)
        return list(groups.values())

    # -- leaving -------------------------------------------------------------------------------

    def leave(self, gone: Sequence[Row]) -> None:
        """Drop rows (and their part of every cache); then the columns that are padding for
        every row left."""
        out = {id(r) for r in gone}
        if not out:
            return
        for key in list(self.lanes):
            lane = self.lanes[key]
            keep = [j for j, r in enumerate(lane.rows) if id(r) not in out]
            if not keep:
                del self.lanes[key]
                continue
            if len(keep) < len(lane.rows):
                select_cache(lane.cache, torch.tensor(keep))
                lane.rows = [lane.rows[j] for j in keep]
        for mixture, rows in self._by_mixture():
            keep = [j for j, r in enumerate(rows) if id(r) not in out]
            if not keep:
                del self.states[id(mixture)]
                continue
            state = self.states[id(mixture)]
            if len(keep) < len(rows):
                picked = torch.tensor(keep)
                state.carry_on_past = _select_kv(state.carry_on_past, picked)
                state.rows = [state.rows[j] for j in keep]
                for streams in state.streams.values():
                    streams.select(keep)
        keep = [i for i, r in enumerate(self.rows) if id(r) not in out]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.mask, self.length = None, 0
            return
        if self.mask is not None:
            self.mask = self.mask[torch.tensor(keep)]
            self._trim()

    def _trim(self) -> None:
        """Cut the leading columns that are padding for every row."""
        assert self.mask is not None
        real = self.mask.any(dim=0).nonzero()
        lead = int(real[0]) if len(real) else self.mask.shape[1]
        if lead:
            for lane in self.lanes.values():
                pad_cache(lane.cache, -lead)
            for state in self.states.values():
                state.carry_on_past = _pad_kv(state.carry_on_past, -lead)
            self.mask = self.mask[:, lead:]
            self.length -= lead
        if bool(self.mask.all()):
            self.mask = None

    def _pad_all(self, n: int) -> None:
        for lane in self.lanes.values():
            pad_cache(lane.cache, n)
        for state in self.states.values():
            state.carry_on_past = _pad_kv(state.carry_on_past, n)
        before = self.mask if self.mask is not None else torch.ones(len(self.rows), self.length)
        self.mask = torch.cat([torch.zeros(len(self.rows), n), before.float()], dim=1).long()
        self.length += n


# -- the carry-on's KV caches (lists of key/value pairs) -----------------------------------------


def _pad_kv(cache: KVCache | None, n: int) -> KVCache | None:
    if cache is None or n == 0:
        return cache
    return [(pad(k, n), pad(v, n)) for k, v in cache]


def _cat_kv(cache: KVCache | None, more: KVCache | None) -> KVCache | None:
    if cache is None or more is None:
        return more if cache is None else cache
    return [
        (torch.cat([k, k2]), torch.cat([v, v2]))
        for (k, v), (k2, v2) in zip(cache, more, strict=True)
    ]


def _select_kv(cache: KVCache | None, rows: torch.Tensor) -> KVCache | None:
    if cache is None:
        return None
    return [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in cache]

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
from composer.model import kv


class AlignmentError(ComposeError):
    """A text an aligned base cannot read exactly."""


DIVERGENT_BATCH = 32  # rows per batched forward of differing tails (bounds the cache copies)
# A batch of streams is compacted once its columns exceed RATIO x its longest row's tokens +
# SLACK (padding and holes pile up as rows of other lengths step beside each other).
COMPACT_RATIO, COMPACT_SLACK = 2, 64


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


def _window(base: Any) -> int | None:
    """The base's sliding window in tokens; None where every layer attends to all of them."""
    return getattr(base.config, "sliding_window", None) or None


def _check_window(base: Any, n_tokens: int) -> None:
    window = _window(base)
    if window and n_tokens >= window:
        raise AlignmentError(
            f"base '{base.name}' would read {n_tokens} tokens, beyond its sliding window of "
            f"{window}: cross-tokenizer alignment of such a base is limited to shorter texts"
        )


def _whole_rows(base: Any, seen: torch.Tensor, cache: Any, positions: torch.Tensor) -> Any:
    """The attention mask of a step on a batch of streams, as the 4-D mask every layer reads.

    A sliding-window layer would slide its window over the batch's columns, padding and holes
    included, so a row's own tokens could fall out of it. Every row's text is shorter than the
    window (`_check_window`), so alone such a layer reads all of it: here every layer reads the
    row's whole text, the batch's cache keeps every column (plain layers), and the mask says
    which are the row's."""
    from transformers.masking_utils import create_causal_mask

    R, width = positions.shape
    like = torch.empty(R, width, 0, dtype=base.model.dtype, device=base.device)
    return create_causal_mask(
        config=base.decoder.config,
        inputs_embeds=like,
        attention_mask=seen.to(base.device),
        cache=cache,
        position_ids=positions.to(base.device),
        allow_is_causal_skip=False,
    )


@dataclass
class BaseStream:
    """One base's generation state: its tokens so far and its KV cache over them."""

    tokens: list[int]
    cache: Any


@dataclass
class StreamBatch:
    """An aligned base's streams for a batch of generations (rows) in one KV cache.

    A row's tokens are its columns where `mask` is 1, in order; the rest of its row is padding
    (columns other rows needed, a prompt shorter than another's) or holes (tokens a grown word
    re-tokenized away). A decoding step adds its new columns to every row and runs them in one
    forward on the cache as it is: no row's cache is copied out and back. Positions count a
    row's real tokens, so each row reads what its text reads alone (up to float rounding).
    Columns that no row needs are dropped now and then (`compact`).
    """

    cache: Any  # a DynamicCache over rows x columns
    mask: torch.Tensor  # (rows, columns) long: 1 where the column is one of the row's tokens
    tokens: list[list[int]]  # each row's tokenization of its text so far

    @classmethod
    def empty(cls, base: Any, rows: int) -> StreamBatch:
        """Streams over no text yet."""
        from transformers import DynamicCache

        mask = torch.zeros(rows, 0, dtype=torch.long)
        return cls(DynamicCache(), mask, [[] for _ in range(rows)])

    @classmethod
    def stack(cls, base: Any, streams: list[BaseStream]) -> StreamBatch:
        """One batch over single streams, each padded on the left to the longest."""
        from transformers import DynamicCache

        length = max((len(s.tokens) for s in streams), default=0)
        cache = DynamicCache()  # plain layers, also for a sliding-window base (see `step`)
        rows = zip(*(s.cache.layers for s in streams), strict=True) if streams else iter(())
        for i, layers in enumerate(rows):
            filled = [layer for layer in layers if getattr(layer, "is_initialized", False)]
            if not filled or not length:
                continue
            like_k, like_v = filled[0].keys, filled[0].values
            keys = like_k.new_zeros((len(layers), like_k.shape[1], length, like_k.shape[3]))
            values = like_v.new_zeros((len(layers), like_v.shape[1], length, like_v.shape[3]))
            for r, layer in enumerate(layers):
                n = layer.get_seq_length() if getattr(layer, "is_initialized", False) else 0
                if n:
                    keys[r, :, length - n :] = layer.keys[0]
                    values[r, :, length - n :] = layer.values[0]
            cache.update(keys, values, i)
        mask = torch.zeros(len(streams), length, dtype=torch.long)
        for r, s in enumerate(streams):
            mask[r, length - len(s.tokens) :] = 1
        return cls(cache, mask, [list(s.tokens) for s in streams])

    def row(self, base: Any, r: int) -> BaseStream:
        """Row `r` alone: its tokens and a cache of its real columns only."""
        from transformers import DynamicCache

        cache = DynamicCache(config=base.model.config)
        real = self.mask[r].nonzero().flatten()
        for i, layer in enumerate(self.cache.layers):
            if getattr(layer, "is_initialized", False) and len(real):
                at = real.to(layer.keys.device)
                cache.update(layer.keys[r : r + 1, :, at], layer.values[r : r + 1, :, at], i)
        return BaseStream(tokens=self.tokens[r][: len(real)], cache=cache)

    def step(
        self, base: Any, texts: list[str | None], layers: list[int]
    ) -> list[tuple[dict[int, torch.Tensor], bool]]:
        """Advance each row with a text (None: leave it) to b's tokenization of that text,
        keeping its tokens up to the common prefix; every row's new tokens in one forward.
        Per row, the states of its last token at `layers` ((D,) each) and whether b has one."""
        R = len(self.tokens)
        results = [
            ({layer: torch.zeros(base.hidden_size) for layer in layers}, False) for _ in range(R)
        ]
        new: list[list[int]] = [[] for _ in range(R)]
        asked = {r: text for r, text in enumerate(texts) if text is not None}
        for r, tokens in zip(asked, tokenize(base.tokenizer, list(asked.values())), strict=True):
            if not tokens:
                continue
            shared = common_prefix(tokens, self.tokens[r])
            if shared == len(tokens):  # nothing new: re-read the last token's state
                shared -= 1
            _check_window(base, len(tokens))
            kept = self.mask[r].nonzero().flatten()
            self.mask[r, kept[shared:]] = 0  # the tokens it no longer has become holes
            new[r], self.tokens[r] = tokens[shared:], tokens[:shared]
        width = max(len(ids) for ids in new)
        if not width:
            return results
        self._fit(base)
        ids = torch.zeros(R, width, dtype=torch.long)
        fresh = torch.zeros(R, width, dtype=torch.long)
        for r, ids_r in enumerate(new):
            ids[r, : len(ids_r)] = torch.tensor(ids_r, dtype=torch.long)
            fresh[r, : len(ids_r)] = 1
        positions = self.mask.sum(dim=1, keepdim=True) + torch.arange(width)
        # Every new column attends to itself (padding too, so that no query sees nothing and
        # gives NaN); the real ones precede their row's padding, which causality keeps from
        # them. Later steps see only the real ones.
        seen = torch.cat([self.mask, torch.ones(R, width, dtype=torch.long)], dim=1)
        mask = _whole_rows(base, seen, self.cache, positions) if _window(base) else seen
        states = base.forward(
            ids, mask, layers, need_final=False, cache=self.cache, position_ids=positions
        )
        self.mask = torch.cat([self.mask, fresh], dim=1)
        for r, ids_r in enumerate(new):
            if ids_r:
                self.tokens[r] = self.tokens[r] + ids_r
                at = {layer: states.taps[layer][r, len(ids_r) - 1].float() for layer in layers}
                results[r] = (at, True)
        return results

    def _fit(self, base: Any) -> None:
        """Compact before a step when padding and holes are most of the cache."""
        columns = self.mask.shape[1]
        longest = int(self.mask.sum(dim=1).max()) if len(self.tokens) else 0
        if columns > COMPACT_RATIO * longest + COMPACT_SLACK:
            self.compact(base)

    def compact(self, base: Any) -> None:
        """The same streams with only their real columns, each row padded on the left."""
        packed = StreamBatch.stack(base, [self.row(base, r) for r in range(len(self.tokens))])
        self.cache, self.mask = packed.cache, packed.mask

    # -- rows of a batch of generations joining and leaving (composer.model.batch) -------------

    def extend(self, other: StreamBatch) -> None:
        """`other`'s rows after these, the narrower side padded on the left."""
        n = self.mask.shape[1] - other.mask.shape[1]
        narrow = other if n > 0 else self
        kv.pad_cache(narrow.cache, abs(n))
        narrow.mask = torch.cat([narrow.mask.new_zeros(len(narrow.tokens), abs(n)), narrow.mask], 1)
        kv.append_cache(self.cache, other.cache, len(self.tokens), len(other.tokens))
        self.mask = torch.cat([self.mask, other.mask])
        self.tokens = self.tokens + other.tokens

    def select(self, keep: list[int]) -> None:
        """Keep only the rows `keep`; then cut the leading columns that are none's tokens."""
        rows = torch.tensor(keep, dtype=torch.long)
        kv.select_cache(self.cache, rows)
        self.mask = self.mask[rows]
        self.tokens = [self.tokens[r] for r in keep]
        real = self.mask.any(dim=0).nonzero()
        lead = int(real[0]) if len(real) else self.mask.shape[1]
        if lead:
            kv.pad_cache(self.cache, -lead)
            self.mask = self.mask[:, lead:]

"""A mixture: frozen bases plus the carry-on, with the anchor's LM head as the output path.

    logits = W_pred(x + α · g ⊙ Δx)      x: the anchor's final (post-norm) hidden state

Bases that share the anchor's tokenizer read the anchor's token ids directly. The others are
*aligned* (model.align): they read the decoded text with their own tokenizer, and each anchor
position takes their state at their last token within the text so far.

The bases are held in a plain dict, not registered as submodules, so the mixture's state is the
carry-on's and nothing else: checkpoints hold exactly the trainable keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from composer.bases.frozen import DTYPES, BaseStates, FrozenBase, load_base, resolve_folder
from composer.bases.pool import BasePool, load_frozen
from composer.errors import BaseSourceError
from composer.model.align import StreamBatch, aligned_states, anchor_text, anchor_texts
from composer.model.carry_on import CarryOn, KVCache
from composer.model.experts import FusedHead
from composer.model.factory import check_compatible, new_carry_on
from composer.model.head import LMHead, OutputHead
from composer.model.upper import UpperLayers
from composer.recipe import BaseSpec, Recipe


@dataclass
class Features:
    """What the frozen bases contribute: tapped states and the anchor's final state."""

    taps: dict[str, torch.Tensor]  # "base@layer" -> (B, T, D_b)
    anchor_hidden: torch.Tensor  # (B, T, D_anchor)
    present: dict[str, torch.Tensor] | None = None  # aligned "base@layer" -> (B, T) bool
    # A generation step: the new tokens' positions (B, T) where left padding shifts them (the
    # carry-on's and the upper layers' rotary positions), and with `carry_on.write_at` the
    # anchor's KV cache, which the anchor's upper layers continue.
    anchor_cache: Any = None
    positions: torch.Tensor | None = None


@dataclass
class GenerationState:
    """The caches of one generation, or of a batch of them padded on the left."""

    base_past: dict[str, Any]  # same-tokenizer bases: their KV caches over the anchor's ids
    carry_on_past: KVCache | None = None
    rows: list[list[int]] = field(default_factory=list)  # each row's anchor ids, padding dropped
    streams: dict[str, StreamBatch] = field(default_factory=dict)  # aligned bases' rows
    mask: torch.Tensor | None = None  # (B, length): 0 at padding; None while there is none
    length: int = 0  # positions fed so far, padding included


class MixtureCore:
    """What training and scoring need of a mixture: the carry-on, the anchor's LM head, and the
    corrected anchor state. A `LiveMixture` runs its bases; a `CachedMixture` holds none and reads
    cached features."""

    recipe: Recipe
    carry_on: CarryOn
    upper: UpperLayers | None = None  # the anchor's layers above `carry_on.write_at`

    @property
    def head(self) -> OutputHead:
        raise NotImplementedError

    def hidden(
        self,
        features: Features,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """The rows the head reads (the corrected anchor state; with experts, also their β and
        states: composer.model.experts), the router's source weights and the carry-on's cache.

        With `carry_on.write_at: L` the carry-on corrects (and its router reads) the anchor's
        state after layer L, and the anchor's upper layers make the final state of that."""
        write = self.recipe.carry_on.write_at
        state = features.anchor_hidden
        if write is not None:
            state = features.taps[f"{self.recipe.anchor}@{write}"]
        out = self.carry_on(
            features.taps, state, attention_mask, past, features.present, features.positions
        )
        x = out.hidden
        if write is not None:
            assert self.upper is not None
            x = self.upper(x, attention_mask, features.anchor_cache, features.positions)
            x = x.to(out.hidden.device, out.hidden.dtype)
        if out.expert_weights is None:
            return x, out.source_weights, out.cache
        return self._rows(x, out.expert_weights, features), out.source_weights, out.cache

    def anchor_rows(self, features: Features) -> torch.Tensor:
        """Rows laid out as `hidden` gives them that read the anchor's own distribution: its
        state, and with experts β = 0 beside their (then unused) states."""
        x = features.anchor_hidden
        if not self.carry_on.expert_taps:
            return x
        return self._rows(x, x.new_zeros((*x.shape[:-1], len(self.carry_on.expert_taps))), features)

    def _rows(self, x: torch.Tensor, betas: torch.Tensor, features: Features) -> torch.Tensor:
        """The head's rows with experts: [x | β | the experts' states] (composer.model.experts)."""
        states = [features.taps[t].to(x.dtype) for t in self.carry_on.expert_taps]
        return torch.cat([x, betas.to(x.dtype), *states], dim=-1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)


class LiveMixture(MixtureCore):
    def __init__(
        self,
        recipe: Recipe,
        bases: dict[str, FrozenBase],
        carry_on: CarryOn,
        aligned: set[str] | None = None,
    ) -> None:
        self.recipe = recipe
        self.bases = bases
        self.carry_on = carry_on
        self.anchor = bases[recipe.anchor]
        self.aligned = aligned or set()
        self._layers = {
            name: sorted({t.layer for t in recipe.tap_refs if t.base == name}) for name in bases
        }
        if recipe.carry_on.write_at is not None:
            self.upper = UpperLayers(self.anchor.decoder, recipe.carry_on.write_at)

    @classmethod
    def from_recipe(
        cls, recipe: Recipe, *, fetch: bool = True, seed: int = 0, pool: BasePool | None = None
    ) -> LiveMixture:
        """Load every base frozen, check they fit the recipe, and make a fresh carry-on. With
        `pool`, a base the pool already holds (same weights, dtype, quantization) is shared,
        not loaded again."""
        bases = {}
        for name, spec in recipe.bases.items():
            bases[name] = load_frozen(name, spec, fetch=fetch, pool=pool, user=recipe.name)
            _need_offsets(bases[name])
        folders = {name: b.folder for name, b in bases.items()}
        configs = check_compatible(recipe, folders)
        torch.manual_seed(seed)
        carry_on, aligned = new_carry_on(recipe, folders, configs)
        return cls(recipe, bases, carry_on, aligned)

    @property
    def tokenizer(self) -> Any:
        return self.anchor.tokenizer

    @property
    def context_length(self) -> int | None:
        return getattr(self.anchor.config, "max_position_embeddings", None)

    def _active(self) -> list[str]:
        return [n for n in self.bases if self._layers[n] or n == self.recipe.anchor]

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: GenerationState | None = None,
        anchor_final: bool = True,
        computed: dict[str, BaseStates] | None = None,
    ) -> Features:
        """Run every base (no grad) on the anchor's ids (B, T); with `state`, continue caches.
        The states come back in float32 on the carry-on's device. Bases named in `computed`
        are not run: their states are those (a forward shared with other mixtures' rows,
        `composer.model.batch`).

        `anchor_final`: the anchor's own final state is wanted (anchor rows, the feature cache).
        Without it, or with `state`, a `write_at` mixture's anchor stops at the layer written
        into (its place in `anchor_hidden`): `hidden` runs the upper layers on the corrected
        state, and would only run them twice.

        Without `state`, padding must be on the right: aligned bases read each row's text up to
        its length. With `state` (generation, `step`), a batch is padded on the left and
        `attention_mask` covers the cached tokens too: (B, T_past + T).
        """
        taps: dict[str, torch.Tensor] = {}
        present: dict[str, torch.Tensor] = {}
        anchor_hidden = None
        # Where the carry-on is: bases spread over devices (device_map) hand their states there.
        device = next(self.carry_on.parameters(), torch.empty(0)).device
        positions = None
        if state is not None and attention_mask is not None:  # left padding: count real tokens
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        for name in self._active():
            base, layers = self.bases[name], self._layers[name]
            if name in self.aligned:
                if state is not None:
                    states, mask = self._aligned_step(name, input_ids, attention_mask, state)
                else:
                    states, mask = self._aligned(name, input_ids, attention_mask)
                for layer in layers:
                    taps[f"{name}@{layer}"] = states[layer].to(device)
                    present[f"{name}@{layer}"] = mask.to(device)
                continue
            is_anchor = name == self.recipe.anchor
            past = state.base_past.get(name) if state is not None else None
            # With `write_at` the anchor may stop at that layer: the upper layers run on the
            # corrected state (`hidden`) and, generating, fill the rest of this cache.
            stop = state is not None or not anchor_final
            write = self.recipe.carry_on.write_at if is_anchor and stop else None
            final = is_anchor and write is None
            if computed is not None and name in computed:
                out = computed[name]
            else:
                out = base.forward(input_ids, attention_mask, layers, final, past, positions)
            for layer, hidden in out.taps.items():
                taps[f"{name}@{layer}"] = hidden.to(device, torch.float32)
            if final:
                anchor_hidden = out.final
            elif write is not None:  # no final state is made; its place holds the written one
                anchor_hidden = out.taps[write]
        assert anchor_hidden is not None
        features = Features(taps, anchor_hidden.to(device, torch.float32), present or None)
        features.positions = positions
        if state is not None and self.upper is not None:
            features.anchor_cache = state.base_past[self.recipe.anchor]
        return features

    def _aligned(
        self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """States (layer -> (B, T, D)) and presence (B, T) of an aligned base, right padding."""
        base, layers = self.bases[name], self._layers[name]
        B, T = input_ids.shape
        out = {layer: torch.zeros(B, T, base.hidden_size) for layer in layers}
        mask = torch.zeros(B, T, dtype=torch.bool)
        lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [T] * B
        for row in range(B):
            n = int(lengths[row])
            texts = anchor_texts(self.tokenizer, input_ids[row, :n].tolist())
            states, found, _, _ = aligned_states(base, texts, layers)
            for layer in layers:
                out[layer][row, :n] = states[layer]
            mask[row, :n] = found
        return out, mask

    def _aligned_step(
        self,
        name: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        state: GenerationState,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """An aligned base in generation (left padding), a stream per row in one batch cache
        (`StreamBatch`): new anchor tokens re-tokenize the text so far, reusing the row's tokens
        up to what did not change. A decoding step runs every row's new base tokens in one
        forward on that cache; a prompt (or its next piece) runs each row's at once, on its
        stream taken out alone, and the streams are laid together again."""
        base, layers = self.bases[name], self._layers[name]
        B, T = input_ids.shape
        out = {layer: torch.zeros(B, T, base.hidden_size) for layer in layers}
        mask = torch.zeros(B, T, dtype=torch.bool)
        real = attention_mask[:, -T:] if attention_mask is not None else torch.ones(B, T)
        counts = [int(n) for n in real.sum(dim=1).tolist()]
        if name not in state.streams:  # a new generation: each row's stream over no text yet
            state.streams[name] = StreamBatch.empty(base, len(state.rows))
        streams = state.streams[name]
        if T == 1:  # a decoding step: every row's new token in one forward
            now = [
                anchor_text(self.tokenizer, ids) if counts[row] else None
                for row, ids in enumerate(state.rows)
            ]
            for row, (at, ok) in enumerate(streams.step(base, now, layers)):
                for layer in layers:
                    out[layer][row, 0] = at[layer]
                mask[row, 0] = ok
            return out, mask
        # A prompt, or more of it: each row's tokens at once, on its stream alone.
        alone = [streams.row(base, row) for row in range(B)]
        for row, ids in enumerate(state.rows):
            n = counts[row]
            if n:
                texts = [
                    anchor_text(self.tokenizer, ids[: t + 1]) for t in range(len(ids) - n, len(ids))
                ]
                states, found, _, _ = aligned_states(base, texts, layers, alone[row])
                for layer in layers:
                    out[layer][row, T - n :] = states[layer]
                mask[row, T - n :] = found
        state.streams[name] = StreamBatch.stack(base, alone)
        return out, mask

    @property
    def head(self) -> OutputHead:
        anchor = LMHead.from_base(self.anchor)
        if not self.recipe.carry_on.experts:
            return anchor
        experts = [LMHead.from_base(self.bases[e]) for e in self.recipe.carry_on.experts]
        return FusedHead(anchor, experts)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.recipe.carry_on.experts:
            return self.head.logits(hidden)
        return self.anchor.logits(hidden)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence logits (B, T, vocab) of the mixture."""
        features = self.features(input_ids, attention_mask, anchor_final=False)
        hidden, _, _ = self.hidden(features, attention_mask)
        return self.logits(hidden)

    def new_state(self) -> GenerationState:
        from transformers import DynamicCache

        past = {
            name: DynamicCache(config=self.bases[name].model.config)
            for name in self._active()
            if name not in self.aligned
        }
        return GenerationState(base_past=past)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        state: GenerationState,
        attention_mask: torch.Tensor | None = None,
        computed: dict[str, BaseStates] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed new tokens (B, T_new) through every cache; last-position logits (B, vocab) and
        the router's source weights (B, T_new, n_sources). `computed`: as `features` takes it.

        A batch of generations is padded on the left: `attention_mask` (B, T_new) is 0 at
        padding (the prompt's left, or a finished row's later tokens). Padded positions feed
        zeros to the carry-on and are never attended to, so each row's logits are those it
        would get alone, up to float rounding.
        """
        B, T = input_ids.shape
        if not state.rows:
            state.rows = [[] for _ in range(B)]
        new = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for row, (ids, keep) in enumerate(zip(input_ids.tolist(), new.tolist(), strict=True)):
            state.rows[row].extend(i for i, k in zip(ids, keep, strict=True) if k)
        if state.mask is not None or not bool(new.all()):
            before = state.mask if state.mask is not None else new.new_ones(B, state.length)
            state.mask = torch.cat([before, new], dim=1)
        state.length += T
        features = self.features(input_ids, state.mask, state, computed=computed)
        mask = None
        if state.mask is not None:  # padded positions: zeros, never what a base made of them
            device = features.anchor_hidden.device
            mask = state.mask.to(device)
            keep = new.bool()[..., None].to(device)
            features.anchor_hidden = torch.where(keep, features.anchor_hidden, 0.0)
            features.taps = {k: torch.where(keep, v, 0.0) for k, v in features.taps.items()}
        hidden, weights, cache = self.hidden(features, mask, state.carry_on_past)
        state.carry_on_past = cache
        return self.logits(hidden[:, -1]), weights


def _need_offsets(base: FrozenBase) -> None:
    """Scoring per character of text (held-out metrics across tokenizers, compare's loss
    suites) needs each token's character offsets, which only fast tokenizers give."""
    if not getattr(base.tokenizer, "is_fast", False):
        raise BaseSourceError(
            f"base '{base.name}': its tokenizer ({type(base.tokenizer).__name__}) is a slow "
            "Python tokenizer without character offsets, which scoring across tokenizers "
            "needs; give its folder a fast tokenizer (tokenizer.json)"
        )


def pad_features(items: list[Features], width: int) -> Features:
    """Stack per-example features (each (T_i, ...)) into a right-padded batch of `width`."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = t.new_zeros((width - t.shape[0], *t.shape[1:]))
        return torch.cat([t, extra])

    present = None
    if items[0].present is not None:
        present = {k: torch.stack([pad(f.present[k]) for f in items]) for k in items[0].present}  # type: ignore[index]
    return Features(
        taps={k: torch.stack([pad(f.taps[k]) for f in items]) for k in items[0].taps},
        anchor_hidden=torch.stack([pad(f.anchor_hidden) for f in items]),
        present=present,
    )


class CachedMixture(MixtureCore):
    """The trainable half of a mixture, without any base: the carry-on and the anchor's head."""

    def __init__(
        self,
        recipe: Recipe,
        carry_on: CarryOn,
        head: OutputHead,
        upper: UpperLayers | None = None,
    ) -> None:
        self.recipe = recipe
        self.carry_on = carry_on
        self._head = head
        self.upper = upper

    @property
    def head(self) -> OutputHead:
        return self._head

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, seed: int = 0) -> CachedMixture:
        """The carry-on `LiveMixture.from_recipe` with this seed would make, from configs alone."""
        folders = {name: resolve_folder(spec, fetch=False) for name, spec in recipe.bases.items()}
        configs = check_compatible(recipe, folders)
        dtype = DTYPES[recipe.bases[recipe.anchor].dtype]
        anchor = LMHead.from_folder(folders[recipe.anchor], dtype)
        head: OutputHead = anchor
        if recipe.carry_on.experts:
            experts = [
                LMHead.from_folder(folders[e], DTYPES[recipe.bases[e].dtype])
                for e in recipe.carry_on.experts
            ]
            head = FusedHead(anchor, experts)
        upper = None
        if recipe.carry_on.write_at is not None:
            # Only the anchor's layers above the one written into are kept; the rest of the
            # model is dropped once this returns.
            base = load_base(recipe.anchor, recipe.bases[recipe.anchor], fetch=False)
            upper = UpperLayers(base.decoder, recipe.carry_on.write_at)
        torch.manual_seed(seed)
        carry_on, _ = new_carry_on(recipe, folders, configs)
        return cls(recipe, carry_on, head, upper)

    def to(self, device: torch.device) -> CachedMixture:
        """Carry-on, head and the anchor's upper layers (with `write_at`) on `device` (a
        training process's GPU)."""
        self.carry_on.to(device)
        self._head = self._head.to(device)
        if self.upper is not None:
            self.upper.to(device)
        return self


class AnchorAlone(LiveMixture):
    """A base by itself, as a mixture without a carry-on: its own LM head on its own final
    state (what a server answers for the base's name). Its rows share the base's forward
    with the mixtures anchored on it (`composer.model.batch`)."""

    @classmethod
    def of(cls, name: str, base: FrozenBase, spec: BaseSpec) -> AnchorAlone:
        """The base `base` (loaded from `spec`), served as `name`."""
        recipe = Recipe.model_validate(
            {
                "name": name,
                "anchor": "base",
                "bases": {"base": spec.model_dump(exclude_defaults=True)},
                "taps": [f"base@{base.num_layers}"],
                # Never run: the protocol's carry-on names the one source, the final state.
                "carry_on": {"width": 8, "heads": 1, "blocks": [{}]},
                "train": {"data": {"kind": "gsm_symbolic"}},
            }
        )
        source = str(recipe.tap_refs[0])
        carry_on = CarryOn(recipe.carry_on, {source: base.hidden_size}, base.hidden_size)
        return cls(recipe, {"base": base}, carry_on.requires_grad_(False).eval())

    def hidden(
        self,
        features: Features,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        x = features.anchor_hidden
        return x, x.new_ones((*x.shape[:-1], 1)), []

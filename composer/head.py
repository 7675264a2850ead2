"""The anchor's LM head on its own, and a cross-entropy through it that never holds all logits.

Training from cached features needs nothing of the bases but the anchor's output path: its LM
head matrix (and Gemma's final logit soft-capping, from config.json). `LMHead.from_folder` reads
only that tensor from the base's safetensors files; the cached anchor states are already past
the final norm, so the norm is not needed either.

`head_loss` runs the head over row chunks. The head is frozen, so the gradient with respect to
the rows is computed chunk by chunk inside the forward and kept (N × D): no chunk's
(rows × vocab) logits outlive their chunk, and the head's matmul runs twice per chunk (logits,
gradient) instead of three times as it would with recomputation in the backward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from composer.carry_on import CarryOn, KVCache
from composer.errors import BaseSourceError
from composer.frozen import FrozenBase, read_config, resolve_folder
from composer.mixture import Features, Mixture
from composer.plan import aligned_bases, check_compatible
from composer.recipe import Recipe

HEAD_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk of rows
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LMHead:
    weight: torch.Tensor  # (vocab, D), frozen
    bias: torch.Tensor | None  # (vocab,)
    softcap: float | None
    loaded: tuple[str, ...] = ()  # the tensor names read from disk, nothing else

    @classmethod
    def from_base(cls, base: FrozenBase) -> LMHead:
        head = base.model.get_output_embeddings()
        cap = getattr(base.config, "final_logit_softcapping", None)
        return cls(head.weight, head.bias, cap or None)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype) -> LMHead:
        """Read only the head (or, tied, the input embedding) from the folder's safetensors."""
        files = _tensor_files(folder)
        config = read_config(folder)
        heads = [k for k in files if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
        tied = [k for k in files if k.endswith("embed_tokens.weight")]
        if heads:
            key = min(heads, key=len)
        elif tied and config.get("tie_word_embeddings", True):
            key = min(tied, key=len)
        else:
            raise BaseSourceError(f"base folder {folder}: no lm_head.weight in its safetensors")
        names = [key]
        bias_key = key.removesuffix("weight") + "bias"
        if bias_key in files and key in heads:
            names.append(bias_key)
        tensors = {}
        for name in names:
            with safe_open(str(files[name]), framework="pt") as handle:
                tensors[name] = handle.get_tensor(name).to(dtype)
        cap = config.get("final_logit_softcapping")
        bias = tensors.get(bias_key) if len(names) > 1 else None
        return cls(tensors[key], bias, float(cap) if cap else None, tuple(names))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits of `hidden` (..., D), as the base's own head computes them."""
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when sharded (headers only are read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseSourceError(
            f"base folder {folder} has no safetensors weights to read the LM head from"
        )
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), path))
    return out


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of head(rows) against targets; d/d rows computed in the forward."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, targets: torch.Tensor, head: LMHead) -> torch.Tensor:
        chunk = max(1, HEAD_CHUNK_BYTES // (head.weight.shape[0] * 4))
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk):
            x = rows[start : start + chunk].to(head.weight.dtype)
            y = targets[start : start + chunk]
            logits = F.linear(x, head.weight, head.bias).float()  # (c, vocab)
            capped = None
            if head.softcap:
                capped = torch.tanh(logits / head.softcap)
                logits = capped * head.softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = (logits - lse[:, None]).exp_()  # d loss / d logits = p - onehot
                probs[torch.arange(len(y), device=y.device), y] -= 1
                if capped is not None:
                    probs *= 1 - capped * capped
                grad[start : start + chunk] = (probs.to(head.weight.dtype) @ head.weight).to(
                    rows.dtype
                )
        ctx.save_for_backward(grad if grad is not None else rows.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


def head_loss(head: LMHead, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `rows` (N, D) against `targets` (N,)."""
    return _HeadCrossEntropy.apply(rows, targets, head)


class HeadMixture:
    """The trainable half of a mixture, without any base: the carry-on and the anchor's head."""

    def __init__(self, recipe: Recipe, carry_on: CarryOn, head: LMHead) -> None:
        self.recipe = recipe
        self.carry_on = carry_on
        self.head = head

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, seed: int = 0) -> HeadMixture:
        """The carry-on a `Mixture.from_recipe` with this seed would make, from configs alone."""
        folders = {name: resolve_folder(spec, fetch=False) for name, spec in recipe.bases.items()}
        configs = check_compatible(recipe, folders)
        aligned = aligned_bases(recipe, folders)
        dtype = _DTYPES[recipe.bases[recipe.anchor].dtype]
        head = LMHead.from_folder(folders[recipe.anchor], dtype)
        torch.manual_seed(seed)
        tap_dims = {str(t): int(configs[t.base]["hidden_size"]) for t in recipe.tap_refs}
        optional = {str(t) for t in recipe.tap_refs if t.base in aligned}
        anchor_dim = int(configs[recipe.anchor]["hidden_size"])
        return cls(recipe, CarryOn(recipe.carry_on, tap_dims, anchor_dim, optional), head)

    def hidden(
        self,
        features: Features,
        attention_mask: torch.Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """As `Mixture.hidden`: the corrected anchor state, router weights, carry-on cache."""
        out = self.carry_on(
            features.taps, features.anchor_hidden, attention_mask, past, features.present
        )
        return out.hidden, out.source_weights, out.cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)


def lm_head(model: Mixture | HeadMixture) -> LMHead:
    if isinstance(model, HeadMixture):
        return model.head
    return LMHead.from_base(model.anchor)

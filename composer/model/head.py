"""The anchor's LM head on its own, and a cross-entropy through it that never holds all logits.

Training from cached features needs nothing of the bases but the anchor's output path: its LM
head matrix (and Gemma's final logit soft-capping, from config.json). `LMHead.from_folder` reads
only that tensor from the base's safetensors files, and keeps it in the file's dtype when the
recipe's dtype holds those values exactly (bf16 on disk, float32 compute): half the memory, the
same numbers. The cached anchor states are already past the final norm.

`head_loss` is one pass over blocks of the vocabulary with an online softmax (as flash
attention does over keys): per block, the logits of all rows, the running max and normalizer,
and, because the head is frozen, the gradient with respect to the rows, rescaled as the max
moves. No (rows × vocab) logits are ever held, the head's matmul runs twice (logits, gradient)
rather than three times as with recomputation in the backward, and the head is read once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open

from composer.bases.frozen import FrozenBase, read_config
from composer.errors import BaseSourceError

# float32 logits (or upcast head rows) of one vocabulary block. Small enough that a block's
# softmax arithmetic runs in cache between its two matmuls. Against those two matmuls alone (the
# floor bench/train_memory.py prints), one thread of an EPYC with 2 MiB of L2 per core, Qwen's
# and SmolLM2's head shapes: 1.15-1.20x with 16 MiB blocks, 0.97-1.06x with 4 MiB, 1.2-1.4x
# with 512 KiB (the matmuls get too thin).
HEAD_CHUNK_BYTES = 4 * 2**20
ROW_CHUNK = 4096  # rows per pass over the vocabulary


@dataclass
class LMHead:
    weight: torch.Tensor  # (vocab, D), frozen, stored in its own dtype
    bias: torch.Tensor | None  # (vocab,)
    softcap: float | None
    dtype: torch.dtype  # the dtype the base computes its logits in
    loaded: tuple[str, ...] = ()  # the tensor names read from disk, nothing else

    @classmethod
    def from_base(cls, base: FrozenBase) -> LMHead:
        head = base.model.get_output_embeddings()
        cap = getattr(base.config, "final_logit_softcapping", None)
        return cls(head.weight, head.bias, cap or None, head.weight.dtype)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype) -> LMHead:
        """Read only the head (or, tied, the input embedding) from the folder's safetensors."""
        key, files = find_head(folder)
        config = read_config(folder)
        names = [key]
        bias_key = key.removesuffix("weight") + "bias"
        if bias_key in files and key.endswith("lm_head.weight"):
            names.append(bias_key)
        tensors = {}
        for name in names:
            with safe_open(str(files[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            exact = dtype == torch.float32 and tensor.dtype in (torch.bfloat16, torch.float16)
            tensors[name] = tensor if exact else tensor.to(dtype)
        cap = config.get("final_logit_softcapping")
        bias = tensors.get(bias_key) if len(names) > 1 else None
        return cls(tensors[key], bias, float(cap) if cap else None, dtype, tuple(names))

    def to(self, device: torch.device) -> LMHead:
        bias = self.bias.to(device) if self.bias is not None else None
        return LMHead(self.weight.to(device), bias, self.softcap, self.dtype, self.loaded)

    def loss_pass(self) -> Callable[..., Any]:
        return _online_cross_entropy

    def kl_pass(self) -> Callable[..., Any]:
        return _online_kl

    def block(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head rows start:start+size (and bias) in the compute dtype."""
        bias = self.bias[start : start + size].to(self.dtype) if self.bias is not None else None
        return self.weight[start : start + size].to(self.dtype), bias

    def block_size(self, rows: int) -> int:
        width = max(rows, self.weight.shape[1])
        return max(1, min(self.weight.shape[0], HEAD_CHUNK_BYTES // (4 * width)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits of `hidden` (..., D), as the base's own head computes them."""
        x = hidden.to(self.dtype)
        if self.weight.dtype == self.dtype:
            logits = F.linear(x, self.weight, self.bias).float()
        else:
            logits = x.new_empty((*x.shape[:-1], self.weight.shape[0]), dtype=torch.float32)
            size = self.block_size(x[..., 0].numel())
            for start in range(0, self.weight.shape[0], size):
                w, b = self.block(start, size)
                logits[..., start : start + size] = F.linear(x, w, b).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class OutputHead(Protocol):
    """What a mixture reads its logits through: the anchor's `LMHead`, or a `FusedHead` that
    joins expert bases to it (composer.model.experts)."""

    @property
    def weight(self) -> torch.Tensor: ...  # the anchor's head rows: where the head lives

    @property
    def dtype(self) -> torch.dtype: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device) -> OutputHead: ...

    def loss_pass(self) -> Callable[..., Any]: ...

    def kl_pass(self) -> Callable[..., Any]: ...


def find_head(folder: Path) -> tuple[str, dict[str, Path]]:
    """The LM head's tensor name (or, tied, the input embedding's), and tensor name -> file."""
    files = _tensor_files(folder)
    heads = [k for k in files if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
    tied = [k for k in files if k.endswith("embed_tokens.weight")]
    if heads:
        return min(heads, key=len), files
    if tied and read_config(folder).get("tie_word_embeddings", True):
        return min(tied, key=len), files
    raise BaseSourceError(f"base folder {folder}: no lm_head.weight in its safetensors")


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


class _HeadPass(torch.autograd.Function):
    """The sum of `pass_(head, rows, other, want_grad)` over chunks of ROW_CHUNK rows (a loss
    of head(rows), the cross-entropy or the KL below); its gradient to `rows` is computed in
    the same pass over the vocabulary and kept for the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        other: torch.Tensor,
        head: LMHead,
        pass_: Callable[..., Any],
    ) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], ROW_CHUNK):
            stop = start + ROW_CHUNK
            value, g = pass_(head, rows[start:stop], other[start:stop], want_grad)
            total += value
            if grad is not None and g is not None:
                grad[start:stop] = g.to(rows.dtype)
        ctx.save_for_backward(grad if grad is not None else rows.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def subnormal_floor(vocab: int) -> float:
    """Probabilities below e^floor / vocab would be subnormal floats, which slow exp and the
    matmuls ~40x on x86; raising them to e^floor changes the loss by < vocab·e^floor."""
    return math.log(torch.finfo(torch.float32).tiny) + math.log(vocab) + 1


class OnlineSoftmax:
    """Per row, the running max and normalizer of exp(z) over vocabulary blocks, as flash
    attention keeps them over keys."""

    def __init__(self, n: int, vocab: int, device: torch.device) -> None:
        self.floor = subnormal_floor(vocab)
        self.top = torch.full((n,), -math.inf, device=device)
        self.norm = torch.zeros(n, device=device)

    def add(self, z: torch.Tensor, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in block z (n, block): its probabilities, unnormalized against the new max (in
        z's own memory when `inplace`), and the rescale (n,) of the earlier blocks' sums."""
        new_top = torch.maximum(self.top, z.amax(dim=-1))
        rescale = (self.top - new_top).clamp_min_(self.floor).exp_()
        shifted = z.sub_(new_top[:, None]) if inplace else z - new_top[:, None]
        probs = shifted.clamp_min_(self.floor).exp_()
        self.norm = self.norm * rescale + probs.sum(dim=-1)
        self.top = new_top
        return probs, rescale

    @property
    def log_norm(self) -> torch.Tensor:
        return self.top + self.norm.log()


def _online_cross_entropy(
    head: LMHead, rows: torch.Tensor, targets: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of rows (n, D), and its gradient (n, D): softmax(z) @ W - d z_y / d rows."""
    n, vocab = rows.shape[0], head.weight.shape[0]
    x = rows.to(head.dtype)
    softmax = OnlineSoftmax(n, vocab, rows.device)
    target = torch.zeros(n, device=rows.device)
    acc = torch.zeros(n, rows.shape[1], device=rows.device) if want_grad else None
    size = head.block_size(n)
    for start in range(0, vocab, size):
        w, b = head.block(start, size)
        logits = F.linear(x, w, b).float()  # (n, block)
        capped = None
        if head.softcap:
            capped = torch.tanh(logits / head.softcap)
            logits = capped * head.softcap
        here = (targets >= start) & (targets < start + w.shape[0])
        target[here] = logits[here, targets[here] - start]
        probs, rescale = softmax.add(logits, inplace=True)
        if acc is not None:
            if capped is not None:
                probs *= 1 - capped * capped  # through the soft-cap
            acc = acc * rescale[:, None] + (probs.to(head.dtype) @ w).float()
    loss = (softmax.log_norm - target).sum()
    if acc is None:
        return loss, None
    w_target = head.weight[targets].to(head.dtype).float()  # (n, D): d z_y / d rows
    if head.softcap:
        w_target *= 1 - (target / head.softcap).square()[:, None]
    return loss, acc / softmax.norm[:, None] - w_target


def head_loss(head: OutputHead, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `rows` (N, D) against `targets` (N,), computed where
    the head is (an anchor spread over devices keeps its head on its last one)."""
    device = head.weight.device
    with torch.autocast(device.type, enabled=False):  # exact, in the head's own dtype
        loss = _HeadPass.apply(rows.to(device), targets.to(device), head, head.loss_pass())
    return loss.to(rows.device)


def _online_kl(
    head: LMHead, rows: torch.Tensor, anchor_rows: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed KL(p_a ‖ p_m) of rows (n, D) against the anchor's rows, one pass over the
    vocabulary with online softmaxes for both; gradient (n, D): (p_m − p_a) @ W.

        KL = Σ_v e^{z_a − top_a} (z_a − z_m) / norm_a − lse_a + lse_m
    """
    n, vocab = rows.shape[0], head.weight.shape[0]
    x, xa = rows.to(head.dtype), anchor_rows.to(head.dtype)
    mixed, anchor = OnlineSoftmax(n, vocab, rows.device), OnlineSoftmax(n, vocab, rows.device)
    cross = torch.zeros(n, device=rows.device)  # Σ e^{z_a − top_a} (z_a − z_m)
    acc_m = torch.zeros(n, rows.shape[1], device=rows.device) if want_grad else None
    acc_a = torch.zeros(n, rows.shape[1], device=rows.device) if want_grad else None
    size = head.block_size(2 * n)
    for start in range(0, vocab, size):
        w, b = head.block(start, size)
        z_m, z_a = F.linear(x, w, b).float(), F.linear(xa, w, b).float()  # (n, block)
        chain = None
        if head.softcap:
            capped = torch.tanh(z_m / head.softcap)
            chain = 1 - capped * capped  # d z_m / d raw logits, through the soft-cap
            z_m = capped * head.softcap
            z_a = torch.tanh(z_a / head.softcap) * head.softcap
        probs_m, rescale_m = mixed.add(z_m)
        probs_a, rescale_a = anchor.add(z_a)
        cross = cross * rescale_a + (probs_a * (z_a - z_m)).sum(dim=-1)
        if acc_m is not None and acc_a is not None:
            if chain is not None:
                probs_m *= chain
                probs_a *= chain
            acc_m = acc_m * rescale_m[:, None] + (probs_m.to(head.dtype) @ w).float()
            acc_a = acc_a * rescale_a[:, None] + (probs_a.to(head.dtype) @ w).float()
    kl = (cross / anchor.norm - anchor.log_norm + mixed.log_norm).clamp_min(0).sum()
    if acc_m is None or acc_a is None:
        return kl, None
    return kl, acc_m / mixed.norm[:, None] - acc_a / anchor.norm[:, None]


def head_kl(head: OutputHead, rows: torch.Tensor, anchor_rows: torch.Tensor) -> torch.Tensor:
    """Summed KL(anchor ‖ mixture) of the next-token distributions the head gives `anchor_rows`
    and `rows` (N, D): zero where the carry-on leaves the anchor's state as it was."""
    device = head.weight.device
    with torch.autocast(device.type, enabled=False):  # exact, in the head's own dtype
        kl = _HeadPass.apply(rows.to(device), anchor_rows.to(device), head, head.kl_pass())
    return kl.to(rows.device)

"""Expert bases: other bases' own next-token log-probabilities joined to the anchor's output.

A carry-on writes its correction into the anchor's final state, so a mixture can say only what
the anchor's head can be made to say. A base that shares the anchor's tokenizer can speak for
itself instead (`carry_on.experts`): its head reads its own last layer, and the carry-on
weighs its log-probabilities against the anchor's per token, a geometric pool (a product of
experts whose weights sum to 1):

    logits = (1 − Σ_e β_e) · W_pred(x + α · g ⊙ Δx) + Σ_e β_e · log_softmax(W_e h_e)
    β = Linear(z_K)

β starts at 0 (zero-initialized), so an untrained mixture is still exactly its anchor; at
β_e = 1 the mixture is expert e. Why the weights sum to 1: two bases of one family agree, so
their plain product p_anchor · p_e^β is over-confident: on the equal-budget bench's development
split it was worse than the anchor alone at every β > 0, while the pool beat both bases
(figures in docs/quality.md).

A `FusedHead` reads *rows* that carry everything the output needs, concatenated on the last
dimension: `[x' (D_anchor) | β (n_experts) | h_1 (D_1) | ... ]`. Every consumer of a mixture's
hidden states (training, scoring, generation) slices rows by position and hands them to the
head, so the layout passes through them unchanged. The fused passes below keep the anchor's
head exact and blocked as `composer.model.head` does: one pass over vocabulary blocks with an
online softmax, after one pass per expert for its log-normalizer (the experts are frozen and
their states are inputs, so their rows take no gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from composer.errors import RecipeError
from composer.model.head import LMHead, OnlineSoftmax


@dataclass
class FusedHead:
    anchor: LMHead
    experts: list[LMHead]

    def __post_init__(self) -> None:
        vocab = self.anchor.weight.shape[0]
        for i, e in enumerate(self.experts):
            if e.weight.shape[0] != vocab:
                raise RecipeError(
                    f"carry_on.experts.{i}: its head has {e.weight.shape[0]} rows, the "
                    f"anchor's {vocab}"
                )

    @property
    def weight(self) -> torch.Tensor:  # where the head lives (head_loss moves rows there)
        return self.anchor.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """rows (..., width) -> x' (..., D_anchor), β (..., n_experts), [h_e (..., D_e)]."""
        d, n = self.anchor.weight.shape[1], len(self.experts)
        widths = [e.weight.shape[1] for e in self.experts]
        parts = rows.split([d, n, *widths], dim=-1)
        return parts[0], parts[1], list(parts[2:])

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Full logits (..., vocab) of the mixture: the anchor's plus β-weighted expert
        log-probabilities."""
        x, betas, states = self.split(rows)
        betas = betas.float()
        out = (1 - betas.sum(dim=-1, keepdim=True)) * self.anchor.logits(x)
        for j, (expert, h) in enumerate(zip(self.experts, states, strict=True)):
            out = out + betas[..., j : j + 1] * expert.logits(h).log_softmax(dim=-1)
        return out

    def to(self, device: torch.device) -> FusedHead:
        return FusedHead(self.anchor.to(device), [e.to(device) for e in self.experts])

    def loss_pass(self) -> Callable[..., Any]:
        return _fused_cross_entropy

    def kl_pass(self) -> Callable[..., Any]:
        return _fused_kl


def _block_logits(head: LMHead, x: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Logits (n, block) of head rows start:start+size, soft-capped as the base caps them."""
    w, b = head.block(start, size)
    logits = F.linear(x.to(head.dtype), w, b).float()
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _log_norms(head: FusedHead, states: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Each expert's log-normalizer (n,) over the vocabulary, one online pass each."""
    out = []
    for expert, h in zip(head.experts, states, strict=True):
        vocab = expert.weight.shape[0]
        softmax = OnlineSoftmax(h.shape[0], vocab, h.device)
        for start in range(0, vocab, size):
            softmax.add(_block_logits(expert, h, start, size), inplace=True)
        out.append(softmax.log_norm)
    return out


class _Block:
    """One vocabulary block of fused logits: z = (1 − Σβ) own + Σ_j β_j s_j, with own =
    cap(W_a x') and s_j the experts' log-probabilities; `chain` is d own / d (W_a x') through
    the anchor's soft-cap; d z / d β_j = s_j − own."""

    def __init__(
        self,
        head: FusedHead,
        x: torch.Tensor,
        betas: torch.Tensor,
        states: list[torch.Tensor],
        norms: list[torch.Tensor],
        start: int,
        size: int,
    ) -> None:
        anchor = head.anchor
        w, b = anchor.block(start, size)
        self.w = w
        raw = F.linear(x.to(anchor.dtype), w, b).float()  # (n, block)
        self.chain = None
        if anchor.softcap:
            capped = torch.tanh(raw / anchor.softcap)
            self.chain = 1 - capped * capped
            raw = capped * anchor.softcap
        self.own = raw  # the anchor's (capped) logits of this block
        self.s = [
            _block_logits(e, h, start, size) - lse[:, None]
            for e, h, lse in zip(head.experts, states, norms, strict=True)
        ]
        self.keep = 1 - betas.float().sum(dim=-1)  # (n,): the anchor's own weight
        self.z = self.keep[:, None] * self.own  # (n, block)
        for j, s in enumerate(self.s):
            self.z += betas[:, j : j + 1].float() * s


def _fused_cross_entropy(
    head: FusedHead, rows: torch.Tensor, targets: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of fused rows (n, width) against targets (n,), and its gradient
    (n, width): to x' (1 − Σβ) (softmax(z) − onehot) @ W_a through the cap, to β_j
    Σ_v (p_v − y_v)(s_j,v − own_v), zero to the experts' states."""
    x, betas, states = head.split(rows)
    n, vocab = rows.shape[0], head.weight.shape[0]
    size = head.anchor.block_size(n)
    norms = _log_norms(head, states, size)
    softmax = OnlineSoftmax(n, vocab, rows.device)
    target = torch.zeros(n, device=rows.device)  # z at the target
    target_own = torch.zeros(n, device=rows.device)  # the anchor's capped logit at the target
    target_s = torch.zeros(n, len(states), device=rows.device)
    acc_x = torch.zeros(n, x.shape[1], device=rows.device) if want_grad else None
    acc_b = torch.zeros(n, len(states), device=rows.device)
    for start in range(0, vocab, size):
        blk = _Block(head, x, betas, states, norms, start, size)
        here = (targets >= start) & (targets < start + blk.w.shape[0])
        cols = targets[here] - start
        target[here] = blk.z[here, cols]
        target_own[here] = blk.own[here, cols]
        for j, s in enumerate(blk.s):
            target_s[here, j] = s[here, cols]
        probs, rescale = softmax.add(blk.z, inplace=True)
        if acc_x is not None:
            for j, s in enumerate(blk.s):
                acc_b[:, j] = acc_b[:, j] * rescale + (probs * (s - blk.own)).sum(dim=-1)
            through = probs * blk.chain if blk.chain is not None else probs
            acc_x = acc_x * rescale[:, None] + (through.to(head.dtype) @ blk.w).float()
    loss = (softmax.log_norm - target).sum()
    if acc_x is None:
        return loss, None
    w_target = head.anchor.weight[targets].to(head.dtype).float()  # (n, D): d own_y / d x'
    if head.anchor.softcap:
        w_target *= 1 - (target_own / head.anchor.softcap).square()[:, None]
    keep = 1 - betas.float().sum(dim=-1, keepdim=True)  # (n, 1)
    grad_x = keep * (acc_x / softmax.norm[:, None] - w_target)
    grad_b = acc_b / softmax.norm[:, None] - (target_s - target_own[:, None])
    return loss, torch.cat([grad_x, grad_b, *[torch.zeros_like(h) for h in states]], dim=-1)


def _fused_kl(
    head: FusedHead, rows: torch.Tensor, anchor_rows: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed KL(p_a ‖ p_m) of fused rows against the anchor's rows (as
    `MixtureCore.anchor_rows` lays them out: β = 0), and its gradient to `rows`:
    d KL / d z_m = p_m − p_a, carried to x' and to β as above."""
    x, betas, states = head.split(rows)
    xa, betas_a, _ = head.split(anchor_rows)
    n, vocab = rows.shape[0], head.weight.shape[0]
    size = head.anchor.block_size(2 * n)
    norms = _log_norms(head, states, size)
    mixed, anchor = OnlineSoftmax(n, vocab, rows.device), OnlineSoftmax(n, vocab, rows.device)
    cross = torch.zeros(n, device=rows.device)  # Σ e^{z_a − top_a} (z_a − z_m)
    acc_m = torch.zeros(n, x.shape[1], device=rows.device) if want_grad else None
    acc_a = torch.zeros(n, x.shape[1], device=rows.device) if want_grad else None
    acc_bm = torch.zeros(n, len(states), device=rows.device)
    acc_ba = torch.zeros(n, len(states), device=rows.device)
    for start in range(0, vocab, size):
        blk = _Block(head, x, betas, states, norms, start, size)
        own_a = _block_logits(head.anchor, xa, start, size)
        z_m = blk.z
        z_a = (1 - betas_a.float().sum(dim=-1))[:, None] * own_a
        for j, s in enumerate(blk.s):
            z_a += betas_a[:, j : j + 1].float() * s
        probs_m, rescale_m = mixed.add(z_m)
        probs_a, rescale_a = anchor.add(z_a)
        cross = cross * rescale_a + (probs_a * (z_a - z_m)).sum(dim=-1)
        if acc_m is not None and acc_a is not None:
            for j, s in enumerate(blk.s):
                moved = s - blk.own  # d z_m / d β_j
                acc_bm[:, j] = acc_bm[:, j] * rescale_m + (probs_m * moved).sum(dim=-1)
                acc_ba[:, j] = acc_ba[:, j] * rescale_a + (probs_a * moved).sum(dim=-1)
            if blk.chain is not None:
                probs_m = probs_m * blk.chain
                probs_a = probs_a * blk.chain
            acc_m = acc_m * rescale_m[:, None] + (probs_m.to(head.dtype) @ blk.w).float()
            acc_a = acc_a * rescale_a[:, None] + (probs_a.to(head.dtype) @ blk.w).float()
    kl = (cross / anchor.norm - anchor.log_norm + mixed.log_norm).clamp_min(0).sum()
    if acc_m is None or acc_a is None:
        return kl, None
    keep = 1 - betas.float().sum(dim=-1, keepdim=True)  # (n, 1)
    grad_x = keep * (acc_m / mixed.norm[:, None] - acc_a / anchor.norm[:, None])
    grad_b = acc_bm / mixed.norm[:, None] - acc_ba / anchor.norm[:, None]
    return kl, torch.cat([grad_x, grad_b, *[torch.zeros_like(h) for h in states]], dim=-1)


@torch.no_grad()
def best_reference(
    head: FusedHead, rows: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Reference rows (n, width), laid out as `MixtureCore.anchor_rows` gives them, in which
    each group's rows (one general-text example's) read whichever source — the anchor (β = 0)
    or one expert (its β = 1: exactly its distribution) — gives the group's known next tokens
    the least summed loss; ties go to the anchor. `rows` are the anchor's rows, `targets` (n,)
    the next token at each row (negative where there is none), `groups` (n,) each row's group.
    Preservation against this reference keeps, per example, the better base's distribution
    rather than the anchor's alone."""
    x, _, states = head.split(rows)
    known = targets >= 0
    wanted = targets[known]
    losses = [F.cross_entropy(head.anchor.logits(x[known]), wanted, reduction="none")]
    for expert, h in zip(head.experts, states, strict=True):
        losses.append(F.cross_entropy(expert.logits(h[known]), wanted, reduction="none"))
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    per_group = torch.zeros(len(losses), n_groups, device=rows.device)
    per_group.index_add_(1, groups[known], torch.stack(losses))
    pick = per_group.argmin(dim=0)  # the first of equal minima: the anchor on a tie
    betas = F.one_hot(pick, len(losses))[:, 1:][groups]  # (n, n_experts)
    return torch.cat([x, betas.to(rows.dtype), *states], dim=-1)

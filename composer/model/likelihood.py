"""The negative log-likelihood of a token sequence under a mixture's head: the one way text is
scored, by training and its evaluation, the held-out metrics, compare's loss suites and lm-eval.

Every scorer hands over the rows its head reads (a mixture's corrected anchor state, the
anchor's own rows, or a base's final state) and the token each row predicts, and gets back
the summed loss of the same blocked, exact cross-entropy that training takes its gradient
from (`composer.model.head.head_loss`): no (rows × vocab) logits are held, and a figure
scored anywhere is the figure training would have computed on the same rows.
"""

from __future__ import annotations

import torch

from composer.model.head import OutputHead, head_loss


def nll(head: OutputHead, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood in nats (a float32 scalar, differentiable through `rows`)
    of `targets` (...) under the head's next-token distributions at `rows` (..., D).

    `targets[i]` is the token that follows the position of `rows[i]`: for a sequence's rows
    (B, T, D) and its labels (B, T), that is `rows[:, :-1]` against `labels[:, 1:]`. A negative
    target (the labels' IGNORE, -100, as in `F.cross_entropy`) is not scored."""
    targets = targets.to(rows.device)
    scored = targets >= 0
    return head_loss(head, rows[scored], targets[scored])  # rows (N, D), targets (N,)

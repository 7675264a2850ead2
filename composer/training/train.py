"""The one training loop: AdamW on the carry-on only, warmup + cosine, clipping, resumable.

The data order at step s is a function of (seed, s) alone, and nothing else is random during
training, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from composer.errors import TrainError
from composer.features.batch import Batch
from composer.features.data import IGNORE, Example, collate, pad_id
from composer.model.experts import FusedHead, best_reference
from composer.model.head import head_kl
from composer.model.likelihood import nll
from composer.model.mixture import Features, LiveMixture, MixtureCore, pad_features
from composer.progress import counted
from composer.recipe import PreserveSpec, TrainSpec
from composer.training.checkpoint import (
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_training_state,
)
from composer.training.distributed import Ranks


class Source(Protocol):
    """Batches of features by example index: live (FeatureSource) or cached (shards)."""

    examples: list[Example]

    def batch(self, indices: list[int]) -> Batch: ...


class FeatureSource:
    """Batches of base features: computed live per batch, or once per example and kept."""

    def __init__(
        self,
        mixture: LiveMixture,
        examples: list[Example],
        keep: bool,
        advance: Callable[[int], object] | None = None,
    ) -> None:
        self.mixture = mixture
        self.examples = examples
        self.pad_id = pad_id(mixture.tokenizer)
        self.kept: list[Features] | None = None
        if keep:
            kept: dict[int, Features] = {}
            # Similar lengths together, so little of each forward is spent on padding.
            by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
            for chunk in _chunks(by_length, 8):
                batch = collate([examples[i] for i in chunk], self.pad_id)
                features = mixture.features(batch["input_ids"], batch["attention_mask"])
                for row, i in enumerate(chunk):
                    kept[i] = _slice(features, row, len(examples[i].input_ids))
                if advance is not None:
                    advance(len(chunk))
            self.kept = [kept[i] for i in range(len(examples))]

    def batch(self, indices: list[int]) -> Batch:
        rows = [self.examples[i] for i in indices]
        tensors = collate(rows, self.pad_id)
        if self.kept is None:
            features = self.mixture.features(tensors["input_ids"], tensors["attention_mask"])
        else:
            features = pad_features([self.kept[i] for i in indices], tensors["input_ids"].shape[1])
        return Batch(features, tensors["attention_mask"], tensors["labels"])


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _slice(features: Features, row: int, n: int) -> Features:
    present = features.present
    return Features(
        taps={k: v[row, :n].clone() for k, v in features.taps.items()},
        anchor_hidden=features.anchor_hidden[row, :n].clone(),
        present={k: v[row, :n].clone() for k, v in present.items()} if present else None,
    )


def token_loss(mixture: MixtureCore, batch: Batch, use_carry_on: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target positions, through the mixture
    (or, without `use_carry_on`, the anchor alone): composer.model.likelihood.nll."""
    if use_carry_on:
        hidden, _, _ = mixture.hidden(batch.features, batch.attention_mask)
    else:
        hidden = mixture.anchor_rows(batch.features)
    return nll(mixture.head, hidden[:, :-1], batch.labels[:, 1:])


def preserve_positions(
    batch: Batch, indices: Sequence[int], per_example: int, seed: int, step: int
) -> torch.Tensor:
    """(B, T) bool: up to `per_example` real tokens of each example, where the preservation
    KL is taken — a seeded function of (seed, step, the example's index), so a batch split
    over ranks picks the same positions as one process."""
    mask = batch.attention_mask.bool()
    chosen = torch.zeros_like(mask)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed((seed * 100_003 + step) * 1_000_003 + index)
        real = mask[row].nonzero().squeeze(-1).cpu()
        pick = real[torch.randperm(len(real), generator=generator)[:per_example]]
        chosen[row, pick] = True
    return chosen


def preserve_loss(
    mixture: MixtureCore, batch: Batch, chosen: torch.Tensor, reference: str = "anchor"
) -> torch.Tensor:
    """Summed KL(reference ‖ mixture) of the next-token distributions at the `chosen`
    positions. The reference is the anchor (zero while the carry-on leaves the anchor's state
    untouched there), or with `reference="best"` and expert bases, per example the anchor or
    the expert whose loss on the example's chosen next tokens is least."""
    hidden, _, _ = mixture.hidden(batch.features, batch.attention_mask)
    kept = mixture.anchor_rows(batch.features)[chosen]  # the distribution to keep
    if reference == "best" and isinstance(mixture.head, FusedHead):
        targets = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], IGNORE)], 1)
        groups = chosen.nonzero()[:, 0]
        kept = best_reference(mixture.head, kept, targets[chosen], groups)
    return head_kl(mixture.head, hidden[chosen], kept)


@torch.no_grad()
def evaluate(
    mixture: MixtureCore,
    source: Source,
    batch_size: int,
    use_carry_on: bool = True,
    ranks: Ranks | None = None,
) -> float:
    """Mean next-token loss per target token over every example of `source` (with `ranks`,
    each process scores its share of the batches and the sums are combined)."""
    ranks = ranks or Ranks()
    total, count = 0.0, 0
    for chunk in ranks.share(list(_chunks(list(range(len(source.examples))), batch_size))):
        batch = source.batch(chunk).to(ranks.device)
        total += float(token_loss(mixture, batch, use_carry_on))
        count += batch.n_targets
    sums = ranks.sum(torch.tensor([total, count], dtype=torch.float64))
    return float(sums[0] / max(float(sums[1]), 1.0))


def lr_at(step: int, spec: TrainSpec, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of step `step`: epoch-wise seeded permutations, a pure function of step."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    preserve_kl: list[tuple[int, float]] = field(default_factory=list)  # mean KL per position
    seconds: float = 0.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(
    mixture: MixtureCore,
    train_source: Source,
    eval_source: Source,
    spec: TrainSpec,
    checkpoints: Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    console: Console | None = None,
    ranks: Ranks | None = None,
    preserve_source: Source | None = None,
) -> TrainResult:
    """Train the carry-on; checkpoints every `spec.checkpoint_every` steps and at the end.

    With `spec.preserve` (and its `preserve_source` of general text), each step adds
    `weight` × the mean KL(anchor ‖ mixture) over seeded positions of a general-text batch.
    With `ranks` of several processes, each computes its share of every step's batch and the
    gradients are summed (composer.training.distributed); rank 0 alone writes checkpoints."""
    ranks = ranks or Ranks()
    if spec.batch_size < ranks.world:
        raise TrainError(
            f"train.batch_size {spec.batch_size} is smaller than the {ranks.world} training "
            "processes: every process needs at least one example per step"
        )
    total_steps = steps or spec.steps
    carry_on = mixture.carry_on
    params = [p for p in carry_on.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    result = TrainResult(steps=0, tokens=0)
    start = 0
    if resume and (last := latest_checkpoint(checkpoints)) is not None:
        state = load_training_state(last, carry_on, optimizer)
        start = state["step"]
        result.tokens = state["tokens"]
        result.train_loss = [tuple(x) for x in state["train_loss"]]
        result.eval_loss = [tuple(x) for x in state["eval_loss"]]
        result.preserve_kl = [tuple(x) for x in state.get("preserve_kl", [])]
    carry_on.train()
    console = console or Console(stderr=True)
    began = time.perf_counter()
    n = len(train_source.examples)
    detail = "loss {task.fields[loss]}  {task.fields[speed]} tok/s"
    quiet = not ranks.is_main
    with counted("train", detail, unit="steps", console=console, disable=quiet) as progress:
        task = progress.add_task("train", total=total_steps, completed=start, loss="-", speed="-")
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            indices = ranks.share(batch_indices(step, n, spec.batch_size, spec.seed))
            batch = train_source.batch(indices).to(ranks.device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, spec, total_steps)
            counts = ranks.sum(torch.tensor([batch.n_targets, int(batch.attention_mask.sum())]))
            with _autocast(spec, batch.attention_mask.device):
                loss = token_loss(mixture, batch) / max(int(counts[0]), 1)
                if spec.preserve is not None and preserve_source is not None:
                    kl = _preserve_step(mixture, preserve_source, spec, spec.preserve, step, ranks)
                    result.preserve_kl.append((step + 1, float(ranks.sum(kl.detach()))))
                    loss = loss + spec.preserve.weight * kl
            value = float(ranks.sum(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ranks.sum_grads(params)
            norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            if not (math.isfinite(value) and math.isfinite(float(norm))):
                raise TrainError(_diverged(step + 1, value, checkpoints))
            optimizer.step()
            tokens = int(counts[1])
            result.tokens += tokens
            result.train_loss.append((step + 1, value))
            speed = tokens / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, advance=1, loss=f"{value:.4f}", speed=f"{speed:,.0f}")
            done = step + 1
            if done % spec.eval_every == 0 or done == total_steps:
                carry_on.eval()
                loss_now = evaluate(mixture, eval_source, spec.batch_size, ranks=ranks)
                result.eval_loss.append((done, loss_now))
                carry_on.train()
            if done % spec.checkpoint_every == 0 or done == total_steps:
                trainer = {
                    "tokens": result.tokens,
                    "train_loss": result.train_loss,
                    "eval_loss": result.eval_loss,
                    "preserve_kl": result.preserve_kl,
                }
                if ranks.is_main:
                    save_training_state(checkpoints, done, carry_on, optimizer, trainer)
                    prune_checkpoints(checkpoints, keep=2)
                ranks.barrier()
    carry_on.eval()
    result.steps = total_steps
    result.seconds = time.perf_counter() - began
    return result


def _autocast(spec: TrainSpec, device: torch.device) -> torch.autocast:
    """`train.autocast`: the carry-on's matmuls in bfloat16 inside (the head's exact loss
    turns autocast off for itself: composer.model.head)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=spec.autocast == "bfloat16")


def _diverged(step: int, loss: float, checkpoints: Path) -> str:
    """The one line of a run stopped by a non-finite loss or gradient: no step was taken."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
    last = latest_checkpoint(checkpoints)
    kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written"
    return f"training stopped at step {step}: {what}; {kept} (try a lower train.lr)"


def _preserve_step(
    model: MixtureCore,
    source: Source,
    spec: TrainSpec,
    preserve: PreserveSpec,
    step: int,
    ranks: Ranks,
) -> torch.Tensor:
    """This rank's share of the step's mean KL over general-text positions (seeded, resumable:
    a function of (seed, step) as the task batch is)."""
    n = len(source.examples)
    indices = ranks.share(batch_indices(step, n, preserve.batch_size, spec.seed + 1))
    batch = source.batch(indices).to(ranks.device)
    # The mean is over every rank's positions together, as one process would take it.
    chosen = preserve_positions(batch, indices, preserve.positions, spec.seed, step)
    count = ranks.sum(torch.tensor([int(chosen.sum())]))
    return preserve_loss(model, batch, chosen, preserve.reference) / max(int(count[0]), 1)

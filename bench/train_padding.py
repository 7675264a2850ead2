"""Does padding bound the build's training time? A step's rows in groups of similar length
against the one padded batch the training loop takes.

Run by hand (not in CI) on a recipe whose feature cache `compose build` (or `compose cache`)
already wrote, e.g. the shipped one after `bash bench/chat_code_math.sh`:

    python bench/train_padding.py [recipes/chat-code-math.yaml] [--mixture runs/chat-code-math]
                                  [--steps 6]

The shipped recipe's math rows (~1,200 characters) mix with ~400-character code rows and short
chat rows, so much of a padded step's positions are padding. The grouped arm backpropagates each
step's rows in groups that pad at most 10% (longest first), each group's summed loss divided by
the step's target count: the same gradient, up to float summation order. For `--steps` steps
spread over the recipe's run (the batches the build takes at those steps, task and
preservation), both arms run on the same carry-on (the built mixture's with `--mixture`, so
every parameter takes a gradient), alternating so that other work on the cores slows both
alike. Printed: the padding share of all the run's steps each way (from the examples' lengths),
each arm's step times, the median ratio, and the largest gradient difference between the arms
(under the recipe's bfloat16 autocast other matmul shapes round otherwise: a few percent of a
tensor's largest element; in float32, on a tiny model, they agreed within 1e-4).

Measured on the shipped recipe (docs/quality.md): the grouped arm is not faster, as ~57% of a
step is the anchor's head over its 151,936-token vocabulary, which reads the scored rows only
(never padding) and is read once more per group.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from composer.features.cache import open_cache
from composer.model.mixture import CachedMixture
from composer.model.weights import WEIGHTS
from composer.recipe import load_recipe
from composer.training.train import batch_indices, preserve_loss, preserve_positions, token_loss


def length_groups(lengths: list[int], waste: float = 0.1) -> list[list[int]]:
    """The positions of `lengths` in groups of similar length, longest first, each group
    spending at most `waste` of its padded positions on padding."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            group = groups[-1]
            filled = sum(lengths[j] for j in group) + lengths[i]
            if filled >= (1 - waste) * lengths[group[0]] * (len(group) + 1):
                group.append(i)
                continue
        groups.append([i])
    return groups


def by_length(source, indices: list[int]) -> list[list[int]]:
    """The grouped arm: the step's rows in length groups."""
    lengths = [len(source.examples[i].input_ids) for i in indices]
    return [[indices[j] for j in group] for group in length_groups(lengths)]


def together(source, indices: list[int]) -> list[list[int]]:
    """The padded arm: the step's rows as the one batch the training loop takes."""
    return [indices]


def _autocast(spec) -> torch.autocast:
    return torch.autocast("cpu", torch.bfloat16, enabled=spec.autocast == "bfloat16")


def run_step(model, sources, spec, step: int, groups) -> None:
    """Backpropagates step `step`'s task loss and preservation KL (each divided by the whole
    step's count, as training divides), batch by batch of `groups(source, indices)`."""
    train = sources["train"]
    indices = batch_indices(step, len(train.examples), spec.batch_size, spec.seed)
    batches = [train.batch(rows) for rows in groups(train, indices)]
    n_targets = max(sum(b.n_targets for b in batches), 1)
    for batch in batches:
        with _autocast(spec):
            loss = token_loss(model, batch) / n_targets
        loss.backward()
    if spec.preserve is not None:
        general = sources["preserve"]
        n = len(general.examples)
        indices = batch_indices(step, n, spec.preserve.batch_size, spec.seed + 1)
        rows = groups(general, indices)
        batches = [general.batch(r) for r in rows]
        # each example's positions depend on its index alone, whichever batch it is in
        chosen = [
            preserve_positions(b, r, spec.preserve.positions, spec.seed, step)
            for b, r in zip(batches, rows, strict=True)
        ]
        count = max(sum(int(c.sum()) for c in chosen), 1)
        for batch, where in zip(batches, chosen, strict=True):
            with _autocast(spec):
                kl = preserve_loss(model, batch, where, spec.preserve.reference) / count
            (spec.preserve.weight * kl).backward()


def padding_share(source, seed: int, batch_size: int, steps: int) -> tuple[float, float]:
    """The share of padding positions over `steps` steps: one padded batch, length groups."""
    lengths = [len(e.input_ids) for e in source.examples]
    real = padded = group_padded = 0
    for step in range(steps):
        rows = [lengths[i] for i in batch_indices(step, len(lengths), batch_size, seed)]
        real += sum(rows)
        padded += max(rows) * len(rows)
        for group in length_groups(rows):
            group_padded += max(rows[i] for i in group) * len(group)
    return 1 - real / padded, 1 - real / group_padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default="recipes/chat-code-math.yaml")
    parser.add_argument("--mixture", type=Path, default=None, help="a built mixture's folder")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    spec = recipe.train
    cache = open_cache(recipe)
    sources = {name: cache.source(name) for name in cache.manifest["shards"]}
    model = CachedMixture.from_recipe(recipe, seed=spec.seed)
    if args.mixture is not None:
        model.carry_on.load_state_dict(load_file(str(args.mixture / WEIGHTS)))
    model.carry_on.train()
    params = dict(model.carry_on.named_parameters())

    task = padding_share(sources["train"], spec.seed, spec.batch_size, spec.steps)
    print(f"task batches, {spec.steps} steps: {task[0]:.1%} padding padded, {task[1]:.1%} grouped")
    if spec.preserve is not None:
        general = padding_share(
            sources["preserve"], spec.seed + 1, spec.preserve.batch_size, spec.steps
        )
        print(f"preservation batches: {general[0]:.1%} padding padded, {general[1]:.1%} grouped")

    spread = (spec.steps - 1) / max(args.steps - 1, 1)
    chosen = sorted({round(i * spread) for i in range(args.steps)})
    times: dict[str, list[float]] = {"padded": [], "grouped": []}
    worst = 0.0
    for step in chosen:
        grads = {}
        for name, groups in (("padded", together), ("grouped", by_length)):
            model.carry_on.zero_grad(set_to_none=True)
            began = time.perf_counter()
            run_step(model, sources, spec, step, groups)
            times[name].append(time.perf_counter() - began)
            grads[name] = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        for key, want in grads["padded"].items():
            got = grads["grouped"][key]
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
        last = {name: spent[-1] for name, spent in times.items()}
        print(
            f"step {step}: padded {last['padded']:.1f} s, grouped {last['grouped']:.1f} s",
            flush=True,
        )
    median = {name: statistics.median(spent) for name, spent in times.items()}
    print(
        f"median step: padded {median['padded']:.1f} s, grouped {median['grouped']:.1f} s; "
        f"grouped/padded = {median['grouped'] / median['padded']:.2f}; largest gradient difference "
        f"{worst:.1e} of the gradient's largest element"
    )


if __name__ == "__main__":
    main()

"""Held-out metrics per data domain: losses of the anchor, the mixture and each base alone, and
the router's mean weight per source.

Per-token losses of bases with different tokenizers are not comparable (their tokens differ),
so every loss here is also given per character of the target text: the summed negative
log-likelihood of the target characters divided by their number, whichever tokens carry them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from composer.features.data import IGNORE, Example, collate, pad_id
from composer.model.head import LMHead
from composer.model.likelihood import nll
from composer.model.mixture import LiveMixture

if TYPE_CHECKING:
    from composer.training.train import Source


@torch.no_grad()
def domain_metrics(
    mixture: LiveMixture,
    examples: list[Example],
    batch_size: int = 8,
    cached: Source | None = None,
) -> dict[str, dict[str, Any]]:
    """{domain: {examples, target_chars, loss_per_token, nats_per_char, gate_mean}}.

    With `cached` (the examples' split in the feature cache, in the same order), the mixture
    and the anchor read the cached states, the ones training read, instead of running the
    bases again. Each other base alone runs on its own tokens; the anchor alone is the anchor's
    own score (running it again on its re-encoded text would only repeat that forward)."""
    if cached is not None and [e.input_ids for e in cached.examples] != [
        e.input_ids for e in examples
    ]:
        raise ValueError("the cached split does not hold these examples")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    gates: dict[str, torch.Tensor] = {}
    pad = pad_id(mixture.tokenizer)
    head = mixture.head
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if cached is not None:
            batch = cached.batch(list(range(start, start + len(chunk))))
            features, mask = batch.features, batch.attention_mask
        else:
            tensors = collate(chunk, pad)
            mask = tensors["attention_mask"]
            features = mixture.features(tensors["input_ids"], mask)
        hidden, weights, _ = mixture.hidden(features, mask)
        anchor = mixture.anchor_rows(features)
        for row, example in enumerate(chunk):
            n = len(example.input_ids)
            acc = sums[example.domain]
            targets = torch.tensor(example.labels[1:n])
            for name, h in (("mixture", hidden), ("anchor", anchor)):
                acc[f"nll_{name}"] += float(nll(head, h[row, : n - 1], targets))
            acc["tokens"] += int((targets != IGNORE).sum())
            acc["chars"] += len(target_text(mixture.tokenizer, example))
            acc["examples"] += 1
            g = weights[row, :n].mean(dim=0)
            gates[example.domain] = gates.get(example.domain, torch.zeros_like(g)) + g
        for name, base in mixture.bases.items():
            if base is mixture.anchor:
                continue
            for example, alone in zip(chunk, base_target_nll(base, mixture, chunk), strict=True):
                sums[example.domain][f"nll_base_{name}"] += alone
    report = {}
    for domain, acc in sums.items():
        chars = max(acc["chars"], 1.0)
        report[domain] = {
            "examples": int(acc["examples"]),
            "target_tokens": int(acc["tokens"]),
            "target_chars": int(acc["chars"]),
            "loss_per_token": {
                "anchor": acc["nll_anchor"] / max(acc["tokens"], 1),
                "mixture": acc["nll_mixture"] / max(acc["tokens"], 1),
            },
            "nats_per_char": {
                "anchor": acc["nll_anchor"] / chars,
                "mixture": acc["nll_mixture"] / chars,
                **{
                    f"{name} alone": acc[
                        "nll_anchor" if base is mixture.anchor else f"nll_base_{name}"
                    ]
                    / chars
                    for name, base in mixture.bases.items()
                },
            },
            "gate_mean": {
                src: float(v)
                for src, v in zip(
                    mixture.carry_on.sources, gates[domain] / acc["examples"], strict=True
                )
            },
        }
    return report


def _split_text(tokenizer: Any, example: Example) -> tuple[str, str]:
    """(context text, target text) of an example, decoded from the anchor's tokens."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), 0)
    first = max(first, 1)  # the first token is never a target: nothing predicts it
    decode = lambda ids: tokenizer.decode(  # noqa: E731
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return decode(example.input_ids[:first]), decode(example.input_ids[first:])


def target_text(tokenizer: Any, example: Example) -> str:
    return _split_text(tokenizer, example)[1]


def base_target_nll(base: Any, mixture: LiveMixture, examples: list[Example]) -> list[float]:
    """Each example's target text scored by a base alone, in its own tokenization: the summed
    NLL of the tokens that end inside the target text (a token straddling the boundary counts,
    so every target character is covered once). One right-padded forward for all of them."""
    rows = []
    for example in examples:
        context, target = _split_text(mixture.tokenizer, example)
        encoded = base.tokenizer(
            context + target, add_special_tokens=True, return_offsets_mapping=True
        )
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        rows.append((ids, [j for j in range(1, len(ids)) if offsets[j][1] > len(context)]))
    batch = collate([Example(input_ids=ids, labels=ids) for ids, _ in rows], pad_id(base.tokenizer))
    states = base.forward(batch["input_ids"], batch["attention_mask"], [], need_final=True)
    assert states.final is not None
    head = LMHead.from_base(base)
    out = []
    for r, (ids, wanted) in enumerate(rows):
        targets = torch.tensor([ids[j] for j in wanted], dtype=torch.long)
        out.append(float(nll(head, states.final[r, [j - 1 for j in wanted]], targets)))
    return out


def gate_separation(domains: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per source, how far apart the router's mean weight lies across the trained domains
    (max − min of `gate_mean`): 0 for a fixed mix, larger where the router routes by domain."""
    trained = [d["gate_mean"] for name, d in domains.items() if not name.startswith("general/")]
    if len(trained) < 2:
        return {}
    return {src: max(g[src] for g in trained) - min(g[src] for g in trained) for src in trained[0]}

"""The carry-on's settings chosen on a development split of the training items, not held-out ones.

`bench/equal_budget.py` fixed the carry-on's settings before its first run (lr 1e-3, taps at
middle layers only). This bench asks whether other settings would have been better without
looking at any held-out item: it splits the bench's *training* items per domain into a quarter
for development and the rest for training (`composer.features.data.split`, seed 1), trains the
mixture with preservation on that rest for the bench's steps, and reports development nats/char
per domain for each variant. The general text preservation trains on is split the same way:
a quarter of it is the development set for off-domain harm. It reads the feature cache that
`equal_budget.py` wrote (run that first, with the same --per-domain / --seq-len / --out):

    python bench/carry_on_dev.py [--out runs/eb] [--variants lr=1e-3 lr=3e-3 lr=3e-3,final]

A variant is comma-separated: `lr=X` sets train.lr; `final` adds the anchor's final state (the
LM head's input, `code@24`, already in the cache as the anchor state) as a router source and a
shortcut into the last block, as the paper's carry-on reads the base's last layer; `lora`
trains the bench's PEFT LoRA arm (rank matched to the mixture) instead, on the same split and
batches, so both methods get the same chance to pick their rate; `best` sets
`train.preserve.reference: best` (keep, per general-text example, the better of the anchor's and
an expert's distribution; with `--experts`); `plain` trains without preservation
(`train.preserve: none`, as the LoRA arm trains); `mid=L` sets `carry_on.write_at: L`: the
correction enters the anchor's residual stream after its layer L and the anchor's own upper
layers carry it to the head — a correction inside the anchor, as LoRA's is, rather than after
its last layer (the mixture's anchor tap moves to layer L when it was above). With `--experts`
(the 1.5B coder pooled through its own head) a run is named `VARIANT,experts`, its results in
`OUT/dev/VARIANT,experts.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import equal_budget as eb


def variant_dict(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    recipe = eb.recipe_dict(args, "mixture")
    for part in variant.split(","):
        if part.startswith("lr="):
            recipe["train"]["lr"] = float(part.removeprefix("lr="))
        elif part == "final":
            eb.add_final_tap(recipe)
        elif part == "lora":
            pass  # PEFT LoRA on the anchor instead of a carry-on (run_variant)
        elif part == "best":
            recipe["train"]["preserve"]["reference"] = "best"
        elif part == "plain":
            recipe["train"]["preserve"] = None
        elif part.startswith("mid="):
            eb.write_at(recipe, int(part.removeprefix("mid=")))
        else:
            known = "lr=X, final, best, plain, mid=L or lora"
            raise SystemExit(f"unknown variant part {part!r} ({known})")
    return recipe


class Subset:
    """Some examples of a source, re-indexed from 0 (a train source for `train`)."""

    def __init__(self, source: Any, indices: list[int]) -> None:
        self.source = source
        self.indices = indices
        self.examples = [source.examples[i] for i in indices]

    def batch(self, indices: list[int]) -> Any:
        return self.source.batch([self.indices[i] for i in indices])


def dev_split(items: list[Any]) -> tuple[list[int], list[int]]:
    """Indices of the three quarters trained on and the quarter for development (seed 1)."""
    from composer.features.data import split

    fit, dev = split(items, 0.25, seed=1)
    position = {id(e): i for i, e in enumerate(items)}
    return [position[id(e)] for e in fit], [position[id(e)] for e in dev]


def run_variant(args: argparse.Namespace, variant: str, key: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from composer.bases.frozen import resolve_folder
    from composer.features.cache import open_cache
    from composer.model.mixture import CachedMixture
    from composer.recipe import recipe_from_dict
    from composer.training.train import train

    recipe = recipe_from_dict(variant_dict(args, variant), f"carry-on-dev:{variant}")
    cache = open_cache(eb.load(args, "cache"))
    sources = {name: cache.source(name) for name in cache.manifest["shards"]}
    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(recipe.bases["code"], fetch=False))
    splits = eb.held_out(eb.load(args, "mixture"), tokenizer)
    items, general = splits["train"], splits["preserve"]
    cached = sources["train"]
    assert [e.input_ids for e in cached.examples] == [e.input_ids for e in items]
    assert [e.input_ids for e in sources["preserve"].examples] == [e.input_ids for e in general]
    fit_idx, dev_idx = dev_split(items)
    keep_idx, general_dev_idx = dev_split(general)  # off-domain development text
    if "lora" in variant.split(","):
        return run_lora(args, recipe, items, fit_idx, dev_idx, key)
    wrap = eb.WithFinalTap if "final" in variant.split(",") else (lambda s: s)
    model = CachedMixture.from_recipe(recipe, seed=recipe.train.seed)
    began = time.perf_counter()
    result = train(
        model,
        wrap(Subset(cached, fit_idx)),
        wrap(Subset(cached, dev_idx[:4])),
        recipe.train,
        Path(args.out) / "dev" / key / "checkpoints",
        preserve_source=wrap(Subset(sources["preserve"], keep_idx)),
    )
    seconds = time.perf_counter() - began
    scored = eb.score_carry_on(model, wrap(cached), items, dev_idx, tokenizer, anchor=True)
    scored += eb.score_carry_on(
        model, wrap(sources["preserve"]), general, general_dev_idx, tokenizer, anchor=True
    )
    rows = [(domain, nll, chars) for (domain, nll, _, chars), _ in scored]
    anchor_rows = [(domain, base, chars) for (domain, _, base, chars), _ in scored]
    return {
        "variant": key,
        "dev": eb.per_char(rows),
        "anchor_dev": eb.per_char(anchor_rows),
        "fit_items": len(fit_idx),
        "dev_items": len(dev_idx),
        "general_dev_items": len(general_dev_idx),
        "final_train_loss": result.train_loss[-1][1],
        "seconds": round(seconds, 1),
    }


def run_lora(
    args: argparse.Namespace,
    recipe: Any,
    items: list[Any],
    fit_idx: list[int],
    dev_idx: list[int],
    variant: str,
) -> dict[str, Any]:
    """LoRA on the anchor, rank matched to the mixture's trainable count, on the same split."""
    from composer.model.mixture import CachedMixture

    mixture = CachedMixture.from_recipe(eb.load(args, "mixture"))
    target = sum(p.numel() for p in mixture.carry_on.parameters() if p.requires_grad)
    began = time.perf_counter()
    result, _ = eb.lora_run(
        args, target, recipe.train.lr, [items[i] for i in fit_idx], [items[i] for i in dev_idx]
    )
    return {
        "variant": variant,
        "dev": result["losses"],
        "fit_items": len(fit_idx),
        "dev_items": len(dev_idx),
        "final_train_loss": None,
        "rank": result["rank"],
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    eb.size_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=["lr=1e-3", "lr=3e-3", "lr=3e-3,final"])
    args = parser.parse_args()
    if not (Path(args.out) / "cache").is_dir():
        raise SystemExit(f"no feature cache in {args.out}/cache: run bench/equal_budget.py first")
    torch.manual_seed(0)
    results = []
    for variant in args.variants:
        key = variant + (",experts" if args.experts else "")  # a run's name: file and table
        path = Path(args.out) / "dev" / f"{key}.json"
        # Runs from before the general text had its own development quarter are redone.
        if not path.is_file() or "general_dev_items" not in json.loads(path.read_text()):
            print(f"[{time.strftime('%H:%M:%S')}] variant {key} ...", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run_variant(args, variant, key), indent=2))
        results.append(json.loads(path.read_text()))
    columns = [*eb.DOMAINS, "off-domain"]
    lines = ["| variant | " + " | ".join(columns) + " | train loss | s |", "|---" * 7 + "|"]
    anchor = next(r["anchor_dev"] for r in results if "anchor_dev" in r)
    cells = " | ".join(f"{anchor[d]:.4f}" for d in columns)
    lines.append(f"| anchor alone | {cells} | - | - |")
    for r in results:
        cells = [
            f"{r['dev'][d]:.4f} ({r['dev'][d] / anchor[d] - 1:+.1%})" if d in r["dev"] else "-"
            for d in columns
        ]
        loss = r["final_train_loss"]
        loss_cell = f"{loss:.3f}" if loss is not None else "-"
        lines.append(
            f"| {r['variant']} | " + " | ".join(cells) + f" | {loss_cell} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines)
    text += (
        f"\n\nDevelopment split: {results[0]['dev_items']} of the bench's training items "
        f"(the other {results[0]['fit_items']} trained on); off-domain: a quarter of the "
        "general text preservation trains on (the rest kept for it); no held-out item is read.\n"
    )
    print(text)
    (Path(args.out) / "dev" / "table.md").write_text(text)


if __name__ == "__main__":
    main()

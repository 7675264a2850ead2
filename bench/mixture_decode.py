"""A recipe's mixture decoding a batch against its anchor alone, on the same prompts in one run.

Run by hand (not in CI):

    python bench/mixture_decode.py [--recipe recipes/chat-code-math.yaml]
                                   [--data ../shared/data/gsm8k/train.jsonl]
                                   [--items 16] [--max-new-tokens 64]

Builds the recipe's mixture untrained (its cost does not depend on the weights) and loads its
anchor alone in the recipe's dtype (what `compose compare` runs as `CARD:DTYPE`); both answer
the last `--items` GSM8K questions of `--data` greedily in one batch, every row decoding
`--max-new-tokens` tokens (no early end, so both decode the same number of steps), the anchor
alone timed before and after the mixture. Prints each wall time (prompts included), the
mixture / anchor ratio, and the bases the mixture runs (aligned ones re-tokenize the text each
step: their rows' new tokens run in one forward per step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from composer.compare.runner import open_model
from composer.compare.scoring import generations
from composer.generation.decode import decode_together
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe


def questions(path: Path, items: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [str(row["question"]) for row in rows[-items:]]


@torch.no_grad()
def seconds(model: Any, prompts: list[str], new: int) -> float:
    made = generations(model, prompts, new, stop_at_eos=False)
    began = time.perf_counter()
    for _ in decode_together(made):
        pass
    took = time.perf_counter() - began
    assert all(len(g.ids) == new for g in made)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/chat-code-math.yaml")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    prompts = questions(args.data, args.items)
    mixture = LiveMixture.from_recipe(recipe)
    anchor = recipe.bases[recipe.anchor]
    alone = open_model(f"{anchor.card}:{anchor.dtype}")
    seconds(alone, prompts[:2], 4)  # warm-up: first calls allocate
    seconds(mixture, prompts[:2], 4)
    new = args.max_new_tokens
    before = seconds(alone, prompts, new)
    mixed = seconds(mixture, prompts, new)
    after = seconds(alone, prompts, new)
    base = (before + after) / 2
    print(
        f"{recipe.name}: bases {', '.join(recipe.bases)} (aligned: "
        f"{', '.join(sorted(mixture.aligned)) or 'none'}); {len(prompts)} GSM8K questions in "
        f"one batch, {new} new tokens each"
    )
    print(f"  anchor alone ({anchor.card}:{anchor.dtype}) {before:7.1f} s, again {after:7.1f} s")
    print(f"  mixture                    {mixed:7.1f} s")
    print(f"  mixture / anchor alone: {mixed / base:.2f}x")


if __name__ == "__main__":
    main()

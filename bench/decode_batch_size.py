"""Decoding throughput by batch size: what `--batch` buys `compose compare` and `compose answer`.

Run by hand (not in CI):

    python bench/decode_batch_size.py [MODEL] [--data ../shared/data/gsm8k/train.jsonl]
                                      [--batches 16,32,48] [--steps 12]

MODEL is anything `compose compare` takes as a side (default: the 1.5B coder in bfloat16). For
each batch size, that many of the last GSM8K questions of `--data` are decoded together, greedy
and never ending early; once every prompt has joined the batch (the decoder feeds 256 prompt
tokens a step), `--steps` decoding steps are timed. Prints seconds per step and new tokens per
second for each size, and each size's tokens/s over the first size's.
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


def questions(path: Path, items: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [str(row["question"]) for row in rows[-items:]]


@torch.no_grad()
def step_seconds(model: Any, prompts: list[str], steps: int) -> tuple[float, int]:
    """Seconds per decoding step of all `prompts` together, every one of them running, and
    the tokens those steps made (one per row and step)."""
    made = generations(model, prompts, steps + 2, stop_at_eos=False)
    decoding = decode_together(made)
    while not all(g.ids for g in made):  # prompts still joining
        next(decoding)
    next(decoding)  # a first step with every row in
    before = sum(len(g.ids) for g in made)
    began = time.perf_counter()
    for _ in range(steps):
        next(decoding)
    seconds = (time.perf_counter() - began) / steps
    return seconds, sum(len(g.ids) for g in made) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-instruct:bfloat16")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--batches", default="16,32,48")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    sizes = [int(n) for n in args.batches.split(",")]
    prompts = questions(args.data, max(sizes))
    model = open_model(args.model)
    step_seconds(model, prompts[:2], 2)  # warm-up: first calls allocate
    print(f"{args.model}: GSM8K questions, {args.steps} decoding steps timed per batch size")
    first = None
    for size in sizes:
        seconds, tokens = step_seconds(model, prompts[:size], args.steps)
        assert tokens == size * args.steps, (tokens, size * args.steps)
        rate = size / seconds
        first = first or rate
        print(
            f"  batch {size:>3}: {seconds:.3f} s/step  {rate:6.1f} tokens/s  "
            f"{rate / first:.2f}x batch {sizes[0]}"
        )


if __name__ == "__main__":
    main()

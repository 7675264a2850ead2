"""The continuous batch against fixed batches, on the same prompts in one run.

Run by hand (not in CI):

    python bench/batch_decode.py [MODEL] [--data ../shared/data/gsm8k/train.jsonl]
                                 [--items 32] [--batch 8] [--max-new-tokens 320]

MODEL is anything `compose compare` takes as a side (default: the 0.5B coder in bfloat16). The
prompts are the last `--items` GSM8K questions of `--data` (rows of `compose compare`'s
`gsm8k-dev`), answered greedily as its GSM suites answer (to the end of a `#### N` line, or
end-of-sequence, or `--max-new-tokens`): answers of uneven length, as in an evaluation.

- fixed: `--batch` prompts decoded together; the next `--batch` start when all of them ended
  (what compare and `compose answer` did before 7a5bcfd);
- continuous: all prompts, `--batch` in the batch at once, the next joining as one ends
  (`decode_together(at_once=...)`, what they do now).

Prints each mode's wall time, answers/s and new tokens/s, the continuous/fixed ratio, how busy
the fixed batches' rows were (tokens decoded over steps × rows), and how many answers came out
token for token the same both ways (the rest differ by float rounding in another batch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from composer.compare.runner import open_model
from composer.compare.scoring import GSM_DONE, generations
from composer.generation.decode import decode_together


def questions(path: Path, items: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [str(row["question"]) for row in rows[-items:]]


def fixed(mixture: Any, prompts: list[str], batch: int, new: int) -> tuple[list[Any], int]:
    """Each slice of `batch` prompts to its end before the next; the row-steps it held."""
    made, held = [], 0
    for start in range(0, len(prompts), batch):
        part = generations(mixture, prompts[start : start + batch], new, until=GSM_DONE)
        steps = sum(1 for _ in decode_together(part))
        held += steps * len(part)
        made += part
    return made, held


def continuous(mixture: Any, prompts: list[str], batch: int, new: int) -> list[Any]:
    made = generations(mixture, prompts, new, until=GSM_DONE)
    for _ in decode_together(made, at_once=batch):
        pass
    return made


def timed(run: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    out = run()
    return out, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b-instruct:bfloat16")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    args = parser.parse_args()
    prompts = questions(args.data, args.items)
    mixture = open_model(args.model)
    with torch.no_grad():
        continuous(mixture, prompts[:2], 2, 8)  # warm-up: first calls allocate
    (fixed_made, held), fixed_s = timed(
        lambda: fixed(mixture, prompts, args.batch, args.max_new_tokens)
    )
    cont_made, cont_s = timed(lambda: continuous(mixture, prompts, args.batch, args.max_new_tokens))
    tokens = sum(len(g.ids) for g in fixed_made)
    same = sum(a.ids == b.ids for a, b in zip(fixed_made, cont_made, strict=True))
    print(
        f"{args.model}: {len(prompts)} GSM8K questions, batch {args.batch}, "
        f"at most {args.max_new_tokens} new tokens; {tokens:,} tokens decoded (fixed)"
    )
    for name, seconds, made in (("fixed", fixed_s, fixed_made), ("continuous", cont_s, cont_made)):
        new = sum(len(g.ids) for g in made)
        print(
            f"  {name:<10} {seconds:7.1f} s  {len(made) / seconds:.3f} answers/s  "
            f"{new / seconds:6.1f} tokens/s"
        )
    print(f"  continuous / fixed, answers per second: {fixed_s / cont_s:.2f}x")
    print(f"  fixed batches' rows busy: {tokens / max(held, 1):.0%} of their steps")
    print(f"  answers the same token for token both ways: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()

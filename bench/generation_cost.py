"""Cost per new token of cached generation against prompt length, on a multi-tokenizer mixture.

Run by hand (not in CI):

    python bench/generation_cost.py [--recipe recipes/chat-code-general.yaml] [--new 16]
                                    [--threads 1]

Builds the recipe's mixture untrained (the cost does not depend on the weights), then for a
short and a long prompt times greedy decoding of `--new` tokens with every base's KV cache (each
aligned base re-tokenizes the grown text and reuses its cache up to the common prefix) and,
as the peer, without caches. The prompt's forward is timed apart (decoding 1 token) and taken
out. Prints seconds per new token and the long/short ratios: near 1 for the cached path,
growing with the prompt for the uncached one.

In the same run, each base's own cached decode step is timed as plain transformers runs it
(the same loaded model, so the same dtype and quantization: `model(token, cache=...)` with its
own LM head, greedy, after a prompt of the same text in its own tokens), and the mixture's
tokens/s is printed against 1 / Σ(base steps): the speed of running every base's own decoder
one after the other, which the mixture's step contains.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from composer.generation.decode import Generation
from composer.model.align import anchor_text
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe

TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nA carpenter works for 2 weeks every month and for 6 days every week. "
)


def _seconds(mixture: LiveMixture, prompt: list[int], new: int, cached: bool) -> float:
    start = time.perf_counter()
    out = Generation(mixture, prompt, new, use_cache=cached, stop_at_eos=False).run().ids
    assert len(out) == new
    return time.perf_counter() - start


def per_token_seconds(mixture: LiveMixture, prompt: list[int], new: int, cached: bool) -> float:
    """Seconds per generated token after the first: (t(1 + new) - t(1)) / new, so the prompt's
    own forward (the same for both paths) is not spread over the new tokens. Median of 3."""
    runs = []
    for _ in range(3):
        first = _seconds(mixture, prompt, 1, cached)
        runs.append((_seconds(mixture, prompt, 1 + new, cached) - first) / new)
    return statistics.median(runs)


@torch.no_grad()
def base_step_seconds(base: Any, text: str, new: int) -> float:
    """Seconds per cached greedy decode step of `base` on its own, after `text` as the prompt."""
    from transformers import DynamicCache

    ids = base.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
    runs = []
    for _ in range(3):
        cache = DynamicCache(config=base.model.config)
        out = base.model(input_ids=ids.to(base.device), cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            out = base.model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        runs.append((time.perf_counter() - start) / new)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/chat-code-general.yaml")
    parser.add_argument("--short", type=int, default=32, help="short prompt, anchor tokens")
    parser.add_argument("--long", type=int, default=384, help="long prompt, anchor tokens")
    parser.add_argument("--new", type=int, default=16, help="tokens to generate")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fair on shared cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mixture = LiveMixture.from_recipe(load_recipe(args.recipe))
    ids = mixture.tokenizer(TEXT * 40, add_special_tokens=False)["input_ids"]
    rows = []
    for cached in (True, False):
        short = per_token_seconds(mixture, ids[: args.short], args.new, cached)
        long = per_token_seconds(mixture, ids[: args.long], args.new, cached)
        rows.append((cached, short, long))
    print(
        f"mixture {mixture.recipe.name}: bases {', '.join(mixture.bases)}; aligned "
        f"{', '.join(sorted(mixture.aligned)) or 'none'}; {args.new} new tokens"
    )
    print(
        f"{'path':<10}{'s/token @' + str(args.short):>16}{'s/token @' + str(args.long):>16}"
        f"{'long/short':>12}"
    )
    for cached, short, long in rows:
        name = "cached" if cached else "no cache"
        print(f"{name:<10}{short:>16.3f}{long:>16.3f}{long / short:>12.2f}")
    text = anchor_text(mixture.tokenizer, ids[: args.short])
    steps = {name: base_step_seconds(base, text, args.new) for name, base in mixture.bases.items()}
    print(f"\nbases' own cached decode step (plain transformers) after the @{args.short} prompt:")
    for name, seconds in steps.items():
        print(f"  {name:<10}{seconds:>10.4f} s/token")
    ours = rows[0][1]
    print(
        f"mixture {1 / ours:.1f} tokens/s vs 1/sum(base steps) {1 / sum(steps.values()):.1f} "
        f"tokens/s: ratio {sum(steps.values()) / ours:.2f}"
    )


if __name__ == "__main__":
    main()

"""Training memory and step time: a carry-on from cached features against PEFT LoRA and full FT.

Run by hand (not in CI), with the bases pulled and the `bench` extra installed:

    pip install -e '.[bench]'
    python bench/train_memory.py [--bases smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]
                                 [--examples 64] [--seq-len 128] [--batch 4] [--steps 5]

Per base, on the same anchor, data (python_stdlib windows), batch size and sequence length,
each arm runs in a fresh process and reports its peak RSS (ru_maxrss) and median step time:

    (a) carry-on trained from the feature cache (only the anchor's LM head is loaded)
    (b) carry-on trained live (the base runs every step)
    (c) PEFT LoRA on the anchor, rank chosen so its trainable count is near the carry-on's
    (d) full fine-tuning of the anchor (skipped with --no-full)

All weights are float32 (the recipe's default base dtype); the cache stores bfloat16; every arm
uses `--threads` torch threads (default 1: with other work on the cores, multi-threaded kernels
spend their time waiting for each other). The
cache phase's tokens/s is compared with a plain transformers forward of the same base's decoder
over the same batches (the limit of that phase). Ratios a/c and a/d are printed per base, and
the from-cache step against its floor: the anchor head's two matmuls of the step's shapes
(logits, and the gradient to the carry-on's output), timed alone in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from composer.features.batch import Batch
from composer.features.data import Example, collate, load_examples, split
from composer.recipe import Recipe, load_recipe
from composer.training.train import batch_indices

WIDTH, BLOCKS, LORA_TARGETS = 256, 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
LORA_TARGETS += ["up_proj", "down_proj"]


def recipe_text(card: str, layers: int, args: argparse.Namespace, cache_dir: Path) -> str:
    taps = [f"anchor@{layers // 3}", f"anchor@{2 * layers // 3}", f"anchor@{layers}"]
    return yaml.safe_dump(
        {
            "name": "bench",
            "anchor": "anchor",
            "bases": {"anchor": {"card": card}},
            "taps": taps,
            "carry_on": {
                "width": WIDTH,
                "heads": 4,
                "blocks": [{"shortcuts": [taps[0]]}] + [{"shortcuts": []}] * (BLOCKS - 1),
            },
            "train": {
                "data": {"kind": "python_stdlib", "size": args.examples, "seed": 0},
                "batch_size": args.batch,
                "seq_len": args.seq_len,
                "lr": 1e-4,
                "warmup_steps": 0,
                "eval_every": 10_000,
                "checkpoint_every": 10_000,
                "cache": {"dir": str(cache_dir), "dtype": "bfloat16", "batch_size": 8},
            },
        },
        sort_keys=False,
    )


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timed:
    """A training source that notes when each batch is asked for: the step boundaries."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.examples = inner.examples
        self.stamps: list[float] = []
        self.rows: list[int] = []  # target rows of each batch: the head's work in that step

    def batch(self, indices: list[int]) -> Batch:
        self.stamps.append(time.perf_counter())
        batch = self.inner.batch(indices)
        self.rows.append(batch.n_targets)
        return batch


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)][warmup:]


def run_carry_on(recipe: Recipe, from_cache: bool, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from composer.training.train import FeatureSource, train

    if from_cache:
        from composer.features.cache import open_cache
        from composer.model.mixture import CachedMixture

        cache = open_cache(recipe)
        model: Any = CachedMixture.from_recipe(recipe, seed=0)
        train_source: Any = cache.source("train")
        eval_source: Any = cache.source("eval")
    else:
        from composer.model.mixture import LiveMixture

        model = LiveMixture.from_recipe(recipe, seed=0)
        train_ex, eval_ex = examples(recipe, model.tokenizer)
        train_source = FeatureSource(model, train_ex, False)
        eval_source = FeatureSource(model, eval_ex[:1], False)
    timed = Timed(train_source)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    steps = args.warmup + args.steps + 1  # the last step also evaluates and saves: not timed
    with tempfile.TemporaryDirectory() as tmp:
        train(model, timed, eval_source, recipe.train, Path(tmp), steps=steps, console=quiet)
    trainable = sum(p.numel() for p in model.carry_on.parameters() if p.requires_grad)
    rows = timed.rows[args.warmup : args.warmup + args.steps]
    return {
        "trainable": trainable,
        "steps": step_times(timed.stamps, args.warmup),
        "rows": round(statistics.mean(rows)),
    }


def examples(recipe: Recipe, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    spec = recipe.train
    loaded = load_examples(spec.data, tokenizer, spec.seq_len)
    return split(loaded, spec.eval_fraction, spec.seed)


def load_hf(recipe: Recipe) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer.bases.frozen import resolve_folder

    folder = resolve_folder(recipe.bases[recipe.anchor], fetch=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def run_hf(recipe: Recipe, lora_params: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """(c) LoRA with about `lora_params` trainable parameters, or (d) full fine-tuning."""
    model, tokenizer = load_hf(recipe)
    if lora_params is not None:
        from peft import LoraConfig, get_peft_model

        per_rank = sum(
            m.in_features + m.out_features
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in LORA_TARGETS
        )
        rank = max(1, round(lora_params / per_rank))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    train_ex, _ = examples(recipe, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        idx = batch_indices(step, len(train_ex), recipe.train.batch_size, recipe.train.seed)
        batch = collate([train_ex[i] for i in idx], pad)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return {"trainable": sum(p.numel() for p in params), "steps": times[args.warmup :]}


def run_cache(recipe: Recipe) -> dict[str, Any]:
    from composer.features.cache import write_cache

    cache = write_cache(recipe)
    assert not cache.reused
    return {"tokens": cache.tokens, "seconds": cache.seconds}


@torch.inference_mode()
def run_forward(recipe: Recipe) -> dict[str, Any]:
    """A plain decoder forward over the batches the cache phase runs (same order and sizes)."""
    model, tokenizer = load_hf(recipe)
    model.eval()
    cache = recipe.train.cache
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, seconds = 0, 0.0
    for part in examples(recipe, tokenizer):
        order = sorted(range(len(part)), key=lambda i: len(part[i].input_ids))
        for s in range(0, len(order), cache.shard_examples):
            shard = order[s : s + cache.shard_examples]
            for b in range(0, len(shard), cache.batch_size):
                batch = collate([part[i] for i in shard[b : b + cache.batch_size]], pad)
                t0 = time.perf_counter()
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                seconds += time.perf_counter() - t0
                tokens += int(batch["attention_mask"].sum())
    return {"tokens": tokens, "seconds": seconds}


def run_floor(recipe: Recipe, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """The from-cache step's floor: the anchor head's two matmuls of a step's shapes, logits
    (rows, D) @ (D, vocab) and the gradient to the rows (rows, vocab) @ (vocab, D), in the
    head's compute dtype; and the exact cross-entropy pass (composer.model.head) on the same
    rows, forward and backward, for how close that pass comes to it."""
    from composer.bases.frozen import DTYPES, resolve_folder
    from composer.model.head import LMHead, head_loss

    folder = resolve_folder(recipe.bases[recipe.anchor], fetch=False)
    head = LMHead.from_folder(folder, DTYPES[recipe.bases[recipe.anchor].dtype])
    weight = head.weight.to(head.dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, weight.shape[1], generator=generator, dtype=head.dtype)
    targets = torch.randint(0, weight.shape[0], (rows,), generator=generator)

    def floor() -> None:
        logits = x @ weight.T
        logits @ weight

    def head_pass() -> None:
        leaf = x.clone().requires_grad_(True)
        head_loss(head, leaf, targets).backward()

    def median_seconds(work: Any) -> float:
        work()  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {"floor": median_seconds(floor), "head": median_seconds(head_pass), "rows": rows}


def child(arm: str, recipe_path: str, args: argparse.Namespace) -> None:
    # Subnormal softmax probabilities make the peers' cross-entropy backward ~40x slower on
    # x86; flushing them in every arm keeps the comparison about the method, not about that.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(recipe_path)
    if arm == "cache":
        result = run_cache(recipe)
    elif arm == "forward":
        result = run_forward(recipe)
    elif arm in ("a", "b"):
        result = run_carry_on(recipe, arm == "a", args)
    elif arm == "floor":
        result = run_floor(recipe, args.rows, args)
    elif arm == "c":
        result = run_hf(recipe, args.lora_params, args)
    else:
        result = run_hf(recipe, None, args)
    result["peak_mib"] = peak_mib()
    print(json.dumps(result))


def spawn(arm: str, recipe_path: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--arm", arm, "--recipe", str(recipe_path)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == -9 and arm == "d":
        return {}  # killed, as the kernel does when memory runs out: full FT does not fit
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_base(card: str, args: argparse.Namespace, tmp: Path) -> None:
    from composer.bases.frozen import read_config, resolve_folder
    from composer.recipe import BaseSpec

    layers = read_config(resolve_folder(BaseSpec(card=card), fetch=False))["num_hidden_layers"]
    path = tmp / f"{card}.yaml"
    path.write_text(recipe_text(card, layers, args, tmp / f"{card}-features"))
    cache = spawn("cache", path, args)
    forward = spawn("forward", path, args)
    arms = {"a": spawn("a", path, args)}
    floor = spawn("floor", path, args, rows=arms["a"]["rows"])
    arms["b"] = spawn("b", path, args)
    arms["c"] = spawn("c", path, args, lora_params=arms["a"]["trainable"])
    if args.full and (full := spawn("d", path, args)):
        arms["d"] = full
    elif args.full:
        print(f"{card}: (d) full fine-tuning was killed (out of memory?)")
    names = {
        "a": "carry-on, from cache",
        "b": "carry-on, live",
        "c": "PEFT LoRA",
        "d": "full fine-tuning",
    }
    print(f"\n## {card}: batch {args.batch} x seq_len {args.seq_len}, {args.steps} timed steps")
    print("| arm | trainable params | peak RSS MiB | median step s |\n|---|---:|---:|---:|")
    median = {k: statistics.median(v["steps"]) for k, v in arms.items()}
    for key, result in arms.items():
        print(
            f"| ({key}) {names[key]} | {result['trainable']:,} | {result['peak_mib']:,.0f} "
            f"| {median[key]:.3f} |"
        )
    for peer in ("c", "d"):
        if peer in arms:
            rss = arms["a"]["peak_mib"] / arms[peer]["peak_mib"]
            print(f"a/{peer}: peak RSS {rss:.3f}, step time {median['a'] / median[peer]:.3f}")
    step = median["a"]
    print(
        f"head floor (two matmuls, {floor['rows']} rows): {floor['floor']:.3f} s; exact "
        f"cross-entropy pass {floor['head']:.3f} s ({floor['head'] / floor['floor']:.2f}x); "
        f"from-cache step {step:.3f} s: step/floor {step / floor['floor']:.2f}"
    )
    ours = cache["tokens"] / cache["seconds"]
    plain = forward["tokens"] / forward["seconds"]
    print(
        f"cache phase {ours:,.0f} tok/s vs plain forward {plain:,.0f} tok/s "
        f"({cache['tokens']:,} tokens): ratio {ours / plain:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--examples", type=int, default=64, help="python_stdlib windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per arm (1: fair on shared cores)"
    )
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--lora-params", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args.arm, args.recipe, args)
        return
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores, threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        for card in args.bases:
            bench_base(card, args, Path(tmp))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

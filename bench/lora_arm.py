"""PEFT LoRA on a recipe's anchor: the peer a carry-on is measured against, on the same data.

Run by hand (not in CI), with the `bench` extra installed:

    python bench/lora_arm.py recipes/gsm8k-self.yaml [KEY=VALUE ...] --match runs/gsm8k-self \\
        --out runs/gsm8k-self-lora
    compose compare runs/gsm8k-self runs/gsm8k-self-lora/merged:bfloat16 --suite gsm8k-dev ...

It trains on what `compose build` of the recipe trains on: the same examples (rows, encoding,
`seq_len`, the held-out `eval` split), steps, batch size, seeded batches, warmup and cosine
schedule, weight decay and gradient clip. LoRA sits on the anchor's attention projections
(q, k, v, o) with `lora_alpha = 2r`; the rank is the one whose trainable count is nearest the
carry-on's (`--match` a built mixture folder, or `--params N`). The learning rate is `--lr`
(PEFT's usual 2e-4, fixed before any run; a carry-on's recipe rate is for a fresh stack, not
for an adapter on a trained model). The base loads in the recipe's dtype; with
`train.autocast: bfloat16` its matmuls run in bfloat16 while the adapter stays float32. A batch
runs in `--micro-batch` slices whose gradients add up to the batch's: the loss is the mean over
the batch's target tokens, as the carry-on's is. Plain LoRA, as a user trains it: no
preservation term; with the recipe's preservation data, off-domain loss is still measured on
its held-out part (`general`), for the anchor alone and with the adapter.

Writes OUT/adapter (a PEFT adapter), OUT/merged (the adapter merged into the anchor, as
`compose port --lora` merges it: a model folder `compose compare` takes as a side, with
`:bfloat16` to run it in the anchor's dtype) and
OUT/metrics.json (rank, trainable parameters and bytes, train loss first/last, held-out loss of
the anchor and of LoRA on the task's eval split and on general text, wall seconds, peak RSS of
the training and of the whole run with the merge).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 2.0e-4


def matched_rank(model: torch.nn.Module, params: int, targets: list[str] = TARGETS) -> int:
    """The LoRA rank whose trainable count (r · Σ(in + out) over the targeted Linears) is
    nearest `params`, at least 1."""
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    )
    if per_rank == 0:
        raise SystemExit(f"the anchor has no Linear named {targets}")
    return max(1, round(params / per_rank))


def summed_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's target tokens (labels != -100)."""
    from composer.features.data import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    picked = targets != IGNORE
    return F.cross_entropy(logits[:, :-1][picked].float(), targets[picked], reduction="sum")


def train_lora(
    model: Any,
    examples: list[Any],
    spec: Any,
    pad: int,
    *,
    micro_batch: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Train the model's trainable (adapter) parameters on `examples` with the recipe's
    `spec` (steps, batch size, seed, schedule at `spec.lr`, weight decay, clip), each batch in
    slices of `micro_batch` examples (0: the whole batch). Returns (step, mean loss per target
    token) for every step."""
    from composer.features.data import IGNORE, collate
    from composer.training.train import batch_indices, lr_at

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=spec.autocast == "bfloat16")
    losses: list[tuple[int, float]] = []
    model.train()
    for step in range(spec.steps):
        chosen = [
            examples[i] for i in batch_indices(step, len(examples), spec.batch_size, spec.seed)
        ]
        targets = sum(sum(t != IGNORE for t in e.labels[1:]) for e in chosen)
        slice_size = micro_batch or len(chosen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, spec.steps)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, len(chosen), slice_size):
            with autocast:
                loss = summed_nll(model, collate(chosen[start : start + slice_size], pad))
            (loss / max(targets, 1)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        optimizer.step()
        losses.append((step + 1, total / max(targets, 1)))
        if on_step is not None:
            on_step(step + 1, losses[-1][1])
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(
    model: Any, examples: list[Any], pad: int, batch_size: int, autocast: bool = False
) -> float:
    """Mean next-token loss per target token over `examples` (as the build's evaluate counts)."""
    from composer.features.data import IGNORE, collate

    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            total += float(summed_nll(model, batch))
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def target_params(args: argparse.Namespace) -> int:
    if args.params is not None:
        return int(args.params)
    metrics = Path(args.match) / "metrics.json"
    if not metrics.is_file():
        raise SystemExit(f"--match {args.match}: no metrics.json (is it a built mixture?)")
    return int(json.loads(metrics.read_text())["trainable_params"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer.artifacts.port import port_lora
    from composer.bases.frozen import DTYPES, resolve_folder
    from composer.features.data import load_splits, pad_id
    from composer.recipe import load_recipe

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --out")
    recipe = load_recipe(args.recipe, args.overrides)
    anchor = recipe.bases[recipe.anchor]
    if anchor.quantization != "none":
        raise SystemExit("the anchor is quantized: LoRA here trains on a float anchor only")
    folder = resolve_folder(anchor, fetch=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    splits = load_splits(recipe, tokenizer)
    spec = recipe.train.model_copy(update={"lr": args.lr})
    wanted = target_params(args)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[anchor.dtype])
    base.requires_grad_(False)
    rank = matched_rank(base, wanted)
    pad, bf16 = pad_id(tokenizer), spec.autocast == "bfloat16"
    held = {name: splits[name] for name in ("eval", "general") if splits.get(name)}
    before = {
        name: mean_loss(base, ex, pad, args.micro_batch or 8, bf16) for name, ex in held.items()
    }
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    began = time.perf_counter()

    def say(step: int, loss: float) -> None:
        print(
            f"lora  step {step}/{spec.steps}  loss {loss:.4f}  {time.perf_counter() - began:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    losses = train_lora(
        model, splits["train"], spec, pad, micro_batch=args.micro_batch, on_step=say
    )
    seconds = time.perf_counter() - began
    after = {
        name: mean_loss(model, ex, pad, args.micro_batch or 8, bf16) for name, ex in held.items()
    }
    model.save_pretrained(str(out / "adapter"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # training's, not the merge's
    del model, base
    gc.collect()
    # The merge loads the anchor afresh (float32 unless it is stored otherwise) and writes it.
    port_lora(out / "adapter", str(folder), out / "merged", dtype=anchor.dtype)
    result = {
        "recipe": recipe.name,
        "rank": rank,
        "matched_to": wanted,
        "trainable_params": trainable,
        "trainable_bytes": 4 * trainable,
        "lr": spec.lr,
        "steps": spec.steps,
        "train_examples": len(splits["train"]),
        "train_loss_first": losses[0][1],
        "train_loss_last": losses[-1][1],
        "eval_loss_anchor": before.get("eval"),
        "eval_loss_lora": after.get("eval"),
        "general_loss_anchor": before.get("general"),
        "general_loss_lora": after.get("general"),
        "train_seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "peak_rss_bytes_with_merge": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the carry-on's recipe (its data, steps and schedule)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE, as compose build takes them")
    parser.add_argument("--out", required=True, help="a new folder for adapter, merged, metrics")
    match = parser.add_mutually_exclusive_group(required=True)
    match.add_argument("--match", help="a built mixture: LoRA's rank matches its trainable count")
    match.add_argument("--params", type=int, help="the trainable count to match")
    parser.add_argument("--lr", type=float, default=LR, help=f"LoRA's learning rate ({LR})")
    parser.add_argument(
        "--micro-batch", type=int, default=1, help="examples per forward (0: the whole batch)"
    )
    print(json.dumps(run(parser.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()

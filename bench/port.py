"""PortLLM on SmolLM2-135M: how much of a patch's gain survives a base update without training.

Run by hand (not in CI), with SmolLM2-135M-Instruct pulled and peft installed (`.[dev]`):

    python bench/port.py [--work /tmp/port-bench] [--v2-steps 100] [--steps 40] [--size 160]

Most of the time goes to v2's continued pretraining and the two LoRA runs. On a CPU shared with
other jobs, `--threads 1` keeps torch's threads from waiting on each other.

1. v1 is the base. On GSM-style math (`gsm_symbolic`), train (i) a carry-on with
   `composer.training.build` on recipes/demo.yaml plus overrides and (ii) a PEFT LoRA.
2. v2 is v1 after `--v2-steps` steps of continued pretraining (all weights) on stdlib code.
3. On the same held-out math split, the next-token loss of: v1 alone, v1 + each patch, v2 alone,
   v2 + the ported carry-on (`port_mixture`), v2 + the ported LoRA (a `lora:` base, merged at
   load; and the HF folder `port_lora` writes), and v2 + each patch retrained on v2.
4. Peak RSS and seconds of porting versus retraining, each step in a fresh process.

Everything goes under --work (default: a new temp dir); a step whose output is there already is
reused, so a rerun after a crash continues. Nothing is written in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lora_arm import mean_loss, train_lora

from composer.features.data import Example, collate, load_examples, split
from composer.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def v1_folder(args: argparse.Namespace) -> Path:
    from composer.bases.frozen import resolve_folder
    from composer.recipe import BaseSpec

    if args.base_path:
        return Path(args.base_path)
    return resolve_folder(BaseSpec(card=args.card), fetch=False)


def recipe_for(base: Path, args: argparse.Namespace, name: str) -> Recipe:
    """recipes/demo.yaml on `base`, made small; taps at a third, two thirds and the top."""
    from composer.bases.frozen import read_config

    n = read_config(base)["num_hidden_layers"]
    taps = [f"chat@{n // 3}", f"chat@{2 * n // 3}", f"chat@{n}"]
    overrides = [
        f"bases.chat={{path: {base}}}",
        f"taps=[{', '.join(taps)}]",
        f"carry_on.blocks=[{{shortcuts: [{taps[0]}]}}, {{shortcuts: [{taps[1]}]}}]",
        f"train.data.size={args.size}",
        f"train.eval_fraction={args.eval_fraction}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.seq_len={args.seq_len}",
        "train.warmup_steps=10",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.cache.dir={Path(args.work) / f'features-{name}'}",
        f"output={Path(args.work) / name}",
    ]
    return load_recipe(ROOT / "recipes" / "demo.yaml", overrides)


def math_split(recipe: Recipe, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    spec = recipe.train
    return split(load_examples(spec.data, tokenizer, spec.seq_len), spec.eval_fraction, spec.seed)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_small_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".safetensors":
            shutil.copyfile(path, dst / path.name)


def step_v2(args: argparse.Namespace) -> dict[str, Any]:
    """Continued pretraining of every weight of v1 on stdlib code windows: the "vendor update"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer.recipe import StdlibData

    v1, out = v1_folder(args), Path(args.work) / "v2"
    model = AutoModelForCausalLM.from_pretrained(v1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(v1)
    spec = StdlibData(kind="python_stdlib", size=args.v2_steps * args.v2_batch, seed=1)
    windows = load_examples(spec, tokenizer, args.v2_seq_len)  # the order code_windows follows
    pad = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.v2_lr, weight_decay=0.01)
    model.train()
    for step in range(args.v2_steps):
        rows = windows[step * args.v2_batch : (step + 1) * args.v2_batch]
        loss = model(**collate(rows, pad)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    copy_small_files(v1, out)  # tokenizer and chat template byte for byte: the same tokenizer
    model.to(torch.bfloat16).save_pretrained(out)
    return {}


def step_carry(args: argparse.Namespace, version: str) -> dict[str, Any]:
    from rich.console import Console

    from composer.training.build import build

    base = v1_folder(args) if version == "v1" else Path(args.work) / "v2"
    recipe = recipe_for(base, args, f"carry-{version}")
    result = build(recipe, console=Console(stderr=True, force_terminal=False))
    return {"eval_loss": result.metrics["eval_loss_mixture"]}


def step_lora(args: argparse.Namespace, version: str) -> dict[str, Any]:
    """PEFT LoRA on the same examples, steps, batch size and schedule as the carry-on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = v1_folder(args) if version == "v1" else Path(args.work) / "v2"
    recipe = recipe_for(base, args, f"lora-{version}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_examples, _ = math_split(recipe, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS)
    model = get_peft_model(model, config)
    spec = recipe.train.model_copy(update={"lr": args.lora_lr})
    train_lora(model, train_examples, spec, tokenizer.pad_token_id or 0)
    model.save_pretrained(Path(args.work) / f"lora-{version}")
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def step_port_carry(args: argparse.Namespace) -> dict[str, Any]:
    from composer.artifacts.port import port_mixture

    work = Path(args.work)
    port_mixture(work / "carry-v1", {"chat": str(work / "v2")}, work / "carry-ported")
    return {}


def step_port_lora(args: argparse.Namespace) -> dict[str, Any]:
    from composer.artifacts.port import port_lora

    work = Path(args.work)
    port_lora(work / "lora-v1", str(work / "v2"), work / "lora-ported")
    return {}


def step_eval(args: argparse.Namespace) -> dict[str, Any]:
    from composer.artifacts.load import load_mixture
    from composer.bases.frozen import load_base
    from composer.recipe import BaseSpec
    from composer.training.train import FeatureSource, evaluate

    work, v1 = Path(args.work), v1_folder(args)
    losses: dict[str, float] = {}
    for label, folder, alone in (
        ("v1 + carry-on", work / "carry-v1", "v1 alone"),
        ("v2 + ported carry-on", work / "carry-ported", "v2 alone"),
        ("v2 + carry-on retrained on v2", work / "carry-v2", None),
    ):
        mixture = load_mixture(folder, fetch=False)
        _, held = math_split(mixture.recipe, mixture.tokenizer)
        source = FeatureSource(mixture, held, keep=True)
        losses[label] = evaluate(mixture, source, args.batch)
        if alone:
            losses[alone] = evaluate(mixture, source, args.batch, use_carry_on=False)
        del mixture, source
    for label, base, adapter in (
        ("v1 + LoRA", v1, work / "lora-v1"),
        ("v2 + ported LoRA", work / "v2", work / "lora-v1"),
        ("v2 + ported LoRA (port_lora folder, bf16)", work / "lora-ported", None),
        ("v2 + LoRA retrained on v2", work / "v2", work / "lora-v2"),
    ):
        spec = BaseSpec(path=str(base), lora=str(adapter) if adapter else None)
        frozen = load_base("chat", spec, fetch=False)
        _, held = math_split(recipe_for(v1, args, "eval"), frozen.tokenizer)
        pad = frozen.tokenizer.pad_token_id or 0
        losses[label] = mean_loss(frozen.model, held, pad, args.batch)
        del frozen
    code = {}
    for label, base in (("v1", v1), ("v2", work / "v2")):
        frozen = load_base("chat", BaseSpec(path=str(base)), fetch=False)
        pad = frozen.tokenizer.pad_token_id or 0
        code[label] = mean_loss(frozen.model, code_windows(args, frozen.tokenizer), pad, args.batch)
    return {"losses": losses, "code_losses": code, "eval_examples": len(held)}


def code_windows(args: argparse.Namespace, tokenizer: Any) -> list[Example]:
    """Stdlib windows that come after those v2 was trained on: held-out code."""
    from composer.recipe import StdlibData

    seen = args.v2_steps * args.v2_batch
    spec = StdlibData(kind="python_stdlib", size=seen + 16, seed=1)
    return load_examples(spec, tokenizer, args.v2_seq_len)[seen:]


# Each step writes the folder of its name under --work (eval writes none).
STEPS = {
    "v2": step_v2,
    "carry-v1": lambda a: step_carry(a, "v1"),
    "lora-v1": lambda a: step_lora(a, "v1"),
    "carry-ported": step_port_carry,
    "lora-ported": step_port_lora,
    "carry-v2": lambda a: step_carry(a, "v2"),
    "lora-v2": lambda a: step_lora(a, "v2"),
    "eval": step_eval,
}


def child(args: argparse.Namespace) -> None:
    torch.set_flush_denormal(True)  # subnormal softmax tails slow CPU backward passes ~40x
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    result = STEPS[args.step](args)
    result.update(seconds=time.perf_counter() - began, peak_mib=peak_mib())
    print(json.dumps(result))


def run_step(name: str, argv: list[str], work: Path) -> dict[str, Any]:
    done = work / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    shutil.rmtree(work / name, ignore_errors=True)  # what a killed run left half-written
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--step", name],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed; see {work / f'{name}.log'}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps(result))
    return result


ORDER = (
    "v1 alone",
    "v1 + carry-on",
    "v1 + LoRA",
    "v2 alone",
    "v2 + ported carry-on",
    "v2 + carry-on retrained on v2",
    "v2 + ported LoRA",
    "v2 + ported LoRA (port_lora folder, bf16)",
    "v2 + LoRA retrained on v2",
)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    losses = results["eval"]["losses"]
    v1_gain = {k: losses["v1 alone"] - losses[f"v1 + {k}"] for k in ("carry-on", "LoRA")}
    v2, code = losses["v2 alone"], results["eval"]["code_losses"]
    print(
        f"\nheld-out math loss ({results['eval']['eval_examples']} problems, nats/token); "
        f"v2 = v1 + {args.v2_steps} steps on stdlib code "
        f"(held-out code loss {code['v1']:.3f} → {code['v2']:.3f})"
    )
    print("| model | loss | gain vs base alone | share of retrained gain |\n|---|---:|---:|---:|")
    for label in ORDER:
        loss = losses[label]
        base = losses["v1 alone"] if label.startswith("v1") else v2
        gain = base - loss
        kind = "carry-on" if "carry-on" in label else "LoRA" if "LoRA" in label else None
        share = ""
        if kind and label.startswith("v2"):
            retrained = v2 - losses[f"v2 + {kind} retrained on v2"]
            share = f"{gain / retrained:.0%}" if retrained > 0 else "-"
        print(f"| {label} | {loss:.4f} | {gain:+.4f} | {share} |")
    print(f"(gain on v1: carry-on {v1_gain['carry-on']:+.4f}, LoRA {v1_gain['LoRA']:+.4f})")
    print("\n| patch onto v2 | peak RSS MiB | seconds |\n|---|---:|---:|")
    rows = (
        ("carry-on ported (compose port)", "carry-ported"),
        ("carry-on retrained (compose build: cache + train)", "carry-v2"),
        ("LoRA ported (compose port --lora)", "lora-ported"),
        ("LoRA retrained (PEFT)", "lora-v2"),
    )
    for label, key in rows:
        print(f"| {label} | {results[key]['peak_mib']:,.0f} | {results[key]['seconds']:.0f} |")
    pairs = (("carry-on", "carry-ported", "carry-v2"), ("LoRA", "lora-ported", "lora-v2"))
    for kind, port, retrain in pairs:
        ratio = results[retrain]["peak_mib"] / results[port]["peak_mib"]
        print(f"{kind}: retraining needs {ratio:.2f}x the peak memory of porting")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for everything made (default: a new temp dir)")
    parser.add_argument("--card", default="smollm2-135m-instruct")
    parser.add_argument("--base-path", help="an HF folder to use as v1 instead of --card")
    parser.add_argument("--size", type=int, default=160, help="gsm_symbolic problems in all")
    parser.add_argument("--eval-fraction", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=40, help="training steps of each patch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--v2-steps", type=int, default=100)
    parser.add_argument("--v2-batch", type=int, default=2)
    parser.add_argument("--v2-seq-len", type=int, default=128)
    parser.add_argument("--v2-lr", type=float, default=1e-4)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per step (0: torch's default)"
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="port-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    argv = [*sys.argv[1:], "--work", str(work)]  # the last --work wins
    print(f"work: {work}; load average before: {os.getloadavg()}", file=sys.stderr)
    began = time.perf_counter()
    results = {name: run_step(name, argv, work) for name in STEPS}
    report(results, args)
    print(f"\n{time.perf_counter() - began:.0f}s in all; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

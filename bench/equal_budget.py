"""Does composing bases pay? Every arm on the same data, tokens, steps and held-out items.

Run by hand (not in CI), with the three bases pulled and the `bench` extra installed:

    for b in qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct smollm2-135m-instruct; do
        compose bases pull $b; done
    pip install -e '.[bench]'
    python bench/equal_budget.py [--per-domain 48] [--steps 60] [--seq-len 192] [--out runs/eb]

The anchor is Qwen2.5-Coder-0.5B (the strongest base whose LoRA training fits 2 CPU cores);
the mixture adds Qwen2.5-Coder-1.5B (same tokenizer) and SmolLM2-135M (chat, aligned across
tokenizers). Training data: chatterbot replies (chat), standard-library windows (code) and
GSM-style worked answers (math), `--per-domain` examples each, a quarter held out per domain.
Arms, each in a fresh process (its wall time and peak RSS are its own):

    bases             the anchor alone and each base alone (held-out loss, no training)
    lora              PEFT LoRA on the anchor, rank matched to the mixture's trainable count ±10%
    carry-on-anchor   a carry-on reading the anchor's own layers only, with preservation
    mixture-plain     the mixture without preservation (train.preserve: none)
    mixture           the mixture with preservation (the default)
    tasks             GSM exact match and HumanEval pass@1 (`compose compare`, the first
                      `--task-items` of each, `--task-batch` decoded together): the anchor, the
                      1.5B coder and LoRA (merged into the anchor) each against the mixture

All train `--steps` steps on the same batches (the same seeded function of the step) with the
same batch size. The carry-on arms read one feature cache of every tapped state (float32, so
the cached anchor equals the live one), written once by the `cache` step and timed there.
Losses are nats per character of the target text on the held-out items of each domain and on
the held-out general text (off-domain: prose, dialog, code the recipe does not train on).
Results land in OUT (one JSON per arm, `table.md`, `equal_budget.png`); a rerun skips arms whose
JSON exists. Nothing is tuned on the held-out items: the settings below were fixed beforehand;
`bench/carry_on_dev.py` picks the rates on a development split of the training items instead
(`--carry-on-lr`, `--lora-lr` take its picks; `--cache-out` reuses an earlier OUT's cache).
`--strong-layer 28 --experts` taps the 1.5B coder at its last layer and pools its own
log-probabilities into the mixture arms (`carry_on.experts`; docs/quality.md); `--write-at L`
makes the mixture arms write their correction into the anchor after its layer L
(`carry_on.write_at`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

ANCHOR, STRONG = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
CHAT = "smollm2-135m-instruct"
ARMS = ["cache", "bases", "lora", "carry-on-anchor", "mixture-plain", "mixture", "tasks"]
TASK_SUITES = ["gsm", "humaneval"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DOMAINS = ["chat", "code", "math"]
CARRY_ON_LR = 1.0e-3  # fixed before the first run; bench/carry_on_dev.py tries others
ANCHOR_TAPS = ["code@6", "code@12", "code@18"]  # the anchor-only carry-on's (all in the cache)


def recipe_dict(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """The recipe of an arm; every arm shares data, steps, batches and the cache's taps."""
    mixture_taps = ["code@12", f"strong@{getattr(args, 'strong_layer', 14)}", "chat@20"]
    anchor_taps = list(ANCHOR_TAPS)
    own = anchor_taps if arm == "carry-on-anchor" else mixture_taps
    n = args.per_domain
    data = {
        "kind": "mix",
        "parts": [
            {"domain": "chat", "data": {"kind": "chatterbot", "size": n, "seed": 0}},
            {"domain": "code", "data": {"kind": "python_stdlib", "size": n, "seed": 0}},
            {"domain": "math", "data": {"kind": "gsm_symbolic", "size": n, "seed": 0}},
        ],
    }
    general = {
        "kind": "mix",
        "parts": [
            {"domain": "prose", "data": {"kind": "python_docs", "size": n // 2}},
            {"domain": "dialog", "data": {"kind": "chatterbot", "size": n // 2, "seed": 7}},
            {"domain": "code", "data": {"kind": "python_stdlib", "part": "tests", "size": n // 2}},
        ],
    }
    recipe = {
        "name": f"equal-budget-{arm}",
        "anchor": "code",
        "bases": {"code": {"card": ANCHOR}, "strong": {"card": STRONG}, "chat": {"card": CHAT}},
        # The cache taps everything any arm reads; each arm's carry-on reads its own taps.
        "taps": own if arm not in ("cache",) else sorted(set(mixture_taps + anchor_taps)),
        "carry_on": {
            "width": 256,
            "heads": 4,
            "blocks": [{"shortcuts": [own[1]]}, {"shortcuts": [own[2]]}],
        },
        "train": {
            "data": data,
            "eval_fraction": 0.25,
            "steps": args.steps,
            "batch_size": 4,
            "seq_len": args.seq_len,
            "lr": getattr(args, "carry_on_lr", CARRY_ON_LR),
            "warmup_steps": max(1, args.steps // 10),
            "eval_every": args.steps,
            "checkpoint_every": args.steps,
            "cache": {
                "dtype": "float32",
                "dir": str(Path(getattr(args, "cache_out", None) or args.out).resolve() / "cache"),
                "shard_examples": 16,
            },
            "preserve": None
            if arm == "mixture-plain"
            else {"data": general, "reference": getattr(args, "preserve_reference", "anchor")},
        },
    }
    if getattr(args, "final_tap", False) and arm != "cache":
        add_final_tap(recipe)
    if getattr(args, "experts", False) and arm in ("mixture", "mixture-plain"):
        recipe["carry_on"]["experts"] = ["strong"]
    if getattr(args, "write_at", None) and arm in ("mixture", "mixture-plain"):
        write_at(recipe, args.write_at)
    return recipe


def write_at(recipe: dict[str, Any], layer: int) -> None:
    """`carry_on.write_at: layer` on a carry-on recipe: the correction enters the anchor after
    that layer. The anchor may not be tapped above it, so a higher anchor tap (and its
    shortcut) moves down to that layer; every such layer is in the cache."""
    if f"code@{layer}" not in ANCHOR_TAPS:
        raise SystemExit(f"write at {layer}: the cache holds the anchor's {ANCHOR_TAPS}")
    moved = {
        t: f"code@{layer}"
        for t in recipe["taps"]
        if t.startswith("code@") and int(t.removeprefix("code@")) > layer
    }
    recipe["taps"] = list(dict.fromkeys(moved.get(t, t) for t in recipe["taps"]))
    for block in recipe["carry_on"]["blocks"]:
        block["shortcuts"] = list(dict.fromkeys(moved.get(t, t) for t in block["shortcuts"]))
    if f"code@{layer}" not in recipe["taps"]:
        recipe["taps"].append(f"code@{layer}")
    recipe["carry_on"]["write_at"] = layer


FINAL = "code@24"  # the anchor's final norm: the LM head's input, cached as the anchor state


def add_final_tap(recipe: dict[str, Any]) -> None:
    """Let the carry-on read the anchor's final state: a router source and a shortcut into the
    last block (the paper's carry-on reads the base's last layer)."""
    recipe["taps"] = [*recipe["taps"], FINAL]
    recipe["carry_on"]["blocks"][-1]["shortcuts"].append(FINAL)


class WithFinalTap:
    """A feature source whose batches also hold the anchor's final state as the tap FINAL (the
    shared cache stores it once, as the anchor state; its taps key stays unchanged)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.examples = source.examples

    def batch(self, indices: list[int]) -> Any:
        batch = self.source.batch(indices)
        batch.features.taps[FINAL] = batch.features.anchor_hidden
        return batch


def load(args: argparse.Namespace, arm: str) -> Any:
    from composer.recipe import recipe_from_dict

    return recipe_from_dict(recipe_dict(args, arm), f"equal-budget:{arm}")


def held_out(recipe: Any, tokenizer: Any) -> dict[str, list[Any]]:
    from composer.features.data import load_splits

    splits = load_splits(recipe, tokenizer)
    return {name: splits[name] for name in ("eval", "general", "train", "preserve")}


def per_char(losses: list[tuple[str, float, int]]) -> dict[str, float]:
    """(domain, summed nll, target chars) rows -> nats/char per domain, plus `off-domain`."""
    sums: dict[str, list[float]] = {}
    for domain, nll, chars in losses:
        key = "off-domain" if domain.startswith("general/") else domain
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += nll
        acc[1] += chars
    return {k: v[0] / max(v[1], 1.0) for k, v in sums.items()}


# --- arms ------------------------------------------------------------------------------------


def arm_cache(args: argparse.Namespace) -> dict[str, Any]:
    from composer.features.cache import write_cache

    cache = write_cache(load(args, "cache"))
    return {"tokens": cache.tokens, "examples": cache.examples}


def arm_bases(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out nats/char of the anchor and of each base alone, live, in float32."""
    from composer.model.mixture import LiveMixture
    from composer.training.metrics import domain_metrics

    recipe = load(args, "mixture")
    mixture = LiveMixture.from_recipe(recipe)
    splits = held_out(recipe, mixture.tokenizer)
    report = domain_metrics(mixture, splits["eval"] + splits["general"], batch_size=4)
    out: dict[str, dict[str, float]] = {}
    for domain, d in report.items():
        key = "off-domain" if domain.startswith("general/") else domain
        for name, value in d["nats_per_char"].items():
            if name == "mixture":
                continue
            acc = out.setdefault(name, {}).setdefault(key, 0.0)
            out[name][key] = acc + value * d["target_chars"]
    chars: dict[str, float] = {}
    for domain, d in report.items():
        key = "off-domain" if domain.startswith("general/") else domain
        chars[key] = chars.get(key, 0) + d["target_chars"]
    return {"losses": {n: {k: v / chars[k] for k, v in d.items()} for n, d in out.items()}}


def arm_carry_on(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """A carry-on trained from the shared cache for the common steps; held-out per char."""
    from composer.features.cache import open_cache
    from composer.model.mixture import CachedMixture
    from composer.model.weights import RECIPE_FILE, WEIGHTS, save_weights
    from composer.training.train import train

    recipe = load(args, arm)
    cache = open_cache(load(args, "cache"))
    model = CachedMixture.from_recipe(recipe, seed=recipe.train.seed)
    sources = {name: cache.source(name) for name in cache.manifest["shards"]}
    if args.final_tap:
        sources = {name: WithFinalTap(s) for name, s in sources.items()}
    out = Path(args.out) / arm
    train(
        model,
        sources["train"],
        sources["eval"],
        recipe.train,
        out / "checkpoints",
        preserve_source=sources.get("preserve") if recipe.train.preserve else None,
    )
    save_weights(out / WEIGHTS, model.carry_on)
    (out / RECIPE_FILE).write_text(recipe.to_yaml())
    from transformers import AutoTokenizer

    from composer.bases.frozen import resolve_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(recipe.bases["code"], fetch=False))
    splits = held_out(load(args, "mixture"), tokenizer)
    rows = []
    gates: dict[str, list[torch.Tensor]] = {}
    for split in ("eval", "general"):
        source = sources[split]
        assert [e.input_ids for e in source.examples] == [e.input_ids for e in splits[split]]
        for (domain, nll, _, chars), weights in score_carry_on(
            model, source, splits[split], range(len(splits[split])), tokenizer
        ):
            rows.append((domain, nll, chars))
            gates.setdefault(domain, []).append(weights)
    # Router weights per source, then (with experts) each expert's β, per held-out domain.
    names = model.carry_on.sources + [f"β {e}" for e in recipe.carry_on.experts]
    gate_means = {
        d: dict(zip(names, torch.stack(v).mean(0).tolist(), strict=True)) for d, v in gates.items()
    }
    trainable = sum(p.numel() for p in model.carry_on.parameters() if p.requires_grad)
    return {"losses": per_char(rows), "trainable": trainable, "gates": gate_means}


@torch.no_grad()
def score_carry_on(
    model: Any,
    source: Any,
    examples: list[Any],
    indices: Any,
    tokenizer: Any,
    anchor: bool = False,
) -> list[tuple[tuple[str, float, float | None, int], torch.Tensor]]:
    """Per example `i` of `indices` (a row of `source`, `examples[i]` its text): ((domain,
    summed NLL of the mixture, of the anchor alone when `anchor`, target chars), the router's
    mean weight per source, then each expert's mean β)."""
    from composer.training.metrics import target_text

    out = []
    for i in indices:
        batch = source.batch([i])
        hidden, weights, _ = model.hidden(batch.features, batch.attention_mask)
        experts = len(model.carry_on.expert_taps)
        if experts:  # the rows hold β after the anchor state (composer.model.experts)
            d = batch.features.anchor_hidden.shape[-1]
            weights = torch.cat([weights, hidden[..., d : d + experts]], dim=-1)
        targets = batch.labels[0, 1:]
        keep = targets != -100
        states = [hidden, model.anchor_rows(batch.features)] if anchor else [hidden]
        nlls = [
            float(
                F.cross_entropy(model.head.logits(h[0, :-1][keep]), targets[keep], reduction="sum")
            )
            for h in states
        ]
        chars = len(target_text(tokenizer, examples[i]))
        anchor_nll = nlls[1] if anchor else None
        out.append(((examples[i].domain, nlls[0], anchor_nll, chars), weights[0].mean(dim=0)))
    return out


def size_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's size and output folder: the same in every script that reads its cache."""
    parser.add_argument("--per-domain", type=int, default=48)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--out", default="runs/equal-budget")
    parser.add_argument(
        "--strong-layer", type=int, default=14, help="the 1.5B coder's layer the mixture taps"
    )
    parser.add_argument(
        "--experts",
        action="store_true",
        help="the mixture arms fuse the 1.5B coder's own next-token log-probabilities "
        "(carry_on.experts; needs --strong-layer 28, its last layer)",
    )


def arm_lora(args: argparse.Namespace, target_params: int) -> dict[str, Any]:
    """PEFT LoRA on the anchor, on the same batches, rank matched to `target_params`."""
    from transformers import AutoTokenizer

    from composer.bases.frozen import resolve_folder

    recipe = load(args, "mixture")
    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(recipe.bases["code"], fetch=False))
    splits = held_out(recipe, tokenizer)
    scored = splits["eval"] + splits["general"]
    result, model = lora_run(args, target_params, args.lora_lr, splits["train"], scored)
    model.save_pretrained(str(Path(args.out) / "lora-adapter"))
    return result


def lora_run(
    args: argparse.Namespace, target_params: int, lr: float, train_ex: list[Any], scored: list[Any]
) -> tuple[dict[str, Any], Any]:
    """Train LoRA on `train_ex` for the common steps at `lr`; nats/char on `scored`."""
    from lora_arm import matched_rank, train_lora
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer.bases.frozen import resolve_folder
    from composer.features.data import pad_id
    from composer.training.metrics import target_text

    recipe = load(args, "mixture")
    spec = recipe.train
    folder = resolve_folder(recipe.bases["code"], fetch=False)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rank = matched_rank(base, target_params, LORA_TARGETS)
    model = get_peft_model(
        base,
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    train_lora(model, train_ex, spec.model_copy(update={"lr": lr}), pad_id(tokenizer))
    rows = []
    with torch.no_grad():
        for example in scored:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor(example.labels[1:])
            keep = labels != -100
            logits = model(input_ids=ids).logits[0, :-1][keep]
            nll = float(F.cross_entropy(logits.float(), labels[keep], reduction="sum"))
            rows.append((example.domain, nll, len(target_text(tokenizer, example))))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"losses": per_char(rows), "trainable": trainable, "rank": rank, "lr": lr}, model


def arm_tasks(args: argparse.Namespace) -> dict[str, Any]:
    """GSM exact match and HumanEval pass@1 through `compose compare`, each of the anchor, the
    1.5B coder and LoRA (merged into the anchor) against the mixture with preservation, on the
    first `--task-items` items of each suite, decoded `--task-batch` at a time."""
    from composer.artifacts.port import port_lora
    from composer.compare.runner import compare

    out = Path(args.out)
    merged = out / "lora-merged"
    if not merged.is_dir():
        port_lora(out / "lora-adapter", ANCHOR, merged, dtype="float32")
    sides = {
        "anchor alone (0.5B coder)": ANCHOR,
        "strong alone": STRONG,
        "lora (anchor)": str(merged),
    }
    scores: dict[str, dict[str, float]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    for label, side in sides.items():
        result = compare(
            side,
            str(out / "mixture"),
            suites=TASK_SUITES,
            limit=args.task_items,
            batch=args.task_batch,
            out=out / f"compare-{label.split()[0]}",
        )
        for suite in result.suites:
            assert suite.comparison is not None
            scores.setdefault(label, {})[suite.suite.name] = suite.comparison.a_mean
            scores.setdefault("mixture, preservation", {})[suite.suite.name] = (
                suite.comparison.b_mean
            )
            verdicts.setdefault(label, {})[suite.suite.name] = suite.comparison.verdict
    return {"scores": scores, "verdicts": verdicts, "items": args.task_items}


# --- driver ----------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    began = time.perf_counter()
    if args.arm == "cache":
        result = arm_cache(args)
    elif args.arm == "bases":
        result = arm_bases(args)
    elif args.arm == "lora":
        result = arm_lora(args, args.lora_params)
    elif args.arm == "tasks":
        result = arm_tasks(args)
    else:
        result = arm_carry_on(args, args.arm)
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (Path(args.out) / f"arm-{args.arm}.json").write_text(json.dumps(result, indent=2))


def run_arm(arm: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    path = Path(args.out) / f"arm-{arm}.json"
    if not path.is_file():
        cmd = [sys.executable, __file__, "--arm", arm, "--out", args.out]
        cmd += ["--per-domain", str(args.per_domain), "--steps", str(args.steps)]
        cmd += ["--seq-len", str(args.seq_len), "--carry-on-lr", str(args.carry_on_lr)]
        cmd += ["--lora-lr", str(args.lora_lr)]
        cmd += ["--cache-out", args.cache_out] if args.cache_out else []
        cmd += ["--final-tap"] if args.final_tap else []
        cmd += ["--strong-layer", str(args.strong_layer)]
        cmd += ["--experts"] if args.experts else []
        cmd += ["--preserve-reference", args.preserve_reference]
        cmd += ["--write-at", str(args.write_at)] if args.write_at else []
        cmd += ["--task-items", str(args.task_items), "--task-batch", str(args.task_batch)]
        for key, value in extra.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        print(f"[{time.strftime('%H:%M:%S')}] arm {arm} ...", flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows_of: dict[str, dict[str, Any]] = {}
    base_losses = results["bases"]["losses"]
    for name, losses in base_losses.items():
        if name == "code alone":  # the anchor itself: its row is "anchor alone"
            continue
        label = "anchor alone (0.5B coder)" if name == "anchor" else name
        rows_of[label] = {"losses": losses, "seconds": None, "peak_rss_mib": None}
    rows_of["lora (anchor)"] = results["lora"]
    rows_of["carry-on, anchor only"] = results["carry-on-anchor"]
    rows_of["mixture, no preservation"] = results["mixture-plain"]
    rows_of["mixture, preservation"] = results["mixture"]
    tasks = results["tasks"]["scores"]
    head = ["arm", *DOMAINS, "off-domain", *TASK_SUITES, "trainable", "wall s", "peak MiB"]
    rows = []
    for label, r in rows_of.items():
        rows.append(
            [
                label,
                *(f"{r['losses'].get(d, float('nan')):.4f}" for d in [*DOMAINS, "off-domain"]),
                *(f"{tasks[label][t]:.1%}" if label in tasks else "-" for t in TASK_SUITES),
                f"{r['trainable']:,}" if r.get("trainable") else "-",
                f"{r['seconds']:.0f}" if r.get("seconds") else "-",
                f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-",
            ]
        )
    return head, rows


def plot(head: list[str], rows: list[list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = head[1:5]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [float(v) for v in row[1:5]]
        ax.bar([m + i * width for m in range(len(metrics))], values, width, label=row[0])
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics)
    ax.set_ylabel("held-out nats per character (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_arguments(parser)
    parser.add_argument(
        "--carry-on-lr", type=float, default=CARRY_ON_LR, help="the carry-on arms' lr"
    )
    parser.add_argument(
        "--final-tap", action="store_true", help="carry-on arms also read the anchor's final state"
    )
    parser.add_argument(
        "--lora-lr", type=float, default=2.0e-4, help="the LoRA arm's lr (PEFT's usual rate)"
    )
    parser.add_argument("--cache-out", help="read the feature cache of this earlier OUT")
    parser.add_argument(
        "--preserve-reference",
        choices=["anchor", "best"],
        default="anchor",
        help="train.preserve.reference of the carry-on arms (best: with --experts)",
    )
    parser.add_argument(
        "--write-at",
        type=int,
        help="the mixture arms write into the anchor after this layer (carry_on.write_at; "
        "one of the cached 6, 12, 18)",
    )
    parser.add_argument(
        "--task-items", type=int, default=30, help="GSM and HumanEval items per arm (compare)"
    )
    parser.add_argument(
        "--task-batch", type=int, default=16, help="items decoded together (compare --batch)"
    )
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--lora-params", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.arm:
        child(args)
        return
    (Path(args.out) / "recipe-mixture.yaml").write_text(
        yaml.safe_dump(recipe_dict(args, "mixture"))
    )
    results = {arm: run_arm(arm, args) for arm in ["cache", "bases", "mixture"]}
    for arm in ["carry-on-anchor", "mixture-plain"]:
        results[arm] = run_arm(arm, args)
    results["lora"] = run_arm("lora", args, lora_params=results["mixture"]["trainable"])
    results["tasks"] = run_arm("tasks", args)
    lora, mix = results["lora"]["trainable"], results["mixture"]["trainable"]
    head, rows = table(results)
    lines = ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]
    text = "\n".join(lines)
    text += (
        f"\n\nLoRA rank {results['lora']['rank']}: {lora:,} trainable vs the mixture's {mix:,} "
        f"({lora / mix - 1:+.1%}). Cache: {results['cache']['tokens']:,} tokens in "
        f"{results['cache']['seconds']:.0f} s (shared by the carry-on arms).\n"
    )
    gates = results["mixture"]["gates"]
    text += "\nMixture's mean router weight per source, by held-out domain:\n\n"
    sources = list(next(iter(gates.values())))
    text += "| domain | " + " | ".join(sources) + " |\n|---|" + "---|" * len(sources) + "\n"
    for domain, g in sorted(gates.items()):
        text += f"| {domain} | " + " | ".join(f"{g[s]:.3f}" for s in sources) + " |\n"
    print(text)
    (Path(args.out) / "table.md").write_text(text)
    plot(head, rows, Path(args.out) / "equal_budget.png")


if __name__ == "__main__":
    main()

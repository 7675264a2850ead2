"""`compose build` and `compose train`: features (cached or live), training, the mixture directory.

The output directory holds the resolved recipe, the carry-on weights, metrics.json, the loss
plot and a README card. It is created only once everything before training has succeeded, so
bad input leaves nothing behind; checkpoints inside it make a killed build resumable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout
from rich.console import Console

from composer.errors import OutputError, RecipeError, ResourceError, TrainError
from composer.features.cache import FeatureCache, open_cache, write_cache
from composer.features.data import load_splits
from composer.files import write_json, write_png, write_text
from composer.model.mixture import CachedMixture, LiveMixture, MixtureCore
from composer.model.weights import RECIPE_FILE, WEIGHTS, load_weights, save_weights
from composer.progress import counted
from composer.recipe import Recipe, comparable, read_comparable
from composer.training.distributed import Ranks
from composer.training.metrics import domain_metrics, gate_separation
from composer.training.plan import Plan, make_plan
from composer.training.train import (
    FeatureSource,
    Source,
    TrainResult,
    evaluate,
    peak_rss_bytes,
    train,
)
from composer.versions import package_versions


@dataclass
class BuildResult:
    out_dir: Path
    metrics: dict[str, Any]


def check_output_dir(out_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Refuse a file, an unwritable place, or somebody else's build, before any work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output {out_dir} is not writable ({parent} denies writing)")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    saved = out_dir / RECIPE_FILE
    # A build writes its recipe first, then checkpoints, then the carry-on: anything else with
    # files in it is somebody else's folder, never written into, --resume or not.
    if not saved.is_file() or not (
        (out_dir / "checkpoints").is_dir() or (out_dir / WEIGHTS).is_file()
    ):
        raise OutputError(f"output {out_dir} is not empty and holds no build; choose another --out")
    if not resume:
        raise OutputError(
            f"output {out_dir} already holds a build: pass --resume to continue it, "
            "or choose another --out"
        )
    try:
        before = read_comparable(saved)
    except RecipeError as exc:
        raise OutputError(f"output {out_dir}: its {saved.name} is unreadable ({exc})") from exc
    if _resumable(before) != _resumable(comparable(recipe)):
        raise OutputError(f"output {out_dir} was built from a different recipe; cannot resume")


_HELD: set[Path] = set()  # outputs this process has locked: build holds it across train_mixture


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out_dir` for a run: a second run to the same output, from
    any process, is refused at once instead of writing into it too."""
    key = out_dir.resolve()
    if key in _HELD:
        yield
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir.parent / f".{out_dir.name}.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise OutputError(f"output {out_dir} is being written by another run") from None
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        Path(lock.lock_file).unlink(missing_ok=True)  # while held: no other run has it open
        lock.release()


def _resumable(data: dict[str, Any]) -> dict[str, Any]:
    """A comparable recipe minus what may change between a run and its resumption."""
    return {**data, "train": {k: v for k, v in data["train"].items() if k != "steps"}}


def build(
    recipe: Recipe,
    *,
    out: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    console: Console | None = None,
) -> BuildResult:
    """Cache the bases' states (or reuse a matching cache) and train from them; with
    `train.cache.enabled` off, train with the bases running live. Then write the mixture.

    A plan whose memory estimate exceeds the available memory is refused unless `force`."""
    out_dir = out or recipe.output_dir()
    check_output_dir(out_dir, recipe, resume)
    with output_lock(out_dir):
        return _build(recipe, out_dir, steps, resume, force, console)


def _build(
    recipe: Recipe,
    out_dir: Path,
    steps: int | None,
    resume: bool,
    force: bool,
    console: Console | None,
) -> BuildResult:
    console = console or Console(stderr=True)
    check_output_dir(out_dir, recipe, resume)  # again, now that no other run can write there
    check_memory(make_plan(recipe, fetch=True), force)
    cache = None
    if recipe.train.cache.enabled:
        cache = write_cache(recipe, console=console)
        how = "reused" if cache.reused else "written"
        console.print(f"feature cache {how}: {cache.folder} ({cache.tokens:,} tokens)")
    result = train_mixture(
        recipe,
        from_cache=cache is not None,
        out=out_dir,
        steps=steps,
        resume=resume,
        console=console,
        cache=cache,
    )
    with console.status("held-out metrics per domain, the bases alone included"):
        result.metrics["domains"] = domain_report(recipe, out_dir, cache)
        result.metrics["gate_separation"] = gate_separation(result.metrics["domains"])
    write_json(out_dir / "metrics.json", result.metrics)
    write_text(out_dir / "README.md", model_card(recipe, result.metrics))
    return result


def check_memory(plan: Plan, force: bool) -> None:
    need = plan.memory_bytes["total"]
    available = psutil.virtual_memory().available
    if need > available and not force:
        raise ResourceError(
            f"the plan needs about {need / 2**30:.1f} GiB of memory but {available / 2**30:.1f} "
            "GiB is available (see `compose plan`); pass --force to run anyway"
        )


def domain_report(
    recipe: Recipe, out_dir: Path, cache: FeatureCache | None = None
) -> dict[str, Any]:
    """Per data domain, on the held-out split: loss of the anchor, of the mixture and of each
    base alone (per character, so tokenizers compare), and the router's mean weight per source;
    with preservation, the held-out general text too (`general/...` domains: off-domain).
    With the build's feature `cache`, the mixture and the anchor read its states."""
    mixture = LiveMixture.from_recipe(recipe, fetch=True, seed=recipe.train.seed)
    load_weights(out_dir / WEIGHTS, mixture.carry_on)
    mixture.carry_on.eval()
    splits = load_splits(recipe, mixture.tokenizer)
    report: dict[str, Any] = {}
    for name in ("eval", "general"):
        if name in splits:
            source = cache.source(name) if cache is not None else None
            report |= domain_metrics(mixture, splits[name], recipe.train.batch_size, source)
    return report


def train_mixture(
    recipe: Recipe,
    *,
    from_cache: bool,
    out: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    console: Console | None = None,
    cache: FeatureCache | None = None,
) -> BuildResult:
    """Train the carry-on and write the mixture directory. From the recipe's feature cache
    (`cache`, when already opened), no base weights are loaded but the anchor's LM head;
    otherwise the bases run live."""
    out_dir = out or recipe.output_dir()
    if not Ranks.current().is_main:  # the processes of one data-parallel run share the output
        return _train_mixture(recipe, from_cache, out_dir, steps, resume, console, cache)
    check_output_dir(out_dir, recipe, resume)
    with output_lock(out_dir):
        return _train_mixture(recipe, from_cache, out_dir, steps, resume, console, cache)


def _train_mixture(
    recipe: Recipe,
    from_cache: bool,
    out_dir: Path,
    steps: int | None,
    resume: bool,
    console: Console | None,
    cache: FeatureCache | None,
) -> BuildResult:
    console = console or Console(stderr=True)
    ranks = Ranks.current()
    if ranks.world > 1 and not from_cache:
        raise TrainError(
            f"training on {ranks.world} processes reads the feature cache: run `compose cache` "
            "first, then launch `compose train --from-cache`"
        )
    check_output_dir(out_dir, recipe, resume)
    ranks.barrier()  # every process has checked the output before the first one writes there
    spec = recipe.train
    model: MixtureCore
    train_source: Source
    eval_source: Source
    sources: dict[str, Source]
    if from_cache:
        cache = cache or open_cache(recipe)
        model = CachedMixture.from_recipe(recipe, seed=spec.seed).to(ranks.device)
        sources = {name: cache.source(name) for name in cache.manifest["shards"]}
    else:
        model, sources = _live(recipe, console)
    train_source, eval_source = sources["train"], sources["eval"]
    general = sources.get("general")
    anchor_eval = evaluate(model, eval_source, spec.batch_size, use_carry_on=False, ranks=ranks)
    n_train, n_eval = len(train_source.examples), len(eval_source.examples)
    if ranks.is_main:
        console.print(
            f"{n_train} train / {n_eval} eval examples; anchor eval loss {anchor_eval:.4f}"
            + (f"; {ranks.world} processes" if ranks.world > 1 else "")
        )
        if spec.preserve is None:
            console.print(
                "[yellow]preservation off[/] (train.preserve: none): nothing keeps the mixture "
                "close to the anchor off its training data, and no off-domain loss is reported"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / RECIPE_FILE, recipe.to_yaml())
    result = train(
        model,
        train_source,
        eval_source,
        spec,
        out_dir / "checkpoints",
        steps=steps,
        resume=resume,
        console=console,
        ranks=ranks,
        preserve_source=sources.get("preserve"),
    )
    metrics = _metrics(recipe, model, result, anchor_eval, n_train, n_eval)
    metrics["off_domain"] = None
    if general is not None:
        metrics["off_domain"] = off_domain(model, general, spec.batch_size, ranks)
    metrics["features"] = "cache" if from_cache else "live"
    metrics["processes"] = ranks.world
    if ranks.is_main:
        save_weights(out_dir / WEIGHTS, model.carry_on)
        write_json(out_dir / "metrics.json", metrics)
        plot_losses(out_dir / "loss.png", result, anchor_eval)
        write_text(out_dir / "README.md", model_card(recipe, metrics))
    ranks.barrier()
    return BuildResult(out_dir=out_dir, metrics=metrics)


def off_domain(
    model: MixtureCore, general: Source, batch_size: int, ranks: Ranks | None = None
) -> dict[str, float]:
    """Held-out loss on general text (per target token), anchor alone and mixture: the harm
    a build does outside what it trained on."""
    anchor = evaluate(model, general, batch_size, use_carry_on=False, ranks=ranks)
    mixture = evaluate(model, general, batch_size, ranks=ranks)
    return {"anchor": anchor, "mixture": mixture, "change": mixture / anchor - 1}


HARM_TOLERANCE = 0.02  # off-domain loss may rise this much before a build warns


def harm_warning(metrics: dict[str, Any]) -> str | None:
    """One line when the mixture's off-domain loss exceeds the anchor's by more than 2%."""
    off = metrics.get("off_domain")
    if not off or off["change"] <= HARM_TOLERANCE:
        return None
    return (
        f"warning: off-domain loss rose {off['change']:+.1%} over the anchor's "
        f"({off['anchor']:.4f} → {off['mixture']:.4f}): the mixture harms what it was not "
        "trained on; raise train.preserve.weight or add general text to the data"
    )


def summary(metrics: dict[str, Any]) -> str:
    """The build's last line: held-out loss per trained domain and off-domain, anchor vs
    mixture."""
    parts = [
        f"eval loss {metrics['eval_loss_mixture']:.4f} (anchor {metrics['eval_loss_anchor']:.4f})"
    ]
    for domain, d in (metrics.get("domains") or {}).items():
        if not domain.startswith("general/"):
            loss = d["nats_per_char"]
            parts.append(f"{domain} {loss['mixture']:.4f} (anchor {loss['anchor']:.4f}) nats/char")
    off = metrics.get("off_domain")
    if off:
        parts.append(
            f"off-domain {off['mixture']:.4f} (anchor {off['anchor']:.4f}, {off['change']:+.1%})"
        )
    else:
        parts.append("off-domain not measured (preservation off)")
    return "; ".join(parts) + f"; {metrics['trainable_params']:,} trainable params"


def _live(recipe: Recipe, console: Console) -> tuple[LiveMixture, dict[str, Source]]:
    """The bases loaded; training batches computed per step, eval features once, in memory."""
    spec = recipe.train
    with console.status("loading bases"):
        mixture = LiveMixture.from_recipe(recipe, fetch=True, seed=spec.seed)
    with console.status("reading data"):
        splits = load_splits(recipe, mixture.tokenizer)
    with counted("bases", "eval examples", console=console) as progress:
        held = [name for name in ("eval", "general") if name in splits]
        task = progress.add_task("bases", total=sum(len(splits[name]) for name in held))

        def advance(n: int) -> None:
            progress.advance(task, n)

        sources: dict[str, Source] = {
            name: FeatureSource(mixture, splits[name], name in held, advance) for name in splits
        }
    return mixture, sources


def _metrics(
    recipe: Recipe,
    mixture: MixtureCore,
    result: TrainResult,
    anchor_eval: float,
    n_train: int,
    n_eval: int,
) -> dict[str, Any]:
    trainable = sum(p.numel() for p in mixture.carry_on.parameters() if p.requires_grad)
    return {
        "recipe": recipe.name,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_examples": n_train,
        "eval_examples": n_eval,
        "train_loss_first": result.train_loss[0][1] if result.train_loss else None,
        "train_loss_last": result.train_loss[-1][1] if result.train_loss else None,
        "eval_loss_anchor": anchor_eval,
        "eval_loss_mixture": result.eval_loss[-1][1] if result.eval_loss else None,
        "eval_loss_curve": result.eval_loss,
        "preserve": (
            recipe.train.preserve.model_dump(mode="json", exclude={"data"})
            if recipe.train.preserve is not None
            else None
        ),
        "preserve_kl_last": result.preserve_kl[-1][1] if result.preserve_kl else None,
        "trainable_params": trainable,
        "peak_rss_bytes": peak_rss_bytes(),
        "train_seconds": round(result.seconds, 1),
        "versions": package_versions(),
    }


def plot_losses(path: Path, result: TrainResult, anchor_eval: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if result.train_loss:
        steps, losses = zip(*result.train_loss, strict=True)
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train loss")
    if result.eval_loss:
        steps, losses = zip(*result.eval_loss, strict=True)
        ax.plot(steps, losses, "o-", label="eval loss (mixture)")
    ax.axhline(anchor_eval, color="grey", ls="--", label="eval loss (anchor alone)")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)


def _domain_table(domains: dict[str, Any] | None) -> str:
    if not domains:
        return ""
    first = next(iter(domains.values()))
    losses = list(first["nats_per_char"])
    sources = list(first["gate_mean"])
    head = ["domain", *(f"{k} (nats/char)" for k in losses), *(f"gate {s}" for s in sources)]
    rows = [
        [
            domain,
            *(f"{d['nats_per_char'][k]:.4f}" for k in losses),
            *(f"{d['gate_mean'][s]:.3f}" for s in sources),
        ]
        for domain, d in domains.items()
    ]
    lines = [head, ["---"] * len(head), *rows]
    table = "\n".join("| " + " | ".join(row) + " |" for row in lines)
    return f"\nPer domain, held out (loss per character of the target text):\n\n{table}\n"


def _off_domain_rows(metrics: dict[str, Any]) -> str:
    off = metrics.get("off_domain")
    if not off:
        return "\nPreservation was off (`train.preserve: none`): off-domain harm is not measured.\n"
    warning = harm_warning(metrics)
    return (
        f"| off-domain general text, anchor alone | {off['anchor']:.4f} |\n"
        f"| off-domain general text, mixture | {off['mixture']:.4f} ({off['change']:+.1%}) |\n"
        + (f"\n**{warning}**\n" if warning else "")
    )


def model_card(recipe: Recipe, metrics: dict[str, Any]) -> str:
    bases = "\n".join(
        f"- `{name}`: {spec.card or spec.path} ({spec.dtype}, quantization {spec.quantization})"
        + (" — anchor" if name == recipe.anchor else "")
        for name, spec in recipe.bases.items()
    )
    anchor, mixture = metrics["eval_loss_anchor"], metrics["eval_loss_mixture"]
    return f"""# {recipe.name}

A carry-on mixture built by `compose build`: frozen bases, a trained carry-on of
{metrics["trainable_params"]:,} parameters writing a gated correction through the anchor's LM head.

## Bases
{bases}

Taps: {", ".join(recipe.taps)}. Carry-on: {len(recipe.carry_on.blocks)} blocks of width
{recipe.carry_on.width}, {recipe.carry_on.heads} heads.

## Training
{metrics["steps"]} steps, {metrics["tokens"]:,} tokens, data `{recipe.train.data.kind}`.

| held-out next-token loss | value |
|---|---|
| anchor alone | {anchor:.4f} |
| mixture | {mixture:.4f} |
{_off_domain_rows(metrics)}
{_domain_table(metrics.get("domains"))}
## Use
    compose generate <this folder> --prompt "..."

The resolved recipe is in `{RECIPE_FILE}`, the carry-on weights in `{WEIGHTS}`.
"""

"""`compose build` and `compose train`: features (cached or live), training, the mixture directory.

Both commands run one path (`_run`): the output is checked, locked and checked again, the
carry-on trains, and the directory's files are written once, at the end. `build` adds a memory
check, writes (or reuses) the feature cache and measures each held-out domain with the bases
alone too; `train` reads a cache `compose cache` wrote, or runs the bases live, and trains
data-parallel from the cache on several processes, where rank 0 alone locks and writes.

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
from rich.console import Console

from composer.errors import OutputError, RecipeError, ResourceError, TrainError
from composer.features.cache import FeatureCache, open_cache, write_cache
from composer.features.data import load_splits
from composer.files import lock_now, write_json, write_text
from composer.model.mixture import CachedMixture, LiveMixture, MixtureCore
from composer.model.weights import RECIPE_FILE, WEIGHTS, save_weights
from composer.progress import counted, status
from composer.recipe import Recipe, comparable, read_comparable
from composer.training.distributed import Ranks
from composer.training.metrics import domain_metrics, gate_separation
from composer.training.plan import Plan, make_plan
from composer.training.report import model_card, plot_losses
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


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out_dir` for a run: a second run to the same output, from
    any process, is refused at once instead of writing into it too."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    busy = OutputError(f"output {out_dir} is being written by another run")
    lock = lock_now(out_dir.parent / f".{out_dir.name}.lock", busy)
    try:
        yield
    finally:
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
    run = _Run(recipe.train.cache.enabled, whole=True, steps=steps, resume=resume, force=force)
    return _run(recipe, out_dir, run, console)


def train_mixture(
    recipe: Recipe,
    *,
    from_cache: bool,
    out: Path | None = None,
    steps: int | None = None,
    resume: bool = False,
    console: Console | None = None,
) -> BuildResult:
    """Train the carry-on and write the mixture directory. From the recipe's feature cache no
    base weights are loaded but the anchor's LM head; otherwise the bases run live."""
    out_dir = out or recipe.output_dir()
    return _run(recipe, out_dir, _Run(from_cache, steps=steps, resume=resume), console)


@dataclass(frozen=True)
class _Run:
    """What a run does beyond training: `whole` is `build` (memory check, the cache written
    or reused, held-out metrics per domain with the bases alone)."""

    from_cache: bool
    whole: bool = False
    steps: int | None = None
    resume: bool = False
    force: bool = False


def _run(recipe: Recipe, out_dir: Path, run: _Run, console: Console | None) -> BuildResult:
    """The one path of `build` and `train`: the output checked before the lock and again
    inside it; the processes of a data-parallel run other than rank 0 check it but neither
    lock nor write."""
    console = console or Console(stderr=True)
    ranks = Ranks.current()
    if ranks.world > 1 and (run.whole or not run.from_cache):
        raise TrainError(
            f"training on {ranks.world} processes reads the feature cache: run `compose cache` "
            "first, then launch `compose train --from-cache`"
        )
    check_output_dir(out_dir, recipe, run.resume)
    if not ranks.is_main:  # the processes of one data-parallel run share rank 0's lock
        return _make_mixture(recipe, out_dir, run, ranks, console)
    with output_lock(out_dir):
        check_output_dir(out_dir, recipe, run.resume)  # again, now that no other run can write
        return _make_mixture(recipe, out_dir, run, ranks, console)


def _make_mixture(
    recipe: Recipe, out_dir: Path, run: _Run, ranks: Ranks, console: Console
) -> BuildResult:
    ranks.barrier()  # every process has checked the output before the first one writes there
    spec = recipe.train
    if run.whole:
        check_memory(make_plan(recipe, fetch=True), run.force)
    cache = None
    if run.from_cache and run.whole:
        cache = write_cache(recipe, console=console)
        how = "reused" if cache.reused else "written"
        console.print(f"feature cache {how}: {cache.folder} ({cache.tokens:,} tokens)")
    elif run.from_cache:
        cache = open_cache(recipe)
    model: MixtureCore
    train_source: Source
    eval_source: Source
    sources: dict[str, Source]
    if cache is not None:
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
        steps=run.steps,
        resume=run.resume,
        console=console,
        ranks=ranks,
        preserve_source=sources.get("preserve"),
    )
    metrics = _metrics(recipe, model, result, anchor_eval, n_train, n_eval)
    metrics["off_domain"] = None
    if general is not None:
        metrics["off_domain"] = off_domain(model, general, spec.batch_size, ranks)
    metrics["features"] = "cache" if cache is not None else "live"
    metrics["processes"] = ranks.world
    if ranks.is_main:
        save_weights(out_dir / WEIGHTS, model.carry_on)
    if run.whole:  # one process: `_run` refuses a build on several
        with status("held-out metrics per domain, the bases alone included", console=console):
            metrics["domains"] = domain_report(recipe, _live_mixture(recipe, model), cache)
            metrics["gate_separation"] = gate_separation(metrics["domains"])
    if ranks.is_main:
        write_json(out_dir / "metrics.json", metrics)
        plot_losses(out_dir / "loss.png", result, anchor_eval)
        write_text(out_dir / "README.md", model_card(recipe, metrics))
    ranks.barrier()
    return BuildResult(out_dir=out_dir, metrics=metrics)


def check_memory(plan: Plan, force: bool) -> None:
    need = plan.memory_bytes["total"]
    available = psutil.virtual_memory().available
    if need > available and not force:
        raise ResourceError(
            f"the plan needs about {need / 2**30:.1f} GiB of memory but {available / 2**30:.1f} "
            "GiB is available (see `compose plan`); pass --force to run anyway"
        )


def _live_mixture(recipe: Recipe, model: MixtureCore) -> LiveMixture:
    """The trained mixture with its bases loaded: the one trained live, or the bases loaded
    now around the carry-on trained from the cache (the bases alone are scored live)."""
    if isinstance(model, LiveMixture):
        return model
    mixture = LiveMixture.from_recipe(recipe, fetch=True, seed=recipe.train.seed)
    mixture.carry_on.load_state_dict(model.carry_on.state_dict())
    return mixture


def domain_report(
    recipe: Recipe, mixture: LiveMixture, cache: FeatureCache | None = None
) -> dict[str, Any]:
    """Per data domain, on the held-out split: loss of the anchor, of the trained `mixture` and
    of each base alone (per character, so tokenizers compare), and the router's mean weight per
    source; with preservation, the held-out general text too (`general/...` domains:
    off-domain). With the build's feature `cache`, the mixture and the anchor read its states."""
    mixture.carry_on.eval()
    splits = load_splits(recipe, mixture.tokenizer)
    report: dict[str, Any] = {}
    for name in ("eval", "general"):
        if name in splits:
            source = cache.source(name) if cache is not None else None
            report |= domain_metrics(mixture, splits[name], recipe.train.batch_size, source)
    return report


def off_domain(
    model: MixtureCore, general: Source, batch_size: int, ranks: Ranks | None = None
) -> dict[str, float]:
    """Held-out loss on general text (per target token), anchor alone and mixture: the harm
    a build does outside what it trained on."""
    anchor = evaluate(model, general, batch_size, use_carry_on=False, ranks=ranks)
    mixture = evaluate(model, general, batch_size, ranks=ranks)
    return {"anchor": anchor, "mixture": mixture, "change": mixture / anchor - 1}


def _live(recipe: Recipe, console: Console) -> tuple[LiveMixture, dict[str, Source]]:
    """The bases loaded; training batches computed per step, eval features once, in memory."""
    spec = recipe.train
    with status("loading bases", console=console):
        mixture = LiveMixture.from_recipe(recipe, fetch=True, seed=spec.seed)
    with status("reading data", console=console):
        splits = load_splits(recipe, mixture.tokenizer)
    with counted("bases", unit="eval examples", console=console) as progress:
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

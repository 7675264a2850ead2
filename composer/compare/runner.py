"""`compose compare A B`: two mixtures on the same items, paired statistics, reports.

A side is a built mixture directory (or an export), a recipe whose build directory exists, a
model folder (config.json and weights, e.g. a LoRA merged by `compose port --lora`) or a base
card name: the model or base alone, as an anchor-only mixture whose carry-on is untrained (its
correction is exactly zero, so its logits are the base's). A bare recipe that was never built is
an error that says to build it: training belongs to `compose build`, not to a comparison.

Each side is loaded once, only if some (suite, item) result is missing from the result cache;
results are cached per (mixture key, suite and its settings, item) as soon as they are computed,
so a rerun after a crash recomputes nothing that finished.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from composer.artifacts.load import read_mixture_recipe
from composer.bases.registry import cache_home
from composer.compare.results import CompareResult, Side, SuiteResult
from composer.compare.stats import compare_paired
from composer.compare.suites import SUITES, FromData, Item, Suite, SuiteRegistry, parse_data
from composer.errors import CompareError, ComposeError
from composer.files import sha256_file, write_json
from composer.model.weights import RECIPE_FILE, WEIGHTS
from composer.progress import counted, status
from composer.recipe import Recipe, comparable, load_recipe, read_comparable, recipe_from_dict

SCORING_VERSION = 2  # bump when a suite's scoring changes, so old cached results are not reused


def resolve_side(
    label: str, given: str, *, trust_remote_code: bool = False, keyed: bool = True
) -> Side:
    """A compare side from what the user gave (a mixture directory, a built recipe, a model
    folder, `CARD` or `CARD:DTYPE`), with its result key unless not `keyed` (a side opened only
    to run: no base's weights are hashed)."""
    key = _keyed if keyed else _unkeyed
    path = Path(given)
    folder, _, dtype = given.rpartition(":")
    if not path.exists() and folder and _model_folder(Path(folder)):  # FOLDER:DTYPE
        path = Path(folder)
    else:
        dtype = ""
    if _model_folder(path):
        spec = {"path": str(path.resolve())}
        if dtype:
            spec["dtype"] = _dtype(given, dtype)
        return key(_alone(label, given, spec, "model", _slug(path.resolve().name)))
    if path.is_dir():
        if not (path / RECIPE_FILE).is_file() or not (path / WEIGHTS).is_file():
            raise CompareError(
                f"{given}: neither a mixture directory (needs {RECIPE_FILE}, {WEIGHTS}) nor a "
                "model folder (needs config.json)"
            )
        recipe = read_mixture_recipe(path, trust_remote_code=trust_remote_code)
        side = Side(label, given, "mixture", recipe, recipe.to_yaml(), path)
        side.trust_remote_code = trust_remote_code
        return key(side)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        recipe = load_recipe(path)
        built = recipe.output_dir()
        if not (built / WEIGHTS).is_file():
            raise CompareError(
                f"{given}: recipe '{recipe.name}' is not built ({built} has no {WEIGHTS}); "
                f"run `compose build {given}` first or pass a built directory"
            )
        if read_comparable(built / RECIPE_FILE) != comparable(recipe):
            raise CompareError(
                f"{given}: {built} was built from a different version of this recipe; "
                "rebuild it or pass the build directory itself"
            )
        return resolve_side(label, str(built), trust_remote_code=trust_remote_code, keyed=keyed)
    return key(_base_alone(label, given))


def open_model(given: str, *, trust_remote_code: bool = False) -> Any:
    """What `compose compare` takes as a side, loaded to run: a mixture directory (or export),
    a built recipe, a model folder, or a base card (`CARD` or `CARD:DTYPE`); a base alone runs
    as itself (`AnchorAlone`)."""
    from composer.artifacts.load import load_mixture

    if (Path(given) / RECIPE_FILE).is_file():  # no result key to hash: load it as it is
        return load_mixture(given, trust_remote_code=trust_remote_code)
    return resolve_side("model", given, trust_remote_code=trust_remote_code, keyed=False).load()


def _model_folder(path: Path) -> bool:
    return path.is_dir() and not (path / RECIPE_FILE).exists() and (path / "config.json").is_file()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")


def _dtype(given: str, dtype: str) -> str:
    from composer.bases.frozen import DTYPES

    if dtype not in DTYPES:
        raise CompareError(
            f"'{given}': '{dtype}' is not a dtype a base runs in ({', '.join(DTYPES)})"
        )
    return dtype


def _base_alone(label: str, given: str) -> Side:
    """A base card alone, `CARD` or `CARD:DTYPE` (the dtype it runs in; float32 without one),
    as a mixture runs its anchor in its recipe's dtype."""
    from composer.bases import registry

    card_name, _, dtype = given.partition(":")
    try:
        card = registry.get_card(card_name)
    except ComposeError as exc:
        raise CompareError(
            f"'{given}' is not a mixture directory, a model folder, a built recipe or a "
            f"base card ({exc})"
        ) from exc
    spec = {"card": card.name}
    if dtype:
        spec["dtype"] = _dtype(given, dtype)
    role = card.role if re.fullmatch(r"[A-Za-z0-9_-]+", card.role) else "base"
    return _alone(label, given, spec, role, card.name)


def anchor_alone(label: str, recipe: Recipe) -> Side:
    """`recipe`'s anchor alone, loaded as the recipe loads it (dtype, quantization, LoRA)."""
    anchor = recipe.bases[recipe.anchor]
    spec = anchor.model_dump(mode="json", exclude_defaults=True)
    name = anchor.card or Path(anchor.path or "").name
    return _keyed(_alone(label, f"{name} (the anchor alone)", spec, recipe.anchor, name))


def _alone(label: str, given: str, spec: dict[str, Any], role: str, name: str) -> Side:
    """A base alone (a card, or a model folder such as a merged LoRA): an anchor-only mixture
    whose carry-on is never trained."""
    recipe = recipe_from_dict(
        {
            "name": f"{name}-alone",
            "anchor": role,
            "bases": {role: spec},
            "taps": [f"{role}@0"],
            # A minimal carry-on that is never trained: its zero-initialized output projection
            # (and alpha 0) leave the base's logits exactly as they are.
            "carry_on": {
                "width": 8,
                "heads": 2,
                "blocks": [{}],
                "gate": "none",
                "alpha": {"init": 0.0, "learnable": False},
            },
            "train": {"data": {"kind": "gsm_symbolic", "size": 2}, "steps": 1},
        },
        f"base {given}",
    )
    # Shown in the recipes' diff: the same fields, in the same form, as a mixture's recipe.
    shown = {
        k: v for k, v in recipe.model_dump(mode="json").items() if k in ("name", "anchor", "bases")
    }
    text = "# the base alone, no carry-on\n" + yaml.safe_dump(shown, sort_keys=False)
    return Side(label, given, "base", recipe, text)


# Model fields added after results were first cached, with the value that means "as before the
# field existed": at that value a field is left out of the key, so results cached before it was
# added stay found (the whole recipe as validated today would hold it, and re-key them all).
ADDED_FIELDS: dict[str, dict[str, Any]] = {"carry_on": {"write_at": None}}


def key_fields(recipe: Recipe) -> dict[str, Any]:
    """The recipe fields a mixture's result key hashes: all but `output` and `train`, and
    without added fields at their neutral value (ADDED_FIELDS)."""
    fields = {k: v for k, v in comparable(recipe).items() if k != "train"}
    for section, added in ADDED_FIELDS.items():
        for name, neutral in added.items():
            if fields[section].get(name, neutral) == neutral:
                fields[section].pop(name, None)
    return fields


def _unkeyed(side: Side) -> Side:
    return side


def _keyed(side: Side) -> Side:
    """The mixture key: the recipe, the carry-on's bytes and the bases' weights. Training
    settings are left out: a built mixture computes from its weights alone, and a training
    field added later must not orphan the results already cached."""
    from composer.bases.frozen import resolve_folder
    from composer.bases.identity import base_identity

    digest = hashlib.sha256()
    digest.update(json.dumps(key_fields(side.recipe), sort_keys=True).encode())
    digest.update(sha256_file(side.folder / WEIGHTS).encode() if side.folder else b"base alone")
    for name, spec in side.recipe.bases.items():
        identity = base_identity(resolve_folder(spec, fetch=True))
        digest.update(json.dumps({name: identity}, sort_keys=True).encode())
    side.key = digest.hexdigest()
    return side


class ResultCache:
    """One small JSON file per (mixture, suite + settings, item), written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str, suite: Suite, item: Item) -> Path:
        settings = json.dumps([SCORING_VERSION, suite.settings], sort_keys=True)
        suite_dir = f"{suite.name}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
        what = json.dumps([item.id, item.data], sort_keys=True).encode()
        name = hashlib.sha256(what).hexdigest()[:32]
        return self.root / key[:32] / suite_dir / f"{name}.json"

    def get(self, key: str, suite: Suite, item: Item) -> dict[str, Any] | None:
        path = self.path(key, suite, item)
        try:
            return json.loads(path.read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, suite: Suite, item: Item, result: dict[str, Any]) -> None:
        write_json(self.path(key, suite, item), {"item": item.id, "result": result})


def compare(
    a: str,
    b: str,
    *,
    suites: Sequence[str] = (),
    limit: int | None = None,
    skip: int = 0,
    level: float = 0.95,
    seed: int = 0,
    batch: int = 8,
    out: Path | None = None,
    cache_dir: Path | None = None,
    registry: SuiteRegistry = SUITES,
    console: Console | None = None,
    data: Sequence[str] = (),
    unsafe_no_jail: bool = False,
    trust_remote_code: bool = False,
) -> CompareResult:
    """Run both sides on the same items of each suite and compare them item by item.

    Generation suites decode `batch` items at a time, the next joining as one ends (padded on
    the left; each answer is the one generated alone, up to float rounding), and each result
    is cached as it is ready. `skip` leaves out each suite's first items (those settings were
    chosen on), `limit` caps the rest. `data`: `NAME=PATH` local copies of the benchmarks' data
    (`--data`); the rest come from the Hugging Face hub. Suites that run
    generated code need the sandbox's jail; where it cannot be built they are refused before
    anything is loaded, unless `unsafe_no_jail` (then they run unjailed, with a warning).
    `trust_remote_code`: the user's flag, needed by a mixture whose base ships Python."""
    console = console or Console(stderr=True)
    if not 0 < level < 1:
        raise CompareError(f"--level {level} must be between 0 and 1")
    if batch < 1:
        raise CompareError(f"--batch {batch} must be at least 1")
    if skip < 0:
        raise CompareError(f"--skip {skip} must be 0 or more")
    places = parse_data(data, registry)
    chosen = [
        registry.get(name) for name in dict.fromkeys(suites or default_suites(registry, places))
    ]
    _check_jail(chosen, unsafe_no_jail, console)
    with status("resolving both sides", console=console):
        sides = [
            resolve_side(label, given, trust_remote_code=trust_remote_code)
            for label, given in (("A", a), ("B", b))
        ]
    recipes = [s.recipe for s in sides if s.kind == "mixture"]
    with status("reading the suites' items", console=console):
        items = {suite.name: suite.items(limit, recipes, places, skip) for suite in chosen}
    for name, listed in items.items():
        if skip and not listed:
            raise CompareError(f"--skip {skip}: suite '{name}' has no items after the first {skip}")
    cache = ResultCache(cache_dir or cache_home() / "compare")
    computed = {
        side.label: _run_side(side, chosen, items, cache, seed, batch, console, unsafe_no_jail)
        for side in sides
    }
    unit = "token" if _same_tokenizer(*sides) else "byte"
    results = [
        _suite_result(suite, items[suite.name], sides, cache, unit, level, seed) for suite in chosen
    ]
    result = CompareResult(sides[0], sides[1], level, results, computed, left_out=skip)
    if out is not None:
        from composer.compare.report import write_reports

        write_reports(result, out)
        result.out_dir = out
    return result


def default_suites(registry: SuiteRegistry, data: dict[str, str]) -> list[str]:
    """The suites run when none is named: those whose data ships with the installed packages,
    and each benchmark whose local copy `--data` names (the hub is never read unasked)."""
    return [s.name for s in registry if not isinstance(s.load, FromData) or s.load.name in data]


def runs_code(suite: Suite) -> bool:
    """Whether a suite runs generated code in the sandbox: its settings hold the sandbox's
    limits (see scoring._run_programs)."""
    return "memory_mb" in suite.settings


def _check_jail(suites: list[Suite], unsafe_no_jail: bool, console: Console) -> None:
    from composer.compare.sandbox import jail_problem, refusal

    sandboxed = [s.name for s in suites if runs_code(s)]
    problem = jail_problem() if sandboxed else None
    if problem is None:
        return
    if not unsafe_no_jail:
        raise CompareError(refusal(problem, ", ".join(sandboxed)))
    console.print(
        f"[bold red]warning:[/] --unsafe-no-jail: {', '.join(sandboxed)} runs generated code "
        f"without the jail ({problem}), with your own rights: it can read your files, reach "
        "the network and write wherever you can (see README)",
        highlight=False,
    )


def _run_side(
    side: Side,
    suites: list[Suite],
    items: dict[str, list[Item]],
    cache: ResultCache,
    seed: int,
    batch: int,
    console: Console,
    unsafe_no_jail: bool = False,
) -> int:
    todo = {s.name: [i for i in items[s.name] if cache.get(side.key, s, i) is None] for s in suites}
    if not any(todo.values()):
        return 0
    import torch

    with status(f"loading {side.label}: {side.given}", console=console):
        mixture = side.load()
    with counted("{task.description}", unit="items", console=console) as progress:
        for suite in suites:
            done = len(items[suite.name]) - len(todo[suite.name])
            task = progress.add_task(
                f"{side.label} {suite.name}", total=len(items[suite.name]), completed=done
            )
            pending = todo[suite.name]
            # What the cache keys is the suite's settings; these two are not part of it.
            settings = {**suite.settings, "at_once": batch}
            if runs_code(suite):
                settings["unsafe_no_jail"] = unsafe_no_jail
            torch.manual_seed(seed)
            for k, result in suite.run(mixture, pending, settings):
                cache.put(side.key, suite, pending[k], result)
                progress.advance(task, 1)
    del mixture
    gc.collect()
    return sum(len(v) for v in todo.values())


def _same_tokenizer(a: Side, b: Side) -> bool:
    from composer.bases.frozen import resolve_folder, tokenizer_fingerprint

    folders = [resolve_folder(s.recipe.bases[s.recipe.anchor], fetch=True) for s in (a, b)]
    return tokenizer_fingerprint(folders[0]) == tokenizer_fingerprint(folders[1])


def score(suite: Suite, result: dict[str, Any], unit: str) -> float | None:
    """The item's number in the suite's metric; None where the item was skipped."""
    if "skipped" in result or suite.kind == "generations":
        return None
    if suite.kind == "pass":
        return 1.0 if result["passed"] else 0.0
    denominator = result["tokens"] if unit == "token" else result["bytes"]
    return result["nll"] / max(denominator, 1)


def _suite_result(
    suite: Suite,
    items: list[Item],
    sides: list[Side],
    cache: ResultCache,
    unit: str,
    level: float,
    seed: int,
) -> SuiteResult:
    rows: list[dict[str, Any]] = []
    skipped = 0
    for item in items:
        a, b = (cache.get(side.key, suite, item) or {"skipped": "missing"} for side in sides)
        a_score, b_score = score(suite, a, unit), score(suite, b, unit)
        if suite.kind != "generations" and (a_score is None or b_score is None):
            skipped += 1
        rows.append(
            {
                "id": item.id,
                "input": item.data,
                "a": a,
                "b": b,
                "a_score": a_score,
                "b_score": b_score,
            }
        )
    out = SuiteResult(suite, rows, skipped, unit if suite.kind == "loss" else "")
    paired = [
        (r["a_score"], r["b_score"]) for r in rows if None not in (r["a_score"], r["b_score"])
    ]
    if suite.kind != "generations" and paired:
        a_scores, b_scores = zip(*paired, strict=True)
        out.comparison = compare_paired(
            a_scores,
            b_scores,
            higher_is_better=suite.higher_is_better,
            binary=suite.kind == "pass",
            level=level,
            seed=seed,
        )
    for side, column in zip(sides, ("a", "b"), strict=True):
        gates = [r[column]["gate"] for r in rows if r[column].get("gate")]
        names = [str(t) for t in side.recipe.tap_refs]
        if side.kind == "mixture" and gates and all(len(g) == len(names) for g in gates):
            means = [sum(g[i] for g in gates) / len(gates) for i in range(len(names))]
            out.gates[side.label] = dict(zip(names, means, strict=True))
    return out

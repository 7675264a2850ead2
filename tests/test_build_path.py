"""One path per command: `build` and `train` check their output before taking its lock and
once inside it, take the lock once, load each base at most once and write each file of the
mixture directory once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import recipe_yaml

import composer.bases.pool as pool_module
import composer.files as files_module
import composer.model.mixture as mixture_module
import composer.model.weights as weights_module
import composer.training.build as build_module
from composer.features.cache import write_cache
from composer.model.weights import RECIPE_FILE, WEIGHTS
from composer.recipe import load_recipe
from composer.training.build import build, train_mixture

MIXTURE_FILES = (RECIPE_FILE, WEIGHTS, "metrics.json", "loss.png", "README.md")


@pytest.fixture()
def recipe_path(tiny, write_recipe):
    return write_recipe(
        recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "a@2", "b@3"])
    )


@pytest.fixture()
def seen(monkeypatch) -> Counter:
    """Counts of output checks, lock holds, base loads (`load a`) and file writes
    (`write <path>`), through the functions that do them (a base is loaded through the
    pool's module, or the mixture module's own import for the layers above `write_at`)."""
    counts: Counter = Counter()
    real_check, real_lock = build_module.check_output_dir, build_module.output_lock
    real_load, real_write = mixture_module.load_base, files_module.atomic_write

    def check(*args, **kwargs):
        counts["check"] += 1
        return real_check(*args, **kwargs)

    @contextmanager
    def lock(out_dir: Path) -> Iterator[None]:
        counts["lock"] += 1
        with real_lock(out_dir):
            yield

    def load(name, *args, **kwargs):
        counts[f"load {name}"] += 1
        return real_load(name, *args, **kwargs)

    def write(path, *args, **kwargs):
        counts[f"write {path}"] += 1
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(build_module, "check_output_dir", check)
    monkeypatch.setattr(build_module, "output_lock", lock)
    monkeypatch.setattr(mixture_module, "load_base", load)
    monkeypatch.setattr(pool_module, "load_base", load)
    monkeypatch.setattr(files_module, "atomic_write", write)
    monkeypatch.setattr(weights_module, "atomic_write", write)
    return counts


def _written_once(seen: Counter, out: Path) -> None:
    for name in MIXTURE_FILES:
        assert seen[f"write {out / name}"] == 1, name


def test_a_live_build_loads_each_base_once_and_writes_each_file_once(recipe_path, tmp_path, seen):
    """The bases that trained the carry-on also score the held-out domains."""
    recipe = load_recipe(recipe_path, ["train.cache.enabled=false"])
    out = tmp_path / "out"
    result = build(recipe, out=out, steps=2)
    assert seen["check"] == 2 and seen["lock"] == 1
    assert seen["load a"] == 1 and seen["load b"] == 1
    _written_once(seen, out)
    assert result.metrics["features"] == "live" and "gsm_symbolic" in result.metrics["domains"]


def test_a_cached_build_loads_the_bases_once_for_the_held_out_report(recipe_path, tmp_path, seen):
    """Training reads the cache; the report's bases-alone rows need the bases, loaded once."""
    recipe = load_recipe(recipe_path)
    write_cache(recipe)  # the build reuses it: no base runs for the cache
    seen.clear()
    out = tmp_path / "out"
    result = build(recipe, out=out, steps=2)
    assert seen["check"] == 2 and seen["lock"] == 1
    assert seen["load a"] == 1 and seen["load b"] == 1
    _written_once(seen, out)
    assert result.metrics["features"] == "cache" and "gsm_symbolic" in result.metrics["domains"]


def test_training_from_the_cache_loads_no_base(recipe_path, tmp_path, seen):
    recipe = load_recipe(recipe_path)
    write_cache(recipe)
    seen.clear()
    out = tmp_path / "out"
    result = train_mixture(recipe, from_cache=True, out=out, steps=2)
    assert seen["check"] == 2 and seen["lock"] == 1
    assert not [key for key in seen if key.startswith("load ")]
    _written_once(seen, out)
    assert "domains" not in result.metrics

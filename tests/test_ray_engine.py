"""`compose cache --engine ray`: the same shards and manifest as the local engine, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import recipe_yaml
from typer.testing import CliRunner

from cli import app
from composer.bases.frozen import resolve_folder
from composer.errors import CacheError
from composer.features.cache import MANIFEST, cache_key, write_cache
from composer.features.ray_engine import write_cache as write_cache_ray
from composer.features.shards import Shard
from composer.recipe import load_recipe

# An aligned base ("o", another tokenizer) too: its shards hold `present/` masks.
TAPS = ["a@1", "b@3", "o@1"]
# Two forwards per shard, at least two shards per split, states stored exactly.
SETTINGS = [
    "train.data.size=32",
    "train.eval_fraction=0.2",
    "train.cache.shard_examples=3",
    "train.cache.batch_size=2",
    "train.cache.dtype=float32",
]

RAY = ["train.cache.ray.actors=2", "train.cache.ray.cpus_per_actor=1"]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module; the engine uses it and leaves it running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def recipe_path(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-recipe") / "recipe.yaml"
    bases = {"a": tiny["llama"], "b": tiny["qwen2"], "o": tiny["other"]}
    path.write_text(recipe_yaml(bases, "a", TAPS))
    return path


@pytest.fixture(scope="module")
def caches(recipe_path, ray_instance, tmp_path_factory) -> dict[str, Path]:
    """The same recipe cached by the local engine and by `compose cache --engine ray`."""
    root = tmp_path_factory.mktemp("ray-caches")
    write_cache(load_recipe(recipe_path, [*SETTINGS, f"train.cache.dir={root}/local"]))
    result = CliRunner().invoke(
        app,
        [
            "cache",
            str(recipe_path),
            "--engine",
            "ray",
            *SETTINGS,
            *RAY,
            f"train.cache.dir={root}/ray",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "cached" in result.output
    assert ray_instance.is_initialized()  # an instance the engine did not start is left running
    return {"local": root / "local", "ray": root / "ray"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_ray_and_local_engines_write_the_same_bytes(caches):
    local, ray = caches["local"], caches["ray"]
    manifest = json.loads((local / MANIFEST).read_text())
    assert manifest["complete"]
    assert all(manifest["planned"][s] >= 2 for s in ("train", "eval"))
    assert {"train", "eval", "preserve", "general"} == set(manifest["shards"])
    names = [s["file"] for split in manifest["shards"] for s in manifest["shards"][split]]
    assert all(
        s["file"].startswith(f"{split}-")
        for split in manifest["shards"]
        for s in manifest["shards"][split]
    )
    assert (ray / MANIFEST).read_text() == (local / MANIFEST).read_text()
    assert _files(ray) == _files(local)
    assert sorted(_files(local)) == sorted(names)
    assert "present/o@1" in Shard(ray / names[0]).entries


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_an_engine_writes_only_what_the_manifest_lacks(recipe_path, caches, tmp_path, engine):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(caches["ray"], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    # Two shards missing, neither the last: the rest finished first, as with several actors.
    missing = [
        manifest["shards"]["train"].pop(1)["file"],
        manifest["shards"]["eval"].pop(0)["file"],
    ]
    manifest["complete"] = False
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in missing:
        (folder / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}

    recipe = load_recipe(recipe_path, [*SETTINGS, f"train.cache.dir={folder}"])
    result = (write_cache_ray if engine == "ray" else write_cache)(recipe)
    assert not result.reused
    assert {
        p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors") if p.name in kept
    } == kept
    assert all((folder / name).is_file() for name in missing)
    assert (folder / MANIFEST).read_text() == (caches["local"] / MANIFEST).read_text()
    assert _files(folder) == _files(caches["local"])
    # The sources read the shards in index order and give back every example.
    source = result.source("train")
    assert [s.path.name for s in source.shards] == sorted(s.path.name for s in source.shards)
    assert len(source.examples) == result.examples["train"]


def test_ray_settings_do_not_change_the_cache_key(recipe_path):
    plain = load_recipe(recipe_path, SETTINGS)
    other = load_recipe(
        recipe_path,
        [*SETTINGS, "train.cache.ray.actors=5", "train.cache.ray.cpus_per_actor=0.5"],
    )
    folders = {name: resolve_folder(spec, fetch=False) for name, spec in plain.bases.items()}
    assert cache_key(plain, folders)[0] == cache_key(other, folders)[0]


def test_address_without_the_ray_engine_is_refused(recipe_path):
    result = CliRunner().invoke(app, ["cache", str(recipe_path), "--address", "auto"])
    assert result.exit_code == 1
    assert "--engine ray" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ray_engine_without_ray_is_one_line(recipe_path, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(CacheError, match=r"needs Ray: pip install -e '\.\[ray\]'"):
        write_cache_ray(load_recipe(recipe_path, [f"train.cache.dir={tmp_path}/c"]))
    assert not (tmp_path / "c").exists()


def test_a_worker_error_is_its_own_line():
    from composer.features.ray_engine import _worker_error

    # As Ray 2.60 carries a worker's exception back: its traceback as text, in colour.
    text = (
        "\x1b[36mray::MapWorker(MapBatches(ShardWriter)).submit()\x1b[39m (pid=1, ip=10.0.0.1)\n"
        '  File "/x/composer/cache.py", line 9, in write_shard\n'
        "composer.errors.CacheError: base 'a' (/x): cannot load: nope\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    assert _worker_error(Exception(text)) == "base 'a' (/x): cannot load: nope"
    assert _worker_error(Exception("ray::X\nOSError: [Errno 28] No space left")) == (
        "OSError: [Errno 28] No space left"
    )

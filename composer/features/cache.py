"""`compose cache`: run the frozen bases once over the data and keep their states on disk.

This is the part of training the paper hands to inference nodes: the bases never take
gradients, so their states can be computed once, stored, and read back at every epoch by a
process that holds no base at all (composer.model.head.CachedMixture).

A cache folder holds `manifest.json` and shards (features.shards). The manifest is keyed by a
hash of everything that decides the states: each base's weights, config, dtype, quantization and
tokenizer, the taps, the anchor's chat template, the data and its split, seq_len and the storage
dtype. It lists every complete shard with its sha256; a shard is written atomically before it
is listed, so a killed run writes only the shards the manifest does not list, and a shard whose
bytes do not match its checksum is refused.

Shard k of a split holds the k-th run of `shard_examples` examples in order of length, and is
computed by one function (`shard_tensors`) whichever engine runs the bases: this process, one
shard after another, or Ray actors (features.ray_engine), which finish shards in any order. Each
split's list in the manifest is kept sorted by file name, so the finished manifest is the same
either way. How the shards are computed is not part of the key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import save_file

from composer.bases.frozen import load_tokenizer, resolve_folder, tokenizer_fingerprint
from composer.bases.identity import base_identity
from composer.bases.lora import adapter_identity
from composer.bases.registry import cache_home
from composer.errors import CacheError
from composer.features.data import Example, collate, load_splits, pad_id
from composer.features.shards import CachedSource, Encoded, encode, pack
from composer.files import (
    atomic_write,
    is_staging,
    lock_now,
    read_json,
    remove_stale,
    sha256_file,
    write_json,
)
from composer.model.factory import check_compatible
from composer.model.mixture import LiveMixture
from composer.progress import counted, status
from composer.recipe import CacheSpec, DataSpec, HfData, MixData, Recipe

FORMAT = 1
# How load_splits draws a recipe's examples; part of the key, so a cache written under an
# older rule is rebuilt. 2: chatterbot pairs distinct, no held-out example equal to a task one.
SPLITS = 2
MANIFEST = "manifest.json"


def features_root() -> Path:
    """Where hash-named caches live: `$COMPOSE_FEATURES_DIR` or `$COMPOSE_HOME/features`."""
    env = os.environ.get("COMPOSE_FEATURES_DIR")
    return Path(env).expanduser() if env else cache_home() / "features"


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _file_identity(data: DataSpec) -> dict[str, str]:
    """The content hash of a source read from local files (a `path`, or an `hf` dataset given
    as a local file or folder): the same path with other contents is other data."""
    path = getattr(data, "path", None)
    if path is not None:
        return {"sha256": sha256_file(Path(path)) if Path(path).is_file() else "missing"}
    if isinstance(data, HfData) and Path(data.dataset).expanduser().exists():
        local = Path(data.dataset).expanduser()
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        return {"sha256": _sha256_files(files)}
    return {}


def _data_identity(data: DataSpec) -> dict[str, Any]:
    identity: dict[str, Any] = data.model_dump(mode="json")
    if isinstance(data, MixData):
        for part, dumped in zip(data.parts, identity["parts"], strict=True):
            dumped["data"] |= _file_identity(part.data)
        return identity
    identity |= _file_identity(data)
    if data.kind == "gsm_symbolic":
        identity["generator"] = f"reasoning-gym {importlib.metadata.version('reasoning-gym')}"
    elif data.kind == "python_stdlib":
        identity["python"] = platform.python_version()
    return identity


def cache_key(recipe: Recipe, folders: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """The hash that names a cache, and the components it hashes (kept to explain a mismatch)."""
    tapped = {t.base for t in recipe.tap_refs} | {recipe.anchor}
    bases = {}
    for name in sorted(tapped):
        base, folder = recipe.bases[name], folders[name]
        bases[name] = {
            **base_identity(folder),
            "dtype": base.dtype,
            "quantization": base.quantization,
            "tokenizer": tokenizer_fingerprint(folder),
        }
        if base.lora is not None:
            bases[name]["lora"] = adapter_identity(base.lora)
    anchor = folders[recipe.anchor]
    templates = [anchor / n for n in ("tokenizer_config.json", "chat_template.jinja")]
    spec = recipe.train
    components = {
        "format": FORMAT,
        "splits": SPLITS,
        "anchor": recipe.anchor,
        "bases": bases,
        "taps": sorted(str(t) for t in recipe.tap_refs),
        "chat_template": _sha256_files([p for p in templates if p.is_file()]),
        "data": _data_identity(spec.data),
        "seq_len": spec.seq_len,
        "eval_fraction": spec.eval_fraction,
        "split_seed": spec.seed,
        "dtype": spec.cache.dtype,
    }
    if spec.preserve is not None:  # absent without preservation: those caches keep their key
        preserve = spec.preserve
        components["preserve"] = {
            "data": _data_identity(preserve.data),
            "eval_fraction": preserve.eval_fraction,
        }
    text = json.dumps(components, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), components


def cache_dir(recipe: Recipe, key: str) -> Path:
    if recipe.train.cache.dir is not None:
        return Path(recipe.train.cache.dir.format(name=recipe.name)).expanduser()
    return features_root() / key[:16]


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return read_json(folder / MANIFEST, FORMAT)
    except ValueError as exc:
        raise CacheError(f"cache {folder}: unreadable {MANIFEST} ({exc})") from exc


def _check_key(folder: Path, manifest: dict[str, Any], key: str, components: dict) -> None:
    if manifest["key"] != key:
        what = ", ".join(_differences(manifest["components"], components)[:4]) or "unknown"
        raise CacheError(
            f"cache {folder} holds the states of another recipe (they differ in: {what}); "
            "remove it or set train.cache.dir to another folder"
        )


def _verify(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed shard is there and its bytes match the manifest's sha256."""
    for shards in manifest["shards"].values():
        for shard in shards:
            path = folder / shard["file"]
            if not path.is_file():
                raise CacheError(f"cache {folder}: shard {shard['file']} is missing")
            if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                raise CacheError(
                    f"cache {folder}: shard {shard['file']} is corrupt (checksum mismatch); "
                    "remove the cache folder and run `compose cache` again"
                )


@dataclass
class FeatureCache:
    """A complete, verified cache that matches its recipe."""

    folder: Path
    manifest: dict[str, Any]
    reused: bool = True
    seconds: float = 0.0  # the engine's time writing shards, when this call wrote some

    def source(self, split_name: str) -> CachedSource:
        return CachedSource([self.folder / s["file"] for s in self.manifest["shards"][split_name]])

    @property
    def examples(self) -> dict[str, int]:
        return dict(self.manifest["examples"])

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for shards in self.manifest["shards"].values() for s in shards)


def open_cache(recipe: Recipe) -> FeatureCache:
    """The recipe's cache, checked (key, completeness, checksums); no base is loaded."""
    folders = {name: resolve_folder(spec, fetch=False) for name, spec in recipe.bases.items()}
    key, components = cache_key(recipe, folders)
    folder = cache_dir(recipe, key)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise CacheError(f"no feature cache at {folder}: run `compose cache` on this recipe first")
    _check_key(folder, manifest, key, components)
    if not manifest["complete"]:
        done = sum(len(shards) for shards in manifest["shards"].values())
        raise CacheError(
            f"cache {folder} is incomplete ({done} of {sum(manifest['planned'].values())} "
            "shards): run `compose cache` on this recipe to finish it"
        )
    _verify(folder, manifest)
    return FeatureCache(folder, manifest)


LOCK = ".lock"


def _check_folder(folder: Path) -> None:
    """A cache is written only into a new or empty folder, or one holding a compose cache
    (its manifest): never among a user's own files, which it would mix with its own."""
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"cache folder {folder} is a file; set train.cache.dir to a folder")
    if not folder.is_dir() or (folder / MANIFEST).is_file():
        return
    # the lock and the temp files of a run killed before it wrote the manifest are compose's
    other = sorted(p.name for p in folder.iterdir() if p.name != LOCK and not is_staging(p.name))
    if other:
        raise CacheError(
            f"cache folder {folder} holds files compose did not write ({other[0]!r}"
            f"{f' and {len(other) - 1} more' if len(other) > 1 else ''}) and no {MANIFEST}; "
            "set train.cache.dir to a new or empty folder"
        )


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_now(
        folder / LOCK, CacheError(f"cache {folder} is being written by another process")
    )
    try:
        yield
    finally:
        lock.release()
        if [p.name for p in folder.iterdir()] == [LOCK]:  # failed before writing anything
            (folder / LOCK).unlink()
            if created:
                folder.rmdir()


@dataclass(frozen=True)
class ShardJob:
    """Shard k of a split: the examples at positions `members` of the split, shortest first."""

    split: str
    k: int
    members: list[int]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.k:05d}.safetensors"


def plan_shards(parts: dict[str, list[Example]], per_shard: int) -> list[ShardJob]:
    """Every shard of a cache, split by split (train, eval, then preservation's), each cut into
    runs of `per_shard`."""
    jobs = []
    for split_name, examples in parts.items():
        # Similar lengths together, so little of each forward is spent on padding.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        starts = range(0, len(order), per_shard)
        jobs += [ShardJob(split_name, k, order[s : s + per_shard]) for k, s in enumerate(starts)]
    return jobs


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside, restored after.

    A CPU forward's floats depend on how many threads split its kernels, so the engines fix it
    rather than inherit it from the process (all cores, `OMP_NUM_THREADS`, a Ray actor's CPUs).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def shard_tensors(
    mixture: LiveMixture,
    examples: Sequence[Example],
    members: Sequence[int],
    spec: CacheSpec,
    pad_id: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Encoded]]:
    """One shard's tensors: `examples` (at positions `members` of their split) through the bases.

    The forwards take `spec.batch_size` examples at a time in the given order, on
    `spec.threads` torch threads; every engine computes shards with this function, so every
    engine stores the same floats. `on_batch(examples, tokens)` is called after each forward.
    """
    encoded: list[Encoded] = []
    with torch_threads(spec.threads):
        for start in range(0, len(examples), spec.batch_size):
            chunk = examples[start : start + spec.batch_size]
            batch = collate(list(chunk), pad_id)
            features = mixture.features(batch["input_ids"], batch["attention_mask"])
            indices = members[start : start + spec.batch_size]
            for row, (i, example) in enumerate(zip(indices, chunk, strict=True)):
                encoded.append(encode(i, example, features, row, spec.dtype))
            if on_batch is not None:
                on_batch(len(chunk), int(batch["attention_mask"].sum()))
    return pack(encoded), encoded


def write_shard(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], encoded: list[Encoded]
) -> dict[str, Any]:
    """Write a shard atomically into `folder`; its manifest record."""
    path = folder / name
    _write_shard(path, tensors)
    return {
        "file": name,
        "examples": len(encoded),
        "tokens": sum(len(e.example.input_ids) for e in encoded),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), {"format": "compose-features"}))


@dataclass
class CacheRun:
    """An incomplete cache, and what an engine needs to write the shards it does not list."""

    recipe: Recipe
    folders: dict[str, Path]  # each base's resolved folder
    parts: dict[str, list[Example]]
    folder: Path
    manifest: dict[str, Any]
    pad_id: int

    def pending(self) -> list[ShardJob]:
        """The planned shards not listed yet: after a run killed midway, any subset of them."""
        listed = {s["file"] for shards in self.manifest["shards"].values() for s in shards}
        jobs = plan_shards(self.parts, self.manifest["shard_examples"])
        return [job for job in jobs if job.name not in listed]

    def list_shard(self, split_name: str, record: dict[str, Any]) -> None:
        """List a shard that is on disk; sorted by file name, so shards may finish in any order."""
        listed = self.manifest["shards"][split_name]
        listed.append(record)
        listed.sort(key=lambda s: (len(s["file"]), s["file"]))  # index order past 99999 too
        write_json(self.folder / MANIFEST, self.manifest)


ShardWriter = Callable[[CacheRun, Console], float]  # writes the missing shards, returns seconds


@contextmanager
def cache_progress(console: Console, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of examples done out of `total`; yields advance(examples, tokens)."""
    speed = "{task.fields[speed]} tok/s"
    with counted("cache", speed, unit="examples", console=console) as progress:
        task = progress.add_task("cache", total=total, speed="-")
        done, began = 0, time.perf_counter()

        def advance(examples: int, tokens: int) -> None:
            nonlocal done
            done += tokens
            speed = done / max(time.perf_counter() - began, 1e-9)
            progress.update(task, advance=examples, speed=f"{speed:,.0f}")

        yield advance


def write_cache(
    recipe: Recipe, *, console: Console | None = None, engine: ShardWriter | None = None
) -> FeatureCache:
    """Reuse the recipe's cache when complete, else compute it (resuming a partial one).

    `engine(run, console)` writes the missing shards and returns the seconds it spent on them;
    by default the bases run here, one shard after another (features.ray_engine has another).
    """
    folders = {name: resolve_folder(spec, fetch=True) for name, spec in recipe.bases.items()}
    check_compatible(recipe, folders)  # before anything is written
    key, components = cache_key(recipe, folders)
    folder = cache_dir(recipe, key)
    manifest = _read_manifest(folder)
    if manifest is not None:
        _check_key(folder, manifest, key, components)
        if manifest["complete"]:
            _verify(folder, manifest)
            return FeatureCache(folder, manifest)
    _check_folder(folder)
    console = console or Console(stderr=True)
    spec = recipe.train
    with _locked(folder):
        manifest = _read_manifest(folder)  # again: another writer may have finished it
        if manifest is not None and manifest["complete"]:
            _verify(folder, manifest)
            return FeatureCache(folder, manifest)
        remove_stale(folder)  # half-written files of a killed run
        with status("reading data", console=console):
            anchor = recipe.anchor
            tokenizer = load_tokenizer(anchor, recipe.bases[anchor], folders[anchor])
            parts = load_splits(recipe, tokenizer)
        per_shard = manifest["shard_examples"] if manifest else spec.cache.shard_examples
        planned = {s: -(-len(parts[s]) // per_shard) for s in parts}
        if manifest is None or manifest["planned"] != planned:
            manifest = {
                "format": FORMAT,
                "key": key,
                "components": components,
                "dtype": spec.cache.dtype,
                "shard_examples": per_shard,
                "examples": {s: len(parts[s]) for s in parts},
                "planned": planned,
                "shards": {s: [] for s in parts},
                "complete": False,
            }
            write_json(folder / MANIFEST, manifest)
        _verify(folder, manifest)
        run = CacheRun(recipe, folders, parts, folder, manifest, pad_id(tokenizer))
        seconds = (engine or _run_bases)(run, console) if run.pending() else 0.0
        manifest["complete"] = True
        write_json(folder / MANIFEST, manifest)
    return FeatureCache(folder, manifest, reused=False, seconds=seconds)


def _run_bases(run: CacheRun, console: Console) -> float:
    """The local engine: load the bases in this process, write the pending shards in order."""
    cache = run.recipe.train.cache
    with status("loading bases", console=console):
        mixture = LiveMixture.from_recipe(run.recipe, fetch=True, seed=run.recipe.train.seed)
    jobs = run.pending()
    began = time.perf_counter()
    with cache_progress(console, sum(len(job.members) for job in jobs)) as advance:
        for job in jobs:
            examples = [run.parts[job.split][i] for i in job.members]
            tensors, encoded = shard_tensors(
                mixture, examples, job.members, cache, run.pad_id, advance
            )
            run.list_shard(job.split, write_shard(run.folder, job.name, tensors, encoded))
    return time.perf_counter() - began

"""`compose cache --engine ray`: the bases run in a pool of Ray actors, a whole shard per call.

The driver (this process) reads and splits the data as the local engine does and loads no base.
It hands Ray Data one row per shard still to write: the split, the shard's number, the positions
of its examples and the examples themselves (token ids, labels), so workers never read the data.
Each actor loads the bases once (`LiveMixture.from_recipe` on the recipe the driver sends as JSON,
validated again), computes a shard with the local engine's own function
(features.cache.shard_tensors: the same forwards in the same order, on `train.cache.threads`
torch threads, so the same floats), writes it atomically into the cache folder and returns its
manifest record. The driver is the only writer of manifest.json: it lists each shard as its
record arrives, whatever the order.

Workers write the shards themselves and load the bases from the folders the driver resolved
(each base is pinned to its folder, so workers need neither the card registry nor a pull): on a
cluster of several machines, the cache folder and the bases' folders must be on a filesystem
every node can read and write at the same path (NFS, Lustre, ...). On one machine nothing more
is needed. Without an address a local Ray instance is started for the run and shut down after
it; in a process where Ray is already initialized, that instance is used and left running.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from composer.errors import CacheError, first_line
from composer.features.cache import (
    CacheRun,
    FeatureCache,
    ShardJob,
    cache_progress,
    shard_tensors,
    write_shard,
)
from composer.features.cache import write_cache as write_with
from composer.features.data import Example
from composer.model.mixture import LiveMixture
from composer.progress import status
from composer.recipe import RaySpec, Recipe, recipe_from_dict

RECORD = ("split", "file", "examples", "tokens", "bytes", "sha256")


def require_ray() -> Any:
    """The `ray` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise CacheError("the ray engine needs Ray: pip install -e '.[ray]'") from None
    return ray


def write_cache(
    recipe: Recipe, *, address: str | None = None, console: Console | None = None
) -> FeatureCache:
    """composer.features.cache.write_cache with the bases in Ray actors on the cluster at `address`.

    Without `address`, a local Ray instance with this machine's cores runs them.
    """
    require_ray()
    return write_with(recipe, console=console, engine=functools.partial(_run, address=address))


def pinned_recipe(recipe: Recipe, folders: dict[str, Path]) -> str:
    """The recipe as JSON, each base pinned to the absolute folder the driver resolved."""
    data = recipe.model_dump(mode="json")
    for name, base in data["bases"].items():
        base.update(card=None, path=str(folders[name].expanduser().resolve()))
        if base["lora"] is not None:
            base["lora"] = str(Path(base["lora"]).expanduser().resolve())
    return json.dumps(data)


class ShardWriter:
    """A Ray actor: loads the bases once, then computes and writes each shard it is given."""

    def __init__(self, recipe_json: str, folder: str, pad_id: int) -> None:
        recipe = recipe_from_dict(json.loads(recipe_json), "the recipe sent by the driver")
        self.cache = recipe.train.cache
        self.mixture = LiveMixture.from_recipe(recipe, fetch=False, seed=recipe.train.seed)
        self.folder = Path(folder)
        self.pad_id = pad_id

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        """A pyarrow table of shard rows -> their manifest records, with their split."""
        records = []
        for row in batch.to_pylist():
            examples = [
                Example(input_ids=ids, labels=labels, domain=domain)
                for ids, labels, domain in zip(
                    row["input_ids"], row["labels"], row["domains"], strict=True
                )
            ]
            job = ShardJob(row["split"], row["k"], row["members"])
            tensors, encoded = shard_tensors(
                self.mixture, examples, job.members, self.cache, self.pad_id
            )
            record = write_shard(self.folder, job.name, tensors, encoded)
            records.append({"split": job.split, **record})
        return {key: [r[key] for r in records] for key in RECORD}


def _row(run: CacheRun, job: ShardJob) -> dict[str, Any]:
    examples = [run.parts[job.split][i] for i in job.members]
    return {
        "split": job.split,
        "k": job.k,
        "members": job.members,
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "domains": [e.domain for e in examples],
    }


def _run(run: CacheRun, console: Console, *, address: str | None) -> float:
    """The Ray engine: every pending shard through the actor pool; the driver lists them."""
    ray = require_ray()
    settings = run.recipe.train.cache.ray
    jobs = run.pending()
    with _quiet(), status("starting Ray", console=console):
        started = _connect(ray, address, settings)
    try:
        with _quiet():
            began = time.perf_counter()
            rows = [_row(run, job) for job in jobs]
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                ShardWriter,
                batch_size=1,
                batch_format="pyarrow",
                # One shard in flight per actor: a shard queued behind a busy actor would wait
                # while another actor is idle.
                compute=ray.data.ActorPoolStrategy(
                    size=min(settings.actors, len(rows)), max_tasks_in_flight_per_actor=1
                ),
                fn_constructor_kwargs={
                    "recipe_json": pinned_recipe(run.recipe, run.folders),
                    "folder": str(run.folder.resolve()),
                    "pad_id": run.pad_id,
                },
                num_cpus=settings.cpus_per_actor,
                num_gpus=settings.gpus_per_actor,
            )
            with cache_progress(console, sum(len(job.members) for job in jobs)) as advance:
                for row in dataset.iter_rows():
                    record = {key: _plain(row[key]) for key in RECORD[1:]}
                    run.list_shard(str(row["split"]), record)
                    advance(record["examples"], record["tokens"])
            return time.perf_counter() - began
    except ray.exceptions.RayError as exc:
        raise CacheError(f"a Ray worker failed: {_worker_error(exc)}") from exc
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str | None, settings: RaySpec) -> bool:
    """Connect to Ray (the cluster at `address`, else a new local instance); True if started."""
    if ray.is_initialized():
        return False
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CacheError(f"cannot connect to Ray at {address}: {first_line(exc)}") from exc
        return False
    cores = os.cpu_count() or 1
    _check_fits(settings, "CPU", settings.cpus_per_actor, cores)
    # ERROR: a new local instance's start-up warnings (token authentication) are not ours.
    ray.init(
        num_cpus=cores,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        ignore_reinit_error=True,
    )
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        _check_fits(settings, "GPU", settings.gpus_per_actor, gpus)
    except CacheError:
        ray.shutdown()
        raise
    return True


def _check_fits(settings: RaySpec, kind: str, per_actor: float, available: float) -> None:
    """A local pool that cannot start would wait for ever: refuse it instead."""
    if settings.actors * per_actor > available:
        raise CacheError(
            f"train.cache.ray asks for {settings.actors} actors x {per_actor:g} {kind}s, this "
            f"machine has {available:g}: lower train.cache.ray.actors or {kind.lower()}s_per_actor"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Ray Data's progress bars and execution logs off the terminal (they go to its log files)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = {
        name: getattr(context, name)
        for name in ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")
    }
    for name in saved:
        setattr(context, name, False)
    # Ray Data warns that its progress bars are off: ours is on.
    levels = {"ray": logging.WARNING, "ray.data": logging.WARNING}
    levels["ray.data._internal.progress"] = logging.ERROR
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    saved_levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        for logger, level in saved_levels.items():
            logger.setLevel(level)


def _plain(value: Any) -> Any:
    """A numpy scalar from a Ray row as the Python int or str the manifest holds."""
    return value.item() if hasattr(value, "item") else value


def _worker_error(exc: BaseException) -> str:
    """The error a worker raised, from the traceback text Ray carries back (not the object)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours the worker's name
    for line in text.splitlines():
        found = re.match(r"([\w.]+\.)?(\w+(?:Error|Exception)): (.+)", line.strip())
        if found and not (found[1] or "").startswith("ray."):
            composer_error = (found[1] or "").startswith("composer.")
            return found[3] if composer_error else f"{found[2]}: {found[3]}"
    return first_line(exc, text)

"""Cache-phase throughput: the local engine against Ray Data with 1 and 2 actors.

Run by hand (not in CI), with the recipe's bases pulled and the `ray` extra installed:

    pip install -e '.[ray]'
    python bench/cache_scale.py [--recipe recipes/demo.yaml] [--size 64] [--actors 1 2]
                                [--cores N] [key=value ...]

Each arm runs `write_cache` on the same recipe (`train.data.size=SIZE` and the overrides) in a
fresh process, into its own fresh temporary cache folder, and gets the whole machine: the local
engine runs with `--cores` torch threads, Ray with A actors of `--cores / A` CPUs each (a local
Ray instance started by the arm). Reported per arm: anchor tokens/s over the engine's own time
(local: the forwards only; Ray: from submitting the shards to the last record, so actor start-up
and each actor's base loading are in it) and over the wall time of the whole call (data, bases,
Ray start-up), each with its ratio to the local engine, and whether the arm's shards are
byte-identical to the local engine's (their sha256s in the manifest; they are when both ran on
the same number of threads, `train.cache.threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(args: argparse.Namespace) -> None:
    from composer.recipe import load_recipe

    overrides = [*args.overrides, f"train.cache.dir={args.dir}"]
    if args.arm == "local":
        overrides.append(f"train.cache.threads={args.cores}")
        from composer.features.cache import write_cache
    else:
        per_actor = max(1, args.cores // args.actors_n)
        overrides += [
            f"train.cache.threads={per_actor}",
            f"train.cache.ray.actors={args.actors_n}",
            f"train.cache.ray.cpus_per_actor={per_actor}",
        ]
        from composer.features.ray_engine import write_cache
    recipe = load_recipe(args.recipe, overrides)
    began = time.perf_counter()
    cache = write_cache(recipe)
    wall = time.perf_counter() - began
    assert not cache.reused, "a fresh folder was expected"
    shards = [s["sha256"] for split in ("train", "eval") for s in cache.manifest["shards"][split]]
    result = {"tokens": cache.tokens, "seconds": cache.seconds, "wall": wall, "shards": shards}
    print(json.dumps(result))


def spawn(arm: str, actors: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    folder = tmp / f"{arm}-{actors}"
    cmd = [sys.executable, __file__, "--arm", arm, "--actors-n", str(actors)]
    cmd += ["--recipe", str(args.recipe), "--cores", str(args.cores), "--dir", str(folder)]
    cmd += [f"train.data.size={args.size}", *args.overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} ({actors} actors) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--size", type=int, default=64, help="train.data.size (examples)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Ray arms")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="CPUs each arm may use"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.seq_len=256")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--actors-n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args)
        return
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores, arms use {args.cores}")
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"local": spawn("local", 1, args, Path(tmp))}
        for n in args.actors:
            arms[f"ray, {n} actor{'s' if n > 1 else ''}"] = spawn("ray", n, args, Path(tmp))
    base = arms["local"]
    print(f"\n## {args.recipe} (train.data.size={args.size}): {base['tokens']:,} anchor tokens")
    print(
        "| arm | engine s | tok/s | vs local | wall s | tok/s (wall) | vs local | same shards |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|"
    )
    for name, arm in arms.items():
        rate, wall_rate = arm["tokens"] / arm["seconds"], arm["tokens"] / arm["wall"]
        ratio = rate / (base["tokens"] / base["seconds"])
        wall_ratio = wall_rate / (base["tokens"] / base["wall"])
        same = "yes" if arm["shards"] == base["shards"] else "NO"
        print(
            f"| {name} | {arm['seconds']:.1f} | {rate:,.0f} | {ratio:.2f} | {arm['wall']:.1f} "
            f"| {wall_rate:,.0f} | {wall_ratio:.2f} | {same} |"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

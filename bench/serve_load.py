"""Load on `compose serve`: one mixture and many over the same base, continuous batching
against batch-at-once, in one run.

Run by hand (not in CI), with the `serve` extra and the `openai` client installed:

    pip install -e '.[serve]' openai psutil
    python bench/serve_load.py --recipe recipes/demo.yaml [--mixtures 8] [--clients 8]
                               [--requests 3] [--max-tokens 48] [--json out.json]
    python bench/serve_load.py MIXTURE_DIR [MIXTURE_DIR ...]   # mixtures already built

With `--recipe`, the bench writes `--mixtures` mixture folders over the recipe's bases (its
carry-on, randomly perturbed so that each mixture answers differently; no training), in
float32 unless `--dtype` says otherwise: one answer batched must equal it alone, which bf16
holds only up to rounding. Then, each time starting `compose serve` on a free local port in
its own process and stopping it after:

  (a) one mixture, `--clients` clients (continuous batching);
  (b) all the mixtures over the same base(s) (one copy of each), the same clients, each
      request for the next mixture in turn;
  (c) one mixture, batch-at-once (`compose serve --batch-at-once`: today's batching), the
      same clients.

Each client (a thread, the real `openai` client, `max_retries=0`) sends `--requests` streamed
chat completions sampled at temperature 0.8 with a seed per request. Reported per load:
completion tokens/s over the clients' wall time, latency p50/p95 (request to last token),
time to first token p50/p95, errors by kind, requests lost (neither answered nor failed), the
server's RSS once loaded, and how many answers differ from the same request sent alone (to
the same server, one at a time, after the load). The report ends with the ratios against the
targets, all from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

PROMPTS = [
    "How many days does a carpenter work in a year?",
    "Write a short line about the sea.",
    "What is 6 * 2?",
    "Explain what a carry-on model is in one sentence.",
]
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_up(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        if process.poll() is not None:
            sys.exit(f"compose serve exited with {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit("compose serve did not come up in time")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.2)


def one_request(client: Any, model: str, index: int, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    tokens = 0
    text = ""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=index,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {
        "key": (model, index),
        "text": text,
        "latency": latency,
        "ttft": first if first is not None else latency,
        "tokens": tokens,
    }


def client_thread(
    args: argparse.Namespace, url: str, models: list[str], k: int, results: list[Any]
) -> None:
    import openai

    client = openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout
    )
    for r in range(args.requests):
        index = k * args.requests + r
        model = models[index % len(models)]
        try:
            results.append(one_request(client, model, index, args.max_tokens))
        except openai.APIStatusError as exc:
            results.append({"error": f"HTTP {exc.status_code}"})
        except openai.APITimeoutError:
            results.append({"error": "hung (timeout)"})
        except Exception as exc:
            results.append({"error": type(exc).__name__})


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def run_load(
    args: argparse.Namespace,
    label: str,
    dirs: list[Path],
    *,
    continuous: bool,
    alone: dict[Any, str],
) -> dict[str, Any]:
    """Start `compose serve DIRS`, run the clients against it, send each request not yet in
    `alone` once more alone (filling it), stop the server; the report."""
    import openai
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "composer", "serve", *map(str, dirs)]
    command += ["--port", str(port), "--max-queue", str(args.clients)]
    command += ["--batch", str(args.clients)]
    command += ["--continuous" if continuous else "--batch-at-once"]
    env = {**os.environ, "COMPOSE_API_KEY": ""}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + args.deadline
    try:
        wait_up(url, server, deadline)
        rss_loaded = psutil.Process(server.pid).memory_info().rss
        cards = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]
        models = [card["id"] for card in cards]
        results: list[dict[str, Any]] = []
        threads = [
            threading.Thread(
                target=client_thread, args=(args, url, models, k, results), daemon=True
            )
            for k in range(args.clients)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        wall = time.perf_counter() - start
        alive = sum(t.is_alive() for t in threads)
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        rss_after = psutil.Process(server.pid).memory_info().rss
        done = [r for r in results if "error" not in r]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for r in done:  # the same request alone: the reference its answer must equal
            if r["key"] not in alone:
                model, index = r["key"]
                alone[r["key"]] = one_request(client, model, index, args.max_tokens)["text"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = sorted(r["latency"] for r in done)
    ttfts = sorted(r["ttft"] for r in done)
    sent = args.clients * args.requests
    tokens = sum(r["tokens"] for r in done)
    return {
        "load": label,
        "mixtures": len(models),
        "continuous": continuous,
        "largest_batch": health.get("largest_batch"),
        "clients": args.clients,
        "requests": sent,
        "max_tokens": args.max_tokens,
        "ok": len(done),
        "errors": dict(Counter(r["error"] for r in results if "error" in r)),
        "lost": sent - len(results),  # neither answered nor failed: must be 0
        "clients_still_running": alive,
        "differ_from_alone": sum(r["text"] != alone[r["key"]] for r in done),
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)},
        "ttft_s": {"p50": percentile(ttfts, 50), "p95": percentile(ttfts, 95)},
        "rss_mb": {"loaded": round(rss_loaded / MB, 1), "after": round(rss_after / MB, 1)},
    }


def write_mixtures(recipe_path: Path, n: int, dtype: str | None, root: Path) -> list[Path]:
    """`n` mixture folders over the recipe's bases: its carry-on, perturbed per mixture."""
    import torch

    from composer.model.mixture import LiveMixture
    from composer.model.weights import RECIPE_FILE, WEIGHTS, save_weights
    from composer.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if dtype is not None:
        bases = {k: v.model_copy(update={"dtype": dtype}) for k, v in recipe.bases.items()}
        recipe = recipe.model_copy(update={"bases": bases})
    mixture = LiveMixture.from_recipe(recipe)
    fresh = {k: v.clone() for k, v in mixture.carry_on.state_dict().items()}
    dirs = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        mixture.carry_on.load_state_dict(fresh)
        with torch.no_grad():
            for p in mixture.carry_on.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        out = root / f"{recipe.name}-{i}"
        out.mkdir(parents=True)
        named = recipe.model_copy(update={"name": f"{recipe.name}-{i}"})
        (out / RECIPE_FILE).write_text(named.to_yaml())
        save_weights(out / WEIGHTS, mixture.carry_on)
        dirs.append(out)
    return dirs


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mixture_dirs", type=Path, nargs="*")
    parser.add_argument("--recipe", type=Path, default=None, help="write mixtures over it")
    parser.add_argument("--mixtures", type=int, default=8, help="with --recipe")
    parser.add_argument("--dtype", default="float32", help="with --recipe: the bases' dtype")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="per client")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request (s)")
    parser.add_argument("--deadline", type=float, default=600.0, help="each load (s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dirs = list(args.mixture_dirs)
        if args.recipe is not None:
            dirs += write_mixtures(args.recipe, args.mixtures, args.dtype, Path(tmp))
        if len(dirs) < 2:
            sys.exit("give several mixture folders, or --recipe")
        one: dict[Any, str] = {}
        many: dict[Any, str] = {}
        a = run_load(args, "a: one mixture", dirs[:1], continuous=True, alone=one)
        b = run_load(args, "b: all mixtures", dirs, continuous=True, alone=many)
        c = run_load(args, "c: one mixture, batch-at-once", dirs[:1], continuous=False, alone=one)
        carry_on_mb = statistics.mean(
            (d / "carry_on.safetensors").stat().st_size / MB for d in dirs
        )
    per_mixture = (b["rss_mb"]["loaded"] - a["rss_mb"]["loaded"]) / (len(dirs) - 1)
    report: dict[str, Any] = {
        "runs": [a, b, c],
        "ratios": {
            "b_over_a_tokens_per_s": {
                "value": ratio(b["tokens_per_s"], a["tokens_per_s"]),
                "target": ">= 0.8",
            },
            "memory_per_added_mixture_mb": {
                "value": round(per_mixture, 1),
                "target": f"<= {1.2 * carry_on_mb + 20:.1f} (1.2 x carry-on "
                f"{carry_on_mb:.1f} MB + 20 MB)",
            },
            "continuous_over_batch_at_once_tokens_per_s": {
                "value": ratio(a["tokens_per_s"], c["tokens_per_s"]),
                "target": ">= 1.5",
            },
            "continuous_over_batch_at_once_latency_p95": {
                "value": ratio(a["latency_s"]["p95"], c["latency_s"]["p95"]),
                "target": "<= 0.7",
            },
            "continuous_over_batch_at_once_ttft_p95": {
                "value": ratio(a["ttft_s"]["p95"], c["ttft_s"]["p95"]),
                "target": "<= 0.5",
            },
            "lost_or_failed": sum(r["lost"] + sum(r["errors"].values()) for r in (a, b, c)),
            "differ_from_alone": sum(r["differ_from_alone"] for r in (a, b, c)),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Load on `compose serve`: N concurrent clients, each sending R streamed chat completions.

Run by hand (not in CI), with the `serve` extra and the `openai` client installed:

    pip install -e '.[serve]' openai
    python bench/serve_load.py MIXTURE_DIR [--clients 8] [--requests 4] [--max-tokens 64]
                                           [--max-queue Q] [--batch 1 4] [--timeout 120]
                                           [--json out.json]

The bench starts `compose serve MIXTURE_DIR` on a free local port in its own process, waits
for /health, runs the clients (threads, the real `openai` client, `max_retries=0`, sampled at
temperature 0.8 with a seed per request) and stops the server. Every request ends within
`--timeout` seconds or counts as hung; the bench itself gives up after `--deadline` seconds.
Reported: completion tokens/s over the wall time of the clients, latency p50/p95 (request to
last token) and time to first token p50/p95, and the errors by kind (503s: the queue was full).
With `--max-queue` below the number of clients, some requests are expected to get 503.
With several `--batch` values the server is started once per value (`compose serve --batch`,
waiting requests decoded together), the same load each time, and the report ends with each
value's tokens/s and latency against the first value's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
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
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def client_thread(args: argparse.Namespace, url: str, k: int, results: list[Any]) -> None:
    import openai

    client = openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout
    )
    for r in range(args.requests):
        try:
            results.append(one_request(client, args.model, k * args.requests + r, args.max_tokens))
        except openai.APIStatusError as exc:
            results.append({"error": f"HTTP {exc.status_code}"})
        except openai.APITimeoutError:
            results.append({"error": "hung (timeout)"})
        except Exception as exc:
            results.append({"error": type(exc).__name__})


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def run_load(args: argparse.Namespace, batch: int, deadline: float) -> dict[str, Any]:
    """Start `compose serve --batch BATCH`, run the clients against it, stop it; the report."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queue = args.max_queue if args.max_queue is not None else args.clients
    command = [sys.executable, "-m", "composer", "serve", str(args.mixture_dir)]
    command += ["--port", str(port), "--max-queue", str(queue), "--batch", str(batch)]
    env = {**os.environ, "COMPOSE_API_KEY": ""}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_up(url, server, deadline)
        args.model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
        results: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=client_thread, args=(args, url, k, results), daemon=True)
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
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    done = [r for r in results if "error" not in r]
    latencies = sorted(r["latency"] for r in done)
    ttfts = sorted(r["ttft"] for r in done)
    sent = args.clients * args.requests
    return {
        "mixture": str(args.mixture_dir),
        "batch": batch,
        "largest_batch": health.get("largest_batch"),
        "clients": args.clients,
        "requests": sent,
        "max_tokens": args.max_tokens,
        "max_queue": queue,
        "ok": len(done),
        "errors": dict(Counter(r["error"] for r in results if "error" in r)),
        "lost": sent - len(results),  # neither answered nor failed: must be 0
        "clients_still_running": alive,
        "wall_s": round(wall, 2),
        "completion_tokens": sum(r["tokens"] for r in done),
        "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 2) if wall else None,
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)},
        "ttft_s": {"p50": percentile(ttfts, 50), "p95": percentile(ttfts, 95)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mixture_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=None, help="default: --clients")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1, 4], help="compose serve --batch values"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    parser.add_argument("--deadline", type=float, default=900.0, help="each load (s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    runs = [run_load(args, b, time.monotonic() + args.deadline) for b in args.batch]
    report: dict[str, Any] = {"runs": runs}
    first = runs[0]
    if len(runs) > 1 and first["tokens_per_s"] and first["latency_s"]["p50"]:
        report["against_batch_" + str(first["batch"])] = {
            str(r["batch"]): {
                "tokens_per_s": round((r["tokens_per_s"] or 0) / first["tokens_per_s"], 3),
                "latency_p50": round((r["latency_s"]["p50"] or 0) / first["latency_s"]["p50"], 3),
            }
            for r in runs[1:]
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

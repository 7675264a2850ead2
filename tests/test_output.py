"""What `compose` prints where nobody watches a terminal: tables piped or in a narrow window keep
every name and path whole, `--json` gives scripts the same facts, and long phases leave plain
progress lines in a log."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_yaml
from rich.console import Console
from typer.testing import CliRunner

from cli import app
from composer.progress import INTERVAL_ENV

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


# --- tables -------------------------------------------------------------------------------------


@pytest.fixture()
def long_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Two pulled cards whose names and folders are far wider than a narrow terminal."""
    cards = tmp_path / "cards"
    cards.mkdir()
    found = {}
    for name in ("an-unusually-long-base-card-name-1.5b-instruct", "another-long-name-0.5b-base"):
        folder = tmp_path / "models" / f"{name}-folder-with-a-long-name" / "snapshot"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (cards / f"{name}.yaml").write_text(
            f"name: {name}\nrole: chat\nfamily: llama\nsource: {{kind: folder, path: {folder}}}\n"
        )
        found[name] = folder
    monkeypatch.setenv("COMPOSE_BASES_DIR", str(cards))
    return found


@pytest.mark.parametrize("columns", ["60", None], ids=["COLUMNS=60", "piped"])
def test_bases_list_keeps_every_name_and_path_whole(long_cards, columns):
    from composer.bases import pull, registry

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    listed = subprocess.run(
        [sys.executable, "-m", "composer", "bases", "list"],
        capture_output=True,  # stdout is a pipe, not a terminal
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    ).stdout
    cards = registry.list_cards()
    assert set(long_cards) <= set(cards)
    for card in cards.values():
        assert card.name in listed
        where = pull.local_dir(card)
        if where is not None:
            assert str(where) in listed
    assert "…" not in listed


def test_bases_list_json_matches_the_cards(long_cards):
    from composer.bases import pull, registry

    rows = json.loads(_invoke("bases", "list", "--json").stdout)
    cards = registry.list_cards()
    assert [row["name"] for row in rows] == list(cards)
    for row in rows:
        card = cards[row["name"]]
        where = pull.local_dir(card)
        assert row["pulled"] == (str(where) if where else None)
        assert (row["role"], row["family"], row["source"]) == (
            card.role,
            card.family,
            card.source.kind,
        )
    assert {row["name"]: row["pulled"] for row in rows if row["name"] in long_cards} == {
        name: str(folder) for name, folder in long_cards.items()
    }


# --- progress lines and --json on a tiny build ----------------------------------------------------

COUNT = r"(\d+)/(\d+)"
DONE = r"done in \d+:\d\d:\d\d"


def _lines(text: str, label: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{label}  ")]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """A tiny build run as `compose build RECIPE --json > out 2> log` would run it, with the
    progress interval at 0: every update prints its line."""
    root = tmp_path_factory.mktemp("logged")
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))
    out = root / "mix"
    args = ["build", recipe, "--out", out, "--json", "--steps", "3", "train.eval_every=3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INTERVAL_ENV, "0")
        patch.setenv("COMPOSE_FEATURES_DIR", str(root / "features"))
        result = _invoke(*args)
    return {"recipe": recipe, "out": out, "stdout": result.stdout, "log": result.stderr}


def test_build_json_is_the_whole_of_stdout(built):
    report = json.loads(built["stdout"])
    metrics = json.loads((built["out"] / "metrics.json").read_text())
    assert report == {"out_dir": str(built["out"]), "warning": None, "metrics": metrics}


def test_a_logged_build_prints_cache_and_training_progress(built):
    """Off a terminal, cache and training print plain lines on stderr: done/total, the rate,
    the time left and, in training, the running loss."""
    log = built["log"]
    cache = _lines(log, "cache")
    first = re.fullmatch(r"cache  0/(\d+) examples  started", cache[0])
    assert first, cache
    total = int(first.group(1))
    assert total > 24 and len(cache) >= 3  # task and general-text examples, train and eval
    counts = []
    for line in cache[1:]:
        match = re.match(rf"cache  {COUNT} examples  [\d.,]+ examples/s  (eta|{DONE})", line)
        assert match and line.endswith(" tok/s"), line
        counts.append(int(match.group(1)))
    assert counts == sorted(counts) and counts[-1] == total
    assert re.search(DONE, cache[-1]) and "eta" not in cache[-1]

    train = _lines(log, "train")
    assert train[0] == "train  0/3 steps  started"
    steps = [re.match(rf"train  {COUNT} steps  [\d.,]+ steps/s  (eta \d|{DONE})", t) for t in train]
    assert [int(m.group(1)) for m in steps[1:] if m] == [1, 2, 3], train
    losses = [float(re.search(r"  loss (\d+\.\d{4})  ", t).group(1)) for t in train[1:]]
    metrics = json.loads((built["out"] / "metrics.json").read_text())
    assert losses[0] == pytest.approx(metrics["train_loss_first"], abs=1e-4)
    assert losses[-1] == pytest.approx(metrics["train_loss_last"], abs=1e-4)
    assert re.search(DONE, train[-1])


def test_a_logged_wait_prints_a_line_when_it_starts_and_when_it_ends(built):
    loading = _lines(built["log"], "loading bases")
    assert loading[0] == "loading bases  started"
    assert re.fullmatch(rf"loading bases  {DONE}", loading[-1])


def test_a_short_phase_at_the_default_interval_prints_its_first_and_last_line(built, tmp_path):
    """`compose compare ... --json`: the JSON on stdout, and on stderr each side's counted
    phase in two lines, begun and done; a wait shorter than the interval prints nothing."""
    mix = built["out"]
    report = tmp_path / "report"
    args = ["compare", mix, mix, "--suite", "loss-code", "--limit", "2", "--out", report]
    result = _invoke(*args, "--cache-dir", tmp_path / "results", "--json")
    first, last = _lines(result.stderr, "A loss-code")
    assert first == "A loss-code  0/2 items  started"
    assert re.fullmatch(rf"A loss-code  2/2 items  [\d.,]+ items/s  {DONE}", last)
    assert not _lines(result.stderr, "resolving both sides")
    summary = json.loads(result.stdout)
    assert summary["out_dir"] == str(report)
    assert summary["computed"] == {"A": 2, "B": 0}  # B is the same mixture: A's results
    suite = summary["suites"]["loss-code"]
    assert "items" not in suite and suite["comparison"]["n"] == 2
    written = json.loads((report / "report.json").read_text())
    assert suite["comparison"] == written["suites"]["loss-code"]["comparison"]


def test_cache_train_export_and_port_json(built, tiny, tmp_path, monkeypatch):
    features = built["recipe"].parent / "features"
    monkeypatch.setenv("COMPOSE_FEATURES_DIR", str(features))
    cached = json.loads(_invoke("cache", built["recipe"], "--json").stdout)
    assert cached["reused"] is True and cached["examples"]["train"] > 0
    assert Path(cached["folder"]).parent == features
    manifest = json.loads(Path(cached["folder"], "manifest.json").read_text())
    assert cached["examples"] == manifest["examples"] and cached["dtype"] == manifest["dtype"]

    args = ["train", built["recipe"], "--from-cache", "--steps", "1", "--out", tmp_path / "t"]
    trained = json.loads(_invoke(*args, "--json").stdout)
    assert trained["out_dir"] == str(tmp_path / "t")
    assert trained["metrics"] == json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert trained["metrics"]["steps"] == 1

    args = ["export", built["out"], tmp_path / "x", "--include-bases", "--json"]
    exported = json.loads(_invoke(*args).stdout)
    assert exported["out_dir"] == str(tmp_path / "x")
    listed = json.loads((tmp_path / "x" / "export.json").read_text())["files"]  # all but itself
    on_disk = sum(path.is_file() for path in (tmp_path / "x").rglob("*"))
    assert exported["files"] == len(listed) == on_disk - 1
    assert exported["bytes"] == sum(f["bytes"] for f in listed.values())

    copy = shutil.copytree(tiny["llama"], tmp_path / "llama-copy")
    args = ["port", built["out"], "--base", f"a={copy}", "--out", tmp_path / "p", "--json"]
    ported = json.loads(_invoke(*args).stdout)
    assert ported["out_dir"] == str(tmp_path / "p")
    record = json.loads((tmp_path / "p" / "port.json").read_text())
    assert ported["bases"] == record["bases"]


def test_pull_bytes_progress_in_a_log(tmp_path, monkeypatch):
    """The pull's own display (bytes) prints plain lines too: verifying a GGUF and converting it."""
    from test_pull import write_tiny_gguf

    from composer.bases.pull import convert_gguf

    monkeypatch.setenv(INTERVAL_ENV, "0")
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    log = io.StringIO()
    convert_gguf(gguf, tmp_path / "hf", sha256=digest, console=Console(file=log))
    mib = f"{gguf.stat().st_size / 2**20:,.1f}"
    verify = _lines(log.getvalue(), "verify tiny.gguf")
    assert verify[0] == f"verify tiny.gguf  0.0/{mib} MiB  started"
    assert re.fullmatch(rf"verify tiny.gguf  {mib}/{mib} MiB  .*MiB/s  {DONE}", verify[-1])
    convert = _lines(log.getvalue(), "convert tiny")
    assert convert[0] == "convert tiny  started"
    assert re.fullmatch(rf"convert tiny  {DONE}", convert[-1])

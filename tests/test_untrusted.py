"""A mixture from someone else runs none of its author's code and reads nothing outside itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import recipe_yaml
from typer.testing import CliRunner

from cli import app
from composer.artifacts.export import export
from composer.files import sha256_file

EVIL = """
import os
from pathlib import Path

Path(os.environ["EVIL_MARKER"]).write_text("ran")
from transformers import LlamaConfig as EvilConfig  # noqa: E402
"""


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "composer", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture()
def stranger(tiny, tiny_mixture_dir, tmp_path) -> tuple[Path, dict[str, str], Path, Path]:
    """A stranger's mixture whose recipe sets trust_remote_code over a base that ships Python:
    (mixture folder, env that makes that Python leave a marker, marker, module cache)."""
    base = tmp_path / "evil-base"
    shutil.copytree(tiny["llama"], base)
    (base / "evil.py").write_text(EVIL)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    mixture = tmp_path / "mixture"
    shutil.copytree(tiny_mixture_dir, mixture)
    recipe = yaml.safe_load((mixture / "recipe.yaml").read_text())
    recipe["bases"]["a"].update(path=str(base), trust_remote_code=True)
    (mixture / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    marker, modules = tmp_path / "marker", tmp_path / "modules"
    return mixture, {"EVIL_MARKER": str(marker), "HF_MODULES_CACHE": str(modules)}, marker, modules


def test_a_mixture_cannot_turn_on_remote_code(stranger):
    """Nothing of the stranger's runs, nothing is copied into transformers' module cache,
    until the user passes --trust-remote-code."""
    mixture, env, marker, modules = stranger
    refused = _compose("generate", str(mixture), "--prompt", "hi", env=env)
    assert refused.returncode == 1, refused.stderr
    line = _one_line(refused.stderr)
    assert "trust_remote_code" in line and "--trust-remote-code" in line
    assert not marker.exists()
    assert not modules.exists() or not any(modules.rglob("evil.py"))

    allowed = _compose("generate", str(mixture), "--prompt", "hi", "--trust-remote-code", env=env)
    assert marker.read_text() == "ran", allowed.stderr  # the user's flag, and only it, runs it


def _questions_recipe(mixture: str, tmp: Path) -> str:
    """A recipe of the user's own whose training data are questions, for `compose answer`."""
    rows = tmp / "questions.jsonl"
    rows.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    recipe = yaml.safe_load((Path(mixture) / "recipe.yaml").read_text())
    recipe["bases"]["a"]["trust_remote_code"] = False
    fields = {"question": "question", "answer": "answer"}
    recipe["train"]["data"] = {"kind": "hf", "dataset": str(rows), "fields": fields}
    (tmp / "own.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp / "own.yaml")


LOADING = {  # every command that loads a mixture, with what it needs besides the mixture
    "chat": lambda m, tmp: ["chat", m],
    "compare": lambda m, tmp: [
        "compare",
        m,
        m,
        "--suite",
        "loss-code",
        "--limit",
        "1",
        "--out",
        str(tmp / "report"),
        "--cache-dir",
        str(tmp / "cache"),
    ],
    "answer": lambda m, tmp: [
        "answer",
        _questions_recipe(m, tmp),
        "--model",
        m,
        "--out",
        str(tmp / "answers.jsonl"),
    ],
    "serve": lambda m, tmp: ["serve", m, "--port", "0"],
    "port": lambda m, tmp: ["port", m, "--base", f"b={m}", "--out", str(tmp / "ported")],
}


@pytest.mark.parametrize("command", sorted(LOADING))
def test_every_command_that_loads_a_mixture_refuses_remote_code_and_names_its_flag(
    command, stranger, tmp_path
):
    """The refusal says to pass --trust-remote-code, so every command that loads a mixture
    takes that flag; without it nothing of the stranger's runs."""
    mixture, env, marker, _ = stranger
    args = LOADING[command](str(mixture), tmp_path)
    refused = _compose(*args, env=env)
    assert refused.returncode == 1, refused.stderr
    line = _one_line(refused.stderr)
    assert "--trust-remote-code" in line, line
    assert not marker.exists()
    taken = _compose(command, "--help", env={**env, "COLUMNS": "300"})
    assert "--trust-remote-code" in taken.stdout


@pytest.mark.parametrize("command", ["chat", "compare"])
def test_the_flag_lets_the_users_choice_run(command, stranger, tmp_path):
    mixture, env, marker, _ = stranger
    args = LOADING[command](str(mixture), tmp_path)
    ran = subprocess.run(
        [sys.executable, "-m", "composer", *args, "--trust-remote-code"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        input="",
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def exported(tiny_mixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "export"
    export(tiny_mixture_dir, out, include_bases=True, verify=False)
    return out


@pytest.fixture()
def copy(exported, tmp_path) -> Path:
    """A private copy of the export to tamper with."""
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def _seal(folder: Path, manifest: dict) -> None:
    """Rewrite export.json with the recipe's current size and sha256 (a consistent forgery)."""
    recipe = folder / "recipe.yaml"
    manifest["files"]["recipe.yaml"] = {
        "bytes": recipe.stat().st_size,
        "sha256": sha256_file(recipe),
    }
    (folder / "export.json").write_text(json.dumps(manifest))


def _generate(folder: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["generate", str(folder), "--prompt", "hi"])
    return result.exit_code, _one_line(result.output)


def test_an_export_listing_no_files_is_refused(copy):
    manifest = _manifest(copy)
    manifest["files"] = {}
    (copy / "export.json").write_text(json.dumps(manifest))
    code, line = _generate(copy)
    assert code == 1 and "lists no files" in line


def test_a_file_the_manifest_does_not_list_is_refused(copy):
    manifest = _manifest(copy)
    dropped = next(rel for rel in manifest["files"] if rel.startswith("bases/a/model-"))
    del manifest["files"][dropped]
    (copy / "export.json").write_text(json.dumps(manifest))
    code, line = _generate(copy)
    assert code == 1 and f"{dropped}: not listed in export.json" in line


def test_an_added_file_is_refused(copy):
    (copy / "bases" / "a" / "extra.py").write_text("print('hi')\n")
    code, line = _generate(copy)
    assert code == 1 and "extra.py: not listed in export.json" in line


@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside.txt", "bases/../../outside.txt"])
def test_a_manifest_entry_outside_the_export_is_refused_before_reading(copy, tmp_path, entry):
    (tmp_path / "outside.txt").write_text("secret")
    manifest = _manifest(copy)
    manifest["files"][entry] = {"bytes": 6, "sha256": "0" * 64}
    (copy / "export.json").write_text(json.dumps(manifest))
    code, line = _generate(copy)
    assert code == 1 and "not a path inside the export" in line
    assert "bytes" not in line  # no size of the outside file is disclosed


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_base_path_outside_the_export_is_refused(copy, tiny, where):
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    path = str(tiny["llama"]) if where == "absolute" else "../../llama"
    recipe["bases"]["a"]["path"] = path
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _seal(copy, _manifest(copy))
    code, line = _generate(copy)
    assert code == 1 and f"bases.a.path is '{path}'" in line


def test_a_link_in_an_export_is_refused(copy):
    os.symlink("/etc/hostname", copy / "bases" / "a" / "linked")
    code, line = _generate(copy)
    assert code == 1 and "only regular files and folders" in line


def test_a_malformed_recipe_in_a_mixture_is_one_line(tiny_mixture_dir, tmp_path):
    mixture = tmp_path / "mixture"
    shutil.copytree(tiny_mixture_dir, mixture)
    (mixture / "recipe.yaml").write_text("name: [unclosed\n")
    code, line = _generate(mixture)
    assert code == 1 and "cannot read the recipe" in line


def test_exporting_a_local_base_without_its_weights_is_refused(tiny_mixture_dir, tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(tiny_mixture_dir), str(out)])
    assert result.exit_code == 1
    assert "is a local folder" in _one_line(result.output) and "--include-bases" in result.output
    assert not any(p.name != "features" for p in tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name", ["/tmp/x", "../../../x", ".hidden", "-x", "a b", "a\n"])
def test_a_base_name_is_not_a_path(tiny, tmp_path, name):
    recipe = yaml.safe_load(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]))
    recipe["bases"][name] = {"path": str(tiny["qwen2"])}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "bases: base name" in _one_line(result.output) and "it names folders" in result.output


def test_a_domain_name_is_not_a_path(tiny, tmp_path):
    recipe = yaml.safe_load(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]))
    part = {"domain": "../x", "data": {"kind": "gsm_symbolic", "size": 8}}
    recipe["train"]["data"] = {"kind": "mix", "parts": [part]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "train.data.mix.parts.0.domain" in _one_line(result.output)


def test_export_of_a_mixture_naming_a_base_outside_writes_nothing(tiny_mixture_dir, tmp_path):
    """The mixture's own recipe.yaml names a base `../../escaped`: refused as it is read."""
    mixture = tmp_path / "work" / "mixture"
    shutil.copytree(tiny_mixture_dir, mixture)
    recipe = yaml.safe_load((mixture / "recipe.yaml").read_text())
    recipe["bases"]["../../escaped"] = recipe["bases"]["b"]
    (mixture / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "work" / "out"
    result = CliRunner().invoke(app, ["export", str(mixture), str(out), "--include-bases"])
    assert result.exit_code == 1
    assert "base name '../../escaped'" in _one_line(result.output)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["mixture"]
    assert not (tmp_path / "escaped").exists()

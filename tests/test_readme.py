"""Every command README.md shows is run by a test or by CI, as tests/readme_commands.py says.

README's commands are the lines of its code blocks that start with `compose` (a trailing
`# comment` cut off), plus the two set-up lines it opens with. Adding one to README means adding
its entry (and, where it is not run here, the test that runs it) to tests/readme_commands.py.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from readme_commands import CI, COMMANDS, DEMO, FAST, Run
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMENT = re.compile(r"\s+#\s")  # `compose plan r.yaml   # what it does`; not --stop "####"
COMMAND = re.compile(r"compose[ -]")  # compose ..., compose-lm-eval ...


def readme_commands(text: str) -> list[str]:
    """The set-up lines README opens with, then each command line of its code blocks."""
    lines = text.splitlines()
    found = [line.strip() for line in lines[:2]]
    fenced = False
    for line in lines[2:]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        code = line.strip()
        if (fenced or line.startswith("    ")) and COMMAND.match(code):
            found.append(COMMENT.split(code, maxsplit=1)[0])
    return list(dict.fromkeys(found))


def _by(kind: str) -> list[str]:
    return [command for command, run in COMMANDS.items() if run.by == kind]


def _invoke(command: str, run: Run) -> str:
    words = shlex.split(command)
    assert words[0] == "compose", command
    result = CliRunner().invoke(app, [*words[1:], *run.extra])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.stdout


def test_every_readme_command_is_run_by_someone():
    shown = readme_commands(README.read_text())
    nobody = [c for c in shown if c not in COMMANDS]
    assert not nobody, "README commands no test or CI runs (add them to readme_commands.py):\n" + (
        "\n".join(nobody)
    )
    stale = [c for c in COMMANDS if c not in shown]
    assert not stale, "readme_commands.py lists commands README no longer shows:\n" + "\n".join(
        stale
    )


def test_readme_opens_with_the_set_up_commands_ci_runs():
    first, second = README.read_text().splitlines()[:2]
    assert first.startswith("    ") and second.startswith("    ")  # a code block, first thing
    assert [first.strip(), second.strip()] == _by(CI)
    ci = (ROOT / ".ci" / "run").read_text()
    assert second.strip() in ci.splitlines()  # run verbatim
    for step in ("python3.11 -m venv .venv", ". .venv/bin/activate", "pip install -q -e '.[dev]'"):
        assert step in ci


def test_every_run_elsewhere_names_a_test_that_exists_and_says_what_differs():
    for command, run in COMMANDS.items():
        assert run.by in (CI, FAST, DEMO) or "::" in run.by, (command, run.by)
        if run.extra or run.by not in (CI, FAST, DEMO):
            assert run.differs, f"{command}: say what the run changes"
        if "::" not in run.by:
            continue
        path, name = run.by.split("::")
        source = (ROOT / path).read_text()
        tests = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        assert name in tests, f"{command}: {run.by} does not exist"
        # That test runs the same subcommand (`compose serve ...`: the word "serve" in it).
        subcommand = shlex.split(command)[1]
        body = ast.get_source_segment(source, tests[name]) or ""
        assert f'"{subcommand}"' in body, f"{command}: {run.by} runs no `compose {subcommand}`"


@pytest.mark.parametrize("command", _by(FAST))
def test_fast_commands_as_written(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    stdout = _invoke(command, COMMANDS[command])
    if "--json" in command:
        json.loads(stdout)


@pytest.mark.slow
def test_demo_commands(tmp_path, monkeypatch):
    """README's demo commands in README's order, on the short demo (see readme_commands.py)."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in readme_commands(README.read_text()):
        run = COMMANDS[command]
        if run.by != DEMO:
            continue
        if "./smollm2-v2" in command:  # the "new version" of the base: the pulled one, copied
            from composer.bases import pull, registry

            pulled = pull.local_dir(registry.get_card("smollm2-135m-instruct"))
            assert pulled is not None
            shutil.copytree(pulled, tmp_path / "smollm2-v2")
        stdout = _invoke(command, run)
        if "--json" in command:
            json.loads(stdout)
        ran.append(command)
    assert sorted(ran) == sorted(_by(DEMO))
    for folder in ("runs/demo", "runs/demo-from-cache", "runs/demo-export", "runs/demo-ported"):
        assert (tmp_path / folder / "recipe.yaml").is_file(), folder

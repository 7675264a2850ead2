"""Where namespaces are refused, generated code is refused unless the user passes
`--unsafe-no-jail`; even then it runs without its parent's environment and leaves no process
behind. COMPOSE_SANDBOX_FORCE_FALLBACK makes this machine act as one that refuses namespaces;
each case runs with a cgroup (where this machine can make one) and without."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from test_sandbox import _processes_with
from typer.testing import CliRunner

from cli import app
from composer.compare.runner import compare
from composer.compare.sandbox import (
    FORCE_FALLBACK,
    NO_CGROUP,
    UNJAILED,
    Cgroup,
    Limits,
    run_untrusted,
)
from composer.compare.suites import SUITES, SuiteRegistry
from composer.errors import CompareError


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_FALLBACK, "1")


@pytest.fixture(params=["cgroup", "no cgroup"])
def cgroup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "no cgroup":
        monkeypatch.setenv(NO_CGROUP, "1")
    elif (probe := Cgroup.make(Limits())) is None:
        pytest.skip("no cgroup can be made here (not root, or none delegated)")
    else:
        probe.remove()
    return request.param


def test_generated_code_is_refused_without_the_jail_unless_allowed(refused, cgroup):
    with pytest.raises(CompareError, match="--unsafe-no-jail"):
        run_untrusted("pass\n")
    result = run_untrusted("pass\n", unsafe_no_jail=True)
    assert result.passed and result.isolation == UNJAILED


def test_unjailed_code_sees_no_environment_of_its_parent():
    """The secret sits in the environment compose started with (/proc/PID/environ shows that
    one), so compose runs here in a process of its own."""
    secret = secrets.token_hex(12)
    program = (
        "import os\n"
        f"secret = {secret!r}\n"
        "assert secret not in repr(os.environ), 'os.environ'\n"
        "for pid in ('self', str(os.getppid())):\n"
        "    with open(f'/proc/{pid}/environ', 'rb') as handle:\n"
        "        assert secret.encode() not in handle.read(), f'/proc/{pid}/environ'\n"
    )
    script = (
        "import sys\n"
        "from composer.compare.sandbox import run_untrusted\n"
        "result = run_untrusted(sys.stdin.read(), unsafe_no_jail=True)\n"
        "assert result.passed, result.status\n"
    )
    env = {**os.environ, FORCE_FALLBACK: "1", "COMPOSE_TEST_SECRET": secret}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=program,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("ending", ["returns", "times out"])
def test_a_setsid_grandchild_is_gone_after_an_unjailed_run(refused, cgroup, ending):
    argument = f"{os.getpid() % 1000 + 60}.{time.time_ns() % 997}"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {argument!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "time.sleep(0.3)\n"
    )
    if ending == "times out":
        program += "while True:\n    pass\n"
    result = run_untrusted(program, Limits(timeout_s=3), unsafe_no_jail=True)
    assert result.passed == (ending == "returns"), result.status
    deadline = time.time() + 2  # SIGKILL is sent; the kernel may take a moment to end it
    while _processes_with(argument) and time.time() < deadline:
        time.sleep(0.05)
    leftover = _processes_with(argument)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover


def test_compare_refuses_a_code_suite_in_one_line_before_loading_anything(refused, tmp_path):
    runner = CliRunner()
    sides = [str(tmp_path / "missing-a"), str(tmp_path / "missing-b")]
    result = runner.invoke(app, ["compare", *sides, "--suite", "gsm", "--suite", "humaneval"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "humaneval: generated code runs only in the sandbox's jail" in lines[0]
    assert "--unsafe-no-jail" in lines[0] and "gsm" not in lines[0]
    # a suite that runs no code is not refused: it gets as far as the (missing) sides
    result = runner.invoke(app, ["compare", *sides, "--suite", "loss-code"])
    assert result.exit_code == 1 and "is not a mixture directory" in result.output


def test_unsafe_no_jail_runs_the_suite_and_says_so_on_the_terminal_and_in_the_report(
    refused, tiny, tmp_path
):
    registry = SuiteRegistry()
    small = {"max_new_tokens": 8, "timeout_s": 5, "memory_mb": 512}
    registry.register(dataclasses.replace(SUITES.get("humaneval"), settings=small))
    terminal = io.StringIO()
    model = str(tiny["llama"])
    out = tmp_path / "report"
    result = compare(
        model,
        model,
        limit=2,
        out=out,
        cache_dir=tmp_path / "cache",
        registry=registry,
        console=Console(file=terminal, width=400),
        unsafe_no_jail=True,
    )
    assert "warning: --unsafe-no-jail: humaneval runs generated code" in terminal.getvalue()
    rows = result.suites[0].items
    assert all(row[side]["isolation"] == UNJAILED for row in rows for side in "ab")
    header = (out / "report.md").read_text().split("## Recipes")[0]
    assert "Warning: 4 humaneval result(s) ran generated code without the sandbox's jail" in header
    assert json.loads((out / "report.json").read_text())["unjailed"] == {"humaneval": 4}

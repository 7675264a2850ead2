"""The HumanEval sandbox against the escapes a generated program could try.

Each escape runs through the real sandbox; the jail's cases are skipped (with the reason) where
the machine refuses namespaces, and the fallback's own guarantees are tested everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from composer.compare import scoring
from composer.compare.sandbox import (
    NO_CGROUP,
    UNJAILED,
    Cgroup,
    Limits,
    namespaces_available,
    run_untrusted,
)
from composer.compare.suites import humaneval_items

jail = pytest.mark.skipif(
    not namespaces_available(), reason="this machine refuses the namespaces the jail needs"
)


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
def test_humaneval_harness_passes_the_reference_and_fails_a_wrong_answer(jailed):
    problem = humaneval_items(1, [])[0].data
    good = run_untrusted(
        scoring.humaneval_program(problem, problem["canonical_solution"]), jail=jailed
    )
    assert good.passed, good.status
    assert good.isolation == ("jail" if jailed else UNJAILED)
    bad = run_untrusted(scoring.humaneval_program(problem, "    return True\n"), jail=jailed)
    assert not bad.passed and "AssertionError" in bad.status


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
@pytest.mark.parametrize("ending", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n"])
def test_leaving_early_with_status_zero_is_not_a_pass(jailed, ending):
    problem = humaneval_items(1, [])[0].data
    # A wrong answer that leaves before check() can fail it.
    program = scoring.humaneval_program(
        problem, "    return True\n" + ending.replace("\n", "\n    ")[:-4]
    )
    result = run_untrusted(ending + program, jail=jailed)
    assert not result.passed and result.status.startswith("failed"), result.status


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
def test_sandbox_kills_an_infinite_loop(jailed):
    began = time.perf_counter()
    result = run_untrusted("while True:\n    pass\n", Limits(timeout_s=1), jail=jailed)
    assert not result.passed and result.status == "timed out"
    assert time.perf_counter() - began < 5


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
def test_sandbox_caps_memory(jailed):
    result = run_untrusted(
        "block = bytearray(4 << 30)\n", Limits(memory_bytes=512 << 20), jail=jailed
    )
    assert not result.passed and "MemoryError" in result.status


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
def test_sandbox_refuses_network(jailed):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    attempts = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"]
    if jailed:  # the kernel's barrier also stops code that bypasses `socket`
        attempts.append(
            f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        )
    for program in attempts:
        result = run_untrusted(program, Limits(timeout_s=5), jail=jailed)
        assert not result.passed and "OSError" in result.status, result.status
    server.settimeout(0.2)  # a connection that got through would be waiting in the backlog
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


HUNGRY_CHILDREN = """\
import os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        try:
            block = b"x" * (400 << 20)  # touched: every page is written
            time.sleep(1.5)
        except BaseException:
            os._exit(1)
        os._exit(0)
    children.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
assert codes == [0, 0, 0, 0], codes
"""


def _peak_memory_below_us(run):
    """Run `run()` while summing the proportional memory (PSS) of every process below this
    one every 20 ms: the host memory the sandbox takes. Returns its result and the peak."""
    me, peak, done = psutil.Process(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            total = 0
            for process in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += process.memory_full_info().pss
            peak[0] = max(peak[0], total)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run()
    finally:
        done.set()
        watcher.join()
    return result, peak[0]


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
@pytest.mark.parametrize("cap", ["cgroup", "rlimits"])
def test_memory_is_capped_for_the_run_as_a_whole(jailed, cap, monkeypatch):
    """Four children touching 400 MB each under a 1 GiB cap: some fail (killed, or refused
    memory or a fork), and the sandbox never holds much more than the cap."""
    if cap == "rlimits":
        monkeypatch.setenv(NO_CGROUP, "1")
        if not jailed and os.geteuid() == 0:
            pytest.skip("unjailed root is not bound by RLIMIT_NPROC: only a cgroup caps it")
    elif (probe := Cgroup.make(Limits())) is None:
        pytest.skip("no cgroup can be made here (not root, or none delegated)")
    else:
        probe.remove()
    cap_bytes = 1 << 30
    began = time.perf_counter()
    result, peak = _peak_memory_below_us(
        lambda: run_untrusted(
            HUNGRY_CHILDREN, Limits(timeout_s=20, memory_bytes=cap_bytes), jail=jailed
        )
    )
    assert not result.passed, result.status
    assert time.perf_counter() - began < 20
    # PSS counts a share of the interpreter's shared library pages too, charged elsewhere
    assert peak < cap_bytes + (96 << 20), f"{peak >> 20} MiB"


def test_fallback_runs_in_an_empty_temp_dir_with_a_bare_environment():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest; must not leak into the sandbox
    program = (
        "import os\nassert sorted(os.listdir('.')) == ['harness.py', 'program.py'], os.listdir('.')\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ\n"
    )
    result = run_untrusted(program, jail=False)
    assert result.passed, result.status


# --- escapes only the jail contains --------------------------------------------------------------


@jail
def test_jail_sees_no_host_file_and_runs_as_nobody(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file")
    secret.chmod(0o644)
    home = os.path.expanduser("~")
    prefix = os.path.realpath(sys.base_prefix)  # bound read-only: the interpreter itself
    system = {"bin", "dev", "lib", "lib32", "lib64", "libx32", "sbin", "tmp", "usr"}
    program = (
        "import os\n"
        f"for path in ({str(secret)!r}, '/etc', '/proc', '/work', {str(tmp_path)!r}):\n"
        "    assert not os.path.exists(path), path\n"
        f"assert set(os.listdir('/')) <= {system | {prefix.split('/')[1]}!r}, os.listdir('/')\n"
        f"if os.path.isdir({home!r}):  # only the way to the interpreter, if it lives there\n"
        f"    for name in os.listdir({home!r}):\n"
        f"        assert {prefix!r}.startswith(os.path.join({home!r}, name)), name\n"
        "assert sorted(os.listdir('.')) == ['harness.py', 'program.py'], os.listdir('.')\n"
    )
    if os.geteuid() == 0:
        program += "assert os.getuid() == 65534 and os.getgid() == 65534 and os.getgroups() == []\n"
    result = run_untrusted(program)
    assert result.passed, result.status


@jail
@pytest.mark.parametrize("target", ["tmp_path", "home", "clone", "/usr"])
def test_jail_writes_nowhere_but_its_own_tmp(tmp_path, target):
    """Wherever the target lies on this host (HOME, TMPDIR or the clone may be under /tmp, which
    in the jail is its own), a file the jail writes there is not at that path on the host."""
    where = {
        "tmp_path": str(tmp_path),
        "home": os.path.expanduser("~"),
        "clone": str(Path(__file__).resolve().parent),
        "/usr": "/usr",
    }[target]
    marker = Path(where) / f"compose-sandbox-escape-{os.getpid()}-{time.time_ns()}"
    program = (
        "import os\n"
        "try:\n"
        f"    os.makedirs({where!r}, exist_ok=True)\n"
        f"    open({str(marker)!r}, 'w').write('escaped')\n"
        "except OSError:\n"
        "    pass  # refused, or read-only: nothing written\n"
    )
    result = run_untrusted(program)
    assert result.passed, result.status
    assert not marker.exists()
    # its own /tmp is writable, within the file-size cap
    assert run_untrusted("open('/tmp/x', 'w').write('ok')\n").passed


@jail
def test_jail_reaches_no_host_unix_socket(tmp_path):
    path = tmp_path / "host.sock"
    servers = []
    for address in (str(path), "\0compose-sandbox-test"):
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen()
        server.settimeout(0.2)
        servers.append(server)
    for address in (str(path), "\\0compose-sandbox-test"):
        program = f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect({address!r}.replace('\\\\0', '\\0'))\n"
        result = run_untrusted(program, Limits(timeout_s=5))
        assert not result.passed and "Error" in result.status, result.status
    for server in servers:
        with pytest.raises(TimeoutError):
            server.accept()
        server.close()


@jail
def test_jail_cannot_kill_the_runner():
    program = (
        "import os, signal\n"
        f"for pid in ({os.getpid()}, os.getppid(), 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run_untrusted(program)
    # still here; pid 1 of the jail ignores a kill from inside, so the harness printed its token
    assert result.passed, result.status


def _processes_with(argument: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in cmdline:
            found.append(int(pid))
    return found


@jail
def test_a_setsid_grandchild_dies_with_the_jail():
    argument = f"{os.getpid() % 1000 + 40}.{time.time_ns() % 997}"
    program = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {argument!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "import time\n"
        "time.sleep(0.3)\n"
    )
    result = run_untrusted(program, Limits(timeout_s=10))
    assert result.passed, result.status
    deadline = time.time() + 3
    while _processes_with(argument) and time.time() < deadline:
        time.sleep(0.1)
    leftover = _processes_with(argument)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover


@jail
def test_jail_bounds_forks():
    program = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except OSError as exc:\n"
        "    raise SystemExit(f'stopped after {children} forks: {exc}')\n"
    )
    result = run_untrusted(program, Limits(timeout_s=15, processes=16))
    assert not result.passed and "stopped after" in result.status, result.status
    assert int(result.status.split("stopped after ")[1].split()[0]) <= 16

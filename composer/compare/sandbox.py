"""Run generated code where it can do little harm: never in this process.

Where the kernel allows namespaces (`unshare`), a program runs in a jail (jail.py): fresh PID,
mount, network, IPC and UTS namespaces; a new root holding only read-only system libraries and
the interpreter, plus a size-capped private /tmp; the uid `nobody` when compose runs as root
(no capabilities otherwise); no new privileges; limits on memory, CPU time, file size, open
files and processes. Every process it starts dies with it. Where namespaces are refused, it
falls back to a subprocess with the same limits, in an empty temporary directory, with the
socket module's constructors replaced, and `SandboxResult.isolation` says so.

A program passes only when the harness prints a fresh random token after the program ran to
its end (HumanEval's `check()` is its last statement): an early `os._exit(0)` or `sys.exit(0)`
fails. The token lives in the harness's memory, so code written to read it there could forge a
pass: the sandbox contains harm, it does not referee a hostile program.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from composer.compare.jail import set_limits

NO_NETWORK = "network access is disabled in the sandbox"
_PREAMBLE = f"""\
import socket as _socket_module

def _no_network(*args, **kwargs):
    raise OSError({NO_NETWORK!r})

for _name in ("socket", "create_connection", "create_server", "getaddrinfo", "socketpair",
              "fromfd", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(_socket_module, _name, _no_network)
del _socket_module, _name
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 32  # beyond the caller's own when not root


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "timed out", or "failed: <last line of stderr>"
    seconds: float
    isolation: str  # "jail", or what the fallback keeps where namespaces are refused


HARNESS = """\
import os, sys
def _run(folder):
    with open(os.path.join(folder, ".token")) as handle:
        token = handle.read()
    os.unlink(os.path.join(folder, ".token"))
    with open(os.path.join(folder, "program.py"), encoding="utf-8") as handle:
        code = compile(handle.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__"})
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()
_run(sys.argv[1])
"""
NOBODY = 65534
NAMESPACES = ["--fork", "--pid", "--kill-child", "--mount", "--net", "--ipc", "--uts"]


def _rlimits(limits: Limits) -> dict[str, int]:
    cpu = int(limits.timeout_s) + 1
    processes = limits.processes
    if os.geteuid() != 0:  # RLIMIT_NPROC counts every process of the real uid
        processes += _processes_of(os.getuid())
    return {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits.file_bytes,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_NPROC": processes,
        "RLIMIT_CORE": 0,
    }


def _processes_of(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += 1
    return count


def _jail_command(workdir: str, limits: Limits) -> list[str]:
    python = os.path.realpath(sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, os.path.dirname(python))}
    read_only = ["/usr", *sorted(p for p in prefixes if not p.startswith("/usr/"))]
    config = {
        "root": os.path.join(workdir, "root"),
        "read_only": read_only,
        "tmp_bytes": limits.file_bytes * 4,
        "files": {n: os.path.join(workdir, n) for n in ("harness.py", "program.py", ".token")},
        "uid": NOBODY if os.geteuid() == 0 else None,
        "limits": _rlimits(limits),
        "python": python,
    }
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    jail = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
    return ["unshare", *NAMESPACES, *user, "--", python, "-I", "-B", jail, json.dumps(config)]


@functools.cache
def namespaces_available() -> bool:
    """Whether the jail can be built here (containers often forbid namespaces)."""
    try:
        return run_untrusted("pass\n", Limits(timeout_s=10), jail=True).passed
    except OSError:
        return False


def run_untrusted(
    program: str, limits: Limits | None = None, jail: bool | None = None
) -> SandboxResult:
    """Run `program` (Python source) under the sandbox; it passes if it runs to its end."""
    limits = limits or Limits()
    jailed = namespaces_available() if jail is None else jail
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="compose-sandbox-") as workdir:
        os.mkdir(os.path.join(workdir, "root"))
        for name, text in (("harness.py", HARNESS), ("program.py", _PREAMBLE + "\n" + program)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        with open(os.path.join(workdir, ".token"), "w") as handle:
            handle.write(token)
        # Files, not pipes: RLIMIT_FSIZE bounds what a chatty program can make us hold.
        output = open(os.path.join(workdir, "stdout.txt"), "w+b")  # noqa: SIM115
        errors = open(os.path.join(workdir, "stderr.txt"), "w+b")  # noqa: SIM115
        if jailed:
            command, cwd, preexec = _jail_command(workdir, limits), "/", None
        else:
            box = os.path.join(workdir, "box")
            os.mkdir(box)
            for name in ("harness.py", "program.py", ".token"):
                os.replace(os.path.join(workdir, name), os.path.join(box, name))
            command = [sys.executable, "-I", "-B", os.path.join(box, "harness.py"), box]
            cwd, preexec = box, functools.partial(set_limits, _rlimits(limits))
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
        began = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=errors,
            start_new_session=True,
            preexec_fn=preexec,
        )
        try:
            process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return SandboxResult(False, "timed out", time.perf_counter() - began, _name(jailed))
        finally:
            _kill_group(process)  # whatever the program left running in its session
            seconds = time.perf_counter() - began
            stdout, stderr = _tail(output), _tail(errors)
    if token.encode() in stdout:
        return SandboxResult(True, "passed", seconds, _name(jailed))
    return SandboxResult(False, _failure(process.returncode, stderr), seconds, _name(jailed))


def _tail(handle: Any, size: int = 4096) -> bytes:
    handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
    data = handle.read()
    handle.close()
    return data


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _failure(returncode: int, stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    if lines:
        return f"failed: {lines[-1][:200]}"
    if returncode < 0:
        return f"failed: killed by {signal.Signals(-returncode).name}"
    return f"failed: ended before its last statement (exit status {returncode})"


def _name(jailed: bool) -> str:
    return "jail" if jailed else "rlimits and socket-blocked only"

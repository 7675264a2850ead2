"""Run generated code where it can do little harm: never in this process.

Each program runs in a fresh `python -I` subprocess, in an empty temporary directory, with a
bare environment, its own session (so the whole process group is killed on timeout) and
`setrlimit` caps on address space, CPU time, file size, open files and core dumps. Network:
where unprivileged user namespaces work, the program runs under `unshare --user --net`, a
network namespace with no interfaces up; everywhere, a preamble replaces the socket module's
constructors so that ordinary library calls fail before they reach the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

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


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "timed out", or "failed: <last line of stderr>"
    seconds: float
    isolation: str  # "namespace" or "socket-blocked"


@functools.cache
def namespaces_available() -> bool:
    """Whether `unshare --user --net` works here (containers often forbid it)."""
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--net", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _set_limits(limits: Limits) -> None:
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_untrusted(program: str, limits: Limits | None = None) -> SandboxResult:
    """Run `program` (Python source) under the sandbox; it passes if it exits with status 0."""
    limits = limits or Limits()
    isolated = namespaces_available()
    with tempfile.TemporaryDirectory(prefix="compose-sandbox-") as workdir:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(_PREAMBLE + "\n" + program)
        # A file, not a pipe: RLIMIT_FSIZE bounds what a chatty program can make us hold.
        errors = open(os.path.join(workdir, "stderr.txt"), "w+b")  # noqa: SIM115
        command = [sys.executable, "-I", "-B", script]
        if isolated:
            command = ["unshare", "--user", "--map-root-user", "--net", "--", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        began = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            preexec_fn=functools.partial(_set_limits, limits),
        )
        try:
            process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            errors.close()
            return SandboxResult(False, "timed out", time.perf_counter() - began, _name(isolated))
        _kill_group(process)  # whatever the program left running in its session
        seconds = time.perf_counter() - began
        errors.seek(max(0, os.fstat(errors.fileno()).st_size - 4096))
        stderr = errors.read()
        errors.close()
    if process.returncode == 0:
        return SandboxResult(True, "passed", seconds, _name(isolated))
    return SandboxResult(False, _failure(process.returncode, stderr), seconds, _name(isolated))


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
    return f"failed: exit status {returncode}"


def _name(isolated: bool) -> str:
    return "namespace" if isolated else "socket-blocked"

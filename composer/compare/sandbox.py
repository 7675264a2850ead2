"""Run generated code where it can do little harm: never in this process.

Where the kernel allows namespaces (`unshare`), a program runs in a jail (jail.py): fresh PID,
mount, network, IPC and UTS namespaces; a new root holding only read-only system libraries and
the interpreter, plus a size-capped private /tmp; the uid `nobody` when compose runs as root
(no capabilities otherwise); no new privileges; limits on CPU time, file size, open files and
processes. Every process it starts dies with it. Memory is capped for the run as a whole: by a
cgroup of its own (`memory.max` and `pids.max` in cgroup v2, their v1 twins) where compose may
make one, otherwise by allowing fewer processes, each a share of the cap (`_rlimits`).

Where namespaces are refused, generated code runs only if the caller says so
(`unsafe_no_jail`, the CLI's `--unsafe-no-jail`): then it runs with the user's own rights, with
what is cheap kept — a bare environment, an empty temporary directory, the same limits and
cgroup, the socket module's constructors replaced, and every process it started killed at the
end (its launcher adopts orphans and kills them; see jail.run_unjailed). `SandboxResult.isolation`
says which way an item ran.

Test hooks, read here only: COMPOSE_SANDBOX_FORCE_FALLBACK=1 acts as if namespaces were refused;
COMPOSE_SANDBOX_NO_CGROUP=1 as if no cgroup could be made.

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
from dataclasses import dataclass, field
from typing import Any

from composer.compare.jail import kill_descendants
from composer.errors import CompareError

FORCE_FALLBACK = "COMPOSE_SANDBOX_FORCE_FALLBACK"
NO_CGROUP = "COMPOSE_SANDBOX_NO_CGROUP"
UNJAILED = "no jail (--unsafe-no-jail): the user's own rights"
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
    memory_bytes: int = 1 << 30  # the whole run: every process, and the jail's /tmp
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 32  # beyond the caller's own when not root

    @property
    def tmp_bytes(self) -> int:
        """The size of the jail's private /tmp (a tmpfs: memory)."""
        return self.file_bytes * 4


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "timed out", or "failed: <last line of stderr>"
    seconds: float
    isolation: str  # "jail", or UNJAILED


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
JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
BARE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
PROCESS_SHARE = 256 << 20  # without a cgroup: the least address space each process is allowed


def _rlimits(limits: Limits, whole_capped: bool) -> dict[str, int]:
    """Per-process limits. Where a cgroup caps the run's memory, each process may use all of
    it; otherwise processes × address space stays under the cap, /tmp's size set aside."""
    processes, memory = limits.processes, limits.memory_bytes
    if not whole_capped:
        budget = max(memory - limits.tmp_bytes, memory // 2)
        processes = max(1, min(processes, budget // PROCESS_SHARE))
        memory = budget // processes
    if os.geteuid() != 0:  # RLIMIT_NPROC counts every process of the real uid
        processes += _processes_of(os.getuid())
    return {
        "RLIMIT_AS": memory,
        "RLIMIT_CPU": int(limits.timeout_s) + 1,
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


@functools.cache
def _hierarchies() -> dict[str, str]:
    """This process's cgroup folder in each hierarchy that matters: "unified" (v2), and the
    v1 "memory" and "pids" controllers where those are mounted apart."""
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields, _, rest = line.partition(" - ")
            root, point = fields.split()[3:5]
            fstype, _source, options = rest.split()[:3]
            if fstype == "cgroup2":
                mounts["unified"] = (root, point)
            elif fstype == "cgroup":
                for controller in {"memory", "pids"} & set(options.split(",")):
                    mounts[controller] = (root, point)
    found = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else ["unified"]:
                if controller in mounts:
                    root, point = mounts[controller]
                    inner = os.path.relpath(path, root)
                    if not inner.startswith(".."):
                        found[controller] = os.path.normpath(os.path.join(point, inner))
    return found


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


@dataclass
class Cgroup:
    """One run's cgroup: a folder per hierarchy (one in v2; memory and pids in v1)."""

    folders: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, limits: Limits) -> Cgroup | None:
        """A new cgroup capping memory (no swap) and processes, or None where none can be
        made here (no delegated cgroup, or not root)."""
        if os.environ.get(NO_CGROUP):
            return None
        places = _hierarchies()
        name = f"compose-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        processes = str(limits.processes + 1)  # and the launcher (`unshare` or jail.py)
        made = cls()
        try:
            unified = places.get("unified")
            available = _read(f"{unified}/cgroup.controllers").split() if unified else []
            if "memory" in available:
                enabled = _read(f"{unified}/cgroup.subtree_control").split()
                wanted = [
                    f"+{c}" for c in ("memory", "pids") if c in available and c not in enabled
                ]
                if wanted:
                    _write(f"{unified}/cgroup.subtree_control", " ".join(wanted))
                folder = made._mkdir(f"{unified}/{name}")
                _write(f"{folder}/memory.max", str(limits.memory_bytes))
                made._write_if_there(f"{folder}/memory.swap.max", "0")
                made._write_if_there(f"{folder}/pids.max", processes)
            elif "memory" in places:
                folder = made._mkdir(f"{places['memory']}/{name}")
                _write(f"{folder}/memory.limit_in_bytes", str(limits.memory_bytes))
                made._write_if_there(
                    f"{folder}/memory.memsw.limit_in_bytes", str(limits.memory_bytes)
                )
                if "pids" in places:
                    _write(f"{made._mkdir(places['pids'] + '/' + name)}/pids.max", processes)
            else:
                return None
        except OSError:
            made.remove()
            return None
        return made

    def _mkdir(self, folder: str) -> str:
        os.mkdir(folder)
        self.folders.append(folder)
        return folder

    @staticmethod
    def _write_if_there(path: str, text: str) -> None:
        if os.path.exists(path):
            _write(path, text)

    @property
    def procs(self) -> list[str]:
        return [f"{folder}/cgroup.procs" for folder in self.folders]

    def remove(self, wait_s: float = 2.0) -> None:
        """Kill every process left in the cgroup, then remove it."""
        for folder in self.folders:
            with contextlib.suppress(OSError):
                self._write_if_there(f"{folder}/cgroup.kill", "1")  # v2, Linux 5.14+
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pids = set()
            for procs in self.procs:
                with contextlib.suppress(OSError):
                    pids |= {int(pid) for pid in _read(procs).split()}
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def jail_problem() -> str | None:
    """Why the jail cannot be built here (containers often forbid namespaces), or None."""
    if os.environ.get(FORCE_FALLBACK):
        return f"{FORCE_FALLBACK} is set"
    return _probe_jail()


@functools.cache
def _probe_jail() -> str | None:
    try:
        result = run_untrusted("pass\n", Limits(timeout_s=10), jail=True)
    except OSError as exc:
        return str(exc)
    return None if result.passed else result.status.removeprefix("failed: ")


def namespaces_available() -> bool:
    return jail_problem() is None


def refusal(problem: str, suites: str = "") -> str:
    """The one line that refuses to run generated code unjailed."""
    return (
        f"{suites + ': ' if suites else ''}generated code runs only in the sandbox's jail, "
        f"which this machine cannot build ({problem}); --unsafe-no-jail runs it with your own "
        "rights instead (see README: what that leaves open)"
    )


def _config(workdir: str, limits: Limits, jailed: bool, cgroup: Cgroup | None) -> dict[str, Any]:
    """What jail.py needs: the cgroup to join, then the jail to build or the folder to run in."""
    config: dict[str, Any] = {
        "cgroup": cgroup.procs if cgroup else [],
        "limits": _rlimits(limits, whole_capped=cgroup is not None),
        "python": sys.executable,
        "unshare": None,
        "box": workdir,
    }
    if jailed:
        python = os.path.realpath(sys.executable)
        prefixes = {os.path.realpath(p) for p in (sys.base_prefix, os.path.dirname(python))}
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        config |= {
            "unshare": ["unshare", *NAMESPACES, *user, "--", python, "-I", "-B"],
            "root": os.path.join(workdir, "root"),
            "read_only": ["/usr", *sorted(p for p in prefixes if not p.startswith("/usr/"))],
            "tmp_bytes": limits.tmp_bytes,
            "files": {n: os.path.join(workdir, n) for n in ("harness.py", "program.py", ".token")},
            "uid": NOBODY if os.geteuid() == 0 else None,
            "python": python,
        }
    return config


def run_untrusted(
    program: str,
    limits: Limits | None = None,
    jail: bool | None = None,
    *,
    unsafe_no_jail: bool = False,
) -> SandboxResult:
    """Run `program` (Python source) under the sandbox; it passes if it runs to its end.

    `jail`: None builds the jail, and where this machine cannot, refuses (CompareError) unless
    `unsafe_no_jail`; True requires the jail; False runs the program unjailed on purpose."""
    limits = limits or Limits()
    if jail is None:
        problem = jail_problem()
        if problem is not None and not unsafe_no_jail:
            raise CompareError(refusal(problem))
        jail = problem is None
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="compose-sandbox-") as workdir:
        box = workdir if jail else os.path.join(workdir, "box")  # unjailed: an empty folder
        os.mkdir(os.path.join(workdir, "root" if jail else "box"))
        for name, text in (("harness.py", HARNESS), ("program.py", _PREAMBLE + "\n" + program)):
            with open(os.path.join(box, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        with open(os.path.join(box, ".token"), "w") as handle:
            handle.write(token)
        # Files, not pipes: RLIMIT_FSIZE bounds what a chatty program can make us hold.
        output = open(os.path.join(workdir, "stdout.txt"), "w+b")  # noqa: SIM115
        errors = open(os.path.join(workdir, "stderr.txt"), "w+b")  # noqa: SIM115
        cgroup = Cgroup.make(limits)
        config = json.dumps(_config(box, limits, jail, cgroup))
        began = time.perf_counter()
        timed_out = False
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", JAIL, "enter", config],
                cwd="/" if jail else box,
                env=BARE_ENV,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=errors,
                start_new_session=True,
            )
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_descendants(process.pid)  # not yet reaped: its pid is still its own
            _kill_group(process)  # whatever the program left running in its session
        finally:
            seconds = time.perf_counter() - began
            if cgroup is not None:
                cgroup.remove()
            stdout, stderr = _tail(output), _tail(errors)
    isolation = "jail" if jail else UNJAILED
    if timed_out:
        return SandboxResult(False, "timed out", seconds, isolation)
    if token.encode() in stdout:
        return SandboxResult(True, "passed", seconds, isolation)
    return SandboxResult(False, _failure(process.returncode, stderr), seconds, isolation)


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

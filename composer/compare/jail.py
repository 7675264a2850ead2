"""The first processes of a sandbox: join its cgroup, build the jail, become the interpreter.

Run by sandbox.py as `python -I -B jail.py enter CONFIG`, with a bare environment, in a new
session. `enter` moves itself into the run's cgroup (when sandbox.py could make one), then
either execs `unshare --fork --pid --kill-child --mount --net --ipc --uts [--user
--map-root-user] -- python -I -B jail.py inside CONFIG` or, where namespaces are refused and the
user allowed it, runs the program unjailed (`run_unjailed`). It imports the standard library
only and is never imported by compose for its side effects.

`inside` is pid 1 of a fresh PID namespace, root of a fresh mount namespace, with no network
interfaces. In order:

1. a new root on an empty tmpfs: read-only binds of /usr, the interpreter's own prefix and
   the /bin, /lib… links; /dev null, zero, random, urandom; a size-capped tmpfs /tmp holding
   the program; nothing else of the host (no home, no /etc, no /proc, no host sockets);
2. pivot_root into it and detach the old root, so no path leads back to the host;
3. drop privileges: uid/gid `nobody` with no groups when started by the real root, otherwise
   (inside a user namespace) root bits that grant no capabilities; no new privileges;
4. resource limits (memory, CPU, file size, open files, processes, no core dumps);
5. exec the harness, which becomes pid 1: when it exits, the kernel kills every process left
   in the namespace, `setsid` or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 38, 24, 28
PR_SET_CHILD_SUBREAPER = 36
SECBIT_NOROOT_LOCKED = 0b11  # NOROOT and its lock: uid 0 gains no capabilities on exec
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def c(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(libc.mount(c(source), c(target), c(fstype), flags, c(data or None)), f"mount {target}")


def _bind_read_only(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(root: str, read_only: list[str], tmp_bytes: int, files: dict[str, str]) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in read_only:
        os.makedirs(root + path, exist_ok=True)
        _bind_read_only(path, root + path)
    for path in LINKS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path) and not os.path.exists(root + path):
            os.makedirs(root + path)
            _bind_read_only(path, root + path)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        open(root + "/dev/" + name, "w").close()
        _mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND)
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=0700")
    for name, source in files.items():
        shutil.copyfile(source, f"{root}/tmp/{name}")
    os.makedirs(root + "/.old")
    os.chdir(root)
    number = SYS_PIVOT_ROOT[os.uname().machine]
    _check(libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_privileges(uid: int | None) -> None:
    if uid is not None:  # started by the real root: become `nobody`, every capability gone
        for path in ("/tmp", *(f"/tmp/{n}" for n in os.listdir("/tmp"))):
            os.chown(path, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    else:  # root of a user namespace only: keep no capability across the exec
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        _check(libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_LOCKED, 0, 0, 0), "securebits")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def exec_harness(python: str, folder: str) -> None:
    """Replace this process by the harness, in `folder`, with an environment of its own."""
    os.chdir(folder)
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
    os.execve(python, [python, "-I", "-B", f"{folder}/harness.py", folder], env)


def descendants(root: int) -> set[int]:
    """Every live process below `root` in the process tree, read from /proc."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            # pid (comm) state ppid …: comm may hold spaces and parentheses
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{name}/stat") as handle,
            ):
                parents[int(name)] = int(handle.read().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_descendants(root: int) -> None:
    """Stop every process below `root` until no new one appears (a stopped process cannot
    fork), then kill them all."""
    stopped: set[int] = set()
    while new := descendants(root) - stopped:
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_unjailed(config: dict) -> None:
    """Where namespaces are refused: run the harness as a child of this process, which adopts
    every orphan below it (a child subreaper) and kills whatever is left when it ends."""
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    child = os.fork()
    if child == 0:
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        set_limits(config["limits"])
        exec_harness(config["python"], config["box"])
    _, status = os.waitpid(child, 0)
    kill_descendants(os.getpid())
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)  # the killed, and every orphan this process adopted
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def enter(config: dict, argument: str) -> None:
    for procs in config["cgroup"]:  # every process the program starts is counted there
        with open(procs, "w") as handle:
            handle.write("0")
    if config["unshare"] is None:
        run_unjailed(config)
    command = [*config["unshare"], os.path.abspath(__file__), "inside", argument]
    os.execvp(command[0], command)


def inside(config: dict) -> None:
    build_root(config["root"], config["read_only"], config["tmp_bytes"], config["files"])
    drop_privileges(config["uid"])
    set_limits(config["limits"])
    exec_harness(config["python"], "/tmp")


def main() -> None:
    stage, argument = sys.argv[1], sys.argv[2]
    config = json.loads(argument)
    if stage == "enter":
        enter(config, argument)
    else:
        inside(config)


if __name__ == "__main__":
    main()

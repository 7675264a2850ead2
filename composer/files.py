"""Files written so that a crash leaves the old file or the new one, never half of one.

Atomic writes (temp file beside the target, fsync, rename), staging folders (filled under a
temporary name, renamed into place at the end) and the one sha256 of a file used everywhere.

Temp files and staging folders are named `.{name}.staging-{pid}-{host}-{random}` (temp files
end in `.tmp`), `host` a short hash of the machine's name: a SIGKILL leaves them behind, and the
next staging folder made in the same parent removes those whose process is gone from this
machine (`remove_stale`). Nothing else is ever removed: not another machine's (a shared disk),
not a live process's, not a name compose did not make.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from composer.errors import OutputError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGING = re.compile(r"^\..+\.staging-(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+(\.tmp)?$")


def _staging_prefix(name: str) -> str:
    """The start of a temp name beside `name`: whose process, on which machine."""
    return f".{name}.staging-{os.getpid()}-{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_staging(name: str) -> bool:
    """`name` is that of a temp file or staging folder compose made."""
    return _STAGING.match(name) is not None


def remove_stale(parent: Path) -> list[Path]:
    """Remove the temp files and staging folders in `parent` that a process of this machine
    left when it was killed (its pid is not alive); the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None or match[2] != _HOST or _alive(int(match[1])):
            continue
        path = Path(entry.path)
        if match[3] and entry.is_file(follow_symlinks=False):
            path.unlink(missing_ok=True)
        elif not match[3] and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path)
    return removed


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it to `path`;
    the file gets the mode any new file of the user gets (mkstemp alone makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = _staging_prefix(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_png(path: Path, fig: Any) -> None:
    """Save a matplotlib figure as `path` atomically, and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))

    plt.close(fig)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_text_file(path: Path, limit: int) -> str:
    """The UTF-8 text of the regular file `path`, at most `limit` bytes; ValueError (one line)
    otherwise. Checked on the opened file, so a FIFO or a device never blocks or streams."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size:,} bytes, more than the {limit:,} read at most")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than the {limit:,} bytes read at most")
    return data.decode("utf-8")


MAX_JSON_BYTES = 64 * 2**20  # a manifest lists files, it does not hold them


def read_json(path: Path, fmt: object) -> dict[str, Any] | None:
    """The JSON object in the regular file `path` whose "format" is `fmt`, or None where there
    is no such file; ValueError, one line, for anything else (too big, not JSON, other format)."""
    if not path.exists():
        return None
    try:
        data = json.loads(read_text_file(path, MAX_JSON_BYTES))
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format {found!r}, expected {fmt!r}")
    return data


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def check_new_output(out: Path) -> None:
    """A folder to create: absent or empty, in a writable place (created up to its parent)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} already exists and is not empty; choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"output {out} is not writable ({out.parent} denies writing)")


def staging_dir(final: Path) -> Path:
    """A fresh hidden folder beside `final`, to fill and then rename to `final`; with the mode
    any new folder of the user gets once in place (mkdtemp alone makes it 0700). Stale ones
    that killed processes left in the same parent are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    path = Path(tempfile.mkdtemp(prefix=_staging_prefix(final.name), dir=final.parent))
    path.chmod(0o777 & ~_umask())
    return path


def staged_output(out: Path, fill: Callable[[Path], None]) -> None:
    """Run `fill` on a temporary folder beside `out`, then rename it to `out`: a failure (or
    an interrupt) leaves no `out` and no half-written folder."""
    check_new_output(out)
    staging = staging_dir(out)
    try:
        fill(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def lock_now(path: Path, busy: Exception) -> FileLock:
    """The file lock at `path`, held; `busy` is raised at once if another process holds it
    (a second run is refused, never queued behind the first)."""
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise busy from None
    return lock

"""What a base's weights are: the sha256 of its config.json and of every weights file.

One identity for every place that must tell two versions of a base apart: the feature cache's
key, the export's record of where each base came from, `compose port`'s record of both versions,
and `compose compare`'s result cache. Every weights format a folder may hold counts, not only
the one a loader reads, so a changed file is never missed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from composer.files import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights files of any format, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def base_identity(folder: Path) -> dict[str, Any]:
    """`config_sha256` and `weights_sha256` (file name -> sha256) of a base folder."""
    return {
        "config_sha256": sha256_file(folder / "config.json"),
        "weights_sha256": {p.name: _weights_sha256(p) for p in weight_files(folder)},
    }


def _weights_sha256(path: Path) -> str:
    """sha256 of a weights file, hashed once per process while the file stays as it was.

    Any write changes a file's ctime, which (unlike its mtime) cannot be set back, so a file
    rewritten in place is hashed again.
    """
    s = path.stat()
    return _sha256_at(str(path.resolve()), s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_at(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256_file(Path(path))

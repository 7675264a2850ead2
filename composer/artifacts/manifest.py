"""The manifest of an exported mixture: every file's size and sha256, checked on load.

An export is a folder that loads with no other file: its recipe names bases by paths relative to
the folder. `resolve_export` checks the files against `export.json` (a truncated or altered file
is refused) and makes those paths absolute, so the recipe loads from any working directory.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from composer.errors import CheckpointError
from composer.files import read_json, sha256_file

MANIFEST = "export.json"
FORMAT = "compose-export"


def _shipped(folder: Path) -> list[str]:
    """Every file under `folder` an export ships (relative POSIX paths, sorted): all but the
    manifest and dot-files; a link or anything but a regular file or folder is refused."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in Path(rel).parts):
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"{path}: an export holds only regular files and folders")
        if path.is_file():
            found.append(rel)
    return found


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder` an export ships (see `_shipped`)."""
    return {
        rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
        for rel in _shipped(folder)
    }


def inside(rel: Any) -> bool:
    """`rel` is a relative POSIX path that stays inside its folder (no `..`, no dot-parts)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    path = PurePosixPath(rel)  # `a/./b` has parts (a, b): only `..` and dot-names remain
    return not path.is_absolute() and not any(p.startswith(".") for p in path.parts)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return read_json(folder / MANIFEST, FORMAT)
    except ValueError as exc:
        raise CheckpointError(
            f"{folder / MANIFEST}: not a compose export manifest ({exc})"
        ) from exc


def _entries(folder: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file list, checked before any listed file is read: each entry a path
    inside the export with its size and sha256, and every file the folder ships listed."""
    where = folder / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: lists no files; an export lists every file it ships")
    for rel, entry in files.items():
        if not inside(rel):
            raise CheckpointError(f"{where}: lists {rel!r}, not a path inside the export")
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        if not ok or type(entry.get("bytes")) is not int:
            raise CheckpointError(f"{where}: the entry of {rel!r} needs `bytes` and `sha256`")
    unlisted = [rel for rel in _shipped(folder) if rel not in files]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise CheckpointError(f"{folder / unlisted[0]}: not listed in {MANIFEST}{more}")
    return files


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file listed and every listed file present with its size and sha256; the first
    mismatch is the error."""
    for rel, entry in _entries(folder, manifest).items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the export")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path}: {size:,} bytes, the export wrote {entry['bytes']:,} (truncated or "
                "replaced); export again"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the export's (file was altered)")


def resolve_export(folder: Path, recipe_data: Any) -> Any:
    """For an export: verify its files and make its bases' (and patches') paths, which must
    lie inside it, absolute.

    Any other folder's recipe is returned unchanged: a build's relative paths keep meaning
    "relative to where you run".
    """
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(recipe_data, dict):
        return recipe_data
    verify_files(folder, manifest)
    bases = recipe_data.get("bases")
    if isinstance(bases, dict):
        for name, spec in bases.items():
            for key in ("path", "lora"):
                path = spec.get(key) if isinstance(spec, dict) else None
                if path is None:
                    continue
                if not inside(path):
                    raise CheckpointError(
                        f"{folder / 'recipe.yaml'}: bases.{name}.{key} is {path!r}; an export "
                        "names its bases by card or by a path inside itself"
                    )
                spec[key] = str(folder.resolve() / path)
    return recipe_data

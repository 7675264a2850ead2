"""The manifest of an exported mixture: every file's size and sha256, checked on load.

An export is a folder that loads with no other file: its recipe names bases by paths relative to
the folder. `resolve_export` checks the files against `export.json` (a truncated or altered file
is refused) and makes those paths absolute, so the recipe loads from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from composer.errors import CheckpointError
from composer.files import sha256_file

MANIFEST = "export.json"
FORMAT = "compose-export"


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every regular file under `folder` (relative POSIX paths, sorted)."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in Path(rel).parts):
            continue
        entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the export manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a compose export manifest")
    return data


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; the first mismatch is the error."""
    for rel, entry in manifest.get("files", {}).items():
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
    """For an export: verify its files and make its bases' (and patches') relative paths
    absolute.

    Any other folder's recipe is returned unchanged: a build's relative paths keep meaning
    "relative to where you run".
    """
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(recipe_data, dict):
        return recipe_data
    verify_files(folder, manifest)
    bases = recipe_data.get("bases")
    if isinstance(bases, dict):
        for spec in bases.values():
            for key in ("path", "lora"):
                path = spec.get(key) if isinstance(spec, dict) else None
                if isinstance(path, str) and not Path(path).is_absolute():
                    spec[key] = str((folder / path).resolve())
    return recipe_data

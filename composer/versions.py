"""The versions that made an artifact: recorded in every build's metrics, export and port."""

from __future__ import annotations

import importlib.metadata
import platform

VERSIONED = ("compose-carry-on", "torch", "transformers", "safetensors", "tokenizers")


def package_versions() -> dict[str, str]:
    """Python's version and each installed package of VERSIONED (a missing one is left out)."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions

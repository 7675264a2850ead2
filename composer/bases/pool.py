"""Bases loaded once each, whichever mixtures use them (serving several mixtures).

A base's key is what its loaded copy is: the identity of its weights (`bases.identity`: the
sha256 of its config and weights files, so a card and a local folder holding the same files
are one base), its dtype, its quantization and the LoRA merged into it. Two mixtures whose
bases have one key share one copy; the same weights in another dtype or quantization are
another key and another copy. A card's name is not part of the key: two cards (or folders)
with the same files are one base, one card pulled again with other files is another.

Settings that do not change the weights but decide where and how the one copy runs
(`device_map`, `trust_remote_code`) must agree between the mixtures that share it: a copy
lives in one place. Disagreeing ones are refused in one line as the second mixture loads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from composer.bases.frozen import FrozenBase, load_base, resolve_folder
from composer.bases.identity import base_identity, weight_files
from composer.errors import BaseSourceError
from composer.files import sha256_file
from composer.recipe import BaseSpec


@dataclass(frozen=True)
class BaseKey:
    """What a loaded copy of a base is."""

    weights: str  # sha256 over the folder's config and weights files
    dtype: str
    quantization: str
    lora: str | None  # sha256 over the adapter's config and weights files

    def __str__(self) -> str:
        lora = f", lora {self.lora[:12]}" if self.lora else ""
        return f"weights {self.weights[:12]}, {self.dtype}, quantization {self.quantization}{lora}"


@dataclass
class _Loaded:
    base: FrozenBase
    spec: BaseSpec
    users: list[str]  # "mixture:base" names that share it, first the one that loaded it


def base_key(spec: BaseSpec, folder: Path) -> BaseKey:
    identity = base_identity(folder)
    parts = [identity["config_sha256"], *sorted(identity["weights_sha256"].items())]
    lora = None
    if spec.lora is not None:
        adapter = Path(spec.lora).expanduser()
        files = [adapter / "adapter_config.json", *weight_files(adapter)]
        lora = _digest([(f.name, sha256_file(f)) for f in files])
    return BaseKey(_digest(parts), spec.dtype, spec.quantization, lora)


def _digest(parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def load_frozen(
    name: str, spec: BaseSpec, *, fetch: bool = True, pool: BasePool | None = None, user: str = ""
) -> FrozenBase:
    """Base `name` as `spec` says: shared through `pool` where one is given, else loaded."""
    if pool is not None:
        return pool.load(name, spec, fetch=fetch, user=user)
    return load_base(name, spec, fetch=fetch)


class BasePool:
    """Frozen bases by `BaseKey`: `load` returns the copy already held, or loads it."""

    def __init__(self) -> None:
        self._held: dict[BaseKey, _Loaded] = {}

    def load(self, name: str, spec: BaseSpec, *, fetch: bool = True, user: str = "") -> FrozenBase:
        """Base `name` of mixture `user` as `spec` says, shared with every mixture that loaded
        the same key; refused where `device_map` or `trust_remote_code` disagree with theirs."""
        key = base_key(spec, resolve_folder(spec, fetch=fetch))
        held = self._held.get(key)
        if held is None:
            self._held[key] = _Loaded(load_base(name, spec, fetch=fetch), spec, [f"{user}:{name}"])
            return self._held[key].base
        for setting in ("device_map", "trust_remote_code"):
            mine, theirs = getattr(spec, setting), getattr(held.spec, setting)
            if mine != theirs:
                raise BaseSourceError(
                    f"base '{name}' of mixture '{user}' is the base '{held.users[0]}' loads "
                    f"({key}) with {setting} {mine!r}, not {theirs!r}: one copy is shared, so "
                    "the mixtures must agree on it"
                )
        held.users.append(f"{user}:{name}")
        return held.base

    def users(self) -> dict[BaseKey, list[str]]:
        """Each held base's key and the "mixture:base" names that share it."""
        return {key: list(held.users) for key, held in self._held.items()}

    def __len__(self) -> int:
        return len(self._held)

"""One base identity: every weights format counts, and a rewritten file is seen whatever its mtime.

The feature cache's key, compare's mixture key, the export's and port's records all read it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_yaml
from safetensors import safe_open

from composer.artifacts.port import head_rows
from composer.bases.identity import base_identity
from composer.compare.runner import resolve_side
from composer.features.cache import cache_key
from composer.recipe import recipe_from_dict


def _rewrite_last_byte(path: Path) -> None:
    """Change one byte of the file in place, keeping its size and its mtime."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_identity_counts_every_weights_format_and_every_byte(tiny, tmp_path):
    folder = shutil.copytree(tiny["llama"], tmp_path / "base")
    first = base_identity(folder)
    assert set(first["weights_sha256"]) == {"model.safetensors"}
    (folder / "extra.gguf").write_bytes(b"gguf")
    (folder / "old.pth").write_bytes(b"pth")
    second = base_identity(folder)
    assert set(second["weights_sha256"]) == {"model.safetensors", "extra.gguf", "old.pth"}
    _rewrite_last_byte(folder / "model.safetensors")
    third = base_identity(folder)
    assert (
        third["weights_sha256"]["model.safetensors"] != first["weights_sha256"]["model.safetensors"]
    )
    assert third["config_sha256"] == first["config_sha256"]


def test_cache_and_compare_keys_change_with_the_weights(tiny, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny["llama"], tmp_path / "base")
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "copy.yaml").write_text(
        f"name: tiny-copy\nrole: chat\nfamily: llama\nsource: {{kind: folder, path: {folder}}}\n"
    )
    monkeypatch.setenv("COMPOSE_BASES_DIR", str(cards))
    recipe = recipe_from_dict(yaml.safe_load(recipe_yaml({"a": folder}, "a", ["a@1"])), "test")
    cache_before = cache_key(recipe, {"a": folder})[0]
    side_before = resolve_side("A", "tiny-copy").key
    _rewrite_last_byte(folder / "model.safetensors")  # same size, same mtime
    assert cache_key(recipe, {"a": folder})[0] != cache_before
    assert resolve_side("A", "tiny-copy").key != side_before


def test_head_rows_read_the_head_or_the_tied_embedding(tiny):
    for name in ("llama", "qwen2"):  # llama ties its head to the embedding; qwen2 does not
        with safe_open(str(tiny[name] / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
            key = "lm_head.weight" if "lm_head.weight" in keys else "model.embed_tokens.weight"
            rows = handle.get_slice(key).get_shape()[0]
        assert head_rows(tiny[name]) == rows


def test_a_model_opened_to_run_hashes_no_weights(tiny, tmp_path, monkeypatch):
    """`compose generate`, `chat` and the lm-eval adapter open a base alone to run it: its
    weights are loaded, never hashed (a result key is compare's and answer's, not theirs)."""
    import composer.bases.identity as identity
    from composer.compare.runner import open_model

    folder = shutil.copytree(tiny["llama"], tmp_path / "base")

    def refuse(*_args: object) -> str:
        raise AssertionError("weights hashed")

    monkeypatch.setattr(identity, "_sha256_at", refuse)
    alone = open_model(f"{folder}:bfloat16")
    assert alone.anchor.model.dtype == torch.bfloat16
    assert resolve_side("model", str(folder), keyed=False).key == ""
    with pytest.raises(AssertionError, match="weights hashed"):
        resolve_side("model", str(folder))  # compare's side: keyed

"""Checkpoints: the carry-on's keys in safetensors, written atomically, loaded strictly.

Every file goes to a temporary name in the same folder, is fsynced, then renamed, so a crash
leaves either the old file or the new one, never half of one. Nothing is unpickled: weights are
safetensors, optimizer state is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from torch import nn

from composer.errors import CheckpointError
from composer.files import atomic_write, fsync_dir, staging_dir, write_json
from composer.model.weights import WEIGHTS, load_weights, save_weights


def save_training_state(
    folder: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict
) -> Path:
    """Write `folder/step-NNNNNN/` atomically (built under a temp name, then renamed)."""
    final = folder / f"step-{step:06d}"
    tmp = staging_dir(final)
    try:
        save_weights(tmp / WEIGHTS, module)
        atomic_write(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
        write_json(tmp / "trainer.json", {"step": step, **trainer})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `step-*` folder (temp folders of a killed save are skipped)."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def load_training_state(
    checkpoint: Path, module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    load_weights(checkpoint / WEIGHTS, module)
    try:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        return json.loads((checkpoint / "trainer.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot resume from this checkpoint: {exc}") from exc


def prune_checkpoints(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer.json").is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)

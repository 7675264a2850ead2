"""The folder format of a built mixture: its resolved recipe and its carry-on's weights.

Training writes these files and everything else (loading, export, port, serving) reads them
through here. Weights are the carry-on's keys only, in safetensors, written atomically (a crash
leaves the old file or the new one) and loaded strictly: a missing, unexpected, misshapen,
retyped or non-finite key is an error, never a silent cast.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from composer.errors import CheckpointError
from composer.files import atomic_write

RECIPE_FILE = "recipe.yaml"  # a mixture directory's resolved recipe

WEIGHTS = "carry_on.safetensors"


def save_weights(path: Path, module: nn.Module) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(path: Path, module: nn.Module) -> None:
    """Load exactly the module's keys; missing, unexpected or misshapen keys are an error."""
    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: keys do not match the carry-on (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, "
                f"the carry-on expects {tuple(expected[key].shape)}"
            )
        # load_state_dict would cast another dtype silently, and NaN weights generate nothing.
        if value.dtype != expected[key].dtype:
            raise CheckpointError(
                f"{path}: {key} is {value.dtype}, the carry-on expects {expected[key].dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
    module.load_state_dict(state, strict=True)

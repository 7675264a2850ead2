"""Load a mixture directory (a build or an export) back as a Mixture."""

from __future__ import annotations

from pathlib import Path

import yaml

from composer.artifacts.manifest import resolve_export
from composer.errors import CheckpointError
from composer.model.mixture import Mixture
from composer.recipe import Recipe, recipe_from_dict
from composer.training.checkpoint import RECIPE_FILE, WEIGHTS, load_weights


def load_mixture(folder: str | Path, *, fetch: bool = True) -> Mixture:
    """A mixture directory (resolved recipe + carry-on weights) back as a Mixture."""
    folder = Path(folder)
    # An export checks its files and names its bases by paths relative to itself.
    recipe = read_mixture_recipe(folder)
    mixture = Mixture.from_recipe(recipe, fetch=fetch)
    load_weights(folder / WEIGHTS, mixture.carry_on)
    mixture.carry_on.eval()
    return mixture


def read_mixture_recipe(mixture_dir: Path) -> Recipe:
    """The resolved recipe of a mixture directory (a build or an export, whose files are
    checked and whose relative paths are resolved); refused if the folder is not one."""

    recipe_path = mixture_dir / RECIPE_FILE
    for needed in (recipe_path, mixture_dir / WEIGHTS):
        if not needed.is_file():
            raise CheckpointError(
                f"{mixture_dir} is not a mixture directory: {needed.name} is missing"
            )
    data = resolve_export(mixture_dir, yaml.safe_load(recipe_path.read_text()))
    return recipe_from_dict(data, str(recipe_path))

"""Load a mixture directory (a build or an export) back as a LiveMixture."""

from __future__ import annotations

from pathlib import Path

import yaml

from composer.artifacts.manifest import resolve_export
from composer.bases.pool import BasePool
from composer.errors import CheckpointError
from composer.model.mixture import LiveMixture
from composer.model.weights import RECIPE_FILE, WEIGHTS, load_weights
from composer.recipe import Recipe, recipe_from_dict


def load_mixture(
    folder: str | Path,
    *,
    fetch: bool = True,
    trust_remote_code: bool = False,
    pool: BasePool | None = None,
) -> LiveMixture:
    """A mixture directory (resolved recipe + carry-on weights) back as a LiveMixture; with
    `pool`, over the bases it already holds (several mixtures served together).

    A base whose recipe sets `trust_remote_code` loads only when the caller passes
    `trust_remote_code=True` too (the user's own flag): a mixture folder cannot decide to run
    the Python its author shipped.
    """
    folder = Path(folder)
    # An export checks its files and names its bases by paths relative to itself.
    recipe = read_mixture_recipe(folder, trust_remote_code=trust_remote_code)
    mixture = LiveMixture.from_recipe(recipe, fetch=fetch, pool=pool)
    load_weights(folder / WEIGHTS, mixture.carry_on)
    mixture.carry_on.eval()
    return mixture


def read_mixture_recipe(mixture_dir: Path, *, trust_remote_code: bool = False) -> Recipe:
    """The resolved recipe of a mixture directory (a build or an export, whose files are
    checked and whose relative paths are resolved); refused if the folder is not one, or if a
    base asks to run shipped code and `trust_remote_code` (the user's flag) is off."""

    recipe_path = mixture_dir / RECIPE_FILE
    for needed in (recipe_path, mixture_dir / WEIGHTS):
        if not needed.is_file():
            raise CheckpointError(
                f"{mixture_dir} is not a mixture directory: {needed.name} is missing"
            )
    try:
        data = yaml.safe_load(recipe_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{recipe_path}: cannot read the recipe: {first}") from exc
    data = resolve_export(mixture_dir, data)
    recipe = recipe_from_dict(data, str(recipe_path))
    asking = [name for name, spec in recipe.bases.items() if spec.trust_remote_code]
    if asking and not trust_remote_code:
        raise CheckpointError(
            f"{recipe_path}: base '{asking[0]}' sets trust_remote_code (it would run Python "
            "shipped with it); pass --trust-remote-code if you trust its author"
        )
    return recipe

"""What a comparison produces: its two sides and each suite's items, scores and verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.compare.stats import Comparison
from composer.compare.suites import Suite
from composer.recipe import Recipe

if TYPE_CHECKING:
    from composer.bases.pool import BasePool
    from composer.model.mixture import LiveMixture


@dataclass
class Side:
    label: str  # "A" or "B"
    given: str  # what the user passed
    kind: str  # "mixture" or "base"
    recipe: Recipe
    recipe_text: str
    folder: Path | None = None  # the mixture directory; None for a base alone
    key: str = ""
    trust_remote_code: bool = False  # the user's flag: a base may run the Python it ships

    def load(self, *, fetch: bool = True, pool: BasePool | None = None) -> LiveMixture:
        """The side, loaded to run; with `pool`, over the bases it already holds. A base alone
        is `AnchorAlone`: the base's own head on its own final state, no carry-on (loaded as
        its spec says: a recipe's own anchor runs shipped code where that recipe asks, as
        `compose build` runs it; a card or model folder alone never asks)."""
        from composer.artifacts.load import load_mixture
        from composer.bases.pool import load_frozen
        from composer.model.mixture import AnchorAlone

        if self.folder is not None:
            return load_mixture(
                self.folder, fetch=fetch, trust_remote_code=self.trust_remote_code, pool=pool
            )
        role = self.recipe.anchor
        spec = self.recipe.bases[role]
        base = load_frozen(role, spec, fetch=fetch, pool=pool, user=self.recipe.name)
        return AnchorAlone.of(self.recipe.name, base, spec)


@dataclass
class SuiteResult:
    suite: Suite
    items: list[dict[str, Any]]  # id, input, a, b, a_score, b_score
    skipped: int = 0
    unit: str = ""  # loss suites: "token" or "byte"
    comparison: Comparison | None = None
    gates: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> source -> weight


@dataclass
class CompareResult:
    a: Side
    b: Side
    level: float
    suites: list[SuiteResult]
    computed: dict[str, int]  # side label -> items run (not taken from the cache)
    out_dir: Path | None = None
    left_out: int = 0  # each suite's first items left out (`--skip`)

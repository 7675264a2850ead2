"""What a comparison produces: its two sides and each suite's items, scores and verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.compare.stats import Comparison
from composer.compare.suites import Suite
from composer.recipe import Recipe


@dataclass
class Side:
    label: str  # "A" or "B"
    given: str  # what the user passed
    kind: str  # "mixture" or "base"
    recipe: Recipe
    recipe_text: str
    folder: Path | None = None  # the mixture directory; None for a base alone
    key: str = ""

    def load(self) -> Any:
        from composer.artifacts.load import load_mixture
        from composer.model.mixture import LiveMixture

        if self.folder is not None:
            return load_mixture(self.folder)
        mixture = LiveMixture.from_recipe(self.recipe)
        mixture.carry_on.eval()  # never trained: run as a loaded mixture runs
        return mixture


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

"""The reports of a comparison: report.json (every item), report.md, chart.png; all atomic."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.compare.stats import POWER
from composer.files import write_json, write_png, write_text

if TYPE_CHECKING:
    from composer.compare.results import CompareResult, Side, SuiteResult


def metric_name(result: SuiteResult) -> str:
    if result.suite.kind == "loss":
        return f"nats/{result.unit}"
    return result.suite.metric


def unjailed(result: CompareResult) -> dict[str, int]:
    """Per suite, how many item results ran generated code outside the jail (--unsafe-no-jail)."""
    counts = {
        s.suite.name: sum(
            1
            for row in s.items
            for side in ("a", "b")
            if row[side].get("isolation", "jail") != "jail"
        )
        for s in result.suites
    }
    return {name: n for name, n in counts.items() if n}


def to_json(result: CompareResult, *, items: bool = True) -> dict[str, Any]:
    """report.json: both sides, each suite's settings, verdict and router weights, and (with
    `items`) every item of both sides."""
    return {
        "level": result.level,
        "unjailed": unjailed(result),
        "sides": {side.label: _side(side) for side in (result.a, result.b)},
        "computed": result.computed,
        "left_out": result.left_out,
        "suites": {
            s.suite.name: {
                "description": s.suite.description,
                "kind": s.suite.kind,
                "metric": metric_name(s),
                "higher_is_better": s.suite.higher_is_better,
                "settings": s.suite.settings,
                "skipped": s.skipped,
                "comparison": s.comparison.to_dict() if s.comparison else None,
                "gates": s.gates,
                **({"items": s.items} if items else {}),
            }
            for s in result.suites
        },
    }


def _side(side: Side) -> dict[str, Any]:
    return {
        "given": side.given,
        "kind": side.kind,
        "folder": str(side.folder) if side.folder else None,
        "key": side.key,
        "recipe": side.recipe.model_dump(mode="json"),
    }


def write_reports(result: CompareResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", to_json(result))
    write_text(out / "report.md", markdown(result))
    plot(result, out / "chart.png")


def recipe_diff(a: Side, b: Side) -> str:
    lines = difflib.unified_diff(
        a.recipe_text.splitlines(),
        b.recipe_text.splitlines(),
        fromfile=f"A: {a.given}",
        tofile=f"B: {b.given}",
        lineterm="",
    )
    return "\n".join(lines) or "(the recipes are identical)"


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(text: Any, limit: int = 400) -> str:
    text = str(text)
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", "<br>")


def summary_rows(result: CompareResult, digits: int = 4) -> list[list[str]]:
    """suite, metric, n, A, B, B − A, interval, test, p, detectable, verdict: for the terminal
    and markdown."""
    rows = []
    for s in result.suites:
        c = s.comparison
        if c is None:
            unscored = ["–"] * 7 + ["side by side (not scored)"]
            rows.append(
                [s.suite.name, metric_name(s) or "generations", str(len(s.items)), *unscored]
            )
            continue
        p = "–" if c.p_value is None else f"{c.p_value:.3g}"
        test = "McNemar exact" if c.test == "mcnemar" else "paired bootstrap"
        means = [fmt(x, digits) for x in (c.a_mean, c.b_mean, c.diff)]
        interval = f"[{fmt(c.ci[0], digits)}, {fmt(c.ci[1], digits)}]"
        detectable = "none" if c.mde is None else f"≥ {_difference(s, c.mde, digits)}"
        row = [s.suite.name, metric_name(s), str(c.n), *means, interval, test, p, detectable]
        rows.append([*row, c.verdict])
    return rows


SUMMARY_COLUMNS = [
    "suite",
    "metric",
    "n",
    "A",
    "B",
    "B − A",
    "interval",
    "test",
    "p",
    "detectable",
    "verdict",
]


def _difference(s: SuiteResult, value: float, digits: int = 4) -> str:
    """A difference in the suite's metric: pass rates in percentage points."""
    if s.suite.kind == "pass":
        return f"{100 * value:.0f} points"
    return f"{fmt(value, digits)} {metric_name(s)}"


def power_note(s: SuiteResult) -> str:
    """The verdict and how large a difference its item count could detect, in words."""
    c = s.comparison
    if c is None:
        return ""
    p = "" if c.p_value is None else f" (p={c.p_value:.2g})"
    if c.mde is None:
        return (
            f"{c.verdict}{p}; at {c.n} items ({c.mde_basis}) no difference would be detected "
            f"{POWER:.0%} of the time"
        )
    return (
        f"{c.verdict}{p}; at {c.n} items only a difference of ≥ {_difference(s, c.mde)} would "
        f"be detected {POWER:.0%} of the time ({c.mde_basis})"
    )


def markdown(result: CompareResult) -> str:
    a, b = result.a, result.b
    pct = f"{result.level:.0%}"
    lines = [
        f"# compare: A = `{a.given}` vs B = `{b.given}`",
        "",
        f"- A: {a.kind}, key `{a.key[:16]}`",
        f"- B: {b.kind}, key `{b.key[:16]}`",
        "",
    ]
    if outside := unjailed(result):
        counts = ", ".join(f"{n} {name} result(s)" for name, n in outside.items())
        lines += [
            f"> **Warning: {counts} ran generated code without the sandbox's jail "
            "(`--unsafe-no-jail`), with the user's own rights.** See README for what that leaves "
            "open.",
            "",
        ]
    lines += [
        "## Recipes (A → B)",
        "",
        "```diff",
        recipe_diff(a, b),
        "```",
        "",
        f"## Summary ({pct} level)",
        "",
        "Differences are B − A on the same items. Pass/fail suites are decided by McNemar's "
        f"exact test (p < {1 - result.level:.2g}), the others by whether the {pct} paired "
        "bootstrap interval of the mean difference excludes zero. Lower loss is better. "
        f"`detectable`: the smallest difference these items would find significant {POWER:.0%} "
        "of the time (McNemar: exact, at the observed share of items where the sides differ; "
        "losses: normal approximation from the spread of the per-item differences).",
        "",
    ]
    if result.left_out:
        lines += [f"Each suite's first {result.left_out} items are left out (`--skip`).", ""]
    cols = [c.replace("interval", f"{pct} interval") for c in SUMMARY_COLUMNS]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(result)]
    gates = [(s.suite.name, side, g) for s in result.suites for side, g in s.gates.items()]
    if gates:
        lines += [
            "",
            "## Gate statistics",
            "",
            "Mean router weight of each tapped source over the scored positions.",
            "",
            "| suite | side | weights |",
            "|---|---|---|",
        ]
        for name, side, g in gates:
            weights = ", ".join(f"{src} {w:.3f}" for src, w in g.items())
            lines.append(f"| {name} | {side} | {weights} |")
    for s in result.suites:
        lines += ["", f"## {s.suite.name}", "", s.suite.description + "."]
        if s.comparison is not None:
            lines += ["", power_note(s)[:1].upper() + power_note(s)[1:] + "."]
        if s.skipped:
            lines.append(f"{s.skipped} item(s) skipped on one side (too long for its tokens).")
        lines += ["", *(_generations(s) if s.suite.kind == "generations" else _per_item(s))]
    return "\n".join(lines) + "\n"


def _per_item(s: SuiteResult) -> list[str]:
    lines = [
        f"<details><summary>{len(s.items)} items</summary>",
        "",
        "| item | A | B | A detail | B detail |",
        "|---|---|---|---|---|",
    ]
    for row in s.items:
        lines.append(
            f"| {_cell(row['id'])} | {fmt(row['a_score'])} | {fmt(row['b_score'])} | "
            f"{_cell(_detail(row['a']), 120)} | {_cell(_detail(row['b']), 120)} |"
        )
    return [*lines, "", "</details>"]


def _detail(result: dict[str, Any]) -> str:
    for key in ("skipped", "status", "predicted"):
        if key in result:
            return f"{key}: {result[key]}"
    return ""


def _generations(s: SuiteResult) -> list[str]:
    lines: list[str] = []
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in s.items:
        by_category.setdefault(str(row["input"].get("category", "all")), []).append(row)
    for category, rows in by_category.items():
        lines += [f"### {category}", "", "| prompt | A | B |", "|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {_cell(row['input'].get('prompt', row['id']), 300)} | "
                f"{_cell(row['a'].get('output', ''))} | {_cell(row['b'].get('output', ''))} |"
            )
        lines.append("")
    return lines


def plot(result: CompareResult, path: Path) -> None:
    """One row per scored suite: B − A with its interval, signed so that right means B better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [s for s in result.suites if s.comparison is not None]
    fig, axes = plt.subplots(max(1, len(scored)), 1, figsize=(7, 1.1 + 1.0 * max(1, len(scored))))
    axes = list(axes) if len(scored) > 1 else [axes]
    for ax, s in zip(axes, scored, strict=False):
        c = s.comparison
        assert c is not None
        sign = 1.0 if s.suite.higher_is_better else -1.0
        low, high = sorted((sign * c.ci[0], sign * c.ci[1]))
        centre = sign * c.diff
        color = {"A better": "tab:red", "B better": "tab:green"}.get(c.verdict, "tab:grey")
        ax.errorbar(
            [centre], [0], xerr=[[centre - low], [high - centre]], fmt="o", color=color, capsize=5
        )
        ax.axvline(0, color="black", lw=0.8)
        # An all-zero difference still gets a readable axis: ±1 for rates, ±0.1 for losses.
        span = max(abs(low), abs(high)) * 1.3 or (1.0 if s.suite.kind == "pass" else 0.1)
        ax.set_xlim(-span, span)
        ax.set_yticks([0], [f"{s.suite.name}\n{metric_name(s)}"])
        ax.set_title(c.verdict, fontsize=9, loc="right")
    if not scored:
        axes[0].text(0.5, 0.5, "no scored suites", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(
        f"B over A with {result.level:.0%} intervals (scores B − A, losses A − B; "
        "right of 0: B better)",
        fontsize=9,
    )
    fig.tight_layout()
    write_png(path, fig)

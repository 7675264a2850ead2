"""What a build or a training run reports: its last line, a warning on harm, the loss plot and
the README card of the mixture directory. Everything here renders metrics already measured
(composer.training.build); nothing loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.files import write_png
from composer.model.card import table, use_section
from composer.model.weights import RECIPE_FILE, WEIGHTS
from composer.recipe import Recipe
from composer.training.train import TrainResult

HARM_TOLERANCE = 0.02  # off-domain loss may rise this much before a build warns


def harm_warning(metrics: dict[str, Any]) -> str | None:
    """One line when the mixture's off-domain loss exceeds the anchor's by more than 2%."""
    off = metrics.get("off_domain")
    if not off or off["change"] <= HARM_TOLERANCE:
        return None
    return (
        f"warning: off-domain loss rose {off['change']:+.1%} over the anchor's "
        f"({off['anchor']:.4f} → {off['mixture']:.4f}): the mixture harms what it was not "
        "trained on; raise train.preserve.weight or add general text to the data"
    )


def summary(metrics: dict[str, Any]) -> str:
    """The build's last line: held-out loss per trained domain and off-domain, anchor vs
    mixture."""
    parts = [
        f"eval loss {metrics['eval_loss_mixture']:.4f} (anchor {metrics['eval_loss_anchor']:.4f})"
    ]
    for domain, d in (metrics.get("domains") or {}).items():
        if not domain.startswith("general/"):
            loss = d["nats_per_char"]
            parts.append(f"{domain} {loss['mixture']:.4f} (anchor {loss['anchor']:.4f}) nats/char")
    off = metrics.get("off_domain")
    if off:
        parts.append(
            f"off-domain {off['mixture']:.4f} (anchor {off['anchor']:.4f}, {off['change']:+.1%})"
        )
    else:
        parts.append("off-domain not measured (preservation off)")
    return "; ".join(parts) + f"; {metrics['trainable_params']:,} trainable params"


def plot_losses(path: Path, result: TrainResult, anchor_eval: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if result.train_loss:
        steps, losses = zip(*result.train_loss, strict=True)
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train loss")
    if result.eval_loss:
        steps, losses = zip(*result.eval_loss, strict=True)
        ax.plot(steps, losses, "o-", label="eval loss (mixture)")
    ax.axhline(anchor_eval, color="grey", ls="--", label="eval loss (anchor alone)")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)


def model_card(recipe: Recipe, metrics: dict[str, Any]) -> str:
    bases = "\n".join(
        f"- `{name}`: {spec.card or spec.path} ({spec.dtype}, quantization {spec.quantization})"
        + (" — anchor" if name == recipe.anchor else "")
        for name, spec in recipe.bases.items()
    )
    files = f"The resolved recipe is in `{RECIPE_FILE}`, the carry-on weights in `{WEIGHTS}`."
    return f"""# {recipe.name}

A carry-on mixture built by `compose build`: frozen bases, a trained carry-on of
{metrics["trainable_params"]:,} parameters writing a gated correction through the anchor's LM head.

## Bases
{bases}

Taps: {", ".join(recipe.taps)}. Carry-on: {len(recipe.carry_on.blocks)} blocks of width
{recipe.carry_on.width}, {recipe.carry_on.heads} heads.

## Training
{metrics["steps"]} steps, {metrics["tokens"]:,} tokens, data `{recipe.train.data.kind}`.

{_losses(metrics)}
{_domain_table(metrics.get("domains"))}
{use_section(files)}"""


def _losses(metrics: dict[str, Any]) -> str:
    """The held-out loss table, anchor alone and mixture, off-domain too when it was measured."""
    rows = [
        ("anchor alone", f"{metrics['eval_loss_anchor']:.4f}"),
        ("mixture", f"{metrics['eval_loss_mixture']:.4f}"),
    ]
    off = metrics.get("off_domain")
    if off:
        rows += [
            ("off-domain general text, anchor alone", f"{off['anchor']:.4f}"),
            ("off-domain general text, mixture", f"{off['mixture']:.4f} ({off['change']:+.1%})"),
        ]
        warning = harm_warning(metrics)
        after = f"\n**{warning}**\n" if warning else ""
    else:
        after = (
            "\nPreservation was off (`train.preserve: none`): off-domain harm is not measured.\n"
        )
    return table(("held-out next-token loss", "value"), rows) + "\n" + after


def _domain_table(domains: dict[str, Any] | None) -> str:
    if not domains:
        return ""
    first = next(iter(domains.values()))
    losses = list(first["nats_per_char"])
    sources = list(first["gate_mean"])
    head = ["domain", *(f"{k} (nats/char)" for k in losses), *(f"gate {s}" for s in sources)]
    rows = [
        [
            domain,
            *(f"{d['nats_per_char'][k]:.4f}" for k in losses),
            *(f"{d['gate_mean'][s]:.3f}" for s in sources),
        ]
        for domain, d in domains.items()
    ]
    return (
        f"\nPer domain, held out (loss per character of the target text):\n\n{table(head, rows)}\n"
    )

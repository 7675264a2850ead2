"""Build a carry-on for a recipe from its bases' configs alone (no weights read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.bases.frozen import read_config, tokenizer_fingerprint
from composer.errors import RecipeError
from composer.model.carry_on import CarryOn
from composer.recipe import Recipe

# Anchors whose decoder layers `composer.model.upper` runs on their own (one rotary embedding
# for every layer, no sliding windows): writing into the anchor's layers needs that.
WRITE_AT_FAMILIES = ("llama", "qwen2")


def aligned_bases(recipe: Recipe, folders: dict[str, Path]) -> set[str]:
    """Bases whose tokenizer differs from the anchor's: they need cross-tokenizer alignment."""
    anchor_fp = tokenizer_fingerprint(folders[recipe.anchor])
    return {name for name, f in folders.items() if tokenizer_fingerprint(f) != anchor_fp}


def new_carry_on(
    recipe: Recipe, folders: dict[str, Path], configs: dict[str, dict[str, Any]]
) -> tuple[CarryOn, set[str]]:
    """A fresh carry-on for the recipe (from configs alone) and the bases that need alignment.

    Taps of aligned bases get a learned null vector for positions where they have no token."""
    aligned = aligned_bases(recipe, folders)
    tap_dims = {str(t): int(configs[t.base]["hidden_size"]) for t in recipe.tap_refs}
    optional = {str(t) for t in recipe.tap_refs if t.base in aligned}
    anchor_dim = int(configs[recipe.anchor]["hidden_size"])
    experts = expert_taps(recipe, configs)
    return CarryOn(recipe.carry_on, tap_dims, anchor_dim, optional, experts), aligned


def expert_taps(recipe: Recipe, configs: dict[str, dict[str, Any]]) -> list[str]:
    """The tap of each expert base's last layer (the state its head reads), in recipe order."""
    return [f"{e}@{configs[e]['num_hidden_layers']}" for e in recipe.carry_on.experts]


def check_compatible(recipe: Recipe, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Rules that need the bases' configs: layers in range, experts, context length."""
    configs = {name: read_config(folder) for name, folder in folders.items()}
    for i, tap in enumerate(recipe.tap_refs):
        n = configs[tap.base]["num_hidden_layers"]
        if tap.layer > n:
            raise RecipeError(
                f"taps.{i}: layer {tap.layer} out of range for base '{tap.base}' "
                f"(it has {n} layers; taps go from 0, the embeddings, to {n}, the final norm)"
            )
    taps = {str(t) for t in recipe.tap_refs}
    aligned = aligned_bases(recipe, folders) if recipe.carry_on.experts else set()
    for i, name in enumerate(recipe.carry_on.experts):
        if name in aligned:
            raise RecipeError(
                f"carry_on.experts.{i}: base '{name}' does not share the anchor's tokenizer, "
                "so its next-token log-probabilities are over other tokens"
            )
        last = expert_taps(recipe, configs)[i]
        if last not in taps:
            raise RecipeError(
                f"carry_on.experts.{i}: tap {last}, the last layer of '{name}' (its head reads "
                "that state), is not among the taps"
            )
        if configs[name].get("vocab_size") != configs[recipe.anchor].get("vocab_size"):
            raise RecipeError(
                f"carry_on.experts.{i}: base '{name}' has a vocabulary of "
                f"{configs[name].get('vocab_size')} tokens, the anchor "
                f"{configs[recipe.anchor].get('vocab_size')}"
            )
    layer, anchor = recipe.carry_on.write_at, configs[recipe.anchor]
    if layer is not None:
        if anchor.get("model_type") not in WRITE_AT_FAMILIES:
            raise RecipeError(
                f"carry_on.write_at: the anchor is a {anchor.get('model_type')} model; writing "
                f"into its layers is supported for {', '.join(WRITE_AT_FAMILIES)} anchors"
            )
        if layer >= anchor["num_hidden_layers"]:
            raise RecipeError(
                f"carry_on.write_at: {layer} leaves no anchor layer above it (it has "
                f"{anchor['num_hidden_layers']}; write at 1 to {anchor['num_hidden_layers'] - 1}, "
                "or leave it unset to correct the final state)"
            )
    context = configs[recipe.anchor].get("max_position_embeddings")
    if context and recipe.train.seq_len > context:
        raise RecipeError(
            f"train.seq_len: {recipe.train.seq_len} exceeds the anchor's context of {context}"
        )
    return configs

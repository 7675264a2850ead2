"""Plan before you run: shapes, parameter counts and a memory estimate, from config.json alone.

No weights are read. Base parameter counts come from building the model on the meta device; the
carry-on is built on the meta device too, so its count is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from composer.bases.frozen import resolve_folder
from composer.model.carry_on import module_key
from composer.model.factory import check_compatible, new_carry_on
from composer.recipe import Recipe

# Bytes per frozen parameter by dtype / quantization (nf4 and int8 include their scales).
_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.06, "nf4": 0.56}
_ADAMW_BYTES = 4 + 4 + 8  # weight, grad, two moments (fp32)


@dataclass
class BasePlan:
    name: str
    source: str
    model_type: str
    hidden_size: int
    layers: int
    vocab_size: int
    params: int
    dtype: str
    quantization: str
    weight_bytes: int


@dataclass
class TapPlan:
    tap: str
    shape: str
    projection_params: int
    shortcut_into: list[int]


@dataclass
class Plan:
    recipe: str
    anchor: str
    bases: list[BasePlan]
    taps: list[TapPlan]
    carry_on: list[dict[str, Any]]
    trainable_params: int
    frozen_params: int
    memory_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _base_params(folder: Path) -> tuple[int, int]:
    """(total params, params inside Linear layers of the decoder) from the config alone."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and (
        head is not None and head.weight is not embed.weight
    ):
        total -= head.weight.numel()  # tied at load time, not on the meta device
    linear = sum(
        m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)
    )
    return total, linear


def make_plan(recipe: Recipe, *, fetch: bool = False) -> Plan:
    folders = {name: resolve_folder(spec, fetch=fetch) for name, spec in recipe.bases.items()}
    configs = check_compatible(recipe, folders)
    bases = []
    frozen_bytes = 0.0
    for name, spec in recipe.bases.items():
        cfg = configs[name]
        total, linear = _base_params(folders[name])
        # bitsandbytes quantizes the decoder's Linear layers; embeddings and head keep the dtype.
        q = spec.quantization if spec.quantization != "none" else spec.dtype
        nbytes = linear * _BYTES[q] + (total - linear) * _BYTES[spec.dtype]
        frozen_bytes += nbytes
        bases.append(
            BasePlan(
                name=name,
                source=spec.card or str(spec.path),
                model_type=cfg.get("model_type", "?"),
                hidden_size=cfg["hidden_size"],
                layers=cfg["num_hidden_layers"],
                vocab_size=cfg["vocab_size"],
                params=total,
                dtype=spec.dtype,
                quantization=spec.quantization,
                weight_bytes=int(nbytes),
            )
        )
    dims = {b.name: b.hidden_size for b in bases}
    tap_dims = {str(t): dims[t.base] for t in recipe.tap_refs}
    anchor_dim = dims[recipe.anchor]
    with torch.device("meta"):
        carry_on, _ = new_carry_on(recipe, folders, configs)
    trainable = sum(p.numel() for p in carry_on.parameters() if p.requires_grad)
    B, T = recipe.train.batch_size, recipe.train.seq_len
    taps = []
    for t in recipe.tap_refs:
        into = [k for k, b in enumerate(recipe.carry_on.blocks) if str(t) in b.shortcuts]
        proj = carry_on.tap_projs[module_key(str(t))]
        norm = carry_on.tap_norms[module_key(str(t))]
        n = sum(p.numel() for p in [*proj.parameters(), *norm.parameters()])
        taps.append(TapPlan(str(t), f"{B}×{T}×{dims[t.base]}", n, into))
    modules = []
    for name, module in carry_on.named_children():
        n = sum(p.numel() for p in module.parameters())
        if n:
            modules.append({"module": name, "params": n})
    d = recipe.carry_on.width
    vocab = configs[recipe.anchor]["vocab_size"]
    n_blocks = len(recipe.carry_on.blocks)
    # Activations kept for backward: per block ~ (qkv, attn out, 2 norms, mlp in/out) floats per
    # token plus the attention matrix; the head keeps logits and their grad at loss positions,
    # and each expert base's head its log-probabilities there (composer.model.experts).
    carry_act = n_blocks * B * T * (10 * d + 3 * d * recipe.carry_on.mlp_ratio) * 4
    carry_act += n_blocks * B * recipe.carry_on.heads * T * T * 4
    head_act = B * T * vocab * 4 * (2 + len(recipe.carry_on.experts))
    widest = max(
        max(c.get("intermediate_size", 4 * c["hidden_size"]), c["hidden_size"])
        for c in configs.values()
    )
    base_act = B * T * widest * 4 * 4
    if recipe.carry_on.write_at is not None:
        # The anchor's layers above write_at run in training: their activations are kept too.
        a = configs[recipe.anchor]
        upper = a["num_hidden_layers"] - recipe.carry_on.write_at
        width = 6 * a["hidden_size"] + 3 * a.get("intermediate_size", 4 * a["hidden_size"])
        base_act += upper * B * T * (width + a["num_attention_heads"] * T) * 4
    memory = {
        "frozen_weights": int(frozen_bytes),
        "trainable_state": trainable * _ADAMW_BYTES,
        "activations": int(carry_act + head_act + base_act),
    }
    memory["total"] = sum(memory.values())
    size = getattr(recipe.train.data, "size", None)
    if recipe.train.cache.enabled and size:
        # On disk, not in the total. Upper bound: every example at full length.
        per_token = sum(tap_dims.values()) + anchor_dim
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[recipe.train.cache.dtype]
        memory["feature_cache_on_disk"] = int(size * T * per_token * itemsize)
    return Plan(
        recipe=recipe.name,
        anchor=recipe.anchor,
        bases=bases,
        taps=taps,
        carry_on=modules,
        trainable_params=trainable,
        frozen_params=sum(b.params for b in bases),
        memory_bytes=memory,
    )


def validate_recipe(path: Path, overrides: list[str]) -> str:
    """Schema always; layer ranges, tokenizers and context when every base is local."""
    from composer.errors import BaseSourceError
    from composer.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    folders: dict[str, Path] = {}
    missing = []
    for name, spec in recipe.bases.items():
        try:
            folders[name] = resolve_folder(spec, fetch=False)
        except BaseSourceError:
            if spec.path is not None:
                raise
            missing.append(f"{name} ({spec.card})")
    if missing:
        return f"schema valid; base checks skipped, not pulled yet: {', '.join(missing)}"
    check_compatible(recipe, folders)
    return f"valid ({len(recipe.bases)} base(s), {len(recipe.taps)} taps checked)"

"""PEFT LoRA adapters merged into a base's weights as it loads, without importing peft.

A LoRA adapter stores, per targeted Linear, A (r × in) and B (out × r); its update is

    W ← W + s · B A,     s = lora_alpha / r   (lora_alpha / √r with rsLoRA)

with `r` and `lora_alpha` per module from `rank_pattern` / `alpha_pattern` when they match it.
Merged into an evolved version of the base it was trained on, this is PortLLM's θ_new + ΔW_old
(arXiv 2410.10870, eq. 3). Only plain LoRA on Linear layers is read: the adapter config's
fields are checked against an allow-list of fields and values, so a variant that changes the
forward or the base (DoRA, LoRA biases, modules_to_save, PiSSA-style initializations, a field
a later PEFT adds, …) is refused, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from composer.errors import PortError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _anything(value: Any) -> bool:
    return True


def _unset(value: Any) -> bool:
    return not value  # None, False, {} or []


def _flag(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _patterns(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(map(_number, value.values())))


# Every adapter config field read, and the values under which the adapter's forward is
# W x + s·B A x on Linear layers of the unchanged base. Any other field (one a later PEFT adds)
# or value is refused, naming the field: what is not known to be plain LoRA is not merged.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    # what the adapter is and where it was trained
    "peft_type": lambda v: v == "LORA",
    "task_type": _anything,
    "auto_mapping": _anything,
    "peft_version": _anything,
    "base_model_name_or_path": _anything,
    "revision": _anything,
    "inference_mode": _anything,
    # the update, as read_adapter computes it
    "r": lambda v: _number(v) and isinstance(v, int),
    "lora_alpha": _number,
    "rank_pattern": _patterns,
    "alpha_pattern": _patterns,
    "use_rslora": _flag,
    # which modules it was trained on; its weights file says which it patches, and each is
    # checked to be a float Linear of the base
    "target_modules": _anything,
    "exclude_modules": _anything,
    "layers_to_transform": _anything,
    "layers_pattern": _anything,
    # training only
    "lora_dropout": _anything,
    # random A with zero B (or random both): schemes such as PiSSA, OLoRA, CorDA or LoftQ
    # rewrite the base's weights at initialization, so W + s·BA would not be the trained model
    "init_lora_weights": lambda v: isinstance(v, bool) or v == "gaussian",
    "bias": lambda v: v in (None, "none"),
    # read only together with a field refused below
    "megatron_core": _anything,
    "qalora_group_size": _anything,
    # each of these changes the forward or the base when set
    **dict.fromkeys(
        (
            "use_dora",
            "lora_bias",
            "fan_in_fan_out",
            "modules_to_save",
            "trainable_token_indices",
            "target_parameters",
            "layer_replication",
            "alora_invocation_tokens",
            "arrow_config",
            "use_qalora",
            "use_bdlora",
            "megatron_config",
            "loftq_config",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "velora_config",
            "monteclora_config",
            "kasa_config",
            "astra_config",
            "ensure_weight_tying",
        ),
        _unset,
    ),
}


@dataclass
class LoraDelta:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float

    def weight(self) -> torch.Tensor:
        """ΔW (out, in) in float32, in PEFT's order of operations."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    deltas: dict[str, LoraDelta]  # module name in the causal LM -> its update


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: a pattern matches a module name by its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise PortError(f"lora {folder}: not a PEFT adapter folder ({CONFIG} is missing)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PortError(f"lora {path}: cannot read: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise PortError(f"lora {folder}: peft_type is {kind!r}, only LORA adapters are supported")
    for field, value in config.items():
        allowed = _FIELDS.get(field)
        if allowed is None:
            raise PortError(
                f"lora {folder}: unknown adapter config field {field!r}; only plain LoRA can "
                "be merged"
            )
        if not allowed(value):
            what = "is set" if allowed is _unset else f"is {value!r}"
            raise PortError(f"lora {folder}: {field} {what}; only plain LoRA can be merged")
    return config


def read_adapter(folder: str | Path) -> Adapter:
    """The adapter's updates per module, checked against its own config."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except FileNotFoundError as exc:
        raise PortError(f"lora {folder}: {WEIGHTS} is missing (a .bin adapter is refused)") from exc
    except (SafetensorError, OSError) as exc:
        raise PortError(f"lora {folder}/{WEIGHTS}: not a readable safetensors file") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if not key.startswith(_PREFIX) or match is None:
            raise PortError(f"lora {folder}: tensor {key} is not a LoRA A/B matrix of a Linear")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise PortError(f"lora {folder}: {WEIGHTS} holds no LoRA matrices")
    deltas = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise PortError(f"lora {folder}: {module} has lora_{''.join(ab)} but not both A and B")
        A, B = ab["A"], ab["B"]
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r")))
        alpha = float(
            _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
        )
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise PortError(
                f"lora {folder}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                f"not (r, in) and (out, r) with r = {r}"
            )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[module] = LoraDelta(A, B, scale)
    return Adapter(folder, config, deltas)


def _target(model: nn.Module, folder: Path, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PortError(f"lora {folder}: the base has no module {name}") from None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if module is head:
        # The anchor's head is also read straight from the base's files (composer.model.head).
        raise PortError(f"lora {folder}: {name} is the LM head; LoRA on the head is not supported")
    is_float = isinstance(module, nn.Linear) and module.weight.dtype in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    if not is_float:
        raise PortError(
            f"lora {folder}: {name} is a {type(module).__name__}, not a float Linear layer"
        )
    return module  # type: ignore[return-value]


def apply_lora(model: nn.Module, folder: str | Path, *, base: str | None = None) -> list[str]:
    """Merge the adapter in `folder` into `model`'s Linear weights; the modules patched.

    Every target is checked before any weight changes, so a refused adapter leaves the model
    as it was. `base` names the base in errors."""
    try:
        return _merge(model, read_adapter(folder))
    except PortError as exc:
        if base is None:
            raise
        raise PortError(f"base '{base}': {exc}") from exc


@torch.no_grad()
def _merge(model: nn.Module, adapter: Adapter) -> list[str]:
    targets = {}
    for name, delta in adapter.deltas.items():
        module = _target(model, adapter.folder, name)
        out_features, in_features = module.weight.shape
        if (delta.B.shape[0], delta.A.shape[1]) != (out_features, in_features):
            raise PortError(
                f"lora {adapter.folder}: {name} is {delta.B.shape[0]}×{delta.A.shape[1]} in the "
                f"adapter but {out_features}×{in_features} in the base"
            )
        targets[name] = module
    for name, module in targets.items():
        weight = module.weight
        weight.copy_((weight.float() + adapter.deltas[name].weight().to(weight.device)).to(weight))
    return list(targets)


def adapter_identity(folder: str | Path) -> str:
    """sha256 over the adapter's config and weights: equal identities merge the same update."""
    folder = Path(folder).expanduser()
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        path = folder / name
        digest.update(f"{name}:".encode())
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()

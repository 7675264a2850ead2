"""`compose port`: carry a patch trained on one version of a base over to an evolved version.

PortLLM (arXiv 2410.10870) shows that a patch learned on a base keeps most of its gain when
plugged, untrained, into the next version of that base. Two kinds of patch port here:

- a **carry-on** (`port_mixture`): it reads hidden states and writes a correction through the
  anchor's LM head, so it re-attaches to any version with the same architecture, hidden size
  and number of layers — and, for the anchor, the same vocabulary and tokenizer, since the
  anchor's tokens are the carry-on's positions and its head reads the correction. Any other
  difference is refused, naming the field.
- a **LoRA adapter** (`port_lora`): θ_new + ΔW_old, merged by `bases.lora` and written as an
  HF folder.

Either output folder is assembled under a temporary name beside its destination and renamed into
place only when complete (for a mixture: once it has been loaded back), and records both
versions of each base — source, sha256 of config.json and of every weights file — in `port.json`
and its README card.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from safetensors import safe_open

from composer.artifacts.load import read_mixture_recipe
from composer.bases.frozen import read_config, resolve_folder, tokenizer_fingerprint
from composer.bases.identity import WEIGHT_SUFFIXES, base_identity
from composer.errors import PortError
from composer.files import check_new_output, sha256_file, staged_output, write_json, write_text
from composer.model.factory import aligned_bases
from composer.model.head import find_head
from composer.model.weights import RECIPE_FILE, WEIGHTS
from composer.progress import status
from composer.recipe import BaseSpec, Recipe, recipe_from_dict
from composer.versions import package_versions

PORT_FILE = "port.json"
FORMAT = "compose-port"
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers")
ANCHOR_FIELDS = ("vocab_size",)
_PROBE = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


@dataclass
class PortResult:
    out_dir: Path
    bases: dict[str, dict[str, Any]]  # base name -> {"old": identity, "new": identity}


def parse_assignments(texts: list[str]) -> dict[str, str]:
    """The `NAME=NEW_SOURCE` values of `--base`, as base name -> new source."""
    sources: dict[str, str] = {}
    for text in texts:
        name, sep, source = (part.strip() for part in text.partition("="))
        if not sep or not name or not source:
            raise PortError(f"--base '{text}': write NAME=NEW_SOURCE, e.g. chat=./smollm2-v2")
        if name in sources:
            raise PortError(f"--base {name}: given twice")
        sources[name] = source
    return sources


def spec_for(source: str, like: BaseSpec | None = None) -> BaseSpec:
    """A base spec for `source` (a local HF folder or a card name) that loads as `like` does."""
    from composer.bases.registry import list_cards

    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise PortError(f"new base {folder} is not an HF folder: it has no config.json")
        where: dict[str, Any] = {"path": str(folder.resolve()), "card": None}
    elif source in list_cards():
        where = {"card": source, "path": None}
    else:
        raise PortError(f"new base '{source}': no such folder, and no base card of that name")
    data = like.model_dump() if like is not None else {}
    return BaseSpec.model_validate({**data, **where})


def identity(spec: BaseSpec, folder: Path) -> dict[str, Any]:
    """Where a base version comes from and the sha256 of what decides its weights."""
    return {
        "source": f"card {spec.card}" if spec.card else f"path {spec.path}",
        "folder": str(folder.resolve()),
        **base_identity(folder),
        **({"lora": str(spec.lora)} if spec.lora else {}),
    }


def head_rows(folder: Path) -> int:
    """Rows of the LM head (the tied input embedding without one), from safetensors headers."""
    key, files = find_head(folder)
    with safe_open(str(files[key]), framework="pt") as handle:
        return int(handle.get_slice(key).get_shape()[0])


def check_same_shape(name: str, old: Path, new: Path, *, anchor: bool) -> None:
    """Refuse a new version the carry-on cannot read or write through; one line per reason."""
    old_config, new_config = read_config(old), read_config(new)
    for field in SHAPE_FIELDS + (ANCHOR_FIELDS if anchor else ()):
        before, after = old_config.get(field), new_config.get(field)
        if before != after:
            raise PortError(f"bases.{name}: {field} {before} → {after} differs")
    if not anchor:
        return
    before_rows, after_rows = head_rows(old), head_rows(new)
    if before_rows != after_rows:
        raise PortError(f"bases.{name}: LM head rows {before_rows} → {after_rows} differ")
    if tokenizer_fingerprint(old) != tokenizer_fingerprint(new):
        raise PortError(
            f"bases.{name}: the tokenizer differs; the anchor's tokens are the carry-on's "
            "positions, so its tokenizer must stay the same"
        )


def _absolute(spec: dict[str, Any]) -> dict[str, Any]:
    """Local paths made absolute, so the ported folder loads from any working directory."""
    for key in ("path", "lora"):
        if spec.get(key) is not None:
            spec[key] = str(Path(spec[key]).expanduser().resolve())
    return spec


def port_mixture(
    mixture_dir: Path,
    new_sources: dict[str, str],
    out: Path | None = None,
    *,
    verify: bool = True,
    console: Console | None = None,
    trust_remote_code: bool = False,
) -> PortResult:
    """Write a copy of the mixture whose bases `new_sources` names (base -> folder or card) are
    replaced by their new versions; the carry-on's weights are copied byte for byte.
    `trust_remote_code`: the user's flag, needed by a mixture whose base ships Python."""
    console = console or Console(stderr=True)
    recipe = read_mixture_recipe(mixture_dir, trust_remote_code=trust_remote_code)
    if not new_sources:
        raise PortError("name a base to port: --base NAME=NEW_SOURCE")
    for name in new_sources:
        if name not in recipe.bases:
            known = ", ".join(recipe.bases)
            raise PortError(f"--base {name}: not a base of {mixture_dir} (its bases: {known})")
    out = out or mixture_dir.with_name(f"{mixture_dir.name}-ported")
    check_new_output(out)
    with status("resolving bases", console=console):
        old_folders = {n: resolve_folder(s, fetch=False) for n, s in recipe.bases.items()}
        new_specs = {n: spec_for(src, recipe.bases[n]) for n, src in new_sources.items()}
        new_folders = {
            **old_folders,
            **{n: resolve_folder(s, fetch=True) for n, s in new_specs.items()},
        }
    for name in new_sources:
        anchor = name == recipe.anchor
        check_same_shape(name, old_folders[name], new_folders[name], anchor=anchor)
    data = recipe.model_dump(mode="json")
    for name, spec in new_specs.items():
        data["bases"][name] = spec.model_dump(mode="json")
    data["bases"] = {n: _absolute(s) for n, s in data["bases"].items()}
    ported = recipe_from_dict(data, "ported recipe")
    was, now = aligned_bases(recipe, old_folders), aligned_bases(ported, new_folders)
    for name in sorted(was ^ now):
        how = "no longer shares" if name in now else "now shares"
        raise PortError(
            f"bases.{name}: its tokenizer {how} the anchor's, which changes how the carry-on "
            "reads it"
        )
    versions = {
        name: {
            "old": identity(recipe.bases[name], old_folders[name]),
            "new": identity(new_specs[name], new_folders[name]),
        }
        for name in new_sources
    }

    def fill(staging: Path) -> None:
        shutil.copyfile(mixture_dir / WEIGHTS, staging / WEIGHTS)
        write_text(staging / RECIPE_FILE, ported.to_yaml())
        record = {
            "format": FORMAT,
            "version": 1,
            "kind": "carry-on",
            "source_mixture": str(mixture_dir.resolve()),
            "carry_on_sha256": sha256_file(mixture_dir / WEIGHTS),
            "checked": [*SHAPE_FIELDS, *ANCHOR_FIELDS, "lm_head_rows", "tokenizer"],
            "bases": versions,
            "source_metrics": _source_metrics(mixture_dir),
            "versions": package_versions(),
        }
        write_json(staging / PORT_FILE, record)
        write_text(staging / "README.md", mixture_card(ported, record))
        if verify:
            with status("loading the ported mixture back", console=console):
                _check_loads(staging, trust_remote_code)

    staged_output(out, fill)
    return PortResult(out, versions)


def _check_loads(folder: Path, trust_remote_code: bool) -> None:
    import torch

    from composer.artifacts.load import load_mixture

    mixture = load_mixture(folder, fetch=False, trust_remote_code=trust_remote_code)
    ids = torch.tensor([mixture.tokenizer(_PROBE, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = mixture(ids)
    if not torch.isfinite(logits).all():
        raise PortError(f"the ported mixture gives non-finite logits on a probe text ({folder})")


def _source_metrics(mixture_dir: Path) -> dict[str, Any]:
    path = mixture_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    keys = ("steps", "eval_loss_anchor", "eval_loss_mixture")
    return {k: metrics[k] for k in keys if k in metrics}


def port_lora(
    adapter_dir: Path,
    new_source: str,
    out: Path,
    *,
    dtype: str | None = None,
    console: Console | None = None,
) -> PortResult:
    """Merge the PEFT LoRA adapter into the new base (θ_new + ΔW_old) and write it as an HF
    folder, in `dtype` (default: the dtype the base's weights are stored in)."""
    import torch

    from composer.bases.frozen import load_base
    from composer.bases.lora import adapter_identity, read_adapter_config

    console = console or Console(stderr=True)
    config = read_adapter_config(adapter_dir)
    check_new_output(out)
    spec = spec_for(new_source).model_copy(update={"lora": str(adapter_dir.resolve())})
    folder = resolve_folder(spec, fetch=True)
    stored = read_config(folder).get("dtype") or read_config(folder).get("torch_dtype")
    target = dtype or (stored if stored in ("float32", "bfloat16", "float16") else "float32")
    with status("loading the new base and merging the adapter", console=console):
        base = load_base("new", spec)
    versions = {"base": {"new": identity(spec.model_copy(update={"lora": None}), folder)}}

    def fill(staging: Path) -> None:
        for path in folder.iterdir():
            weights = path.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
            if path.is_file() and not weights and not path.name.startswith("."):
                shutil.copyfile(path, staging / path.name)
        with status("writing the patched base", console=console):
            base.model.to(getattr(torch, target)).save_pretrained(staging)
        record = {
            "format": FORMAT,
            "version": 1,
            "kind": "lora",
            "adapter": {
                "folder": str(adapter_dir.resolve()),
                "sha256": adapter_identity(adapter_dir),
                "trained_on": config.get("base_model_name_or_path"),
                "r": config.get("r"),
                "lora_alpha": config.get("lora_alpha"),
                "target_modules": config.get("target_modules"),
            },
            "base": versions["base"]["new"],
            "dtype": target,
            "weights_sha256": {
                p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))
            },
            "versions": package_versions(),
        }
        write_json(staging / PORT_FILE, record)
        write_text(staging / "README.md", lora_card(record))

    staged_output(out, fill)
    return PortResult(out, versions)


def _version_rows(bases: dict[str, dict[str, Any]]) -> str:
    rows = ["| base | version | source | config sha256 | weights sha256 |", "|---|---|---|---|---|"]
    for name, both in bases.items():
        for which, ident in both.items():
            weights = "<br>".join(f"`{f}` `{h}`" for f, h in ident["weights_sha256"].items())
            config = f"`{ident['config_sha256']}`"
            rows.append(f"| `{name}` | {which} | {ident['source']} | {config} | {weights} |")
    return "\n".join(rows)


def mixture_card(recipe: Recipe, record: dict[str, Any]) -> str:
    metrics = record["source_metrics"]
    measured = ""
    if "eval_loss_mixture" in metrics:
        measured = (
            f"\nOn the old version the held-out loss was {metrics['eval_loss_mixture']:.4f} "
            f"(anchor alone {metrics['eval_loss_anchor']:.4f}); it has not been measured on the "
            "new one.\n"
        )
    return f"""# {recipe.name} (ported)

The carry-on of `{record["source_mixture"]}`, re-attached without training to new versions of
its bases (PortLLM, arXiv 2410.10870). Checked equal between versions: model type, hidden size,
number of layers, and for the anchor `{recipe.anchor}` the vocabulary, LM head rows and
tokenizer. The carry-on weights are the source's, sha256 `{record["carry_on_sha256"]}`.

## Base versions

{_version_rows(record["bases"])}
{measured}
## Use

    compose generate <this folder> --prompt "..."

The resolved recipe is in `{RECIPE_FILE}`, the carry-on in `{WEIGHTS}`, both versions in
`{PORT_FILE}`.
"""


def lora_card(record: dict[str, Any]) -> str:
    adapter, base = record["adapter"], record["base"]
    return f"""# Patched base (ported LoRA)

The base {base["source"]} with the PEFT LoRA adapter `{adapter["folder"]}` merged into its
weights, W + (lora_alpha/r)·B·A, without training (PortLLM, arXiv 2410.10870).

| | |
|---|---|
| adapter sha256 | `{adapter["sha256"]}` |
| adapter trained on | {adapter["trained_on"] or "not recorded"} |
| r, lora_alpha | {adapter["r"]}, {adapter["lora_alpha"]} |
| base config sha256 | `{base["config_sha256"]}` |
| dtype written | {record["dtype"]} |

Use it as any HF folder, e.g. as a recipe base: `{{path: <this folder>}}`.
"""

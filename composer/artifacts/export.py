"""`compose export`: a built mixture as one self-contained, checked folder.

    OUT/recipe.yaml            the resolved recipe (bases by card, or by relative path with
                               --include-bases: a local folder base needs it)
    OUT/carry_on.safetensors   the carry-on's keys, byte for byte
    OUT/tokenizers/<base>/     each base's tokenizer files
    OUT/bases/<base>/          with --include-bases: config, tokenizer, sharded safetensors
    OUT/adapters/<base>/       a base's `lora:` patch, when it has one
    OUT/metrics.json           the build's training metrics, when it has them
    OUT/README.md              the model card
    OUT/export.json            sizes and sha256 of every file; `load_mixture` checks them

Base weights are copied tensor by tensor from the folder the base loads from, so a quantized
base is stored as its original weights plus the recipe's `quantization` setting and quantizes
the same way on load. OUT is assembled under a temporary name and renamed into place only after
the export has been loaded back and gave the same logits as the source.

A base folder may come from someone else, so only the files a model loads are copied (config,
generation config, tokenizer and chat template files, the safetensors; the Python modules of a
base that sets `trust_remote_code`), and only regular files inside the folder: a link out of it
is left behind (or, for weights, refused), and whatever is left out is named on the console.
`export.json` and the model card say what each base is (card, sha256 of config and weights,
its path inside OUT), never where it sat on the exporting machine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from composer.artifacts.load import read_mixture_recipe
from composer.artifacts.manifest import FORMAT, MANIFEST, file_entries
from composer.bases.frozen import resolve_folder
from composer.bases.identity import WEIGHT_SUFFIXES, base_identity, weight_files
from composer.bases.lora import CONFIG as LORA_CONFIG
from composer.bases.lora import WEIGHTS as LORA_WEIGHTS
from composer.errors import CheckpointError
from composer.files import check_new_output, staged_output, write_json, write_text
from composer.model.card import table, use_section
from composer.model.weights import RECIPE_FILE, WEIGHTS
from composer.progress import status
from composer.recipe import Recipe, recipe_from_dict
from composer.versions import package_versions

DEFAULT_SHARD_BYTES = 1 << 30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# The small files a base folder holds that a model needs; besides these only the safetensors
# (re-sharded, with a new index) and, for remote code, the Python modules are exported.
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "vocab.txt")
# A base's license travels with its weights (some licenses ask for it).
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")
WEIGHTS_INDEX = "model.safetensors.index.json"
PROBE = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


@dataclass
class ExportResult:
    out_dir: Path
    files: int
    bytes: int


def export(
    mixture_dir: Path,
    out: Path,
    *,
    include_bases: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verify: bool = True,
    trust_remote_code: bool = False,
    console: Console | None = None,
) -> ExportResult:
    """Write `out` from the built mixture `mixture_dir`; see the module docstring for the layout."""
    console = console or Console(stderr=True)
    recipe = read_mixture_recipe(mixture_dir, trust_remote_code=trust_remote_code)
    local = [name for name, spec in recipe.bases.items() if spec.path is not None]
    if local and not include_bases:
        raise CheckpointError(
            f"base '{local[0]}' is a local folder ({recipe.bases[local[0]].path}): an export "
            "names its bases by card or carries them; pass --include-bases"
        )
    check_new_output(out)
    with status("resolving bases", console=console):
        folders = {name: resolve_folder(spec, fetch=False) for name, spec in recipe.bases.items()}
        contents = {
            name: base_files(folder, remote_code=recipe.bases[name].trust_remote_code)
            for name, folder in folders.items()
        }
        adapters = {
            name: adapter_files(Path(spec.lora))
            for name, spec in recipe.bases.items()
            if spec.lora is not None
        }
    for name, found in contents.items():
        # without the bases, only their tokenizer files are exported
        skipped = [
            f"{n} ({why})" for n, why in found.skipped if include_bases or n in TOKENIZER_FILES
        ]
        if skipped:
            console.print(
                f"base '{name}': left out of the export: {_listing(skipped)}",
                highlight=False,
                soft_wrap=True,
            )
    files: dict[str, Any] = {}

    def fill(staging: Path) -> None:
        shutil.copyfile(mixture_dir / WEIGHTS, staging / WEIGHTS)
        sources = {}
        for name, found in contents.items():
            tokenizer = {n: p for n, p in found.files.items() if n in TOKENIZER_FILES}
            _copy_files(tokenizer, staging / "tokenizers" / name)
            with status(f"hashing base '{name}'", console=console):
                sources[name] = _source(recipe, name, found.folder, include_bases)
            if include_bases:
                with status(f"writing base '{name}'", console=console):
                    _copy_files(found.files, staging / "bases" / name)
                    _copy_weights(found.weights, staging / "bases" / name, shard_bytes)
            if name in adapters:  # the patch travels with the export
                _copy_files(adapters[name], staging / "adapters" / name)
        exported = _exported_recipe(recipe, include_bases)
        write_text(staging / RECIPE_FILE, exported.to_yaml())
        metrics = _read_metrics(mixture_dir)
        if metrics is not None:
            write_json(staging / "metrics.json", metrics)
        versions = package_versions()
        write_text(
            staging / "README.md", model_card(exported, sources, metrics, versions, include_bases)
        )
        files.update(file_entries(staging))
        manifest = {
            "format": FORMAT,
            "version": 1,
            "recipe": recipe.name,
            "include_bases": include_bases,
            "bases": sources,
            "versions": versions,
            "files": files,
        }
        write_json(staging / MANIFEST, manifest)
        if verify:
            with status("loading the export back and comparing logits", console=console):
                check_same_logits(mixture_dir, staging, trust_remote_code=trust_remote_code)

    staged_output(out, fill)
    return ExportResult(out, len(files), sum(f["bytes"] for f in files.values()))


@dataclass
class BaseFiles:
    """What export copies from a base folder, each file checked to be the folder's own."""

    folder: Path
    files: dict[str, Path]  # name -> the regular file, links resolved
    weights: list[Path]  # the safetensors the base loads from, links resolved
    skipped: list[tuple[str, str]]  # (name, why) of each entry left out


def _root(folder: Path) -> Path:
    """The tree a base folder's files must resolve into: the folder, or for a Hugging Face hub
    snapshot (`snapshots/<rev>/` of links into `../../blobs/`), its repository folder."""
    folder = folder.resolve()
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return folder


def _own_file(root: Path, path: Path) -> Path | str:
    """`path` resolved, if it is a regular file inside `root`; else why not."""
    target = path.resolve()
    if not target.is_relative_to(root):
        return "a link out of the base folder"
    if not target.is_file():
        return "not a regular file"
    return target


def base_files(folder: Path, *, remote_code: bool = False) -> BaseFiles:
    """The files of `folder` a model loads; refused if a weights file is not the folder's own
    (a link out of it), since its bytes would be hashed, copied and loaded."""
    root = _root(folder)
    found = BaseFiles(folder, {}, [], [])
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name == WEIGHTS_INDEX:  # hidden; the index is rewritten
            continue
        weights = name.endswith(WEIGHT_SUFFIXES)
        wanted = name in MODEL_FILES or name in LICENSE_FILES or name.endswith(".safetensors")
        wanted = wanted or (remote_code and name.endswith(".py"))
        own = _own_file(root, path)
        if weights and isinstance(own, str):
            raise CheckpointError(
                f"base folder {folder}: {name} is {own}; export copies only the base's own weights"
            )
        if not wanted:
            why = "weights the base does not load" if weights else "not a file a model loads"
            found.skipped.append((f"{name}{'/' if path.is_dir() else ''}", why))
        elif isinstance(own, str):
            found.skipped.append((name, own))
        elif name.endswith(".safetensors"):
            found.weights.append(own)
        else:
            found.files[name] = own
    if not found.weights:
        other = [p.name for p in weight_files(folder)]
        what = f"only {', '.join(other)}" if other else "no weight files"
        raise CheckpointError(f"base folder {folder} has {what}; export needs safetensors")
    return found


def adapter_files(folder: Path) -> dict[str, Path]:
    """A LoRA patch's config and weights, each a regular file inside its folder."""
    root = _root(folder)
    files = {}
    for name in (LORA_CONFIG, LORA_WEIGHTS):
        own = _own_file(root, folder / name)
        if isinstance(own, str):
            raise CheckpointError(f"LoRA adapter {folder}: {name} is {own}")
        files[name] = own
    return files


def _listing(items: list[str], most: int = 6) -> str:
    more = f", and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _copy_files(files: dict[str, Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, dst / name)


def _copy_weights(files: list[Path], dst: Path, shard_bytes: int) -> None:
    """The tensors of `files` re-sharded exactly into `dst`, with their index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    plan: list[list[tuple[Path, str, int]]] = [[]]
    size = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = handle.get_slice(key)
                n = _nbytes(tensor.get_shape(), tensor.get_dtype())
                if plan[-1] and size + n > shard_bytes:
                    plan.append([])
                    size = 0
                plan[-1].append((file, key, n))
                size += n
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for file in dict.fromkeys(f for f, _, _ in shard):
            with safe_open(str(file), framework="pt") as handle:
                for f, key, _ in shard:
                    if f == file:
                        tensors[key] = handle.get_tensor(key)
                        weight_map[key] = name
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
    total = sum(n for shard in plan for _, _, n in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = _DTYPE_BYTES.get(dtype, 1)
    for dim in shape:
        n *= dim
    return n


def _source(recipe: Recipe, name: str, folder: Path, included: bool) -> dict[str, Any]:
    """What a base is: its card, the sha256 of its config and weights, and its path inside
    the export when it is included (never its folder on this machine)."""
    spec = recipe.bases[name]
    identity = base_identity(folder)
    entry: dict[str, Any] = {
        "card": spec.card,
        "path": f"bases/{name}" if included else None,
        "dtype": spec.dtype,
        "quantization": spec.quantization,
        "config_sha256": identity["config_sha256"],
        "weights": identity["weights_sha256"],
    }
    if spec.card is not None:
        from composer.bases import registry

        card = registry.get_card(spec.card)
        entry["card_sha256"] = getattr(card.source, "sha256", None)
        entry["source_kind"] = card.source.kind
    return entry


def _exported_recipe(recipe: Recipe, include_bases: bool) -> Recipe:
    """Included bases by path inside OUT, else by their cards; LoRA patches by their copy
    inside OUT. Where the author's runs wrote (`output`, `train.cache.dir`) is not carried:
    it names the author's disk, and a user of the export writes elsewhere."""
    data = recipe.model_dump(mode="json")
    data["output"] = Recipe.model_fields["output"].default
    data["train"]["cache"]["dir"] = None
    for name, spec in data["bases"].items():
        if spec["lora"] is not None:
            spec["lora"] = f"adapters/{name}"
        if include_bases:
            spec["card"], spec["path"] = None, f"bases/{name}"
    return recipe_from_dict(data, "exported recipe")


def _read_metrics(mixture_dir: Path) -> dict[str, Any] | None:
    path = mixture_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc


def check_same_logits(source: Path, exported: Path, *, trust_remote_code: bool = False) -> None:
    """Load both folders and require bit-identical logits on a probe text."""
    import torch

    from composer.artifacts.load import load_mixture

    logits = []
    for folder in (source, exported):
        mixture = load_mixture(folder, fetch=False, trust_remote_code=trust_remote_code)
        ids = torch.tensor([mixture.tokenizer(PROBE, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits.append(mixture(ids))
        del mixture
    if not torch.equal(logits[0], logits[1]):
        gap = float((logits[0] - logits[1]).abs().max())
        raise CheckpointError(
            f"the export does not reproduce {source}: logits differ by up to {gap:.3g}"
        )


def model_card(
    recipe: Recipe,
    sources: dict[str, dict[str, Any]],
    metrics: dict[str, Any] | None,
    versions: dict[str, str],
    include_bases: bool,
) -> str:
    rows = []
    for name, src in sources.items():
        origin = (
            f"card `{src['card']}`" if src["card"] else f"folder `{src['path']}` of this export"
        )
        if src.get("card_sha256"):
            origin += f" ({src.get('source_kind')} sha256 `{src['card_sha256']}`)"
        weights = "<br>".join(f"`{f}` sha256 `{h}`" for f, h in src["weights"].items())
        role = " (anchor)" if name == recipe.anchor else ""
        rows.append((f"`{name}`{role}", origin, src["dtype"], src["quantization"], weights))
    bases = table(("base", "source", "dtype", "quantization", "weights loaded"), rows)
    if include_bases:
        where = "The bases' weights are in `bases/` (sharded safetensors); nothing else is read."
    else:
        where = "The bases are not included: they load from their cards or paths as listed."
    values = []
    for key in ("steps", "tokens", "train_loss_last", "eval_loss_anchor", "eval_loss_mixture"):
        value = (metrics or {}).get(key)
        if isinstance(value, float):
            values.append((key, f"{value:.4f}"))
        elif isinstance(value, int):
            values.append((key, f"{value:,}"))
    training = table(("metric", "value"), values) if values else "No training metrics were found."
    libs = ", ".join(f"{k} {v}" for k, v in versions.items())
    python = 'or in Python: `composer.load_mixture("<this folder>")`.'
    return f"""# {recipe.name} (exported mixture)

A carry-on mixture exported by `compose export`: frozen bases, a trained carry-on writing a
gated correction into the anchor `{recipe.anchor}`'s final hidden state, read by its LM head.
{where} Every file's size and sha256 is in `{MANIFEST}` and is checked on load.

## Bases

{bases}

Quantized bases are stored as their original weights; the recipe's `quantization` setting
quantizes them on load.

## Training

{training}

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```

{use_section(python)}
Exported with {libs}.
"""

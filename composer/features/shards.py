"""Feature shards: the bases' states per example, packed into safetensors files, read by rows.

A shard holds a run of examples with their tokens concatenated (N = Σ T_i rows):

    index (n,) int64            each example's position in its split
    offsets (n+1,) int64        example i owns rows offsets[i]:offsets[i+1]
    input_ids, labels (N,) int32
    anchor (N, D_anchor)        the anchor's final (post-norm) state, in the storage dtype
    tap/<base@layer> (N, D_b)   each tapped state, in the storage dtype
    <name>.scale (N,) float32   int8 storage only: each row's absmax / 127
    present/<base@layer> (N,)   bool, only for sources that may lack a state at a position

Shards are read with positional reads rather than mmap, so a training process holds the states
of one batch, not every page of every shard it has touched.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.bases.frozen import DTYPES
from composer.errors import CacheError
from composer.features.batch import Batch
from composer.features.data import Example, collate
from composer.model.mixture import Features

STORAGE = {**DTYPES, "int8": torch.int8}
_FILE_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass
class Encoded:
    """One example and its states in the storage dtype, unpadded: name -> (T, ...)."""

    index: int
    example: Example
    tensors: dict[str, torch.Tensor]


def quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) float -> stored values (a copy, never a view) and, for int8, row scales (N,)."""
    if dtype != "int8":
        return x.to(STORAGE[dtype], copy=True), None
    scale = x.abs().amax(dim=-1).float() / 127
    q = (x / scale.clamp_min(1e-30)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return q.float() if scale is None else q.float() * scale[:, None]


def encode(index: int, example: Example, features: Features, row: int, dtype: str) -> Encoded:
    """Row `row` of a batch's features, cut to the example's length and stored as `dtype`."""
    n = len(example.input_ids)
    states = {"anchor": features.anchor_hidden[row, :n]}
    states.update({f"tap/{s}": v[row, :n] for s, v in features.taps.items()})
    tensors: dict[str, torch.Tensor] = {}
    for name, values in states.items():  # on the CPU: bases may sit on other devices
        stored, scale = quantize(values, dtype)
        tensors[name] = stored.cpu()
        if scale is not None:
            tensors[f"{name}.scale"] = scale.cpu()
    for source, mask in (features.present or {}).items():
        tensors[f"present/{source}"] = mask[row, :n].to("cpu", torch.bool, copy=True)
    return Encoded(index, example, tensors)


def pack(items: list[Encoded]) -> dict[str, torch.Tensor]:
    """The tensors of one shard: the examples' rows concatenated, with their offsets."""
    lengths = [len(e.example.input_ids) for e in items]
    tensors = {
        "index": torch.tensor([e.index for e in items], dtype=torch.int64),
        "offsets": torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0),
        "input_ids": torch.tensor([t for e in items for t in e.example.input_ids]).int(),
        "labels": torch.tensor([t for e in items for t in e.example.labels]).int(),
    }
    for name in items[0].tensors:
        tensors[name] = torch.cat([e.tensors[name] for e in items])
    return tensors


class Shard:
    """A shard file's header, and reads of whole tensors or row ranges by file position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, struct.error, ValueError) as exc:
            raise CacheError(f"{path}: not a readable feature shard ({exc})") from exc
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries: dict[str, tuple[torch.dtype, list[int], int]] = {
            name: (_FILE_DTYPES[e["dtype"]], e["shape"], e["data_offsets"][0])
            for name, e in header.items()
        }

    def read(self, name: str, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Rows first:last of a tensor (all rows when `last` is None)."""
        dtype, shape, offset = self.entries[name]
        last = shape[0] if last is None else last
        row = dtype.itemsize
        for n in shape[1:]:
            row *= n
        buffer = bytearray((last - first) * row)
        if buffer:
            with open(self.path, "rb") as handle:
                handle.seek(self.start + offset + first * row)
                handle.readinto(buffer)
        if not buffer:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(last - first, *shape[1:])

    def states(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows first:last of a stored state, as float32."""
        scale = self.read(f"{name}.scale", first, last) if f"{name}.scale" in self.entries else None
        return dequantize(self.read(name, first, last), scale)


class CachedSource:
    """Batches of features read from shards, in the shape `train.FeatureSource` gives them."""

    def __init__(self, paths: list[Path]) -> None:
        self.shards = [Shard(p) for p in paths]
        where: dict[int, tuple[int, int, int]] = {}
        examples: dict[int, Example] = {}
        for k, shard in enumerate(self.shards):
            offsets = shard.read("offsets").tolist()
            ids, labels = shard.read("input_ids").tolist(), shard.read("labels").tolist()
            for row, index in enumerate(shard.read("index").tolist()):
                a, b = offsets[row], offsets[row + 1]
                where[index] = (k, a, b)
                examples[index] = Example(input_ids=ids[a:b], labels=labels[a:b])
        self.where = [where[i] for i in range(len(where))]
        self.examples = [examples[i] for i in range(len(examples))]
        names = self.shards[0].entries if self.shards else {}
        self.sources = [n.removeprefix("tap/") for n in names if _is_tap(n)]
        self.optional = [n.removeprefix("present/") for n in names if n.startswith("present/")]

    def batch(self, indices: list[int]) -> Batch:
        tensors = collate([self.examples[i] for i in indices], pad_id=0)
        B, T = tensors["input_ids"].shape
        anchor: torch.Tensor | None = None
        taps: dict[str, torch.Tensor] = {}
        present = {s: torch.zeros(B, T, dtype=torch.bool) for s in self.optional}
        for row, i in enumerate(indices):
            k, a, b = self.where[i]
            shard = self.shards[k]
            values = shard.states("anchor", a, b)
            if anchor is None:
                anchor = values.new_zeros(B, T, values.shape[-1])
            anchor[row, : b - a] = values
            for source in self.sources:
                values = shard.states(f"tap/{source}", a, b)
                if source not in taps:
                    taps[source] = values.new_zeros(B, T, values.shape[-1])
                taps[source][row, : b - a] = values
            for source in self.optional:
                present[source][row, : b - a] = shard.read(f"present/{source}", a, b)
        assert anchor is not None
        features = Features(taps=taps, anchor_hidden=anchor, present=present or None)
        return Batch(features, tensors["attention_mask"], tensors["labels"])


def _is_tap(name: str) -> bool:
    return name.startswith("tap/") and not name.endswith(".scale")

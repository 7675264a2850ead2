"""A training batch: the features of padded examples, their attention mask and labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer.features.data import IGNORE
from composer.model.mixture import Features


@dataclass
class Batch:
    features: Features
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        f = self.features
        present = {k: v.to(device) for k, v in f.present.items()} if f.present else None
        features = Features(
            {k: v.to(device) for k, v in f.taps.items()}, f.anchor_hidden.to(device), present
        )
        return Batch(features, self.attention_mask.to(device), self.labels.to(device))

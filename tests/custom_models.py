"""A model of a user's own (not registered with rlrank), importable in a fresh process."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class MyNet(nn.Module):
    """Two convolutions and a classifier for 1 x 8 x 8 images (the embedded digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(12)
        self.body = nn.Conv2d(12, 24, 3, padding=1, bias=False)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x)))
        x = F.relu(self.body(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

"""The demo network: a small CNN for the shapes images, global average pooling + linear head."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ShapesNet", "DEMO_LAYER", "DEMO_MODEL_ID"]

# The layer the demo extracts concepts at: the last conv block, 8 x 8 x 64 for 32 x 32 inputs.
DEMO_LAYER = "features.relu5"

# The model_id of the bases extracted from the demo network (by the demo and by `pyconcepts extract`
# without --model): the commands apply such a basis to the demo network when --model is not given.
DEMO_MODEL_ID = "pyconcepts-demo-shapesnet"


class ShapesNet(nn.Module):
    """Five conv + batch-norm + ReLU layers (the 1st and 3rd with stride 2), global average pooling and a
    linear head: 32 x 32 inputs give 8 x 8 maps at the last conv layer."""

    def __init__(self, n_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        widths = [3, w, 2 * w, 2 * w, 3 * w, 4 * w]
        kernels, strides = [5, 3, 3, 3, 3], [2, 1, 2, 1, 1]
        layers = []
        for j in range(5):
            layers += [
                (f"conv{j + 1}", nn.Conv2d(widths[j], widths[j + 1], kernels[j], stride=strides[j],
                                           padding=kernels[j] // 2, bias=False)),
                (f"bn{j + 1}", nn.BatchNorm2d(widths[j + 1])),
                (f"relu{j + 1}", nn.ReLU()),
            ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

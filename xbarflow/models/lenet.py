"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, on 32x32 inputs (smaller ones are zero-padded)."""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from .paper import PadTo


def lenet5(in_shape: Tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """conv 5x5 (6) - pool - conv 5x5 (16) - pool - 120 - 84 - classes; about 62 k parameters on 1x32x32."""
    c, h, w = in_shape
    size = max(32, h, w)
    side = ((size - 4) // 2 - 4) // 2
    return nn.Sequential(
        PadTo(size),
        nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )

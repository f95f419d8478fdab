"""What every dataset builder returns (:class:`DataSplits`), in a module of its own: the tensor
datasets (:mod:`.datasets`) and the image datasets (:mod:`.images`) both build it, and
``datasets`` uses the transforms of ``images``, so neither may define it for the other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch.utils.data import Dataset


@dataclass
class DataSplits:
    """Map-style datasets of ``(image (C, H, W) float tensor, label)`` and what the model needs to know."""

    train: Dataset
    val: Dataset
    test: Dataset
    in_shape: Tuple[int, int, int]
    num_classes: int

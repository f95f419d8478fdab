"""What every dataset builder returns (:class:`DataSplits`), in a module of its own: the tensor
datasets (:mod:`.datasets`) and the image datasets (:mod:`.images`) both build it, and
``datasets`` uses the transforms of ``images``, so neither may define it for the other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch.utils.data import Dataset


@dataclass
class DataSplits:
    """Map-style datasets of ``(image (C, H, W) float tensor, label)`` and what the model needs to know.

    ``train`` applies the config's augmentation (random crop, flip) at every read; ``train_plain``
    holds the same images, in the same order, without it (None: ``train`` is not augmented). What
    calibrates a deployed chip (converter ranges, compensation, BatchNorm re-estimation) reads
    :attr:`calibration_images`: a chip is calibrated on the images as they are, and a random crop
    drawn from the global generator would make an evaluation-only run's calibration differ from
    the one its source run did after training.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    in_shape: Tuple[int, int, int]
    num_classes: int
    train_plain: Optional[Dataset] = None

    @property
    def calibration_images(self) -> Dataset:
        """The training split without augmentation (indexable like :attr:`train`)."""
        return self.train if self.train_plain is None else self.train_plain

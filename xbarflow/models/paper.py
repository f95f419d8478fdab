"""The paper's networks (Chakraborty et al. 2018), as plain ``nn.Module`` (converted to crossbars afterwards).

Built by ``_target_`` (``conf/model/fcn.yaml``, ``cnn.yaml``); the pipeline passes the
dataset's ``in_shape = (C, H, W)`` and ``num_classes``. Layer order and construction order
are those of the first version, so a seed gives the same initial weights as before.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F

from .checks import Args, pooled_side, positive_int, positive_ints, with_check


def _check_fcn(args: Args) -> None:
    positive_ints("hidden", args["hidden"])


@with_check(_check_fcn)
def fcn(in_shape: Tuple[int, int, int], num_classes: int, hidden: Sequence[int] = (500,)) -> nn.Sequential:
    """Fully connected network, e.g. 784-500-10; the image is flattened first."""
    _check_fcn({"hidden": hidden})
    layers, width = [nn.Flatten()], math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class PadTo(nn.Module):
    """Zero-pad images (centred) to ``size x size``; 0 V rows on the crossbar."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        dh, dw = self.size - x.shape[-2], self.size - x.shape[-1]
        if dh <= 0 and dw <= 0:
            return x
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def _check_cnn(args: Args) -> None:
    positive_ints("channels", args["channels"])
    positive_int("classifier_hidden", args["classifier_hidden"])
    positive_int("size", args["size"])


@with_check(_check_cnn)
def cnn(in_shape: Tuple[int, int, int], num_classes: int, channels: Sequence[int] = (32, 64),
        classifier_hidden: int = 512, size: int = 32) -> nn.Sequential:
    """3x3 convolutions (+ReLU, 2x2 max-pool each), then a 2-layer classifier.

    Images are zero-padded to ``max(size, H, W)`` square. With the defaults (channels
    32, 64 on 32x32) the classifier is 4096 -> 512 -> classes.
    """
    _check_cnn({"channels": channels, "classifier_hidden": classifier_hidden, "size": size})
    c, h, w = in_shape
    size = max(size, h, w)
    side = pooled_side("model.channels", size, len(channels))
    layers = [PadTo(size)]
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = ch
    side = size // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c * side * side, classifier_hidden), nn.ReLU(),
               nn.Linear(classifier_hidden, num_classes)]
    return nn.Sequential(*layers)

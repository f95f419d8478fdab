"""The networks of the study, as plain ``nn.Module`` (converted to crossbars afterwards)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F


def fcn(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """Fully connected network, e.g. 784-500-10."""
    layers, width = [nn.Flatten()], in_features
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


def cnn(in_channels: int, channels: Sequence[int], classifier_hidden: int, num_classes: int, size: int = 32) -> nn.Sequential:
    """3x3 convolutions (+ReLU, 2x2 max-pool each) on ``size x size`` inputs, then a 2-layer classifier.

    With the defaults (channels 32, 64 on 32x32) the classifier is 4096 -> 512 -> classes.
    """
    layers, c = [PadTo(size)], in_channels
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = ch
    side = size // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c * side * side, classifier_hidden), nn.ReLU(),
               nn.Linear(classifier_hidden, num_classes)]
    return nn.Sequential(*layers)


def build_model(cfg, in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by a ``model`` config for inputs ``in_shape = (C, H, W)``."""
    c, h, w = in_shape
    if cfg.arch == "fcn":
        return fcn(c * h * w, cfg.hidden, num_classes)
    return cnn(c, cfg.channels, cfg.classifier_hidden, num_classes, size=max(32, h, w))

"""Small VGG-style networks (Simonyan & Zisserman 2015) at reduced width, for CPUs."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch.nn as nn

from .checks import Args, pooled_side, positive_int, with_check
from .paper import PadTo

# VGG-8: five 3x3 conv layers and three fully connected ones; "M" = 2x2 max-pool
VGG8 = (1, "M", 2, "M", 4, 4, "M", 8, "M")


def _check_vgg(args: Args) -> None:
    positive_int("width", args["width"])
    layers = args["layers"]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of channel multiples (integers >= 1) and M (got {layers!r})")
    for i, item in enumerate(layers):
        if item != "M":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"layers[{i}] must be an integer >= 1 (a channel multiple) or M (got {item!r})")
    positive_int("classifier_hidden", args["classifier_hidden"])
    positive_int("size", args["size"])


@with_check(_check_vgg)
def vgg(in_shape: Tuple[int, int, int], num_classes: int, width: int = 16,
        layers: Sequence[Union[int, str]] = VGG8, classifier_hidden: int = 128,
        batch_norm: bool = True, size: int = 32) -> nn.Sequential:
    """VGG-style: 3x3 convs (``width * k`` channels for each entry ``k`` of ``layers``), then 2 hidden FC layers.

    Inputs are zero-padded to ``max(size, H, W)`` square; with the defaults (VGG-8, width 16)
    the network has 5 conv and 3 FC layers and about 0.5 M parameters.
    """
    _check_vgg({"width": width, "layers": layers, "classifier_hidden": classifier_hidden, "size": size})
    c, h, w = in_shape
    side = max(size, h, w)
    pooled_side("model.layers", side, sum(item == "M" for item in layers))
    mods = [PadTo(side)]
    for item in layers:
        if item == "M":
            mods.append(nn.MaxPool2d(2))
            side //= 2
            continue
        out_ch = int(item) * width
        mods.append(nn.Conv2d(c, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            mods.append(nn.BatchNorm2d(out_ch))
        mods.append(nn.ReLU())
        c = out_ch
    mods += [nn.Flatten(), nn.Linear(c * side * side, classifier_hidden), nn.ReLU(),
             nn.Linear(classifier_hidden, classifier_hidden), nn.ReLU(),
             nn.Linear(classifier_hidden, num_classes)]
    return nn.Sequential(*mods)

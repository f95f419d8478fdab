"""Any classification network of torchvision by name, fitted to the dataset's channels and classes."""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn


def torchvision_model(in_shape: Tuple[int, int, int], num_classes: int, name: str = "resnet18", **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``, randomly initialised.

    When the dataset has other than 3 channels the first Conv2d is rebuilt with
    ``in_shape[0]`` input channels (same kernel, stride, padding). Further keyword
    arguments go to the torchvision builder (e.g. ``width_mult`` for MobileNet).

    Raises:
        ValueError: ``name`` is not one of torchvision's classification models.
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(f"model.name must be a torchvision classification model, e.g. resnet18, "
                         f"mobilenet_v3_small, vgg11 (got {name!r})")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_shape[0] != 3:
        _replace_first_conv(model, in_shape[0])
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, stride=child.stride, padding=child.padding,
                    dilation=child.dilation,
                    bias=child.bias is not None))
                return

"""The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20/32/44/56.

Three stages of ``n`` basic blocks at ``width, 2 width, 4 width`` channels (16/32/64 for the
paper's network, about 0.27 M parameters for ResNet-20), a 3x3 stem, global average pooling
and one fully connected layer. Downsampling blocks use a strided 1x1 convolution + BatchNorm
as the projection shortcut (option B), so every weight is a Conv2d or Linear that can go on
a crossbar; the residual addition, BatchNorm, ReLU and pooling stay digital.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import Args, positive_int, with_check


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def _check_resnet(args: Args) -> None:
    depth = args.get("depth", 20)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 >= 8: 8, 14, 20, 26, 32, 44, 56, 110, ... (got {depth!r})")
    positive_int("width", args["width"])


@with_check(_check_resnet)
class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images ``(N, C, H, W)``, any H, W >= 8."""

    def __init__(self, in_shape: Tuple[int, int, int], num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        _check_resnet({"depth": depth, "width": width})
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, ch = [], width
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(ch, out_ch, stride=2 if (i > 0 and j == 0) else 1))
                ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@with_check(_check_resnet)
def resnet20(in_shape: Tuple[int, int, int], num_classes: int, width: int = 16) -> CifarResNet:
    """ResNet-20: 3 stages x 3 basic blocks; ``width`` channels in the first stage (16 in the paper)."""
    return CifarResNet(in_shape, num_classes, depth=20, width=width)

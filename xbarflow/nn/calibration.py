"""Digital column-gain calibration of crossbar layers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import XbarConv2d, XbarLinear, _XbarMixin


def _ideal_product(layer: _XbarMixin, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, XbarConv2d):
        return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, 1)
    return F.linear(x, layer.weight)


@torch.no_grad()
def calibrate_column_gains(model: nn.Module, x: torch.Tensor, min_gain: float = 1e-3) -> None:
    """Set every crossbar layer's column gain so that its output matches the ideal layer's.

    One forward pass of ``model`` on ``x`` in its current (non-ideal) mode. Layer by
    layer, in execution order, each layer's gain ``g_j`` is the least-squares fit of
    its array output to the ideal product of the *same* input (``sum y_ideal y_xbar /
    sum y_xbar^2`` over the batch and, for convolutions, positions), so later layers
    are calibrated on the outputs of the already calibrated earlier ones.

    Args:
        model: a converted model in mode ``nominal`` or ``chip``.
        x: a calibration batch.
        min_gain: floor for a column whose array output does not correlate with the ideal one.
    """
    handles = []

    def hook(layer, inputs, output):
        channel_dim = 1 if isinstance(layer, XbarConv2d) else -1
        shape = [1] * output.dim()
        shape[channel_dim] = -1
        bias = layer.bias.reshape(shape) if layer.bias is not None else 0.0
        array = (output - bias) / layer.log_column_gain.exp().reshape(shape)
        ideal = _ideal_product(layer, inputs[0])
        dims = [d for d in range(output.dim()) if d != channel_dim % output.dim()]
        gain = (ideal * array).sum(dims) / (array * array).sum(dims).clamp_min(1e-30)
        layer.log_column_gain.copy_(gain.clamp_min(min_gain).log())
        return array * gain.clamp_min(min_gain).reshape(shape) + bias

    for m in model.modules():
        if isinstance(m, (XbarLinear, XbarConv2d)):
            handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def reset_column_gains(model: nn.Module) -> None:
    """Unity gain on every crossbar layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _XbarMixin):
                m.log_column_gain.zero_()

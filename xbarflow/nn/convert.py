"""Put a model's Linear and Conv2d layers onto crossbars."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch.nn as nn

from ..crossbar.spec import CrossbarSpec
from ..crossbar.variation import Chip
from .layers import CROSSBAR_ONLY_PARAMS, XbarConv2d, XbarLinear, _XbarMixin

SpecFor = Union[CrossbarSpec, Callable[[str, nn.Module], CrossbarSpec]]


def _spec_for(spec: SpecFor, name: str, module: nn.Module) -> CrossbarSpec:
    return spec(name, module) if callable(spec) and not isinstance(spec, CrossbarSpec) else spec


def convert(model: nn.Module, spec: SpecFor, *, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` by its crossbar version, keeping weights.

    Args:
        model: any module tree.
        spec: one :class:`CrossbarSpec` for all layers, or a function
            ``(qualified_name, module) -> CrossbarSpec`` for per-layer arrays.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The converted model, in ``"ideal"`` mode (it computes what the original did).
        Each crossbar layer's ``xbar_name`` is its qualified module name, which
        selects its devices on a :class:`Chip`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = _convert_one(child, _spec_for(spec, full, child), full) if not isinstance(child, _XbarMixin) else None
            if new is not None:
                setattr(module, child_name, new)
    return model


def _convert_one(m: nn.Module, spec: CrossbarSpec, name: str) -> Optional[nn.Module]:
    kw = dict(device=m.weight.device, dtype=m.weight.dtype) if hasattr(m, "weight") else {}
    if type(m) is nn.Linear:
        new = XbarLinear(m.in_features, m.out_features, bias=m.bias is not None, spec=spec, name=name, **kw)
    elif type(m) is nn.Conv2d:
        if m.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported on crossbars (groups={m.groups})")
        new = XbarConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, bias=m.bias is not None, spec=spec, name=name, **kw)
    else:
        return None
    missing, unexpected = new.load_state_dict(m.state_dict(), strict=False)
    assert not unexpected and all(k in CROSSBAR_ONLY_PARAMS for k in missing), (missing, unexpected)
    return new


def xbar_layers(model: nn.Module) -> Iterator[_XbarMixin]:
    """Every crossbar layer of ``model``."""
    return (m for m in model.modules() if isinstance(m, _XbarMixin))


def set_mode(model: nn.Module, mode: str, chip: Optional[Chip] = None) -> nn.Module:
    """Put every crossbar layer of ``model`` into ``mode`` (``ideal``, ``nominal``, ``chip``)."""
    for layer in xbar_layers(model):
        layer.set_mode(mode, chip)
    return model


@contextmanager
def xbar_mode(model: nn.Module, mode: str, chip: Optional[Chip] = None):
    """Temporarily run ``model`` in ``mode``; restores each layer's previous mode."""
    saved = [(layer, layer.mode, layer.chip) for layer in xbar_layers(model)]
    set_mode(model, mode, chip)
    try:
        yield model
    finally:
        for layer, m, c in saved:
            layer.mode, layer.chip = m, c

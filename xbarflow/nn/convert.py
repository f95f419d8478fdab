"""Put a model's Linear and Conv2d layers onto crossbars.

What is converted: ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (any kernel, stride,
padding and dilation; zero padding is 0 V on the padded rows). Everything else stays
digital and untouched: BatchNorm, residual additions, pooling, activations, and grouped or
depthwise convolutions. Those last hold few weights per output (a depthwise 3x3 filter is a
9 x 1 matrix per channel), so one set of tiles per group would leave almost every array
empty; like aihwkit's analog convolutions, xbarflow keeps them digital and the layer table
says so. Which of the convertible layers go on crossbars is chosen by module name
(:class:`LayerSelection`: include / exclude glob patterns, optionally the first and the last
layer kept digital, the field's usual choice).
"""
from __future__ import annotations

import copy
import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch.nn as nn

from ..crossbar.spec import CrossbarSpec
from ..crossbar.variation import Chip
from .layers import CROSSBAR_ONLY_PARAMS, XbarConv2d, XbarLinear, _XbarMixin

SpecFor = Union[CrossbarSpec, Callable[[str, nn.Module], CrossbarSpec]]


def _spec_for(spec: SpecFor, name: str, module: nn.Module) -> CrossbarSpec:
    return spec(name, module) if callable(spec) and not isinstance(spec, CrossbarSpec) else spec


@dataclass(frozen=True)
class LayerSelection:
    """Which convertible layers go on crossbars, by qualified module name (``layer3.0.conv1``, ``fc``).

    A layer goes on crossbars when its name matches one of ``include`` and none of
    ``exclude`` (``fnmatch`` glob patterns: ``*`` matches dots too), and, with
    ``first_last_digital``, it is neither the first nor the last convertible layer in the
    model's module order (registration order, which for the usual networks is the stem and
    the classifier).
    """

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    first_last_digital: bool = False

    def chosen(self, model: nn.Module) -> List[str]:
        """Names of the layers of ``model`` that go on crossbars, in module order."""
        names = convertible_layers(model)
        ends = {names[0], names[-1]} if (self.first_last_digital and names) else set()
        return [n for n in names if n not in ends
                and any(fnmatch.fnmatchcase(n, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]


ALL_LAYERS = LayerSelection()


def is_convertible(m: nn.Module) -> bool:
    """True for the layers a crossbar can hold: ``nn.Linear`` and ungrouped ``nn.Conv2d`` (exact types)."""
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)


def convertible_layers(model: nn.Module) -> List[str]:
    """Qualified names of the layers of ``model`` that could go on crossbars, in module order."""
    return [n for n, m in model.named_modules() if n and (is_convertible(m) or isinstance(m, _XbarMixin))]


def convert(model: nn.Module, spec: SpecFor, *, inplace: bool = False,
            layers: LayerSelection = ALL_LAYERS) -> nn.Module:
    """Replace the selected ``nn.Linear`` and ``nn.Conv2d`` by their crossbar versions, keeping weights.

    Args:
        model: any module tree.
        spec: one :class:`CrossbarSpec` for all layers, or a function
            ``(qualified_name, module) -> CrossbarSpec`` for per-layer arrays.
        inplace: modify ``model`` instead of a deep copy.
        layers: which convertible layers go on crossbars (default: all); the others,
            and grouped convolutions, stay digital.

    Returns:
        The converted model, in ``"ideal"`` mode (it computes what the original did).
        Each crossbar layer's ``xbar_name`` is its qualified module name, which
        selects its devices on a :class:`Chip`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    chosen = set(layers.chosen(model))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full not in chosen or isinstance(child, _XbarMixin):
                continue
            new = _convert_one(child, _spec_for(spec, full, child), full)
            if new is not None:
                setattr(module, child_name, new)
    return model


def _convert_one(m: nn.Module, spec: CrossbarSpec, name: str) -> Optional[nn.Module]:
    kw = dict(device=m.weight.device, dtype=m.weight.dtype) if hasattr(m, "weight") else {}
    new: nn.Module
    if type(m) is nn.Linear:
        new = XbarLinear(m.in_features, m.out_features, bias=m.bias is not None, spec=spec, name=name, **kw)
    elif type(m) is nn.Conv2d and m.groups == 1:
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

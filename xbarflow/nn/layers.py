"""Crossbar-backed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

A layer runs in one of three modes:

* ``"ideal"``   - ordinary arithmetic with the software weights;
* ``"nominal"`` - the crossbar circuit with its parasitic resistances, nominal devices;
* ``"chip"``    - the circuit on a drawn :class:`~xbarflow.crossbar.Chip`.

The effective weight (:func:`~xbarflow.crossbar.effective_weight`) is computed once
per weight update or chip and cached; inside autograd (training) it is recomputed
at every forward so that gradients flow through the circuit model exactly, which
is what technology-aware training is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..crossbar.effective import effective_apply, effective_weight, fused_is_cheaper
from ..crossbar.spec import CrossbarSpec
from ..crossbar.variation import Chip

MODES = ("ideal", "nominal", "chip")


class _XbarMixin:
    """Mode, chip and effective-weight cache shared by the crossbar layers."""

    def _init_xbar(self, spec: CrossbarSpec, name: str = ""):
        self.spec = spec
        self.xbar_name = name
        self.mode = "ideal"
        self.chip: Optional[Chip] = None
        self._cache_key = None
        self._cache_weight: Optional[torch.Tensor] = None

    def set_mode(self, mode: str, chip: Optional[Chip] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        if mode == "chip" and chip is None:
            raise ValueError("mode 'chip' needs a chip")
        self.mode = mode
        self.chip = chip if mode == "chip" else None

    def _weight_matrix(self) -> torch.Tensor:
        """Software weight as ``(fan_in, fan_out)``."""
        return self.weight.reshape(self.weight.shape[0], -1).t()

    def _training_through_circuit(self) -> bool:
        """Gradients must flow through the circuit (recompute, never cache)."""
        return self.mode != "ideal" and torch.is_grad_enabled() and self.weight.requires_grad

    def effective_weight_matrix(self) -> torch.Tensor:
        """Effective weight ``(fan_in, fan_out)`` of the current mode (cached outside autograd)."""
        W = self._weight_matrix()
        if self.mode == "ideal":
            return W
        chip = self.chip if self.mode == "chip" else None
        if self._training_through_circuit():
            return effective_weight(W, self.spec, chip, self.xbar_name)
        # An in-place optimizer step bumps the version counter, so the key changes
        # exactly when the weight does.
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device, self.spec, chip)
        if key != self._cache_key:
            with torch.no_grad():
                self._cache_weight = effective_weight(W, self.spec, chip, self.xbar_name)
            self._cache_key = key
        return self._cache_weight

    def extra_repr(self) -> str:
        s = self.spec
        return (
            super().extra_repr()
            + f", mode={self.mode}, tile={s.rows}x{s.cols}, r_source={s.r_source:g}, r_sink={s.r_sink:g}"
        )


class XbarLinear(_XbarMixin, nn.Linear):
    """``nn.Linear`` whose product runs on crossbar tiles. Input ``(*, in_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, spec: CrossbarSpec,
                 name: str = "", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_xbar(spec, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ideal":
            return F.linear(x, self.weight, self.bias)
        # bias is added digitally, after the array
        if self._training_through_circuit():
            batch = x.numel() // self.in_features if self.in_features else 0
            if batch > 0 and fused_is_cheaper(batch, self.spec, self.out_features):
                # Training on large tiles with a small batch: apply the circuit to x
                # directly (exact, cheaper than forming the effective weight).
                chip = self.chip if self.mode == "chip" else None
                y = effective_apply(x.reshape(batch, self.in_features), self._weight_matrix(), self.spec,
                                    chip, self.xbar_name)
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
        return F.linear(x, self.effective_weight_matrix().t(), self.bias)


class XbarConv2d(_XbarMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups=1) on crossbar tiles, in the im2col view.

    Fan-in is ``C_in * kh * kw`` (one row per input channel and kernel tap), fan-out
    ``C_out``. Zero padding of the image is 0 V on those rows.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, spec: CrossbarSpec, name: str = "", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=1, bias=bias, device=device, dtype=dtype)
        if self.padding_mode != "zeros":
            raise ValueError("XbarConv2d supports padding_mode='zeros' only")
        self._init_xbar(spec, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ideal":
            weight = self.weight
        else:
            weight = self.effective_weight_matrix().t().reshape(self.weight.shape)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, 1)

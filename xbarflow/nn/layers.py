"""Crossbar-backed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

A layer runs in one of three modes:

* ``"ideal"``   - ordinary arithmetic with the software weights;
* ``"nominal"`` - the crossbar circuit with its parasitic resistances, nominal devices;
* ``"chip"``    - the circuit on a drawn :class:`~xbarflow.crossbar.Chip`.

The effective weight (:func:`~xbarflow.crossbar.effective_weight`) is computed once
per weight update or chip and cached; inside autograd (training) it is recomputed
at every forward so that gradients flow through the circuit model exactly, which
is what technology-aware training is.

Per-read effects break the cache: with read noise on the chip every forward pass
is a new read (numbered from 0 after each :meth:`set_mode`, so a chip's reads are
reproducible) and recomputes the effective weight; with a DAC or ADC the inputs
are quantised and, with an ADC, each tile row's partial output is converted before
the digital sum (:func:`~xbarflow.crossbar.effective.adc_apply`). Training and
evaluation run this same forward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..crossbar.effective import adc_apply, effective_apply, effective_weight, fused_is_cheaper
from ..crossbar.mapping import weight_range
from ..crossbar.peripherals import dac_quantize, input_scale
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
        self._reads = 0  # reads of the current chip so far (read noise)
        # Digital gain per output column (log scale, 0 = unity), applied after the array in
        # the non-ideal modes only: the periphery's way to undo the circuit's attenuation.
        # Technology-aware training calibrates and learns it; standard training leaves it at 1.
        self.log_column_gain = nn.Parameter(torch.zeros(self.weight.shape[0], device=self.weight.device,
                                                        dtype=self.weight.dtype))

    def _digital(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Column gain and bias, both digital, on the array output ``y`` (channels at ``channel_dim``)."""
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        y = y * self.log_column_gain.exp().reshape(shape)
        return y + self.bias.reshape(shape) if self.bias is not None else y

    def set_mode(self, mode: str, chip: Optional[Chip] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        if mode == "chip" and chip is None:
            raise ValueError("mode 'chip' needs a chip")
        self.mode = mode
        self.chip = chip if mode == "chip" else None
        self._reads = 0

    def _chip(self) -> Optional[Chip]:
        return self.chip if self.mode == "chip" else None

    def _next_read(self) -> int:
        """Number of this read; advances only when reads differ (read noise)."""
        n = self._reads
        chip = self._chip()
        if chip is not None and chip.per_read:
            self._reads += 1
        return n

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
        chip = self._chip()
        if self._training_through_circuit():
            return effective_weight(W, self.spec, chip, self.xbar_name, self._next_read())
        if chip is not None and chip.per_read:
            # every read differs: nothing to cache
            with torch.no_grad():
                return effective_weight(W, self.spec, chip, self.xbar_name, self._next_read())
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
        spec = self.spec
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_max = None
        if spec.has_peripherals:
            x_max = input_scale(x2, spec.dac_range, 1)                      # (batch, 1) or scalar
            if spec.dac_bits is not None:
                x2 = dac_quantize(x2, spec.dac_bits, x_max)
        # bias is added digitally, after the array
        if self._training_through_circuit() and not spec.has_adc:
            batch = x2.shape[0]
            if batch > 0 and fused_is_cheaper(batch, spec, self.out_features):
                # Training on large tiles with a small batch: apply the circuit to x
                # directly (exact, cheaper than forming the effective weight).
                y = effective_apply(x2, self._weight_matrix(), spec, self._chip(), self.xbar_name,
                                    self._next_read())
                return self._digital(y.reshape(*lead, self.out_features), -1)
        W_eff = self.effective_weight_matrix()
        if spec.has_adc:
            y = adc_apply(x2, W_eff, spec, weight_range(self._weight_matrix(), spec.w_max), x_max)
            return self._digital(y.reshape(*lead, self.out_features), -1)
        return self._digital(F.linear(x2.reshape(*lead, self.in_features), W_eff.t()), -1)


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
        """``x`` of shape ``(N, C_in, H, W)``; the DAC scale ``x_max`` is per image."""
        if self.mode == "ideal":
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
        spec = self.spec
        x_max = None
        if spec.has_peripherals:
            x_max = input_scale(x, spec.dac_range, 3)                       # (N, 1, 1, 1) or scalar
            if spec.dac_bits is not None:
                x = dac_quantize(x, spec.dac_bits, x_max)
        W_eff = self.effective_weight_matrix()
        if not spec.has_adc:
            weight = W_eff.t().reshape(self.weight.shape)
            return self._digital(F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, 1), 1)
        # ADC: the im2col view, one read per output position, tile rows converted separately
        N = x.shape[0]
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        L = cols.shape[-1]
        x2 = cols.transpose(1, 2).reshape(N * L, -1)                           # (N*L, fan_in)
        xm = x_max.reshape(-1, 1).repeat_interleave(L, dim=0) if x_max.dim() else x_max
        y = adc_apply(x2, W_eff, spec, weight_range(self._weight_matrix(), spec.w_max), xm)
        h_out = (x.shape[-2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w_out = L // h_out
        y = y.reshape(N, L, self.out_channels).transpose(1, 2).reshape(N, self.out_channels, h_out, w_out)
        return self._digital(y, 1)
